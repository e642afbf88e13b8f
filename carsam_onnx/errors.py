"""The exceptions a user can meet. The CLI prints their message as one line and exits with code 2."""


class CarsamError(Exception):
    """Base class: bad input or a request that cannot be carried out. Message = one line, says what to do."""


class InputError(CarsamError):
    """A file or argument given by the user is missing, unreadable or of the wrong kind."""


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable, or does not match the requested model type."""


class OutputError(CarsamError):
    """An output path cannot be written (exists without --force, folder missing or read-only)."""


class ModelError(CarsamError):
    """An ONNX model is not what the command needs (not SAM, truncated, unsupported op...)."""


class UnsupportedOpError(ModelError):
    """The torch executor met an ONNX op it does not implement."""


class CalibrationError(CarsamError):
    """Calibration data are missing or invalid (empty folder, NaN, boxes outside the image...)."""


class ArtifactError(InputError):
    """A calibration file is unreadable, of another format version, or made for another model."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line for an error or a warning: its first line, cut at a word boundary
    before `limit` characters (marked "..."); the exception's type name when it has no message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    cut = line[:limit - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."
