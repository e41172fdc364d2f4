"""What `apache-restart` prints, from GetStatus documents written out by hand (no bus)."""

import pytest

from broker.timefmt import local_iso
from client import admin, call
from client.call import Failure

NOW = 1_800_000_000.0
DAY = 86400


def usec(t: float) -> int:
    return int(t * 1_000_000)


def cert(key_type: str, serial: str, sha: str, days: float) -> dict:
    return {"key_type": key_type, "serial": serial, "sha256": sha, "issuer": "CN=Pebble Intermediate CA 1a",
            "not_before_usec": usec(NOW - DAY), "not_after_usec": usec(NOW + days * DAY)}


def doc(**over) -> dict:
    d = {"version": "0.1.0", "pending": False, "planned_at_usec": 0, "waiting_for": "", "retry": None,
         "last_restart_usec": 0, "last_result": "", "last_result_usec": 0, "restarting": False,
         "md_store": "/etc/apache2/md",
         "mds": [{"name": "example.org", "pending": False, "failed_before": False,
                  "active": {"since_usec": usec(NOW - 60 * DAY), "fingerprint": "fa",
                             "names": ["example.org", "www.example.org"],
                             "certs": [cert("rsa", "0a1b", "aa" * 32, 29.5)]},
                  "staged": None}]}
    d.update(over)
    return d


def staged(md: dict) -> dict:
    md["staged"] = {"valid": True, "problem": "", "since_usec": usec(NOW - 120), "fingerprint": "fb",
                    "names": md["active"]["names"], "certs": [cert("rsa", "0c2d", "bb" * 32, 90)]}
    return md


def test_a_quiet_broker():
    out = admin.render_status(doc(), {}, now=NOW).splitlines()
    assert out == [
        "apache-restart-broker 0.1.0, store /etc/apache2/md",
        "restart:      none pending",
        "last result:  none yet",
        "last restart: never",
        "",
        "example.org",
        "  names:      example.org, www.example.org",
        f"  active:     rsa        serial 0a1b, issuer CN=Pebble Intermediate CA 1a, expires "
        f"{local_iso(NOW + 29.5 * DAY)} (29 days left)",
        "  staged:     none",
        "  next:       nothing staged: nothing to do (mod_md stages a renewal before the certificate expires)",
    ]


def test_a_held_back_restart_says_why_and_how_to_retry_now():
    d = doc(pending=True, planned_at_usec=usec(NOW + 300), waiting_for="retry",
            retry={"attempts": 2, "at_usec": usec(NOW + 300), "reason": "config test failed: AH00526: Syntax error"},
            last_restart_usec=usec(NOW - 5 * DAY), last_result="failed: config test failed: AH00526: Syntax error",
            last_result_usec=usec(NOW - 200))
    staged(d["mds"][0])["pending"] = True
    out = admin.render_status(d, {}, now=NOW)
    lines = out.splitlines()
    assert lines[1] == (f"restart:      pending for example.org, at the latest at {local_iso(NOW + 300)} (in 5 min): "
                        "HELD BACK after attempt 2 (config test failed: AH00526: Syntax error); the broker retries "
                        "on its own, backing off; after fixing the cause, retry now with: "
                        "apache-restart request example.org")
    # The result is shown with its own time, not with the older restart's.
    assert lines[2] == f"last result:  failed: config test failed: AH00526: Syntax error ({local_iso(NOW - 200)})"
    assert lines[3] == f"last restart: {local_iso(NOW - 5 * DAY)} (issued)"
    assert f"  staged:     valid, since {local_iso(NOW - 120)}\n" in out
    # Per key type, with serial and expiry, as the active set is shown.
    assert (f"              rsa        serial 0c2d, issuer CN=Pebble Intermediate CA 1a, expires "
            f"{local_iso(NOW + 90 * DAY)} (90 days left)\n") in out
    assert (f"  next:       held back (see restart: above); retried at the latest at "
            f"{local_iso(NOW + 300)} (in 5 min); retry now with: apache-restart request example.org") in out


