"""Property-based tests of broker.staging against hostile stores (hypothesis).

`staging/` is written by www-data. Each example starts from a valid store built by
harness/storefactory.py, lets hypothesis damage it (file contents, symlinks, FIFOs, sockets,
directories, huge files, junk) and checks what the readers of broker.staging promise:

* only the documented exception types, and no hang (pytest-timeout fails a test that hangs,
  e.g. on a FIFO opened for reading);
* nothing that is not a regular file, or a set directory that is not a real directory, is ever
  accepted; below the store's root every path is opened relative to a directory fd with
  O_NOFOLLOW, nothing outside the store is ever opened and no fd leaks;
* whatever is accepted agrees with independent readers: storefactory's fingerprints and a model
  of how OpenSSL (so mod_md) reads a pubcert*.pem;
* error messages name the failed check and carry no absolute path.

The runs are derandomized (no example database): CI sees the same examples every time.
The example-based cases live in test_staging.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from broker.config import from_mapping
from broker.engine import Engine
from broker.errors import BrokerError, InvalidName, NothingStaged, StagingInvalid
from broker.staging import MAX_JSON_BYTES, MAX_NAME_LEN, MAX_PEM_BYTES, CertSet, Store, validate_md_name
from broker.state import StateFile
from harness import storefactory as sf

MD = "example.org"
NAMES = (MD, "www.example.org")
KEY_TYPE_SETS = (("rsa",), ("secp256r1",), ("rsa", "secp384r1"))
DAY = 86400.0
ANCHORS = sf.anchors()


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    print_blob=False, suppress_health_check=[HealthCheck.too_slow])


# -- oracles ------------------------------------------------------------------------------------

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_MD_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


def reference_valid(name: object) -> bool:
    """An MD name as the broker must accept it: a lower-case DNS name, maybe "*." in front."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN and _MD_NAME.fullmatch(name) is not None


def openssl_leaf_sha256(data: bytes) -> str | None:
    """sha256 of the first certificate OpenSSL's PEM_read_X509 (so mod_md) takes from `data`.

    A model of OpenSSL's PEM reader: a block starts only at a line beginning with
    "-----BEGIN ", "CERTIFICATE" and "X509 CERTIFICATE" blocks are certificates, other blocks
    are skipped. None when the model finds none (or cannot decode it).
    """
    lines = data.split(b"\n")
    i = 0
    while i < len(lines):
        head = lines[i].rstrip()
        i += 1
        if not (head.startswith(b"-----BEGIN ") and head.endswith(b"-----") and len(head) > 16):
            continue
        body = []
        while i < len(lines) and not lines[i].startswith(b"-----END "):
            body.append(lines[i].strip())
            i += 1
        if i == len(lines):
            return None
        i += 1
        if head[11:-5] in (b"CERTIFICATE", b"X509 CERTIFICATE"):
            try:
                return hashlib.sha256(base64.b64decode(b"".join(body), validate=True)).hexdigest()
            except ValueError:
                return None
    return None


def kind(path: Path) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:      # absent, or below something that is no directory (or a symlink loop)
        return "missing"
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "other"


def key_types_of(md_json: Path) -> tuple[str, ...] | None:
    """The key types an md.json configures (storefactory's reading); None if unreadable."""
    if kind(md_json) != "file":
        return None
    try:
        return tuple(sf._spec_key_types(json.loads(md_json.read_bytes())))
    except Exception:
        return None


def json_object(path: Path) -> dict[str, Any] | None:
    """The file as the broker's JSON reader sees it: a regular file within the cap, an object."""
    if kind(path) != "file" or path.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        obj = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# -- calling the code under test -------------------------------------------------------------------


_real_open = os.open


