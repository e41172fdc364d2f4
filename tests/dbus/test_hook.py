"""apache-restart-hook as mod_md runs it: as www-data (root for `installed`), per reason.

The hook is run as an installed program: the venv's `apache-restart-hook` script, or
`python -m client.hook` from the venv's interpreter, from `/` like mod_md does. The venv and
the installed project must be readable by www-data (scripts/setup-env arranges that).
"""

import asyncio
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker import dbuslib, names
from broker.dbuslib import Message, MessageType
from harness import busutil, storefactory
from harness.busutil import get_property

MD = "www.example.test"
VENV_BIN = Path(sys.executable).parent
HOOK_SCRIPT = VENV_BIN / "apache-restart-hook"
LINE = "apache-restart-hook: "
ENTRY_POINT = "import sys; from client.hook import main; sys.exit(main())"


@pytest.fixture
def bus_address(open_bus_address):
    """The private bus, reachable by www-data (overrides conftest's)."""
    return open_bus_address


@dataclass
class Run:
    rc: int
    stderr: str
    elapsed: float       # start to exit
    eof_after_exit: float  # exit to EOF on stderr (something the hook started holding it open)

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


def hook_command(args: list[str], code: str | None = None) -> tuple[list[str], str]:
    """argv and cwd for running the installed hook (through `code` instead of its script)."""
    if HOOK_SCRIPT.exists() and code is None:
        return [str(HOOK_SCRIPT), *args], "/"
    # Without the entry-point script (project not installed): from the source tree.
    cwd = "/" if HOOK_SCRIPT.exists() else str(busutil.REPO)
    return [sys.executable, "-c", code or ENTRY_POINT, *args], cwd


def _run_blocking(argv: list[str], cwd: str, env: dict, timeout: float) -> Run:
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    eof = threading.Event()
    stderr = proc.stderr
    assert stderr is not None

    def read() -> None:
        while True:
            data = stderr.read1(65536)  # type: ignore[attr-defined]
            if not data:
                break
            chunks.append(data)
        eof.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    exited = time.monotonic()
    eof.wait(5)
    eof_at = time.monotonic() if eof.is_set() else float("inf")
    return Run(rc, b"".join(chunks).decode(errors="replace"), exited - start, eof_at - exited)


async def run_hook(*args: str, user: str | None = "www-data", code: str | None = None,
                   env: dict | None = None, timeout: float = 30) -> Run:
    """Run the hook in a thread, so that services in this test's event loop keep answering."""
    argv, cwd = hook_command(list(args), code)
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    return await asyncio.to_thread(_run_blocking, argv, cwd, full_env, timeout)


def assert_one_line(run: Run, text: str) -> None:
    assert run.lines == [LINE + text], run.stderr
    # A child left behind would hold stderr open for its whole life; the hook's own exit closes
    # it at once. 2 s tells the two apart on a loaded machine too.
    assert run.eof_after_exit < 2, "something the hook started kept stderr open"


# -- reasons the hook does not act on --------------------------------------------------------

NOTHING_TO_DO = [
    ("renewing", "renewing www.example.test: renewal starting; nothing to do"),
    ("challenge-setup:http-01:x",
     "challenge-setup:http-01:x www.example.test: challenge being set up; nothing to do"),
    ("challenge-setup:tls-alpn-01:www.example.test",
     "challenge-setup:tls-alpn-01:www.example.test www.example.test: challenge being set up; nothing to do"),
    ("expiring", "expiring www.example.test: certificate expires soon (mod_md renews it); nothing to do"),
    ("errored", "errored www.example.test: mod_md reports a renewal error (see its log); nothing to do"),
    ("ocsp-renewed", "ocsp-renewed www.example.test: OCSP response renewed; nothing to do"),
    ("ocsp-errored", "ocsp-errored www.example.test: OCSP renewal failed (see mod_md's log); nothing to do"),
    ("some-future-reason", "some-future-reason www.example.test: reason not known to this hook; ignored"),
]


