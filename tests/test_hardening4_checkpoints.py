"""Issue 30 (hardening, round 4), the checkpoint and writer items: a checkpoint's record and weights are checked
before anything is built from them (item 6), writers replace only their own kind of file (item 7), a full disk
under the run lock is one line (item 10), and a checkpoint is rebuilt by one resolution everywhere (item 11)."""
import errno
import io

import pytest

import utils.lock
from utils.errors import UserError


class FullDiskFile(io.FileIO):
    """A file on a disk with no space left: every write fails with ENOSPC, as a full tmpfs does."""

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


# ============ item 10: a full disk under the run lock ============

def test_a_full_disk_when_the_lock_notes_its_holder_is_one_error(tmp_path, monkeypatch):
    def open_on_full_disk(path, mode="r", *args, **kwargs):
        return io.TextIOWrapper(io.BufferedRandom(FullDiskFile(path, "a+")))

    monkeypatch.setattr(utils.lock, "open", open_on_full_disk, raising=False)
    lock = tmp_path / "run.lock"
    with pytest.raises(UserError, match="cannot write the run lock .*No space left on device"):
        with utils.lock.run_lock(lock):
            pass
    assert not lock.exists()
    monkeypatch.undo()
    with utils.lock.run_lock(lock):  # the failed attempt released its lock
        pass
