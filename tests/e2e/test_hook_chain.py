"""The hook's --then under the real mod_md: the MDMessageCmd line as Apache splits it, the reasons
and names mod_md passes, a chained command's veto on `renewing`, and the renewal through the real
broker once it stops vetoing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import Stack
from harness.procs import wait_for

pytestmark = pytest.mark.e2e

MD = "www.example.test"
FIRST_CERT_TIMEOUT = 60
VETO_LOG = "event-handler for 'renewing' returned"


def gate_program(folder: Path) -> tuple[Path, Path, Path]:
    """A chained command that logs `id -un` and its arguments, and fails while `veto` exists."""
    calls = folder / "calls.log"
    calls.write_text("")
    calls.chmod(0o666)
    veto = folder / "veto"
    gate = folder / "gate"
    gate.write_text(f"""#!/bin/sh
echo "$(id -un) $*" >> {calls}
echo "gate saw $1 $2"
[ -e {veto} ] && exit 3
exit 0
""")
    gate.chmod(0o755)
    return gate, veto, calls


def test_chained_command_under_mod_md(start_stack: Callable[..., Stack], www_tmp: Path) -> None:
    gate, veto, calls = gate_program(www_tmp)
    veto.touch()
    stack = start_stack(domains=[[MD]], with_broker=True,
                        message_cmd=lambda st: [*st.broker.hook_argv(), "--then", str(gate), "--mark", "--"])
    apache = stack.apache
    assert apache is not None

    # The gate vetoes: mod_md gives up this renewal, and says so.
    wait_for(lambda: VETO_LOG in apache.error_log.read_text(errors="replace"), FIRST_CERT_TIMEOUT,
             "mod_md to report the veto", interval=0.1)
    log = apache.error_log.read_text(errors="replace")
    assert f"then {gate}: exited 3; mod_md aborts this renewal" in log
    assert "gate saw --mark renewing" in log        # the chained command's output reached mod_md's log
    assert not apache.staging_dir(MD).exists() or not (apache.staging_dir(MD) / "pubcert.pem").exists()

    # Once it lets renewals through, mod_md's next try goes all the way: staged, the hook asks
    # the broker, the broker restarts Apache, and `installed` runs the gate as root.
    veto.unlink()
    wait_for(lambda: any(line.startswith(f"root --mark installed {MD}")
                         for line in calls.read_text().splitlines()),
             FIRST_CERT_TIMEOUT, "the gate to see `installed`", interval=0.1)
    lines = calls.read_text().splitlines()
    assert lines[0] == f"www-data --mark renewing {MD}", lines
    assert f"www-data --mark renewed {MD}" in lines, lines
    assert any(line.startswith("www-data --mark challenge-setup:") and line.endswith(f" {MD}") for line in lines)
    assert stack.broker is not None and len(stack.broker.gracefuls()) == 1
