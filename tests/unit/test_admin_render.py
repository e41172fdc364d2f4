"""What `apache-restart status` prints: every text from the broker escaped."""

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from client.admin import describe_signal, render_status, render_steps

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\x9b31m\u202e\0"


def clean(text: str) -> bool:
    return not any(unicodedata.category(ch)[0] == "C" and ch != "\n" for ch in text)


def test_status_escapes_what_it_prints():
    cert = {"key_type": HOSTILE, "serial": HOSTILE, "not_after_usec": 1_800_000_000_000_000}
    status = {
        "version": HOSTILE, "md_store": HOSTILE, "restarting": False,
        "mds": [{"name": HOSTILE, "pending": True, "failed_before": False, "active_problem": HOSTILE,
                 "active": {"certs": [cert]},
                 "staged": {"valid": False, "problem": HOSTILE}}],
    }
    props = {"Version": HOSTILE, "Pending": True, "PlannedAt": 1_800_000_000_000_000,
             "LastRestart": 1_800_000_000_000_000, "LastResult": "failed: " + HOSTILE}
    out = render_status(status, props)
    assert clean(out), repr(out)
    assert "evil\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202e\\x00" in out


def test_status_survives_nonsense_times():
    status = {"mds": [{"name": "a.example", "pending": True, "active": {"certs": [
        {"key_type": "rsa", "serial": "1", "not_after_usec": 10**30}]}}]}
    assert "a.example" in render_status(status, {"PlannedAt": 10**30})


class Msg:
    def __init__(self, member, interface, signature, body):
        self.member, self.interface, self.signature, self.body = member, interface, signature, body


def test_watch_escapes_and_ignores_malformed_signals():
    from broker import names
    line = describe_signal(Msg("RestartFinished", names.INTERFACE, "bsas", [False, HOSTILE, [HOSTILE]]))
    assert clean(line), repr(line)
    assert describe_signal(Msg("RestartFinished", names.INTERFACE, "s", ["x"])) is None


text = st.text(max_size=40)
usec = st.integers(min_value=0, max_value=2**64 - 1)
cert = st.fixed_dictionaries({"key_type": text, "serial": text, "not_after_usec": usec},
                             optional={"issuer": text, "sha256": text})
served = st.fixed_dictionaries({"probe": text}, optional={"error": text, "serial": text, "sha256": text,
                                                          "not_after_usec": usec})
md_entry = st.fixed_dictionaries({
    "name": text, "pending": st.booleans(), "failed_before": st.booleans(),
    "active": st.one_of(st.none(), st.fixed_dictionaries({"certs": st.lists(cert, max_size=3)},
                                                         optional={"names": st.lists(text, max_size=3)})),
    "staged": st.one_of(st.none(), st.fixed_dictionaries({"valid": st.just(False), "problem": text}),
                        st.fixed_dictionaries({"valid": st.just(True), "since_usec": usec,
                                               "certs": st.lists(cert, max_size=3)},
                                              optional={"names": st.lists(text, max_size=3)})),
}, optional={"active_problem": text, "served": st.lists(served, max_size=2)})
retry = st.one_of(st.none(), st.fixed_dictionaries({"attempts": st.integers(1, 100), "at_usec": usec,
                                                    "reason": text}))


@given(mds=st.lists(md_entry, max_size=4), version=text, store=text, result=text, planned=usec, last=usec,
       pending=st.booleans(), waiting=st.sampled_from(["", "settle", "min_interval", "retry"]), retry=retry,
       result_at=usec, restarting=st.booleans())
def test_status_of_any_text_prints_no_control_character(mds, version, store, result, planned, last, pending,
                                                        waiting, retry, result_at, restarting):
    status = {"version": version, "md_store": store, "restarting": restarting, "mds": mds,
              "planned_at_usec": planned, "waiting_for": waiting, "retry": retry,
              "last_result_usec": result_at}
    props = {"Version": version, "Pending": pending, "PlannedAt": planned, "LastRestart": last,
             "LastResult": result}
    assert clean(render_status(status, props))


steps = st.lists(st.fixed_dictionaries({"step": text, "ok": st.booleans(), "detail": text, "fix": text}),
                 max_size=5)


@given(steps=steps)
def test_test_steps_of_any_text_print_no_control_character(steps):
    assert clean(render_steps(steps))
