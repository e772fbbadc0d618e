"""geodl, imm, wise_ft, ewc, agem, gem, icarl: update rules and losses against values worked out
by hand on tiny tensors, and their state handed from task to task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from PIL import Image

from clip_continual.data.common import ImageSet
from clip_continual.data.index import ImageIndex
from clip_continual.io import NpzDataset
from clip_continual.methods import get_method
from clip_continual.methods.base import soft_target_cross_entropy
from clip_continual.methods.ewc import ewc_penalty
from clip_continual.methods.geodl import gfk_distance, newton_schulz_inverse_sqrt
from clip_continual.methods.gradients import agem_project, flat_gradient, gem_project
from clip_continual.methods.icarl import cut_to_budget
from clip_continual.methods.memory import Exemplars, herding_order
from clip_continual.model.weights import interpolate_into
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune

PHASES = ([0, 1], [2, 3])


@pytest.fixture(scope="module")
def train_set(micro):
    rng = np.random.default_rng(0)
    size = micro.image_size
    return ImageSet(rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8), np.tile(np.arange(4), 4),
                    tuple(f"thing {i}" for i in range(4)))


@pytest.fixture(scope="module")
def train_files(train_set, tmp_path_factory):
    """``train_set`` as users have it on disk: one lossless PNG per image, read lazily."""
    root = tmp_path_factory.mktemp("train_files")
    for i, image in enumerate(train_set.images):
        Image.fromarray(image).save(root / f"{i:02d}.png")
    return ImageIndex(str(root), tuple(f"{i:02d}.png" for i in range(len(train_set))), train_set.labels,
                      train_set.class_names)


@pytest.fixture(scope="module")
def reference_set(micro):
    rng = np.random.default_rng(1)
    size = micro.image_size
    return ImageSet(rng.integers(0, 256, (10, size, size, 3), dtype=np.uint8), np.zeros(10, np.int64),
                    ("pair",), captions=np.array([[f"a picture number {i}"] for i in range(10)]))


def train(method, start, train_set, reference_set, task=1, state=None, steps=3, **config):
    """One task of two classes (task 1: classes 0, 1; task 2: 2, 3) through the training loop."""
    current = PHASES[task - 1]
    seen = sorted({c for phase in PHASES[:task] for c in phase})
    params = dict(method=method.name, steps=steps, epochs=None, batch_size=4, lr=1e-3, device="cpu",
                  progress=False)
    params.update(config)
    return fine_tune(start, train_set.restrict_to_classes(current), [f"a photo of {n}" for n in train_set.class_names],
                     current, seen, TrainingConfig(**params), task_index=task, method=method,
                     extras={"reference_set": reference_set}, previous_state=state)


def weights(clip):
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


# --- gradient projections ------------------------------------------------------------------

def test_agem_projection_by_hand():
    g, ref = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    assert agem_project(g, ref).tolist() == [1.0, 0.0]  # g - (-1 / 1) * ref
    aligned = torch.tensor([1.0, 1.0])
    assert agem_project(aligned, ref) is aligned
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        g, ref = torch.randn(7, generator=generator), torch.randn(7, generator=generator)
        assert torch.dot(agem_project(g, ref), ref) >= -1e-5


def test_gem_projection_by_hand():
    g = torch.tensor([-1.0, -1.0, 1.0])
    constraints = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # Without margin the closest gradient that violates neither is g with its first two entries cut to 0.
    # gem_project adds 1e-3 * I to the constraints' Gram matrix (as GEM's code does), which moves
    # the solution by O(1e-3): the bound of the first two checks.
    assert torch.allclose(gem_project(g, constraints, margin=0.0), torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)
    one = torch.tensor([[0.0, 1.0, 1.0]])
    assert torch.allclose(gem_project(torch.tensor([1.0, -2.0, 0.0]), one, margin=0.0),
                          agem_project(torch.tensor([1.0, -2.0, 0.0]), one[0]), atol=1e-3)
    # GEM's margin bounds the dual variable from below: a slight violation (v* = 0.1) is
    # corrected by v = 0.5, i.e. g + 0.5 * constraint.
    projected = gem_project(torch.tensor([-0.1, 0.0, 1.0]), constraints[:1], margin=0.5)
    assert torch.allclose(projected, torch.tensor([0.4, 0.0, 1.0]), atol=1e-6)
    assert torch.equal(gem_project(-g, constraints[:1]), -g)  # nothing violated: unchanged


def test_agem_step_has_non_negative_dot_product_with_the_reference_gradient(micro, train_set, reference_set):
    """The hook sees the CE gradient; afterwards it never points against the replayed pairs'."""
    method = get_method("agem")
    captured = {}
    original = method.before_optimizer_step

    def spy(student, batch, task):
        parameters = [p for p in student.parameters() if p.requires_grad]
        rows = method.replay_rows(batch, task)
        reference = method.replay_gradient(student, parameters, rows, task)
        before = flat_gradient(parameters)
        original(student, batch, task)
        captured.setdefault("dots", []).append(
            (float(before @ reference), float(flat_gradient(parameters) @ reference)))

    method.before_optimizer_step = spy
    train(method, micro, train_set, reference_set, steps=4, grad_clip_norm=None)
    assert len(captured["dots"]) == 4
    assert all(after >= -1e-4 * abs(before) - 1e-7 for before, after in captured["dots"])
    assert any(before < 0 for before, _ in captured["dots"]), "no step needed projecting: a weak test"


