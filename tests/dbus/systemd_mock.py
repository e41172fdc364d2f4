"""A minimal systemd Manager for dbusmock: GetUnit, Subscribe and ReloadUnit.

python-dbusmock has no stock template with ReloadUnit. ReloadUnit here does what a real
`systemctl reload apache2` does for mod_md: it activates every staged set in the store
given as the `store` parameter, then announces the job's end with JobRemoved.
Parameters: store (path), unit (name), active_state (default "active"),
reload_result (default "done"), activate (default True).
"""

import os
import shutil

from dbusmock import MOCK_IFACE

import dbus

BUS_NAME = "org.freedesktop.systemd1"
MAIN_OBJ = "/org/freedesktop/systemd1"
MAIN_IFACE = "org.freedesktop.systemd1.Manager"
SYSTEM_BUS = True

UNIT_IFACE = "org.freedesktop.systemd1.Unit"


def _activate(store):
    staging = os.path.join(store, "staging")
    for md in sorted(os.listdir(staging)) if os.path.isdir(staging) else []:
        src = os.path.join(staging, md)
        if not os.path.exists(os.path.join(src, "pubcert.pem")):
            continue
        dst = os.path.join(store, "domains", md)
        if os.path.isdir(dst):
            n = 0
            while os.path.exists(os.path.join(store, "archive", f"{md}.{n}")):
                n += 1
            os.makedirs(os.path.join(store, "archive"), exist_ok=True)
            os.rename(dst, os.path.join(store, "archive", f"{md}.{n}"))
        os.makedirs(os.path.join(store, "domains"), exist_ok=True)
        shutil.copytree(src, dst)
        for name in ("job.json",):
            try:
                os.unlink(os.path.join(dst, name))
            except FileNotFoundError:
                pass
        shutil.rmtree(src)


def load(mock, parameters):
    mock.params = dict(parameters)
    mock.job_counter = 0
    mock.reloads = 0
    unit = parameters.get("unit", "apache2.service")
    unit_path = "/org/freedesktop/systemd1/unit/" + unit.replace(".", "_2e")
    mock.unit_name = unit
    mock.unit_path = unit_path
    mock.AddObject(unit_path, UNIT_IFACE, {
        "Id": unit, "ActiveState": parameters.get("active_state", "active")}, [])


@dbus.service.method(MAIN_IFACE, in_signature="s", out_signature="o")
def GetUnit(self, name):
    if name != self.unit_name:
        raise dbus.exceptions.DBusException(f"Unit {name} not loaded.",
                                            name="org.freedesktop.systemd1.NoSuchUnit")
    return dbus.ObjectPath(self.unit_path)


@dbus.service.method(MAIN_IFACE, in_signature="", out_signature="")
def Subscribe(self):
    pass


@dbus.service.method(MAIN_IFACE, in_signature="ss", out_signature="o")
def ReloadUnit(self, name, mode):
    if name != self.unit_name:
        raise dbus.exceptions.DBusException(f"Unit {name} not loaded.",
                                            name="org.freedesktop.systemd1.NoSuchUnit")
    self.job_counter += 1
    self.reloads += 1
    job = dbus.ObjectPath(f"/org/freedesktop/systemd1/job/{self.job_counter}")
    result = self.params.get("reload_result", "done")
    if result == "done" and self.params.get("activate", True):
        _activate(self.params["store"])
    # Real systemd sends JobRemoved after the reply; sending it before is the harder case
    # for the broker (it must not miss a job that ends before it knows the job's path).
    self.EmitSignal(MAIN_IFACE, "JobRemoved", "uoss",
                    [dbus.UInt32(self.job_counter), job, name, result])
    return job


@dbus.service.method(MOCK_IFACE, in_signature="", out_signature="u")
def GetReloads(self):
    return dbus.UInt32(self.reloads)