class OpenSpy:
    """Stands in for os.open during a call: records how and what the code opens."""

    def __init__(self) -> None:
        self.absolute: list[str] = []                 # paths opened without a dir_fd
        self.following: list[str] = []                # dir_fd-relative opens without O_NOFOLLOW
        self.inodes: set[tuple[int, int]] = set()     # (st_dev, st_ino) of everything opened

    def __call__(self, path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if dir_fd is None:
            self.absolute.append(os.fsdecode(path))
        elif not flags & os.O_NOFOLLOW:
            self.following.append(os.fsdecode(path))
        fd = _real_open(path, flags, mode, dir_fd=dir_fd)
        st_ = os.fstat(fd)
        self.inodes.add((st_.st_dev, st_.st_ino))
        return fd


def _open_fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


@dataclass
class Outcome:
    value: Any = None
    error: Exception | None = None
    spy: OpenSpy = field(default_factory=OpenSpy)
    fds_before: int | None = None
    fds_after: int | None = None


def call(what: str, fn: Callable[[], Any]) -> Outcome:
    """Run `fn` under the open spy. Exceptions are caught and returned; a hang is left to
    pytest-timeout, which fails the test."""
    out = Outcome(fds_before=_open_fd_count())
    with mock.patch.object(os, "open", out.spy):
        try:
            out.value = fn()
        except Exception as e:
            out.error = e
    out.fds_after = _open_fd_count()
    # Shown by pytest --hypothesis-show-statistics: how often each outcome was reached.
    event(f"{what}: " + (
        f"{type(out.error).__name__}({getattr(out.error, 'check', '')})" if out.error is not None
        else type(out.value).__name__))
    return out


# -- the stores --------------------------------------------------------------------------------------


class Material:
    """Template stores and PEM pieces, made once per module (certificates are costly)."""

    def __init__(self, templates: dict[tuple[tuple[str, ...], bool], Path],
                 certs: dict[tuple[str, str], bytes], key_pem: dict[str, bytes]) -> None:
        self.templates = templates      # (key types, with an active set) -> store
        self.certs = certs              # (piece, key type) -> PEM of one certificate
        self.key_pem = key_pem          # key type -> a PEM private key

    def __repr__(self) -> str:          # keeps hypothesis' report of a failing example short
        return "Material(...)"


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Material:
    base = tmp_path_factory.mktemp("templates")
    templates: dict[tuple[tuple[str, ...], bool], Path] = {}
    for i, kts in enumerate(KEY_TYPE_SETS):
        for with_active in (False, True):
            store = sf.make_store(base, f"store{i}{int(with_active)}")
            if with_active:
                sf.add_active(store, MD, list(NAMES), key_types=kts)
            sf.add_staged(store, MD, list(NAMES), key_types=kts)
            assert Store(str(store), anchors=ANCHORS).check_staged(MD).md == MD
            templates[(kts, with_active)] = store
    now = time.time()
    pem = serialization.Encoding.PEM
    certs: dict[tuple[str, str], bytes] = {}
    keys: dict[str, bytes] = {}
    for kt in {kt for kts in KEY_TYPE_SETS for kt in kts}:
        certs[("leaf", kt)] = sf.issue(list(NAMES), kt).cert.public_bytes(pem)
        certs[("expired", kt)] = sf.issue(
            list(NAMES), kt, not_before=now - 100 * DAY, not_after=now - DAY).cert.public_bytes(pem)
        certs[("other", kt)] = sf.issue(["other.example"], kt).cert.public_bytes(pem)
        certs[("ca", kt)] = sf.default_ca().pem
        keys[kt] = sf.key_pem(sf.leaf_key(kt))
    return Material(templates, certs, keys)


@dataclass
class Workspace:
    root: Path          # the example's temporary directory: must never show in a message
    store: Path
    outside: Path       # symlink targets outside the store
    template: Path
    serial: int = 0

    def fresh(self, name: str) -> Path:
        self.serial += 1
        return self.outside / f"{self.serial}-{name}"


@contextlib.contextmanager
def workspace(template: Path) -> Iterator[Workspace]:
    with tempfile.TemporaryDirectory(prefix="staging-fuzz-") as tmp:
        root = Path(tmp)
        store = root / "md"
        shutil.copytree(template, store, symlinks=True)
        (root / "outside").mkdir()
        yield Workspace(root, store, root / "outside", template)


def _remove(path: Path) -> None:
    k = kind(path)
    if k == "dir":
        shutil.rmtree(path)
    elif k != "missing":
        path.unlink()


def _make_socket(path: Path) -> None:
    try:
        os.mknod(path, 0o600 | stat.S_IFSOCK)
    except OSError:
        # Where mknod cannot make sockets: bind one (by a short relative path).
        cwd = os.getcwd()
        os.chdir(path.parent)
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(path.name)
        finally:
            os.chdir(cwd)


def _place(ws: Workspace, path: Path, how: str, original: Path) -> None:
    """Replace whatever is at `path` by a hostile object (`original`: its valid content, in the
    template: a file or a set/group directory)."""
    _remove(path)
    if how == "symlink-outside":                 # to a valid copy outside the store
        target = ws.fresh(path.name)
        if original.is_dir():
            shutil.copytree(original, target, symlinks=True)
        else:
            shutil.copyfile(original, target)
        os.symlink(target, path)
    elif how == "symlink-inside":                # to a valid copy beside it, by a relative path
        target = path.parent / ("copy.example" if original.is_dir() else f".{path.name}.orig")
        _remove(target)
        if original.is_dir():
            shutil.copytree(original, target, symlinks=True)
        else:
            shutil.copyfile(original, target)
        os.symlink(target.name, path)
    elif how == "symlink-dangling":
        os.symlink(ws.outside / "does-not-exist" / path.name, path)
    elif how == "symlink-dir":
        target = ws.fresh("dir")
        target.mkdir()
        os.symlink(target, path)
    elif how == "symlink-loop":
        os.symlink(path.name, path)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "socket":
        _make_socket(path)
    elif how == "dir":
        path.mkdir()
    elif how == "file":
        path.write_bytes(b"not a directory\n")
    elif how != "missing":
        raise AssertionError(how)


def _render_pem(mat: Material, key_type: str, pieces: tuple[tuple[Any, ...], ...]) -> bytes:
    out = b""
    for piece in pieces:
        if piece[0] == "cert":
            _, which, label, prefix, crlf = piece
            block = mat.certs[(which, key_type)].replace(b"CERTIFICATE", label.encode())
            block = prefix.encode() + block
            out += block.replace(b"\n", b"\r\n") if crlf else block
        elif piece[0] == "key":
            out += mat.key_pem[key_type]
        else:
            out += piece[1].encode() + b"\n"
    return out


def _key_type_of(file: str) -> str:
    parts = file.split(".")
    return "rsa" if len(parts) == 2 else parts[1]


def _content(mat: Material, path: Path, template_file: Path, op: str, arg: Any) -> bytes:
    base = path.read_bytes() if kind(path) == "file" else (
        template_file.read_bytes() if template_file.is_file() else b"")
    cap = MAX_JSON_BYTES if path.name.endswith(".json") else MAX_PEM_BYTES
    if op == "replace":
        return arg
    if op == "truncate":
        return base[:len(base) * arg // 1000]
    if op == "append":
        return base + arg
    if op == "flip":
        if not base:
            return base
        pos = min(len(base) - 1, len(base) * arg[0] // 1000)
        return base[:pos] + bytes([base[pos] ^ arg[1]]) + base[pos + 1:]
    if op == "empty":
        return b""
    if op in ("at-cap", "over-cap"):
        size = cap if op == "at-cap" else cap + 1
        return base[:size] + b"\n" * (size - len(base))
    if op == "json":
        return json.dumps(arg).encode()
    if op == "field":
        try:
            obj = json.loads(base)
        except (ValueError, RecursionError):
            obj = {}
        if not isinstance(obj, dict):
            obj = {}
        obj[arg[0]] = arg[1]
        return json.dumps(obj).encode()
    if op == "pem":
        return _render_pem(mat, _key_type_of(path.name), arg)
    raise AssertionError(op)


OBJECT_KINDS = ("symlink-outside", "symlink-inside", "symlink-dangling", "symlink-dir", "symlink-loop",
                "fifo", "socket", "dir", "missing")


@dataclass(frozen=True)
class Damage:
    group: str                     # "staging" or "domains": the set that is damaged
    key_types: tuple[str, ...]
    with_active: bool
    ops: tuple[tuple[Any, ...], ...]


def apply(ws: Workspace, mat: Material, damage: Damage) -> None:
    group = ws.store / damage.group
    set_dir = group / MD
    t_group = ws.template / damage.group
    t_set = t_group / MD
    for op, target, arg in damage.ops:
        if op == "group":
            _place(ws, group, arg, t_group)
        elif kind(group) != "dir":
            continue                # the rest lies below a group that is gone
        elif op == "set":
            _place(ws, set_dir, arg, t_set)
        elif kind(set_dir) != "dir":
            continue
        elif op == "junk":
            junk = set_dir / target
            if kind(junk) == "missing":
                if arg == "file":
                    junk.write_bytes(b"junk\n")
                else:
                    _place(ws, junk, arg, t_set / "md.json")
        elif op == "object":
            _place(ws, set_dir / target, arg, t_set / target)
        else:
            data = _content(mat, set_dir / target, t_set / target, op, arg)
            _remove(set_dir / target)
            (set_dir / target).write_bytes(data)


# -- strategies ----------------------------------------------------------------------------------------

labels = st.from_regex(re.compile(_LABEL), fullmatch=True)


@st.composite
def dns_names(draw: st.DrawFn) -> str:
    parts = draw(st.lists(labels, min_size=1, max_size=5))
    while len(".".join(parts)) > MAX_NAME_LEN - 2:
        parts.pop()
    name = ".".join(parts) if parts else "x"
    return ("*." + name) if draw(st.booleans()) else name


NEAR_MISS_CHARS = "az09-.*/_ \0\n\r\tAZ\u00e9\u0130\u212a\u0131:@"


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """A valid name with a character inserted, replaced or the whole name re-cased."""
    name = draw(dns_names())
    pos = draw(st.integers(0, len(name)))
    how = draw(st.sampled_from(["insert", "replace", "upper", "suffix", "prefix"]))
    ch = draw(st.sampled_from(NEAR_MISS_CHARS))
    if how == "insert":
        return name[:pos] + ch + name[pos:]
    if how == "replace":
        return name[:pos] + ch + name[pos + 1:]
    if how == "upper":
        return name.upper()
    return name + ch if how == "suffix" else ch + name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

privkey_values = st.one_of(
    st.sampled_from([None, [], {"type": "Default"}, {"type": "RSA", "bits": 4096}, {"type": "rsa"},
                     {"type": "EC", "curve": "secp256r1"}, {"type": "EC", "curve": "secp384r1"},
                     [{"type": "RSA"}, {"type": "EC", "curve": "secp384r1"}],
                     [{"type": "EC", "curve": "secp384r1"}, {"type": "RSA"}],
                     {"type": "EC", "curve": "../../x"}, {"type": "EC"}, "RSA"]),
    json_values,
)

FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(st.just(MD), st.just("other.example"), json_values),
    "domains": st.one_of(st.lists(st.sampled_from([*NAMES, "*.example.org", "127.0.0.1", "::1", "other.example",
                                                   "EXAMPLE.ORG", "x" * 300, "b\u00fccher.example"]),
                                  max_size=4), json_values),
    "privkey": privkey_values,
    "finished": st.one_of(st.booleans(), json_values),
    "notified-renewed": st.one_of(st.just(True), st.just(True), json_values),
    "errors": st.one_of(st.integers(-2, 3), json_values),
    "last": st.one_of(
        st.fixed_dictionaries({"status": st.one_of(st.integers(-1, 3), json_values)},
                              optional={"problem": st.one_of(
                                  st.sampled_from(["urn:org:apache:httpd:log:AH10109:",
                                                   "urn:ietf:params:acme:error:rateLimited"]), json_values)}),
        json_values),
}
MD_FIELDS = ("name", "domains", "privkey")
JOB_FIELDS = ("name", "finished", "notified-renewed", "errors", "last")

LABELS = ["CERTIFICATE"] * 5 + ["X509 CERTIFICATE", "TRUSTED CERTIFICATE"]
pem_pieces = st.lists(
    st.one_of(
        st.tuples(st.just("cert"), st.sampled_from(["leaf", "ca", "expired", "other"]), st.sampled_from(LABELS),
                  st.sampled_from(["", "", "", " ", "junk"]), st.booleans()),
        st.tuples(st.just("key")),
        st.tuples(st.just("text"), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)),
    ),
    min_size=1, max_size=5,
).map(tuple)


def content_ops(name: str, focus: str | None = None) -> st.SearchStrategy[tuple[Any, ...]]:
    """One change of the set's file `name`; `focus`: the file whose fields matter most."""
    args: dict[str, st.SearchStrategy[Any]] = {
        "replace": st.binary(max_size=300),
        "truncate": st.integers(0, 999),
        "append": st.binary(min_size=1, max_size=64),
        "flip": st.tuples(st.integers(0, 999), st.integers(1, 255)),
        "empty": st.none(),
        "at-cap": st.none(),
        "over-cap": st.none(),
        "object": st.sampled_from(OBJECT_KINDS),
    }
    ops = list(args) + ["object"]
    if name.endswith(".json"):
        fields = MD_FIELDS if name == "md.json" else JOB_FIELDS
        args["json"] = json_values
        args["field"] = st.sampled_from(fields).flatmap(lambda f: st.tuples(st.just(f), FIELD_VALUES[f]))
        ops += ["json"] + ["field"] * (10 if name == focus else 2)
    if name.startswith("pubcert"):
        args["pem"] = pem_pieces
        ops += ["pem"] * 3
    return st.sampled_from(ops).flatmap(lambda op: st.tuples(st.just(op), st.just(name), args[op]))


JUNK_NAMES = st.one_of(
    st.sampled_from(["README", ".md.json.swp", "pubcert.pem~", "privkey.pem.bak", "md.json.tmp", "tmp",
                     "job.json.old", "pubcert", "archive", "example.org"]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/"), min_size=1, max_size=20),
).filter(lambda n: n not in (".", "..") and not re.fullmatch(r"(md|job)\.json|(pubcert|privkey)(\..*)?\.pem", n))


@st.composite
def damages(draw: st.DrawFn, group: str = "staging", focus: str | None = None) -> Damage:
    key_types = draw(st.sampled_from(KEY_TYPE_SETS))
    with_active = True if group == "domains" else draw(st.booleans())
    files = ["md.json"] + (["job.json"] if group == "staging" else [])
    files += [f(kt) for kt in key_types for f in (sf.pubcert_name, sf.privkey_name)]
    file_names = st.sampled_from(files) if focus is None else st.sampled_from([focus, focus, *files])
    op = st.sampled_from(["file"] * 10 + ["junk"] * 2 + ["set", "group"]).flatmap(lambda what: {
        "file": file_names.flatmap(lambda name: content_ops(name, focus)),
        "set": st.tuples(st.just("set"), st.none(), st.sampled_from([*OBJECT_KINDS, "file"])),
        "junk": st.tuples(st.just("junk"), JUNK_NAMES,
                          st.sampled_from(["file", "symlink-outside", "symlink-dangling", "symlink-dir", "fifo",
                                           "socket", "dir"])),
        "group": st.tuples(st.just("group"), st.none(), st.sampled_from([*OBJECT_KINDS, "file"])),
    }[what])
    ops = draw(st.lists(op, max_size=4))
    return Damage(group, key_types, with_active, tuple(ops))


# -- common checks -------------------------------------------------------------------------------------------

def assert_clean(ws: Workspace, out: Outcome, allowed: tuple[type[Exception], ...]) -> None:
    """The call raised nothing but `allowed` (exact types), opened nothing outside the store, never
    asked to follow a symlink below its root, leaked no fd and named no absolute path."""
    if out.error is not None:
        assert type(out.error) in allowed, f"unexpected {type(out.error).__name__}: {out.error!r}"
        msg = str(out.error)
        assert msg.isprintable(), f"control character in {msg!r}"
        assert str(ws.root) not in msg and os.path.realpath(ws.root) not in msg, msg
        if isinstance(out.error, StagingInvalid):
            assert re.fullmatch(r"[a-z][a-z-]*", out.error.check), out.error.check
            assert msg == out.error.message and msg.startswith(out.error.check + ": "), msg
    assert not out.spy.following, f"opened without O_NOFOLLOW: {out.spy.following}"
    assert set(out.spy.absolute) <= {str(ws.store)}, out.spy.absolute
    outside: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(ws.outside):
        for name in [".", *dirnames, *filenames]:
            st_ = os.lstat(os.path.join(dirpath, name))
            if not stat.S_ISLNK(st_.st_mode):
                outside.add((st_.st_dev, st_.st_ino))
    assert not out.spy.inodes & outside, "opened something outside the store (followed a symlink)"
    assert out.fds_before == out.fds_after, "leaked a file descriptor"


def expected_fingerprint(set_dir: Path, key_types: tuple[str, ...]) -> str:
    """The set's fingerprint from the leaves as OpenSSL would take them."""
    sha256s = []
    for kt in key_types:
        sha = openssl_leaf_sha256((set_dir / sf.pubcert_name(kt)).read_bytes())
        assert sha is not None, f"accepted {sf.pubcert_name(kt)} although OpenSSL finds no certificate in it"
        sha256s.append(sha)
    return sf.fingerprint_of(sha256s)


def assert_set_matches(cs: CertSet, set_dir: Path, key_types: tuple[str, ...], names: Any) -> None:
    assert cs.md == MD
    assert cs.names == tuple(names)
    assert [c.file for c in cs.certs] == [sf.pubcert_name(kt) for kt in key_types]
    for c in cs.certs:
        assert c.sha256 == openssl_leaf_sha256((set_dir / c.file).read_bytes()), (
            f"{c.file}: verified another leaf than the one OpenSSL (mod_md) would activate")
    assert cs.fingerprint == expected_fingerprint(set_dir, key_types)
    assert cs.since == max(os.stat(set_dir / c.file).st_mtime for c in cs.certs)


# Known hostile layouts, always run: each puts an expired leaf first as OpenSSL reads the file,
# and the valid new leaf first for a scan for "-----BEGIN CERTIFICATE-----" anywhere.
_EXPIRED_FIRST = [
    (("cert", "expired", "X509 CERTIFICATE", "", False), ("cert", "leaf", "CERTIFICATE", "", False)),
    (("cert", "leaf", "CERTIFICATE", " ", False), ("cert", "expired", "CERTIFICATE", "", False)),
    (("cert", "leaf", "CERTIFICATE", "junk", False), ("cert", "expired", "CERTIFICATE", "", False)),
]


def _with_examples(group: str) -> Callable[[Any], Any]:
    def decorate(fn: Any) -> Any:
        for pieces in _EXPIRED_FIRST:
            fn = example(damage=Damage(group, ("rsa",), True, (("pem", "pubcert.pem", pieces + (
                ("cert", "ca", "CERTIFICATE", "", False),)),)))(fn)
        fn = example(damage=Damage(group, ("rsa", "secp384r1"), True, ()))(fn)
        return fn
    return decorate


# -- 1. validate_md_name ---------------------------------------------------------------------------------------


def _accepts(name: Any) -> bool:
    try:
        validate_md_name(name)
    except InvalidName as e:
        assert type(e) is InvalidName and e.message
        return False
    return True


@fuzz_settings(300)
@given(name=st.one_of(st.text(), st.text(NEAR_MISS_CHARS, max_size=300), near_misses(), dns_names()))
@example(name=".".join(["a" * 63] * 3) + "." + "b" * 61)
@example(name=".".join(["a" * 63] * 3) + "." + "b" * 62)
@example(name="\u212a.example")                     # Kelvin sign: lower-cases to ASCII "k"
@example(name="example.org\n")
def test_validate_md_name_accepts_exactly_dns_names(name: str) -> None:
    accepted = _accepts(name)
    if accepted:
        assert name.isascii() and name == name.lower()
        assert 0 < len(name) <= MAX_NAME_LEN
        assert "/" not in name and ".." not in name and "\0" not in name
        assert not name.startswith(".") and not name.endswith(".")
    assert accepted == reference_valid(name), name


@fuzz_settings(150)
@given(name=dns_names())
def test_validate_md_name_accepts_generated_dns_names(name: str) -> None:
    assert _accepts(name), name


@fuzz_settings(50)
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text(), max_size=2)))
def test_validate_md_name_refuses_non_strings(value: Any) -> None:
    assert not _accepts(value)