def test_a_wait_for_min_interval_is_named():
    d = doc(pending=True, planned_at_usec=usec(NOW + 100), waiting_for="min_interval",
            last_restart_usec=usec(NOW - 200), last_result="ok", last_result_usec=usec(NOW - 200))
    staged(d["mds"][0])["pending"] = True
    lines = admin.render_status(d, {}, now=NOW).splitlines()
    assert lines[1].endswith(f"(in 100 s): waiting for min_interval_seconds since the last restart "
                             f"({local_iso(NOW - 200)})")
    assert lines[2] == f"last result:  ok ({local_iso(NOW - 200)})"


def test_served_certificates_are_shown_when_the_broker_sends_them():
    d = doc()
    # As the broker sends them (broker.served.Served.to_json): an error entry has no certificate.
    d["mds"][0]["served"] = [
        {"probe": "127.0.0.1:443", "key_type": "rsa", "serial": "0a1b", "sha256": "aa" * 32,
         "not_after_usec": usec(NOW + 10 * DAY), "error": ""},
        {"probe": "[::1]:443", "key_type": "secp256r1", "serial": "0999", "sha256": "cc" * 32,
         "not_after_usec": usec(NOW - DAY), "error": ""},
        {"probe": "127.0.0.1:8443", "error": "connection refused"},
    ]
    out = admin.render_status(d, {}, now=NOW)
    assert (f"  served:     127.0.0.1:443: rsa serial 0a1b, expires {local_iso(NOW + 10 * DAY)} (10 days left), "
            "the active certificate\n") in out
    assert (f"              [::1]:443: secp256r1 serial 0999, expires {local_iso(NOW - DAY)} (EXPIRED), "
            "NOT the active certificate\n") in out
    assert "              127.0.0.1:8443: ERROR: connection refused\n" in out


def test_failed_before_and_lost_request_say_what_to_run():
    d = doc()
    md = staged(d["mds"][0])
    md["failed_before"] = True
    assert ("next:       a restart already failed to activate this set: not retried on its own; after fixing "
            "the cause: apache-restart request example.org") in admin.render_status(d, {}, now=NOW)


@pytest.mark.parametrize("error_name", [
    "org.freedesktop.systemd1.UnitFailed",
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
])
def test_activation_failure_is_reported_as_cannot_start(capsys, error_name):
    f = Failure(call.kind_of_error(error_name), error_name, "Unit apache-restart-broker.service failed")
    assert f.kind == call.UNREACHABLE and f.retryable  # the hook: mod_md tries again later
    assert admin._fail(f, "status") == admin.EXIT_TEMPORARY
    err = capsys.readouterr().err
    assert err.startswith("apache-restart: status: the broker cannot start: ")
    assert "apache-restart-broker --check-config" in err and "journalctl -u apache-restart-broker.service" in err
    assert "try again later" not in err


def test_a_failed_unit_seen_while_waiting_is_reported_as_cannot_start(capsys):
    f = call.CannotStart(call.UNREACHABLE, "",
                         "apache-restart-broker.service is failed/failed (result exit-code, exit status 2)")
    assert admin._fail(f, "check-all") == admin.EXIT_TEMPORARY
    assert capsys.readouterr().err.startswith(
        "apache-restart: check-all: the broker cannot start: apache-restart-broker.service is failed/failed "
        "(result exit-code, exit status 2); check the configuration with 'apache-restart-broker --check-config'")


def test_planned_times_say_at_the_latest():
    assert call.format_planned(usec(NOW + 30), now=NOW) == f"at the latest at {local_iso(NOW + 30)} (in 30 s)"
    assert call.format_usec(0) == "never"
    assert local_iso(NOW)[10] == "T" and local_iso(NOW)[-6] in "+-"


class _Variant:
    def __init__(self, value):
        self.value = value


class FakeSystemd:
    """Answers the admin command's questions about the broker's unit, as systemd would."""

    def __init__(self, unit: dict | None, service: dict | None = None):
        self.unit, self.service = unit, service or {}

    async def call(self, member, signature="", body=None, **kw):
        if self.unit is None:
            raise Failure(call.REFUSED, "org.freedesktop.systemd1.NoSuchUnit", "no such unit")
        if member == "LoadUnit":
            return ["/org/freedesktop/systemd1/unit/x"]
        props = self.unit if body == ["org.freedesktop.systemd1.Unit"] else self.service
        return [{k: _Variant(v) for k, v in props.items()}]


