"""End to end: real Apache with mod_md, pebble, the real broker on a private bus with the real
polkitd, and the real hook run by mod_md as www-data. No test restarts Apache itself: every
certificate seen on the wire got there through mod_md → hook → broker → graceful restart.

Stacks are shared where the scenarios follow each other naturally (first certificate, renewals,
load across a renewal, a broken config at renewal time). The measured times from the hook's
``renewed`` to the new serial on the wire are printed (``pytest -s``) and recorded as properties.
"renewed" is when mod_md logged the hook's answer (Apache's error log, microseconds), i.e. when
the hook returned after the broker took the request; "served" is the first TLS handshake on the
HTTPS port (polled every 20 ms) that presents the new serial.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from harness import CertInfo, Stack, marked_pids, running_stack
from harness.broker import BusWatcher, hook_lines
from broker.chain import TrustAnchors
from broker.errors import StagingInvalid
from broker.staging import Store
from harness.procs import wait_for
from harness import storefactory

pytestmark = pytest.mark.e2e

MD = "www.example.test"
# A short lifetime with a renew window of most of it: mod_md renews about 8 s after each issue.
VALIDITY = 30
RENEW_WINDOW = "22s"
# mod_md's first order includes making its ACME account (seconds of key generation).
FIRST_CERT_TIMEOUT = 45
RENEWAL_TIMEOUT = 30

# What the scenarios measured, printed again at the end of the module.
TIMINGS: dict[str, list[float]] = {}


def note_timing(name: str, value: float, record: Callable[[str, object], None] | None = None) -> None:
    TIMINGS.setdefault(name, []).append(value)
    print(f"{name}: {value:.3f} s")
    if record is not None:
        record(name.replace(" ", "_"), round(value, 3))


@pytest.fixture(scope="module", autouse=True)
def _print_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        print("\nmeasured times (s):")
        for name, values in TIMINGS.items():
            print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values))


# -- helpers -----------------------------------------------------------------------------------


def watcher(stack: Stack) -> BusWatcher:
    assert stack.broker is not None and stack.broker.watcher is not None
    return stack.broker.watcher


def served(stack: Stack, name: str = MD) -> CertInfo | None:
    assert stack.apache is not None
    try:
        return stack.apache.served_certificate(name, timeout=2)
    except OSError:
        return None


def wait_served_change(stack: Stack, old_serial: int, timeout: float, name: str = MD) -> tuple[CertInfo, float]:
    """Poll the HTTPS port until it serves another serial than ``old_serial``: (cert, epoch time)."""

    def changed() -> tuple[CertInfo, float] | None:
        cert = served(stack, name)
        return (cert, time.time()) if cert is not None and cert.serial != old_serial else None

    try:
        found = wait_for(changed, timeout, f"a new certificate for {name}", interval=0.02)
    except Exception as e:
        raise AssertionError(f"{e}; broker events: {watcher(stack).events}") from None
    assert found is not None
    return found


def renewed_hook_time(stack: Stack, md: str, before: float) -> float:
    """When mod_md logged the hook's answer to its last ``renewed`` for ``md`` before ``before``."""
    assert stack.apache is not None
    lines = hook_lines(stack.apache.error_log)
    times = [h.time for h in lines if h.reason == "renewed" and h.md == md and "restart planned" in h.text]
    earlier = [t for t in times if t <= before + 0.001]
    assert earlier, f"no delivered renewed hook call for {md} in Apache's log: {lines}"
    return max(earlier)


def hook_failures(stack: Stack, md: str) -> list[str]:
    assert stack.apache is not None
    return [
        h.text
        for h in hook_lines(stack.apache.error_log)
        if h.reason == "renewed" and h.md == md and "mod_md will retry" in h.text
    ]


def is_fallback(cert: CertInfo | None) -> bool:
    return cert is not None and "Fallback" in cert.subject and cert.issuer == cert.subject