def test_agem_and_gem_keep_a_growing_memory_of_finished_tasks(micro, train_set, reference_set):
    for name in ("agem", "gem"):
        method = get_method(name, per_task_memory=3)
        model, _ = train(method, micro, train_set, reference_set)
        state = method.export_state()
        assert state["memory_labels"].tolist() and set(state["memory_labels"].tolist()) <= {0, 1}
        assert len(state["memory_labels"]) == 3 and set(state["memory_tasks"].tolist()) == {1}
        second = get_method(name, per_task_memory=3)
        renamed = ImageSet(train_set.images, train_set.labels, tuple(f"other {i}" for i in range(4)))
        train(second, model, renamed, reference_set, task=2, state=state)  # another dataset's names (MTIL)
        after = second.export_state()
        assert after["memory_tasks"].tolist() == [1, 1, 1, 2, 2, 2]
        # Each image keeps the prompt of the task that stored it: task 1's names, then task 2's.
        prompts = [f"a photo of {'thing' if t == 1 else 'other'} {label}"
                   for t, label in zip(after["memory_tasks"], after["memory_labels"])]
        assert np.array_equal(after["memory_tokens"], micro.tokenize(prompts).numpy())


# --- weight interpolation ---------------------------------------------------------------

def test_interpolate_into_takes_untrained_parameters_from_the_anchor_by_hand():
    student, anchor = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]])), student.bias.fill_(4.0)
        anchor.weight.copy_(torch.tensor([[3.0, -2.0]])), anchor.bias.fill_(0.0)
    student.bias.requires_grad_(False)  # not trained: IMM takes the teacher's value
    interpolate_into(student, anchor, 0.75, untrained_from_anchor=True)
    assert student.weight.tolist() == [[1.5, 1.0]] and student.bias.tolist() == [0.0]


