"""The broker's half of `apache-restart test`: checks of the whole path that change nothing.

No D-Bus here. Each check is one step with a verdict, a sentence, and what to fix; the admin
command adds the steps only it can take (the hook run as the Apache user, the bus policy and
polkit for that user) and prints one line per step. Nothing is scheduled or restarted: the
config test is Apache's own read-only check, and a probe is one TLS handshake.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import BrokerError, NothingStaged, StagingInvalid
from .restart import config_test
from .staging import CertSet, Store, validate_md_name
from .text import safe
from .verify import served_certificate

PROBE_TIMEOUT = 5.0
# Probes and MDs looked at in one run: the store may hold many MDs, the report stays readable.
MAX_MDS = 32


@dataclass(frozen=True)
class Step:
    step: str
    ok: bool
    detail: str
    fix: str = ""


Served = Callable[[str, str | None, float], Awaitable[bytes]]
# Runs a blocking function off the event loop (the engine's worker threads).
RunIO = Callable[..., Awaitable[Any]]


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def _sni(names: Sequence[str], md: str) -> str | None:
    return next((n for n in [*names, md] if not n.startswith("*")), None)


async def run(
    md_store: str,
    store: Store,
    md: str,
    failed: dict[str, str],
    configtest: Sequence[str],
    command_timeout: float,
    probes: Sequence[str],
    apache_running: Callable[[], tuple[bool, str]] | None = None,
    served: Served = served_certificate,
    run: RunIO = _in_thread,
) -> list[Step]:
    """Every check for `md` ("" = every MD in the store), in the order a request meets them.

    Store reads and the look at Apache's pid go through `run` (a worker thread): a slow store
    must not block the event loop while root runs the self-test.
    """
    if md:
        validate_md_name(md)
    steps, active_sets = await run(_store_steps, md_store, store, md, failed)
    if active_sets is None:
        return steps

    if apache_running is not None:
        running, why = await run(apache_running)
        steps.append(Step("apache running", running, why,
                          "" if running else "start Apache: the broker never starts it, it only restarts it"))
    if configtest:
        refused = await config_test(configtest, command_timeout)
        steps.append(Step("config test", refused is None,
                          "passes" if refused is None else refused.detail,
                          "" if refused is None else f"run {' '.join(configtest)} and fix what it reports"))
    else:
        steps.append(Step("config test", True, "none configured (configtest_command = [])"))

    checks = [(address, name, cset) for address in probes for name, cset in active_sets.items()]
    results = await asyncio.gather(*(_probe(served, address, name, cset) for address, name, cset in checks))
    steps.extend(results)
    if not probes:
        steps.append(Step("probe", True, "off (probe = []): the served certificate is not checked"))
    return steps


def _store_steps(md_store: str, store: Store, md: str, failed: dict[str, str]
                 ) -> tuple[list[Step], dict[str, CertSet | None] | None]:
    """In a worker thread: the store's steps, and the active set of each MD looked at (None:
    stop here, the store is unusable)."""
    steps: list[Step] = []
    fix_store = "set md_store to mod_md's MDStoreDir (Debian: /etc/apache2/md)"
    # md_store comes from root's configuration: a plain look is fine here.
    if not os.path.isdir(md_store):
        steps.append(Step("store", False, f"{md_store} is not a directory", fix_store))
        return steps, None
    try:
        listed = store.list_mds()
    except BrokerError as e:
        steps.append(Step("store", False, f"cannot read {md_store}: {e.message}", fix_store))
        return steps, None
    if not listed:
        steps.append(Step("store", False, f"{md_store} holds no MD (nothing in domains/ or staging/)", fix_store))
        if not md:
            return steps, None
    else:
        steps.append(Step("store", True, f"{md_store} readable, {len(listed)} MD(s)"))

    active_sets: dict[str, CertSet | None] = {}
    for name in ([md] if md else listed[:MAX_MDS]):
        steps.append(_managed(store, name))
        steps.append(_staged(store, name, failed))
        try:
            active_sets[name] = store.active(name)
        except BrokerError:
            active_sets[name] = None
    return steps, active_sets


def _managed(store: Store, md: str) -> Step:
    try:
        managed = store.managed_names(md)
    except BrokerError as e:
        return Step(f"managed {md}", False, e.message, "see the message; mod_md writes domains/<md>/md.json")
    if managed is None:
        return Step(f"managed {md}", False, f"no domains/{md}/md.json: not an MDomain of this Apache",
                    "the MD name is the first name of its MDomain line, lower case; "
                    "Apache writes md.json at its next start")
    return Step(f"managed {md}", True, f"names {', '.join(managed)}")


_RENEWAL_FIX = "mod_md stages a new set at its next renewal; see its log"
# Refusals that no new renewal cures: the admin has to act.
_STAGED_FIX = {
    "chain": "if you trust the CA that issued it, add its root certificate's PEM file to trust_anchors",
    "not-managed": "the MD name is the first name of its MDomain line, lower case; "
                   "Apache writes domains/<md>/md.json at its next start",
    "store-key": "md_store.json in the store's root must be mod_md's own file, owned by root",
}


def _staged(store: Store, md: str, failed: dict[str, str]) -> Step:
    try:
        staged = store.check_staged(md)
    except NothingStaged:
        return Step(f"staged {md}", True, "nothing staged (nothing to activate now)")
    except StagingInvalid as e:
        return Step(f"staged {md}", False, f"refused: {e.message}", _STAGED_FIX.get(e.check, _RENEWAL_FIX))
    except BrokerError as e:
        return Step(f"staged {md}", False, f"refused: {e.message}", _RENEWAL_FIX)
    if failed.get(md) == staged.fingerprint:
        return Step(f"staged {md}", False, "valid, but a restart already failed to activate it",
                    f"after fixing the cause: apache-restart request {md}")
    return Step(f"staged {md}", True, "valid: the hook's request would be taken")


async def _probe(served: Served, address: str, md: str, active: CertSet | None) -> Step:
    sni = _sni(active.names if active else (), md)
    step = f"probe {address} ({sni or 'no SNI'})"
    try:
        der = await served(address, sni, PROBE_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as e:
        if isinstance(e, TimeoutError):
            why = "no answer in time"
        elif isinstance(e, ssl.SSLError):
            why = f"TLS error: {getattr(e, 'reason', None) or e}"
        elif isinstance(e, OSError) and e.errno:
            why = os.strerror(e.errno).lower()  # asyncio's own text hides the reason in a tuple
        else:
            why = str(e) or type(e).__name__
        return Step(step, False, f"no certificate: {why}",
                    "check the probe address: Apache must serve TLS there for this MD")
    sha = hashlib.sha256(der).hexdigest()
    if active is None:
        return Step(step, True, f"answers (sha256 {sha[:16]}…); no active set to compare with")
    if any(c.sha256 == sha for c in active.certs):
        return Step(step, True, "serves the active certificate")
    return Step(step, False, f"serves another certificate (sha256 {sha[:16]}…) than the active one",
                "Apache has not been restarted since the set was activated, or the probe reaches "
                "another server or virtual host")


def as_json(steps: Sequence[Step]) -> dict[str, Any]:
    """The reply's content. Every text is escaped here, the one exit: details carry the config
    test's output, TLS errors and messages about what www-data staged."""
    return {"steps": [{k: safe(v) if isinstance(v, str) else v for k, v in asdict(s).items()}
                      for s in steps]}
