"""The interface XML's GetStatus schema against a real GetStatus reply.

The schema is prose in the XML's comment (D-Bus has no type for JSON), so nothing checked it and
it drifted (`active_problem` was missing). Here the real broker answers GetStatus for a store that
shows every part of the document, and the keys it sends must be the keys the XML names: a key
added to the reply without the XML, or left in the XML after the code dropped it, fails.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

from broker import names
from harness import busutil, storefactory
from harness.busutil import call, error_of

XML = Path(__file__).resolve().parents[2] / "dbus" / f"{names.INTERFACE}.xml"


def documented_keys(method: str) -> set[str]:
    """The quoted names in the comment just before <method name="METHOD">, without the values
    of an enumeration ("a" | "b": a word right after "| " is a value, not a key)."""
    text = XML.read_text()
    end = text.index(f'<method name="{method}">')
    start = text.rindex("<!--", 0, end)
    comment = text[start:end]
    return {m.group(1) for m in re.finditer(r'(?<!\| )"([a-z][a-z0-9_]*)"', comment)}


def keys_of(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def test_the_enumeration_rule_reads_the_schema_as_meant() -> None:
    keys = documented_keys("GetStatus")
    # "retry" is a key of its own, and the last value of waiting_for's enumeration.
    assert {"waiting_for", "retry", "active_problem", "certs", "not_after_usec"} <= keys
    assert not {"settle", "min_interval"} & keys


async def test_get_status_reply_has_exactly_the_documented_keys(start_broker, client, allow, store):
    # Every branch of the document: an MD with an active and a valid staged set (pending, and
    # held back by a failed config test, so "retry" is filled), one whose staged set is invalid,
    # one whose active set cannot be read.
    storefactory.add_active(store, "a.example.test", ["a.example.test"])
    storefactory.add_staged(store, "a.example.test", ["a.example.test"])
    storefactory.add_staged(store, "b.example.test", ["b.example.test"], cert_names=["x.example.test"])
    broken = storefactory.add_active(store, "c.example.test", ["c.example.test"])
    (broken.dir / "pubcert.pem").write_text("not a certificate\n")
    rec = await busutil.SignalRecorder(client).start()
    # A probe address where nobody listens: each MD's "served" holds its error entry.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    broker = await start_broker(probe=[closed])
    (broker.control / "configtest-fails").write_text("")
    assert error_of(await call(client, "RequestGracefulRestart", "s", ["a.example.test"])) is None
    (finished,) = await rec.wait_for("RestartFinished")
    assert finished.body[0] is False  # held back: retried later, so "retry" is set

    reply = await call(client, "GetStatus")
    assert error_of(reply) is None
    status = json.loads(reply.body[0])
    by_name = {m["name"]: m for m in status["mds"]}
    assert status["retry"] is not None and by_name["a.example.test"]["staged"]["valid"] is True
    assert by_name["b.example.test"]["staged"]["valid"] is False
    assert "active_problem" in by_name["c.example.test"], by_name["c.example.test"]
    assert by_name["a.example.test"]["served"][0]["probe"] == closed

    sent, documented = keys_of(status), documented_keys("GetStatus")
    assert sent - documented == set(), "GetStatus sends keys the interface XML does not name"
    assert documented - sent == set(), "the interface XML names keys GetStatus does not send"