def assert_from_pebble(stack: Stack, cert: CertInfo, name: str = MD) -> None:
    assert stack.pebble is not None
    issuer = stack.pebble.issuer_certificate()
    assert cert.issuer == issuer.subject.rfc4514_string()
    cert.certificate().verify_directly_issued_by(issuer)
    assert name in cert.dns_names


def requested_serials(stack: Stack, md: str) -> list[str]:
    """Staged serials the broker scheduled a restart for (its log), in order."""
    assert stack.broker is not None
    prefix = f"{md}: restart requested for staged serial "
    return [line[len(prefix) :].split(" ")[0] for line in stack.broker.log_lines() if line.startswith(prefix)]


def finished_after(stack: Stack, mark: int, timeout: float) -> Any:
    return watcher(stack).restart_finished(timeout, since=mark)


@pytest.fixture
def shared_logs(request: pytest.FixtureRequest) -> Callable[[Stack], Stack]:
    """Attach a shared stack to the running test, so its logs go into the report when it fails."""

    def attach(stack: Stack) -> Stack:
        request.node.harness_stacks = [*getattr(request.node, "harness_stacks", []), stack]
        return stack

    return attach



# -- HTTPS load ------------------------------------------------------------------------------------


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Tally:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    serials: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def success(self, serial: int | None) -> None:
        with self.lock:
            self.ok += 1
            if serial is not None:
                self.serials.add(serial)

    def failure(self, what: str) -> None:
        with self.lock:
            self.failures.append(f"{time.time():.3f} {what}")


class _SNIConnection(http.client.HTTPSConnection):
    """Keep-alive HTTPS to 127.0.0.1 with the MD's name as SNI."""

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = _client_context().wrap_socket(raw, server_hostname=MD)


class Load:
    """HTTPS GET / from threads: ``one_shot`` clients open a connection per request, ``keep_alive``
    clients reuse theirs (and open a new one after an error)."""

    def __init__(self, port: int, one_shot: int, keep_alive: int) -> None:
        self.port = port
        self.one_shot = Tally()
        self.keep_alive = Tally()
        self.keep_alive_connections = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._one_shot, daemon=True) for _ in range(one_shot)]
        self._threads += [threading.Thread(target=self._keep_alive, daemon=True) for _ in range(keep_alive)]
        self.started = self.stopped = 0.0

    def __enter__(self) -> Load:
        self.started = time.time()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.stopped = time.time()

    def _one_shot(self) -> None:
        ctx = _client_context()
        request = f"GET / HTTP/1.1\r\nHost: {MD}\r\nConnection: close\r\n\r\n".encode()
        while not self._stop.is_set():
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname=MD) as tls,
                ):
                    der = tls.getpeercert(binary_form=True)
                    tls.sendall(request)
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
                status = data.split(b"\r\n", 1)[0].decode(errors="replace")
                if status.split(" ")[1:2] != ["200"]:
                    self.one_shot.failure(f"status {status!r}")
                else:
                    self.one_shot.success(CertInfo.from_der(der).serial if der else None)
            except (OSError, ssl.SSLError) as e:
                self.one_shot.failure(f"{type(e).__name__}: {e}")

    def _keep_alive(self) -> None:
        conn = _SNIConnection("127.0.0.1", self.port, timeout=5)
        self.keep_alive_connections += 1
        try:
            while not self._stop.is_set():
                try:
                    conn.request("GET", "/", headers={"Host": MD})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        self.keep_alive.failure(f"status {resp.status}")
                        continue
                    der = conn.sock.getpeercert(binary_form=True) if conn.sock is not None else None
                    self.keep_alive.success(CertInfo.from_der(der).serial if der else None)
                except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                    self.keep_alive.failure(f"{type(e).__name__}: {e}")
                    conn.close()
                    self.keep_alive_connections += 1
        finally:
            conn.close()

    def report(self) -> str:
        seconds = max(0.001, self.stopped - self.started)
        one, keep = self.one_shot, self.keep_alive
        lines = [
            f"load over {seconds:.1f} s: connection per request: {one.ok} ok, {len(one.failures)} failed "
            f"({one.ok / seconds:.0f}/s); keep-alive: {keep.ok} ok, {len(keep.failures)} failed "
            f"over {self.keep_alive_connections} connections",
        ]
        lines += [f"  keep-alive error: {f}" for f in keep.failures[:10]]
        lines += [f"  per-request error: {f}" for f in one.failures[:10]]
        return "\n".join(lines)


