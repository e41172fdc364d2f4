"""Two Apache servers sharing one MD store (mod_md's cluster setup), each with its own broker.

Node a renews (``MDRenewMode auto``), has the hook and its broker; node b is ``manual``, shares
``MDStoreDir`` (``MDStoreLocks on`` on both), has its own broker on its own bus and gets no hook
call. When a's broker restarts a, mod_md on a moves the renewed set from staging/ to domains/,
and b keeps serving the old certificate: only b's CheckAll (its check timer) can notice, by
probing b, and restart b. A third node c, whose probe address is a server that b's kind of
restart does not change, shows that such a restart is made once and not repeated.

Printed (``pytest -s``): the time from a's restart (RestartFinished on a's bus) to b serving the
new certificate, and from b's CheckAll to that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import admin, monitor
from harness import CertInfo, Stack
from harness.certs import CertificateServer
from harness.broker import BrokerOptions, BusWatcher
from harness.node import Node, add_node
from harness.procs import wait_for
from harness import storefactory

pytestmark = pytest.mark.e2e

MD = "www.example.test"
# One renewal about 20 s after each issue: long enough for the second node to come up on the
# first certificate and to catch up with the second before a third one is staged.
VALIDITY = 60
RENEW_WINDOW = "40s"
FIRST_CERT_TIMEOUT = 45
RENEWAL_TIMEOUT = 40


def served(apache, timeout: float = 2) -> CertInfo | None:
    try:
        return apache.served_certificate(MD, timeout=timeout)
    except OSError:
        return None


def wait_serving(apache, accept: Callable[[CertInfo], bool], timeout: float, what: str) -> tuple[CertInfo, float]:
    def check() -> tuple[CertInfo, float] | None:
        cert = served(apache)
        return (cert, time.time()) if cert is not None and accept(cert) else None

    found = wait_for(check, timeout, what, interval=0.02)
    assert found is not None
    return found


def watcher_of(broker) -> BusWatcher:
    assert broker is not None and broker.watcher is not None
    return broker.watcher


@pytest.fixture
def old_server(www_tmp: Path) -> Iterator[CertificateServer]:
    """Keeps serving an older certificate for MD, whatever restarts: what a probe address in
    front of something else than this node's Apache shows."""
    issued = storefactory.issue([MD], not_before=time.time() - 30 * 86400)
    with CertificateServer(www_tmp, issued, "old") as server:
        yield server


def metric(path: Path, name: str, **labels: str) -> float | None:
    """A sample of b's metrics file, read with the Prometheus library's own parser."""
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            if sample.name == f"apache_restart_broker_{name}" and sample.labels == labels:
                return float(sample.value)
    return None


def test_the_other_node_serves_what_the_renewing_node_activated(
        start_stack: Callable[..., Stack], old_server: CertificateServer, www_tmp: Path,
        record_property: Callable[[str, object], None]) -> None:
    stack = start_stack(domains=[[MD]], validity_seconds=VALIDITY, renew_window=RENEW_WINDOW,
                        with_broker=True, renew_mode="auto", store_locks="on")
    a = stack.apache
    assert a is not None and stack.broker is not None
    a_watch = watcher_of(stack.broker)
    first, _ = wait_serving(a, lambda c: "Fallback" not in c.subject, FIRST_CERT_TIMEOUT,
                            "node a to serve its first certificate")

    # Node b joins the cluster: it comes up on the store's current set.
    b_metrics = www_tmp / "b-metrics.prom"
    b: Node = add_node(stack, "b", broker_options=BrokerOptions(
        verify_timeout_seconds=10.0, extra={"metrics_file": str(b_metrics)}))
    wait_serving(b.apache, lambda c: c.serial == first.serial, 10, "node b to serve the first certificate")
    # Node c's probe address is a server that no restart of c changes.
    c: Node = add_node(stack, "c", broker_options=BrokerOptions(
        verify_timeout_seconds=2.0, extra={"probe": [old_server.address]}))
    b_watch, c_watch = watcher_of(b.broker), watcher_of(c.broker)
    assert b.broker is not None and c.broker is not None

    # mod_md on a renews; a's broker restarts a, which activates the set for the whole store.
    mark = a_watch.snapshot()
    a_finished = a_watch.restart_finished(RENEWAL_TIMEOUT, since=mark)
    assert a_finished.ok, a_finished
    second, _ = wait_serving(a, lambda c: c.serial != first.serial, 10, "node a to serve the renewal")
    active = storefactory.read_active_fingerprint(a.store_dir, MD)
    assert active is not None and storefactory.read_staged_fingerprint(a.store_dir, MD) is None
    # b is behind the store now, and says so in its status.
    assert served(b.apache).serial == first.serial  # type: ignore[union-attr]
    status = b_watch.get_status()
    (entry,) = status["mds"]
    assert entry["active"]["certs"][0]["serial"] == format(second.serial, "x")
    assert [(s["probe"], s["serial"]) for s in entry["served"]] == [(b.https_address, format(first.serial, "x"))]
    assert entry["served_behind"] is True and entry["served_behind_failed"] is False
    # GetStatus rewrote b's metrics file: what b serves, and that it is behind.
    assert metric(b_metrics, "served_behind", md=MD) == 1
    assert metric(b_metrics, "cert_not_after_timestamp_seconds", md=MD, key_type="rsa", where="served",
                  probe=b.https_address) == first.not_after.timestamp()
    print("b's metrics file while behind:\n" + b_metrics.read_text())
    assert b.broker.gracefuls() == []
    # What an admin on b sees (apache-restart status; the check plugin), printed for the record.
    print("\nb behind the store, apache-restart status:\n" + admin.render_status(status, {}))
    print("b behind the store, apache-restart check: " + monitor.evaluate(status, time.time()).line())

    # b's check timer: CheckAll notices and restarts b, which then serves the store's set.
    checked = time.time()
    scheduled, planned = b_watch.check_all()
    assert scheduled == [MD] and planned > 0
    b_cert, b_served_at = wait_serving(b.apache, lambda c: c.serial == second.serial, 30,
                                       "node b to serve the renewal")
    b_finished = b_watch.restart_finished(15)
    assert b_finished.ok, b_finished
    took, after_check = b_served_at - a_finished.time, b_served_at - checked
    print(f"\na restarted (renewal activated) -> b serves it: {took:.3f} s "
          f"(CheckAll on b -> served: {after_check:.3f} s)")
    record_property("a_activated_to_b_served_s", round(took, 3))
    record_property("b_check_to_served_s", round(after_check, 3))
    assert any("served behind the store" in line for line in b.broker.log_lines())

    # Nobody restarts again for this state.
    assert b_watch.check_all() == ([], 0)
    assert a_watch.check_all()[0] == []
    assert len(b.broker.gracefuls()) == 1
    (entry,) = b_watch.get_status()["mds"]
    assert entry["served"][0]["serial"] == format(second.serial, "x") and entry["served_behind"] is False
    assert metric(b_metrics, "served_behind", md=MD) == 0
    assert metric(b_metrics, "restarts_total", result="ok") == 1

    # c: its probe keeps showing an older certificate; one restart, then never again for it.
    scheduled, _ = c_watch.check_all()
    assert scheduled == [MD]
    c_finished = c_watch.restart_finished(30)
    assert not c_finished.ok and old_server.issued.serial in c_finished.values["detail"], c_finished
    assert len(c.broker.gracefuls()) == 1
    assert c_watch.check_all() == ([], 0)
    assert any("a restart did not change that before; not restarted again" in line
               for line in c.broker.log_lines())
    assert len(c.broker.gracefuls()) == 1
    assert len(b.broker.gracefuls()) == 1
