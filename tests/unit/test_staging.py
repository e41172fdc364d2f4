"""broker.staging against fake mod_md stores with real certificates (harness/storefactory.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from broker import staging
from broker.errors import InvalidName, NothingStaged, StagingInvalid
from broker.staging import (
    MAX_CHAIN_CERTS,
    MAX_JSON_BYTES,
    MAX_NAME_LEN,
    MAX_PEM_BYTES,
    CertSet,
    Store,
    name_covered,
    validate_md_name,
)
from harness import storefactory as sf

MD = "example.org"
DAY = 86400.0
ANCHORS = sf.anchors()


# A test that hangs (on a FIFO, say) fails after 20 s instead of blocking the run.
pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return sf.make_store(tmp_path)


def staged_dir(store: Path, md: str = MD) -> Path:
    return store / "staging" / md


def managed_md_json(store: Path, md: str = MD) -> Path:
    """domains/<md>/md.json: root's copy, the one that decides names and key types."""
    path = store / "domains" / md / "md.json"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def invalid(store: Path, md: str = MD, check: str | None = None, **kw) -> StagingInvalid:
    with pytest.raises(StagingInvalid) as ei:
        Store(str(store), anchors=ANCHORS, **kw).check_staged(md)
    err = ei.value
    if check is not None:
        assert err.check == check, err.message
    # The message names the check and only store-relative paths.
    assert err.message == str(err)
    assert err.message.startswith(f"{err.check}: ")
    assert str(store) not in err.message
    return err


# -- valid sets ---------------------------------------------------------------------------


def test_valid_rsa(store: Path) -> None:
    old = sf.add_active(store, MD, [MD, "www.example.org"])
    new = sf.add_staged(store, MD, [MD, "www.example.org"])
    cs = Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert isinstance(cs, CertSet)
    assert cs.md == MD
    assert cs.names == (MD, "www.example.org")
    assert len(cs.certs) == 1
    c = cs.certs[0]
    assert (c.key_type, c.file) == ("rsa", "pubcert.pem")
    assert c.sha256 == new.sha256("rsa") != old.sha256("rsa")
    assert c.serial == new.serial("rsa")
    assert c.serial == c.serial.lower() and not c.serial.startswith("0")
    assert set(c.names) == {MD, "www.example.org"}
    assert "storefactory test CA" in c.issuer
    assert abs(c.not_before - new.certs["rsa"].not_before) < 1
    assert abs(c.not_after - new.certs["rsa"].not_after) < 1
    assert cs.fingerprint == new.fingerprint != old.fingerprint
    assert cs.since == os.stat(staged_dir(store) / "pubcert.pem").st_mtime


def test_valid_without_active_set(store: Path) -> None:
    # The very first certificate: no domains/<md> yet; the staging md.json is all there is.
    new = sf.add_staged(store, MD)
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).fingerprint == new.fingerprint


def test_valid_rsa_and_ec(store: Path) -> None:
    kts = ("rsa", "secp256r1")
    sf.add_active(store, MD, key_types=kts)
    new = sf.add_staged(store, MD, key_types=kts)
    written = json.loads((staged_dir(store) / "md.json").read_text())
    assert written["privkey"] == [{"type": "RSA", "bits": 2048}, {"type": "EC", "curve": "secp256r1"}]
    cs = Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert [(c.key_type, c.file) for c in cs.certs] == [
        ("rsa", "pubcert.pem"), ("secp256r1", "pubcert.secp256r1.pem")]
    assert [c.sha256 for c in cs.certs] == [new.sha256("rsa"), new.sha256("secp256r1")]
    assert cs.fingerprint == sf.fingerprint_of(sorted([new.sha256("rsa"), new.sha256("secp256r1")]))
    assert cs.since == max(os.stat(staged_dir(store) / f).st_mtime
                           for f in ("pubcert.pem", "pubcert.secp256r1.pem"))


def test_ec_only(store: Path) -> None:
    new = sf.add_staged(store, MD, key_types=("secp384r1",))
    cs = Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert [(c.key_type, c.file) for c in cs.certs] == [("secp384r1", "pubcert.secp384r1.pem")]
    assert cs.fingerprint == new.fingerprint


def test_staged_keys_are_encrypted_and_active_keys_plain(store: Path) -> None:
    sf.add_active(store, MD)
    sf.add_staged(store, MD)
    assert b"ENCRYPTED PRIVATE KEY" in (staged_dir(store) / "privkey.pem").read_bytes()
    assert b"-----BEGIN PRIVATE KEY" in (store / "domains" / MD / "privkey.pem").read_bytes()