@dataclass
class SharedStack:
    stack: Stack
    started: float  # epoch time the stack was up (Apache answering)
    fallback: CertInfo | None  # what the HTTPS port served right after the start
    state: dict[str, Any] = field(default_factory=dict)  # what one test leaves for the next


@contextmanager
def shared_stack(**options: Any) -> Iterator[SharedStack]:
    with running_stack(**options) as stack:
        started = time.time()
        yield SharedStack(stack, started, served(stack))
    assert stack.leftovers == [], "the stack's teardown left processes for the final sweep"
    assert marked_pids(stack.run_id) == []


# -- 1, 2, 7, 4: one MD with a short lifetime ----------------------------------------------------


@pytest.fixture(scope="class")
def renewing() -> Iterator[SharedStack]:
    with shared_stack(
        domains=[[MD]], validity_seconds=VALIDITY, renew_window=RENEW_WINDOW, with_broker=True
    ) as shared:
        yield shared


class TestOneRenewingMD:
    """First certificate, renewals, load across a renewal, a broken config at renewal time."""

    @pytest.fixture
    def s(self, renewing: SharedStack, shared_logs: Callable[[Stack], Stack]) -> SharedStack:
        shared_logs(renewing.stack)
        return renewing

    def test_first_certificate_is_served_without_a_step(
        self, s: SharedStack, record_property: Callable[[str, object], None]
    ) -> None:
        stack = s.stack
        broker, apache = stack.broker, stack.apache
        assert broker is not None and apache is not None
        # Until mod_md has a certificate, Apache serves its self-signed fallback.
        assert is_fallback(s.fallback), s.fallback
        cert, served_at = wait_served_change(stack, s.fallback.serial, FIRST_CERT_TIMEOUT)
        assert_from_pebble(stack, cert)
        renewed_at = renewed_hook_time(stack, MD, served_at)
        note_timing("first certificate: renewed to served", served_at - renewed_at, record_property)
        note_timing("first certificate: stack up to served", served_at - s.started, record_property)

        finished = watcher(stack).restart_finished(15)
        # One MD, probed on the HTTPS port (the harness's default broker config).
        assert finished.values == {"ok": True, "detail": "1 MD active and served", "names": [MD]}
        props = watcher(stack).properties()
        assert props["LastResult"] == "ok"
        assert props["Pending"] is False and props["PlannedAt"] == 0
        assert props["LastRestart"] > 0
        assert len(broker.gracefuls()) == 1
        # The hook ran as www-data and polkit let it (the broker logs the caller's uid).
        assert any(line.startswith(f"request from uid 33 for {MD} accepted") for line in broker.log_lines())
        assert requested_serials(stack, MD) == [format(cert.serial, "x")]
        # mod_md agrees, and so does the admin command (as root).
        assert apache.md_status(MD)["cert"]["rsa"]["serial"] == cert.serial_hex
        status = broker.status()
        (entry,) = status["mds"]
        assert entry["name"] == MD and entry["active"]["certs"][0]["serial"] == format(cert.serial, "x")
        assert status["last_result"] == "ok"
        s.state["serial"] = cert.serial

    def test_renewals_rotate_without_a_step(
        self, s: SharedStack, record_property: Callable[[str, object], None]
    ) -> None:
        stack = s.stack
        assert stack.broker is not None
        serial = s.state.get("serial") or wait_served_change(stack, s.fallback.serial, FIRST_CERT_TIMEOUT)[0].serial
        previous = served(stack)
        assert previous is not None and previous.serial == serial
        gracefuls = len(stack.broker.gracefuls())
        for _ in range(2):
            mark = watcher(stack).snapshot()
            cert, served_at = wait_served_change(stack, serial, RENEWAL_TIMEOUT)
            assert_from_pebble(stack, cert)
            assert cert.not_before >= previous.not_before
            renewed_at = renewed_hook_time(stack, MD, served_at)
            note_timing("renewal: renewed to served", served_at - renewed_at, record_property)
            finished = finished_after(stack, mark, 15)
            assert finished.values["ok"] is True and finished.values["names"] == [MD]
            gracefuls += 1
            assert len(stack.broker.gracefuls()) == gracefuls, "one graceful restart per renewal"
            previous, serial = cert, cert.serial
        assert watcher(stack).properties()["LastResult"] == "ok"
        s.state["serial"] = serial

    def test_load_across_a_broker_driven_graceful(
        self, s: SharedStack, record_property: Callable[[str, object], None]
    ) -> None:
        stack = s.stack
        assert stack.broker is not None
        before = served(stack)
        assert before is not None and not is_fallback(before)
        gracefuls = len(stack.broker.gracefuls())
        mark = watcher(stack).snapshot()
        with Load(stack.https_port, one_shot=4, keep_alive=2) as load:
            time.sleep(0.5)
            cert, _ = wait_served_change(stack, before.serial, RENEWAL_TIMEOUT)
            finished_after(stack, mark, 15)
            time.sleep(1.0)
        assert len(stack.broker.gracefuls()) == gracefuls + 1
        report = load.report()
        print(report)
        record_property("load", report)
        # With a connection per request, nobody notices the graceful restart...
        assert load.one_shot.failures == [], load.one_shot.failures[:5]
        assert load.one_shot.ok > 50
        # ... and the load really spanned it: both certificates were handed out.
        assert {before.serial, cert.serial} <= load.one_shot.serials
        # Keep-alive clients may see their idle connection closed (reported above); they get
        # through again on a new one.
        assert load.keep_alive.ok > 10
        assert cert.serial in load.keep_alive.serials
        s.state["serial"] = cert.serial

    def test_broken_config_blocks_the_restart_until_fixed_then_the_broker_retries(
        self, s: SharedStack, record_property: Callable[[str, object], None]
    ) -> None:
        stack = s.stack
        broker, apache = stack.broker, stack.apache
        assert broker is not None and apache is not None
        w = watcher(stack)
        before = served(stack)
        assert before is not None and not is_fallback(before)
        # Wait until the last restart's verification is over, then break the config on disk.
        wait_for(lambda: not w.properties()["Pending"], 15, "no pending restart")
        gracefuls = len(broker.gracefuls())
        mark = w.snapshot()
        good_config = apache.conf_path.read_text()
        apache.conf_path.write_text(good_config + "\nThisIsNotAnApacheDirective on\n")
        try:
            finished = finished_after(stack, mark, RENEWAL_TIMEOUT)
            assert finished.values["ok"] is False
            assert finished.values["names"] == [MD]
            assert finished.values["detail"].startswith("config test failed"), finished.values
            assert "Syntax error" in finished.values["detail"]
            props = w.properties()
            assert props["LastResult"] == "failed: " + finished.values["detail"]
            # Held back, not dropped: a retry is scheduled, and status says why and what to run.
            assert props["Pending"] is True and props["PlannedAt"] > 0
            status = broker.status()
            assert status["waiting_for"] == "retry" and status["retry"]["attempts"] >= 1
            assert status["retry"]["reason"].startswith("config test failed")
            # The result is paired with its own time, not with the earlier restart's.
            assert status["last_result_usec"] > status["last_restart_usec"] > 0
            text = broker.admin("status")
            assert text.returncode == 0, text.stderr
            print(text.stdout)
            record_property("status_while_held_back", text.stdout)
            assert "HELD BACK after attempt" in text.stdout, text.stdout
            assert f"retry now with: apache-restart request {MD}" in text.stdout, text.stdout
            # No restart happened: the old certificate is still served, the new one is staged.
            assert len(broker.gracefuls()) == gracefuls
            assert apache.pid() is not None
            staged = apache.staged_certificate(MD)
            assert staged is not None and staged.serial != before.serial
            still = served(stack)
            assert still is not None and still.serial == before.serial
        finally:
            apache.conf_path.write_text(good_config)
        fixed_at = time.time()
        # Fixed: nobody calls anything; the broker's own retry activates the staged set.
        cert, served_at = wait_served_change(stack, before.serial, 30)
        note_timing("config fixed to served (the broker's retry)", served_at - fixed_at, record_property)
        assert cert.serial == staged.serial
        finished = wait_for(lambda: w.properties()["LastResult"] == "ok" or None, 15, "LastResult ok")
        assert finished
        assert len(broker.gracefuls()) == gracefuls + 1
        status = broker.status()
        assert status["retry"] is None and status["last_result"] == "ok"
        assert any("held back (config test failed" in line and f"apache-restart request {MD}" in line
                   for line in broker.log_lines())


