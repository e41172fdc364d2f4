"""Another node of a cluster that shares the stack's MD store: its own Apache and its own broker
on its own bus, as a second server would have them.

    with running_stack(StackOptions(with_broker=True, renew_mode="auto", store_locks="on")) as stack:
        b = add_node(stack, "b")          # MDRenewMode manual, MDStoreLocks on, same MDStoreDir
        b.broker.watcher.check_all()      # what b's check timer does

mod_md's cluster setup: one node renews (the stack's Apache, ``MDRenewMode auto``), the others
are ``manual`` and share ``MDStoreDir`` (``MDStoreLocks on`` guards it). Node b gets no hook
call (no MDMessageCmd): only its broker's CheckAll makes it serve what node a activated. Its bus
has no polkitd: CheckAll and GetStatus are root's, which the broker decides without polkit.
Everything is stopped with the stack (Apache first, then the broker, then the bus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .apache import Apache, ApacheSettings
from .broker import BrokerHarness, BrokerOptions
from .bus import PrivateBus
from .procs import HarnessError, free_ports

if TYPE_CHECKING:
    from .stack import Stack


@dataclass
class Node:
    name: str
    apache: Apache
    bus: PrivateBus
    broker: BrokerHarness | None = None

    @property
    def bus_address(self) -> str:
        return self.bus.address

    @property
    def https_address(self) -> str:
        return f"127.0.0.1:{self.apache.settings.https_port}"


def add_node(stack: Stack, name: str, *, renew_mode: str = "manual", store_locks: str | None = "on",
             broker_options: BrokerOptions | None = None) -> Node:
    """Start node ``name`` on the stack's store: its bus, its broker, then its Apache."""
    from .stack import project_files

    a = stack.apache
    if a is None or stack.pebble is None:
        raise HarnessError("a second node needs the stack's Apache (its store) and pebble")
    http_port, https_port = free_ports(2)
    bus = PrivateBus(stack.root / f"bus-{name}", stack.run_id, project_files("dbus/*.conf"))
    stack.on_stop(bus.stop)
    bus.start()
    apache = Apache(
        ApacheSettings(
            server_root=stack.root / f"apache-{name}",
            http_port=http_port,
            https_port=https_port,
            ca_url=stack.pebble.directory_url,
            ca_file=stack.pebble.ca_file,
            domains=[list(n) for n in a.settings.domains],
            renew_window=a.settings.renew_window,
            private_keys=a.settings.private_keys,
            log_level=a.settings.log_level,
            store_dir=a.store_dir,
            renew_mode=renew_mode,
            store_locks=store_locks,
        ),
        stack.run_id,
    )
    apache.write_config()
    node = Node(name, apache, bus)
    node.broker = BrokerHarness(stack, broker_options, node=node)
    stack.add_process(node.broker.spec())
    stack.on_stop(apache.stop)
    apache.start()
    return node