class SilentBus:
    """A unix socket that accepts connections and never says a word; counts connections.

    As --bus-address it shows whether the hook connects at all, and a bus that hangs.
    """

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="arb-silent-"))
        self.dir.chmod(0o755)
        self.path = self.dir / "bus.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.path.chmod(0o777)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.held: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def connections(self) -> int:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return len(self.held)
            self.held.append(conn)

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.sock.close()
        for p in (self.path, self.dir):
            try:
                p.unlink() if p.is_socket() else p.rmdir()
            except OSError:
                pass


@pytest.fixture
def silent_bus():
    s = SilentBus()
    yield s
    s.close()


@pytest.mark.parametrize("reason,text", NOTHING_TO_DO)
async def test_other_reasons_exit_0_at_once_without_a_bus(silent_bus, reason, text):
    run = await run_hook("--bus-address", silent_bus.address, reason, MD)
    assert run.rc == 0
    assert_one_line(run, text)
    assert silent_bus.connections() == 0  # it never asked the bus, so it waited for nothing


async def test_installed_as_root_returns_at_once_without_a_bus(silent_bus):
    run = await run_hook("--bus-address", silent_bus.address, "installed", MD, user=None)
    assert run.rc == 0
    assert_one_line(run, "installed www.example.test: new certificate activated by Apache's restart; "
                         "nothing to do")
    assert silent_bus.connections() == 0


async def test_renewed_does_connect_to_the_silent_bus_and_gives_up(silent_bus):
    """The control for the tests above: the silent bus sees a hook that connects."""
    run = await run_hook("--bus-address", silent_bus.address, "--timeout", "1", "renewed", MD)
    assert run.rc == 75
    assert silent_bus.connections() == 1
    assert_one_line(run, "renewed www.example.test: broker did not answer (no answer within 1 s); "
                         "mod_md will retry")
    assert run.elapsed >= 1.0  # it waited its whole timeout (an upper bound would measure the load)


# The entry point, then the names of every module loaded, on stderr after a marker.
MODULES_WRAPPER = ("import sys; from client.hook import main; rc = main(); "
                   "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n'); sys.exit(rc)")


def _loaded(run: Run) -> tuple[set[str], list[str]]:
    """The modules the hook had loaded when it finished, and its other stderr lines."""
    (marker,) = [line for line in run.lines if line.startswith("MODULES ")]
    return set(marker.split()[1:]), [line for line in run.lines if not line.startswith("MODULES ")]


def _dbus_related(mods: set[str]) -> list[str]:
    """The D-Bus libraries, the broker's package, the client's call module, asyncio."""
    return sorted(m for m in mods if m.split(".")[0] in ("dbus_fast", "dbus_next", "dbus", "broker", "asyncio")
                  or m == "client.call")


@pytest.mark.parametrize("reason", ["renewing", "challenge-setup:http-01:x", "installed", "errored", "expiring",
                                    "ocsp-errored", "unknown-thing"])
async def test_other_reasons_import_no_dbus_library(silent_bus, reason):
    run = await run_hook("--bus-address", silent_bus.address, reason, MD, code=MODULES_WRAPPER)
    assert run.rc == 0
    mods, lines = _loaded(run)
    assert "client.hook" in mods  # the check sees the hook itself
    assert _dbus_related(mods) == []
    assert len(lines) == 1 and lines[0].startswith(LINE + reason)


async def test_renewed_imports_the_dbus_library(silent_bus):
    """The control for the import check: `renewed` does load the library."""
    run = await run_hook("--bus-address", silent_bus.address, "--timeout", "0.5", "renewed", MD,
                         code=MODULES_WRAPPER)
    assert run.rc == 75
    mods, _ = _loaded(run)
    assert {dbuslib.LIB_NAME, "broker.dbuslib", "client.call", "asyncio"} <= set(_dbus_related(mods))


