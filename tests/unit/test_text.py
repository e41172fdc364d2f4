"""broker.text: what every exit of untrusted text goes through."""

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from broker.errors import StagingInvalid
from broker.text import MAX_TEXT, is_safe, safe


def test_printable_text_is_kept():
    assert safe("www.example.org: expired: staging/x/pubcert.pem has expired") == \
        "www.example.org: expired: staging/x/pubcert.pem has expired"
    assert safe("Grüße, 证书") == "Grüße, 证书"


def test_controls_are_escaped():
    assert safe("a\0b\x1b[2Jc\x7f\x9b\n\r\t") == "a\\x00b\\x1b[2Jc\\x7f\\x9b\\x0a\\x0d\\x09"
    assert safe("\u2028\u2029\u202e\ud800\U000e0001") == "\\u2028\\u2029\\u202e\\ud800\\U000e0001"


def test_length_is_bounded():
    out = safe("\0" * 10_000)
    assert len(out) == MAX_TEXT and out.endswith("...")
    assert safe("abcdef", limit=5) == "ab..."


def test_error_messages_are_escaped_where_they_are_made():
    e = StagingInvalid("names", "staging/x/pubcert.pem does not cover a\0b\x1b")
    assert e.message == "names: staging/x/pubcert.pem does not cover a\\x00b\\x1b"
    assert str(e) == e.message


@given(st.text())
def test_safe_output_holds_no_control_character_and_is_a_fixed_point(s):
    out = safe(s)
    assert len(out) <= MAX_TEXT
    assert all(unicodedata.category(ch)[0] != "C" and ch not in "\u2028\u2029" for ch in out)
    out.encode("utf-8")  # no lone surrogate: D-Bus can carry it (raises otherwise)
    assert safe(out) == out and is_safe(out)


def test_huge_input_costs_no_more_than_its_first_part(monkeypatch):
    from broker import text
    looked_at = []
    real = text._unsafe
    monkeypatch.setattr(text, "_unsafe", lambda ch: looked_at.append(ch) or real(ch))
    out = safe("\0" * 50_000_000)
    assert len(looked_at) <= MAX_TEXT + 1  # a caller's megabytes are not walked through
    assert out == "\\x00" * ((MAX_TEXT - 3) // 4) + "\\x0"[:(MAX_TEXT - 3) % 4] + "..."
