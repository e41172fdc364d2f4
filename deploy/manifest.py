"""Every file apache-restart-broker installs, and where: the one list that scripts/install and
the Debian package (debian/rules) both read, so that the two cannot drift apart.

Two layouts share it. "local" is scripts/install on a host that is not Debian-based: the code
in a venv under /opt, the programs linked into /usr/local. "debian" is the package: the code in
a private module directory (never a top-level ``broker`` in dist-packages), small launchers in
/usr/sbin and /usr/bin, units in /lib/systemd/system, Debian's own Python libraries.

The files in the source tree name the programs where the local layout puts them; another
layout gets its own paths written in (``render``), and a file that no longer names a program
where this list expects it stops the install instead of shipping a unit that runs nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PACKAGE = "apache-restart-broker"
CONFIG_FILE = "/etc/apache-restart-broker.toml"
STATE_DIR = "/var/lib/apache-restart-broker"
APACHE_CONF_NAME = "apache-restart-broker"
APACHE_CONF = f"/etc/apache2/conf-available/{APACHE_CONF_NAME}.conf"
APACHE_CONF_ENABLED = f"/etc/apache2/conf-enabled/{APACHE_CONF_NAME}.conf"
BROKER_UNIT = "apache-restart-broker.service"
CHECK_UNIT = "apache-restart-broker-check.service"
TIMER = "apache-restart-broker-check.timer"
DEFAULT_APACHE_USER = "www-data"
# The group whose members may read the status for monitoring (apache-restart check): Debian's
# nagios-nrpe-server, icinga2 and nagios4 all run their checks as group nagios.
DEFAULT_MONITOR_GROUP = "nagios"
# The bus policy ships its monitoring block commented out, because dbus-daemon warns about a
# group it does not know; these lines open and close that comment around the block.
MONITOR_BLOCK = ("\n  MONITOR-GROUP-BEGIN\n", "\n  MONITOR-GROUP-END -->")
# The Debian package cannot edit the policy it ships: its postinst installs the block as a
# file of its own in /etc/dbus-1/system.d when the group exists (this is its template).
MONITOR_POLICY = "/etc/dbus-1/system.d/org.masysma.ApacheRestart-monitor.conf"
MONITOR_POLICY_TEMPLATE = f"/usr/share/{PACKAGE}/monitor-group.conf"

# The Python packages of the product; the test and demo harness is never installed.
CODE_PACKAGES = ("broker", "client")


@dataclass(frozen=True)
class Layout:
    name: str
    sbin: str           # the daemon
    bin: str            # the hook and the admin command
    unit_dir: str
    code_dir: str       # local: the venv; debian: the private module directory
    # The package installs the manual pages (dh_installman); the venv installer does not, and
    # `systemd-analyze verify` fails a unit whose Documentation= names a page that is missing.
    has_manual: bool = False

    @property
    def dropin_dir(self) -> str:
        return f"{self.unit_dir}/{BROKER_UNIT}.d"


LOCAL = Layout("local", "/usr/local/sbin", "/usr/local/bin", "/usr/local/lib/systemd/system",
               "/opt/apache-restart-broker/venv")
# Units in /lib: bookworm's systemd and lintian still expect them there (usr-merge moved
# them only after bookworm).
DEBIAN = Layout("debian", "/usr/sbin", "/usr/bin", "/lib/systemd/system", f"/usr/share/{PACKAGE}",
                has_manual=True)
LAYOUTS = {layout.name: layout for layout in (LOCAL, DEBIAN)}

# program -> (directory attribute of Layout, module whose main() it runs, manual section)
PROGRAMS = {
    "apache-restart-broker": ("sbin", "broker.main", 8),
    "apache-restart-hook": ("bin", "client.hook", 8),
    "apache-restart": ("bin", "client.admin", 8),
}


def program_path(layout: Layout, program: str) -> str:
    return f"{getattr(layout, PROGRAMS[program][0])}/{program}"


def hook_path(layout: Layout) -> str:
    return program_path(layout, "apache-restart-hook")


@dataclass(frozen=True)
class DataFile:
    source: str                 # relative to the source tree
    target: str                 # absolute path on the installed system; {unit_dir} filled in
    # (text in the shipped file, the same text with {user}): the Apache user goes there
    user_slot: tuple[str, str] | None = None
    # the same for the monitoring group ({group})
    group_slot: tuple[str, str] | None = None
    mode: int = 0o644
    # A unit's manual pages, as "name(section)": its Documentation= where the layout has them.
    manual: tuple[str, ...] = ()

    def target_in(self, layout: Layout) -> str:
        return self.target.format(unit_dir=layout.unit_dir)


DATA_FILES = (
    DataFile("dbus/org.masysma.ApacheRestart.conf",
             "/usr/share/dbus-1/system.d/org.masysma.ApacheRestart.conf",
             ('<policy user="www-data">', '<policy user="{user}">'),
             ('<policy group="nagios">', '<policy group="{group}">')),
    DataFile("dbus/org.masysma.ApacheRestart.service",
             "/usr/share/dbus-1/system-services/org.masysma.ApacheRestart.service"),
    DataFile("dbus/org.masysma.ApacheRestart.xml",
             "/usr/share/dbus-1/interfaces/org.masysma.ApacheRestart.xml"),
    DataFile("polkit/org.masysma.apacherestart.policy",
             "/usr/share/polkit-1/actions/org.masysma.apacherestart.policy"),
    DataFile("polkit/49-apache-restart-broker.rules",
             "/usr/share/polkit-1/rules.d/49-apache-restart-broker.rules",
             ('subject.user == "www-data"', 'subject.user == "{user}"')),
    DataFile("polkit/49-apache-restart-broker-monitor.rules",
             "/usr/share/polkit-1/rules.d/49-apache-restart-broker-monitor.rules",
             group_slot=('subject.isInGroup("nagios")', 'subject.isInGroup("{group}")')),
    DataFile("systemd/apache-restart-broker.service", "{unit_dir}/" + BROKER_UNIT,
             manual=("apache-restart-broker(8)", "apache-restart-broker.toml(5)")),
    DataFile("systemd/apache-restart-broker-check.service", "{unit_dir}/" + CHECK_UNIT,
             manual=("apache-restart(8)",)),
    DataFile("systemd/apache-restart-broker-check.timer", "{unit_dir}/" + TIMER,
             manual=("apache-restart(8)",)),
)
BUS_POLICY = DATA_FILES[0]
# Installed live only in command mode (scripts/install); the package ships it as an example
# for the administrator to copy, since a package cannot know the mode of a config file it
# does not own after installation.
COMMAND_MODE_DROPIN = DataFile("systemd/command-mode.conf", "{unit_dir}/" + BROKER_UNIT
                               + ".d/command-mode.conf")
DEBIAN_EXAMPLES_DIR = f"/usr/share/doc/{PACKAGE}/examples"


class ManifestError(Exception):
    pass


def _program_pattern(path: str) -> re.Pattern[str]:
    # "/usr/local/bin/apache-restart" must not match inside ".../apache-restart-hook".
    return re.compile(re.escape(path) + r"(?![\w.-])")


def _fill(item: DataFile, text: str, slot: tuple[str, str], **value: str) -> str:
    shipped, template = slot
    found = text.count(shipped)
    if found != 1:
        raise ManifestError(f"{item.source}: expected {shipped!r} once, found it {found} times")
    return text.replace(shipped, template.format(**value))


def render(item: DataFile, text: str, layout: Layout, apache_user: str,
           monitor_group: str = DEFAULT_MONITOR_GROUP, monitor_enabled: bool = False) -> str:
    """The installed content of `item` (whose source text is `text`) for this layout, Apache
    user and monitoring group; the group's bus policy block is opened when `monitor_enabled`."""
    if item.user_slot is not None:
        text = _fill(item, text, item.user_slot, user=apache_user)
    if item.group_slot is not None:
        text = _fill(item, text, item.group_slot, group=monitor_group)
        if monitor_enabled and MONITOR_BLOCK[0] in text:
            text = text.replace(MONITOR_BLOCK[0], " -->\n").replace(MONITOR_BLOCK[1], "")
    if item.manual and layout.has_manual:
        docs = "Documentation=" + " ".join(f"man:{page}" for page in item.manual)
        text = re.sub(r"^(Description=.*\n)", lambda m: m.group(1) + docs + "\n", text, count=1,
                      flags=re.M)
    if layout is not LOCAL:
        for program in PROGRAMS:
            text = _program_pattern(program_path(LOCAL, program)).sub(program_path(layout, program), text)
    for program in PROGRAMS:
        # A program path of the other layout left behind would run nothing on this one.
        for other in LAYOUTS.values():
            if other is not layout and _program_pattern(program_path(other, program)).search(text):
                raise ManifestError(f"{item.source}: still names {program_path(other, program)} "
                                    f"for the {layout.name} layout")
    return text