# -- renewed against the real broker ---------------------------------------------------------


async def test_renewed_schedules_a_restart(start_broker, client, allow, store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    broker = await start_broker(settle_seconds=30)
    before = time.time()
    run = await run_hook("--bus-address", bus_address, "renewed", MD)
    assert run.rc == 0, run.stderr
    (line,) = run.lines
    prefix = f"{LINE}renewed {MD}: restart planned at the latest at "
    assert line.startswith(prefix), line
    # Local ISO time with its offset, so that it compares with the journal's and status's.
    planned = datetime.datetime.fromisoformat(line[len(prefix):]).timestamp()
    assert before + 29 <= planned <= time.time() + 31
    assert await get_property(client, "Pending") is True
    planned_usec = await get_property(client, "PlannedAt")
    assert int(planned) == int(planned_usec / 1e6)
    assert run.eof_after_exit < 0.5
    assert "uid 33" in broker.log()  # it was www-data that asked


async def test_renewed_tolerates_extra_arguments_and_honours_the_environment(start_broker, client, allow,
                                                                             store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    await start_broker(settle_seconds=30)
    # No --bus-address: DBUS_SYSTEM_BUS_ADDRESS names the bus; future mod_md arguments follow.
    run = await run_hook("renewed", MD, "extra", "--more", "args",
                         env={"DBUS_SYSTEM_BUS_ADDRESS": bus_address})
    assert run.rc == 0, run.stderr
    assert run.lines[0].startswith(f"{LINE}renewed {MD}: restart planned at ")
    assert await get_property(client, "Pending") is True


@pytest.mark.parametrize("setup,name,text", [
    ("none", MD, "NothingStaged"),
    ("none", "../etc", "InvalidName"),
    ("expired", MD, "StagingInvalid: expired"),
])
async def test_renewed_refusals_no_retry_can_cure_exit_0(start_broker, client, allow, store, bus_address,
                                                        setup, name, text):
    if setup == "expired":
        storefactory.add_staged(store, MD, [MD], valid_until=time.time() - 3600,
                                valid_from=time.time() - 86400)
    await start_broker()
    run = await run_hook("--bus-address", bus_address, "renewed", name)
    assert run.rc == 0, run.stderr
    (line,) = run.lines
    shown = name if name == MD else f"{name} (not a valid MD name)"
    assert line.startswith(f"{LINE}renewed {shown}: refused by the broker ({text}"), line
    assert line.endswith("); not retried, see 'apache-restart status'"), line
    assert await get_property(client, "Pending") is False


async def test_renewed_rate_limited_exits_nonzero(start_broker, client, allow, store, bus_address):
    storefactory.add_staged(store, MD, [MD])
    await start_broker(rate_burst=0)
    run = await run_hook("--bus-address", bus_address, "renewed", MD)
    assert run.rc == 75
    (line,) = run.lines
    assert line.startswith(f"{LINE}renewed {MD}: broker busy (RateLimited: "), line
    assert line.endswith("); mod_md will retry")


async def test_renewed_access_denied_exits_nonzero(start_broker, client, polkit, store, bus_address):
    storefactory.add_staged(store, MD, [MD])  # polkit (mock) has not allowed the action
    await start_broker()
    run = await run_hook("--bus-address", bus_address, "renewed", MD)
    assert run.rc == 75
    (line,) = run.lines
    assert line.startswith(f"{LINE}renewed {MD}: access denied (check the polkit rule and bus policy "
                           "for this user) (AccessDenied: "), line
    assert line.endswith("); mod_md will retry")


# -- no broker, or one that never answers ----------------------------------------------------


async def test_broker_absent(bus_address):
    run = await run_hook("--bus-address", bus_address, "renewed", MD)
    assert run.rc == 75
    (line,) = run.lines
    assert line.startswith(f"{LINE}renewed {MD}: broker not reachable (ServiceUnknown: "), line
    assert line.endswith("); mod_md will retry")
    for reason in ("renewing", "challenge-setup:http-01:x"):
        run = await run_hook("--bus-address", bus_address, reason, MD)
        assert run.rc == 0 and len(run.lines) == 1, run


async def test_no_bus_at_all(tmp_path):
    address = f"unix:path={tmp_path}/no-such-bus"
    run = await run_hook("--bus-address", address, "renewed", MD, user=None)
    assert run.rc == 75
    assert_one_line(run, f"renewed {MD}: broker not reachable (cannot connect to the bus at {address}: "
                         "No such file or directory); mod_md will retry")
    run = await run_hook("--bus-address", address, "renewing", MD, user=None)
    assert run.rc == 0


async def _hanging_broker(bus_address: str, answer: tuple[str, list] | None = None):
    """Owns the broker's name and never answers a call to its interface (or with `answer`)."""
    bus = await dbuslib.connect(bus_address)
    calls = []

    def swallow(msg) -> bool:
        if msg.message_type == MessageType.METHOD_CALL and msg.interface == names.INTERFACE:
            calls.append(msg)
            if answer is not None:
                bus.send(Message.new_method_return(msg, *answer))
            return True
        return False

    bus.add_message_handler(swallow)
    await bus.request_name(names.BUS_NAME)
    return bus, calls


async def test_broker_never_answers(bus_address):
    bus, calls = await _hanging_broker(bus_address)
    try:
        run = await run_hook("--bus-address", bus_address, "--timeout", "1.5", "renewed", MD)
        assert run.rc == 75
        assert_one_line(run, f"renewed {MD}: broker did not answer (no answer within 1.5 s); "
                             "mod_md will retry")
        assert run.elapsed >= 1.5  # the whole timeout, not less
        assert [m.member for m in calls] == ["RequestGracefulRestart"]
        run = await run_hook("--bus-address", bus_address, "installed", MD, user=None)
        assert run.rc == 0 and len(run.lines) == 1
        assert len(calls) == 1  # `installed` asked the hanging broker nothing
    finally:
        bus.disconnect()


async def test_broker_never_answers_default_timeout_is_10s(bus_address):
    bus, _ = await _hanging_broker(bus_address)
    try:
        run = await run_hook("--bus-address", bus_address, "renewed", MD)
        assert run.rc == 75
        assert_one_line(run, f"renewed {MD}: broker did not answer (no answer within 10 s); "
                             "mod_md will retry")
        assert run.elapsed >= 10
    finally:
        bus.disconnect()


async def test_broker_with_a_wrong_answer_is_retried(bus_address):
    """Something else owns the name, or a broken broker: not "delivered", and no traceback."""
    bus, _ = await _hanging_broker(bus_address, answer=("s", ["nonsense"]))
    try:
        run = await run_hook("--bus-address", bus_address, "renewed", MD)
        assert run.rc == 75
        assert_one_line(run, f"renewed {MD}: broker failed (see its log) (unexpected reply ['nonsense']); "
                             "mod_md will retry")
    finally:
        bus.disconnect()


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("args,rc", [
    (["--frobnicate", "renewed", MD], 2),
    (["--timeout", "30", "renewed", MD], 2),
    (["--timeout", "x", "renewed", MD], 2),
    (["renewed"], 2),
    ([], 2),
    (["--frobnicate", "renewing", MD], 0),
    (["--timeout", "30", "challenge-setup:http-01:x", MD], 0),
])
async def test_usage_errors_fail_only_renewed(args, rc, silent_bus):
    run = await run_hook(*args, env={"DBUS_SYSTEM_BUS_ADDRESS": silent_bus.address})
    assert run.rc == rc, run.stderr
    assert len(run.lines) == 1 and run.lines[0].startswith(LINE), run.stderr
    assert silent_bus.connections() == 0
