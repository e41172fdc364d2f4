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
    activated: set[str] = set()
    store_problem: dict[str, str] = {}
    # (address, md) -> why it is not yet served correctly
    probe_todo: dict[tuple[str, str], str] = {}
    sni: dict[str, str] = {}
    for md, cset in batch.items():
        name = _sni_name(cset)
        if name is None:
            if probes:
                log.info(f"{md}: only wildcard names, not probed over TLS")
            continue
        sni[md] = name

    def check_store(md: str, cset: CertSet) -> str | None:
        try:
            if store.staged_fingerprint(md) == cset.fingerprint:
                return f"still staged after {timefmt.seconds(timeout)} (mod_md did not activate it)"
            active = store.active(md)
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

    async def probe(address: str, md: str) -> None:
        cset = batch[md]
        attempt = min(PROBE_ATTEMPT_CAP, max(PROBE_ATTEMPT_FLOOR, deadline - monotonic()))
        try:
            der = await served_certificate(address, sni[md], attempt)
        except (OSError, ValueError, EOFError) as e:
            probe_todo[(address, md)] = f"probe {address} ({md}): {_describe_error(e)}"
            return
        if hashlib.sha256(der).hexdigest() in {c.sha256 for c in cset.certs}:
            del probe_todo[(address, md)]
            log.info(f"probe {address} ({md}): serves serial {_serial_of(der)}")
        else:
            probe_todo[(address, md)] = (
                f"probe {address} ({md}): serves serial {_serial_of(der)}, not the verified {_serials(cset)}")

    while True:
        for md, cset in batch.items():
            if md in activated:
                continue
            problem = await run(check_store, md, cset)
            if problem is None:
                activated.add(md)
                store_problem.pop(md, None)
                log.info(f"{md}: staged set is active")
                for address in probes:
                    if md in sni:
                        probe_todo[(address, md)] = f"probe {address} ({md}): not tried"
            else:
                store_problem[md] = problem
        if probe_todo:
            await asyncio.gather(*(probe(address, md) for address, md in list(probe_todo)))
        if not store_problem and not probe_todo:
            probed = " and served" if probes and sni else ""
            count = f"{len(batch)} MD" + ("" if len(batch) == 1 else "s")
            return Verdict(True, frozenset(activated), f"{count} active{probed}")
        remaining = deadline - monotonic()
        if remaining <= 0:
            break
        await sleep(min(poll, remaining))

    problems = [f"{md}: {store_problem[md]}" for md in batch if md in store_problem]
    order = {md: i for i, md in enumerate(batch)}
    problems += [probe_todo[key] for key in sorted(probe_todo, key=lambda k: (order[k[1]], probes.index(k[0])))]
    detail = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    for problem in problems:
        log.warning(f"verification: {problem}")
    return Verdict(False, frozenset(activated), detail)
