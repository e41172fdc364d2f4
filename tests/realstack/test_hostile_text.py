"""Text that www-data writes into the store, on the real stack: it reaches replies, LastResult,
RestartFinished and the log only escaped, the broker survives it, is restarted and still serves.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import names
from harness.procs import wait_for
from harness import storefactory
from tests.realstack.stack import APACHE_USER, RealStack

pytestmark = pytest.mark.realstack

MD = "www.example.test"
OTHER = "other.example.test"
THIRD = "third.example.test"
# What md.json's "domains" may hold for an MD without a root-owned md.json: any ASCII.
HOSTILE = "a\0b\x1b]0;owned\x07\x1b[2J\r\n<0>forged\x7f"
ESCAPED = "a\\x00b\\x1b]0;owned\\x07\\x1b[2J\\x0d\\x0a<0>forged\\x7f"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def write_as_www_data(stack: RealStack, path: Path, obj: object) -> None:
    """www-data writes `obj` as JSON to `path`, as code running as www-data could."""
    result = stack.run_as(APACHE_USER, ["/usr/bin/python3", "-c",
                                        "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                                        str(path), json.dumps(obj)])
    assert result.returncode == 0, result.stderr


def hand_staging_to_www_data(stack: RealStack) -> None:
    """mod_md's staging/ belongs to www-data."""
    user = pwd.getpwnam(APACHE_USER)
    for root, dirs, files in os.walk(stack.store / "staging"):
        for entry in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(entry, user.pw_uid, user.pw_gid)


def assert_clean_log(stack: RealStack) -> None:
    raw = stack.broker.log_path.read_bytes()  # type: ignore[union-attr]
    assert b"\0" not in raw and b"\x1b" not in raw
    for line in raw.decode("utf-8").splitlines():
        assert re.match(r"<[0-7]>", line), line
        assert not CONTROL.search(line), line
        assert not line.startswith("<0>")


def unmanaged(stack: RealStack, md: str) -> None:
    """No root-owned domains/<md>/md.json: an MD Apache never activated a set for."""
    shutil.rmtree(stack.store / "domains" / md, ignore_errors=True)


def assert_clean_reply_text(text: str) -> None:
    assert not CONTROL.search(text), text
    if "does not cover" in text:  # the names check quotes what md.json lists: escaped
        assert text.endswith(f"does not cover {ESCAPED}"), text


def test_hostile_md_json_is_refused_cleanly_and_the_broker_still_serves_after_a_restart(
        realstack: Callable[..., RealStack]) -> None:
    """www-data stages an MD whose md.json lists a NUL, escapes and "<0>" among its names."""
    stack = realstack()
    storefactory.add_staged(stack.store, THIRD, [THIRD])
    unmanaged(stack, THIRD)
    hand_staging_to_www_data(stack)
    write_as_www_data(stack, stack.store / "staging" / THIRD / "md.json",
                      {"name": THIRD, "domains": [THIRD, HOSTILE]})
    refused = stack.request(APACHE_USER, THIRD)
    assert refused.error_name is not None and refused.error_name.startswith(names.ERROR_PREFIX), refused
    assert_clean_reply_text(refused.error_message)
    # CheckAll and GetStatus look at the same set.
    assert stack.call("root", "CheckAll").ok
    status = stack.call("root", "GetStatus")
    assert status.ok and not CONTROL.search(status.stdout), status
    assert stack.broker is not None and stack.broker.running()
    assert_clean_log(stack)

    stack.restart_broker()
    assert stack.prop("LastResult") == ""
    storefactory.add_active(stack.store, MD, [MD])
    storefactory.add_staged(stack.store, MD, [MD])
    assert stack.request(APACHE_USER, MD).ok
    assert stack.wait_for_restart_result() == "ok"
    assert_clean_log(stack)


def test_hostile_command_output_is_escaped_and_the_state_holding_it_loads_again(
        realstack: Callable[..., RealStack]) -> None:
    """Apache's config test may quote what it read (mod_md reads the store too): the text
    reaches LastResult, RestartFinished, the log and the state file, escaped."""
    stack = realstack()
    storefactory.add_active(stack.store, MD, [MD])
    storefactory.add_staged(stack.store, MD, [MD])
    (stack.control / "configtest-fails").write_bytes(b"AH10045: " + HOSTILE.encode() + b"\xff\xc2\x9b\n")
    assert stack.request(APACHE_USER, MD).ok
    result = stack.wait_for_restart_result()
    # (its first line: up to the \r\n)
    assert result == "failed: config test failed: AH10045: a\\x00b\\x1b]0;owned\\x07\\x1b[2J", result
    assert stack.broker is not None and stack.broker.running()
    # RestartFinished carried the same detail (a NUL there made the D-Bus library raise in the
    # restart loop, which ended the broker).
    assert "restart loop ended" not in stack.broker_log()
    assert_clean_log(stack)

    stack.restart_broker()
    assert stack.prop("LastResult") == result
    (stack.control / "configtest-fails").unlink()
    assert stack.request(APACHE_USER, MD).ok
    assert wait_for(lambda: stack.prop("LastResult") != result and stack.prop("LastResult"), 15,
                    "the next restart") == "ok"
    assert storefactory.read_active_fingerprint(stack.store, MD) is not None
    assert_clean_log(stack)


def test_hostile_names_of_an_unmanaged_md_are_escaped_everywhere(
        realstack: Callable[..., RealStack]) -> None:
    """An MD without a root-owned md.json, whose staged md.json therefore lists its names: a set
    rewritten after the request brings the hostile name into the restart's detail, LastResult
    and the state file."""
    stack = realstack(settle_seconds=2.0)
    storefactory.add_staged(stack.store, MD, [MD])
    storefactory.add_staged(stack.store, OTHER, [OTHER])
    unmanaged(stack, OTHER)
    hand_staging_to_www_data(stack)
    assert stack.request(APACHE_USER, MD).ok
    other = stack.request(APACHE_USER, OTHER)
    if not other.ok:
        # A broker that takes only the MDs root's md.json declares never reads these names:
        # the refusal is all there is (and it is clean).
        assert other.error_name is not None and other.error_name.startswith(names.ERROR_PREFIX), other
        assert_clean_reply_text(other.error_message)
        return
    write_as_www_data(stack, stack.store / "staging" / OTHER / "md.json",
                      {"name": OTHER, "domains": [OTHER, HOSTILE]})
    (stack.control / "configtest-fails").touch()  # so that the detail becomes LastResult
    result = stack.wait_for_restart_result()
    assert result.startswith("failed: config test failed: "), result
    assert f"{OTHER}: names: staging/{OTHER}/pubcert.pem does not cover {ESCAPED}" in result, result
    assert stack.broker is not None and stack.broker.running()
    # RestartFinished carried the same detail (a NUL there made the D-Bus library raise in the
    # restart loop, which ended the broker).
    assert "restart loop ended" not in stack.broker_log()
    assert_clean_log(stack)

    stack.restart_broker()
    assert stack.prop("LastResult") == result