# -- file naming and md.json as mod_md writes it ------------------------------------------------


@pytest.mark.parametrize(("privkey", "files", "key_types"), [
    (None, ["pubcert.pem"], ["rsa"]),
    ({"type": "Default"}, ["pubcert.pem"], ["rsa"]),
    ({"type": "RSA", "bits": 4096}, ["pubcert.pem"], ["rsa"]),     # bits don't change the name
    ({"type": "rsa"}, ["pubcert.pem"], ["rsa"]),                    # types compare without case
    ([], ["pubcert.pem"], ["rsa"]),                                 # empty list = default
    ({"type": "Unsupported"}, ["pubcert.pem"], ["rsa"]),            # read as default by mod_md
    ({"type": "EC", "curve": "P-256"}, ["pubcert.p-256.pem"], ["P-256"]),  # file name lower-cased
    ([{"type": "EC", "curve": "secp384r1"}, {"type": "RSA"}],
     ["pubcert.secp384r1.pem", "pubcert.pem"], ["secp384r1", "rsa"]),
])
def test_key_type_file_names(store: Path, privkey, files, key_types) -> None:
    obj = sf.md_json(MD)
    obj.pop("privkey", None)
    if privkey is not None:
        obj["privkey"] = privkey
    curves = {"P-256": "secp256r1"}
    for kt, f in zip(key_types, files):
        issued = sf.issue([MD], curves.get(kt, kt))
        d = staged_dir(store)
        d.mkdir(exist_ok=True)
        (d / f).write_bytes(issued.chain_pem)
        (d / f.replace("pubcert", "privkey")).write_bytes(sf.key_pem(issued.key, sf.store_passphrase(store)))
    (staged_dir(store) / "md.json").write_text(json.dumps(obj))
    managed_md_json(store).write_text(json.dumps(obj))
    cs = Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert [c.file for c in cs.certs] == files
    assert [c.key_type for c in cs.certs] == key_types


@pytest.mark.parametrize("privkey", [
    [{"type": "RSA"}, {"type": "RSA", "bits": 3072}],          # same file twice
    [{"type": "EC", "curve": "P-256"}, {"type": "EC", "curve": "p-256"}],
    {"type": "EC"},                                            # no curve
    {"type": "EC", "curve": "../../etc/x"},
    {"type": "EC", "curve": "a/b"},
    "RSA",
    [1],
    [{"type": "EC", "curve": f"c{i}"} for i in range(9)],      # too many key types
])
def test_bad_privkey_specs(store: Path, privkey) -> None:
    sf.add_staged(store, MD)
    obj = sf.md_json(MD)
    obj["privkey"] = privkey
    managed_md_json(store).write_text(json.dumps(obj))
    invalid(store, check="md-json")


@pytest.mark.parametrize("mutate", [
    lambda o: o.update(name="other.org"),
    lambda o: o.pop("domains"),
    lambda o: o.update(domains=[]),
    lambda o: o.update(domains="example.org"),
])
def test_bad_md_json(store: Path, mutate) -> None:
    sf.add_staged(store, MD)
    obj = sf.md_json(MD)
    mutate(obj)
    managed_md_json(store).write_text(json.dumps(obj))
    invalid(store, check="md-json")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100000])
def test_md_json_not_an_object(store: Path, content: bytes) -> None:
    sf.add_staged(store, MD)
    managed_md_json(store).write_bytes(content)
    invalid(store, check="md-json")


def test_broken_domains_md_json_is_reported(store: Path) -> None:
    sf.add_active(store, MD)
    sf.add_staged(store, MD)
    (store / "domains" / MD / "md.json").write_text("{")
    err = invalid(store, check="md-json")
    assert f"domains/{MD}/md.json" in err.message


# -- incomplete sets and keys ---------------------------------------------------------------


def test_ec_missing_is_incomplete(store: Path) -> None:
    kts = ("rsa", "secp256r1")
    sf.add_active(store, MD, key_types=kts)
    sf.add_staged(store, MD, key_types=kts, skip_files=("pubcert.secp256r1.pem",))
    err = invalid(store, check="incomplete")
    assert "pubcert.secp256r1.pem" in err.message
    assert Store(str(store), anchors=ANCHORS).staged_fingerprint(MD) is None


