"""Reading flags from config files and command lines strictly: "False" is false, and typos are errors."""

from __future__ import annotations

__all__ = ["resolve_flag", "str2bool"]

_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})


def str2bool(value: str | bool) -> bool:
    """Parse a boolean from a config value or a command-line string.

    Accepts a bool, or one of true/false, yes/no, 1/0, on/off (any case, surrounding spaces ignored). Use it
    as ``argparse`` ``type=``: ``type=bool`` turns every non-empty string, "False" included, into True.

    Raises:
        ValueError: for any other string.
        TypeError: for a value that is neither a string nor a bool.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a bool or a string, got {type(value).__name__}")
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"cannot read {value!r} as a boolean (use true/false, yes/no, 1/0 or on/off)")


def resolve_flag(value: bool | str, name: str) -> bool:
    """The option ``name`` as a bool, read strictly with :func:`str2bool`.

    Raises:
        ValueError: naming the option, for a value :func:`str2bool` cannot read (of any type).
    """
    try:
        return str2bool(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid {name} flag: {error}") from None
