"""The harness itself, without the broker: mod_md really gets a certificate from pebble, a graceful
restart makes Apache serve it, the private bus and the real polkitd answer, and whatever the
harness started is gone after it stopped, also after an exception or a KeyboardInterrupt.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import (
    HarnessError,
    HookRecorder,
    Polkitd,
    PrivateBus,
    ProcessSpec,
    Stack,
    check_authorization,
    marked_pids,
    name_has_owner,
    running_stack,
)
from harness.procs import pid_alive, wait_for, write_file

pytestmark = pytest.mark.e2e

MD = "www.example.test"
PROBE_ACTION = "org.masysma.apacherestart.harness-probe"


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def assert_all_gone(stack: Stack, pids: list[int]) -> None:
    """Nothing the stack started survives it, and the orderly teardown alone achieved that."""
    assert [p for p in pids if pid_alive(p)] == []
    assert marked_pids(stack.run_id) == []
    assert stack.leftovers == [], "the final sweep had to kill processes the teardown missed"
    assert not stack.root.exists()


def test_first_certificate_is_served_after_graceful(
    start_stack: Callable[..., Stack], www_tmp: Path, record_property: Callable[[str, object], None]
) -> None:
    recorder = HookRecorder(www_tmp / "hook")
    stack = start_stack(with_bus=False, with_polkit=False, message_cmd=recorder.argv, start_apache=False)
    apache, pebble = stack.apache, stack.pebble
    assert apache is not None and pebble is not None

    started = time.monotonic()
    apache.start()
    # Until a certificate is active mod_md serves its self-signed fallback.
    fallback = apache.served_certificate(MD)
    assert "Fallback" in fallback.subject and fallback.issuer == fallback.subject

    staged = apache.wait_staged(MD, timeout=20)
    staged_at = time.monotonic()
    renewed = recorder.wait_call("renewed", MD, timeout=5)
    assert renewed.user == "www-data"
    assert renewed.args[:2] == ("renewed", MD)
    # Staged is not served: nothing restarted Apache yet.
    assert apache.served_certificate(MD).serial == fallback.serial

    apache.graceful()
    graceful_at = time.monotonic()
    served = apache.wait_served(MD, staged.serial, timeout=10)
    served_at = time.monotonic()

    issuer = pebble.issuer_certificate()
    assert served.issuer == issuer.subject.rfc4514_string()
    served.certificate().verify_directly_issued_by(issuer)
    assert MD in served.dns_names
    status = apache.md_status(MD)
    assert int(status["cert"]["rsa"]["serial"], 16) == served.serial
    assert status["cert"]["rsa"]["serial"] == served.serial_hex
    assert status["cert"]["rsa"]["sha256-fingerprint"] == served.sha256
    # `installed` runs in Apache's parent, as root, during the restart.
    assert recorder.wait_call("installed", MD, timeout=5).user == "root"

    timings = {"start_to_staged_s": staged_at - started, "graceful_to_served_s": served_at - graceful_at}
    for name, value in timings.items():
        record_property(name, round(value, 3))
    print(" ".join(f"{name}={value:.3f}" for name, value in timings.items()))


def _probe_polkit_files(directory: Path) -> tuple[Path, Path]:
    """An action nobody gets by default and a rule that grants it to www-data only."""
    policy = write_file(
        directory / "harness-probe.policy",
        f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE policyconfig PUBLIC "-//freedesktop//DTD PolicyKit Policy Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/PolicyKit/1/policyconfig.dtd">
<policyconfig>
  <action id="{PROBE_ACTION}">
    <description>Harness probe</description>
    <message>Harness probe</message>
    <defaults><allow_any>no</allow_any><allow_inactive>no</allow_inactive><allow_active>no</allow_active></defaults>
  </action>
</policyconfig>
""",
    )
    rules = write_file(
        directory / "50-harness-probe.rules",
        f"""polkit.addRule(function(action, subject) {{
    if (action.id == "{PROBE_ACTION}" && subject.user == "www-data") return polkit.Result.YES;
}});
""",
    )
    return policy, rules


