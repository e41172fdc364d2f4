"""mod_md's store lock, as a cluster sees it: is another node activating right now? No D-Bus here.

With `MDStoreLocks on`, every Apache sharing the store takes `<store>/store.lock` (an exclusive
fcntl lock, tried without blocking every 100 ms for up to `MDStoreLocks`' duration, default 5 s)
while it starts or restarts: that is when it moves staged sets into domains/. An Apache that
cannot get the lock in time starts without activating anything ("renewed certificates may remain
inactive on this httpd instance"). So the broker does not restart its Apache while the lock is
held elsewhere: it tests the lock the way mod_md takes it and waits.

The test is mod_md's own attempt: take the lock without blocking, and drop it at once. Holding
it for those two system calls costs a node that tries at that very moment one 100 ms retry.
The file is never created (the broker does not write to the store): without it, nobody has
locked yet.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import time
from collections.abc import Awaitable, Callable

from . import log

LOCK_NAME = "store.lock"
# mod_md retries every 100 ms; testing as often costs nothing and adds no delay.
POLL_SECONDS = 0.1
# A lock held longer than this is no activation (those take well under a second): some process
# holds it for another reason, and mod_md itself gives up after its own wait. Restart anyway.
MAX_WAIT_SECONDS = 120.0
# While waiting, say so again this often.
LOG_EVERY_SECONDS = 30.0


def held_elsewhere(store_root: str) -> bool:
    """Whether another process holds (or is taking) the store's lock right now."""
    try:
        fd = os.open(os.path.join(store_root, LOCK_NAME),
                     os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        # A symlink or something we cannot open for the test is not mod_md's lock file.
        log.warning(f"cannot test the store lock: {os.strerror(e.errno or 0).lower()}")
        return False
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return True
            log.warning(f"cannot test the store lock: {os.strerror(e.errno or 0).lower()}")
            return False
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        # Closing drops the lock too; it was never held beyond the two calls above.
        os.close(fd)


async def wait_until_free(
    store_root: str,
    held: Callable[[str], bool] | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    max_wait: float = MAX_WAIT_SECONDS,
) -> float:
    """Return once nobody else holds the store lock (or after `max_wait`); the seconds waited.

    The test runs in a worker thread: on a network file system a lock request is a round trip.
    """
    test = held or held_elsewhere
    start = monotonic()
    said = None
    while await asyncio.to_thread(test, store_root):
        waited = monotonic() - start
        if said is None or waited - said >= LOG_EVERY_SECONDS:
            log.notice(f"the MD store is locked (another node is activating certificates); "
                       f"waiting before the restart ({waited:.1f} s so far)")
            said = waited
        if waited >= max_wait:
            log.warning(f"the MD store is still locked after {waited:.0f} s; restarting anyway")
            return waited
        await sleep(POLL_SECONDS)
    waited = monotonic() - start
    if said is not None:
        log.notice(f"the MD store lock is free after {waited:.1f} s; restarting")
    return waited