def test_rsa_missing_is_incomplete(store: Path) -> None:
    sf.add_staged(store, MD, key_types=("rsa", "secp256r1"), skip_files=("pubcert.pem",))
    assert "pubcert.pem" in invalid(store, check="incomplete").message


@pytest.mark.parametrize("how", ["missing", "symlink", "directory", "fifo", "garbage", "huge"])
def test_key_file(store: Path, tmp_path: Path, how: str) -> None:
    sf.add_staged(store, MD, key_types=("rsa", "secp256r1"))
    p = staged_dir(store) / "privkey.secp256r1.pem"
    good = p.read_bytes()
    p.unlink()
    if how == "symlink":
        (tmp_path / "elsewhere.pem").write_bytes(good)
        p.symlink_to(tmp_path / "elsewhere.pem")
    elif how == "directory":
        p.mkdir()
    elif how == "fifo":
        os.mkfifo(p)
    elif how == "garbage":
        p.write_bytes(b"hello")
    elif how == "huge":
        p.write_bytes(good + b"\n" * MAX_PEM_BYTES)
    expected = "too-large" if how == "huge" else "key-file"
    assert "privkey.secp256r1.pem" in invalid(store, check=expected).message


# -- validity period ---------------------------------------------------------------------------


def test_expired(store: Path) -> None:
    now = time.time()
    sf.add_staged(store, MD, valid_from=now - 100 * DAY, valid_until=now - DAY)
    invalid(store, check="expired")


def test_not_yet_valid(store: Path) -> None:
    now = time.time()
    sf.add_staged(store, MD, valid_from=now + DAY, valid_until=now + 90 * DAY)
    invalid(store, check="not-yet-valid")


def test_validity_uses_the_clock(store: Path) -> None:
    now = time.time()
    sf.add_staged(store, MD, valid_from=now - DAY, valid_until=now + 10 * DAY)
    assert Store(str(store), anchors=ANCHORS, clock=lambda: now).check_staged(MD).md == MD
    invalid(store, check="expired", clock=lambda: now + 11 * DAY)
    invalid(store, check="not-yet-valid", clock=lambda: now - 2 * DAY)


def test_expired_ec_in_a_mixed_set(store: Path) -> None:
    kts = ("rsa", "secp256r1")
    sf.add_staged(store, MD, key_types=kts)
    now = time.time()
    old_ec = sf.issue([MD], "secp256r1", not_before=now - 100 * DAY, not_after=now - DAY)
    (staged_dir(store) / "pubcert.secp256r1.pem").write_bytes(old_ec.chain_pem)
    assert "pubcert.secp256r1.pem" in invalid(store, check="expired").message


# -- names ---------------------------------------------------------------------------------------


def test_wrong_names(store: Path) -> None:
    sf.add_staged(store, MD, [MD, "www.example.org"], cert_names=[MD])
    err = invalid(store, check="names")
    assert "www.example.org" in err.message


def test_cert_for_another_domain(store: Path) -> None:
    sf.add_staged(store, MD, cert_names=["example.net"])
    invalid(store, check="names")


def test_wildcard_md_name_and_wildcard_san(store: Path) -> None:
    md = "*.example.org"
    new = sf.add_staged(store, md, [md])
    assert Store(str(store), anchors=ANCHORS).check_staged(md).fingerprint == new.fingerprint


def test_wildcard_san_covers_one_label(store: Path) -> None:
    sf.add_staged(store, MD, [MD, "a.example.org", "b.example.org"],
                  cert_names=[MD, "*.example.org"])
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).names == (MD, "a.example.org", "b.example.org")


def test_wildcard_san_does_not_cover_two_labels(store: Path) -> None:
    sf.add_staged(store, MD, [MD, "a.b.example.org"], cert_names=[MD, "*.example.org"])
    assert "a.b.example.org" in invalid(store, check="names").message


def test_wildcard_san_does_not_cover_the_bare_domain(store: Path) -> None:
    sf.add_staged(store, MD, [MD], cert_names=["*.example.org"])
    invalid(store, check="names")


def test_wildcard_md_needs_the_wildcard_san(store: Path) -> None:
    md = "*.example.org"
    sf.add_staged(store, md, [md], cert_names=["a.example.org", "example.org"])
    invalid(store, md, check="names")


def test_ip_names(store: Path) -> None:
    sf.add_staged(store, MD, [MD, "192.0.2.7"])
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).names == (MD, "192.0.2.7")
    shutil.rmtree(staged_dir(store))
    sf.add_staged(store, MD, [MD, "192.0.2.7"], cert_names=[MD, "192.0.2.8"])
    invalid(store, check="names")


