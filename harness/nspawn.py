"""A real systemd 252 for the test suite: a Debian bookworm container booted with systemd-nspawn.

No systemd needs to run on the host. What it takes (each step was a real failure without it):

- The root file system is built once with ``mmdebstrap --variant=minbase`` into a tarball under
  ``CACHE_DIR``, keyed on the suite, the package list, the mirrors and the ISO week (so security
  updates come in weekly), and unpacked once into a base folder that is never written again.
  Every boot runs on an overlayfs: lower = the base, upper = a folder of this run.
- Python packages come from a wheelhouse built on the host (the container has no network) and
  bind-mounted read-only; the project's source tree is bind-mounted read-only too.
- systemd-nspawn runs inside ``unshare -m --propagation private`` with a tmpfs on ``/run`` (so
  its state under /run/systemd/nspawn never reaches the host), with ``--keep-unit
  --register=no`` (no host systemd to ask), ``--private-network`` (the container's ports never
  meet the host's), ``--system-call-filter=bpf`` (else systemd cannot enforce IPAddressDeny=),
  ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` (pure cgroup v2 inside), after the launching shell
  moved into a cgroup of its own in every hierarchy (else nspawn's payload/ and supervisor/
  land in the root cgroup, where two containers collide).
- Commands run inside with ``nsenter -t <leader> -a`` once ``/run/systemd/private`` exists and
  ``systemctl is-system-running --wait`` answered. ``stop`` sends SIGRTMIN+4 (poweroff) to the
  leader, escalates to SIGKILL, then removes the run's folder and cgroups: nothing is left.

Entry points: ``missing_prerequisites``, ``install_host_tools``, ``ensure_rootfs``,
``ensure_wheelhouse``, ``Container`` (a context manager).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .procs import BASE_ENV, HarnessError, pid_alive, wait_for

CACHE_DIR = Path("/var/cache/apache-restart-broker-test")
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# What the broker, its installer and this tier need in the container. minbase brings only the
# Essential set, which has what the tests run there besides these (runuser from util-linux).
# systemd brings busctl and systemd-analyze; dbus brings dbus-send. The container has no
# network, so the Debian package's dependencies must be here before `apt install ./<deb>`
# (python3-*, ca-certificates), with man-db for its manual pages and pebble for a real renewal.
PACKAGES = (
    "apache2",
    "ca-certificates",
    "dbus",
    "man-db",
    "pebble",
    "polkitd",
    "python3",
    "python3-cryptography",
    "python3-dbus-next",
    "python3-openssl",
    "python3-prometheus-client",
    "python3-venv",
    "systemd",
    "systemd-sysv",
)
# The dpkg settings file that mmdebstrap leaves with DPKG_OPTIONS: the package tier removes it
# so that a package installed later keeps its manual pages.
DPKG_OPTIONS_FILE = "/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
# Documentation is of no use in a test container and makes up a good part of unpacking.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
HOST_PACKAGES = ("systemd-container", "mmdebstrap", "zstd")
HOST_PROGRAMS = ("systemd-nspawn", "mmdebstrap", "zstd", "unshare", "nsenter", "tar", "mount")
SEARCH_PATH = BASE_ENV["PATH"]
ENV = {**BASE_ENV, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}

ROOTFS_TIMEOUT = 600.0
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def _log(msg: str) -> None:
    print(f"[nspawn] {msg}", file=sys.stderr, flush=True)


# -- prerequisites on the host ---------------------------------------------------------------


def missing_prerequisites() -> list[str]:
    """What this machine lacks for booting the container (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [p for p in HOST_PROGRAMS if shutil.which(p, path=SEARCH_PATH) is None]
    if not Path("/proc/filesystems").read_text().count("overlay"):
        missing.append("overlayfs (modprobe overlay)")
    return missing


def _installed_version(package: str) -> str | None:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package],
                       capture_output=True, text=True, env=ENV, check=False)
    parts = r.stdout.split()
    return parts[-1] if r.returncode == 0 and parts[:3] == ["install", "ok", "installed"] else None


