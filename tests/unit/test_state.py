import json
import os
import stat

import pytest

from broker import state as state_mod
from broker.state import KEEP_CORRUPT, MAX_SIZE, StateFile


class Log(list):
    def __call__(self, msg):
        self.append(msg)


@pytest.fixture
def d(tmp_path):
    return tmp_path / "state"


def corrupt_files(directory, name="state.json"):
    return sorted(p for p in os.listdir(directory) if p.startswith(name + ".corrupt-"))


def test_absent_is_empty(d):
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert log == []
    assert not d.exists()  # load creates nothing


def test_save_creates_directory_and_round_trips(d):
    sf = StateFile(str(d))
    data = {"b": 1, "a": [1, 2.5, None, "x"], "nested": {"z": True}}
    sf.save(data)
    assert stat.S_IMODE(os.stat(d).st_mode) & 0o077 == 0
    st = os.lstat(d / "state.json")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    loaded = StateFile(str(d)).load()
    assert loaded == data
    assert list(loaded) == ["b", "a", "nested"]  # order kept
    assert os.listdir(d) == ["state.json"]  # no temp file left behind


def test_save_replaces(d):
    sf = StateFile(str(d))
    sf.save({"v": 1})
    ino = os.stat(d / "state.json").st_ino
    sf.save({"v": 2})
    assert sf.load() == {"v": 2}
    # Replaced by rename, not rewritten in place: a reader never sees a half-written file.
    assert os.stat(d / "state.json").st_ino != ino


def test_save_is_atomic_when_write_fails(d, monkeypatch):
    sf = StateFile(str(d))
    sf.save({"v": 1})

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(state_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        sf.save({"v": 2})
    monkeypatch.undo()
    assert sf.load() == {"v": 1}
    assert os.listdir(d) == ["state.json"]


def test_save_rejects_unserialisable(d):
    sf = StateFile(str(d))
    with pytest.raises(ValueError):
        sf.save({"x": float("nan")})
    with pytest.raises(TypeError):
        sf.save({"x": object()})
    with pytest.raises(ValueError):
        sf.save({"x": "a" * (MAX_SIZE + 1)})
    assert sf.load() == {}


def test_save_raises_oserror_on_io_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        StateFile(str(blocker / "sub")).save({"a": 1})


@pytest.mark.parametrize("content,why", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"str"', "JSON object"),
    (b"", "not valid JSON"),
    (b'{"x": NaN}', "not valid JSON"),
    (b'{"x": "\xff"}', "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_corrupt_content_moved_aside(d, capsys, content, why):
    d.mkdir()
    (d / "state.json").write_bytes(content)
    # The default logger writes to stderr with a warning priority.
    assert StateFile(str(d)).load() == {}
    err = capsys.readouterr().err
    assert err.startswith("<4>")
    assert why in err
    assert err.count("\n") == 1
    assert not (d / "state.json").exists()
    aside = corrupt_files(d)
    assert len(aside) == 1
    assert (d / aside[0]).read_bytes() == content
    # A fresh save works afterwards.
    StateFile(str(d)).save({"ok": 1})
    assert StateFile(str(d)).load() == {"ok": 1}


def test_too_big_is_corrupt(d):
    d.mkdir()
    (d / "state.json").write_bytes(b'{"x": "' + b"a" * MAX_SIZE + b'"}')
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert len(log) == 1 and "larger" in log[0]
    assert len(corrupt_files(d)) == 1


def test_symlink_is_not_followed(d, tmp_path):
    d.mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"secret": "from elsewhere"}))
    os.symlink(target, d / "state.json")
    log = Log()
    sf = StateFile(str(d), log=log)
    assert sf.load() == {}
    assert len(log) == 1 and "symbolic link" in log[0]
    aside = corrupt_files(d)
    assert len(aside) == 1 and os.path.islink(d / aside[0])
    # The target is untouched, and a save does not write through a link either.
    os.symlink(target, d / "state.json")
    sf.save({"mine": 1})
    assert json.loads(target.read_text()) == {"secret": "from elsewhere"}
    assert not os.path.islink(d / "state.json")
    assert sf.load() == {"mine": 1}


def test_dangling_symlink_is_corrupt(d):
    d.mkdir()
    os.symlink("/nonexistent-target-for-test", d / "state.json")
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert len(log) == 1
    assert not os.path.lexists(d / "state.json")


