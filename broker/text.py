"""Making untrusted text safe to show: the one place that escapes it.

Text from mod_md's store (written by www-data) and from callers reaches error replies,
properties, signals, the log and root's terminal. Every one of those exits passes it through
`safe()` first, because:
- D-Bus cannot carry a NUL in a string (the library raises while marshalling), nor a lone
  surrogate (not encodable as UTF-8);
- journald ends a line at NUL as well as at a newline, so a NUL followed by "<0>" would
  start a forged entry of priority 0;
- a terminal obeys escape sequences, and bidirectional overrides make a name read as another.

`safe()` is idempotent (its output holds nothing it would change), so applying it again at a
later exit is harmless. A backslash is left alone for that reason: "\\x1b" written by an
attacker stays four harmless characters.
"""

from __future__ import annotations

import unicodedata

# Longest text kept for one message or detail; longer text is cut and marked.
MAX_TEXT = 1024
ELLIPSIS = "..."


def _unsafe(ch: str) -> bool:
    # C*: control (C0, C1, DEL), format (bidi overrides, zero-width), surrogate, private use,
    # unassigned. Zl/Zp: the line and paragraph separators, which some readers break lines at.
    return unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029"


def _escape(ch: str) -> str:
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def safe(text: object, limit: int = MAX_TEXT) -> str:
    """`text` with every control, format or separator character escaped, at most `limit` long.

    Printable characters (any script) are kept; what is cut off is replaced by "...".
    """
    s = text if isinstance(text, str) else str(text)
    # Escaping never shortens: what lies beyond `limit` characters is cut anyway. A caller's
    # string can be megabytes long; this keeps the cost bounded too.
    s = s[:limit + 1]
    if s.isascii() and s.isprintable():
        out = s
    else:
        out = "".join(_escape(ch) if _unsafe(ch) else ch for ch in s)
    if len(out) > limit:
        out = out[:max(0, limit - len(ELLIPSIS))] + ELLIPSIS
    return out


def is_safe(text: object, limit: int = MAX_TEXT) -> bool:
    """`text` is a str that `safe()` would leave as it is."""
    return isinstance(text, str) and safe(text, limit) == text