def install_host_tools() -> list[str]:
    """apt-get install the host's tools, refusing to upgrade anything already installed.

    systemd-container depends on the exact version of the host's systemd: it is asked for that
    version (when the archive still has it), without recommends, so installing it upgrades
    nothing. A plan that would upgrade or remove an installed package is refused with the list,
    for a human to decide. Returns the packages installed.
    """
    wanted = [p for p in HOST_PACKAGES if _installed_version(p) is None]
    if not wanted:
        return []
    args = []
    for p in wanted:
        host_systemd = _installed_version("systemd")
        args.append(f"{p}={host_systemd}" if p == "systemd-container" and host_systemd else p)
    base = ["apt-get", "-q", "-y", "--no-install-recommends", "install"]
    apt_env = {**ENV, "DEBIAN_FRONTEND": "noninteractive"}

    def plan() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "-s", *base[2:], *args], capture_output=True, text=True,
                              env=apt_env, check=False)

    sim = plan()
    if sim.returncode != 0 and any(a.startswith("systemd-container=") for a in args):
        # That version is gone from the archive: take the current one, if it upgrades nothing.
        args = [a.split("=")[0] for a in args]
        sim = plan()
    if sim.returncode != 0:
        raise HarnessError(f"apt-get cannot install {' '.join(args)}:\n{sim.stdout}{sim.stderr}")
    upgrades = [line for line in sim.stdout.splitlines()
                if line.startswith("Remv ") or re.match(r"Inst \S+ \[", line)]
    if upgrades:
        raise HarnessError("installing " + " ".join(args) + " would change installed packages; "
                           "not doing that unasked:\n" + "\n".join(upgrades))
    _log(f"installing {' '.join(args)}")
    r = subprocess.run(base + args, capture_output=True, text=True, env=apt_env, check=False)
    if r.returncode != 0:
        raise HarnessError(f"apt-get install {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return wanted


# -- the cached root file system -------------------------------------------------------------


def _iso_week(today: datetime.date | None = None) -> str:
    year, week, _ = (today or datetime.date.today()).isocalendar()
    return f"{year}-W{week:02d}"


def rootfs_key(packages: Sequence[str] = PACKAGES, today: datetime.date | None = None) -> str:
    spec = json.dumps({"suite": SUITE, "variant": "minbase", "packages": sorted(packages),
                       "mirrors": MIRRORS, "dpkg": DPKG_OPTIONS, "week": _iso_week(today)})
    return f"{SUITE}-{_iso_week(today)}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


@contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _prune(keep: set[str]) -> None:
    """Remove cache entries of other keys (last week's rootfs, old wheelhouses)."""
    week = _iso_week()
    for entry in CACHE_DIR.iterdir():
        if entry.name.startswith(".") and not entry.name.startswith(".tmp-"):
            continue
        if entry.name in keep or entry.name == "runs":
            continue
        if week in entry.name and not entry.name.startswith(".tmp-"):
            # This week's image for another package list: another checkout's tests may be
            # booting from it right now (an overlay's lower folder must not vanish).
            continue
        if entry.name.startswith(".tmp-") and not _older_than(entry, 3600):
            continue  # another process may be building it right now
        _log(f"pruning {entry}")
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def ensure_rootfs(packages: Sequence[str] = PACKAGES) -> Path:
    """The unpacked base root file system for this week's package list (built when missing)."""
    key = rootfs_key(packages)
    tarball = CACHE_DIR / f"rootfs-{key}.tar.zst"
    base = CACHE_DIR / f"base-{key}"
    with _cache_lock():
        if (base / ".complete").is_file():
            return base
        if not tarball.is_file():
            tmp = CACHE_DIR / f".tmp-{tarball.name}"  # ends in .tar.zst: mmdebstrap compresses
            tmp.unlink(missing_ok=True)
            argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
                    "--include=" + ",".join(packages),
                    *[f"--dpkgopt={o}" for o in DPKG_OPTIONS],
                    SUITE, str(tmp), *MIRRORS]
            _log("building the root file system: " + shlex.join(argv))
            t0 = time.monotonic()
            r = subprocess.run(argv, capture_output=True, text=True, env=ENV,
                               timeout=ROOTFS_TIMEOUT, check=False)
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise HarnessError("mmdebstrap failed (exit %d):\n%s" % (
                    r.returncode, "\n".join((r.stdout + r.stderr).splitlines()[-40:])))
            os.replace(tmp, tarball)
            _log(f"built {tarball.name} ({tarball.stat().st_size >> 20} MiB) "
                 f"in {time.monotonic() - t0:.1f} s")
        tmp_base = CACHE_DIR / f".tmp-{base.name}"
        if tmp_base.exists():
            shutil.rmtree(tmp_base)
        tmp_base.mkdir(mode=0o755)
        t0 = time.monotonic()
        r = subprocess.run(["tar", "--zstd", "-x", "-p", "--numeric-owner", "--xattrs",
                            "--xattrs-include=*", "-f", str(tarball), "-C", str(tmp_base)],
                           capture_output=True, text=True, env=ENV, check=False)
        if r.returncode != 0:
            shutil.rmtree(tmp_base, ignore_errors=True)
            raise HarnessError(f"unpacking {tarball} failed:\n{r.stderr}")
        (tmp_base / ".complete").write_text(key + "\n")
        os.replace(tmp_base, base)
        _log(f"unpacked to {base} in {time.monotonic() - t0:.1f} s")
        _prune(keep={tarball.name, base.name} | {p.name for p in CACHE_DIR.glob("wheels-*")})
        return base


