"""Data-parallel training under Ray Train: 2 workers compute the 1-process run's gradients and
end with its weights (the comparison and its tolerances: ``test_distributed.py``; a file of its
own, so that the suite's workers run the Ray and the torch launches side by side)."""

from __future__ import annotations

import pytest

import test_distributed
from test_distributed import assert_same_run, one_process, task, train  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_ray_workers_match_one_process(local_ray, micro64, task, one_process, tmp_path):
    # Ray's workers do not have the tests folder on their path: the recording method travels
    # by value (cloudpickle), as a method defined in a user's own script would.
    from ray import cloudpickle

    settings = {"backend": "ray", "workers": 2, "use_gpu": False, "storage_path": str(tmp_path / "ray")}
    cloudpickle.register_pickle_by_value(test_distributed)
    try:
        result = train(micro64, task, tmp_path / "gradients", settings)
    finally:
        cloudpickle.unregister_pickle_by_value(test_distributed)
    assert_same_run(result, one_process, workers=2)
    assert result[1]["backend"] == "ray"