# -- 2. check_staged ---------------------------------------------------------------------------------------------


@fuzz_settings(200)
@given(damage=damages("staging"))
@_with_examples("staging")
def test_check_staged_on_a_damaged_staging_set(material: Material, damage: Damage) -> None:
    with workspace(material.templates[(damage.key_types, damage.with_active)]) as ws:
        apply(ws, material, damage)
        out = call("check_staged", lambda: Store(str(ws.store), anchors=ANCHORS).check_staged(MD))
        assert_clean(ws, out, (NothingStaged, StagingInvalid))
        if out.error is not None:
            return
        cs = out.value
        assert isinstance(cs, CertSet)

        group, set_dir = ws.store / "staging", ws.store / "staging" / MD
        # The MD's key types and names come from root's domains/<md>/md.json alone.
        deciding = ws.store / "domains" / MD / "md.json"
        assert kind(deciding) == "file", "accepted a set of an MD that is not managed"
        key_types = key_types_of(deciding)
        assert key_types is not None, "accepted a set whose md.json the test cannot read"
        assert (kind(group), kind(set_dir)) == ("dir", "dir")
        files = [sf.pubcert_name(kt) for kt in key_types] + [sf.privkey_name(kt) for kt in key_types]
        for name in ["md.json", *files]:
            assert kind(set_dir / name) == "file", f"accepted a set whose {name} is a {kind(set_dir / name)}"
        assert kind(set_dir / "job.json") in ("file", "missing")
        assert_set_matches(cs, set_dir, key_types, json.loads(deciding.read_bytes())["domains"])

        # Consistency with storefactory's reader and with the broker's own staged_fingerprint.
        if key_types_of(set_dir / "md.json") == key_types:
            assert cs.fingerprint == sf.read_staged_fingerprint(ws.store, MD)
        again = call("staged_fingerprint", lambda: Store(str(ws.store), anchors=ANCHORS).staged_fingerprint(MD))
        assert again.error is None and again.value == cs.fingerprint


