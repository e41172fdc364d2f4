"""pebble, the ACME test server, on loopback with its own throwaway TLS certificate.

Debian's pebble ships no certificate for its HTTPS listener, so one is made here for ``localhost``
(the host name, not 127.0.0.1: pebble builds the URLs in its directory from the request's host,
and mod_md must reach them under a name the certificate covers). pebble makes a new issuing
root and intermediate at every start; ``intermediate_pem`` / ``root_pem`` fetch them.
"""

from __future__ import annotations

import json
import shutil
import ssl
import urllib.request
from pathlib import Path

from cryptography import x509

from .certs import TLSFiles, make_server_tls
from .procs import HarnessError, ManagedProcess, ServiceProcess, free_ports, harness_env, make_dir, write_file

# Challenges always validate (the test names do not resolve), no random sleeps, no rejected
# nonces and no reused authorizations: every order goes through the whole flow, fast.
PEBBLE_ENV = {
    "PEBBLE_VA_ALWAYS_VALID": "1",
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


def pebble_binary() -> str:
    found = shutil.which("pebble", path="/usr/bin:/usr/local/bin:/usr/sbin:/bin")
    if not found:
        raise HarnessError("pebble is not installed (Debian package: pebble)")
    return found


class Pebble(ServiceProcess):
    """One pebble instance in ``workdir``; use as a context manager or call start()/stop().

    ``validity_seconds`` sets pebble's ``certificateValidityPeriod`` (None: pebble's default).
    ``http_port``/``tls_port`` are where pebble's validator would look for challenges (the Apache
    ports); with PEBBLE_VA_ALWAYS_VALID it never does, but they are set to the truth anyway.
    """

    def __init__(
        self,
        workdir: Path,
        run_id: str,
        *,
        validity_seconds: int | None = None,
        http_port: int = 5002,
        tls_port: int = 5001,
        port: int | None = None,
        management_port: int | None = None,
    ) -> None:
        self.workdir = make_dir(workdir)
        self.run_id = run_id
        self.validity_seconds = validity_seconds
        self.http_port = http_port
        self.tls_port = tls_port
        chosen = free_ports(2)
        self.port = port or chosen[0]
        self.management_port = management_port or chosen[1]
        self.config_path = self.workdir / "pebble-config.json"
        self.log_path = self.workdir / "pebble.log"
        self.tls: TLSFiles | None = None
        self.process: ManagedProcess | None = None

    @property
    def directory_url(self) -> str:
        """What mod_md's MDCertificateAuthority must name."""
        return f"https://localhost:{self.port}/dir"

    @property
    def ca_file(self) -> Path:
        """The CA of pebble's HTTPS listener (mod_md's MDCACertificateFile)."""
        if self.tls is None:
            raise HarnessError("pebble's TLS files are made by start()")
        return self.tls.ca_cert

    def write_config(self) -> Path:
        self.tls = make_server_tls(self.workdir, "localhost")
        settings: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.tls.cert),
            "privateKey": str(self.tls.key),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if self.validity_seconds is not None:
            settings["certificateValidityPeriod"] = int(self.validity_seconds)
        write_file(self.config_path, json.dumps({"pebble": settings}, indent=2) + "\n")
        return self.config_path

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _get(self, url: str, timeout: float = 2.0) -> bytes:
        with urllib.request.urlopen(url, context=self._ssl_context(), timeout=timeout) as resp:
            return bytes(resp.read())

    def _directory_answers(self) -> bool:
        assert self.process is not None
        self.process.check_alive()
        try:
            return "newOrder" in json.loads(self._get(self.directory_url))
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 10.0) -> None:
        self.write_config()
        process = ManagedProcess(
            "pebble",
            [pebble_binary(), "-config", str(self.config_path)],
            harness_env(self.run_id, PEBBLE_ENV),
            self.log_path,
            cwd=self.workdir,
        )
        self._run_until(process, self._directory_answers, timeout, f"pebble's directory at {self.directory_url}")

    def _management_pem(self, what: str) -> bytes:
        return self._get(f"https://localhost:{self.management_port}/{what}/0")

    def root_pem(self) -> bytes:
        """The root pebble issues under (new at each start)."""
        return self._management_pem("roots")

    def intermediate_pem(self) -> bytes:
        """The intermediate that signs the leaf certificates."""
        return self._management_pem("intermediates")

    def issuer_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.intermediate_pem())