def test_names_compare_without_case(store: Path) -> None:
    sf.add_staged(store, MD, [MD], cert_names=["Example.ORG"])
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).md == MD


@pytest.mark.parametrize(("name", "sans", "covered"), [
    ("a.example.org", ["a.example.org"], True),
    ("a.example.org", ["*.example.org"], True),
    ("example.org", ["*.example.org"], False),
    ("a.b.example.org", ["*.example.org"], False),
    ("*.example.org", ["*.example.org"], True),
    ("*.example.org", ["a.example.org"], False),
    ("*.example.org", ["*.org"], False),
    ("a.example.org", ["*.*.org"], False),
    ("a.example.org", ["b.example.org"], False),
    ("org", ["*.org"], False),
    ("a.example.org", [], False),
])
def test_name_covered(name: str, sans: list[str], covered: bool) -> None:
    assert name_covered(name, set(sans)) is covered


def test_staging_md_json_lying_about_names_loses(store: Path) -> None:
    names = [MD, "www.example.org"]
    sf.add_active(store, MD, names)
    # www-data rewrites staging's md.json to claim fewer names than the cert lacks.
    sf.add_staged(store, MD, names, cert_names=[MD])
    (staged_dir(store) / "md.json").write_text(json.dumps(sf.md_json(MD, [MD])))
    err = invalid(store, check="names")
    assert "www.example.org" in err.message


def test_staging_md_json_lying_about_key_types_loses(store: Path) -> None:
    kts = ("rsa", "secp256r1")
    sf.add_active(store, MD, key_types=kts)
    sf.add_staged(store, MD, key_types=kts, skip_files=("pubcert.secp256r1.pem",))
    (staged_dir(store) / "md.json").write_text(json.dumps(sf.md_json(MD, [MD], ("rsa",))))
    invalid(store, check="incomplete")


def test_domains_md_json_wins_for_a_valid_set(store: Path) -> None:
    sf.add_active(store, MD, [MD, "www.example.org"])
    sf.add_staged(store, MD, [MD, "www.example.org"])
    (staged_dir(store) / "md.json").write_text(json.dumps(sf.md_json(MD, ["evil.example"])))
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).names == (MD, "www.example.org")


def test_staging_md_json_used_without_domains(store: Path) -> None:
    sf.add_staged(store, MD, [MD, "www.example.org"], cert_names=[MD])
    invalid(store, check="names")


# -- same as active --------------------------------------------------------------------------


def test_same_as_active(store: Path) -> None:
    old = sf.add_active(store, MD)
    sf.add_staged(store, MD)
    shutil.copy(store / "domains" / MD / "pubcert.pem", staged_dir(store) / "pubcert.pem")
    err = invalid(store, check="same-as-active")
    assert "pubcert.pem" in err.message
    assert Store(str(store), anchors=ANCHORS).staged_fingerprint(MD) == old.fingerprint


def test_same_as_active_for_one_key_type(store: Path) -> None:
    kts = ("rsa", "secp256r1")
    sf.add_active(store, MD, key_types=kts)
    sf.add_staged(store, MD, key_types=kts)
    shutil.copy(store / "domains" / MD / "pubcert.secp256r1.pem",
                staged_dir(store) / "pubcert.secp256r1.pem")
    assert "secp256r1" in invalid(store, check="same-as-active").message


def test_broken_active_set_does_not_block(store: Path) -> None:
    sf.add_active(store, MD)
    (store / "domains" / MD / "pubcert.pem").write_bytes(b"garbage")
    new = sf.add_staged(store, MD)
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).fingerprint == new.fingerprint


# -- hostile file system objects ----------------------------------------------------------------


def test_symlink_at_staging_md_dir(store: Path) -> None:
    sf.add_staged(store, "other.org", [MD])     # a complete set for MD's names, elsewhere
    os.symlink("other.org", staged_dir(store))
    invalid(store, check="not-directory")
    with pytest.raises(StagingInvalid):
        Store(str(store), anchors=ANCHORS).staged_fingerprint(MD)


