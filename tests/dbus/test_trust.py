"""Only what root wrote is trusted, on the bus: unmanaged MDs, untrusted chains and foreign keys
are refused with contract errors and schedule nothing; a hostile leaf cannot hold up others."""

import asyncio
import time

import pytest

from broker import dbuslib, names
from harness import storefactory
from harness.busutil import call, error_of, get_property

MD = "www.example.test"


@pytest.mark.parametrize("setup,check", [
    ("invented", "not-managed"),
    ("self-signed", "chain"),
    ("unknown-ca", "chain"),
    ("mismatched-key", "key-mismatch"),
])
async def test_untrusted_sets_are_refused_and_schedule_nothing(start_broker, client, allow, store, tmp_path,
                                                              setup, check):
    if setup == "invented":
        # A complete, well-formed set for a name no MDomain line declares (no domains/<md>/md.json).
        storefactory.add_staged(store, MD, [MD], managed=False)
    elif setup == "self-signed":
        storefactory.add_staged(store, MD, [MD], self_signed=True)
    elif setup == "unknown-ca":
        storefactory.add_staged(store, MD, [MD], ca=storefactory.make_ca("a CA the broker does not trust"))
    else:
        storefactory.add_staged(store, MD, [MD])
        other = storefactory.key_pem(storefactory.new_key("rsa"), storefactory.store_passphrase(store))
        (store / "staging" / MD / "privkey.pem").write_bytes(other)
    broker = await start_broker()
    reply = await call(client, "RequestGracefulRestart", "s", [MD])
    err = error_of(reply)
    assert err is not None and err[0] == names.ERROR_STAGING_INVALID, err
    assert err[1].startswith(check + ":"), err
    assert err[1].isprintable() and str(tmp_path) not in err[1]
    assert await get_property(client, "Pending") is False
    assert broker.calls() == []


async def test_hostile_29000_name_leaf_does_not_hold_up_properties_get(start_broker, client, bus_address, allow,
                                                                       store):
    """The leaf that cost seconds of CPU per check: every configured name (1,000) is covered only by
    its last names, so a linear match scans all 29,000 for each. Meanwhile root's Properties.Get
    (another connection) must be answered within a second, every time."""
    configured = [MD] + [f"d{i}.{MD}" for i in range(999)]
    storefactory.add_staged(store, MD, configured,
                            cert_names=storefactory.short_names(29000) + [MD, f"*.{MD}"])
    await start_broker(settle_seconds=600)
    reader = await dbuslib.connect(bus_address)
    try:
        requests = [asyncio.ensure_future(call(client, "RequestGracefulRestart", "s", [MD], timeout=120))
                    for _ in range(3)]
        slowest = 0.0
        gets = 0
        while not all(r.done() for r in requests) or gets < 5:
            t0 = time.monotonic()
            assert await get_property(reader, "Version")
            slowest = max(slowest, time.monotonic() - t0)
            gets += 1
        replies = [r.result() for r in requests]
    finally:
        reader.disconnect()
    assert slowest < 1.0, f"a Properties.Get waited {slowest:.2f} s"
    for reply in replies:
        err = error_of(reply)
        assert err is not None and err[0] == names.ERROR_STAGING_INVALID and err[1].startswith("too-large:"), err
    assert await get_property(client, "Pending") is False