@pytest.mark.parametrize("name, weight", [("imm", 0.6), ("wise_ft", 0.8)])
def test_interpolating_methods_train_as_ft_then_merge_with_the_teacher(micro, train_set, reference_set,
                                                                      name, weight):
    """Same steps as ft, so the result is exactly weight * ft + (1 - weight) * teacher."""
    teacher = micro.clone()
    with torch.no_grad():
        for parameter in teacher.model.parameters():
            parameter.add_(0.01)
    ft_model, _ = train(get_method("ft"), micro, train_set, reference_set)
    merged, _ = fine_tune(
        micro, train_set.restrict_to_classes([0, 1]), [f"a photo of {n}" for n in train_set.class_names],
        [0, 1], [0, 1], TrainingConfig(method=name, steps=3, epochs=None, batch_size=4, lr=1e-3,
                                       device="cpu", progress=False),
        teacher=teacher, task_index=1)
    ft, anchor, result = weights(ft_model), weights(teacher), weights(merged)
    for key, value in result.items():
        if value.is_floating_point():
            # One float32 multiply-add per weight (|w| < 1): within a few ulps (~1e-7).
            assert torch.allclose(value, weight * ft[key] + (1 - weight) * anchor[key], atol=1e-6), key


# --- EWC -----------------------------------------------------------------------------------

def test_ewc_penalty_by_hand():
    theta = {"w": torch.tensor([1.0, 2.0])}
    anchor = {"w": torch.tensor([0.0, 0.0])}
    fisher = {"w": torch.tensor([1.0, 0.5])}
    assert float(ewc_penalty(theta, anchor, fisher, penalty=2.0)) == pytest.approx(3.0)  # 1 * (1 + 0.5 * 4)


def test_ewc_fisher_is_the_mean_squared_per_image_gradient_and_is_summed_over_tasks(micro, train_set, reference_set):
    method = get_method("ewc", fisher_samples=2)
    model, _ = train(method, micro, train_set, reference_set)
    state = method.export_state()
    assert "fisher:visual.proj" in state and all(np.all(v >= 0) for v in state.values())
    # By hand for the two images the estimate drew (rows of task 1's training set).
    from clip_continual.methods.memory import draw_indices, replay_rng

    task_set = train_set.restrict_to_classes([0, 1])
    rows = draw_indices(len(task_set), 2, replay_rng(10 + 1, 0, stream=2))
    texts = model.tokenize([f"a photo of thing {c}" for c in (0, 1)])
    squares = []
    for row in rows:
        pixels = model.preprocess(task_set.images[row : row + 1], "cpu")
        image = F.normalize(model.model.encode_image(pixels), dim=-1)
        text = F.normalize(model.model.encode_text(texts), dim=-1)
        loss = F.cross_entropy(model.model.logit_scale.exp() * image @ text.t(),
                               torch.tensor(task_set.labels[row : row + 1]))
        (grad,) = torch.autograd.grad(loss, [model.model.visual.proj])
        squares.append(grad**2)
    # Per-image float32 gradients squared, batched there and one by one here: squaring doubles
    # the relative rounding, and entries near 0 lose digits; 1e-3 is a bound, not a fit.
    assert np.allclose(state["fisher:visual.proj"], (sum(squares) / 2).numpy(), rtol=1e-3, atol=1e-9)

    second = get_method("ewc", fisher_samples=2)
    _, summary = train(second, model, train_set, reference_set, task=2, state=state)
    assert summary["final_losses"]["ewc"] > 0
    summed = second.export_state()["fisher:visual.proj"]
    assert np.all(summed >= state["fisher:visual.proj"] - 1e-12) and not np.allclose(summed, state["fisher:visual.proj"])


# --- iCaRL ---------------------------------------------------------------------------------

def test_herding_by_hand():
    features = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # mean (0.533, 0.6): c is nearest; then (c + a) / 2 = (0.8, 0.4) beats (c + b) / 2 = (0.3, 0.9)
    assert herding_order(features, 3).tolist() == [2, 0, 1]
    assert herding_order(features, 1).tolist() == [2]


def test_cut_to_budget_keeps_the_first_exemplars_of_each_class():
    memory = Exemplars(np.zeros((6, 2, 2, 3), np.uint8), np.array([0, 0, 0, 1, 1, 1]), np.array([1, 1, 1, 2, 2, 2]))
    assert cut_to_budget(memory, per_class=2, budget=None).labels.tolist() == [0, 0, 1, 1]
    kept = cut_to_budget(memory, per_class=2, budget=3)  # 3 // 2 classes = 1 each
    assert kept.labels.tolist() == [0, 1] and kept.tasks.tolist() == [1, 2]


