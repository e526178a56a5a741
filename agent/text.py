"""Text that can leave the process: what UTF-8 can encode.

JSON's ``\\udfff`` escape, and Python strings, can hold a lone surrogate, which UTF-8
cannot encode: a Redis write, an HTTP response or a log line holding one fails. Text from
outside (a request, a model server's reply, a sandbox's output) is checked or cleaned here
on its way in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_SURROGATE = re.compile("[\\ud800-\\udfff]")


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode shown as ``\\udfff`` escapes."""
    return text if encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def replace_unencodable(value: Any) -> Any:
    """A JSON value with every lone surrogate replaced by U+FFFD (text from outside that
    cannot be refused, and records stored before such text was refused)."""
    if isinstance(value, str):
        return value if encodable(value) else _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [replace_unencodable(v) for v in value]
    if isinstance(value, Mapping):
        return {replace_unencodable(k): replace_unencodable(v) for k, v in value.items()}
    return value