def test_symlink_at_staging_dir(store: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    sf.add_staged(store, MD)
    os.rename(store / "staging", elsewhere / "staging")
    os.symlink(elsewhere / "staging", store / "staging")
    invalid(store, check="not-directory")


def test_file_at_staging_md_dir(store: Path) -> None:
    staged_dir(store).write_text("not a dir")
    invalid(store, check="not-directory")


def test_symlink_at_pubcert(store: Path, tmp_path: Path) -> None:
    sf.add_staged(store, MD)
    target = tmp_path / "real.pem"
    os.rename(staged_dir(store) / "pubcert.pem", target)
    os.symlink(target, staged_dir(store) / "pubcert.pem")
    err = invalid(store, check="not-regular-file")
    assert f"staging/{MD}/pubcert.pem" in err.message
    with pytest.raises(StagingInvalid):
        Store(str(store), anchors=ANCHORS).staged_fingerprint(MD)


def test_dangling_symlink_at_pubcert(store: Path) -> None:
    sf.add_staged(store, MD)
    (staged_dir(store) / "pubcert.pem").unlink()
    os.symlink("/nonexistent/x.pem", staged_dir(store) / "pubcert.pem")
    invalid(store, check="not-regular-file")


def test_symlink_at_md_json(store: Path, tmp_path: Path) -> None:
    sf.add_staged(store, MD)
    target = tmp_path / "md.json"
    os.rename(staged_dir(store) / "md.json", target)
    os.symlink(target, staged_dir(store) / "md.json")
    assert "md.json" in invalid(store, check="not-regular-file").message


def test_symlink_at_job_json(store: Path, tmp_path: Path) -> None:
    sf.add_staged(store, MD)
    target = tmp_path / "job.json"
    os.rename(staged_dir(store) / "job.json", target)
    os.symlink(target, staged_dir(store) / "job.json")
    invalid(store, check="not-regular-file")
    assert Store(str(store), anchors=ANCHORS).job_notified(MD) is False


@pytest.mark.parametrize("name", ["pubcert.pem", "md.json", "job.json"])
def test_fifo_does_not_block(store: Path, name: str) -> None:
    sf.add_staged(store, MD)
    (staged_dir(store) / name).unlink()
    os.mkfifo(staged_dir(store) / name)
    started = time.monotonic()
    invalid(store, check="not-regular-file")
    assert Store(str(store), anchors=ANCHORS).job_notified(MD) is False
    assert time.monotonic() - started < 5


def test_directory_at_pubcert(store: Path) -> None:
    sf.add_staged(store, MD)
    (staged_dir(store) / "pubcert.pem").unlink()
    (staged_dir(store) / "pubcert.pem").mkdir()
    invalid(store, check="not-regular-file")


def test_huge_pubcert(store: Path) -> None:
    sf.add_staged(store, MD)
    p = staged_dir(store) / "pubcert.pem"
    p.write_bytes(p.read_bytes() + b"\n" * MAX_PEM_BYTES)
    err = invalid(store, check="too-large")
    assert "pubcert.pem" in err.message
    with pytest.raises(StagingInvalid):
        Store(str(store), anchors=ANCHORS).staged_fingerprint(MD)


def test_pubcert_at_the_cap_is_read(store: Path) -> None:
    sf.add_staged(store, MD)
    p = staged_dir(store) / "pubcert.pem"
    data = p.read_bytes()
    p.write_bytes(data + b"\n" * (MAX_PEM_BYTES - len(data)))
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).md == MD


def test_huge_json(store: Path) -> None:
    sf.add_staged(store, MD)
    obj = sf.md_json(MD)
    obj["padding"] = "x" * MAX_JSON_BYTES
    (staged_dir(store) / "md.json").write_text(json.dumps(obj))
    invalid(store, check="too-large")


def test_too_many_certificates(store: Path) -> None:
    new = sf.add_staged(store, MD)
    ca_pem = sf.default_ca().pem
    (staged_dir(store) / "pubcert.pem").write_bytes(new.certs["rsa"].chain_pem + ca_pem * MAX_CHAIN_CERTS)
    invalid(store, check="chain-too-long")


@pytest.mark.parametrize("content", [
    b"",
    b"not a certificate",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\nunterminated\n",
])
def test_cert_parse(store: Path, content: bytes) -> None:
    sf.add_staged(store, MD)
    (staged_dir(store) / "pubcert.pem").write_bytes(content)
    invalid(store, check="cert-parse")


def test_bad_chain_certificate(store: Path) -> None:
    new = sf.add_staged(store, MD)
    bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (staged_dir(store) / "pubcert.pem").write_bytes(new.certs["rsa"].chain_pem + bad)
    invalid(store, check="cert-parse")


# -- job.json ---------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", [False, None, "true", 1])
def test_job_not_finished(store: Path, finished) -> None:
    sf.add_staged(store, MD, job={"finished": finished})
    invalid(store, check="job-not-finished")


