"""User-facing errors. The CLI prints their message on one line and exits with status 2."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters (its type name when it has none)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OaifError(Exception):
    """A problem with the user's input or environment, with a message that names it."""


class ConfigError(OaifError):
    """A config file or override is invalid: unknown key, wrong type, bad value, missing file."""


class DataError(OaifError):
    """A prompt or preference file is missing, unreadable or lacks the configured field."""


class ModelError(OaifError):
    """A model id or path cannot be resolved or loaded."""


class AnnotatorError(OaifError):
    """An annotator is misconfigured (bad rubric, unknown callable), or failed too often to train on."""


class CheckpointError(OaifError):
    """A checkpoint or run directory cannot be used: corrupt or truncated files, or a model that does not match it."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file size limit, an I/O error); the last complete one stays."""


class TrainingError(OaifError):
    """A run took its steps but trained on nothing: every pair was identical, tied or failed."""
