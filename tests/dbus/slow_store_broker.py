"""The real broker, with a store whose reads of staging/ block (a hung file system, or a check
that takes seconds of CPU): `Store.check_staged` announces itself by creating
CONTROL/check-started and then waits up to 5 s for CONTROL/check-release.

    python -m tests.dbus.slow_store_broker CONTROL_DIR BROKER_ARGS...
"""

import os
import sys
import time

from broker import main, staging

CONTROL = sys.argv.pop(1)
_real_check_staged = staging.Store.check_staged


def _blocking_check_staged(self, md):
    open(os.path.join(CONTROL, "check-started"), "w").close()
    deadline = time.monotonic() + 5.0
    while not os.path.exists(os.path.join(CONTROL, "check-release")) and time.monotonic() < deadline:
        time.sleep(0.01)  # blocks whichever thread runs it, as a hung read would
    return _real_check_staged(self, md)


staging.Store.check_staged = _blocking_check_staged
sys.exit(main.main(sys.argv[1:]))