def test_job_errors(store: Path) -> None:
    sf.add_staged(store, MD, job={
        "errors": 2,
        "last": {"status": 11, "problem": "urn:ietf:params:acme:error:rateLimited",
                 "detail": "too many certificates"}})
    invalid(store, check="job-errors")


def test_job_errors_from_a_failed_notification_are_accepted(store: Path) -> None:
    # A failed `renewed` hook increments `errors` on a finished job; the hook is asked again
    # later, and that retry must be able to succeed.
    new = sf.add_staged(store, MD, job={
        "errors": 1,
        "last": {"status": 20014, "problem": "urn:org:apache:httpd:log:AH10109:",
                 "detail": "MDMessageCmd /usr/bin/apache-restart-hook failed with exit code 1."}})
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).fingerprint == new.fingerprint


def test_job_errors_with_a_successful_last_result_are_accepted(store: Path) -> None:
    sf.add_staged(store, MD, job={"errors": 3, "last": {"status": 0}})
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).md == MD


@pytest.mark.parametrize("job", [{"errors": "many"}, {"errors": -1}, {"errors": True}, {"name": "other.org"}])
def test_job_json_malformed_fields(store: Path, job) -> None:
    sf.add_staged(store, MD, job=job)
    invalid(store, check="job-json")


@pytest.mark.parametrize("content", [b"", b"{", b"[true]", b"null"])
def test_job_json_not_an_object(store: Path, content: bytes) -> None:
    sf.add_staged(store, MD)
    (staged_dir(store) / "job.json").write_bytes(content)
    invalid(store, check="job-json")


def test_job_json_absent_is_accepted(store: Path) -> None:
    new = sf.add_staged(store, MD, job=None)
    assert not (staged_dir(store) / "job.json").exists()
    assert Store(str(store), anchors=ANCHORS).check_staged(MD).fingerprint == new.fingerprint


def test_job_notified(store: Path) -> None:
    s = Store(str(store), anchors=ANCHORS)
    assert s.job_notified(MD) is False                      # nothing at all
    sf.add_staged(store, MD)
    assert s.job_notified(MD) is False                      # "notified-renewed": false
    sf.write_job(store, MD, **{"notified-renewed": True})
    assert s.job_notified(MD) is True
    sf.write_job(store, MD, **{"notified-renewed": "true"})
    assert s.job_notified(MD) is False
    (staged_dir(store) / "job.json").write_text("{")
    assert s.job_notified(MD) is False
    (staged_dir(store) / "job.json").unlink()
    assert s.job_notified(MD) is False
    assert s.job_notified("Not/Valid") is False


# -- names of MDs ---------------------------------------------------------------------------------


VALID_NAMES = [
    "example.org", "www.example.org", "*.example.org", "localhost", "*.x", "a-b.example",
    "xn--bcher-kva.example", "0.example", "a" * 63 + ".org",
    ".".join(["a" * 63] * 3) + "." + "b" * 61,                  # exactly 253
]

INVALID_NAMES = [
    "Example.org",                  # upper case
    "EXAMPLE.ORG",
    "..",
    "../etc",
    "a/b",
    "/etc",
    "example.org.",                 # trailing dot
    "a" * 64 + ".org",              # label too long
    ".".join(["a" * 63] * 3) + "." + "b" * 62,                  # 254
    "",
    "a..b",
    ".example.org",
    "-a.b",
    "a-.b",
    "*",
    "*.",
    "*.*.x",
    "a.*.x",
    "*a.example.org",
    "a b.example",
    "a_b.example",
    "bücher.example",
    "example.org\0",
    "example.org\n",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    assert len(name) <= MAX_NAME_LEN
    validate_md_name(name)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names(store: Path, name: str) -> None:
    with pytest.raises(InvalidName) as ei:
        validate_md_name(name)
    assert ei.value.message
    s = Store(str(store), anchors=ANCHORS)
    with pytest.raises(InvalidName):
        s.check_staged(name)
    with pytest.raises(InvalidName):
        s.staged_fingerprint(name)
    with pytest.raises(InvalidName):
        s.active(name)
    assert s.job_notified(name) is False


def test_invalid_name_type() -> None:
    with pytest.raises(InvalidName):
        validate_md_name(None)  # type: ignore[arg-type]


# -- nothing staged ---------------------------------------------------------------------------


def test_nothing_staged_for_unknown_md(store: Path) -> None:
    sf.add_staged(store, "other.org")
    with pytest.raises(NothingStaged) as ei:
        Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert str(store) not in ei.value.message


def test_nothing_staged_with_only_an_active_set(store: Path) -> None:
    sf.add_active(store, MD)
    with pytest.raises(NothingStaged):
        Store(str(store), anchors=ANCHORS).check_staged(MD)


def test_nothing_staged_while_renewal_runs(store: Path) -> None:
    # mod_md writes md.json and job.json into staging first and pubcert.pem last.
    sf.add_active(store, MD)
    sf.add_staged(store, MD, job={"finished": False}, skip_files=("pubcert.pem",))
    with pytest.raises(NothingStaged):
        Store(str(store), anchors=ANCHORS).check_staged(MD)


def test_nothing_staged_without_staging_md_json(store: Path) -> None:
    # mod_md activates nothing from a staging area without md.json.
    sf.add_active(store, MD)
    sf.add_staged(store, MD, write_md_json=False)
    with pytest.raises(NothingStaged):
        Store(str(store), anchors=ANCHORS).check_staged(MD)


def test_nothing_staged_without_store(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "missing"))
    with pytest.raises(NothingStaged):
        s.check_staged(MD)
    assert s.staged_fingerprint(MD) is None
    assert s.active(MD) is None
    assert s.list_mds() == []
    assert s.job_notified(MD) is False