def test_icarl_loss_by_hand(micro, train_set, reference_set):
    """The distillation terms recomputed from the memory the method replays at step 0."""
    method = get_method("icarl", per_class=2)
    recorded = {}
    original = method.loss_terms

    def spy(student, batch, task):
        terms = original(student, batch, task)
        if batch.step == 0:
            recorded.update(terms=terms, task=task, student=student)
        return terms

    method.loss_terms = spy
    train(method, micro, train_set, reference_set, steps=1, lr=1e-12)
    task, student = recorded["task"], recorded["student"]
    from clip_continual.methods.memory import draw_indices, replay_rng

    rows = draw_indices(len(method.memory), 4, replay_rng(task.seed, 0))
    pixels = micro.preprocess(method.memory.images[rows], "cpu")
    with torch.no_grad():
        text = F.normalize(micro.model.encode_text(task.class_tokens[[0, 1]]), dim=-1)
        student_image = F.normalize(student.encode_image(pixels), dim=-1)
        teacher_image = F.normalize(micro.model.encode_image(pixels), dim=-1)
    scale = micro.model.logit_scale.exp()
    z, z_old = scale * student_image @ text.t(), scale * teacher_image @ text.t()

    def by_hand(student_logits, teacher_logits):  # CE(z / 2, softmax(z_old / 2)) * 4, mean over rows
        p = torch.softmax(teacher_logits / 2, dim=1)
        return float(-(p * torch.log_softmax(student_logits / 2, dim=1)).sum(1).mean() * 4)

    # float32 features (student trained at lr 1e-12, so ~the start model) through a softmax:
    # ~1e-6 relative; 1e-4 bounds it.
    assert float(recorded["terms"]["icarl_image"].detach()) == pytest.approx(5 * by_hand(z, z_old), rel=1e-4)
    assert float(recorded["terms"]["icarl_text"].detach()) == pytest.approx(5 * by_hand(z.t(), z_old.t()), rel=1e-4)


@pytest.mark.parametrize("source", ["train_set", "train_files"])
def test_icarl_memory_stays_within_budget_and_resumes_exactly(micro, source, reference_set, tmp_path, request):
    train_set = request.getfixturevalue(source)  # in memory, or files read through the DataLoader
    first = get_method("icarl", per_class=3, budget=5)
    model, _ = train(first, micro, train_set, reference_set)
    state = first.export_state()
    assert len(state["memory_labels"]) <= 5 and sorted(set(state["memory_labels"].tolist())) == [0, 1]
    store = NpzDataset(str(tmp_path / "task_1_method_state.npz"))
    store.save(state)
    loaded = store.load()
    assert all(np.array_equal(loaded[k], state[k]) for k in state)

    runs = []
    for handed_on in (state, loaded):  # straight on, and resumed from the stored artifact
        method = get_method("icarl", per_class=3, budget=5)
        trained, _ = train(method, model, train_set, reference_set, task=2, state=handed_on)
        runs.append((weights(trained), method.export_state()))
    (first_weights, first_state), (second_weights, second_state) = runs
    assert len(first_state["memory_labels"]) <= 5 and set(first_state["memory_labels"].tolist()) == {0, 1, 2, 3}
    assert all(np.array_equal(first_state[k], second_state[k]) for k in first_state)
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


# (moe_adapters' DDAS reads training images too, but its AlexNet needs 31 px; the micro CLIP has 16.)
METHODS_READING_IMAGES = {"icarl": {"per_class": 3}, "ewc": {"fisher_samples": 5}, "agem": {"per_task_memory": 3}}


