"""The Prometheus text file: written after each event and check, read back with the library's parser."""

from __future__ import annotations

import os
import stat

from prometheus_client.parser import text_string_to_metric_families

from broker import metrics
from broker.config import from_mapping
from broker.engine import Engine
from broker.served import Served
from broker.staging import Store
from broker.state import StateFile
from broker.verify import Verdict
from harness import storefactory
from tests.unit.test_engine import Clock, FakeApache

MD = "www.example.test"
PROBE = "127.0.0.1:8443"


def samples(path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = open(path).read()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_every_event_and_check_rewrites_the_file(tmp_path):
    store = storefactory.make_store(tmp_path)
    active = storefactory.add_active(store, MD, [MD])
    staged = storefactory.add_staged(store, MD, [MD])
    path = tmp_path / "metrics" / "apache-restart-broker.prom"
    path.parent.mkdir()
    clock = Clock()
    cfg = from_mapping({"md_store": str(store), "state_dir": str(tmp_path / "state"), "settle_seconds": 0,
                        "min_interval_seconds": 0, "verify_timeout_seconds": 0, "metrics_file": str(path),
                        "probe": [PROBE]})
    served_cert = active.certs["rsa"]

    async def prober(probes, names):
        return {md: [Served(PROBE, "rsa", served_cert.serial, served_cert.sha256, served_cert.not_before,
                            served_cert.not_after, (MD,))] for md in names}

    async def verifier(st, batch, probes, timeout):
        return Verdict(True, frozenset(batch), "1 MD active and served")

    engine = Engine(cfg, Store(str(store), anchors=storefactory.anchors()), FakeApache(store),
                    StateFile(str(tmp_path / "state")), clock=clock, prober=prober, verifier=verifier)
    assert not path.exists()
    await engine.request(MD, caller_uid=33)
    got = samples(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    prefix = "apache_restart_broker_"

    def cert(where, probe=""):
        return got[(prefix + "cert_not_after_timestamp_seconds",
                    (("key_type", "rsa"), ("md", MD), ("probe", probe), ("where", where)))]

    assert cert("active") == active.certs["rsa"].not_after
    assert cert("staged") == staged.certs["rsa"].not_after
    assert got[(prefix + "pending", ())] == 1
    assert got[(prefix + "staged_since_timestamp_seconds", (("md", MD),))] > 0
    assert got[(prefix + "restarts_total", (("result", "ok"),))] == 0
    assert got[(prefix + "last_restart_timestamp_seconds", ())] == 0

    await engine.restart_now()
    got = samples(path)
    assert got[(prefix + "pending", ())] == 0
    assert got[(prefix + "restarts_total", (("result", "ok"),))] == 1
    # No "_created" series: it would name the time of the write, not when counting began.
    assert not any(k[0].endswith("_created") for k in got)
    assert got[(prefix + "last_restart_timestamp_seconds", ())] == clock.t
    assert got[(prefix + "last_restart_success", ())] == 1
    # After the restart the staged set is the active one, and the probe was asked again.
    assert cert("active") == staged.certs["rsa"].not_after
    assert cert("served", PROBE) == served_cert.not_after
    assert got[(prefix + "served_behind", (("md", MD),))] == 0
    assert not any(k[0] == prefix + "staged_since_timestamp_seconds" for k in got)

    path.unlink()
    await engine.check()
    assert path.exists()  # a check writes it even when it schedules nothing


def test_a_node_serving_behind_the_store_is_a_metric(tmp_path):
    path = tmp_path / "m.prom"
    status = {"mds": [{"name": MD, "active": {"certs": []}, "served_behind": True},
                      {"name": "b.example.test", "active": {"certs": []}, "served_behind": False},
                      {"name": "c.example.test", "active": None, "served_behind": False}]}
    assert metrics.write(str(path), status, {})
    got = samples(path)
    assert got[("apache_restart_broker_served_behind", (("md", MD),))] == 1
    assert got[("apache_restart_broker_served_behind", (("md", "b.example.test"),))] == 0
    assert ("apache_restart_broker_served_behind", (("md", "c.example.test"),)) not in got


def test_label_values_are_escaped_by_the_library(tmp_path):
    path = tmp_path / "m.prom"
    status = {"mds": [{"name": MD, "served": [{"probe": '[::1]:443"\\\n', "error": "refused"}]}]}
    assert metrics.write(str(path), status, {"ok": 2, "failed": 1})
    got = samples(path)
    assert got[("apache_restart_broker_probe_error", (("md", MD), ("probe", '[::1]:443"\\\n')))] == 1
    assert got[("apache_restart_broker_restarts_total", (("result", "failed"),))] == 1


def test_an_unwritable_place_is_logged_not_fatal(tmp_path, capfd):
    assert metrics.write(str(tmp_path / "missing" / "m.prom"), {"mds": []}, {}) is False
    assert "could not write the metrics file" in capfd.readouterr().err