# -- 3: several MDs renewed together --------------------------------------------------------------

MANY = [f"www{i}.example.test" for i in range(1, 4)]


@pytest.fixture(scope="class")
def many() -> Iterator[SharedStack]:
    with shared_stack(domains=[[md] for md in MANY], with_broker=True) as shared:
        stack = shared.stack
        deadline = time.monotonic() + FIRST_CERT_TIMEOUT + 15
        for md in MANY:
            wait_for(
                lambda md=md: (c := served(stack, md)) is not None and not is_fallback(c),
                max(1.0, deadline - time.monotonic()),
                f"a certificate for {md}",
                interval=0.05,
            )
        # Let anything still planned happen (a second restart would show up here).
        wait_for(lambda: not watcher(stack).properties()["Pending"], 15, "no pending restart")
        time.sleep(3.0)
        yield shared


class TestSeveralMDs:
    @pytest.fixture
    def s(self, many: SharedStack, shared_logs: Callable[[Stack], Stack]) -> SharedStack:
        shared_logs(many.stack)
        return many

    def test_all_renewed_mds_are_activated(self, s: SharedStack) -> None:
        stack = s.stack
        assert stack.broker is not None
        for md in MANY:
            cert = served(stack, md)
            assert cert is not None
            assert_from_pebble(stack, cert, md)
        finished = watcher(stack).finished_events()
        assert finished and all(e.values["ok"] for e in finished), finished
        assert sorted(md for e in finished for md in e.values["names"]) == MANY
        print(f"{len(stack.broker.gracefuls())} graceful restart(s) for {len(MANY)} MDs: "
              + "; ".join(", ".join(e.values["names"]) for e in finished))

    def test_exactly_one_graceful_restart(self, s: SharedStack) -> None:
        stack = s.stack
        assert stack.broker is not None
        assert len(stack.broker.gracefuls()) == 1, [e.values for e in watcher(stack).finished_events()]


