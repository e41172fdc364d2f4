"""After a restart: did the staged certificate become the active one, and is it served?

No D-Bus here. mod_md activates a staged set inside the restart, or silently does not
(missing files leave it staged; a bad set is purged and the old one stays), and its log
says nothing at Debian's default level. So the store is asked, and optionally Apache itself
over TLS, until a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cryptography import x509

from . import log, timefmt
from .config import check_address
from .errors import BrokerError
from .staging import CertSet

# One hanging probe must not use up the whole verification window on its own.
PROBE_ATTEMPT_CAP = 5.0
# A last attempt made just before the deadline still needs time for a handshake.
PROBE_ATTEMPT_FLOOR = 0.2


T = TypeVar("T")


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


class _Store(Protocol):
    def staged_fingerprint(self, md: str) -> str | None: ...
    def active(self, md: str) -> CertSet | None: ...


def parse_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError when it is neither."""
    return check_address(address)


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # We compare fingerprints ourselves: a certificate that would not validate (a test CA,
    # a name mismatch on 127.0.0.1) is still exactly the one we want to recognise.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def served_certificate(address: str, server_name: str | None, timeout: float) -> bytes:
    """The DER of the leaf certificate served at `address` for SNI `server_name` (None: no SNI)."""
    host, port = parse_address(address)
    async with asyncio.timeout(timeout):
        # An empty server_hostname is asyncio's way of sending no SNI at all.
        _reader, writer = await asyncio.open_connection(
            host, port, ssl=_client_context(), server_hostname=server_name or ""
        )
        try:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        finally:
            # No TLS close_notify dance: the answer is in, and a slow peer must not delay us.
            writer.transport.abort()
    if not der:
        raise ssl.SSLError("the server sent no certificate")
    return der


@dataclass(frozen=True)
class Verdict:
    ok: bool
    activated: frozenset[str]   # MDs whose staged set is now active in domains/
    detail: str


def _sni_name(cset: CertSet) -> str | None:
    return next((n for n in cset.names if not n.startswith("*")), None)


def _serial_of(der: bytes) -> str:
    try:
        return format(x509.load_der_x509_certificate(der).serial_number, "x")
    except ValueError:
        return "?"


def _serials(cset: CertSet) -> str:
    return " or ".join(c.serial for c in cset.certs)


def _describe_error(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, OSError) and e.errno:
        # asyncio's strerror is "Connect call failed (...)"; the errno says why.
        return os.strerror(e.errno).lower()
    return str(e) or type(e).__name__


class _Watch:
    """One verification: which sets are active yet, and what each probe still serves wrongly.

    Kept as state between looks, so that a set once seen active is not read again and a probe
    that served the verified certificate is not asked again.
    """

    def __init__(self, store: _Store, batch: Mapping[str, CertSet], probes: Sequence[str],
                 timeout: float, deadline: float, monotonic: Callable[[], float],
                 run: Callable[..., Awaitable[Any]]) -> None:
        self.store, self.batch, self.probes, self.timeout = store, batch, probes, timeout
        self.deadline, self.monotonic, self.run = deadline, monotonic, run
        self.activated: set[str] = set()
        self.store_problem: dict[str, str] = {}
        self.probe_todo: dict[tuple[str, str], str] = {}  # (address, md) -> why not yet served
        self.sni: dict[str, str] = {}
        for md, cset in batch.items():
            name = _sni_name(cset)
            if name is None:
                if probes:
                    log.info(f"{md}: only wildcard names, not probed over TLS")
                continue
            self.sni[md] = name

    def check_store(self, md: str, cset: CertSet) -> str | None:
        """Why `cset` is not the active set of `md` yet (None: it is). Runs in a worker thread."""
        try:
            if self.store.staged_fingerprint(md) == cset.fingerprint:
                return f"still staged after {timefmt.seconds(self.timeout)} (mod_md did not activate it)"
            active = self.store.active(md)
        except BrokerError as e:
            return f"store check failed: {e.message}"
        except OSError as e:
            return f"store check failed: {e.strerror or e}"
        if active is None:
            return "no active certificate (mod_md rejected the set?)"
        if active.fingerprint != cset.fingerprint:
            # Either mod_md kept the old set, or staging was swapped after verification and
            # mod_md activated that: say what is active, not whose fault it is.
            return (f"activates serial {_serials(active)}, not the verified "
                    f"{_serials(cset)}")
        return None

    async def look_at_store(self) -> None:
        for md, cset in self.batch.items():
            if md in self.activated:
                continue
            problem = await self.run(self.check_store, md, cset)
            if problem is not None:
                self.store_problem[md] = problem
                continue
            self.activated.add(md)
            self.store_problem.pop(md, None)
            log.info(f"{md}: staged set is active")
            for address in self.probes:
                if md in self.sni:
                    self.probe_todo[(address, md)] = f"probe {address} ({md}): not tried"

    async def probe(self, address: str, md: str) -> None:
        cset = self.batch[md]
        attempt = min(PROBE_ATTEMPT_CAP, max(PROBE_ATTEMPT_FLOOR, self.deadline - self.monotonic()))
        try:
            der = await served_certificate(address, self.sni[md], attempt)
        except (OSError, ValueError, EOFError) as e:
            self.probe_todo[(address, md)] = f"probe {address} ({md}): {_describe_error(e)}"
            return
        if hashlib.sha256(der).hexdigest() in {c.sha256 for c in cset.certs}:
            del self.probe_todo[(address, md)]
            log.info(f"probe {address} ({md}): serves serial {_serial_of(der)}")
        else:
            self.probe_todo[(address, md)] = (
                f"probe {address} ({md}): serves serial {_serial_of(der)}, not the verified {_serials(cset)}")

    async def look(self) -> bool:
        """One look at the store and the probes still to do; True when everything is done."""
        await self.look_at_store()
        if self.probe_todo:
            await asyncio.gather(*(self.probe(address, md) for address, md in list(self.probe_todo)))
        return not self.store_problem and not self.probe_todo

    def success(self) -> Verdict:
        probed = " and served" if self.probes and self.sni else ""
        count = f"{len(self.batch)} MD" + ("" if len(self.batch) == 1 else "s")
        return Verdict(True, frozenset(self.activated), f"{count} active{probed}")

    def failure(self) -> Verdict:
        """The problems in a stable order: store first (in batch order), then each probe."""
        problems = [f"{md}: {self.store_problem[md]}" for md in self.batch if md in self.store_problem]
        order = {md: i for i, md in enumerate(self.batch)}
        problems += [self.probe_todo[key] for key in
                     sorted(self.probe_todo, key=lambda k: (order[k[1]], self.probes.index(k[0])))]
        detail = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        for problem in problems:
            log.warning(f"verification: {problem}")
        return Verdict(False, frozenset(self.activated), detail)


async def verify_activation(
    store: _Store,
    batch: Mapping[str, CertSet],
    probes: Sequence[str],
    timeout: float,
    poll: float = 0.2,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    run: Callable[..., Awaitable[Any]] = _in_thread,
) -> Verdict:
    """Poll the store (and the probes) until every set in `batch` is active and served.

    Always looks at least once, so timeout 0 answers "what is active right now". Store reads
    go through `run` (a worker thread): a slow store must not block the event loop.
    """
    deadline = monotonic() + timeout
    watch = _Watch(store, batch, probes, timeout, deadline, monotonic, run)
    while not await watch.look():
        remaining = deadline - monotonic()
        if remaining <= 0:
            return watch.failure()
        await sleep(min(poll, remaining))
    return watch.success()
