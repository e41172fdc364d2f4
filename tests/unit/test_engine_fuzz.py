"""Property: whatever www-data stages, and whatever a restart command prints, no output of the
engine (replies, LastResult and the other properties, RestartFinished, the status document,
log lines) carries a control, format or separator character, and log lines stay one entry each.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import json
import shutil
import sys
import tempfile
import unicodedata
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import BrokerError
from broker.restart import RestartOutcome
from harness import storefactory
from tests.unit.test_engine import Clock, make_engine

MD = "www.example.test"
OTHER = "other.example.test"

_template: Path | None = None


def template() -> Path:
    """Two valid staged sets, made once (certificates are slow to make)."""
    global _template
    if _template is None:
        root = Path(tempfile.mkdtemp(prefix="arb-fuzz-template-"))
        atexit.register(shutil.rmtree, root, True)
        store = storefactory.make_store(root)
        storefactory.add_staged(store, MD, [MD])
        storefactory.add_staged(store, OTHER, [OTHER])
        _template = store
    return _template


def clean(text: str) -> bool:
    return not any(unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029" for ch in text)


def strings_in(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in strings_in(v)]
    return []


json_leaf = st.one_of(st.text(max_size=40), st.integers(), st.booleans(), st.none())
hostile_json = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


class Apache:
    def __init__(self, ok: bool, issued: bool, detail: str):
        self.outcome = RestartOutcome(issued, ok and issued, detail)

    async def restart(self) -> RestartOutcome:
        return self.outcome


async def scenario(store: Path, state_dir: Path, domains: list[str], md_json_extra: dict, job: Any,
                   pubcert: bytes | None, apache: Apache) -> list[str]:
    outputs: list[str] = []
    clock = Clock()
    engine, _ = make_engine(state_dir.parent, store, apache, clock, settle_seconds=0, min_interval_seconds=0)
    engine.on_properties_changed = lambda changed: outputs.extend(strings_in(changed))
    engine.on_restart_finished = lambda ok, detail, names: outputs.extend([detail, *names])
    for md in (MD, OTHER):
        await engine.request(md, caller_uid=33)
    # Between the request and the restart www-data rewrites OTHER's staged files.
    staged = store / "staging" / OTHER
    (staged / "md.json").write_text(json.dumps({"name": OTHER, "domains": domains, **md_json_extra}))
    (staged / "job.json").write_text(json.dumps(job))
    if pubcert is not None:
        (staged / "pubcert.pem").write_bytes(pubcert)
    await engine.restart_now()
    for md in (OTHER, MD):
        try:
            await engine.request(md, caller_uid=0)
        except BrokerError as e:
            outputs.append(e.message)
    outputs.extend(strings_in(engine.properties()))
    outputs.extend(strings_in(json.loads(json.dumps(await engine.status()))))
    # A new engine on the same state answers the same.
    again, _ = make_engine(state_dir.parent, store, apache, clock, settle_seconds=0, min_interval_seconds=0)
    outputs.extend(strings_in(again.properties()))
    return outputs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    domains=st.lists(st.one_of(st.just(OTHER), st.text(max_size=30),
                               st.text(st.characters(max_codepoint=127), max_size=30)), min_size=1, max_size=4),
    md_json_extra=st.dictionaries(st.sampled_from(["privkey", "name", "x"]), hostile_json, max_size=2),
    job=hostile_json,
    pubcert=st.one_of(st.none(), st.binary(max_size=200),
                      st.text(max_size=100).map(lambda t: ("-----BEGIN CERTIFICATE-----\n" + t).encode(
                          "utf-8", "surrogatepass"))),
    ok=st.booleans(), issued=st.booleans(), detail=st.text(max_size=300),
)
def test_no_output_of_the_engine_holds_a_control_character(domains, md_json_extra, job, pubcert, ok, issued,
                                                            detail):
    with tempfile.TemporaryDirectory(prefix="arb-fuzz-") as tmp:
        store = Path(tmp) / "md"
        shutil.copytree(template(), store)
        err = io.StringIO()
        real_stderr = sys.stderr
        sys.stderr = err
        try:
            outputs = asyncio.run(scenario(store, Path(tmp) / "state", domains, md_json_extra, job, pubcert,
                                           Apache(ok, issued, detail)))
        finally:
            sys.stderr = real_stderr
    for text in outputs:
        assert clean(text), repr(text)
        text.encode("utf-8")  # a lone surrogate cannot go over D-Bus
    log = err.getvalue()
    assert log.endswith("\n")
    for line in log[:-1].split("\n"):
        assert line[:1] == "<" and line[1:2] in set("01234567") and line[2:3] == ">", repr(line)
        assert clean(line), repr(line)
