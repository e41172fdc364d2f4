"""Apache with mod_md, from its own config file in its own ServerRoot, on loopback ports.

Nothing of the host's Apache is read or written: ServerRoot, PidFile, mutexes, runtime files,
logs and mod_md's store all live under ``server_root``. Apache is started the way the broker will
restart it, with ``apache2 -f FILE``; ``configtest_command`` and ``graceful_command`` are the argv
lists to configure the broker with.

www-data (Apache's children, mod_md's hook) must reach the store and the document root, so every
directory on the way is 0755: ``tempfile.mkdtemp`` and pytest's ``tmp_path`` make 0700 ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .certs import CertInfo, served_certificate
from .procs import HarnessError, harness_env, kill_group, make_dir, pid_alive, tail, wait_for, write_file

MODULE_DIR = Path("/usr/lib/apache2/modules")
# mod_watchdog, mod_log_config and mod_unixd are compiled into Debian's apache2.
MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("dir_module", "mod_dir.so"),
    ("mime_module", "mod_mime.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("ssl_module", "mod_ssl.so"),
    ("md_module", "mod_md.so"),
)


def apache_binary() -> str:
    found = shutil.which("apache2", path="/usr/sbin:/usr/local/sbin:/usr/bin:/sbin")
    if not found:
        raise HarnessError("apache2 is not installed (Debian packages: apache2, which includes mod_md)")
    return found


def quote(token: str) -> str:
    """One argument of an Apache directive, quoted so spaces and quotes survive."""
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def md_name(names: Sequence[str]) -> str:
    """The MD's name as mod_md uses it (hook argument, store directory): the first name, lower case."""
    return names[0].lower()


@dataclass
class ApacheSettings:
    """What the generated config contains. Ports are loopback ports, chosen by the caller."""

    server_root: Path
    http_port: int
    https_port: int
    ca_url: str  # MDCertificateAuthority
    ca_file: Path | None  # MDCACertificateFile: the CA of the ACME server's own TLS certificate
    domains: Sequence[Sequence[str]] = (("www.example.test",),)
    message_cmd: Sequence[str] | None = None  # MDMessageCmd argv (absolute program path)
    renew_window: str | None = None  # MDRenewWindow, e.g. "20s" or "33%"
    private_keys: str | None = None  # MDPrivateKeys, e.g. "RSA secp256r1"
    log_level: str = "warn md:info"
    extra_config: str = ""  # appended verbatim at the end (a test may break the config with it)
    env: dict[str, str] = field(default_factory=dict)  # added to Apache's environment
    # Clusters: another node's MDStoreDir (None: server_root/md), MDRenewMode, MDStoreLocks.
    store_dir: Path | None = None
    renew_mode: str | None = None  # "auto", "manual", "always"
    store_locks: str | None = None  # "on", "off" or a duration