def test_methods_read_training_images_from_files_as_from_memory(micro, train_set, train_files, reference_set):
    """The same images in memory and as files: the same exemplars (pixels at the model's
    resolution; agem's per-task memory too), Fisher and DDAS autoencoder, bit for bit."""
    runs = {}
    for name, options in METHODS_READING_IMAGES.items():
        for images in (train_set, train_files):
            method = get_method(name, **options)
            trained, _ = train(method, micro, images, reference_set, steps=1)
            runs[name, images is train_files] = method.export_state(), weights(trained)
    for name in METHODS_READING_IMAGES:
        (memory_state, memory_weights), (file_state, file_weights) = runs[name, False], runs[name, True]
        assert memory_state.keys() == file_state.keys() and memory_state
        assert memory_weights.keys() == file_weights.keys()
        # The same pixels through the same arithmetic: bit-identical, not merely close (a float
        # tolerance here would let Adam's amplification of any difference pass unseen).
        for key in memory_state:
            assert np.array_equal(memory_state[key], file_state[key]), key
        assert all(torch.equal(memory_weights[k], file_weights[k]) for k in memory_weights)
    icarl_memory, icarl_files = runs["icarl", False][0], runs["icarl", True][0]
    assert np.array_equal(icarl_memory["memory_images"], icarl_files["memory_images"])
    assert icarl_files["memory_images"].shape == (6, micro.image_size, micro.image_size, 3)
    assert runs["agem", True][0]["memory_images"].shape == (3, micro.image_size, micro.image_size, 3)


def test_icarl_with_a_budget_below_one_exemplar_per_class_replays_nothing(micro, train_set, reference_set):
    method = get_method("icarl", per_class=3, budget=1)
    _, summary = train(method, micro, train_set, reference_set, steps=1)
    assert len(method.memory) == 0 and summary["final_losses"]["icarl_image"] == 0.0


# --- GeoDL ---------------------------------------------------------------------------------

def test_newton_schulz_single_iteration_by_hand():
    # |A| = 5, Y = A / 5, one step: Z = 1/2 (3I - Y) = diag(1.2, 1.1), then Z / sqrt(5)
    result = newton_schulz_inverse_sqrt(torch.diag(torch.tensor([3.0, 4.0])))
    assert torch.allclose(result, torch.diag(torch.tensor([1.2, 1.1], dtype=torch.float64)) / math.sqrt(5))


def test_gfk_distance_properties():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(6, 8, generator=generator)
    # Identical subspaces: 0 up to float32 rounding of the principal angles' cosines (~1e-7).
    assert float(gfk_distance(student, student.detach())) == pytest.approx(0.0, abs=1e-6)
    assert float(gfk_distance(student[:2], teacher[:2])) == 0.0  # fewer than 3 rows: CL-CLIP's fallback
    distance = gfk_distance(student, teacher)
    assert torch.isfinite(distance) and float(distance) != 0.0
    distance.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    # More rows than feature dimensions (a big batch of small features) still works.
    assert torch.isfinite(gfk_distance(torch.randn(12, 4, generator=generator), torch.randn(12, 4, generator=generator)))


def test_geodl_terms_are_gfk_distances_of_image_and_seen_class_text(micro, train_set, reference_set):
    method = get_method("geodl", alpha=0.5)
    _, summary = train(method, micro, train_set, reference_set, steps=1, lr=1e-12)
    # Student = teacher at step 0: both distances vanish, only CE remains.
    # 0 up to float32 rounding of the principal angles' cosines (~1e-7).
    assert summary["final_losses"]["geodl_image"] == pytest.approx(0.0, abs=1e-6)
    assert summary["final_losses"]["geodl_text"] == 0.0  # two classes seen: under 3 rows


def test_method_options_are_checked():
    from clip_continual.methods import MethodConfigError

    for name, options in [("imm", {"weight": 1.5}), ("ewc", {"penalty": -1}), ("icarl", {"selection": "best"}),
                          ("agem", {"per_task_memory": -1}), ("gem", {"memory_strength": -1})]:
        with pytest.raises(MethodConfigError):
            get_method(name, **options)
    assert soft_target_cross_entropy is not None