def test_nothing_staged_with_empty_staging_dir(store: Path) -> None:
    staged_dir(store).mkdir()
    with pytest.raises(NothingStaged):
        Store(str(store), anchors=ANCHORS).check_staged(MD)
    assert Store(str(store), anchors=ANCHORS).staged_fingerprint(MD) is None


# -- list_mds, active, staged_fingerprint -------------------------------------------------------


def test_list_mds(store: Path, tmp_path: Path) -> None:
    sf.add_active(store, "a.org")
    sf.add_staged(store, "b.org")
    sf.add_active(store, "c.org")
    sf.add_staged(store, "c.org")
    sf.add_staged(store, "*.d.org")
    (store / "domains" / "UPPER.org").mkdir()
    (store / "staging" / "file.org").write_text("x")
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", store / "domains" / "link.org")
    (store / "archive" / "e.org.1").mkdir()
    assert Store(str(store), anchors=ANCHORS).list_mds() == ["*.d.org", "a.org", "b.org", "c.org"]


def test_list_mds_without_groups(tmp_path: Path) -> None:
    (tmp_path / "md").mkdir()
    assert Store(str(tmp_path / "md")).list_mds() == []


def test_active(store: Path) -> None:
    s = Store(str(store), anchors=ANCHORS)
    assert s.active(MD) is None
    old = sf.add_active(store, MD, [MD, "www.example.org"], key_types=("rsa", "secp256r1"))
    cs = s.active(MD)
    assert cs is not None
    assert cs.fingerprint == old.fingerprint
    assert cs.names == (MD, "www.example.org")
    assert [c.sha256 for c in cs.certs] == [old.sha256("rsa"), old.sha256("secp256r1")]
    (store / "domains" / MD / "pubcert.secp256r1.pem").unlink()
    assert s.active(MD) is None                              # incomplete


def test_active_does_not_check_validity(store: Path) -> None:
    now = time.time()
    old = sf.add_active(store, MD, valid_from=now - 100 * DAY, valid_until=now - DAY)
    cs = Store(str(store), anchors=ANCHORS).active(MD)
    assert cs is not None and cs.fingerprint == old.fingerprint


def test_staged_fingerprint_after_activate(store: Path) -> None:
    s = Store(str(store), anchors=ANCHORS)
    old = sf.add_active(store, MD, key_types=("rsa", "secp256r1"))
    new = sf.add_staged(store, MD, key_types=("rsa", "secp256r1"))
    assert s.staged_fingerprint(MD) == new.fingerprint
    assert s.check_staged(MD).fingerprint == new.fingerprint
    assert s.active(MD).fingerprint == old.fingerprint

    assert sf.activate(store, MD) == "activated"

    assert s.staged_fingerprint(MD) is None
    assert s.active(MD).fingerprint == new.fingerprint
    assert (store / "archive" / f"{MD}.1" / "pubcert.pem").is_file()
    assert Store(str(store), anchors=ANCHORS).active(MD).certs[0].sha256 == new.sha256("rsa")
    assert b"ENCRYPTED" not in (store / "domains" / MD / "privkey.pem").read_bytes()
    with pytest.raises(NothingStaged):
        s.check_staged(MD)

    newer = sf.add_staged(store, MD, key_types=("rsa", "secp256r1"))
    assert sf.activate(store, MD) == "activated"
    assert (store / "archive" / f"{MD}.2").is_dir()
    assert s.active(MD).fingerprint == newer.fingerprint