class Apache:
    """One Apache instance; ``write_config`` first, then start()/graceful()/stop()."""

    def __init__(self, settings: ApacheSettings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        root = settings.server_root
        self.root = make_dir(root)
        self.conf_path = root / "apache2.conf"
        self.pid_file = root / "run" / "apache2.pid"
        self.run_dir = root / "run"
        self.lock_dir = root / "lock"
        self.log_dir = root / "logs"
        self.htdocs = root / "htdocs"
        self.store_dir = settings.store_dir or root / "md"
        self.error_log = self.log_dir / "error.log"
        self.binary = apache_binary()

    # -- commands (also what the broker is configured with) ----------------------------------

    def _command(self, *args: str) -> list[str]:
        return [self.binary, "-f", str(self.conf_path), *args]

    @property
    def configtest_command(self) -> list[str]:
        return self._command("-t")

    @property
    def graceful_command(self) -> list[str]:
        return self._command("-k", "graceful")

    @property
    def start_command(self) -> list[str]:
        return self._command("-k", "start")

    @property
    def stop_command(self) -> list[str]:
        return self._command("-k", "stop")

    @property
    def env(self) -> dict[str, str]:
        """The environment Apache (and so mod_md's hook) runs with."""
        return harness_env(self.run_id, self.settings.env)

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            check=False,
            env=self.env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- configuration -------------------------------------------------------------------------

    @property
    def md_names(self) -> list[str]:
        return [md_name(names) for names in self.settings.domains]

    def render_config(self) -> str:
        s = self.settings
        lines = [
            "# Generated by the apache-restart-broker test harness.",
            f"ServerRoot {quote(str(self.root))}",
            f"PidFile {quote(str(self.pid_file))}",
            f"DefaultRuntimeDir {quote(str(self.run_dir))}",
            f"Mutex file:{self.lock_dir} default",
            "ServerName localhost",
            "User www-data",
            "Group www-data",
            f"ErrorLog {quote(str(self.error_log))}",
            f"LogLevel {s.log_level}",
            "",
        ]
        lines += [f"LoadModule {name} {quote(str(MODULE_DIR / so))}" for name, so in MODULES]
        lines += [
            "",
            "TypesConfig /etc/mime.types",
            f"DocumentRoot {quote(str(self.htdocs))}",
            "DirectoryIndex index.html",
            "<Directory />",
            "    AllowOverride None",
            "    Require all denied",
            "</Directory>",
            f"<Directory {quote(str(self.htdocs))}>",
            "    Require all granted",
            "</Directory>",
            "",
            f"Listen 127.0.0.1:{s.http_port}",
            f"Listen 127.0.0.1:{s.https_port}",
            f"SSLSessionCache {quote('shmcb:' + str(self.run_dir / 'ssl_scache(512000)'))}",
            "",
            f"MDCertificateAuthority {s.ca_url}",
            "MDCertificateAgreement accepted",
            "MDContactEmail hostmaster@example.test",  # mod_md creates no ACME account without one
            f"MDStoreDir {quote(str(self.store_dir))}",
            "MDCheckInterval 1s",
            "MDRetryDelay 1s",
            # Challenges come in on these ports, not on 80/443: without the map mod_md finds no
            # usable challenge type.
            f"MDPortMap http:{s.http_port} https:{s.https_port}",
        ]
        if s.ca_file is not None:
            lines.append(f"MDCACertificateFile {quote(str(s.ca_file))}")
        if s.renew_window is not None:
            lines.append(f"MDRenewWindow {s.renew_window}")
        if s.private_keys is not None:
            lines.append(f"MDPrivateKeys {s.private_keys}")
        if s.renew_mode is not None:
            lines.append(f"MDRenewMode {s.renew_mode}")
        if s.store_locks is not None:
            lines.append(f"MDStoreLocks {s.store_locks}")
        if s.message_cmd:
            lines.append("MDMessageCmd " + " ".join(quote(t) for t in s.message_cmd))
        lines += [
            "",
            "<Location /md-status>",
            "    SetHandler md-status",
            "</Location>",
            "",
        ]
        for names in s.domains:
            lines += [
                "MDomain " + " ".join(names),
                f"<VirtualHost *:{s.https_port}>",
                f"    ServerName {names[0]}",
                *(f"    ServerAlias {alias}" for alias in names[1:]),
                "    SSLEngine on",
                "</VirtualHost>",
                "",
            ]
        if s.extra_config:
            lines += [s.extra_config, ""]
        return "\n".join(lines)

    def write_config(self) -> Path:
        for d in (self.run_dir, self.lock_dir, self.log_dir, self.htdocs):
            make_dir(d)
        index = self.htdocs / "index.html"
        if not index.exists():
            write_file(index, "apache-restart-broker test harness\n")
        write_file(self.conf_path, self.render_config())
        return self.conf_path

    # -- process -------------------------------------------------------------------------------

    def pid(self) -> int | None:
        """The main process's pid from the PidFile, or None (no file, or the process is gone)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def _error_log_tail(self) -> str:
        return f"last lines of {self.error_log}:\n{tail(self.error_log)}"

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise HarnessError(
                f"{what} failed with status {result.returncode}: {result.stderr.strip()}\n"
                + self._error_log_tail()
            )

    def _answers(self) -> bool:
        try:
            self.md_status()
            return True
        except OSError:
            return False

    def start(self, timeout: float = 15.0) -> None:
        """``apache2 -k start``; returns once the parent wrote its pid and HTTP answers."""
        self._check(self.run(self.start_command), "apache2 -k start")
        try:
            wait_for(lambda: self.pid() is not None and self._answers(), timeout, "Apache to answer")
        except HarnessError as e:
            raise HarnessError(f"{e}\n{self._error_log_tail()}") from None

    def configtest(self) -> subprocess.CompletedProcess[str]:
        return self.run(self.configtest_command)

    def graceful(self) -> None:
        self._check(self.run(self.graceful_command), "apache2 -k graceful")

    def stop(self, timeout: float = 10.0) -> None:
        """``apache2 -k stop`` and wait until the main process is gone; SIGKILL its group after that.

        A stop must not depend on the config still being valid (a test may have broken it):
        when ``-k stop`` fails, SIGTERM goes to the pid directly. Apache's parent leads its own
        session, so the final SIGKILL on its process group also catches children it left.
        """
        pid = self.pid()
        if pid is None:
            return
        if self.run(self.stop_command).returncode != 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        kill_group(pid)

    # -- what it serves ------------------------------------------------------------------------

    def md_status(self, name: str | None = None, timeout: float = 2.0) -> Any:
        """mod_md's status JSON over plain HTTP (all MDs, or one)."""
        url = f"http://127.0.0.1:{self.settings.http_port}/md-status"
        if name is not None:
            url += "/" + name
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def served_certificate(self, server_name: str | None, timeout: float = 5.0) -> CertInfo:
        """The certificate clients get on the HTTPS port for this SNI name."""
        return served_certificate("127.0.0.1", self.settings.https_port, server_name, timeout)

    # -- mod_md's store (read only) ------------------------------------------------------------

    def staging_dir(self, md: str) -> Path:
        return self.store_dir / "staging" / md

    def job(self, md: str) -> dict[str, Any] | None:
        """staging/<md>/job.json, or None while there is none (or it is being rewritten)."""
        try:
            data = json.loads((self.staging_dir(md) / "job.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def staged_certificate(self, md: str) -> CertInfo | None:
        """The leaf of staging/<md>/pubcert.pem once job.json says finished, else None."""
        job = self.job(md)
        pubcert = self.staging_dir(md) / "pubcert.pem"
        if not job or not job.get("finished") or not pubcert.exists():
            return None
        try:
            return CertInfo.from_pem_file(pubcert)
        except (OSError, ValueError, IndexError):
            return None

    def wait_staged(self, md: str, timeout: float = 20.0, notified: bool = True) -> CertInfo:
        """Wait until a finished set is staged and, with ``notified``, ``renewed`` was delivered.

        A restart before mod_md wrote ``notified-renewed`` races with mod_md's own write of job.json.
        """

        def staged() -> CertInfo | None:
            cert = self.staged_certificate(md)
            if cert is None or (notified and not (self.job(md) or {}).get("notified-renewed")):
                return None
            return cert

        try:
            found = wait_for(staged, timeout, f"mod_md to stage a certificate for {md}", interval=0.05)
        except HarnessError as e:
            raise HarnessError(f"{e}; job.json: {self.job(md)}\n{self._error_log_tail()}") from None
        assert found is not None
        return found

    def wait_served(self, server_name: str, serial: int, timeout: float = 10.0) -> CertInfo:
        """Wait until the HTTPS port serves the certificate with ``serial`` for ``server_name``."""

        def served() -> CertInfo | None:
            try:
                cert = self.served_certificate(server_name)
            except OSError:
                return None
            return cert if cert.serial == serial else None

        found = wait_for(served, timeout, f"serial {serial:x} to be served for {server_name}", interval=0.05)
        assert found is not None
        return found
