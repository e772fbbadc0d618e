"""The training loop: configuration, schedule, freezing, immutability of inputs, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from clip_continual.data.loading import ZsclTrainTransform, random_resized_box
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.methods.vr_lwf import reference_vr_lwf_terms
from clip_continual.model.clip import set_trainable_parts
from clip_continual.training.augment import augment_crop_flip, augment_zscl
from clip_continual.training.config import TrainingConfig, TrainingConfigError
from clip_continual.training.loop import fine_tune
from clip_continual.training.schedule import (
    BatchOrder, build_optimizer, learning_rate_at, plan_training, resolve_precision,
)

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def train_set(micro, random_image_set):
    return random_image_set(micro, 12, NUM_CLASSES)


@pytest.fixture(scope="module")
def prompts(train_set):
    return [f"a photo of {name} ." for name in train_set.class_names]


@pytest.fixture(scope="module")
def vocabulary(micro):
    return build_vocabulary(VocabularyConfig(mode="paper", size=5), micro.context_length)


def config(**overrides) -> TrainingConfig:
    params = dict(method="ft", steps=2, epochs=None, batch_size=4, lr=1e-3, device="cpu",
                  progress=False)
    params.update(overrides)
    return TrainingConfig(**params)


def snapshot(clip):
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


def changed_parameters(before_clip, after_clip):
    before = dict(before_clip.model.named_parameters())
    return {name for name, p in after_clip.model.named_parameters() if not torch.equal(p, before[name])}


# --- configuration ----------------------------------------------------------------------

def test_config_from_params_and_errors():
    parsed = TrainingConfig.from_params(
        {"method": "vr_lwf", "alpha": 2, "betas": [0.9, 0.98], "lr_milestones": [10], "steps": 5}
    )
    assert parsed.betas == (0.9, 0.98) and parsed.build_method().alpha == 2.0
    assert TrainingConfig.from_params({"lr": "1e-6"}).lr == 1e-6  # YAML 1.1 reads 1e-6 as text
    assert TrainingConfig.from_params({"method": "vr_lwf_zscl", "method_options": {"temperature": 3}}
                                      ).build_method().temperature == 3.0
    bad = [
        ({"learning_rate": 1}, "unknown training parameter.*learning_rate"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of adam, adamw, sgd"),
        ({"final_lr_ratio": 2}, "final_lr_ratio must lie in"),
        ({"parts": "head"}, "parts must be one of wm, io, to"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"device": "tpu"}, "device must be one of"),
        ({"augment": "mixup"}, "augment must be one of none, crop_flip"),
        ({"schedule": "linear"}, "schedule must be one of constant, step, cosine"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"teacher": "best"}, "teacher must be one of pretrained, previous"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": None, "epochs": None}, "give the training length"),
        ({"lr": -1}, "lr must be a positive, finite number"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer"),
        ({"betas": [0.9, 1.5]}, "betas must be two numbers"),
        ({"grad_clip_norm": 0}, "grad_clip_norm must be positive or null"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"method": "bogus"}, "unknown method 'bogus'; known methods: agem, .*ewc, ft"),
        ({"method": "ft", "method_options": {"alpha2": 1}}, "has no hyper-parameter"),
    ]
    for params, message in bad:
        with pytest.raises(TrainingConfigError, match=message):
            TrainingConfig.from_params(params)


def test_mixed_precision_only_on_cuda(caplog):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "fp32"
    assert "needs a CUDA device" in caplog.text
    with pytest.raises(TrainingConfigError, match="precision must be one of"):
        resolve_precision("fp64", cpu)


def test_learning_rate_schedule_values():
    assert learning_rate_at(0, 1e-6) == 1e-6 and learning_rate_at(10_000, 1e-6) == 1e-6
    # Paper OST: x0.1 after epoch 10 of 15; here 7 steps per epoch.
    plan = plan_training(TrainingConfig(epochs=15, batch_size=10, schedule="step"), num_images=65)
    assert (plan.steps_per_epoch, plan.total_steps, plan.milestone_steps) == (7, 105, (70,))
    rates = [learning_rate_at(s, 1e-6, "step", plan.milestone_steps, 0.1) for s in (0, 69, 70, 104)]
    assert rates == pytest.approx([1e-6, 1e-6, 1e-7, 1e-7])
    assert learning_rate_at(25, 1.0, "step", (10, 20), 0.5) == 0.25
    with pytest.raises(TrainingConfigError):
        learning_rate_at(0, 1.0, "cosine")


def test_cosine_schedule_with_warmup_is_zscl_s():
    """ZSCL mtil/src/utils.py cosine_lr: lr (step + 1) / warmup, then half a cosine to 0."""
    rates = [learning_rate_at(s, 1e-5, "cosine", warmup_steps=100, total_steps=1000)
             for s in (0, 49, 99, 100, 550, 999)]
    expected = [1e-7, 5e-6, 1e-5, 1e-5, 0.5e-5, 0.5 * (1 + math.cos(math.pi * 899 / 900)) * 1e-5]
    assert rates == pytest.approx(expected)
    assert learning_rate_at(3, 1.0, "constant", warmup_steps=4) == 1.0 and learning_rate_at(2, 1.0, warmup_steps=4) == 0.75


def test_cosine_schedule_with_a_floor_is_diki_s():
    """DIKI/utils.py cosine_schedule_warmup: lr * 1e-3 + 0.5 (lr - lr * 1e-3)(1 + cos(pi s / T))."""
    rates = [learning_rate_at(s, 5.0, "cosine", total_steps=10, final_lr_ratio=1e-3) for s in (0, 5, 9)]
    expected = [5e-3 + 0.5 * (5.0 - 5e-3) * (1 + math.cos(math.pi * s / 10)) for s in (0, 5, 9)]
    assert rates == pytest.approx(expected) and rates[0] == 5.0


def test_steps_cap_epochs_and_batch_order_is_a_pure_function():
    plan = plan_training(TrainingConfig(epochs=3, steps=4, batch_size=5), num_images=12)
    assert (plan.steps_per_epoch, plan.total_steps) == (3, 4)
    first, second = BatchOrder(plan, seed=1), BatchOrder(plan, seed=1)
    epoch = np.concatenate([first.indices(s) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))  # every image once per epoch
    second.indices(5)
    assert np.array_equal(first.indices(1), second.indices(1))


# --- the loop ---------------------------------------------------------------------------

def test_start_model_is_not_mutated(micro, train_set, prompts, vocabulary):
    start = micro.clone()
    start.model.train()
    before = snapshot(start)
    flags = [p.requires_grad for p in start.model.parameters()]
    for method in ("ft", "lwf", "vr_lwf", "vr_lwf_zscl"):
        # teacher 'previous' without a teacher: the start model itself is the teacher.
        trained, _ = fine_tune(start, train_set, prompts, config=config(method=method),
                               vocabulary=vocabulary)
        assert changed_parameters(start, trained)
    for key, value in start.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [p.requires_grad for p in start.model.parameters()] == flags
    assert start.model.training and all(p.grad is None for p in start.model.parameters())


def test_pretrained_teacher_gets_no_gradient_and_stays_unchanged(micro, train_set, prompts, vocabulary):
    teacher = micro.clone()
    before = snapshot(teacher)
    start = micro.clone()
    with torch.no_grad():
        start.model.logit_scale.add_(0.1)
    for method in ("lwf", "vr_lwf", "vr_lwf_zscl"):
        fine_tune(start, train_set, prompts, config=config(method=method, teacher="pretrained"),
                  vocabulary=vocabulary, teacher=teacher)
    assert all(p.grad is None for p in teacher.model.parameters())
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="needs the pretrained model passed as `teacher`"):
        fine_tune(start, train_set, prompts, config=config(method="lwf", teacher="pretrained"))


@pytest.mark.parametrize("parts", ["wm", "io", "to"])
def test_only_the_chosen_parts_change(micro, train_set, prompts, vocabulary, parts):
    trained, summary = fine_tune(micro, train_set, prompts, config=config(method="vr_lwf", parts=parts),
                                 vocabulary=vocabulary)
    changed = changed_parameters(micro, trained)
    visual = {f"visual.{n}" for n, _ in micro.model.visual.named_parameters()}
    everything = {n for n, _ in micro.model.named_parameters()}
    text = everything - visual - {"logit_scale"}
    if parts == "wm":
        assert changed == everything
    elif parts == "io":
        assert changed == visual
    else:
        assert changed == text
    expected_count = sum(p.numel() for n, p in micro.model.named_parameters() if n in changed)
    assert summary["trainable_parameters"] == expected_count


@pytest.mark.parametrize("parts", ["wm", "io", "to"])
def test_optimizer_holds_only_trainable_parameters(micro, parts):
    model = micro.clone().model
    trainable = set_trainable_parts(model, parts)
    optimizer = build_optimizer(trainable, config())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert (id(model.logit_scale) in held) == (parts == "wm")


def test_logit_scale_is_clamped(micro, train_set, prompts):
    start = micro.clone()
    with torch.no_grad():
        start.model.logit_scale.fill_(math.log(500.0))
    trained, summary = fine_tune(start, train_set, prompts, config=config(steps=1))
    assert trained.model.logit_scale.item() <= math.log(100.0) + 1e-6
    # exp(log(100)) in float32: within one ulp (6e-8 relative).
    assert summary["logit_scale"] == pytest.approx(100.0, rel=1e-5)


def test_training_is_reproducible_per_task(micro, train_set, prompts, vocabulary):
    run = dict(config=config(method="vr_lwf", augment="crop_flip", steps=3), vocabulary=vocabulary)
    first, _ = fine_tune(micro, train_set, prompts, task_index=1, **run)
    again, _ = fine_tune(micro, train_set, prompts, task_index=1, **run)
    other, _ = fine_tune(micro, train_set, prompts, task_index=2, **run)
    assert not changed_parameters(first, again)
    assert changed_parameters(first, other)


def test_summary_and_on_step(micro, train_set, prompts, vocabulary):
    seen: list[tuple[int, dict]] = []
    _, summary = fine_tune(micro, train_set.restrict_to_classes([2, 3]), prompts,
                           current_classes=[2, 3], seen_classes=[0, 1, 2, 3],
                           config=config(method="vr_lwf", steps=3), vocabulary=vocabulary,
                           task_index=1, on_step=lambda step, values: seen.append((step, values)))
    assert [step for step, _ in seen] == [1, 2, 3]
    assert set(seen[0][1]) == {"loss", "ce", "lwf", "vr", "lr"}
    # MST after phase 1: class distillation is on (zero at step 1, where student == teacher).
    # (At step 1 the KL of two float32 forwards of the same weights: 0 up to rounding, ~1e-8.)
    assert seen[0][1]["lwf"] == pytest.approx(0.0, abs=1e-6) and seen[-1][1]["lwf"] > 1e-6
    assert summary["steps"] == 3 and summary["median_step_time_s"] > 0
    assert set(summary["final_losses"]) == {"loss", "ce", "lwf", "vr"}
    # The loop sums the float32 terms; here they are summed as Python floats: a few ulps apart.
    assert summary["final_losses"]["loss"] == pytest.approx(
        sum(summary["final_losses"][k] for k in ("ce", "lwf", "vr")), rel=1e-5)


def test_loop_losses_match_the_reference(micro, train_set, prompts, vocabulary):
    """First step of the real loop (precomputed teacher table, fused text forward) against the
    straightforward computation on the same batch."""
    values: dict[str, float] = {}
    cfg = config(method="vr_lwf", steps=1)
    micro64 = micro.clone()  # float64: the two computations agree to rounding on any CPU
    micro64.model.double()
    fine_tune(micro64, train_set, prompts, config=cfg, vocabulary=vocabulary, task_index=0,
              on_step=lambda step, v: values.update(v))
    indices = BatchOrder(plan_training(cfg, len(train_set)), cfg.seed).indices(0)
    student, teacher = micro64.clone(), micro64.clone()
    reference = reference_vr_lwf_terms(
        student.model, teacher.model, micro.preprocess(train_set.images[indices]).double(),
        torch.from_numpy(train_set.labels[indices]), micro.tokenize(prompts),
        list(range(NUM_CLASSES)), list(range(NUM_CLASSES)), vocabulary.tokens(0, 0),
    )
    for name in ("ce", "lwf", "vr"):
        assert values[name] == pytest.approx(reference[name].item(), rel=1e-10, abs=1e-12), name


def test_crop_flip_augmentation(micro, train_set):
    generator = torch.Generator().manual_seed(0)
    pixels = augment_crop_flip(train_set.images[:3], micro, generator, torch.device("cpu"))
    assert pixels.shape == (3, 3, micro.image_size, micro.image_size)
    again = augment_crop_flip(train_set.images[:3], micro, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(pixels, again)


def test_frozen_logit_scale_stays_and_the_optimizer_skips_it(micro, train_set, prompts):
    trained, _ = fine_tune(micro, train_set, prompts, config=config(steps=2, train_logit_scale=False))
    assert torch.equal(trained.model.logit_scale, micro.model.logit_scale)
    assert changed_parameters(micro, trained) - {"logit_scale"}  # the rest trains
    trained, _ = fine_tune(micro, train_set, prompts, config=config(steps=2))
    assert "logit_scale" in changed_parameters(micro, trained)


def test_zscl_augmentation(micro, train_set, prompts):
    rng = np.random.default_rng(0)
    for _ in range(20):
        top, left, height, width = random_resized_box(40, 30, rng)
        assert 0 <= top <= 40 - height and 0 <= left <= 30 - width
        assert 0.85 * 1200 <= height * width <= 1200 and 0.7 <= width / height <= 1.4
    pixels = augment_zscl(train_set.images[:3], micro, torch.Generator().manual_seed(1), torch.device("cpu"))
    again = augment_zscl(train_set.images[:3], micro, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert pixels.shape == (3, 3, micro.image_size, micro.image_size) and torch.equal(pixels, again)
    streamed = ZsclTrainTransform(micro.image_size, micro.image_mean, micro.image_std)  # the DataLoader path
    image = Image.fromarray(train_set.images[0])
    first = streamed(image, np.random.default_rng([1, 2, 3]))
    assert first.shape == (3, micro.image_size, micro.image_size)
    assert torch.equal(first, streamed(image, np.random.default_rng([1, 2, 3])))
    trained, summary = fine_tune(micro, train_set, prompts, config=config(augment="zscl", schedule="cosine",
                                                                           warmup_steps=1))
    assert summary["final_lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0 / 1)) * 1.0)


def test_input_errors(micro, train_set, prompts):
    with pytest.raises(ValueError, match="one prompt per class"):
        fine_tune(micro, train_set, prompts[:2], config=config())
    with pytest.raises(ValueError, match="needs a replayed vocabulary"):
        fine_tune(micro, train_set, prompts, config=config(method="vr_lwf"))
    with pytest.raises(ValueError, match="labels outside current_classes"):
        fine_tune(micro, train_set, prompts, current_classes=[0, 1], config=config())
    with pytest.raises(ValueError, match="must include the current classes"):
        fine_tune(micro, train_set.restrict_to_classes([0, 1]), prompts, current_classes=[0, 1],
                  seen_classes=[1, 2], config=config())
    wrong_context = build_vocabulary(VocabularyConfig(), 20)
    with pytest.raises(ValueError, match="rebuild the vocabulary"):
        fine_tune(micro, train_set, prompts, config=config(method="vr_lwf"), vocabulary=wrong_context)
