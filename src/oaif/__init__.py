"""oaif: align language models with online AI feedback.

The Python API (:mod:`oaif.api`; the ``oaif`` command does the same from a shell)::

    result = oaif.train("configs/demo.yaml", ["train.max_steps=3"], model=..., prompts=[...], judge=fn)
    result.summary, result.checkpoint, result.run_dir

- :func:`oaif.load_config`: a validated :class:`oaif.Config` from YAML, ``key.sub=value`` overrides
  and group mappings (``train={"max_steps": 3}``).
- :func:`oaif.train`: train; the policy, the prompts (a file, a list, a ``datasets.Dataset``) and the
  judge (a function of ``(prompt, a, b)`` or ``(prompt, response)``, or annotator keys) as arguments.
- :class:`oaif.TrainResult`: its summary, final checkpoint, run directory and config.
- :class:`oaif.OaifError` and its subclasses (``ConfigError``, ``DataError``, ``ModelError``,
  ``AnnotatorError``, ``CheckpointError``, ``TrainingError``): bad input, with a one-line message.

The core imports only the standard library; these names load on first use, and torch and
transformers load when a step needs them.
"""

__version__ = "0.1.0"

_LAZY = {"train": "oaif.api", "load_config": "oaif.api", "TrainResult": "oaif.api", "Config": "oaif.config",
         **{name: "oaif.errors" for name in ("OaifError", "ConfigError", "DataError", "ModelError", "AnnotatorError",
                                            "CheckpointError", "TrainingError")}}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'oaif' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
