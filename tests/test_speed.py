"""Speed switches of the training loop: checked settings, their defaults, and on CPU the same
losses with each switch on as without (a few steps of the micro model), with the trained model
handed back plain."""

from __future__ import annotations

import pytest
import torch

from clip_continual.training.config import TrainingConfig, TrainingConfigError
from clip_continual.training.loop import fine_tune
from clip_continual.training.schedule import build_optimizer
from clip_continual.training.speed import _use_tf32, training_speed

STEPS = 3
# Each switch reorders float32 sums (another convolution layout, recomputed blocks, another
# Adam kernel); three steps at lr 1e-3 keep the losses within this relative tolerance.
RTOL = 1e-4


def test_the_switches_default_to_plain_pytorch():
    config = TrainingConfig()
    assert (config.tf32, config.compile, config.channels_last, config.activation_checkpointing) == (
        False, False, False, False)
    assert config.fused is None and config.compile_backend == "inductor"


@pytest.mark.parametrize("setting, value, message", [
    ("tf32", "yes", "tf32 must be true or false"),
    ("compile", 1, "compile must be true or false"),
    ("channels_last", None, "channels_last must be true or false"),
    ("activation_checkpointing", "on", "activation_checkpointing must be true or false"),
    ("fused", "auto", "fused must be true, false or null"),
    ("compile_backend", "tensorrt", "compile_backend must be one of inductor, aot_eager, eager"),
])
def test_a_bad_switch_is_refused_naming_it(setting, value, message):
    with pytest.raises(TrainingConfigError, match=message):
        TrainingConfig.from_params({setting: value})


def test_fused_adam_where_possible_else_foreach_and_a_clear_error_where_impossible():
    on_cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(on_cpu, TrainingConfig()).defaults["fused"] is True
    foreach = build_optimizer(on_cpu, TrainingConfig(fused=False)).defaults
    assert not foreach["fused"] and foreach["foreach"] is True
    on_meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not build_optimizer(on_meta, TrainingConfig(optimizer="adamw")).defaults["fused"]
    with pytest.raises(TrainingConfigError, match="fused Adam needs float parameters on cpu or cuda"):
        build_optimizer(on_meta, TrainingConfig(fused=True))


def test_tf32_is_set_for_the_task_and_restored():
    before = torch.get_float32_matmul_precision()
    restore = _use_tf32()
    assert torch.get_float32_matmul_precision() == "high"
    restore()
    assert torch.get_float32_matmul_precision() == before


@pytest.fixture(scope="module")
def run(micro, random_image_set):
    data = random_image_set(micro, 12, 3)
    prompts = [f"a photo of {name}" for name in data.class_names]

    def losses(**switches) -> tuple[list[float], torch.nn.Module]:
        config = TrainingConfig(method="ft", steps=STEPS, epochs=None, batch_size=4, lr=1e-3,
                                progress=False, seed=0, **switches)
        trained, summary = fine_tune(micro, data, prompts, config=config)
        assert summary["steps"] == STEPS
        return [summary["final_losses"]["loss"], summary["mean_losses"]["loss"]], trained.model

    return losses


@pytest.fixture(scope="module")
def baseline(run):
    return run()[0]


@pytest.mark.parametrize("switches", [
    {"tf32": True},  # a no-op on CPU
    {"channels_last": True},
    {"activation_checkpointing": True},
    {"fused": False},
    # inductor compiles the micro model in about 40 s on one CPU core: the suite checks the
    # compiled path with the tracing backend; benchmarks/gpu_check.sh runs inductor.
    {"compile": True, "compile_backend": "eager"},
])
def test_each_switch_gives_the_same_losses_and_a_plain_model_back(run, baseline, micro, switches):
    losses, model = run(**switches)
    assert losses == pytest.approx(baseline, rel=RTOL)
    assert model.visual._compiled_call_impl is None
    assert not model.transformer.grad_checkpointing and not model.visual.transformer.grad_checkpointing
    assert model.visual.conv1.weight.is_contiguous()
    assert torch.get_float32_matmul_precision() == "highest"
    assert not micro.model.transformer.grad_checkpointing  # the start model is never touched


def test_while_the_task_trains_the_student_is_switched(micro):
    model = micro.clone().model
    config = TrainingConfig(channels_last=True, activation_checkpointing=True, compile=True,
                            compile_backend="eager")
    with training_speed(model, config, torch.device("cpu")):
        assert model.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        assert model.transformer.grad_checkpointing and model.visual.transformer.grad_checkpointing
        assert model.visual._compiled_call_impl is not None
        assert all(block._compiled_call_impl is not None for block in model.transformer.resblocks)
    assert model.visual._compiled_call_impl is None and not model.transformer.grad_checkpointing
