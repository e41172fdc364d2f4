"""The broker's Prometheus metrics, as a text file for node-exporter's textfile collector.

Derived from the same data as GetStatus, so the file and `apache-restart status` never
disagree. Written with the Prometheus client library (Debian 12: python3-prometheus-client
0.16): its exposition escapes label values, so MD names (DNS-checked by the store reader)
and probe addresses go in as they are. Times are in seconds since the epoch, as Prometheus
names them (`..._timestamp_seconds`).

The file is replaced atomically (the library writes a temporary file beside it and renames
it); a failure to write is logged and never stops the broker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from prometheus_client.core import CounterMetricFamily, Metric

from . import log

PREFIX = "apache_restart_broker"
# node-exporter runs as its own user: it must be able to read what the root broker wrote.
FILE_MODE = 0o644


def _seconds(usec: object) -> float | None:
    return usec / 1e6 if isinstance(usec, int) and not isinstance(usec, bool) and usec > 0 else None


def registry_for(status: Mapping[str, Any], restarts: Mapping[str, int]) -> CollectorRegistry:
    """A registry holding the metrics for a GetStatus document and the restart counts."""
    reg = CollectorRegistry(auto_describe=True)
    not_after = Gauge(f"{PREFIX}_cert_not_after_timestamp_seconds",
                      "When a certificate expires, by MD, key type and where it was seen "
                      "(staged, active in the store, served at a probe address)",
                      ["md", "key_type", "where", "probe"], registry=reg)
    staged_since = Gauge(f"{PREFIX}_staged_since_timestamp_seconds",
                         "When the valid set staged for an MD was written (absent: none staged)",
                         ["md"], registry=reg)
    staged_invalid = Gauge(f"{PREFIX}_staged_invalid",
                           "1 when what is staged for an MD fails verification", ["md"], registry=reg)
    failed_before = Gauge(f"{PREFIX}_staged_failed_before",
                          "1 when a restart already failed to activate the set staged for an MD",
                          ["md"], registry=reg)
    probe_error = Gauge(f"{PREFIX}_probe_error",
                        "1 when a probe address could not be asked what it serves for an MD",
                        ["md", "probe"], registry=reg)
    served_behind = Gauge(f"{PREFIX}_served_behind",
                          "1 when a probe address serves an older certificate for an MD than the one "
                          "active in the (shared) store", ["md"], registry=reg)
    pending = Gauge(f"{PREFIX}_pending", "1 while a restart is scheduled and not yet carried out",
                    registry=reg)
    planned = Gauge(f"{PREFIX}_planned_timestamp_seconds",
                    "When the pending restart will run (0: none pending)", registry=reg)
    last = Gauge(f"{PREFIX}_last_restart_timestamp_seconds",
                 "When the last restart was issued (0: never)", registry=reg)
    last_ok = Gauge(f"{PREFIX}_last_restart_success",
                    "1 when the last restart activated and served every set it was for", registry=reg)
    reg.register(_RestartCounts(restarts))

    for md in status.get("mds") or []:
        name = md["name"]
        for where in ("active", "staged"):
            cset = md.get(where)
            for cert in (cset or {}).get("certs") or []:
                when = _seconds(cert.get("not_after_usec"))
                if when is not None:
                    not_after.labels(name, cert.get("key_type", ""), where, "").set(when)
        staged = md.get("staged")
        if staged is not None:
            staged_invalid.labels(name).set(0 if staged.get("valid") else 1)
            since = _seconds(staged.get("since_usec"))
            if staged.get("valid") and since is not None:
                staged_since.labels(name).set(since)
            failed_before.labels(name).set(1 if md.get("failed_before") else 0)
        if md.get("active") is not None:
            served_behind.labels(name).set(1 if md.get("served_behind") else 0)
        for entry in md.get("served") or []:
            probe_error.labels(name, entry["probe"]).set(1 if entry.get("error") else 0)
            when = _seconds(entry.get("not_after_usec"))
            if not entry.get("error") and when is not None:
                not_after.labels(name, entry.get("key_type", ""), "served", entry["probe"]).set(when)
    pending.set(1 if status.get("pending") else 0)
    planned.set(_seconds(status.get("planned_at_usec")) or 0)
    last.set(_seconds(status.get("last_restart_usec")) or 0)
    last_ok.set(1 if status.get("last_result") == "ok" else 0)
    return reg


class _RestartCounts:
    """`..._restarts_total` from the broker's own counts (kept in its state across restarts).

    A collector rather than a Counter: a Counter made for each write would also expose
    `..._restarts_created` with the time of that write, which is not when counting began.
    """

    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = {result: max(0, int(counts.get(result, 0))) for result in ("ok", "failed")}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(f"{PREFIX}_restarts", "Restarts carried out, by result", labels=["result"])
        for result, count in self.counts.items():
            family.add_metric([result], count)
        yield family


def write(path: str, status: Mapping[str, Any], restarts: Mapping[str, int]) -> bool:
    """Replace `path` with the metrics; False (logged) when that failed. "" writes nothing."""
    if not path:
        return False
    try:
        write_to_textfile(path, registry_for(status, restarts))
        os.chmod(path, FILE_MODE)
    except OSError as e:
        log.warning(f"could not write the metrics file {path}: {e.strerror or e}")
        return False
    return True
