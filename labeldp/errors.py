"""The exceptions labeldp raises on purpose.

Every error a user can cause by bad input or a missing file is one of these, with a
message that names the parameter or file, what was expected and how to fix it. The CLI
prints the message as one line: ``ConfigError`` exits with status 2 (bad options),
``DataError`` with status 1 (the data on disk is missing or corrupt).
"""


class LabelDPError(Exception):
    """Base class of the errors labeldp raises deliberately."""


class ConfigError(LabelDPError, ValueError):
    """An argument or option is outside its allowed range."""


class DataError(LabelDPError):
    """A dataset file is missing, corrupt, or fails its checksum."""


def check_int(name: str, value: object, low: int) -> int:
    """``value`` if it is an integer (not a bool) ≥ ``low``; else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return value