def monitor_policy(policy_text: str, group: str = DEFAULT_MONITOR_GROUP) -> str:
    """The monitoring group's block of the bus policy (`policy_text`, the shipped source) as a
    policy file of its own: what the Debian package's postinst installs when the group exists."""
    begin, end = policy_text.find(MONITOR_BLOCK[0]), policy_text.find(MONITOR_BLOCK[1])
    if begin < 0 or end < begin:
        raise ManifestError("the bus policy has no monitoring block between its markers")
    block = policy_text[begin + len(MONITOR_BLOCK[0]):end]
    block = _fill(BUS_POLICY, block, BUS_POLICY.group_slot or ("", ""), group=group)
    return f"""\
<?xml version="1.0"?> <!--*-nxml-*-->
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- apache-restart-broker: members of group {group} may read the broker's status for
     monitoring (apache-restart check); polkit (org.masysma.apacherestart.read-status) is
     asked on top of this. Installed by the package because the group exists; edit the
     group here and in /etc/polkit-1/rules.d if your monitoring runs as another one. -->
<busconfig>
{block}
</busconfig>
"""


def apache_snippet(layout: Layout) -> str:
    """The a2enconf snippet: MDMessageCmd with the hook's absolute path (mod_md runs it without a
    shell or a PATH search)."""
    return f"""\
# apache-restart-broker: mod_md reports renewed certificates to the broker, which
# restarts Apache gracefully once the new ones are staged and sound.
# Enable with: a2enconf {APACHE_CONF_NAME}   (then reload Apache)
# mod_md takes one MDMessageCmd for the whole server: remove any other one.
<IfModule md_module>
    MDMessageCmd {hook_path(layout)}
</IfModule>
"""


def launcher(layout: Layout, program: str) -> str:
    """The program file of a layout whose code sits in a private module directory.

    -I: neither PYTHON* variables nor the user's site directory may change what root's daemon
    (or the hook, run by Apache) imports; the one directory added is root-owned.
    """
    module = PROGRAMS[program][1]
    return f"""\
#!/usr/bin/python3 -I
# {program}: the packaged launcher; the code lives in {layout.code_dir}.
import sys

sys.path.insert(0, "{layout.code_dir}")
from {module} import main  # noqa: E402

sys.exit(main())
"""


def manual_pages() -> dict[str, int]:
    """Page name -> section: the programs, and the configuration file."""
    pages = {program: section for program, (_d, _m, section) in PROGRAMS.items()}
    pages[f"{PACKAGE}.toml"] = 5
    return pages
