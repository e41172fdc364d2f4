"""A throwaway stack for end-to-end tests and the demo: pebble (ACME), Apache with mod_md, a
private system-like D-Bus and the real polkitd, on loopback, in one temporary directory.

Runs as root on Debian 12 (packages: apache2, pebble, dbus, polkitd) and never touches the host's
Apache, D-Bus or polkit configuration. ``running_stack`` is the entry point; the modules can be
used alone (``Pebble``, ``Apache``, ``PrivateBus``, ``Polkitd``).

The harness is shared by the tests, the benches and the demo, and ships with none of them: the
built package holds only ``broker`` and ``client``, so it never reaches a server.
"""

from .apache import Apache, ApacheSettings, md_name
from .bus import Polkitd, PrivateBus, check_authorization, name_has_owner
from .certs import CertInfo, served_certificate
from .node import Node, add_node
from .pebble import Pebble
from .procs import HarnessError, ManagedProcess, ProcessSpec, marked_pids
from .recorder import HookCall, HookRecorder
from .stack import Stack, StackOptions, project_files, running_stack

__all__ = [
    "Apache",
    "ApacheSettings",
    "CertInfo",
    "HarnessError",
    "HookCall",
    "HookRecorder",
    "ManagedProcess",
    "Node",
    "Pebble",
    "Polkitd",
    "PrivateBus",
    "ProcessSpec",
    "Stack",
    "StackOptions",
    "add_node",
    "check_authorization",
    "marked_pids",
    "md_name",
    "name_has_owner",
    "project_files",
    "running_stack",
    "served_certificate",
]