# -- the wheelhouse --------------------------------------------------------------------------


def project_requirements(source: Path) -> list[str]:
    """What `pip install <source>[fast]` needs: its dependencies, the extra, its build backend."""
    meta = tomllib.loads((source / "pyproject.toml").read_text())
    project = meta["project"]
    reqs = list(project.get("dependencies", []))
    reqs += project.get("optional-dependencies", {}).get("fast", [])
    reqs += meta.get("build-system", {}).get("requires", [])
    # Older setuptools ask for wheel to build one.
    reqs.append("wheel")
    return reqs


def ensure_wheelhouse(source: Path, python: str = sys.executable) -> Path:
    """A folder of wheels from which the container can install the project offline.

    Built with this host's Python (Debian 12's, as in the container) and cached per week and
    requirement list. The project itself is not in it: the installer builds it from the source.
    """
    reqs = project_requirements(source)
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    spec = json.dumps({"reqs": sorted(reqs), "python": version, "week": _iso_week()})
    wheels = CACHE_DIR / f"wheels-{_iso_week()}-py{version}-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    with _cache_lock():
        if (wheels / ".complete").is_file():
            return wheels
        tmp = CACHE_DIR / f".tmp-{wheels.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        t0 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.lower().endswith("_proxy")}
        r = subprocess.run([python, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-input",
                            "-q", "-w", str(tmp), *reqs],
                           capture_output=True, text=True, env={**ENV, **env, "HOME": "/root"},
                           timeout=600, check=False)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HarnessError(f"pip wheel failed:\n{r.stdout}{r.stderr}")
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        (tmp / ".complete").write_text(spec + "\n")
        os.replace(tmp, wheels)
        _log(f"wheelhouse {wheels.name} built in {time.monotonic() - t0:.1f} s")
        # Only earlier weeks' wheelhouses: this week's for another requirement list may be
        # bind-mounted into another checkout's container right now.
        for old in CACHE_DIR.glob("wheels-*"):
            if old != wheels and f"wheels-{_iso_week()}-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)
        return wheels


# -- cgroups of the launching shell ----------------------------------------------------------


