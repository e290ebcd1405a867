"""The one "did you mean" of kdbench: every message that refuses a name suggests the close ones."""

from __future__ import annotations

import difflib


def did_you_mean(name, valid) -> str:
    """`` Did you mean 'a', 'b'?`` for up to three of ``valid`` close to ``name`` (difflib's ratio
    ≥ 0.6), or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