# -- 3. staged_fingerprint, job_notified, active, list_mds -------------------------------------------------------


@fuzz_settings(120)
@given(damage=damages("staging"))
@_with_examples("staging")
def test_staged_fingerprint_on_a_damaged_staging_set(material: Material, damage: Damage) -> None:
    with workspace(material.templates[(damage.key_types, damage.with_active)]) as ws:
        apply(ws, material, damage)
        out = call("staged_fingerprint", lambda: Store(str(ws.store), anchors=ANCHORS).staged_fingerprint(MD))
        assert_clean(ws, out, (StagingInvalid,))
        if out.error is not None or out.value is None:
            return
        group, set_dir = ws.store / "staging", ws.store / "staging" / MD
        # Key types come from root's domains/<md>/md.json alone; staging/<md>/md.json must exist.
        deciding = ws.store / "domains" / MD / "md.json"
        assert kind(set_dir / "md.json") == "file"
        key_types = key_types_of(deciding)
        assert key_types is not None
        assert (kind(group), kind(set_dir), kind(deciding)) == ("dir", "dir", "file")
        for name in (sf.pubcert_name(kt) for kt in key_types):
            assert kind(set_dir / name) == "file", f"fingerprinted a set whose {name} is a {kind(set_dir / name)}"
        assert out.value == expected_fingerprint(set_dir, key_types)


