"""Every name the broker shows on the bus, in one place.

The service, the clients, the tests and the harness import these. The deployment files
(bus policy, polkit action, units) necessarily spell them out too; tests hold those against
this module.
The values are fixed by the project's contract: only ever add to them.
"""

BUS_NAME = "org.masysma.ApacheRestart"
OBJECT_PATH = "/org/masysma/ApacheRestart"
INTERFACE = "org.masysma.ApacheRestart"
ERROR_PREFIX = "org.masysma.ApacheRestart.Error."
POLKIT_ACTION = "org.masysma.apacherestart.graceful-restart"
# Reading GetStatus without being root (the monitoring plugin): granted to a group by a rule.
POLKIT_ACTION_READ_STATUS = "org.masysma.apacherestart.read-status"

# The standard name for a refused caller, as systemd and fwupd use it.
ERROR_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

# Error codes of the core (broker.errors.BrokerError.code) -> bus error names.
ERROR_INVALID_NAME = ERROR_PREFIX + "InvalidName"
ERROR_NOTHING_STAGED = ERROR_PREFIX + "NothingStaged"
ERROR_STAGING_INVALID = ERROR_PREFIX + "StagingInvalid"
ERROR_RATE_LIMITED = ERROR_PREFIX + "RateLimited"
ERROR_ALREADY_FAILED = ERROR_PREFIX + "AlreadyFailed"
ERROR_INVALID_ARGS = ERROR_PREFIX + "InvalidArguments"
ERROR_INTERNAL = ERROR_PREFIX + "Internal"


def error_name(code: str) -> str:
    """The bus error name for a core error code ("AccessDenied" is the standard one)."""
    if code == "AccessDenied":
        return ERROR_ACCESS_DENIED
    return ERROR_PREFIX + code


# polkit, systemd and the bus daemon, as the broker calls them.
POLKIT_BUS_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_PATH = "/org/freedesktop/systemd1"
SYSTEMD_MANAGER_INTERFACE = "org.freedesktop.systemd1.Manager"
SYSTEMD_UNIT_INTERFACE = "org.freedesktop.systemd1.Unit"
# The broker's own unit (the activation file's SystemdService=): the admin command asks
# systemd about it when the broker does not answer.
BROKER_UNIT = "apache-restart-broker.service"
DBUS_BUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_INTERFACE = "org.freedesktop.DBus"