def test_directory_in_place_of_file(d):
    (d / "state.json").mkdir(parents=True)
    (d / "state.json" / "inner").write_text("x")
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert "not a regular file" in log[0]
    assert not os.path.lexists(d / "state.json")


def test_fifo_in_place_of_file_does_not_block(d):
    d.mkdir()
    os.mkfifo(d / "state.json")
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert "not a regular file" in log[0]


def test_leftover_temp_file_is_ignored_and_cleaned(d):
    sf = StateFile(str(d))
    sf.save({"good": True})
    # What a save that crashed before its rename leaves behind.
    leftover = d / ".state.json.tmp-deadbeefdeadbeef"
    leftover.write_text('{"half": ')
    log = Log()
    assert StateFile(str(d), log=log).load() == {"good": True}
    assert log == []
    assert not leftover.exists()


def test_leftover_temp_file_without_state(d):
    d.mkdir()
    (d / ".state.json.tmp-0123456789abcdef").write_text('{"complete": "but never renamed"}')
    assert StateFile(str(d)).load() == {}


def test_at_most_a_few_corrupt_files_kept(d):
    d.mkdir()
    log = Log()
    sf = StateFile(str(d), log=log)
    for i in range(KEEP_CORRUPT + 4):
        (d / "state.json").write_bytes(b"garbage %d" % i)
        assert sf.load() == {}
    aside = corrupt_files(d)
    assert len(aside) == KEEP_CORRUPT
    kept = sorted((d / a).read_bytes() for a in aside)
    assert kept == sorted(b"garbage %d" % i for i in range(4, KEEP_CORRUPT + 4))


def test_other_files_are_left_alone(d):
    d.mkdir()
    (d / "other.json").write_text("{}")
    (d / "state.json.corrupt-notes").write_text("a human's notes")
    (d / "state.json").write_text("bad")
    StateFile(str(d), log=Log()).load()
    assert (d / "other.json").exists()
    assert (d / "state.json.corrupt-notes").exists()


def test_custom_name(d):
    sf = StateFile(str(d), name="plan.json")
    sf.save({"x": 1})
    assert (d / "plan.json").exists()
    assert StateFile(str(d), name="state.json").load() == {}
    assert sf.load() == {"x": 1}


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b"])
def test_bad_name_rejected(tmp_path, name):
    with pytest.raises(ValueError):
        StateFile(str(tmp_path), name=name)


def test_symlink_swapped_in_after_check_is_not_followed(d, tmp_path, monkeypatch):
    # The race: the path is a regular file when checked, a symlink when opened.
    d.mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"secret": 1}))
    os.symlink(target, d / "state.json")
    regular = os.stat(target)
    real_lstat = os.lstat

    def lying_lstat(path, *a, **kw):
        if os.fspath(path) == str(d / "state.json"):
            return regular
        return real_lstat(path, *a, **kw)

    monkeypatch.setattr(state_mod.os, "lstat", lying_lstat)
    log = Log()
    assert StateFile(str(d), log=log).load() == {}
    assert len(log) == 1 and "symbolic link" in log[0]


def test_saving_what_is_saved_already_touches_no_disk(d, monkeypatch):
    # A burst of requests for a set already pending saves the same state each time: a flush
    # per request (several ms each) held up every other caller.
    sf = StateFile(str(d))
    sf.save({"a": 1})
    flushes = []
    real_fsync = os.fsync
    monkeypatch.setattr(state_mod.os, "fsync", lambda fd: (flushes.append(fd), real_fsync(fd)))
    sf.save({"a": 1})
    assert flushes == []
    sf.save({"a": 2})
    assert len(flushes) == 2  # the file and its directory
    assert sf.load() == {"a": 2}


@pytest.mark.parametrize("meddle", ["remove", "replace"])
def test_same_state_is_written_again_when_the_file_changed_behind(d, meddle):
    sf = StateFile(str(d))
    sf.save({"a": 1})
    path = os.path.join(d, "state.json")
    if meddle == "remove":
        os.unlink(path)
    else:
        other = os.path.join(d, "other")
        with open(other, "w") as f:
            f.write('{"a": 0}\n')
        os.replace(other, path)
    sf.save({"a": 1})
    assert StateFile(str(d)).load() == {"a": 1}