def test_staged_fingerprint_without_validity_checks(store: Path) -> None:
    now = time.time()
    new = sf.add_staged(store, MD, valid_from=now - 100 * DAY, valid_until=now - DAY, job={"finished": False})
    assert Store(str(store), anchors=ANCHORS).staged_fingerprint(MD) == new.fingerprint


def test_activate_mismatching_key_purges(store: Path) -> None:
    old = sf.add_active(store, MD, key_types=("secp256r1",))
    sf.add_staged(store, MD, key_types=("secp256r1",), keys={"secp256r1": sf.new_key("secp256r1")})
    other = sf.new_key("secp256r1")
    (staged_dir(store) / "privkey.secp256r1.pem").write_bytes(
        sf.key_pem(other, sf.store_passphrase(store)))
    assert sf.activate(store, MD) == "purged"
    assert not staged_dir(store).exists()
    assert Store(str(store), anchors=ANCHORS).active(MD).fingerprint == old.fingerprint


def test_activate_missing_file_leaves_staging(store: Path) -> None:
    sf.add_staged(store, MD, key_types=("rsa", "secp256r1"), skip_files=("pubcert.secp256r1.pem",))
    assert sf.activate(store, MD) == "missing"
    assert (staged_dir(store) / "pubcert.pem").is_file()
    assert sf.activate(store, "other.org") == "nothing-staged"


@pytest.mark.parametrize(("name", "words"), [
    ("Example.org", "lower case"),
    ("example.org.", "dot"),
    ("*.*.x", "wildcard"),
    ("a..b", "empty label"),
    ("", "empty"),
    ("a/b", "forbidden"),
    ("bücher.example", "ASCII"),
    ("x" * 254, str(MAX_NAME_LEN)),
])
def test_invalid_name_messages(name: str, words: str) -> None:
    with pytest.raises(InvalidName) as ei:
        validate_md_name(name)
    assert words in ei.value.message


def test_storefactory_fingerprint_readers(store: Path) -> None:
    assert sf.read_active_fingerprint(store, MD) is None
    old = sf.add_active(store, MD, key_types=("rsa", "secp256r1"))
    new = sf.add_staged(store, MD, key_types=("rsa", "secp256r1"))
    assert sf.read_active_fingerprint(store, MD) == old.fingerprint
    assert sf.read_staged_fingerprint(store, MD) == new.fingerprint
    sf.activate(store, MD)
    assert sf.read_active_fingerprint(store, MD) == new.fingerprint
    assert sf.read_staged_fingerprint(store, MD) is None


def test_storefactory_validity_aliases_and_write_job(store: Path) -> None:
    now = time.time()
    new = sf.add_staged(store, MD, not_before=now - 2 * DAY, not_after=now - DAY)
    assert abs(new.certs["rsa"].not_after - (now - DAY)) < 1
    invalid(store, check="expired")
    with pytest.raises(TypeError):
        sf.add_staged(store, MD, valid_from=now, not_before=now)
    sf.write_job(store, MD, {"notified-renewed": True}, finished=False)
    job = json.loads((staged_dir(store) / "job.json").read_text())
    assert (job["notified-renewed"], job["finished"], job["name"]) == (True, False, MD)


def test_list_mds_keeps_every_managed_md_and_only_the_first_unmanaged_ones(store: Path) -> None:
    """www-data can make any number of directories under staging/: the ones no managed MD owns
    are listed up to a bound (the first by name) and the rest only counted; every MD under
    domains/ (root's) is listed, whatever its name sorts after."""
    for i in range(staging.MAX_UNMANAGED_LISTED + 136):
        (store / "staging" / f"junk{i:04d}.org").mkdir()
    for md in ("a.org", "zzz.org"):
        sf.add_active(store, md)
    sf.add_staged(store, "zzz.org")  # staged and managed: not an unmanaged one
    listed, left_out = Store(str(store), anchors=ANCHORS).survey()
    junk = [f"junk{i:04d}.org" for i in range(staging.MAX_UNMANAGED_LISTED)]
    assert listed == sorted(["a.org", "zzz.org", *junk])
    assert left_out == 136
    assert Store(str(store), anchors=ANCHORS).list_mds() == listed
