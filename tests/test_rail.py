"""RAIL: the recursive ridge update is the joint ridge solution, the dual is kernel ridge on every
feature seen, the fusion rule is upstream's, and the fitted classifier survives the task-to-task
hand-over and a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_continual.data.common import ImageSet
from clip_continual.evaluation.features import image_features
from clip_continual.evaluation.zero_shot import zero_shot_accuracy, zero_shot_classifier, predict
from clip_continual.methods.rail import (
    STATE_KEY, AnalyticClassifier, Rail, RecursiveRidge, fuse, gaussian_kernel, kernel_ridge, ridge_solution,
)
from clip_continual.model.adapters import image_classifier
from clip_continual.model.clip import encode_images
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import train
from clip_continual.training.task import training_task


def test_the_recursive_update_is_the_joint_ridge_solution_over_three_chunks(float64):
    """Chunk 1 (classes 0-1) solved at once, chunks 2 (class 2) and 3 (classes 3-4) batch by
    batch with new zero columns: W and R equal the ridge solution on all rows."""
    generator = torch.Generator().manual_seed(0)
    phi = torch.rand(60, 12, generator=generator)
    labels = torch.cat([torch.randint(0, 2, (20,), generator=generator), torch.full((15,), 2),
                        torch.randint(3, 5, (25,), generator=generator)])
    ridge = RecursiveRidge(gamma=0.1)
    for start, end, columns in ((0, 20, 2), (20, 35, 3), (35, 60, 5)):
        ridge.add_columns(columns - (0 if ridge.weight is None else ridge.weight.shape[1]))
        for rows in torch.arange(start, end).split(7):  # batches, as the loop gives them
            ridge.observe(phi[rows], torch.nn.functional.one_hot(labels[rows], columns).double())
        ridge.finish()
    targets = torch.nn.functional.one_hot(labels, 5).double()
    torch.testing.assert_close(ridge.weight, ridge_solution(phi, targets, 0.1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ridge.inverse, torch.linalg.inv(phi.T @ phi + 0.1 * torch.eye(12)),
                               rtol=1e-9, atol=1e-9)


def test_the_dual_is_a_direct_kernel_ridge_solve():
    rng = np.random.default_rng(1)
    features, test = rng.normal(size=(30, 8)), rng.normal(size=(5, 8))
    targets = np.eye(4)[rng.integers(0, 4, 30)]
    squared = ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1)
    alpha = np.linalg.inv(np.exp(-0.1 * squared) + 0.001 * np.eye(30)) @ targets
    got = kernel_ridge(torch.from_numpy(features), torch.from_numpy(targets), 0.1, 0.001)
    np.testing.assert_allclose(got.numpy(), alpha, rtol=1e-6, atol=1e-6)
    kernel = gaussian_kernel(torch.from_numpy(test), torch.from_numpy(features), 0.1).numpy()
    np.testing.assert_allclose(kernel, np.exp(-0.1 * ((test[:, None] - features[None]) ** 2).sum(-1)), rtol=1e-12)


def test_the_fusion_is_zero_shot_without_adapter_weight_or_learnt_class():
    zero_shot = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    adapter = torch.tensor([[0.0, 0.9, 0.0], [0.0, 0.0, 0.0]])
    learnt = torch.tensor([True, True, False])
    assert torch.equal(fuse(zero_shot, adapter, learnt, 0.0), zero_shot)
    assert torch.equal(fuse(zero_shot, adapter, torch.zeros(3, dtype=torch.bool), 0.8), zero_shot)
    fused = fuse(zero_shot, adapter, learnt, 0.8)  # row 0 picks a learnt class, row 1 does not
    torch.testing.assert_close(fused[0], 0.2 * zero_shot[0] + 0.8 * adapter[0])
    assert torch.equal(fused[1], zero_shot[1]) and fused[0].argmax() == 1


def test_the_classifier_changes_only_images_zero_shot_gives_a_learnt_class():
    """Learnt: cat and cow, the regression always says cow. Among dog, cat, cow: what zero-shot
    calls cat or cow becomes cow, dog stays; among classes it never learnt: zero-shot alone."""
    recipe = {"variant": "primal", "feature_dim": 4, "hidden_dim": 6, "feature_expansion": True,
              "projection_seed": 42, "kernel_gamma": 0.1, "fusion_weight": 0.8, "class_names": ["cat", "cow"]}
    head = AnalyticClassifier(recipe)
    head.weight = torch.tensor([[0.0, 50.0]]).repeat(6, 1)
    images = torch.nn.functional.normalize(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    plain = (images @ texts.T).argmax(1)
    assert torch.equal(head.scores(images, texts, ["dog", "owl", "emu"]).argmax(1), plain)
    fused = head.scores(images, texts, ["dog", "cat", "cow"]).argmax(1)
    assert set(plain.tolist()) == {0, 1, 2} and torch.equal(fused, torch.where(plain > 0, 2, plain))


def _separable_images(count: int = 24, classes: int = 4) -> ImageSet:
    """A noisy copy of one random image per class (random images look alike to the micro CLIP)."""
    rng = np.random.default_rng(0)
    labels = np.arange(count) % classes
    images = rng.integers(0, 256, (classes, 16, 16, 3))[labels] + rng.integers(-30, 30, (count, 16, 16, 3))
    return ImageSet(images=np.clip(images, 0, 255).astype(np.uint8), labels=labels,
                    class_names=tuple(f"thing {i}" for i in range(classes)))


def _two_tasks(micro64, variant: str, images: ImageSet):
    """Task 1 learns classes 0-1, task 2 classes 2-3 from task 1's model and state."""
    config = TrainingConfig(method="rail", batch_size=8, steps=1, device="cpu", progress=False,
                            method_options={"variant": variant, "hidden_dim": 256})
    model, state = micro64, {}
    prompts = [f"a photo of {name}" for name in images.class_names]
    for index, classes in enumerate(([0, 1], [2, 3]), start=1):
        method = config.build_method()
        task = training_task(model, images.restrict_to_classes(classes), prompts, current_classes=classes,
                             config=config, method=method, task_index=index, previous_state=state)
        model, summary = train(task)
        state = method.export_state()
        assert summary["steps"] == 2  # every image once (12 images, batches of 8), whatever `steps` says
    return model, state


