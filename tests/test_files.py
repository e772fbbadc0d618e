"""Writing and reading artifacts: a full disk, a killed save or a corrupt file is named with
its cause and fix, and nothing that existed is overwritten or lost."""

from __future__ import annotations

import errno
import os
import zipfile

import numpy as np
import pytest
import torch

from clip_continual.files import DiskFullError, OutputError, atomic_write, check_writable


@pytest.fixture
def checkpoint(micro, tmp_path):
    from clip_continual.model.checkpoints import save_checkpoint

    path = tmp_path / "models" / "task_1.pt"
    save_checkpoint(micro, path)
    return path


def test_a_full_disk_names_the_file_and_the_size_and_keeps_the_old_file(micro, checkpoint, monkeypatch):
    from clip_continual.model.checkpoints import save_checkpoint

    before = checkpoint.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(micro, checkpoint)
    message = str(error.value)
    assert message.startswith(f"no space left on device for '{checkpoint}'")
    assert "MB, the disk has" in message and "nothing was overwritten" in message
    assert checkpoint.read_bytes() == before
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["task_1.pt"]  # no temporary file


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 10 * 2**20, 2**20))
    written = []
    with pytest.raises(DiskFullError, match=r"needs about 5.06 MB, the disk has 1.00 MB free"):
        atomic_write(tmp_path / "big.npz", written.append, size_hint=5 * 2**20)
    assert written == [] and list(tmp_path.iterdir()) == []


def test_a_stale_temporary_file_is_removed_by_the_next_save(micro, checkpoint):
    from clip_continual.model.checkpoints import save_checkpoint

    folder = checkpoint.parent
    killed = folder / ".task_2.pt.abc123_x.tmp"        # an older writer's name, no process id
    dead = folder / f".task_3.pt.{2**22 + 7}-abcdefgh.tmp"  # a process id that is not running
    live = folder / f".task_4.pt.{os.getpid()}-abcdefgh.tmp"  # this process: being written
    for path in (killed, dead, live):
        path.write_bytes(b"half a checkpoint")
    keep = folder / "notes.tmp"
    keep.write_text("not ours")

    save_checkpoint(micro, folder / "task_2.pt")
    assert not killed.exists() and not dead.exists()
    assert live.exists() and keep.exists() and (folder / "task_2.pt").is_file()


def test_a_truncated_npz_gives_the_project_message_and_counts_as_missing(tmp_path):
    from kedro.io import DatasetError

    from clip_continual.io import NpzDataset

    path = tmp_path / "digits_train.npz"
    dataset = NpzDataset(filepath=str(path))
    dataset.save({"x": np.arange(1000)})
    assert dataset.exists()
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match="it is missing or corrupt. Rerun the node that writes it"):
        dataset.load()
    assert not dataset.exists()  # so `--only-missing-outputs` writes it again


def test_a_truncated_checkpoint_counts_as_missing(checkpoint):
    from clip_continual.io import CheckpointDataset

    dataset = CheckpointDataset(filepath=str(checkpoint))
    assert dataset.exists()
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    assert not zipfile.is_zipfile(checkpoint) and not dataset.exists()
    assert CheckpointDataset(filepath=str(checkpoint), missing_ok=True).load() is None


def test_a_checkpoint_saved_back_unchanged_is_not_rewritten(checkpoint):
    from clip_continual.io import CheckpointDataset

    dataset = CheckpointDataset(filepath=str(checkpoint))
    model = dataset.load()
    stamp = checkpoint.stat().st_mtime_ns
    dataset.save(model)
    assert checkpoint.stat().st_mtime_ns == stamp
    changed = model.clone()  # what training returns: a new model, which is saved
    dataset.save(changed)
    assert checkpoint.stat().st_mtime_ns != stamp


def test_unwritable_outputs_are_named(tmp_path):
    blocker = tmp_path / "08_reporting"
    blocker.write_text("a file")
    check_writable([tmp_path / "fine" / "new.csv"])
    with pytest.raises(OutputError, match="08_reporting' is a file where a folder is needed"):
        check_writable([blocker / "continual_metrics.csv"])
