"""ZSCL: its loss terms against formulas written out on tiny tensors; the weight ensemble."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_continual.data.common import ImageSet
from clip_continual.methods import get_method
from clip_continual.methods.base import Batch, TaskContext
from clip_continual.methods.zscl import WeightEnsemble

NUM_CLASSES = 3
T = 2.0


@pytest.fixture()
def models(micro):
    student, zero_shot = micro.clone(), micro.clone()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in student.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        student.model.logit_scale.fill_(math.log(30.0))
    student.model.eval()
    zero_shot.model.eval()
    return student, zero_shot


@pytest.fixture()
def reference(micro):
    rng = np.random.default_rng(0)
    size = micro.image_size
    return ImageSet(
        images=rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
        labels=np.zeros(4, dtype=np.int64), class_names=("reference",),
        captions=np.array([["a red circle", "a circle"], ["a blue square", "a square"],
                           ["a green star", "a star"], ["a small cross", "a cross"]]),
    )


def make_task(student, zero_shot, reference, method=None):
    if method is not None:
        method.prepare_student(student.model, "wm")
    tokens = student.tokenize([f"a photo of thing {i} ." for i in range(NUM_CLASSES)])
    return TaskContext(
        task_index=1, device=torch.device("cpu"), class_tokens=tokens,
        current_classes=torch.arange(NUM_CLASSES), seen_classes=torch.arange(NUM_CLASSES),
        preprocess=lambda images: student.preprocess(images, "cpu"),
        tokenize=lambda texts: student.tokenize(list(texts)),
        extras={"reference_set": reference, "pretrained_model": zero_shot},
    )


def hand_soft_cross_entropy(student_logits, teacher_logits):
    """-(sum_j softmax(t/T)_j log softmax(s/T)_j), averaged over rows, times T^2."""
    total = 0.0
    for s_row, t_row in zip(student_logits.tolist(), teacher_logits.tolist()):
        t_exp = [math.exp(v / T) for v in t_row]
        s_exp = [math.exp(v / T) for v in s_row]
        total -= sum(te / sum(t_exp) * math.log(se / sum(s_exp)) for te, se in zip(t_exp, s_exp))
    return total / len(student_logits) * T * T


def test_zscl_terms_by_hand(models, reference):
    student, zero_shot = models
    method = get_method("zscl", image_loss=0.7, text_loss=0.3, l2=2.0, label_smoothing=0.0)
    task = make_task(student, zero_shot, reference, method)
    method.before_task(task)
    pixels = torch.randn(2, 3, student.image_size, student.image_size, generator=torch.Generator().manual_seed(3))
    batch = Batch(step=4, indices=torch.arange(2), labels=torch.tensor([0, 2]), pixels=pixels)
    terms = method.loss_terms(student.model, batch, task)

    rows = method.reference_rows(4, 2)
    ref_pixels = student.preprocess(reference.images[rows], "cpu")
    captions = [c for pair in reference.captions.tolist() for c in pair]
    with torch.no_grad():
        texts = F.normalize(zero_shot.model.encode_text(student.tokenize(captions)), dim=-1)
        student_images = F.normalize(student.model.encode_image(ref_pixels), dim=-1)
        zero_shot_images = F.normalize(zero_shot.model.encode_image(ref_pixels), dim=-1)
    scale = 30.0
    logits, targets = scale * student_images @ texts.t(), scale * zero_shot_images @ texts.t()
    # float32 features through a softmax over the reference batch: ~1e-6 relative; 1e-4 bounds it.
    assert terms["zscl_image"].item() == pytest.approx(0.7 * hand_soft_cross_entropy(logits, targets), rel=1e-4)
    assert terms["zscl_text"].item() == pytest.approx(0.3 * hand_soft_cross_entropy(logits.t(), targets.t()), rel=1e-4)
    assert terms["l2"].item() == 0.0  # the anchor is the model the task started from
    assert set(terms) == {"ce", "zscl_image", "zscl_text", "l2"}

    with torch.no_grad():
        student.model.text_projection[:2, :3].add_(0.1)  # six entries move by 0.1
    terms = method.loss_terms(student.model, batch, task)
    # (w + 0.1 - w)^2 in float32 loses the low bits of w + 0.1: ~1e-6 relative.
    assert terms["l2"].item() == pytest.approx(2.0 * 6 * 0.01, rel=1e-4)
    method.after_task(task, student.model)


def test_reference_batches_are_a_pure_function_of_the_step(models, reference):
    student, zero_shot = models
    method = get_method("zscl")
    method.before_task(make_task(student, zero_shot, reference, method))
    assert method.reference_rows(7, 3).tolist() == method.reference_rows(7, 3).tolist()
    assert len(set(method.reference_rows(7, 3).tolist())) == 3
    assert method.reference_rows(0, 10).size == 4  # never more than the reference set


def test_weight_ensemble_is_the_exact_running_mean():
    start = {"w": torch.tensor([0.0, 1.0])}
    ensemble = WeightEnsemble(start, every=2)
    assert [ensemble.due(step) for step in range(1, 6)] == [True, False, True, False, True]
    for value in ([3.0, 4.0], [6.0, -2.0]):
        ensemble.add({"w": torch.tensor(value)})
    assert ensemble.mean["w"].tolist() == [3.0, 1.0]  # (0 + 3 + 6) / 3, (1 + 4 - 2) / 3
    assert start["w"].tolist() == [0.0, 1.0]  # the input is left alone


def _ensemble_after(models, reference, steps: int, kept: tuple[int, ...]):
    """zscl (average every 2) through ``steps`` fake optimizer steps: the weights it hands on,
    and the one-shot mean of the start weights and those after the steps in ``kept``."""
    student, zero_shot = models
    method = get_method("zscl", average_every=2)
    task = make_task(student, zero_shot, reference, method)
    method.before_task(task)
    model = student.model
    snapshots = [model.text_projection.detach().clone()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.text_projection.add_(float(step))  # what an optimizer step would do
        method.after_optimizer_step(model, step, task)
        if step in kept:
            snapshots.append(model.text_projection.detach().clone())
    method.after_task(task, model)
    return model.text_projection, torch.stack(snapshots).mean(0)


def test_zscl_hands_on_the_ensemble_of_its_steps(models, reference):
    handed_on, expected = _ensemble_after(models, reference, steps=5, kept=(1, 3, 5))
    # A running mean against a one-shot mean of four float32 snapshots (|w| <= ~16): a few ulps.
    assert torch.allclose(handed_on, expected, atol=1e-5)


def test_the_ensemble_takes_the_final_weights_where_zscl_does(models, reference):
    """ZSCL's loop runs ``range(iterations + 1)``: with 4 steps and a merge every 2 it merges after
    0-based iterations 0, 2 and 4, the last an lr-0 step that leaves the final weights. So the
    mean is start, after step 1, after step 3 and the final weights (after step 4)."""
    handed_on, expected = _ensemble_after(models, reference, steps=4, kept=(1, 3, 4))
    assert torch.allclose(handed_on, expected, atol=1e-5)


def test_zscl_needs_captions_and_valid_settings(models, reference):
    from clip_continual.methods import MethodConfigError

    with pytest.raises(MethodConfigError, match="average_every must be a positive integer"):
        get_method("zscl", average_every=0)
    student, zero_shot = models
    bare = ImageSet(images=reference.images, labels=reference.labels, class_names=reference.class_names)
    with pytest.raises(ValueError, match="reference set with captions"):
        method = get_method("zscl")
        method.before_task(make_task(student, zero_shot, bare, method))