@fuzz_settings(120)
@given(damage=damages("staging", focus="job.json"))
def test_job_notified_and_renewals_never_raise(material: Material, damage: Damage) -> None:
    with workspace(material.templates[(damage.key_types, damage.with_active)]) as ws:
        apply(ws, material, damage)
        now = time.time()
        store = Store(str(ws.store), anchors=ANCHORS, clock=lambda: now)
        notified = call("job_notified", lambda: store.job_notified(MD))
        assert_clean(ws, notified, ())
        busy = call("renewals_in_progress", store.renewals_in_progress)
        assert_clean(ws, busy, ())
        mds = call("list_mds", store.list_mds)
        assert_clean(ws, mds, ())

        # Oracle: job.json is read only as a regular file in real directories.
        group = ws.store / "staging"
        set_dir = group / MD
        job_file = set_dir / "job.json"
        job = json_object(job_file) if (kind(group), kind(set_dir)) == ("dir", "dir") else None
        assert notified.value is (job is not None and job.get("notified-renewed") is True)
        if (kind(group), kind(set_dir)) == ("dir", "dir") and MD in mds.value:
            changed = set_dir.stat().st_mtime
            if job is not None:
                changed = max(changed, job_file.stat().st_mtime)
            expect_busy = (job is None or job.get("finished") is not True) and now - changed < 300
        else:
            expect_busy = False
        assert busy.value == ([MD] if expect_busy else [])
        event(f"job_notified: {notified.value}, busy: {expect_busy}")


