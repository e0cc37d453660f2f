"""JSON from files we did not write ourselves, parsed within limits (stdlib only, no torch).

``json.loads`` recurses once per nesting level: ``[[[[...]]]]`` 100000 deep raises RecursionError
(or worse, with a raised recursion limit), which no caller expects. :func:`loads_bounded` refuses
input longer than ``max_bytes`` or nested deeper than ``max_depth`` before ``json.loads`` sees it.
Every failure is a ValueError (JSONLimitError, json.JSONDecodeError or UnicodeDecodeError), which
callers turn into their own error naming the file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from .errors import JSONLimitError

# Deeper than anything this project reads (a FlashPack footer is 4 levels, a manifest 4).
MAX_DEPTH = 64

# Every byte but brackets and quotes (UTF-8 continuation bytes never equal these ASCII ones).
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_STRING = re.compile(rb'"[^"]*"')
_INNERMOST_PAIR = re.compile(rb"\[\]|\{\}")


def nesting_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether brackets outside strings nest deeper than ``max_depth`` in the JSON ``data``.

    Escaped backslashes and quotes are dropped, then everything but brackets and quotes, then the
    strings; each pass then removes the innermost ``[]``/``{}`` pairs, so balanced brackets vanish
    after exactly as many passes as they are deep. What resists is malformed JSON: it counts as
    too deep when it leaves more than ``max_depth`` brackets open (``json.loads`` would recurse
    into them before finding the error). Runs at C speed (about 2 ms for a 400 KB footer).
    """
    structure = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    brackets = _STRING.sub(b"", structure)
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets, removed = _INNERMOST_PAIR.subn(b"", brackets)
        if not removed:  # unbalanced: not JSON; json.loads reports it when that is safe
            return brackets.count(b"[") + brackets.count(b"{") > max_depth
    return bool(brackets)


def loads_bounded(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(data)``, refusing more than ``max_bytes`` or nesting deeper than ``max_depth``."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise JSONLimitError(f"{len(raw)} bytes, more than the limit of {max_bytes}")
    if nesting_exceeds(raw, max_depth):
        raise JSONLimitError(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:  # a lowered recursion limit; the scan above normally prevents this
        raise JSONLimitError("nested too deeply to parse") from None


def load_file_bounded(path: str | os.PathLike[str], *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """:func:`loads_bounded` of a file, reading at most ``max_bytes + 1`` bytes of it.

    OSError (missing, unreadable) propagates unchanged, so callers can tell it from bad contents.
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONLimitError(f"more than the limit of {max_bytes} bytes")
    return loads_bounded(data, max_bytes=max_bytes, max_depth=max_depth)
