import io
import sys

import pytest

from broker import log


@pytest.mark.parametrize("func,prio", [
    (log.err, 3), (log.warning, 4), (log.notice, 5), (log.info, 6), (log.debug, 7),
])
def test_priority_prefix(capsys, func, prio):
    func("hello world")
    captured = capsys.readouterr()
    assert captured.err == f"<{prio}>hello world\n"
    assert captured.out == ""


def test_one_line_per_event(capsys):
    log.warning("first\nsecond\r\nthird")
    assert capsys.readouterr().err == "<4>first | second | third\n"


def test_forged_line_is_neutralised(capsys):
    # A message carrying untrusted text must not start a line of its own with a priority.
    log.info("name\n<0>emergency\u2028<1>alert")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("<6>name | <0>emergency | <1>alert")


def test_non_string_message(capsys):
    log.notice(42)
    assert capsys.readouterr().err == "<5>42\n"


def test_flushes(monkeypatch):
    class Stream(io.StringIO):
        flushed = 0

        def flush(self):
            Stream.flushed += 1
            super().flush()

    stream = Stream()
    monkeypatch.setattr(sys, "stderr", stream)
    log.err("x")
    assert stream.getvalue() == "<3>x\n"
    assert Stream.flushed >= 1


def test_closed_stderr_does_not_raise(monkeypatch):
    stream = io.StringIO()
    stream.close()
    monkeypatch.setattr(sys, "stderr", stream)
    log.err("nobody listens")  # must not raise
    monkeypatch.setattr(sys, "stderr", None)
    log.err("nobody at all")


def test_nul_and_escapes_cannot_forge_a_journal_entry(capsys):
    # journald ends a line at NUL as well: "\0<0>" would start an entry of priority 0.
    log.info("bad\0<0>emergency \x1b[31mred\x7f\x85\u202e")
    err = capsys.readouterr().err
    assert err == "<6>bad\\x00<0>emergency \\x1b[31mred\\x7f | \\u202e\n"


def test_long_lines_are_capped_below_journald_line_max(capsys):
    log.info("x" * 100_000)
    err = capsys.readouterr().err
    assert len(err) <= log.MAX_LINE + 5 and err.endswith("...\n")