@fuzz_settings(150)
@given(damage=damages("domains"))
@_with_examples("domains")
def test_active_on_a_damaged_active_set(material: Material, damage: Damage) -> None:
    with workspace(material.templates[(damage.key_types, damage.with_active)]) as ws:
        apply(ws, material, damage)
        staged = call("check_staged", lambda: Store(str(ws.store), anchors=ANCHORS).check_staged(MD))
        assert_clean(ws, staged, (NothingStaged, StagingInvalid))
        if staged.error is None:
            assert kind(ws.store / "domains" / MD / "md.json") == "file"
        out = call("active", lambda: Store(str(ws.store), anchors=ANCHORS).active(MD))
        assert_clean(ws, out, (StagingInvalid,))
        if out.error is not None or out.value is None:
            return
        cs = out.value
        assert isinstance(cs, CertSet)
        group, set_dir = ws.store / "domains", ws.store / "domains" / MD
        key_types = key_types_of(set_dir / "md.json")
        assert key_types is not None
        assert (kind(group), kind(set_dir)) == ("dir", "dir")
        for name in ["md.json", *(sf.pubcert_name(kt) for kt in key_types)]:
            assert kind(set_dir / name) == "file", f"accepted an active set whose {name} is a {kind(set_dir / name)}"
        assert_set_matches(cs, set_dir, key_types, json.loads((set_dir / "md.json").read_bytes())["domains"])
        assert cs.fingerprint == sf.read_active_fingerprint(ws.store, MD)


