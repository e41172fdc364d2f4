"""What one check of a staged set costs, for hostile sets against a normal one.

    python bench/staging_check.py [--runs 30]

Builds one store (in a temporary folder) holding a normal staged set and sets that www-data
could write to make a check expensive, each at or beyond a cap of broker/staging.py or
broker/privkey.py. Then it runs `Store.check_staged` on each set `--runs` times, the cases
interleaved (so that drifts of a shared machine hit all alike), and prints per case the
outcome (accepted, or the check that refused it), the median and the maximum CPU time of one
check (this process's time.process_time: the check is single-threaded and blocks nothing but
itself) and the ratio of the median to the normal set's. "normal+bundle" is the normal set
checked with Debian's CA bundle (the default trust_anchors) beside the test CAs. The setup
(making keys and certificates) is not measured. Run it as root like the test suite: the
broker trusts domains/<md>/md.json only when root owns it.

A check must cost a few milliseconds whatever www-data writes: the 29,000-name leaf once cost
seconds of CPU per check (4 s on the test machine, 27 s where it was found).
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding

from broker.chain import TrustAnchors
from broker.errors import BrokerError
from broker.privkey import MAX_KDF_ITERATIONS
from broker.staging import MAX_CHAIN_CERTS, MAX_JSON_BYTES, MAX_MD_DOMAINS, MAX_SANS, Store
from harness import storefactory as sf

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _kdf_pem(pem: bytes, rounds: int) -> bytes:
    """`pem` with its PBKDF2 count (OpenSSL's default, 2048) replaced by `rounds` (at most
    65535, so that the DER keeps its length). The key then no longer decrypts, after paying for
    `rounds`: the cost of a hostile count."""
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    old = b"\x02\x02\x08\x00"              # INTEGER 2048
    assert der.count(old) == 1, "unexpected key encoding"
    der = der.replace(old, b"\x02\x02" + rounds.to_bytes(2, "big"), 1)
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return b"\n".join([b"-----BEGIN ENCRYPTED PRIVATE KEY-----", *lines, b"-----END ENCRYPTED PRIVATE KEY-----", b""])


def build(store: Path) -> tuple[dict[str, str], list[sf.CA]]:
    """Every case's MD in `store`: ({case: md}, the trust anchors they are issued under)."""
    cases: dict[str, str] = {}

    def md(case: str) -> str:
        name = f"{case}.example.org"
        cases[case] = name
        return name

    def staged_dir(name: str) -> Path:
        return store / "staging" / name

    m = md("normal")
    sf.add_staged(store, m, [m, "www." + m])

    m = md("two-key-types")
    sf.add_staged(store, m, [m, "www." + m], ("rsa", "secp256r1"))

    # The leaf that once cost 27 s: 29,000 names against 1,000 configured ones.
    m = md("sans-29000")
    configured = [m] + [f"d{i}.{m}" for i in range(MAX_MD_DOMAINS - 1)]
    sf.add_staged(store, m, configured, cert_names=sf.short_names(29000) + [m, f"*.{m}"])

    # As many names as the cap allows, against as many configured names as root may list, all
    # covered (through a wildcard): the whole name check runs, then the chain and the key.
    m = md("sans-at-cap")
    configured = [m] + [f"d{i}.{m}" for i in range(MAX_MD_DOMAINS - 1)]
    sf.add_staged(store, m, configured,
                  cert_names=[m, f"*.{m}"] + [f"x{i}.other.example" for i in range(MAX_SANS - 2)])

    # A leaf just under the size cap, full of names: parsed, then refused by the name count.
    m = md("pem-at-cap")
    sf.add_staged(store, m, [m], cert_names=[m] + [f"n{i:05}.example.net" for i in range(2000)])

    # The longest chain allowed, every link signed by the next: each signature is verified.
    m = md("chain-at-cap")
    root = sf.make_ca("bench root")
    links = [root]
    for i in range(MAX_CHAIN_CERTS - 1):
        links.append(sf.make_ca(f"bench intermediate {i}", issuer=links[-1]))
    info = sf.add_staged(store, m, [m], ca=links[-1])
    chain = info.certs["rsa"].cert.public_bytes(Encoding.PEM)
    chain += b"".join(ca.pem for ca in reversed(links[1:]))
    (staged_dir(m) / "pubcert.pem").write_bytes(chain)

    # One more certificate than allowed.
    m = md("chain-over-cap")
    sf.add_staged(store, m, [m])
    pub = staged_dir(m) / "pubcert.pem"
    pub.write_bytes(pub.read_bytes() + sf.default_ca().pem * MAX_CHAIN_CERTS)

    # job.json at its size cap: deeply nested (a recursion bomb for a naive parser) ...
    m = md("job-nested")
    sf.add_staged(store, m, [m])
    depth = MAX_JSON_BYTES // 2 - 1
    (staged_dir(m) / "job.json").write_text("[" * depth + "]" * depth)
    # ... and a huge but ordinary one (a long log), parsed in full.
    m = md("job-at-cap")
    sf.add_staged(store, m, [m])
    job = sf.job_json(m)
    entry = {"when": "Mon, 01 Jan 2026 00:00:00 GMT", "type": "progress", "detail": "x" * 60}
    job["log"]["entries"] = [entry] * (MAX_JSON_BYTES // (len(json.dumps(entry)) + 2))
    while len(text := json.dumps(job)) > MAX_JSON_BYTES:
        job["log"]["entries"].pop()
    (staged_dir(m) / "job.json").write_text(text)

    # Key derivation: the most rounds allowed (then the key does not decrypt: that is the cost
    # of a hostile count), and a count far beyond the cap (refused before any round).
    passphrase = sf.store_passphrase(store)
    m = md("kdf-at-cap")
    sf.add_staged(store, m, [m])
    key = sf.key_pem(sf.leaf_key("rsa"), passphrase)
    (staged_dir(m) / "privkey.pem").write_bytes(_kdf_pem(key, MAX_KDF_ITERATIONS))
    m = md("kdf-huge")
    sf.add_staged(store, m, [m])
    (staged_dir(m) / "privkey.pem").write_bytes(_kdf_pem(key, 0xFFFF))

    m = md("self-signed")
    sf.add_staged(store, m, [m], self_signed=True)

    m = md("mismatched-key")
    sf.add_staged(store, m, [m])
    (staged_dir(m) / "privkey.pem").write_bytes(sf.key_pem(sf.new_key("secp256r1"), passphrase))

    # A big RSA key in place of the leaf's: read, never validated (cryptography 38's loader
    # would spend about half a second on an RSA-4096 key's primes, and 7 s on RSA-8192's).
    m = md("rsa-4096-key")
    sf.add_staged(store, m, [m])
    big = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    (staged_dir(m) / "privkey.pem").write_bytes(sf.key_pem(big, passphrase))

    m = md("pem-too-large")
    sf.add_staged(store, m, [m])
    pub = staged_dir(m) / "pubcert.pem"
    pub.write_bytes(pub.read_bytes() + b"#" * (1 << 20))

    return cases, [sf.default_ca(), root]


def measure(checks: dict[str, Callable[[], object]], runs: int) -> dict[str, tuple[str, list[float]]]:
    times: dict[str, list[float]] = {case: [] for case in checks}
    outcome: dict[str, str] = {}
    for _ in range(runs):
        for case, check in checks.items():
            t0 = time.process_time()
            try:
                check()
                result = "accepted"
            except BrokerError as e:
                result = f"{type(e).__name__}: {getattr(e, 'check', '') or e.message}"
            times[case].append(time.process_time() - t0)
            outcome[case] = result
    return {case: (outcome[case], times[case]) for case in checks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("staging_check: run as root (the broker trusts only root's domains/<md>/md.json)", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="arb-bench-"))
    try:
        store = sf.make_store(folder)
        cases, cas = build(store)
        anchors = sf.anchors(*cas)
        store_view = Store(str(store), anchors=anchors)
        checks: dict[str, Callable[[], object]] = {
            case: functools.partial(store_view.check_staged, md) for case, md in cases.items()}
        # The default trust_anchors, Debian's bundle, beside the test CAs: what anchors cost.
        if os.path.exists(SYSTEM_BUNDLE):
            with_bundle = TrustAnchors(TrustAnchors.load([SYSTEM_BUNDLE]).certs + anchors.certs, ())
            checks["normal+bundle"] = functools.partial(
                Store(str(store), anchors=with_bundle).check_staged, cases["normal"])
        results = measure(checks, args.runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    base = statistics.median(results["normal"][1])
    print(f"CPU time of one Store.check_staged, {args.runs} runs per case, interleaved "
          f"(time.process_time; Python {sys.version.split()[0]})\n")
    print(f"{'case':<16} {'outcome':<34} {'median ms':>10} {'max ms':>8} {'ratio':>7}")
    for case, (outcome, times) in results.items():
        med = statistics.median(times)
        print(f"{case:<16} {outcome:<34} {med * 1000:>10.2f} {max(times) * 1000:>8.2f} {med / base:>6.1f}x")
    worst = max(statistics.median(t) for _, t in results.values())
    print(f"\nworst median {worst * 1000:.2f} ms = {worst / base:.1f} x the normal set")
    return 0


if __name__ == "__main__":
    sys.exit(main())
