import numpy as np
import pytest
import torch
from kedro.io import DatasetError, Version

from clip_continual.data.shapes import make_retrieval_set
from clip_continual.io import CheckpointDataset, NpzDataset


def test_checkpoint_dataset_round_trip(tmp_path, micro):
    dataset = CheckpointDataset(filepath=str(tmp_path / "models" / "task_1.pt"))
    assert not dataset.exists()
    dataset.save(micro)
    assert dataset.exists()
    loaded = dataset.load()
    for key, value in micro.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_checkpoint_dataset_missing_ok_returns_none(tmp_path):
    assert CheckpointDataset(filepath=str(tmp_path / "none.pt"), missing_ok=True).load() is None
    with pytest.raises(DatasetError, match="does not exist"):
        CheckpointDataset(filepath=str(tmp_path / "none.pt")).load()


def test_checkpoint_dataset_rejects_other_objects(tmp_path):
    with pytest.raises(DatasetError, match="ClipModel"):
        CheckpointDataset(filepath=str(tmp_path / "x.pt")).save({"not": "a model"})


def test_checkpoint_dataset_versioned(tmp_path, micro):
    dataset = CheckpointDataset(filepath=str(tmp_path / "model.pt"), version=Version(None, None))
    dataset.save(micro)
    assert dataset.exists()
    assert len(list((tmp_path / "model.pt").iterdir())) == 1
    assert dataset.load().spec.architecture == "clip-continual-micro"


def test_npz_dataset_image_set_round_trip(tmp_path):
    gallery = make_retrieval_set(6, seed=0)
    dataset = NpzDataset(filepath=str(tmp_path / "gallery.npz"), kind="image_set")
    dataset.save(gallery)
    loaded = dataset.load()
    assert np.array_equal(loaded.images, gallery.images)
    assert np.array_equal(loaded.captions, gallery.captions)
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.npz"]


def test_npz_dataset_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="missing or corrupt"):
        NpzDataset(filepath=str(path), kind="image_set").load()


def test_npz_dataset_unknown_kind():
    with pytest.raises(DatasetError, match="unknown NpzDataset kind"):
        NpzDataset(filepath="x.npz", kind="pickle")
