"""Which other MDs mod_md is about to renew (broker/due.py)."""

import time

import pytest

from broker.due import others_due, renew_window_seconds, renewal_due_at
from broker.staging import Store
from harness import storefactory

DAY = 86400.0


@pytest.mark.parametrize("spec,lifetime,expected", [
    ("33%", 90 * DAY, 29.7 * DAY),
    (None, 90 * DAY, 29.7 * DAY),       # absent: mod_md's default, 33%
    ("21d", 90 * DAY, 21 * DAY),
    ("21", 90 * DAY, 21 * DAY),         # a bare number is days
    ("12h", 0, 12 * 3600.0),
    ("30mi", 0, 1800.0),
    ("90s", 0, 90.0),
    ("500ms", 0, 0.5),
    ("100%", 60.0, 60.0),
])
def test_windows_as_mod_md_writes_them(spec, lifetime, expected):
    assert renew_window_seconds(spec, lifetime) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["", "-5d", "5y", "33 %", "1e3s", 33, ["33%"], "9" * 12 + "d", "½d"])
def test_windows_mod_md_would_not_write(spec):
    assert renew_window_seconds(spec, 90 * DAY) is None


def _store(tmp_path):
    return storefactory.make_store(tmp_path)


def test_no_other_md_due_when_certificates_are_fresh(tmp_path):
    store = _store(tmp_path)
    now = time.time()
    for md in ("a.example.test", "b.example.test", "c.example.test"):
        storefactory.add_active(store, md, not_before=now - 3600, not_after=now + 90 * DAY)
    assert others_due(Store(str(store)), ["a.example.test"], now) == []


def test_an_md_inside_its_window_is_due(tmp_path):
    store = _store(tmp_path)
    now = time.time()
    storefactory.add_active(store, "a.example.test", not_before=now - 3600, not_after=now + 90 * DAY)
    # 33% of ~30 days is ~10 days: 5 days before the end it is due.
    storefactory.add_active(store, "b.example.test", not_before=now - 25 * DAY, not_after=now + 5 * DAY)
    # With a window of 1 day it is not.
    storefactory.add_active(store, "c.example.test", not_before=now - 25 * DAY, not_after=now + 5 * DAY,
                            md_json_obj=storefactory.md_json("c.example.test", **{"renew-window": "1d"}))
    assert others_due(Store(str(store)), ["a.example.test"], now) == ["b.example.test"]


def test_new_and_odd_mds_count_as_due_and_unmanaged_ones_do_not(tmp_path):
    store = _store(tmp_path)
    now = time.time()
    # Managed, no certificate yet: mod_md is getting its first one.
    (store / "domains" / "new.example.test").mkdir(parents=True)
    (store / "domains" / "new.example.test" / "md.json").write_text('{"name": "new.example.test"}')
    # A window mod_md would not write: cannot tell, so due.
    storefactory.add_active(store, "odd.example.test", not_before=now - 3600, not_after=now + 90 * DAY,
                            md_json_obj=storefactory.md_json("odd.example.test", **{"renew-window": "soon"}))
    # Only under staging/: not managed by this Apache, never renewed by it.
    storefactory.add_staged(store, "stray.example.test", managed=False)
    assert others_due(Store(str(store)), [], now) == ["new.example.test", "odd.example.test"]


def test_earliest_key_type_counts(tmp_path):
    store = _store(tmp_path)
    now = time.time()
    info = storefactory.add_active(store, "a.example.test", key_types=("rsa", "secp256r1"),
                                   not_before=now - 3600, not_after=now + 90 * DAY)
    active = Store(str(store)).active("a.example.test")
    assert active is not None and len(active.certs) == 2
    due_at = renewal_due_at(active, "10d")
    assert due_at == pytest.approx(min(c.not_after for c in active.certs) - 10 * DAY)
    assert info is not None
