"""Text on its way in or out of the process: what UTF-8 can encode, bytes read from Redis,
text cut to a size.

JSON's ``\\udfff`` escape, and Python strings, can hold a lone surrogate, which UTF-8
cannot encode: a Redis write, an HTTP response or a log line holding one fails. Text from
outside (a request, a model server's reply, a sandbox's output) is checked or cleaned here
on its way in. ``text_of`` turns what a Redis client returns (bytes, or str when it
decodes) into str. ``cut_middle`` keeps the head and tail of a long text, the one way
actfleet shortens what a model or a reader will see.
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


def text_of(value: object) -> str:
    """``value`` as str: bytes decoded as UTF-8 (what Redis returns), anything else ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def cut_middle(text: str, max_chars: int, head_share: float = 0.5) -> str:
    """``text`` itself if it has at most ``max_chars`` characters; otherwise its head
    (``head_share`` of what is kept) and its tail around a line saying how many characters
    were cut, all within ``max_chars`` (one character of each end is kept even when the
    marker alone is longer)."""
    if len(text) <= max_chars:
        return text
    # the marker's count has at most as many digits as len(text)
    keep = max(max_chars - _MARKER_CHARS - len(str(len(text))), 2)
    head = min(max(int(keep * head_share), 1), keep - 1)
    tail = keep - head
    return f"{text[:head]}\n[... {len(text) - keep} characters cut ...]\n{text[len(text) - tail :]}"


_MARKER_CHARS = len("\n[...  characters cut ...]\n")
