"""client.chain: how a chained command's output is cut into log lines, and how its end is told."""

from __future__ import annotations

import time

from client import chain


def run_sh(script: str, timeout: float = 10) -> tuple[chain.Outcome, list[str]]:
    lines: list[str] = []
    outcome = chain.run(["/bin/sh", "-c", script], timeout, lines.append)
    return outcome, lines


def test_lines_as_written_the_last_one_without_a_newline_too() -> None:
    outcome, lines = run_sh("printf 'one\\r\\ntwo\\n\\nthree'")
    assert (outcome.ok, outcome.exit_code, outcome.detail) == (True, 0, "exited 0")
    assert lines == ["one", "two", "", "three"]


def test_a_long_line_is_cut_into_pieces_of_max_line() -> None:
    _, lines = run_sh(f"head -c {chain.MAX_LINE * 2 + 10} /dev/zero | tr '\\0' a")
    assert [len(line) for line in lines] == [chain.MAX_LINE, chain.MAX_LINE, 10]


def test_a_long_line_is_cut_before_a_utf8_sequence_not_inside_it() -> None:
    _, lines = run_sh(f"head -c {chain.MAX_LINE - 1} /dev/zero | tr '\\0' a; printf '\\303\\251b'")
    assert lines == ["a" * (chain.MAX_LINE - 1), "\u00e9b"]


def test_long_lines_with_newlines_read_at_once_are_cut_too() -> None:
    _, lines = run_sh(f"head -c {chain.MAX_LINE * 2 + 500} /dev/zero | tr '\\0' a; printf '\\nz\\n'")
    assert [len(line) for line in lines] == [chain.MAX_LINE, chain.MAX_LINE, 500, 1]


def test_output_beyond_the_bound_is_dropped_and_said_once() -> None:
    # The second write crosses the bound inside one read: the note must come all the same.
    first = chain.MAX_OUTPUT - 5000
    _, lines = run_sh(f"head -c {first} /dev/zero | tr '\\0' x; sleep 0.3; "
                      "head -c 10000 /dev/zero | tr '\\0' y; sleep 0.3; echo more")
    note = f"(more than {chain.MAX_OUTPUT} bytes of output; the rest is dropped)"
    assert lines[-1] == note and lines.count(note) == 1
    assert "".join(lines[:-1]) == "x" * first + "y" * 5000


def test_output_up_to_the_bound_is_copied_whole() -> None:
    _, lines = run_sh(f"head -c {chain.MAX_OUTPUT} /dev/zero | tr '\\0' x")
    assert "".join(lines) == "x" * chain.MAX_OUTPUT


def test_undecodable_output_is_replaced_not_fatal() -> None:
    outcome, lines = run_sh("printf 'caf\\351\\n'; exit 4")
    assert lines == ["caf\ufffd"]
    assert (outcome.ok, outcome.exit_code, outcome.detail) == (False, 4, "exited 4")


def test_killed_by_a_signal_has_no_exit_status() -> None:
    outcome, _ = run_sh("kill -KILL $$")
    assert (outcome.ok, outcome.exit_code, outcome.detail) == (False, 1, "killed by SIGKILL")


def test_a_program_that_closes_its_output_is_waited_for_not_polled() -> None:
    start = time.monotonic()
    cpu = time.process_time()
    outcome, lines = run_sh("exec >/dev/null 2>&1; sleep 1; exit 0")
    assert outcome.ok and lines == []
    assert 0.9 < time.monotonic() - start < 5
    assert time.process_time() - cpu < 0.3, "the hook spun while the program ran"


def test_not_startable() -> None:
    lines: list[str] = []
    outcome = chain.run(["/nonexistent/program"], 5, lines.append)
    assert (outcome.ok, outcome.exit_code) == (False, 1)
    assert outcome.detail == "could not be started (No such file or directory)"
    assert lines == []
