"""The broker's half of `apache-restart test`: each check's verdict and what it says to fix."""

import json
import ssl
import sys
import threading
import time
import unicodedata
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from broker import selftest
from broker.staging import Store
from harness import storefactory

MD = "www.example.test"
FAILING_CONFIGTEST = (sys.executable, "-c",
                      "print('AH00526: Syntax error on line 3 of x.conf:'); print('Invalid command'); exit(1)")


def by_step(steps):
    return {s.step: s for s in steps}


async def run(store: Path, md: str = MD, failed=None, configtest=(), probes=(), served=None, running=None):
    kw = {"served": served} if served else {}
    store_view = Store(str(store), anchors=storefactory.anchors())
    return await selftest.run(str(store), store_view, md, failed or {}, configtest, 10.0, probes,
                              running, **kw)


async def test_a_sound_path(tmp_path):
    store = storefactory.make_store(tmp_path)
    active = storefactory.add_active(store, MD, [MD, "alias.example.test"])
    storefactory.add_staged(store, MD, [MD, "alias.example.test"])
    asked = []

    async def served(address, sni, timeout):
        asked.append((address, sni))
        return active.certs["rsa"].cert.public_bytes(Encoding.DER)

    steps = await run(store, configtest=(sys.executable, "-c", "pass"), probes=("127.0.0.1:443",), served=served,
                      running=lambda: (True, "pid 1"))
    assert [(s.step, s.ok) for s in steps] == [
        ("store", True), (f"managed {MD}", True), (f"staged {MD}", True), ("apache running", True),
        ("config test", True), (f"probe 127.0.0.1:443 ({MD})", True)]
    assert by_step(steps)[f"managed {MD}"].detail == f"names {MD}, alias.example.test"
    assert asked == [("127.0.0.1:443", MD)]
    assert all(s.fix == "" for s in steps)


async def test_each_failure_names_what_to_fix(tmp_path):
    store = storefactory.make_store(tmp_path)
    storefactory.add_staged(store, MD, [MD], valid_from=time.time() - 86400, valid_until=time.time() - 3600)

    async def served(address, sni, timeout):
        raise ssl.SSLError(1, "boom")

    steps = by_step(await run(store, configtest=FAILING_CONFIGTEST, probes=("127.0.0.1:443",), served=served,
                              running=lambda: (False, "no live process is named in /run/apache2/apache2.pid")))
    assert steps[f"managed {MD}"].ok
    staged = steps[f"staged {MD}"]
    assert not staged.ok and staged.detail.startswith("refused: expired")
    assert not steps["apache running"].ok and steps["apache running"].fix.startswith("start Apache")
    config = steps["config test"]
    assert not config.ok and "AH00526" in config.detail and config.fix.startswith(f"run {sys.executable}")
    (probe,) = [s for s in steps.values() if s.step.startswith("probe ")]
    assert not probe.ok and probe.detail.startswith("no certificate: TLS error")


async def test_an_unmanaged_md_and_an_untrusted_ca_say_what_to_fix(tmp_path):
    store = storefactory.make_store(tmp_path)
    storefactory.add_staged(store, MD, [MD], managed=False)
    steps = by_step(await run(store))
    managed = steps[f"managed {MD}"]
    assert not managed.ok and "not an MDomain of this Apache" in managed.detail and "MDomain line" in managed.fix
    staged = steps[f"staged {MD}"]
    assert not staged.ok and staged.detail.startswith("refused: ") and "MDomain line" in staged.fix

    other = "other.example.test"
    storefactory.add_staged(store, other, [other], ca=storefactory.make_ca("a CA nobody configured"))
    staged = by_step(await run(store, md=other))[f"staged {other}"]
    assert not staged.ok and "does not verify to a trust anchor" in staged.detail
    assert "trust_anchors" in staged.fix


async def test_a_set_that_failed_before_and_another_certificate_served(tmp_path):
    store = storefactory.make_store(tmp_path)
    storefactory.add_active(store, MD, [MD])
    staged = storefactory.add_staged(store, MD, [MD])

    async def served(address, sni, timeout):
        # The staged one is served, but the store says the old one is active.
        return staged.certs["rsa"].cert.public_bytes(Encoding.DER)

    steps = by_step(await run(store, failed={MD: staged.fingerprint}, probes=("127.0.0.1:443",), served=served))
    staged_step = steps[f"staged {MD}"]
    assert not staged_step.ok and staged_step.fix == f"after fixing the cause: apache-restart request {MD}"
    assert steps["config test"].ok and "none configured" in steps["config test"].detail
    assert not steps[f"probe 127.0.0.1:443 ({MD})"].ok


async def test_a_missing_or_empty_store_stops_early(tmp_path):
    steps = await run(tmp_path / "nowhere", md="")
    assert [(s.step, s.ok) for s in steps] == [("store", False)]
    assert "is not a directory" in steps[0].detail and "MDStoreDir" in steps[0].fix
    empty = storefactory.make_store(tmp_path)
    steps = await run(empty, md="")
    assert [(s.step, s.ok) for s in steps] == [("store", False)]
    assert "holds no MD" in steps[0].detail


HOSTILE_CONFIGTEST = (sys.executable, "-c", "import sys; "
                      "sys.stdout.write('AH00526: \\x1b]0;owned\\x07\\x1b[2J\\x00<0>forged\\u202e'); exit(1)")


def control_free(text: str) -> bool:
    return not any(unicodedata.category(ch)[0] == "C" for ch in text)


async def test_the_reply_escapes_what_the_config_test_and_tls_said(tmp_path):
    store = storefactory.make_store(tmp_path)
    storefactory.add_active(store, MD, [MD])

    async def served(address, sni, timeout):
        raise ssl.SSLError(1, "bad \x1b[2J record\x00")

    steps = await run(store, configtest=HOSTILE_CONFIGTEST, probes=("127.0.0.1:443",), served=served)
    report = selftest.as_json(steps)
    texts = [v for s in report["steps"] for v in s.values() if isinstance(v, str)]
    assert texts and all(control_free(t) for t in texts), texts
    config = next(s for s in report["steps"] if s["step"] == "config test")
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x00<0>forged\\u202e" in config["detail"]
    json.dumps(report)  # and it goes over the bus as it is


async def test_store_reads_stay_off_the_event_loop(tmp_path):
    store = storefactory.make_store(tmp_path)
    storefactory.add_active(store, MD, [MD])
    storefactory.add_staged(store, MD, [MD])
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []

    class WatchedStore(Store):
        def __getattribute__(self, name):
            attr = super().__getattribute__(name)
            if name in ("list_mds", "managed_names", "check_staged", "active"):
                def watched(*args, **kwargs):
                    seen.append((name, threading.get_ident() == loop_thread))
                    return attr(*args, **kwargs)
                return watched
            return attr

    def running():
        seen.append(("apache_running", threading.get_ident() == loop_thread))
        return True, "pid 1"

    steps = await selftest.run(str(store), WatchedStore(str(store), anchors=storefactory.anchors()), MD, {}, (), 10.0,
                               (), running)
    assert all(s.ok for s in steps), steps
    assert {name for name, _ in seen} == {"list_mds", "managed_names", "check_staged", "active", "apache_running"}
    assert not any(on_loop for _, on_loop in seen), seen
