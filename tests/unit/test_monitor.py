"""The monitoring plugin's verdict (`apache-restart check`): each state from a GetStatus document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from client import monitor

NOW = 1_800_000_000.0
DAY = 86400
MD = "www.example.test"
REPO = Path(__file__).resolve().parent.parent.parent


def usec(t: float) -> int:
    return int(t * 1_000_000)


def md(active_days: float | None = 60, served_days: float | None = 60, staged: dict | None = None,
       failed_before: bool = False, probe_error: str = "") -> dict:
    entry: dict = {"name": MD, "pending": False, "failed_before": failed_before, "staged": staged,
                   "active": None, "served": []}
    if active_days is not None:
        entry["active"] = {"certs": [{"key_type": "rsa", "serial": "1",
                                      "not_after_usec": usec(NOW + active_days * DAY)}]}
    if probe_error:
        entry["served"] = [{"probe": "127.0.0.1:443", "error": probe_error}]
    elif served_days is not None:
        entry["served"] = [{"probe": "127.0.0.1:443", "error": "", "key_type": "rsa", "serial": "2",
                            "sha256": "ab", "not_after_usec": usec(NOW + served_days * DAY)}]
    return entry


def check(*mds: dict, pending: bool = False, **kw) -> monitor.Verdict:
    return monitor.evaluate({"mds": list(mds), "pending": pending}, NOW, **kw)


def valid_staged(hours_ago: float) -> dict:
    return {"valid": True, "problem": "", "since_usec": usec(NOW - hours_ago * 3600), "certs": []}


def test_ok_line_and_perfdata():
    v = check(md(active_days=80, served_days=60.5))
    assert v.state == monitor.OK
    assert v.line() == ("APACHE-RESTART OK - 1 MD, nearest expiry in 60.5 days (www.example.test) | "
                        "'www.example.test days_left'=60.5;14:;7:;; staged_hours=0;24;;0; pending=0;;;0;1 mds=1;;;0;")


def test_what_is_served_counts_not_what_is_active():
    assert check(md(active_days=80, served_days=5)).state == monitor.CRITICAL
    assert check(md(active_days=5, served_days=80)).state == monitor.OK


def test_without_probes_the_active_certificate_counts():
    v = check(md(active_days=10, served_days=None))
    assert v.state == monitor.WARNING
    assert "www.example.test: active rsa certificate expires in 10 days" in v.line()
    assert check(md(active_days=3, served_days=None)).state == monitor.CRITICAL
    assert "expired 2 days ago" in check(md(active_days=-2, served_days=None)).line()


def test_thresholds_are_the_options():
    assert check(md(served_days=20)).state == monitor.OK
    assert check(md(served_days=20), warning_days=30).state == monitor.WARNING
    assert check(md(served_days=20), warning_days=40, critical_days=30).state == monitor.CRITICAL


def test_a_failed_restart_for_a_set_still_staged_is_critical():
    v = check(md(staged=valid_staged(1), failed_before=True))
    assert v.state == monitor.CRITICAL and "a restart failed to activate the staged set" in v.line()


def test_a_restart_held_back_for_a_set_still_staged_is_critical():
    """The config test failed: no restart was issued, the broker retries on its own, but the
    last restart failed and the renewed set is still staged: a human must fix the config."""
    held = dict(md(staged=valid_staged(0.1)), pending=True)
    status = {"mds": [held], "pending": True, "last_result": "failed: config test failed: AH00526: Syntax error",
              "retry": {"attempts": 2, "at_usec": usec(NOW + 60), "reason": "config test failed: AH00526"}}
    v = monitor.evaluate(status, NOW)
    assert v.state == monitor.CRITICAL, v.line()
    assert ("www.example.test: the last restart failed (config test failed: AH00526: Syntax error) and the set "
            "is still staged; the broker retries (retry 2)") in v.line()
    # The same set waiting for its restart after an ok one is no problem.
    assert monitor.evaluate(dict(status, last_result="ok", retry=None), NOW).state == monitor.OK


def test_a_set_waiting_too_long_is_a_warning():
    assert check(md(staged=valid_staged(2))).state == monitor.OK
    v = check(md(staged=valid_staged(30)))
    assert v.state == monitor.WARNING and "staged for 30 hours" in v.line()
    assert check(md(staged=valid_staged(30)), pending_hours=48).state == monitor.OK


def test_an_invalid_staged_set_and_a_probe_error_are_warnings():
    v = check(md(staged={"valid": False, "problem": "expired: staging/x/pubcert.pem has expired"}))
    assert v.state == monitor.WARNING and "staged set is invalid: expired" in v.line()
    v = check(md(active_days=60, probe_error="connection refused"))
    assert v.state == monitor.WARNING and "probe 127.0.0.1:443: connection refused" in v.line()


def test_the_worst_problem_comes_first():
    other = dict(md(served_days=3), name="other.example.test")
    v = check(md(served_days=10), other)
    assert v.state == monitor.CRITICAL
    assert v.line().startswith("APACHE-RESTART CRITICAL - other.example.test: served at 127.0.0.1:443 "
                               "expires in 3 days; www.example.test: served at")


def test_a_broker_that_cannot_be_asked_is_unknown():
    result = subprocess.run([sys.executable, "-m", "client.admin", "--bus-address",
                             "unix:path=/nonexistent/bus", "--timeout", "5", "check"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == monitor.UNKNOWN, result
    assert result.stdout.startswith("APACHE-RESTART UNKNOWN - cannot ask the broker: "), result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_a_bad_option_is_unknown_not_critical():
    result = subprocess.run([sys.executable, "-m", "client.admin", "check", "--warning", "soon"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == monitor.UNKNOWN, result
    assert result.stdout.startswith("APACHE-RESTART UNKNOWN - usage: ")
