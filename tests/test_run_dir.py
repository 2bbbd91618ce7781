"""The run directory's lock, directly: who holds it, and filesystems without locks."""

import errno
import fcntl

import pytest

from dpbp.errors import UserError
from dpbp.service import run_dir


def test_lock_names_its_holder_and_refuses_a_second_taker(tmp_path):
    lock, notes = run_dir._lock(str(tmp_path))
    assert notes == [] and (tmp_path / ".lock").read_text() == ""   # signed once it starts
    run_dir.sign(lock)
    assert (tmp_path / ".lock").read_text().startswith("host ")
    with open(tmp_path / ".lock", "a+") as other:   # another process's open file
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.close()


def test_filesystem_without_locks_runs_with_a_note(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_dir.fcntl, "flock", no_locks)
    lock, notes = run_dir._lock(str(tmp_path))
    assert len(notes) == 1 and "cannot lock it (No locks available)" in notes[0]
    lock.close()


def test_a_held_lock_is_refused_with_its_holder(tmp_path, monkeypatch):
    (tmp_path / ".lock").write_text("host h1, pid 7\n")

    def held(fd, op):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(run_dir.fcntl, "flock", held)
    with pytest.raises(UserError, match=r"in use by another dpbp run \(host h1, pid 7\)"):
        run_dir._lock(str(tmp_path))