# -- 6 and 5: the broker is down when mod_md's renewed fires --------------------------------------


def start_with_broker_down(start_stack: Callable[..., Stack]) -> Stack:
    """A stack whose broker is stopped before Apache (and so mod_md) starts."""
    stack = start_stack(domains=[[MD]], with_broker=True, start_apache=False)
    assert stack.broker is not None and stack.apache is not None
    stack.broker.stop()
    stack.apache.start()
    return stack


def wait_failed_hook(stack: Stack, count: int, timeout: float) -> list[str]:
    found = wait_for(
        lambda: (lines := hook_failures(stack, MD)) and len(lines) >= count and lines,
        timeout,
        f"{count} failed renewed hook call(s)",
        interval=0.05,
    )
    assert found
    return list(found)


def test_broker_down_when_renewed_fires(
    start_stack: Callable[..., Stack], record_property: Callable[[str, object], None]
) -> None:
    stack = start_with_broker_down(start_stack)
    broker, apache = stack.broker, stack.apache
    assert broker is not None and apache is not None
    staged = apache.wait_staged(MD, timeout=FIRST_CERT_TIMEOUT, notified=False)
    # The hook could not deliver, said why, and mod_md calls it again (MDRetryDelay 1 s, doubling).
    failures = wait_failed_hook(stack, 2, 15)
    assert "broker not reachable" in failures[0], failures
    assert not (apache.job(MD) or {}).get("notified-renewed")
    assert is_fallback(served(stack))

    back_at = time.time()
    broker.start()
    cert, served_at = wait_served_change(stack, served(stack).serial, 30)  # type: ignore[union-attr]
    assert cert.serial == staged.serial, "the set staged while the broker was down is the one activated"
    assert_from_pebble(stack, cert)
    note_timing("broker down: broker back to served", served_at - back_at, record_property)
    note_timing("broker down: renewed (retried) to served", served_at - renewed_hook_time(stack, MD, served_at),
                record_property)
    finished = watcher(stack).restart_finished(15)
    assert finished.values["ok"] is True and finished.values["names"] == [MD]
    assert watcher(stack).properties()["LastResult"] == "ok"
    assert len(broker.gracefuls()) == 1