@pytest.mark.parametrize("variant", ["primal", "dual"])
def test_two_tasks_solve_the_joint_problem_and_survive_a_checkpoint(micro64, variant, tmp_path):
    images = _separable_images()
    model, state = _two_tasks(micro64, variant, images)
    head = image_classifier(model.model)
    assert head.class_names == ["thing 0", "thing 1", "thing 2", "thing 3"]
    order = np.concatenate([np.flatnonzero(np.isin(images.labels, c)) for c in ([0, 1], [2, 3])])
    with torch.no_grad():  # the features the loop read: the frozen model's, of the clean images
        features = encode_images(micro64.model, micro64.preprocess(images.images[order], torch.device("cpu")))
    targets = torch.nn.functional.one_hot(torch.from_numpy(images.labels[order]), 4).double()
    if variant == "primal":
        torch.testing.assert_close(head.weight, ridge_solution(head.expand(features), targets, 0.1))
        assert state[STATE_KEY].shape == (256, 256)
    else:  # the memory's order is the batches': compare outputs, which do not depend on it
        direct = gaussian_kernel(features, features, 0.1) @ kernel_ridge(features, targets, 0.1, 0.001)
        torch.testing.assert_close(head.adapter_scores(features), direct, rtol=1e-6, atol=1e-6)
        assert not state and len(head.memory) == 24
    save_checkpoint(model, tmp_path / "rail.pt")
    loaded = load_checkpoint(tmp_path / "rail.pt")
    classes = zero_shot_classifier(loaded, images.class_names, ["{}"])
    again = predict(image_features(loaded, images.images), classes)
    before = predict(image_features(model, images.images), zero_shot_classifier(model, images.class_names, ["{}"]))
    assert np.array_equal(again, before)
    assert zero_shot_accuracy(loaded, images, ["{}"]) > zero_shot_accuracy(micro64, images, ["{}"]) + 0.5


def test_a_continued_model_without_its_ridge_inverse_is_refused(micro64):
    images = _separable_images(12, 2)
    config = TrainingConfig(method="rail", batch_size=8, steps=1, device="cpu", progress=False)
    first, _ = train(training_task(micro64, images.restrict_to_classes([0]), ["a", "b"], current_classes=[0],
                                   config=config, method=Rail(hidden_dim=16), task_index=1))
    with pytest.raises(ValueError, match=STATE_KEY):
        train(training_task(first, images.restrict_to_classes([1]), ["a", "b"], current_classes=[1],
                            config=config, method=Rail(hidden_dim=16), task_index=2))


@pytest.mark.parametrize(("options", "message"), [
    ({"variant": "kernel"}, "variant must be one of primal, dual"),
    ({"hidden_dim": 0}, "hidden_dim must be a positive integer"),
    ({"fusion_weight": 1.5}, r"fusion_weight must be a number in \[0, 1\]"),
])
def test_a_bad_option_is_refused_with_its_name(options, message):
    from clip_continual.methods import MethodConfigError, get_method

    with pytest.raises(MethodConfigError, match=message):
        get_method("rail", **options)
