"""SystemdRestarter's bookkeeping of systemd's JobRemoved signals, without a bus."""

import asyncio

from broker import names
from broker.dbuslib import Message, MessageType
from broker.restart_systemd import MAX_RECORDED_JOBS, SystemdRestarter

SYSTEMD = ":1.7"


def _signal(job: str, sender: str) -> Message:
    return Message(message_type=MessageType.SIGNAL, path=names.SYSTEMD_PATH,
                   interface=names.SYSTEMD_MANAGER_INTERFACE, member="JobRemoved",
                   signature="uoss", body=[1, job, "other.service", "done"], sender=sender)


class _Bus:
    """Answers the calls a reload makes; systemd's other jobs finish during the reload."""

    def __init__(self, others: int):
        self.others = others
        self.handlers = []

    def add_message_handler(self, fn):
        self.handlers.append(fn)

    async def call(self, msg: Message) -> Message:
        msg.serial = msg.serial or 1
        member = msg.member
        if member == "GetUnit":
            return Message.new_method_return(msg, "o", ["/unit/apache2"])
        if member == "Get":
            from broker.dbuslib import Variant
            return Message.new_method_return(msg, "v", [Variant("s", "active")])
        if member == "GetNameOwner":
            return Message.new_method_return(msg, "s", [SYSTEMD])
        if member == "ReloadUnit":
            # Our job ends before its reply is processed, then a busy systemd ends many others.
            for fn in self.handlers:
                fn(_signal("/job/ours", SYSTEMD))
            for i in range(self.others):
                for fn in self.handlers:
                    fn(_signal(f"/job/{i}", SYSTEMD))
            return Message.new_method_return(msg, "o", ["/job/ours"])
        return Message.new_method_return(msg, "", [])


def test_signals_outside_a_reload_are_not_kept():
    restarter = SystemdRestarter(_Bus(0), "apache2.service", (), 5.0)
    restarter._systemd_owner = SYSTEMD
    for i in range(10_000):
        restarter._on_message(_signal(f"/job/{i}", SYSTEMD))
    assert restarter._finished_jobs == {}


async def test_reload_finds_its_job_and_keeps_a_bounded_record():
    bus = _Bus(0)
    restarter = SystemdRestarter(bus, "apache2.service", (), 5.0)
    outcome = await restarter.restart()
    assert (outcome.issued, outcome.ok) == (True, True), outcome.detail
    assert restarter._finished_jobs == {}


async def test_many_other_jobs_during_a_reload_stay_bounded():
    bus = _Bus(MAX_RECORDED_JOBS * 3)
    restarter = SystemdRestarter(bus, "apache2.service", (), 0.5)
    sizes = []
    orig = restarter._on_message

    def spy(msg):
        result = orig(msg)
        sizes.append(len(restarter._finished_jobs))
        return result
    bus.handlers = []
    restarter._on_message = spy  # type: ignore[method-assign]
    await asyncio.wait_for(restarter.restart(), 5)
    assert max(sizes) <= MAX_RECORDED_JOBS
