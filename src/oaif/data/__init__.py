"""Prompt and preference data: loading, filtering, splitting and a resumable prompt stream.

* :mod:`~oaif.data.records`: ``PromptRecord``, ``PreferenceRecord`` and the sets a loader returns;
  ``messages_to_text``.
* :mod:`~oaif.data.rows`: reading rows (JSONL lines, row ids) for every loader.
* :mod:`~oaif.data.prompts`: prompt files (JSONL, CSV, Parquet, ``datasets`` directories).
* :mod:`~oaif.data.preferences`: preference files, loaded and saved.
* :mod:`~oaif.data.hh`: Anthropic HH transcripts parsed into pairs.
* :mod:`~oaif.data.split`: ``training_prompts``, a run's records filtered and split into training
  and held-out prompts.
* :mod:`~oaif.data.stream`: ``PromptStream``, the resumable prompt stream.

Rows that cannot be used for a benign reason (an empty prompt, a prompt that is too long, an
empty or identical response pair) are skipped and counted by reason; malformed input (a missing
file, a line that is not JSON, a missing field, a value of the wrong type) is a
:class:`~oaif.errors.DataError` with a one-line message that names the file, the line or row,
and the problem. Nothing here imports torch or transformers; tokenization is passed in as a
function.
"""
