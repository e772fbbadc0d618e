import os

import pytest
import torch

# Tests must never reach the project's own MLflow store, nor the network.
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("KEDRO_LOGGING_CONFIG", os.path.join(os.path.dirname(__file__), "logging.yml"))
# Tiny models run fastest single-threaded (and CI machines are small and shared). OMP_NUM_THREADS
# changes it, e.g. to check that no tolerance depends on the order of a float sum.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


# The files that take longest, longest first (``pytest --durations=0`` summed per file). xdist
# hands out whole files in collection order (``--dist loadfile --no-loadscope-reorder`` in
# pyproject.toml): a long file started last would keep one worker busy while the other idles.
SLOWEST_FILES = (
    "test_distributed.py", "test_distributed_ray.py", "test_notebook.py", "test_sweep.py",
    "test_method_pipelines.py", "test_benchmark_pipelines.py", "test_pipelines.py",
    "test_adapted_method_pipelines.py", "test_mtil_pipelines.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.fixture(scope="module")
def micro():
    """A fresh, randomly initialised micro CLIP per test module (tests must not modify it)."""
    from clip_continual.model.clip import ModelSpec
    from clip_continual.model.sources import build_model

    torch.manual_seed(0)
    return build_model(ModelSpec("clip-continual-micro"))


@pytest.fixture(scope="module")
def micro64(micro):
    """``micro`` in float64, for comparisons that are exact in principle (two computations of
    the same sums in another order): they agree to ~1e-16 relative on any CPU, where float32
    leaves ~1e-7, which Adam and deep sums can amplify past any fixed tolerance."""
    model = micro.clone()
    model.model.double()
    return model


@pytest.fixture()
def float64():
    """New tensors and modules in float64 for the test: a formula checked against its
    hand-written form then agrees to ~1e-16 relative on any CPU, checked at 1e-12."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A temporary project after one tiny default run (shared, read only)."""
    from project_helpers import finished_project

    return finished_project(tmp_path_factory)


@pytest.fixture(scope="session")
def compared(tmp_path_factory):
    """A temporary project after a vr_lwf run, an ft run and `compare` (shared, read only)."""
    from project_helpers import compared_project

    return compared_project(tmp_path_factory)


@pytest.fixture(scope="session")
def random_image_set():
    """``random_image_set(clip, count, classes)``: random images at the model's resolution,
    labels cycling through the classes (each class present when count >= classes)."""
    import numpy as np

    from clip_continual.data.common import ImageSet

    def make(clip, count: int, classes: int) -> ImageSet:
        rng = np.random.default_rng(0)
        size = clip.image_size
        return ImageSet(
            images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
            labels=np.arange(count) % classes,
            class_names=tuple(f"thing {i}" for i in range(classes)),
        )

    return make
