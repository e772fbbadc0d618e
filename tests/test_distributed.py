"""Data-parallel training: 2 workers end with the 1-process run's weights; failures surface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from clip_continual.data.common import ImageSet
from clip_continual.training.distributed import (
    DataParallelReplica, DistributedConfig, DistributedConfigError, WorkerFailedError,
    fine_tune_distributed,
)
from clip_continual.methods.ft import FineTuning
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.training.augment import augment_crop_flip, augment_zscl
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def task(micro):
    """An MST-like second task (classes 2, 3 learnt now, 0..3 seen) of vr_lwf: CE, the LwF
    term over seen classes and the vocabulary term all non-zero. 6 images, batch 4: global
    batches of 4 and 2, so the last batch of an epoch is short; crop/flip augmentation on."""
    rng = np.random.default_rng(0)
    size = micro.image_size
    images = ImageSet(
        images=rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8),
        labels=np.tile(np.arange(NUM_CLASSES), 3),
        class_names=tuple(f"thing {i}" for i in range(NUM_CLASSES)),
    )
    return dict(
        train_set=images.restrict_to_classes([2, 3]),
        class_prompts=[f"a photo of {name} ." for name in images.class_names],
        current_classes=[2, 3], seen_classes=[0, 1, 2, 3], task_index=2,
        vocabulary=build_vocabulary(VocabularyConfig(mode="paper", size=5), micro.context_length),
        config=TrainingConfig(method="vr_lwf", alpha=1.0, steps=3, epochs=None, batch_size=4, lr=1e-3,
                              device="cpu", progress=False, augment="crop_flip", grad_clip_norm=0.5,
                              # The attention key bias has a true gradient of 0 (softmax ignores a
                              # shift); Adam divides its rounding noise by sqrt(v) + eps, and at
                              # eps 1e-8 that noise moves it by ~3e-4 differently per run layout.
                              eps=1e-6),
    )


@pytest.fixture(scope="module")
def one_process(micro, task):
    steps = []
    model, summary = fine_tune(micro, teacher=micro, on_step=lambda s, v: steps.append((s, v)), **task)
    return model, summary, steps


def assert_same_run(result, reference):
    (model, summary), (ref_model, ref_summary, ref_steps) = result[:2], reference
    ref_state = ref_model.model.state_dict()
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], atol=1e-5, rtol=0, msg=name)
    assert summary["workers"] == 2 and summary["steps"] == ref_summary["steps"]
    for (step, values), (ref_step, ref_values) in zip(result[2], ref_steps, strict=True):
        assert step == ref_step
        for name in ("loss", "ce", "lwf", "vr"):
            assert values[name] == pytest.approx(ref_values[name], abs=1e-5), (step, name)
    assert ref_steps[-1][1]["lwf"] > 0 and ref_steps[-1][1]["vr"] > 0


def run_distributed(settings, micro, task):
    steps = []
    model, summary = fine_tune_distributed(settings, micro, teacher=micro,
                                           on_step=lambda s, v: steps.append((s, v)), **task)
    return model, summary, steps


def test_two_gloo_workers_match_one_process(micro, task, one_process):
    before = {k: v.clone() for k, v in micro.model.state_dict().items()}
    result = run_distributed({"backend": "torch", "workers": 2}, micro, task)
    assert_same_run(result, one_process)
    assert result[1]["backend"] == "torch"
    assert all(torch.equal(v, before[k]) for k, v in micro.model.state_dict().items())


class CrashOnRankOne(FineTuning):
    def loss_terms(self, student, batch, task):
        if dist.get_rank() == 1:
            raise RuntimeError("worker exploded on purpose")
        return super().loss_terms(student, batch, task)


def test_a_crashing_worker_ends_the_run_with_its_error(micro, task):
    steps = []
    with pytest.raises(WorkerFailedError, match="worker 1 of 2: RuntimeError: worker exploded on purpose"):
        fine_tune_distributed({"backend": "torch", "workers": 2}, micro, teacher=micro,
                              method=CrashOnRankOne(), on_step=lambda s, v: steps.append(s), **task)
    assert steps == []  # nothing logged; the node raises, so nothing is saved either


def test_settings_and_shards():
    with pytest.raises(DistributedConfigError, match="backend must be one of none, torch, ray"):
        DistributedConfig.from_params({"backend": "mpi"})
    with pytest.raises(DistributedConfigError, match="workers must be a positive integer"):
        DistributedConfig.from_params({"backend": "torch", "workers": 0})
    with pytest.raises(DistributedConfigError, match="unknown training.distributed setting"):
        DistributedConfig.from_params({"gpus": 2})
    parts = [DataParallelReplica(rank, 3).part(10) for rank in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(DistributedConfigError, match="cannot be split over 3 workers"):
        DataParallelReplica(0, 3).part(2)


@pytest.mark.parametrize("augment", [augment_crop_flip, augment_zscl])
def test_each_replica_augments_its_part_as_the_global_batch_does(micro, augment):
    images = np.random.default_rng(1).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    draw = lambda part=None: augment(images[part or slice(None)], micro, torch.Generator().manual_seed(3),
                                     torch.device("cpu"), part, None if part is None else len(images))
    parts = torch.cat([draw(slice(0, 3)), draw(slice(3, 5))])
    torch.testing.assert_close(parts, draw(), atol=0, rtol=0)
    assert not torch.equal(parts[0], parts[1])


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_two_ray_workers_match_one_process(local_ray, micro, task, one_process, tmp_path):
    settings = {"backend": "ray", "workers": 2, "use_gpu": False, "storage_path": str(tmp_path)}
    result = run_distributed(settings, micro, task)
    assert_same_run(result, one_process)
    assert result[1]["backend"] == "ray"


def test_methods_not_checked_for_data_parallelism_are_refused_before_any_work(micro, task):
    from clip_continual.methods import get_method

    with pytest.raises(DistributedConfigError, match="method 'ewc' is not yet supported.*use backend 'none'"):
        fine_tune_distributed({"backend": "torch", "workers": 2}, micro, teacher=micro,
                              method=get_method("ewc"), **task)
