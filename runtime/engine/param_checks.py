"""What the checks of a request's parameters share: the error that names the field it is about, a value shown
clipped in a message, and text UTF-8 can carry."""

from __future__ import annotations


class InvalidParam(ValueError):
    """A sampling parameter out of range; param names the field, so the HTTP layer can point at it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def bad_param(name: str, value: object, what: str) -> InvalidParam:
    return InvalidParam(name, f"{name} must be {what}, got {value!r}")


def clip_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