ENTRY_KINDS = ("dir", "dir", "file", "symlink-dir", "symlink-dangling", "fifo", "socket")


def _file_name(name: str | bytes) -> bool:
    raw = os.fsencode(name)
    return raw not in (b".", b"..") and b"/" not in raw and b"\0" not in raw and 0 < len(raw) <= 255


entry_names = st.one_of(
    dns_names(),
    near_misses().map(lambda n: n.replace("/", "_").replace("\0", "_")),
    st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=30),
    st.binary(min_size=1, max_size=30).map(lambda n: n.replace(b"/", b"_").replace(b"\0", b"_")),
).filter(_file_name)


@fuzz_settings(120)
@given(
    entries=st.lists(st.tuples(st.sampled_from(["domains", "staging"]), entry_names, st.sampled_from(ENTRY_KINDS)),
                     max_size=8),
    group_ops=st.lists(st.tuples(st.sampled_from(["domains", "staging"]),
                                 st.sampled_from(["symlink-outside", "symlink-dangling", "file", "fifo", "missing"])),
                       max_size=1),
)
def test_list_mds_returns_exactly_the_valid_md_directories(
        material: Material, entries: list[tuple[str, str | bytes, str]], group_ops: list[tuple[str, str]]) -> None:
    template = material.templates[(("rsa",), True)]
    with workspace(template) as ws:
        for group, name, how in entries:
            path = Path(os.fsdecode(os.path.join(os.fsencode(ws.store / group), os.fsencode(name))))
            if kind(path) != "missing":
                continue
            if how == "file":
                path.write_bytes(b"x")
            else:
                _place(ws, path, how, template / "domains" / MD)
        for group, how in group_ops:
            _place(ws, ws.store / group, how, template / group)

        store = Store(str(ws.store), anchors=ANCHORS)
        out = call("list_mds", store.list_mds)
        assert_clean(ws, out, ())
        expected = set()
        for group in ("domains", "staging"):
            if kind(ws.store / group) == "dir":
                expected |= {n for n in os.listdir(ws.store / group)
                             if kind(ws.store / group / n) == "dir" and reference_valid(n)}
        assert out.value == sorted(expected)
        busy = call("renewals_in_progress", store.renewals_in_progress)
        assert_clean(ws, busy, ())
        assert set(busy.value) <= set(out.value)


# -- 4. any bytes in any file -----------------------------------------------------------------------


def _store_files(key_types: tuple[str, ...]) -> list[str]:
    staged = ["md.json", "job.json"] + [f(kt) for kt in key_types for f in (sf.pubcert_name, sf.privkey_name)]
    return [f"staging/{MD}/{f}" for f in staged] + [f"domains/{MD}/md.json", "md_store.json"]


