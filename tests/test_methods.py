"""Loss terms of every method against computations written out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_continual.methods import METHODS, MethodConfigError, get_method
from clip_continual.methods.base import (
    Batch, TaskContext, Teacher, class_cross_entropy, distillation_kl, soft_target_cross_entropy,
)
from clip_continual.methods.vocabulary import VocabularyConfig, build_vocabulary
from clip_continual.methods.vr_lwf import reference_vr_lwf_terms

NUM_CLASSES = 5
BATCH = 4


# The model tests run in float64: a fast path and its reference compute the same sums in another
# order, so they agree to float64 rounding (~1e-16 relative) on any CPU and are checked at
# EXACT. Hand computations on small float32 tensors are checked at rel 1e-6 (~16 float32 ulps).
EXACT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture()
def models(micro):
    """A student and a teacher that differ (weights and logit scale), in float64."""
    student = micro.clone()
    teacher = micro.clone()
    student.model.double()
    teacher.model.double()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in teacher.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        teacher.model.logit_scale.fill_(math.log(20.0))
        student.model.logit_scale.fill_(math.log(30.0))
    return student, teacher


@pytest.fixture()
def data(micro):
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(BATCH, 3, micro.image_size, micro.image_size, generator=generator, dtype=torch.float64)
    class_tokens = micro.tokenize([f"a photo of thing number {i} ." for i in range(NUM_CLASSES)])
    vocabulary = build_vocabulary(VocabularyConfig(mode="paper", size=6, seed=3), micro.context_length)
    return pixels, class_tokens, vocabulary


def make_task(class_tokens, current, seen, teacher=None, vocabulary=None, task_index=0):
    return TaskContext(
        task_index=task_index, device=torch.device("cpu"), class_tokens=class_tokens,
        current_classes=torch.tensor(current), seen_classes=torch.tensor(seen),
        vocabulary=vocabulary, teacher=None if teacher is None else Teacher(teacher.model),
    )


def make_batch(pixels, labels, vocab_tokens=None, step=0):
    return Batch(step=step, indices=torch.arange(len(pixels)), labels=torch.tensor(labels),
                 pixels=pixels, vocab_tokens=vocab_tokens)


def features(model, pixels, tokens):
    """Full-context, un-truncated features the way open_clip computes them."""
    image = F.normalize(model.encode_image(pixels), dim=-1)
    text = F.normalize(model.encode_text(tokens), dim=-1)
    return image, text


# --- the loss functions themselves --------------------------------------------------------

def hand_softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_distillation_kl_by_hand():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p, q = hand_softmax(t_row), hand_softmax(s_row)
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected /= len(student)  # batchmean
    got = distillation_kl(torch.tensor(student), torch.tensor(teacher))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_cross_entropy_by_hand_with_temperature_squared():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[0.5, 2.5, 0.0], [1.0, 1.0, 1.0]]
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p = hand_softmax([v / temperature for v in t_row])
        q = hand_softmax([v / temperature for v in s_row])
        expected -= sum(pi * math.log(qi) for pi, qi in zip(p, q))
    expected = expected / len(student) * temperature**2
    got = soft_target_cross_entropy(torch.tensor(student), torch.tensor(teacher), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    unscaled = soft_target_cross_entropy(torch.tensor(student) / 2, torch.tensor(teacher) / 2, 1.0)
    assert got.item() == pytest.approx(4 * unscaled.item(), rel=1e-6)


def test_mst_cross_entropy_masks_other_classes(data):
    _, class_tokens, _ = data
    task = make_task(class_tokens, current=[2, 4], seen=[0, 1, 2, 4])
    all_logits = torch.tensor([[3.0, 1.0, 0.5, 9.0, 2.0], [0.0, 4.0, 1.0, -2.0, 1.5]])
    labels = torch.tensor([4, 2])
    # By hand: softmax over the current classes' logits only.
    expected = -(math.log(hand_softmax([0.5, 2.0])[1]) + math.log(hand_softmax([1.0, 1.5])[0])) / 2
    got = class_cross_entropy(all_logits[:, [2, 4]], labels, task)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    masked = all_logits.clone()
    masked[:, [0, 1, 3]] = float("-inf")
    assert F.cross_entropy(masked, labels).item() == pytest.approx(expected, rel=1e-6)
    assert task.current_in_seen.tolist() == [2, 3]


# --- each method's terms against a hand composition of model features -----------------------

def hand_mst_ce(logits_all, labels, current):
    masked = torch.full_like(logits_all, float("-inf"))
    masked[:, current] = logits_all[:, current]
    return F.cross_entropy(masked, torch.tensor(labels))


def test_ft_terms(models, data):
    student, _ = models
    pixels, class_tokens, _ = data
    current, labels = [1, 3], [3, 1, 1, 3]
    task = make_task(class_tokens, current, seen=[0, 1, 3])
    terms = get_method("ft").loss_terms(student.model, make_batch(pixels, labels), task)
    image, text = features(student.model, pixels, class_tokens)
    expected = hand_mst_ce(30.0 * image @ text.t(), labels, current)
    assert set(terms) == {"ce"}
    torch.testing.assert_close(terms["ce"], expected, **EXACT)


def test_lwf_terms_use_seen_classes_and_the_teachers_own_scale(models, data):
    student, teacher = models
    pixels, class_tokens, _ = data
    current, seen, labels = [2, 3], [0, 1, 2, 3], [2, 3, 3, 2]
    task = make_task(class_tokens, current, seen, teacher=teacher)
    method = get_method("lwf", alpha=0.7)
    method.before_task(task)
    terms = method.loss_terms(student.model, make_batch(pixels, labels), task)

    image, text = features(student.model, pixels, class_tokens)
    with torch.no_grad():
        old_image, old_text = features(teacher.model, pixels, class_tokens)
    logits, old_logits = 30.0 * image @ text.t(), 20.0 * old_image @ old_text.t()
    p = F.softmax(old_logits[:, seen], dim=1)
    kl = (p * (p.log() - F.log_softmax(logits[:, seen], dim=1))).sum() / BATCH
    torch.testing.assert_close(terms["ce"], hand_mst_ce(logits, labels, current), **EXACT)
    torch.testing.assert_close(terms["lwf"], 0.7 * kl, **EXACT)


def hand_vr(student, teacher, pixels, vocab_tokens):
    image, vocab = features(student.model, pixels, vocab_tokens)
    with torch.no_grad():
        old_image, old_vocab = features(teacher.model, pixels, vocab_tokens)
    p = F.softmax(20.0 * old_image @ old_vocab.t(), dim=1)
    return (p * (p.log() - F.log_softmax(30.0 * image @ vocab.t(), dim=1))).sum() / len(pixels)


def test_vr_lwf_terms_ost_have_no_class_distillation(models, data):
    student, teacher = models
    pixels, class_tokens, vocabulary = data
    classes, labels = list(range(NUM_CLASSES)), [0, 4, 2, 2]
    task = make_task(class_tokens, classes, classes, teacher=teacher, vocabulary=vocabulary)
    method = get_method("vr_lwf")
    method.before_task(task)
    rows = vocabulary.tokens(0, 0)
    terms = method.loss_terms(student.model, make_batch(pixels, labels, rows), task)

    image, text = features(student.model, pixels, class_tokens)
    expected_ce = F.cross_entropy(30.0 * image @ text.t(), torch.tensor(labels))
    torch.testing.assert_close(terms["ce"], expected_ce, **EXACT)
    assert terms["lwf"].item() == 0.0
    torch.testing.assert_close(terms["vr"], 0.5 * hand_vr(student, teacher, pixels, rows), **EXACT)


def test_vr_lwf_terms_mst_add_class_distillation(models, data):
    student, teacher = models
    pixels, class_tokens, vocabulary = data
    current, seen, labels = [3, 4], [0, 1, 2, 3, 4], [3, 4, 4, 3]
    task = make_task(class_tokens, current, seen, teacher=teacher, vocabulary=vocabulary, task_index=1)
    method = get_method("vr_lwf", alpha=0.5)
    method.before_task(task)
    rows = vocabulary.tokens(1, 0)
    terms = method.loss_terms(student.model, make_batch(pixels, labels, rows), task)

    image, text = features(student.model, pixels, class_tokens)
    with torch.no_grad():
        old_image, old_text = features(teacher.model, pixels, class_tokens)
    logits = 30.0 * image @ text.t()
    p = F.softmax(20.0 * old_image @ old_text.t(), dim=1)
    kl = (p * (p.log() - F.log_softmax(logits, dim=1))).sum() / BATCH
    torch.testing.assert_close(terms["ce"], hand_mst_ce(logits, labels, current), **EXACT)
    torch.testing.assert_close(terms["lwf"], 0.5 * kl, **EXACT)
    torch.testing.assert_close(terms["vr"], 0.5 * hand_vr(student, teacher, pixels, rows), **EXACT)
    assert terms["lwf"].item() > 0

    no_classes = get_method("vr_lwf", class_distillation=False)
    no_classes.before_task(task)
    assert "lwf" not in no_classes.loss_terms(student.model, make_batch(pixels, labels, rows), task)


def test_vr_lwf_zscl_terms_with_transposed_term_and_t_squared(models, data, micro):
    student, teacher = models
    pixels, class_tokens, _ = data
    vocabulary = build_vocabulary(VocabularyConfig(mode="fixed", size=7, seed=5), micro.context_length)
    classes, labels = [0, 1], [0, 1, 1, 0]
    task = make_task(class_tokens, classes, classes, teacher=teacher, vocabulary=vocabulary)
    method = get_method("vr_lwf_zscl")
    method.before_task(task)
    rows = vocabulary.tokens(0, 3)
    terms = method.loss_terms(student.model, make_batch(pixels, labels, rows), task)

    image, text = features(student.model, pixels, class_tokens)
    with torch.no_grad():
        old_image, old_vocab = features(teacher.model, pixels, rows)  # teacher text on both sides
    student_logits, teacher_logits = 30.0 * image @ old_vocab.t(), 30.0 * old_image @ old_vocab.t()

    def soft_ce(s, t, temperature=2.0):
        return -(F.softmax(t / temperature, 1) * F.log_softmax(s / temperature, 1)).sum(1).mean() * temperature**2

    expected_ce = hand_mst_ce(30.0 * image @ text.t(), labels, classes)
    torch.testing.assert_close(terms["ce"], expected_ce, **EXACT)
    torch.testing.assert_close(terms["vr_image"], soft_ce(student_logits, teacher_logits), **EXACT)
    # Transposed: each pseudo-word's distribution over the batch's images.
    torch.testing.assert_close(terms["vr_text"], soft_ce(student_logits.t(), teacher_logits.t()),
                               **EXACT)

    # Only the image encoder is regularised: the distillation terms give the text tower no gradient.
    student.model.zero_grad()
    (terms["vr_image"] + terms["vr_text"]).backward()
    assert student.model.token_embedding.weight.grad is None
    assert student.model.visual.conv1.weight.grad.abs().sum() > 0


# --- the fast VR-LwF path equals the straightforward one, gradients included ----------------

@pytest.mark.parametrize("current,seen", [([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), ([3, 4], [0, 1, 2, 3, 4])])
def test_fast_vr_lwf_matches_reference(models, data, current, seen):
    student, teacher = models
    pixels, class_tokens, vocabulary = data
    labels = [current[i % len(current)] for i in range(BATCH)]
    rows = vocabulary.tokens(0, 1)
    task = make_task(class_tokens, current, seen, teacher=teacher, vocabulary=vocabulary)
    task.teacher.precompute_image_features([(torch.arange(BATCH), pixels)], BATCH)
    method = get_method("vr_lwf")
    method.before_task(task)

    fast = method.loss_terms(student.model, make_batch(pixels, labels, rows), task)
    student.model.zero_grad()
    sum(fast.values()).backward()
    fast_grads = {n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None}

    reference = reference_vr_lwf_terms(student.model, teacher.model, pixels, torch.tensor(labels),
                                       class_tokens, current, seen, rows)
    student.model.zero_grad()
    sum(reference.values()).backward()
    for name in ("ce", "lwf", "vr"):
        torch.testing.assert_close(fast[name], reference[name], **EXACT)
    # Gradients sum over rows in another order: compare relative to the largest gradient element
    # (a parameter whose true gradient is 0 gets float64 rounding noise on both sides).
    scale = max(parameter.grad.abs().max().item() for parameter in student.model.parameters())
    for name, parameter in student.model.named_parameters():
        torch.testing.assert_close(fast_grads[name], parameter.grad, rtol=0, atol=EXACT["rtol"] * scale,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def test_teacher_gets_no_gradient_and_stays_unchanged(models, data):
    student, teacher = models
    pixels, class_tokens, vocabulary = data
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    task = make_task(class_tokens, [0, 1], [0, 1, 2], teacher=teacher, vocabulary=vocabulary)
    for name in ("lwf", "vr_lwf", "vr_lwf_zscl"):
        method = get_method(name)
        method.before_task(task)
        terms = method.loss_terms(student.model, make_batch(pixels, [0, 1, 0, 1], vocabulary.tokens(0, 0)), task)
        sum(terms.values()).backward()
        method.after_task(task, student.model)
    assert all(p.grad is None for p in teacher.model.parameters())
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- the registry ---------------------------------------------------------------------------

def test_registry_and_hyper_parameter_errors():
    assert set(METHODS) == {"ft", "lwf", "lwf_zscl", "vr_lwf", "vr_lwf_zscl", "geodl", "imm", "wise_ft", "ewc", "agem",
                            "gem", "icarl", "rkr", "moe_adapters", "zscl", "rail", "lora", "condu",
                            "condu_lora", "diki", "dpw"}
    assert get_method("vr_lwf").alpha == 0.5 and get_method("vr_lwf_zscl").alpha == 1.0
    assert get_method("lwf", alpha=None).alpha == 0.5
    with pytest.raises(MethodConfigError, match="unknown method 'bogus'; known methods: agem, condu, condu_lora, diki, dpw, ewc"):
        get_method("bogus")
    with pytest.raises(MethodConfigError, match="has no hyper-parameter.*temperature"):
        get_method("vr_lwf", temperature=2)
    with pytest.raises(MethodConfigError, match="alpha must be a non-negative"):
        get_method("lwf", alpha=-1)
    with pytest.raises(MethodConfigError, match="temperature must be positive"):
        get_method("vr_lwf_zscl", temperature=0)
    assert get_method("vr_lwf_zscl", temperature=3).hyper_parameters()["temperature"] == 3.0
