"""The command runner and the command restarter, with small Python programs as fake Apache tools."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker import restart
from broker.restart import (
    FIXED_ENV,
    OUTPUT_CAP,
    TRUNCATED_MARK,
    CommandRestarter,
    first_meaningful_line,
    run_command,
)


def program(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


async def wait_gone(pid: int, within: float = 1.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return gone(pid)


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        for level in ("err", "warning", "notice", "info", "debug"):
            setattr(self, level, lambda msg, level=level: self.lines.append((level, str(msg))))

    def text(self) -> str:
        return "\n".join(msg for _, msg in self.lines)


@pytest.fixture
def pid_file(tmp_path: Path) -> str:
    """A pid file naming a live process (this test), so that Apache counts as running."""
    path = tmp_path / "apache2.pid"
    path.write_text(f"{os.getpid()}\n")
    return str(path)


def marker_program(tmp_path: Path, name: str, code: int = 0, say: str = "") -> tuple[list[str], Path]:
    marker = tmp_path / f"{name}.ran"
    argv = program(tmp_path, name, f"""
        import sys
        open({str(marker)!r}, "w").close()
        sys.stdout.write({say!r})
        sys.exit({code})
    """)
    return argv, marker


# -- run_command ------------------------------------------------------------------------


async def test_output_and_exit_code_are_captured_from_stdout_and_stderr(tmp_path):
    argv = program(tmp_path, "both", """
        import sys
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        sys.exit(3)
    """)
    result = await run_command(argv, 5)
    assert result.returncode == 3
    assert not result.timed_out and result.error == ""
    assert "to stdout" in result.output and "to stderr" in result.output


async def test_environment_is_fixed_and_cwd_is_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ARB_MUST_NOT_LEAK", "secret")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    out = tmp_path / "env.json"
    argv = program(tmp_path, "env", f"""
        import json, os
        json.dump({{"env": dict(os.environ), "cwd": os.getcwd()}}, open({str(out)!r}, "w"))
    """)
    monkeypatch.chdir(tmp_path)
    result = await run_command(argv, 5)
    assert result.returncode == 0, result.output
    seen = json.loads(out.read_text())
    assert seen["env"] == FIXED_ENV
    assert seen["env"]["LC_ALL"] == "C"
    assert seen["cwd"] == "/"


async def test_stdin_is_devnull_not_ours(tmp_path):
    argv = program(tmp_path, "stdin", """
        import os, stat, sys
        st, null = os.fstat(0), os.stat("/dev/null")
        print(stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev, repr(sys.stdin.read()))
    """)
    # Our own stdin may already be /dev/null: give it something a leak would show.
    r, w = os.pipe()
    os.write(w, b"leaked")
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        result = await run_command(argv, 5)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)
    assert result.output.split() == ["True", "''"]


async def test_inheritable_descriptors_are_closed(tmp_path):
    argv = program(tmp_path, "fds", """
        import os
        print(" ".join(os.listdir("/proc/self/fd")))
    """)
    r, w = os.pipe()
    os.dup2(r, 200, inheritable=True)
    try:
        result = await run_command(argv, 5)
    finally:
        for fd in (200, r, w):
            os.close(fd)
    assert result.returncode == 0
    assert "0" in result.output.split()
    assert "200" not in result.output.split()


async def test_timeout_kills_the_whole_process_group_and_reaps(tmp_path):
    pids = tmp_path / "pids"
    argv = program(tmp_path, "forker", f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        print("started", flush=True)
        time.sleep(30)
    """)
    start = time.monotonic()
    result = await run_command(argv, 1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and result.returncode is None
    assert "started" in result.output
    assert elapsed < 2.0
    command_pid, grandchild_pid = map(int, pids.read_text().split())
    with pytest.raises(ProcessLookupError):
        os.kill(command_pid, 0)  # killed and reaped by us, not left a zombie
    assert await wait_gone(grandchild_pid)


async def test_helper_holding_the_pipe_after_exit_is_killed_at_the_deadline(tmp_path):
    pids = tmp_path / "pids"
    argv = program(tmp_path, "leaver", f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        open({str(pids)!r}, "w").write(str(child.pid))
        print("bye", flush=True)
    """)
    start = time.monotonic()
    result = await run_command(argv, 0.8)
    assert time.monotonic() - start < 2.0
    assert result.returncode == 0 and not result.timed_out
    assert "bye" in result.output
    assert await wait_gone(int(pids.read_text()))


async def test_cancelling_the_caller_kills_the_group(tmp_path):
    pids = tmp_path / "pids"
    argv = program(tmp_path, "slow", f"""
        import os, time
        open({str(pids)!r}, "w").write(str(os.getpid()))
        time.sleep(30)
    """)
    task = asyncio.ensure_future(run_command(argv, 30))
    for _ in range(100):
        if pids.exists() and pids.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone(int(pids.read_text()))


async def test_output_is_capped_and_the_command_is_not_blocked(tmp_path):
    argv = program(tmp_path, "chatty", """
        import sys
        sys.stdout.write("x" * (300 * 1024))
        sys.stdout.flush()
        sys.exit(0)
    """)
    result = await run_command(argv, 5)
    assert result.returncode == 0 and not result.timed_out
    assert result.output.endswith(TRUNCATED_MARK)
    assert len(result.output) == OUTPUT_CAP + len(TRUNCATED_MARK)


async def test_undecodable_output_is_replaced_not_raised(tmp_path):
    argv = program(tmp_path, "binary", r"""
        import sys
        sys.stdout.buffer.write(b"bad \xff\xfe byte")
    """)
    result = await run_command(argv, 5)
    assert result.output == "bad \ufffd\ufffd byte"


async def test_missing_program_is_reported_not_raised(tmp_path):
    result = await run_command([str(tmp_path / "no-such-program")], 5)
    assert result.returncode is None and not result.timed_out
    assert result.error == "program not found"


async def test_non_executable_program_is_reported(tmp_path):
    path = tmp_path / "not-exec"
    path.write_text("#!/bin/sh\n")
    path.chmod(stat.S_IRUSR)
    result = await run_command([str(path)], 5)
    assert result.returncode is None
    assert result.error == "permission denied"


async def test_empty_argv_is_reported():
    result = await run_command([], 5)
    assert result.returncode is None and result.error


# -- CommandRestarter -------------------------------------------------------------------


async def test_config_test_failure_runs_nothing_else(tmp_path, pid_file):
    configtest, tested = marker_program(
        tmp_path, "configtest", code=1,
        say="AH00558: apache2: Could not reliably determine the server's fully qualified domain name\n"
            "AH00526: Syntax error on line 3 of /etc/apache2/sites-enabled/x.conf:\n"
            "Invalid command 'Bogus', perhaps misspelled\n"
            "Action 'configtest' failed.\n")
    graceful, restarted = marker_program(tmp_path, "graceful")
    fake_log = FakeLog()
    outcome = await CommandRestarter(configtest, graceful, pid_file, 5, log=fake_log).restart()
    assert tested.exists()
    assert not restarted.exists()
    assert (outcome.issued, outcome.ok) == (False, False)
    assert outcome.detail == ("config test failed: AH00526: Syntax error on line 3 of "
                              "/etc/apache2/sites-enabled/x.conf: Invalid command 'Bogus', perhaps misspelled")
    # The whole output is in the log, on one line per event.
    assert any("Invalid command 'Bogus'" in msg and "AH00526" in msg for _, msg in fake_log.lines)
    assert all("\n" not in msg for _, msg in fake_log.lines)


async def test_graceful_ok(tmp_path, pid_file):
    configtest, tested = marker_program(tmp_path, "configtest", say="Syntax OK\n")
    graceful, restarted = marker_program(tmp_path, "graceful")
    fake_log = FakeLog()
    outcome = await CommandRestarter(configtest, graceful, pid_file, 5, log=fake_log).restart()
    assert tested.exists() and restarted.exists()
    assert (outcome.issued, outcome.ok, outcome.detail) == (True, True, "graceful restart issued")
    assert "Syntax OK" in fake_log.text()


async def test_empty_config_test_is_skipped(tmp_path, pid_file):
    graceful, restarted = marker_program(tmp_path, "graceful")
    outcome = await CommandRestarter((), graceful, pid_file, 5, log=FakeLog()).restart()
    assert restarted.exists()
    assert outcome.ok


async def test_graceful_failure_counts_as_issued(tmp_path, pid_file):
    configtest, _ = marker_program(tmp_path, "configtest")
    graceful, restarted = marker_program(tmp_path, "graceful", code=1,
                                         say="apache2: could not signal the server\nsecond line\n")
    outcome = await CommandRestarter(configtest, graceful, pid_file, 5, log=FakeLog()).restart()
    assert restarted.exists()
    assert (outcome.issued, outcome.ok) == (True, False)
    assert outcome.detail == "graceful command failed (exit 1): apache2: could not signal the server"


async def test_graceful_timeout(tmp_path, pid_file):
    graceful = program(tmp_path, "hang", "import time; time.sleep(30)\n")
    start = time.monotonic()
    outcome = await CommandRestarter((), graceful, pid_file, 0.5, log=FakeLog()).restart()
    assert time.monotonic() - start < 2.0
    assert (outcome.issued, outcome.ok) == (True, False)
    assert outcome.detail == "graceful command timed out after 0.5 s"


async def test_config_test_timeout(tmp_path, pid_file):
    configtest = program(tmp_path, "hang", "import time; time.sleep(30)\n")
    graceful, restarted = marker_program(tmp_path, "graceful")
    outcome = await CommandRestarter(configtest, graceful, pid_file, 0.5, log=FakeLog()).restart()
    assert not restarted.exists()
    assert (outcome.issued, outcome.ok) == (False, False)
    assert outcome.detail == "config test timed out after 0.5 s"


async def test_missing_graceful_program_is_not_issued(tmp_path, pid_file):
    outcome = await CommandRestarter((), [str(tmp_path / "apachectl")], pid_file, 5, log=FakeLog()).restart()
    assert (outcome.issued, outcome.ok) == (False, False)
    assert outcome.detail == "graceful command could not run: program not found"


async def test_not_running_apache_is_reported_and_nothing_runs(tmp_path):
    configtest, tested = marker_program(tmp_path, "configtest")
    graceful, restarted = marker_program(tmp_path, "graceful")
    fake_log = FakeLog()
    restarter = CommandRestarter(configtest, graceful, str(tmp_path / "absent.pid"), 5, log=fake_log)
    outcome = await restarter.restart()
    assert not tested.exists() and not restarted.exists()
    assert (outcome.issued, outcome.ok) == (False, False)
    assert outcome.detail == "apache is not running (no pid file)"
    assert str(tmp_path) not in outcome.detail
    assert any(level == "warning" for level, _ in fake_log.lines)


def restarter_for(path: Path) -> CommandRestarter:
    return CommandRestarter((), ["true"], str(path), 5, log=FakeLog())


def test_pid_file_of_a_live_process_means_running(pid_file):
    assert restarter_for(Path(pid_file)).apache_running()


@pytest.mark.parametrize("content", [
    b"", b"abc\n", b"12abc\n", b"+12\n", b"-5\n", b"0\n", b"1_2\n", b"\xd9\xa1\xd9\xa2\n",
    b"99999999999\n", b"1" + b" " * 70,
])
def test_garbage_pid_file_means_not_running(tmp_path, content):
    path = tmp_path / "apache2.pid"
    path.write_bytes(content)
    assert not restarter_for(path).apache_running()


def test_oversized_pid_file_means_not_running(tmp_path):
    path = tmp_path / "apache2.pid"
    path.write_bytes(f"{os.getpid()}".encode() + b"\n" * 100)
    assert not restarter_for(path).apache_running()


def test_absent_pid_file_means_not_running(tmp_path):
    assert not restarter_for(tmp_path / "absent.pid").apache_running()


def test_stale_pid_means_not_running(tmp_path):
    import subprocess
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "apache2.pid"
    path.write_text(f"{dead.pid}\n")
    assert not restarter_for(path).apache_running()


def test_symlinked_pid_file_is_not_followed(tmp_path, pid_file):
    link = tmp_path / "link.pid"
    link.symlink_to(pid_file)
    assert restarter_for(Path(pid_file)).apache_running()
    assert not restarter_for(link).apache_running()


def test_directory_or_fifo_as_pid_file_means_not_running(tmp_path):
    fifo = tmp_path / "fifo.pid"
    os.mkfifo(fifo)
    assert not restarter_for(tmp_path).apache_running()
    assert not restarter_for(fifo).apache_running()  # and does not block on the FIFO


def test_pid_of_someone_elses_process_counts_as_running(tmp_path, monkeypatch):
    def eperm(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(restart.os, "kill", eperm)
    path = tmp_path / "apache2.pid"
    path.write_text("4242\n")
    assert restarter_for(path).apache_running()


def test_first_meaningful_line_skips_apache_noise():
    output = ("AH00558: apache2: Could not reliably determine the server's fully qualified domain name\n"
              "\n"
              "apache2: Syntax error on line 225 of /etc/apache2/apache2.conf: bad thing\n"
              "Action 'configtest' failed.\n"
              "The Apache error log may have more information.\n")
    assert first_meaningful_line(output).startswith("apache2: Syntax error on line 225")
    assert first_meaningful_line("") == "(no output)"
    assert first_meaningful_line("just one line\n") == "just one line"
    assert len(first_meaningful_line("error " + "x" * 1000)) <= restart.DETAIL_CAP


async def test_restarts_do_not_overlap(tmp_path, pid_file):
    log_file = tmp_path / "events"
    graceful = program(tmp_path, "graceful", f"""
        import time
        open({str(log_file)!r}, "a").write("start\\n")
        time.sleep(0.2)
        open({str(log_file)!r}, "a").write("end\\n")
    """)
    restarter = CommandRestarter((), graceful, pid_file, 5, log=SimpleNamespace(
        err=print, warning=print, notice=print, info=print, debug=print))
    outcomes = await asyncio.gather(restarter.restart(), restarter.restart())
    assert all(o.ok for o in outcomes)
    assert log_file.read_text().split() == ["start", "end", "start", "end"]
