"""Which managed MDs mod_md is about to renew: lets a settle window end without waiting for
renewals that are not coming.

No D-Bus here. mod_md renews the MDs that are due one after another, so when several are due
their `renewed` messages arrive a moment apart and should share one restart; when none other
is due, nothing will join and waiting for it only delays the new certificate.

Facts relied on (mod_md v2.6, `md_reg.c`, `md_time.c`): `domains/<md>/md.json` (written by
Apache's parent, root) holds `renew-window` as mod_md formats a time slice: a percentage of
the certificate's lifetime ("33%", also the default when absent) or a duration with a unit
("21d", "12h", "30mi", "90s", "500ms"; a bare number means days). A renewal is due from the
active certificate's notAfter minus that window; the key type that is due first counts. An MD
without an active certificate is due at once. Other triggers (the CA's renewal information,
OCSP revocation) are not visible in the store, so this is advice for an early end only: the
settle time still bounds every wait.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import BrokerError
from .staging import MAX_JSON_BYTES, CertSet, Store, _Fds, _parse_json, _read_file

DEFAULT_RENEW_WINDOW = "33%"

_WINDOW_RE = re.compile(r"([0-9]{1,9})(%|d|h|mi|ms|s)?", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "mi": 60.0, "s": 1.0, "ms": 0.001}


def renew_window_seconds(spec: object, lifetime: float) -> float | None:
    """The renew window in seconds for a certificate living `lifetime` seconds; None when
    `spec` is not something mod_md writes."""
    if spec is None:
        spec = DEFAULT_RENEW_WINDOW
    if not isinstance(spec, str):
        return None
    m = _WINDOW_RE.fullmatch(spec.strip())
    if m is None:
        return None
    value, unit = int(m.group(1)), (m.group(2) or "d").lower()
    if unit == "%":
        return max(0.0, lifetime) * min(value, 100) / 100.0
    return value * _UNIT_SECONDS[unit]


def renewal_due_at(active: CertSet | None, window_spec: object) -> float | None:
    """When mod_md starts renewing this MD (epoch seconds); None when it is due now (no active
    set, or a window mod_md would not write)."""
    if active is None or not active.certs:
        return None
    starts = []
    for cert in active.certs:
        window = renew_window_seconds(window_spec, cert.not_after - cert.not_before)
        if window is None:
            return None
        starts.append(cert.not_after - window)
    return min(starts)


_NOT_MANAGED = object()


def _renew_window(store: Store, md: str) -> object:
    """`renew-window` from domains/<md>/md.json (None when it has none); _NOT_MANAGED when
    there is no such file: mod_md renews only the MDs it writes one for."""
    with _Fds() as fds:
        root = store._open_root(fds)
        dfd = None if root is None else store._md_dir(fds, root, "domains", md)
        if dfd is None:
            return _NOT_MANAGED
        rel = f"domains/{md}/md.json"
        got = _read_file(dfd, "md.json", rel, MAX_JSON_BYTES)
        if got is None:
            return _NOT_MANAGED
        return _parse_json(got[0], rel, "md-json").get("renew-window")


def others_due(store: Store, exclude: Iterable[str], now: float) -> list[str]:
    """Managed MDs outside `exclude` whose renewal is due at `now` (or cannot be told)."""
    skip = set(exclude)
    due = []
    for md in store.list_mds():
        if md in skip:
            continue
        try:
            window = _renew_window(store, md)
            if window is _NOT_MANAGED:
                continue
            starts = renewal_due_at(store.active(md), window)
        except (BrokerError, OSError):
            starts = None  # unreadable: assume due, which only costs the early end
        if starts is None or starts <= now:
            due.append(md)
    return due