@contextmanager
def process_as(uid: int) -> Iterator[int]:
    """A process running as ``uid`` for polkit to judge; yields its pid."""
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_private_bus_and_real_polkitd(www_tmp: Path) -> None:
    run_id = f"bus-test-{os.getpid()}-{time.monotonic_ns()}"
    policy, rules = _probe_polkit_files(www_tmp)
    with PrivateBus(www_tmp / "bus", run_id) as bus:
        assert bus.address.startswith(f"unix:path={bus.socket_path},")
        with Polkitd(www_tmp / "polkit", run_id, bus.address, actions=[policy], rules=[rules]):
            assert name_has_owner(bus.address, "org.freedesktop.PolicyKit1")

            unknown = check_authorization(
                bus.address, os.getpid(), "org.masysma.apacherestart.no-such-action"
            )
            assert unknown.returncode != 0
            assert "org.freedesktop.PolicyKit1.Error.Failed" in unknown.stderr
            assert "not registered" in unknown.stderr

            # The copies are what polkitd sees: the probe's rule grants www-data, nobody else.
            with process_as(33) as www_data, process_as(65534) as nobody:
                granted = check_authorization(bus.address, www_data, PROBE_ACTION)
                refused = check_authorization(bus.address, nobody, PROBE_ACTION)
            assert granted.stdout.startswith("((true,"), granted
            assert refused.stdout.startswith("((false,"), refused

            # ... and only polkitd sees them: the host's folders are untouched.
            assert not Path("/usr/share/polkit-1/actions", policy.name).exists()
            assert "polkit-1" not in Path("/proc/self/mountinfo").read_text()
            polkitd_pids = marked_pids(run_id)
        assert not name_has_owner(bus.address, "org.freedesktop.PolicyKit1")
    assert [p for p in polkitd_pids if pid_alive(p)] == []
    assert marked_pids(run_id) == []


# An extra process as the broker will be one: started before Apache with the bus address, and
# here with a child of its own, which the teardown must also stop (its process group).
def sleeper(stack: Stack) -> list[str]:
    return ["/bin/sh", "-c", f"sleep 600 & echo {stack.bus_address}; sleep 600"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_everything_stops_after_an_exception(exc_type: type[BaseException]) -> None:
    spec = ProcessSpec(
        "sleeper", sleeper, ready=lambda stack: "unix:path=" in (stack.log_dir / "sleeper.log").read_text()
    )
    with pytest.raises(exc_type), running_stack(processes=[spec]) as stack:
        apache = stack.apache
        assert apache is not None and apache.pid() is not None
        pids = marked_pids(stack.run_id)
        names = {comm(p) for p in pids}
        assert {"pebble", "dbus-daemon", "polkitd", "apache2", "sleep"} <= names, names
        assert len([p for p in pids if comm(p) == "sleep"]) == 2
        # An extra process can be stopped and started again (the broker going down and back).
        stack.stop_process("sleeper")
        assert [p for p in marked_pids(stack.run_id) if comm(p) == "sleep"] == []
        stack.start_process("sleeper")
        wait_for(lambda: len([p for p in marked_pids(stack.run_id) if comm(p) == "sleep"]) == 2, 5, "sleeps")
        pids += marked_pids(stack.run_id)
        raise exc_type("boom")
    assert_all_gone(stack, pids)


def test_a_failed_start_stops_what_was_started() -> None:
    seen: list[tuple[Stack, list[int], set[str]]] = []

    def note_pids(stack: Stack) -> list[str]:
        pids = marked_pids(stack.run_id)
        seen.append((stack, pids, {comm(p) for p in pids}))
        return ["/bin/false"]

    broken = ProcessSpec("broken", note_pids, ready=lambda stack: False, ready_timeout=5)
    with pytest.raises(HarnessError, match="broken exited with status 1"), running_stack(processes=[broken]):
        pytest.fail("the stack must not start")
    stack, pids, names = seen[0]
    assert names >= {"pebble", "dbus-daemon", "polkitd"}
    assert_all_gone(stack, pids)


_CTRL_C_SCRIPT = """
import os, signal, sys, tempfile, threading
from harness import ProcessSpec, running_stack
ready = os.path.join(tempfile.mkdtemp(), "trap-set")
# A loop, not one long sleep: the shell ignores SIGTERM and outlives each killed sleep. It is
# ready only once the trap is set, or an early SIGTERM would end it at once.
stubborn = ProcessSpec("stubborn",
                       ["/bin/sh", "-c", f"trap '' TERM; touch {ready}; while :; do sleep 0.1; done"],
                       stop_timeout=1.0, after_apache=True, ready=lambda s: os.path.exists(ready))
try:
    with running_stack(with_bus=False, with_polkit=False, processes=[stubborn]) as stack:
        print(stack.run_id, stack.root, flush=True)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
except KeyboardInterrupt:
    print("interrupted", len(stack.leftovers), stack.root.exists(), flush=True)
    sys.exit(130)
print("not interrupted", flush=True)
"""


def test_ctrl_c_during_the_teardown_waits_for_its_end() -> None:
    # In a process of its own: a Ctrl-C that escaped here would end the whole test session.
    # The stubborn process ignores SIGTERM, so the teardown takes its stop_timeout; the
    # Ctrl-C arrives meanwhile and must be held until the teardown is done.
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-c", _CTRL_C_SCRIPT], capture_output=True, text=True,
                            env=env, timeout=120, cwd=repo)
    lines = result.stdout.splitlines()
    assert result.returncode == 130, result.stdout + result.stderr
    run_id = lines[0].split()[0]
    assert lines[-1] == "interrupted 0 False", result.stdout + result.stderr
    assert marked_pids(run_id) == []
