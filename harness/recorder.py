"""A stand-in for mod_md's hook that only records how it was called (for tests without the broker).

It is a /bin/sh script: mod_md runs it as www-data, which can read /bin/sh wherever the test's
Python lives. Each call appends one line: the epoch time, the user, then the arguments.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import make_dir, write_file

SCRIPT = """#!/bin/sh
# Records one MDMessageCmd call per line: time, user, arguments (tab-separated).
printf '%s\\t%s' "$(date +%s.%N)" "$(id -un)" >> {log}
for arg in "$@"; do printf '\\t%s' "$arg" >> {log}; done
printf '\\n' >> {log}
exit {status}
"""


@dataclass(frozen=True)
class HookCall:
    time: float  # epoch seconds
    user: str
    args: tuple[str, ...]  # mod_md's REASON, NAME, and whatever it appends

    @property
    def reason(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def md(self) -> str:
        return self.args[1] if len(self.args) > 1 else ""


class HookRecorder:
    """Writes the script into ``directory`` (0755) and its log beside it (writable by www-data)."""

    def __init__(self, directory: Path, exit_status: int = 0) -> None:
        self.directory = make_dir(directory)
        self.log_path = directory / "calls.log"
        self.script = directory / "record-hook"
        write_file(self.log_path, "", mode=0o666)
        script = SCRIPT.format(log=shlex.quote(str(self.log_path)), status=int(exit_status))
        write_file(self.script, script, mode=0o755)

    @property
    def argv(self) -> list[str]:
        """The MDMessageCmd argv."""
        return [str(self.script)]

    def calls(self) -> list[HookCall]:
        found = []
        for line in self.log_path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                found.append(HookCall(float(fields[0]), fields[1], tuple(fields[2:])))
        return found

    def wait_call(self, reason: str, md: str, timeout: float = 20.0) -> HookCall:
        deadline = time.monotonic() + timeout
        while True:
            for call in self.calls():
                if call.reason == reason and call.md == md:
                    return call
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {reason} call for {md} within {timeout:g} s: {self.calls()}")
            time.sleep(0.05)
