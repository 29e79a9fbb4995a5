"""oaif: align language models with online AI feedback.

The core imports only the standard library; torch and transformers load when a step needs them.
"""

__version__ = "0.1.0"