def _own_cgroups() -> list[tuple[Path, set[str]]]:
    """(folder of this process's cgroup, controllers) in every cgroup hierarchy mounted here."""
    current: dict[frozenset[str], str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, controllers, path = line.split(":", 2)
        current[frozenset(c for c in controllers.split(",") if c)] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _source, super_opts = (right.split() + ["", "", ""])[:3]
        if fstype == "cgroup2":
            key: frozenset[str] = frozenset()
        elif fstype == "cgroup":
            key = frozenset(o for o in super_opts.split(",") if o not in ("rw", "ro") and "=" not in o
                            or o.startswith("name="))
        else:
            continue
        own = current.get(key)
        mount_root = fields[3].rstrip("/")
        if own is None or not (own + "/").startswith(mount_root + "/"):
            continue
        found.append((Path(fields[4]) / own[len(mount_root):].lstrip("/"), set(key)))
    return found


def _make_cgroups(name: str) -> list[Path]:
    """A child cgroup `name` of this process's own cgroup in every hierarchy (cpuset: with the
    parent's cpus and mems, which a new v1 cpuset lacks)."""
    made = []
    for parent, controllers in _own_cgroups():
        d = parent / name
        try:
            d.mkdir()
        except OSError as e:
            _log(f"cannot create cgroup {d}: {e}")
            continue
        made.append(d)
        if "cpuset" in controllers:
            for f in ("cpuset.cpus", "cpuset.mems"):
                try:
                    (d / f).write_text((parent / f).read_text())
                except OSError:
                    pass
    return made


def _remove_cgroup_tree(top: Path, timeout: float = 5.0) -> list[str]:
    """rmdir a cgroup and everything below it, deepest first; returns what could not go."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        if top.exists():
            dirs = sorted((Path(root) for root, _d, _f in os.walk(top)), key=lambda p: len(p.parts),
                          reverse=True)
            for d in dirs:
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    left.append(f"{d}: {e.strerror}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- the container ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Container:
    """One boot of the cached root file system. Use as a context manager; ``stop`` is idempotent.

    ``binds`` maps host paths to container paths, mounted read-only. ``timings`` collects how
    long each phase took (seconds).
    """

    def __init__(self, base: Path, binds: Mapping[Path, str] | None = None,
                 runs_dir: Path = CACHE_DIR / "runs") -> None:
        self.base = base
        self.binds = dict(binds or {})
        self.run_id = f"arb-{uuid.uuid4().hex[:10]}"
        self.dir = runs_dir / self.run_id
        self.log_path = self.dir / "console.log"
        self.timings: dict[str, float] = {}
        self.popen: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.cgroups: list[Path] = []
        self.leftovers: list[str] = []
        self.killed = False             # it did not power off within STOP_TIMEOUT
        self.state = ""
        self._stopped = False

    # -- life cycle

    def __enter__(self) -> Container:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.monotonic()
        for attempt in range(5):
            try:
                for sub in ("upper", "work", "merged"):
                    (self.dir / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
                break
            except FileNotFoundError:  # another run removed the empty runs/ folder just now
                if attempt == 4:
                    raise
        os.chmod(self.dir / "upper", 0o755)
        self.cgroups = _make_cgroups(self.run_id)
        procs = " ".join(shlex.quote(str(c / "cgroup.procs")) for c in self.cgroups)
        merged = self.dir / "merged"
        nspawn = [
            "systemd-nspawn", "--quiet", "--boot", f"--directory={merged}",
            f"--machine={self.run_id}", "--private-network", "--keep-unit", "--register=no",
            "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only",
            "--system-call-filter=bpf",
            *[f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()],
        ]
        # The shell moves itself into the run's cgroups, mounts /run and the overlay in its own
        # mount namespace, runs nspawn and unmounts again after it (the namespace goes with it
        # anyway: nothing of this is ever visible on the host).
        script = "\n".join([
            "set -e",
            f"for f in {procs}; do echo $$ > \"$f\" || true; done" if procs else ":",
            "mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run",
            "mount -t overlay overlay -o " + shlex.quote(
                f"lowerdir={self.base},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}")
            + " " + shlex.quote(str(merged)),
            "set +e",
            shlex.join(nspawn) + " </dev/null",
            "rc=$?",
            f"umount {shlex.quote(str(merged))} || umount -l {shlex.quote(str(merged))}",
            "umount /run",
            "exit $rc",
        ])
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**ENV, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}, start_new_session=True)
        self.leader = wait_for(self._find_leader, BOOT_TIMEOUT, "the container's systemd to start")
        wait_for(lambda: self._alive_or_raise() and
                 os.path.exists(f"/proc/{self.leader}/root/run/systemd/private"),
                 BOOT_TIMEOUT, "systemd's private socket in the container")
        self.timings["boot_started"] = time.monotonic() - t0
        r = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=BOOT_TIMEOUT)
        self.state = r.stdout.strip()
        self.timings["boot"] = time.monotonic() - t0
        if self.state not in ("running", "degraded"):
            raise HarnessError(f"the container did not boot: {self.state!r}\n{self.dump_logs()}")

    def _alive_or_raise(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise HarnessError(f"systemd-nspawn exited ({self.popen.returncode}):\n"
                               + self.log_path.read_text(errors="replace")[-4000:])
        return True

    def _find_leader(self) -> int | None:
        """The container's PID 1 as seen from the host: nspawn's child named systemd."""
        assert self.popen is not None
        self._alive_or_raise()
        todo = [self.popen.pid]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                if _comm(child) == "systemd" and _comm(pid) == "systemd-nspawn":
                    return child
                todo.append(child)
        return None

    def _nspawn_pid(self) -> int | None:
        if self.popen is None:
            return None
        for child in _children(self.popen.pid):
            if _comm(child) == "systemd-nspawn":
                return child
        return None

    def stop(self) -> None:
        """Power off (SIGRTMIN+4 to systemd), escalate to SIGKILL, remove the run's folder and cgroups.

        Whatever could not be cleaned up is listed in ``leftovers``; ``killed`` tells whether
        the poweroff had to be cut short.
        """
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        if self.popen is not None:
            if self.leader is not None and pid_alive(self.leader) and self.popen.poll() is None:
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed = True
                _log(f"{self.run_id} did not power off within {STOP_TIMEOUT:g} s: killing it")
                for pid in (self.leader, self._nspawn_pid()):
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                try:
                    self.popen.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=STOP_TIMEOUT)
        self.timings["poweroff"] = time.monotonic() - t0
        for cg in self.cgroups:
            self.leftovers += _remove_cgroup_tree(cg)
        if self.dir.exists():
            if self._mounted_on_host():
                self.leftovers.append(f"{self.dir} still has mounts on the host")
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
                try:
                    self.dir.parent.rmdir()
                except OSError:
                    pass
        if self.dir.exists():
            self.leftovers.append(f"{self.dir} is still there")
        self.timings["teardown"] = time.monotonic() - t0

    def _mounted_on_host(self) -> bool:
        prefix = str(self.dir)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4]
            if point == prefix or point.startswith(prefix + "/"):
                return True
        return False

    # -- inside

    def path(self, inside: str) -> Path:
        """A path of the container as the host can reach it (through the leader's root)."""
        assert self.leader is not None
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def run(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
            input: str | None = None, timeout: float = 120.0,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in the container (as root, or as `user` via runuser); text output."""
        assert self.leader is not None
        inner = list(argv)
        if user is not None:
            inner = ["runuser", "-u", user, "--", *inner]
        full = ["nsenter", "-t", str(self.leader), "-a", "--", *inner]
        r = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout,
                           env={**ENV, **(env or {})}, check=False)
        if check and r.returncode != 0:
            raise HarnessError(f"in the container{' as ' + user if user else ''}: {shlex.join(argv)} "
                               f"exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def dump_logs(self) -> str:
        parts = []
        try:
            parts.append("--- console\n" + self.log_path.read_text(errors="replace")[-6000:])
        except OSError:
            pass
        if self.leader is not None and pid_alive(self.leader):
            for argv in (["systemctl", "--no-pager", "--failed"],
                         ["journalctl", "--no-pager", "-b", "-n", "150"]):
                r = self.run(argv, check=False, timeout=20)
                parts.append(f"--- {' '.join(argv)}\n{r.stdout}{r.stderr}")
            # Apache's own log says why it failed (journald has only "exited, status=1").
            try:
                parts.append("--- /var/log/apache2/error.log\n"
                             + self.path("/var/log/apache2/error.log").read_text(errors="replace")[-6000:])
            except OSError:
                pass
        return "\n".join(parts)


def exposure(security_output: str) -> float:
    """The overall exposure number from ``systemd-analyze security UNIT`` output."""
    m = re.search(r"Overall exposure level for \S+:\s*([0-9.]+)", security_output)
    if not m:
        raise ValueError("no overall exposure level in the output")
    return float(m.group(1))