SINCE = usec(NOW)


def unit(active: str, sub: str, changed: float, job: int = 0) -> dict:
    return {"ActiveState": active, "SubState": sub, "StateChangeTimestamp": usec(changed), "Job": [job, "/"]}


async def test_unit_failure_reads_systemds_view():
    failed = FakeSystemd(unit("failed", "failed", NOW + 0.2), {"Result": "exit-code", "ExecMainStatus": 2})
    f = await call.unit_failure(failed, SINCE, SINCE + 500_000)
    assert isinstance(f, call.CannotStart)
    assert f.message == "apache-restart-broker.service is failed/failed (result exit-code, exit status 2)"
    # Failed before this call: the bus is starting it again, which may work; keep waiting.
    assert await call.unit_failure(FakeSystemd(unit("failed", "failed", NOW - 60)), SINCE, SINCE + 500_000) is None
    # Restarting after a failure: it failed, whenever that was.
    assert isinstance(await call.unit_failure(FakeSystemd(unit("activating", "auto-restart", NOW - 60)),
                                              SINCE, SINCE), call.CannotStart)
    # Starting, running, or no systemd at all: nothing to say.
    for state in (unit("activating", "start", NOW), unit("active", "running", NOW)):
        assert await call.unit_failure(FakeSystemd(state), SINCE, SINCE + 10_000_000) is None
    assert await call.unit_failure(FakeSystemd(None), SINCE, SINCE + 10_000_000) is None


async def test_unit_never_started_for_this_call_is_a_stalled_activation(capsys):
    idle = FakeSystemd(unit("inactive", "dead", 0))
    assert await call.unit_failure(idle, SINCE, SINCE + 2_000_000) is None  # give the bus its moment
    f = await call.unit_failure(idle, SINCE, SINCE + 3_000_000)
    assert isinstance(f, call.ActivationStalled)
    # A start job queued in systemd is on its way: not stalled.
    assert await call.unit_failure(FakeSystemd(unit("inactive", "dead", 0, job=7)), SINCE, SINCE + 9_000_000) is None
    assert admin._fail(f, "status") == admin.EXIT_TEMPORARY
    assert capsys.readouterr().err == (
        "apache-restart: status: the broker is not running: apache-restart-broker.service is inactive and the bus "
        "has not started it (it may still wait for an earlier attempt, up to 25 s); start it with "
        "'systemctl start apache-restart-broker.service'\n")


def test_a_node_serving_behind_the_store_is_told_what_happens_next():
    d = doc()
    md = d["mds"][0]
    md["served_behind"] = True
    out = admin.render_status(d, {}, now=NOW)
    assert ("  next:       served behind the store (another node activated a renewal): the next check-all "
            "(the check timer) restarts this node; now: apache-restart check-all") in out
    d.update(pending=True, planned_at_usec=usec(NOW + 5), waiting_for="settle")
    md["pending"] = True
    assert (f"  next:       restart at the latest at {local_iso(NOW + 5)} (in 5 s), so that this node serves the "
            "store's active certificate") in admin.render_status(d, {}, now=NOW)
    d.update(pending=False, planned_at_usec=0, waiting_for="")
    md.update(pending=False, served_behind_failed=True)
    assert ("  next:       served behind the store, and a restart did not change that: not retried on its own "
            "(is the probe address this Apache?); after fixing the cause: apache-restart request example.org"
            ) in admin.render_status(d, {}, now=NOW)


def test_unmanaged_directories_left_out_are_said_not_hidden() -> None:
    d = doc()
    assert "not shown:" not in admin.render_status(d, {}, now=NOW)
    d["unmanaged_not_listed"] = 136
    assert ("not shown:    136 more directories under staging/ that no managed MD owns (mod_md "
            "activates none of them; remove them)") in admin.render_status(d, {}, now=NOW).splitlines()