_ANY_FILE = st.sampled_from(sorted({f for kts in KEY_TYPE_SETS for f in _store_files(kts)}))
_ANY_BYTES = st.one_of(
    st.tuples(st.just("replace"), st.binary(max_size=2048)),
    st.tuples(st.just("splice"), st.tuples(st.integers(0, 1000), st.binary(min_size=1, max_size=64))),
)
_ESCAPE_NAME = json.dumps(sf.md_json(MD, [MD, "www.example.org\x1b[2J"])).encode()


def _write_bytes(ws: Workspace, writes: list[tuple[str, tuple[str, Any]]]) -> None:
    for rel, (op, arg) in writes:
        path = ws.store / rel
        if not path.parent.is_dir():
            continue
        original = path.read_bytes() if path.is_file() else b""
        if op == "replace":
            content = arg
        else:
            pos = len(original) * arg[0] // 1000
            content = original[:pos] + arg[1] + original[pos + len(arg[1]):]
        path.write_bytes(content)


@fuzz_settings(300)
@given(key_types=st.sampled_from(KEY_TYPE_SETS), with_active=st.booleans(),
       writes=st.lists(st.tuples(_ANY_FILE, _ANY_BYTES), min_size=1, max_size=3))
@example(key_types=("rsa",), with_active=False, writes=[(f"domains/{MD}/md.json", ("replace", _ESCAPE_NAME))])
@example(key_types=("rsa",), with_active=True, writes=[(f"staging/{MD}/md.json", ("replace", _ESCAPE_NAME))])
def test_any_bytes_in_any_file_give_a_contract_error_or_a_set(
        material: Material, key_types: tuple[str, ...], with_active: bool,
        writes: list[tuple[str, tuple[str, Any]]]) -> None:
    """Whatever www-data (or a broken root file) puts in a file of the store, check_staged answers
    with a BrokerError whose message is printable, or with a CertSet; never anything else."""
    with workspace(material.templates[(key_types, with_active)]) as ws:
        _write_bytes(ws, writes)
        out = call("check_staged", lambda: Store(str(ws.store), anchors=ANCHORS).check_staged(MD))
        if out.error is not None:
            assert isinstance(out.error, BrokerError), f"unexpected {type(out.error).__name__}: {out.error!r}"
            assert out.error.message.isprintable(), f"control character in {out.error.message!r}"
        else:
            assert isinstance(out.value, CertSet)
            # What an accepted set carries on to status, logs and signals.
            for text in _strings(dataclasses.asdict(out.value)):
                assert text.isprintable(), f"control character in {text!r}"
        assert_clean(ws, out, (NothingStaged, StagingInvalid))


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


class _NoRestart:
    """The engine's restarter; these examples only request and ask for status."""

    restarts = 0

    async def restart(self) -> Any:
        raise AssertionError("no restart is run here")


@fuzz_settings(150)
@given(key_types=st.sampled_from(KEY_TYPE_SETS), with_active=st.booleans(),
       writes=st.lists(st.tuples(_ANY_FILE, _ANY_BYTES), min_size=1, max_size=3))
@example(key_types=("rsa",), with_active=False, writes=[(f"domains/{MD}/md.json", ("replace", _ESCAPE_NAME))])
@example(key_types=("rsa",), with_active=True, writes=[(f"staging/{MD}/md.json", ("replace", _ESCAPE_NAME))])
@example(key_types=("rsa",), with_active=True, writes=[])
def test_any_bytes_through_the_engine_give_a_contract_error_or_a_schedule(
        material: Material, key_types: tuple[str, ...], with_active: bool,
        writes: list[tuple[str, tuple[str, Any]]]) -> None:
    """The core as the D-Bus layer drives it: a request for the MD is either scheduled or refused
    with a contract error; the log, the properties and the status document (what GetStatus and
    `apache-restart status` show) hold no control character; a refusal schedules nothing."""
    with workspace(material.templates[(key_types, with_active)]) as ws:
        _write_bytes(ws, writes)
        config = from_mapping({"md_store": str(ws.store), "state_dir": str(ws.root / "state"),
                               "settle_seconds": 10, "min_interval_seconds": 60})
        engine = Engine(config, Store(str(ws.store), anchors=ANCHORS), _NoRestart(),
                        StateFile(str(ws.root / "state")))
        log = io.StringIO()

        async def drive() -> dict[str, Any]:
            try:
                planned = await engine.request(MD, caller_uid=33)
            except BrokerError as e:
                assert type(e) in (NothingStaged, StagingInvalid), f"unexpected {type(e).__name__}: {e!r}"
                assert e.message.isprintable() and str(ws.root) not in e.message, e.message
                assert not engine.pending
                event("refused")
            else:
                assert isinstance(planned, int) and engine.pending and engine.planned_at_usec == planned
                event("scheduled")
            await engine.check_all()
            return await engine.status()

        with contextlib.redirect_stderr(log):
            status = asyncio.run(drive())
        json.dumps(status)
        for text in [*_strings(status), *_strings(engine.properties()), *log.getvalue().splitlines()]:
            assert text.isprintable(), f"control character in {text!r}"
