"""apache-restart-hook's other duties: every reason to syslog, the admin's chained command, --help.

Run as mod_md runs it (www-data, from `/`, stdin closed), with the syslog socket replaced by
a datagram socket this test binds (APACHE_RESTART_HOOK_SYSLOG_SOCKET, documented for testing).
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import __version__
from client.hooklog import SOCKET_ENV
from harness.procs import wait_for
from harness import busutil, storefactory
from tests.dbus.test_hook import LINE, MD, MODULES_WRAPPER, SilentBus, _dbus_related, _loaded, hook_command, run_hook

TAG = r"apache-restart-hook\[(\d+)\]: "


@pytest.fixture
def silent_bus() -> Iterator[SilentBus]:
    s = SilentBus()
    yield s
    s.close()


@pytest.fixture
def bus_address(open_bus_address):
    """The private bus, reachable by www-data (overrides conftest's)."""
    return open_bus_address


class SyslogSocket:
    """A datagram socket standing in for /dev/log, writable by www-data."""

    def __init__(self, kind: int = socket.SOCK_DGRAM):
        self.dir = Path(tempfile.mkdtemp(prefix="arb-syslog-"))
        self.dir.chmod(0o755)
        self.path = self.dir / "log"
        self.sock = socket.socket(socket.AF_UNIX, kind)
        self.sock.bind(str(self.path))
        self.path.chmod(0o777)
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        """Every datagram queued so far (the hook has exited: all it sent is here)."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return out

    def fill(self) -> int:
        """Fill the receive queue until a sender would block; the number of datagrams sent."""
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        sender.connect(str(self.path))
        n = 0
        try:
            while True:
                sender.send(b"<30>filler: x" * 20)
                n += 1
        except BlockingIOError:
            return n
        finally:
            sender.close()

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def syslog() -> Iterator[SyslogSocket]:
    s = SyslogSocket()
    yield s
    s.close()


def entries(datagrams: list[str]) -> list[tuple[int, str]]:
    """(priority, text) of each datagram, checking the tag `apache-restart-hook[PID]: `."""
    out = []
    for d in datagrams:
        m = re.fullmatch(r"<(\d+)>" + TAG + r"(.*)", d, re.DOTALL)
        assert m, d
        out.append((int(m.group(1)), m.group(3)))
    return out


# facility daemon (3) * 8 + severity
ERR, WARNING, NOTICE, INFO = 27, 28, 29, 30


@pytest.mark.parametrize("reason,priority,text", [
    ("errored", ERR, "errored www.example.test: mod_md reports a renewal error (see its log); nothing to do"),
    ("expiring", WARNING,
     "expiring www.example.test: certificate expires soon (mod_md renews it); nothing to do"),
    ("ocsp-errored", WARNING,
     "ocsp-errored www.example.test: OCSP renewal failed (see mod_md's log); nothing to do"),
    ("ocsp-renewed", INFO, "ocsp-renewed www.example.test: OCSP response renewed; nothing to do"),
    ("renewing", INFO, "renewing www.example.test: renewal starting; nothing to do"),
    ("challenge-setup:http-01:www.example.test", INFO,
     "challenge-setup:http-01:www.example.test www.example.test: challenge being set up; nothing to do"),
    ("some-future-reason", NOTICE, "some-future-reason www.example.test: reason not known to this hook; ignored"),
])
async def test_each_reason_is_one_syslog_datagram(syslog, silent_bus, reason, priority, text):
    run = await run_hook("--bus-address", silent_bus.address, reason, MD, env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0
    assert run.lines == [LINE + text]
    assert entries(syslog.received()) == [(priority, text)]
    assert silent_bus.connections() == 0


async def test_installed_as_root_is_logged_at_info(syslog):
    run = await run_hook("installed", MD, user=None, env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0 and run.elapsed < 0.5
    assert entries(syslog.received()) == [
        (INFO, "installed www.example.test: new certificate activated by Apache's restart; nothing to do")]


async def test_renewed_retry_is_a_warning(syslog, silent_bus):
    run = await run_hook("--bus-address", silent_bus.address, "--timeout", "0.5", "renewed", MD,
                         env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 75
    assert entries(syslog.received()) == [
        (WARNING, "renewed www.example.test: broker did not answer (no answer within 0.5 s); mod_md will retry")]


async def test_renewed_refusal_is_an_error(start_broker, allow, store, bus_address, syslog):
    await start_broker()
    run = await run_hook("--bus-address", bus_address, "renewed", MD, env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0
    ((priority, text),) = entries(syslog.received())
    assert priority == ERR
    assert text.startswith("renewed www.example.test: refused by the broker (NothingStaged: "), text


async def test_the_datagram_carries_the_hooks_pid(syslog):
    argv, cwd = hook_command(["errored", MD])
    proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, SOCKET_ENV: str(syslog.path)},
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(30) == 0
    (datagram,) = syslog.received()
    m = re.match(r"<27>" + TAG, datagram)
    assert m and int(m.group(1)) == proc.pid, datagram


@pytest.mark.parametrize("name,shown", [
    ("www.example.test\nfake: line", r"www.example.test\x0afake: line (not a valid MD name)"),
    ("\x1b[31mred\x1b[0m", r"\x1b[31mred\x1b[0m (not a valid MD name)"),
    ("a b", "a b (not a valid MD name)"),
    ("x" * 300, "x" * 254 + "… (not a valid MD name)"),
    ("", '"" (not a valid MD name)'),
    ("*.example.test", "*.example.test"),
])
async def test_md_name_is_escaped_and_checked(syslog, name, shown):
    run = await run_hook("errored", name, env={SOCKET_ENV: str(syslog.path)})
    text = f"errored {shown}: mod_md reports a renewal error (see its log); nothing to do"
    assert run.rc == 0
    assert run.lines == [LINE + text]
    assert entries(syslog.received()) == [(ERR, text)]


async def test_undecodable_bytes_in_the_name_are_escaped(syslog):
    argv, cwd = hook_command([])
    argv = [os.fsencode(a) for a in argv] + [b"errored", b"caf\xe9\xff.test"]
    r = subprocess.run(["runuser", "-u", "www-data", "--", *argv], cwd=cwd, capture_output=True, timeout=30,
                       env={**os.environ, SOCKET_ENV: str(syslog.path)}, check=False)
    text = r"errored caf\xe9\xff.test (not a valid MD name): mod_md reports a renewal error (see its log); " \
           "nothing to do"
    assert r.returncode == 0
    assert r.stderr.decode() == LINE + text + "\n"
    assert entries(syslog.received()) == [(ERR, text)]


async def test_no_syslog_socket_changes_nothing(tmp_path):
    run = await run_hook("errored", MD, env={SOCKET_ENV: str(tmp_path / "none")})
    assert run.rc == 0 and len(run.lines) == 1 and run.elapsed < 1.0


async def test_a_full_syslog_queue_never_blocks_the_hook(syslog):
    assert syslog.fill() > 0
    run = await run_hook("errored", MD, env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0 and len(run.lines) == 1 and run.elapsed < 1.0
    # The control: once there is room again, the same call is received.
    syslog.received()
    run = await run_hook("errored", MD, env={SOCKET_ENV: str(syslog.path)})
    assert [p for p, _ in entries(syslog.received())] == [ERR]


async def test_a_stream_socket_is_no_syslog_socket():
    stream = SyslogSocket(socket.SOCK_STREAM)
    stream.sock.listen(1)
    try:
        run = await run_hook("errored", MD, env={SOCKET_ENV: str(stream.path)})
        assert run.rc == 0 and len(run.lines) == 1 and run.elapsed < 1.0
    finally:
        stream.close()


# -- --then: the admin's own command ----------------------------------------------------------


@pytest.fixture
def programs() -> Iterator[Path]:
    """A 0755 folder for chained programs (www-data runs them)."""
    d = Path(tempfile.mkdtemp(prefix="arb-then-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def program(folder: Path, name: str, body: str) -> str:
    p = folder / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


async def test_then_runs_program_with_its_args_and_mod_mds(programs, syslog):
    prog = program(programs, "show", 'echo "args:$(printf " [%s]" "$@")"\n'
                                     'echo "stdin: $(readlink /proc/self/fd/0)" >&2\n'
                                     'echo "user: $(id -un)"\n')
    run = await run_hook("--then", prog, "--to", "root@localhost", "$HOME;", "--", "errored", MD, "extra",
                         env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0, run.stderr
    assert run.lines == [
        LINE + "errored www.example.test: mod_md reports a renewal error (see its log); nothing to do",
        LINE + f"{prog}: args: [--to] [root@localhost] [$HOME;] [errored] [www.example.test] [extra]",
        LINE + f"{prog}: stdin: /dev/null",
        LINE + f"{prog}: user: www-data",
        LINE + f"errored www.example.test: then {prog}: exited 0",
    ]
    assert run.eof_after_exit < 0.5
    # The program's output goes to mod_md's log only; syslog gets the hook's lines.
    assert entries(syslog.received()) == [
        (ERR, "errored www.example.test: mod_md reports a renewal error (see its log); nothing to do"),
        (INFO, f"errored www.example.test: then {prog}: exited 0"),
    ]


async def test_then_imports_no_dbus_library(programs, silent_bus, syslog):
    prog = program(programs, "ok", "exit 0\n")
    run = await run_hook("--bus-address", silent_bus.address, "--then", prog, "--", "renewing", MD,
                         code=MODULES_WRAPPER, env={SOCKET_ENV: str(syslog.path)})
    assert run.rc == 0
    mods, lines = _loaded(run)
    assert {"client.hook", "client.chain", "client.hooklog"} <= mods
    assert _dbus_related(mods) == []
    assert lines[-1] == f"{LINE}renewing {MD}: then {prog}: exited 0"


@pytest.mark.parametrize("reason,code,rc", [
    ("renewing", 0, 0),
    ("renewing", 3, 3),
    ("renewing", 200, 1),
    ("challenge-setup:http-01:www.example.test", 4, 4),
    ("errored", 3, 0),
    ("expiring", 3, 0),
    ("ocsp-errored", 3, 0),
    ("some-future-reason", 3, 0),
])
async def test_then_exit_status_keeps_mod_mds_veto_rules(programs, silent_bus, reason, code, rc):
    prog = program(programs, "exit", f"exit {code}\n")
    run = await run_hook("--bus-address", silent_bus.address, "--then", prog, "--", reason, MD)
    assert run.rc == rc, run.stderr
    last = run.lines[-1]
    assert last.startswith(f"{LINE}{reason} {MD}: then {prog}: exited {code}"), last
    assert last.endswith("; mod_md aborts this renewal") == (rc != 0), last


async def test_then_installed_runs_as_root_with_a_short_limit(programs):
    prog = program(programs, "slow", "id -un\nexec sleep 30\n")
    run = await run_hook("--then-timeout", "60", "--then", prog, "--", "installed", MD, user=None)
    assert run.rc == 0
    assert run.lines[1:] == [LINE + f"{prog}: root",
                             LINE + f"installed {MD}: then {prog}: no result within 5 s: killed "
                                    "(its whole process group)"]
    assert 4.9 < run.elapsed < 8
    assert run.eof_after_exit < 0.5


@pytest.mark.parametrize("own,code,rc", [
    ("planned", 0, 0),
    ("planned", 1, 75),
    ("refused", 0, 0),
    ("refused", 1, 75),
])
async def test_then_renewed_is_retried_when_either_fails(start_broker, allow, store, bus_address, programs,
                                                         own, code, rc):
    if own == "planned":
        storefactory.add_staged(store, MD, [MD])
    await start_broker(settle_seconds=30)
    prog = program(programs, "exit", f"exit {code}\n")
    run = await run_hook("--bus-address", bus_address, "--then", prog, "--", "renewed", MD)
    assert run.rc == rc, run.stderr
    assert ("restart planned at" if own == "planned" else "refused by the broker") in run.lines[0]
    expected = f"{LINE}renewed {MD}: then {prog}: exited {code}"
    if code:
        expected += "; mod_md will retry (and run both again)"
    assert run.lines[-1] == expected


async def test_then_renewed_runs_even_when_the_broker_is_away(programs, silent_bus):
    prog = program(programs, "ok", "echo notified\n")
    run = await run_hook("--bus-address", silent_bus.address, "--timeout", "0.5", "--then", prog, "--",
                         "renewed", MD)
    assert run.rc == 75
    assert run.lines[1:] == [LINE + f"{prog}: notified", LINE + f"renewed {MD}: then {prog}: exited 0"]


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


@contextlib.contextmanager
def _child_of(run, prog: str) -> Iterator[int]:
    """The pid of the background child that `prog` reported ("child PID"); killed at the end
    whatever the test found, so that no sleep outlives it."""
    (child,) = [int(line.rsplit(" ", 1)[1]) for line in run.lines if f"{prog}: child " in line]
    try:
        yield child
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_then_timeout_kills_the_whole_process_group(programs):
    prog = program(programs, "hang", "sleep 30 &\necho \"child $!\" >&2\nwait\n")
    run = await run_hook("--then-timeout", "1", "--then", prog, "--", "renewing", MD)
    assert run.rc == 1
    assert run.lines[-1] == (f"{LINE}renewing {MD}: then {prog}: no result within 1 s: killed "
                             "(its whole process group); mod_md aborts this renewal")
    assert 0.9 < run.elapsed < 4
    assert run.eof_after_exit < 0.5
    with _child_of(run, prog) as child:
        wait_for(lambda: _gone(child), 5, "the program's background child to be killed", interval=0.05)


async def test_then_timeout_kills_what_ignores_sigterm(programs):
    """The program exits on SIGTERM, its child ignores it: SIGKILL still reaches the group."""
    prog = program(programs, "stubborn", "(trap '' TERM; exec sleep 30) &\necho \"child $!\" >&2\nwait\n")
    run = await run_hook("--then-timeout", "1", "--then", prog, "--", "renewing", MD)
    with _child_of(run, prog) as child:
        assert run.rc == 1
        assert "no result within 1 s: killed (its whole process group)" in run.lines[-1]
        assert run.eof_after_exit < 0.5
        wait_for(lambda: _gone(child), 5, "the child that ignores SIGTERM to be killed", interval=0.05)


async def test_then_leftovers_never_hold_mod_mds_stderr(programs):
    prog = program(programs, "leave", "sleep 30 &\necho \"child $!\"\nexit 0\n")
    run = await run_hook("--then", prog, "--", "renewing", MD)
    with _child_of(run, prog) as child:
        assert run.rc == 0
        assert run.lines[-1] == f"{LINE}renewing {MD}: then {prog}: exited 0"
        assert run.elapsed < 3
        assert run.eof_after_exit < 0.5       # the sleep still runs, and holds only the hook's pipe
        assert not _gone(child)


async def test_then_program_that_cannot_run_vetoes_like_it_would_alone(programs):
    missing = str(programs / "missing")
    run = await run_hook("--then", missing, "--", "renewing", MD)
    assert run.rc == 1
    assert run.lines[-1] == (f"{LINE}renewing {MD}: then {missing}: could not be started "
                             "(No such file or directory); mod_md aborts this renewal")
    run = await run_hook("--then", missing, "--", "errored", MD)
    assert run.rc == 0


async def test_then_output_is_bounded_and_escaped(programs):
    prog = program(programs, "loud", "printf 'a\\033[31mb\\n'\nhead -c 200000 /dev/zero | tr '\\0' x\n")
    run = await run_hook("--then", prog, "--", "errored", MD)
    assert run.rc == 0
    assert run.lines[1] == LINE + f"{prog}: a\\x1b[31mb"
    assert len(run.stderr) < 80 * 1024
    assert f"{prog}: (more than 65536 bytes of output; the rest is dropped)" in run.stderr
    assert run.lines[-1] == f"{LINE}errored {MD}: then {prog}: exited 0"


@pytest.mark.parametrize("args,rc,message", [
    (["--then", "/bin/true", "renewed", MD], 2, "--then PROGRAM [ARGS...] must end with --"),
    (["--then", "true", "--", "renewed", MD], 2, "--then needs a PROGRAM with an absolute path"),
    (["--then", "--", "renewed", MD], 2, "--then needs a PROGRAM with an absolute path"),
    (["--then-timeout", "0", "--then", "/bin/true", "--", "renewed", MD], 2,
     "--then-timeout must be more than 0 and at most 3600 seconds"),
    (["--then", "/bin/false", "renewing", MD], 0, "--then PROGRAM [ARGS...] must end with --"),
])
async def test_then_usage_errors(args, rc, message, silent_bus):
    run = await run_hook(*args, env={"DBUS_SYSTEM_BUS_ADDRESS": silent_bus.address})
    assert run.rc == rc, run.stderr
    assert len(run.lines) == 1 and run.lines[0].startswith(LINE + message), run.stderr
    assert silent_bus.connections() == 0


# -- --help -------------------------------------------------------------------------------------


def test_help_explains_every_reason_and_exit_code():
    argv, cwd = hook_command(["--help"])
    r = subprocess.run(["runuser", "-u", "www-data", "--", *argv], cwd=cwd, capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    for reason in ("renewed", "renewing", "challenge-setup:TYPE:DNS", "installed", "expiring", "errored",
                   "ocsp-renewed", "ocsp-errored", "anything else"):
        assert re.search(rf"^  {re.escape(reason)}\s", r.stdout, re.MULTILINE), reason
    for needle in ("75 (EX_TEMPFAIL)", "abort the renewal", "--then PROGRAM [ARGS...] --", "--then-timeout",
                   "syslog", SOCKET_ENV):
        assert needle in " ".join(r.stdout.split()), needle  # wherever a line breaks
    assert r.stdout.startswith("usage: apache-restart-hook ")


def test_version_names_the_program():
    argv, cwd = hook_command(["--version"])
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"apache-restart-hook {__version__}\n", "")


def test_help_with_stdout_closed_still_exits_0():
    """mod_md runs the hook with stdout closed: nothing the hook prints may fail it."""
    argv, cwd = hook_command(["--help"])
    r = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
                       check=False, preexec_fn=lambda: os.close(1))
    assert r.returncode == 0, r.stderr


def test_then_with_stdin_and_stdout_closed_like_mod_md(programs):
    """mod_md starts the hook with stdin and stdout closed: the pipe may get fds 0 and 1."""
    prog = program(programs, "show", 'echo "out"\necho "err" >&2\necho "stdin: $(readlink /proc/self/fd/0)"\n')
    argv, cwd = hook_command(["--then", prog, "--", "renewing", MD])

    def close_in_and_out() -> None:
        os.close(0)
        os.close(1)

    r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=30, check=False, preexec_fn=close_in_and_out, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[1:] == [f"{LINE}{prog}: out", f"{LINE}{prog}: err",
                                         f"{LINE}{prog}: stdin: /dev/null",
                                         f"{LINE}renewing {MD}: then {prog}: exited 0"]


# -- the README's mail example ----------------------------------------------------------------


def _readme_mail_example() -> tuple[list[str], str]:
    """The MDMessageCmd tokens after the hook's path, and the md-mail script, from the README."""
    readme = (busutil.REPO / "README.md").read_text()
    (line,) = re.findall(r"^MDMessageCmd \S+apache-restart-hook (--then /\S+/md-mail .*)$", readme, re.MULTILINE)
    (script,) = re.findall(r"```sh\n(#!/bin/sh\n# /usr/local/sbin/md-mail .*?)```", readme, re.DOTALL)
    return line.split(), script


@pytest.mark.parametrize("reason,name,mailed", [
    ("errored", MD, f'mod_md: errored {MD}'),
    ("expiring", "evil;$(id)\nx.example", "mod_md: expiring evilidx.example"),
    ("renewing", MD, None),
    ("renewed", MD, None),
])
async def test_readme_mail_example_as_the_hook_runs_it(programs, silent_bus, reason, name, mailed):
    tokens, script = _readme_mail_example()
    md_mail = program(programs, "md-mail", script.removeprefix("#!/bin/sh\n"))
    tokens = [md_mail if t.endswith("/md-mail") else t for t in tokens]
    # mail(1) and hostname(1) stand-ins on PATH: what was mailed lands in a file.
    sent = programs / "sent"
    sent.mkdir(mode=0o777)
    sent.chmod(0o777)
    program(programs, "mail", f'{{ printf "%s|" "$@"; echo; cat; }} > {sent}/mail\n')
    program(programs, "hostname", "echo host.example\n")
    run = await run_hook("--bus-address", silent_bus.address, "--timeout", "0.5", *tokens, reason, name,
                         env={"PATH": f"{programs}:/usr/sbin:/usr/bin:/sbin:/bin"})
    expected_rc = 75 if reason == "renewed" else 0  # the broker is away; md-mail itself succeeds
    assert run.rc == expected_rc, run.stderr
    assert f"then {md_mail}: exited 0" in run.stderr
    if mailed is None:
        assert not (sent / "mail").exists()
        return
    args, _, body = (sent / "mail").read_text().partition("\n")
    assert args == f"-s|{mailed}|root|"
    assert body.startswith(f'mod_md on host.example reports "{reason}" for {mailed.split()[-1]}.\n')
