"""A stand-in for apachectl in the mock tier: `configtest` and `graceful`.

The broker runs it with a fixed environment, so everything comes from argv:
    fake_apache.py configtest|graceful CONTROL_DIR STORE
CONTROL_DIR holds switches the tests set (files `configtest-fails` (when not empty, its
content is what the failing config test prints), `graceful-fails`,
`no-activate`, `graceful-sleep` holding seconds) and the record `calls.log`, one line
per call. `graceful` activates every staged set the way mod_md does.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import storefactory


def main() -> int:
    action, control, store = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(os.path.join(control, "calls.log"), "a") as f:
        f.write(f"{action} {time.time():.6f} env={sorted(os.environ)}\n")
    if action == "configtest":
        fails = os.path.join(control, "configtest-fails")
        if os.path.exists(fails) and os.path.getsize(fails):
            with open(fails, "rb") as f:
                sys.stderr.buffer.write(f.read())
            return 1
        if os.path.exists(fails):
            print("AH00526: Syntax error on line 7 of /etc/apache2/sites-enabled/x.conf:", file=sys.stderr)
            print("Invalid command 'SSLEngin'", file=sys.stderr)
            return 1
        print("Syntax OK", file=sys.stderr)
        return 0
    if action == "graceful":
        sleep = os.path.join(control, "graceful-sleep")
        if os.path.exists(sleep):
            time.sleep(float(open(sleep).read()))
        if os.path.exists(os.path.join(control, "graceful-fails")):
            print("graceful failed", file=sys.stderr)
            return 1
        if not os.path.exists(os.path.join(control, "no-activate")):
            staging = os.path.join(store, "staging")
            for md in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
                storefactory.activate(store, md)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