def swap_staged_key(apache: Any, md: str) -> None:
    """Replace staging/<md>/privkey.pem by another RSA key, encrypted as mod_md writes it."""
    path = apache.staging_dir(md) / "privkey.pem"
    st = path.stat()
    passphrase = storefactory.store_passphrase(apache.store_dir)
    data = storefactory.key_pem(storefactory.new_key("rsa"), passphrase)
    tmp = path.with_name("privkey.pem.swap")
    tmp.write_bytes(data)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, st.st_mode & 0o777)
    os.replace(tmp, path)


def test_a_swapped_staged_key_is_refused_before_any_restart(start_stack: Callable[..., Stack]) -> None:
    stack = start_with_broker_down(start_stack)
    broker, apache = stack.broker, stack.apache
    assert broker is not None and apache is not None
    staged = apache.wait_staged(MD, timeout=FIRST_CERT_TIMEOUT, notified=False)
    wait_failed_hook(stack, 1, 15)
    # mod_md's real set passes the broker's checks as they are: its chain verifies to pebble's
    # root (the broker's only trust anchor here) and its key, which mod_md encrypted with the
    # store's key from md_store.json, decrypts and matches the leaf.
    store = Store(str(apache.store_dir), anchors=TrustAnchors.load([str(broker.trust_anchors)]))
    assert store.check_staged(MD).certs[0].serial == format(staged.serial, "x")
    key_file = apache.staging_dir(MD) / "privkey.pem"
    real_key = key_file.read_bytes()
    # Another key, encrypted as mod_md writes it: mod_md would purge the set at the restart (and
    # keep serving the old certificate); the broker refuses it before restarting.
    swap_staged_key(apache, MD)
    with pytest.raises(StagingInvalid) as refused:
        store.check_staged(MD)
    assert refused.value.check == "key-mismatch"
    fallback = served(stack)
    assert is_fallback(fallback)

    broker.start()
    # mod_md calls the hook again; the broker refuses, and the hook reports it as delivered.
    refusal = wait_for(
        lambda: [h.text for h in hook_lines(apache.error_log)
                 if h.reason == "renewed" and h.md == MD and "StagingInvalid: key-mismatch" in h.text],
        40, "the hook's refusal line", interval=0.1)
    assert refusal and "not retried" in refusal[0], refusal
    assert broker.gracefuls() == []
    assert watcher(stack).properties()["Pending"] is False
    assert served(stack).serial == fallback.serial  # type: ignore[union-attr]

    # With mod_md's own key back, root's request activates exactly that set.
    st = key_file.stat()
    swap = key_file.with_name("privkey.pem.back")
    swap.write_bytes(real_key)
    os.chown(swap, st.st_uid, st.st_gid)
    os.chmod(swap, st.st_mode & 0o777)
    os.replace(swap, key_file)
    mark = watcher(stack).snapshot()
    watcher(stack).request(MD)
    cert, _ = wait_served_change(stack, fallback.serial, 30)  # type: ignore[union-attr]
    assert cert.serial == staged.serial
    assert_from_pebble(stack, cert)
    assert finished_after(stack, mark, 15).values["ok"] is True
    assert len(broker.gracefuls()) == 1
