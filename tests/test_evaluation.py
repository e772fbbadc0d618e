import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip_continual.data.common import ImageSet
from clip_continual.evaluation.features import image_features
from clip_continual.evaluation.metrics import (
    average_accuracy, average_incremental_accuracy, avg_accuracy, backward_transfer, bwt_at, continual_metrics,
    forgetting, forward_transfer, last_accuracy, learning_accuracies, transfer, ut_acc,
)
from clip_continual.evaluation.retrieval import RETRIEVAL_KEYS, caption_index, retrieval_metrics
from clip_continual.evaluation.step import evaluate_step
from clip_continual.evaluation.zero_shot import (
    fill_template, per_class_accuracy, phase_accuracies, predict, predict_images, seen_class_accuracy,
    seen_classes, top1_accuracy, zero_shot_classifier,
)
from clip_continual.model.clip import ModelSpec
from clip_continual.model.sources import build_model

# Hand-built accuracy matrix, T = 3 (row 0 = starting model, row t = after task t).
R = np.array([
    [0.50, 0.40, 0.30],
    [0.90, 0.50, 0.35],
    [0.95, 0.80, 0.45],
    [0.60, 0.70, 0.90],
])


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_model(ModelSpec("clip-continual-micro"))


def _images(n, size=16, seed=0, constant=None):
    if constant is not None:
        return np.full((n, size, size, 3), constant, dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# --- continual metrics on the hand-built matrix ------------------------------------------------

def test_average_and_last_accuracy():
    # mean(0.6, 0.7, 0.9) = 2.2 / 3
    assert average_accuracy(R) == pytest.approx(2.2 / 3)
    assert last_accuracy(R) == pytest.approx(2.2 / 3)


def test_average_incremental_accuracy():
    # step 1: 0.9; step 2: (0.95 + 0.8) / 2 = 0.875; step 3: 2.2 / 3 -> mean of the three
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + 0.875 + 2.2 / 3) / 3)


def test_backward_transfer():
    # ((0.6 - 0.9) + (0.7 - 0.8)) / 2 = -0.2
    assert backward_transfer(R) == pytest.approx(-0.2)


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 1: max(R1=0.9, R2=0.95) - 0.6 = 0.35; task 2: R2=0.8 - 0.7 = 0.1 -> 0.225 (not -BWT)
    assert forgetting(R) == pytest.approx(0.225)


def test_forward_transfer():
    # ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2 = ((0.5 - 0.4) + (0.45 - 0.3)) / 2
    assert forward_transfer(R) == pytest.approx(0.125)


def test_mtil_transfer_and_avg():
    # task 2: R[1][2] = 0.5; task 3: (0.35 + 0.45) / 2 = 0.4 -> 0.45
    assert transfer(R) == pytest.approx(0.45)
    # rows 1..3 sum to 1.75 + 2.2 + 2.2 = 6.15 over 9 cells
    assert avg_accuracy(R) == pytest.approx(6.15 / 9)


def test_per_step_ut_acc_and_bwt():
    assert ut_acc(R, 0) == pytest.approx(0.4)          # starting model on all tasks
    assert ut_acc(R, 1) == pytest.approx(0.9)
    assert ut_acc(R, 2) == pytest.approx(0.875)
    assert ut_acc(R, 3) == pytest.approx(2.2 / 3)
    assert bwt_at(R, 0) == 0.0 and bwt_at(R, 1) == 0.0
    assert bwt_at(R, 2) == pytest.approx(0.05)          # 0.95 - 0.9
    assert bwt_at(R, 3) == pytest.approx(-0.2)
    assert bwt_at(R[:3], 2) == pytest.approx(0.05)      # a run in progress: rows 0..2 only


def test_learning_accuracy_is_the_diagonal_and_ignores_later_forgetting():
    assert learning_accuracies(R) == pytest.approx([0.9, 0.8, 0.9])
    forgotten = R.copy()
    forgotten[3, :2] = 0.0  # forgetting after learning does not change it
    assert learning_accuracies(forgotten) == pytest.approx([0.9, 0.8, 0.9])
    assert continual_metrics(R)["mean_learning_acc"] == pytest.approx(2.6 / 3)


def test_continual_metrics_collects_all():
    metrics = continual_metrics(R)
    assert set(metrics) == {"average_accuracy", "average_incremental_accuracy", "backward_transfer",
                            "forgetting", "forward_transfer", "transfer", "avg", "last",
                            "mean_learning_acc"}
    assert metrics["forgetting"] == pytest.approx(0.225)


def test_single_task_metrics():
    single = np.array([[0.3], [0.8]])
    assert backward_transfer(single) == 0.0
    assert forgetting(single) == 0.0
    assert forward_transfer(single) == 0.0
    assert np.isnan(transfer(single))
    assert avg_accuracy(single) == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.zeros((4,)), np.zeros((1, 0)), [[0.1, np.nan], [0, 0], [0, 0]]])
def test_matrix_shape_errors(bad):
    with pytest.raises(ValueError):
        average_accuracy(bad)


def test_partial_matrix_errors():
    with pytest.raises(ValueError, match="rows"):
        bwt_at(R[:2], 2)
    with pytest.raises(ValueError, match="outside"):
        ut_acc(R, 4)


# --- classification on constructed features ---------------------------------------------------

def test_predict_and_accuracy_on_constructed_features():
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.1, 0.7, 0.3], [0.5, 0.5, 0.0]])
    predictions = predict(images, classes)
    # the last image ties classes 0 and 1: the lowest index wins, deterministically
    np.testing.assert_array_equal(predictions, [0, 2, 1, 0])
    assert top1_accuracy(predictions, np.array([0, 2, 2, 1])) == pytest.approx(0.5)


def test_seen_classes_grow_with_the_step():
    phases = [[3, 1], [0, 2], [4]]
    assert seen_classes(phases, 0) == [0, 1, 2, 3, 4]   # before learning: every class
    assert seen_classes(phases, 1) == [1, 3]
    assert seen_classes(phases, 2) == [0, 1, 2, 3]


def test_seen_class_accuracy_classifies_among_the_seen_classes_only():
    classes = torch.eye(3)
    # image 1 (class 1) looks most like unseen class 2, but among the seen {0, 1} it is a 1;
    # image 2 (class 0) is a 1 either way; image 3 (class 2) is not counted.
    images = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.4, 0.6], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([0, 1, 0, 2])
    assert seen_class_accuracy(images, labels, classes, [0, 1]) == pytest.approx(2 / 3)
    assert seen_class_accuracy(images, labels, classes, [0, 1, 2]) == pytest.approx(2 / 4)


def test_predict_shape_error():
    with pytest.raises(ValueError, match="class features"):
        predict(torch.zeros(2, 3), torch.zeros(4, 5))


def test_per_class_and_phase_accuracies():
    labels = np.array([0, 0, 1, 1, 2, 3])
    predictions = np.array([0, 1, 1, 1, 0, 3])  # class 2 confused with class 0 of another phase
    per_class = per_class_accuracy(predictions, labels, 5)
    np.testing.assert_allclose(per_class[:4], [0.5, 1.0, 0.0, 1.0])
    assert np.isnan(per_class[4])  # no image of class 4
    # phase 1: (0.5 + 1) / 2; phase 2: (0 + 1) / 2; class 4 has no images and is skipped
    assert phase_accuracies(predictions, labels, [[0, 1], [2, 3, 4]]) == pytest.approx([0.75, 0.5])
    with pytest.raises(ValueError, match="no test images"):
        phase_accuracies(predictions, labels, [[0, 1], [4]])
    with pytest.raises(ValueError, match="equal length"):
        top1_accuracy(predictions, labels[:3])


# --- retrieval ---------------------------------------------------------------------------------

def _retrieval_from_scores(scores, owner, **kwargs):
    """Identity image features make similarity[i, j] equal scores[i, j] exactly."""
    scores = np.asarray(scores, dtype=np.float32)
    return retrieval_metrics(np.eye(scores.shape[0], dtype=np.float32), scores.T, owner, **kwargs)


def test_retrieval_with_several_captions_per_image():
    owner = [0, 0, 1, 1, 2, 2]
    scores = [
        [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],   # best own caption 0.9, nothing ahead: rank 0
        [0.8, 0.1, 0.3, 0.7, 0.2, 0.9],   # best own 0.7; 0.8 and 0.9 of others ahead: rank 2
        [0.4, 0.6, 0.1, 0.5, 0.55, 0.2],  # best own 0.55; 0.6 ahead: rank 1
    ]
    metrics = _retrieval_from_scores(scores, owner, ks=(1, 2, 3))
    assert metrics["i2t_r1"] == pytest.approx(1 / 3)
    assert metrics["i2t_r2"] == pytest.approx(2 / 3)
    assert metrics["i2t_r3"] == pytest.approx(1.0)
    # caption ranks [0, 2, 1, 0, 0, 1]; caption 1 scores 0.1 on image 0 AND image 1: the tie counts ahead
    assert metrics["t2i_r1"] == pytest.approx(3 / 6)
    assert metrics["t2i_r2"] == pytest.approx(5 / 6)
    assert metrics["t2i_r3"] == pytest.approx(1.0)


def test_retrieval_default_keys_and_range():
    metrics = _retrieval_from_scores(np.random.default_rng(0).random((12, 24)), np.repeat(np.arange(12), 2))
    assert set(metrics) == set(RETRIEVAL_KEYS)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]


def test_constant_scores_never_give_perfect_recall():
    ones = np.ones((20, 8), dtype=np.float32)
    metrics = retrieval_metrics(ones, ones, np.arange(20))
    assert all(value == 0.0 for value in metrics.values())  # 19 tied competitors rank ahead
    # 4 images x 2 captions: an image has 6 tied foreign captions ahead, a caption 3 tied images
    metrics = retrieval_metrics(np.ones((4, 8)), np.ones((8, 8)), np.repeat(np.arange(4), 2))
    assert (metrics["i2t_r1"], metrics["i2t_r5"], metrics["i2t_r10"]) == (0.0, 0.0, 1.0)
    assert (metrics["t2i_r1"], metrics["t2i_r5"], metrics["t2i_r10"]) == (0.0, 1.0, 1.0)


def test_nan_scores_count_as_misses():
    images = np.full((3, 4), np.nan, dtype=np.float32)
    metrics = retrieval_metrics(images, np.ones((3, 4)), np.arange(3), ks=(1, 2))
    assert all(value == 0.0 for value in metrics.values())


def test_image_without_caption_is_only_a_distractor():
    # image 1 has no caption: no i2t query, but it outranks caption 0's own image in t2i
    metrics = _retrieval_from_scores([[0.5], [0.9]], [0], ks=(1,))
    assert metrics == {"i2t_r1": 1.0, "t2i_r1": 0.0}


def test_retrieval_fold_averaging():
    owner = [0, 1, 2, 3]
    scores = [
        [0.5, 0.1, 0.9, 0.0],  # caption 2 (image 2, other fold) beats the own caption
        [0.2, 0.6, 0.1, 0.0],
        [0.1, 0.0, 0.3, 0.8],  # caption 3 (image 3, same fold) beats the own caption
        [0.0, 0.1, 0.2, 0.7],
    ]
    full = _retrieval_from_scores(scores, owner, ks=(1,))
    # i2t hits: images 1, 3; t2i hits: captions 0, 1 (caption 2 loses to image 0, caption 3 to image 2)
    assert full == pytest.approx({"i2t_r1": 0.5, "t2i_r1": 0.5})
    folded = _retrieval_from_scores(scores, owner, ks=(1,), folds=2)
    # fold {0, 1}: every query hits (1.0 both ways); fold {2, 3}: image 2 and caption 3 miss (0.5)
    assert folded == pytest.approx({"i2t_r1": 0.75, "t2i_r1": 0.75})
    scores = np.asarray(scores, dtype=np.float32)
    first = _retrieval_from_scores(scores[:2, :2], [0, 1], ks=(1,))
    second = _retrieval_from_scores(scores[2:, 2:], [0, 1], ks=(1,))
    assert folded == pytest.approx({k: (first[k] + second[k]) / 2 for k in first})


def test_retrieval_shape_errors():
    with pytest.raises(ValueError, match="one entry per text"):
        retrieval_metrics(np.eye(3), np.eye(3), [0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_metrics(np.eye(3), np.eye(3), [0, 1, 3])
    with pytest.raises(ValueError, match="text features"):
        retrieval_metrics(np.eye(3), np.ones((3, 4)), [0, 1, 2])
    with pytest.raises(ValueError, match="folds"):
        retrieval_metrics(np.eye(3), np.eye(3), [0, 1, 2], folds=4)


def test_caption_index_skips_missing_captions():
    texts, owner = caption_index(np.array([["a", "b"], ["c", ""]]))
    assert texts == ["a", "b", "c"]
    np.testing.assert_array_equal(owner, [0, 0, 1])


# --- features from the micro model -------------------------------------------------------------

def test_fill_template_placeholders():
    assert fill_template("a photo of a {}.", "cat") == "a photo of a cat."
    assert fill_template("this is a photo of {label} .", "cat") == "this is a photo of cat ."
    with pytest.raises(ValueError, match="no placeholder"):
        fill_template("a photo", "cat")


def test_zero_shot_classifier_averages_normalised_template_features(clip):
    names, templates = ["circle", "red square", "blue triangle"], ["a photo of a {}.", "a drawing of a {name}"]
    classifier = zero_shot_classifier(clip, names, templates, batch_size=4)
    with torch.no_grad():
        tokens = clip.tokenize([t.format(n, name=n) for n in names for t in templates])
        expected = F.normalize(clip.model.encode_text(tokens, normalize=True).view(3, 2, -1).mean(1), dim=-1)
    assert classifier.shape == (3, clip.model_config["embed_dim"])
    # Evaluation runs in float32 by design; the same features in other batches and chunks agree
    # to a few ulps of unit-norm vectors (~1e-7); 1e-5 bounds it.
    torch.testing.assert_close(classifier, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(classifier.norm(dim=-1), torch.ones(3))


def test_image_features_match_the_model_and_do_not_depend_on_batching(clip):
    images = _images(5, size=20)
    features = image_features(clip, images, batch_size=2)
    with torch.no_grad():
        expected = clip.model.encode_image(clip.preprocess(images), normalize=True)
    # float32 by design: other batch sizes change matmul blocking, a few ulps of unit-norm vectors.
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image_features(clip, images, batch_size=5), features, atol=1e-5, rtol=1e-5)
    # the features are ordinary tensors: usable as fixed targets inside a training graph
    weight = torch.ones(features.shape[1], requires_grad=True)
    (features * weight).sum().backward()
    assert weight.grad is not None


def test_zero_shot_accuracy_with_known_answer(clip):
    # Each image's own feature as its class feature: self-similarity 1 beats every other image.
    images = _images(6, seed=1)
    features = image_features(clip, images)
    predictions = predict_images(clip, images, features, batch_size=4)
    assert top1_accuracy(predictions, np.arange(6)) == 1.0
    assert top1_accuracy(predictions, np.array([0, 1, 2, 3, 4, 0])) == pytest.approx(5 / 6)


# --- evaluate_step -----------------------------------------------------------------------------

def _sets(n_classes=6, n_zs=4, seed=0):
    updated = ImageSet(_images(2 * n_classes, seed=seed), np.repeat(np.arange(n_classes), 2),
                       tuple(f"class {i}" for i in range(n_classes)))
    zero_shot = ImageSet(_images(n_zs, size=24, seed=seed + 1), np.arange(n_zs), ("cat", "dog", "car", "tree")[:n_zs])
    captions = np.array([[f"image {i} caption {k}" for k in range(2)] for i in range(4)])
    retrieval = ImageSet(_images(4, seed=seed + 2), np.zeros(4, dtype=np.int64), ("thing",), captions)
    prompts = [f"a photo of {name} ." for name in updated.class_names]
    return updated, prompts, zero_shot, retrieval


def test_evaluate_step_smoke(clip):
    updated, prompts, zero_shot, retrieval = _sets()
    clip.model.train()
    clip.model.visual.eval()  # a mixed state must come back exactly
    modes = [m.training for m in clip.model.modules()]
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}

    result = evaluate_step(clip, 1, "task_1", updated, prompts, [[0, 1, 2], [3, 4, 5]],
                              {"zs": (zero_shot, ["a photo of a {}."])}, {"ret": (retrieval, 2)},
                              batch_size=3, device="cpu")

    expected_keys = {"step", "task", "ut_acc", "zs_acc", "a_acc", "bwt", "learning_acc", "learning_acc_own",
                     "seen_acc", *RETRIEVAL_KEYS, "ut_top1", "acc_row",
                     "zs_acc/zs", *(f"retrieval/ret/{key}" for key in RETRIEVAL_KEYS)}
    assert set(result) == expected_keys
    assert result["zs_acc"] == result["zs_acc/zs"] and result["i2t_r1"] == result["retrieval/ret/i2t_r1"]
    assert result["learning_acc"] == result["acc_row"][0]
    assert result["step"] == 1 and result["task"] == "task_1"
    assert len(result["acc_row"]) == 2
    for key in ["ut_acc", "zs_acc", "a_acc", "ut_top1", "seen_acc", *RETRIEVAL_KEYS, *result["acc_row"]]:
        value = result[key] if isinstance(key, str) else key
        assert 0.0 <= value <= 1.0
    assert result["ut_acc"] == pytest.approx(result["acc_row"][0])
    assert result["a_acc"] == pytest.approx((result["ut_acc"] + result["zs_acc"]) / 2)
    assert result["bwt"] == 0.0
    json.dumps(result)
    assert [m.training for m in clip.model.modules()] == modes
    assert all(torch.equal(before[k], v) for k, v in clip.model.state_dict().items())
    clip.model.eval()


def test_evaluate_step_known_answer_and_bwt(clip):
    # Identical images get one predicted class p: per-class accuracy is 1 for p, 0 elsewhere.
    labels = np.arange(6)
    updated = ImageSet(_images(6, constant=128), labels, tuple(f"class {i}" for i in range(6)))
    zero_shot = ImageSet(_images(4, constant=50), np.arange(4), ("cat", "dog", "car", "tree"))
    prompts = [f"a photo of {name} ." for name in updated.class_names]
    phases = [[0, 1, 2], [3, 4, 5]]

    start = evaluate_step(clip, 0, "zero_shot", updated, prompts, phases, {"zs": (zero_shot, ["a {}."])})
    assert start["zs_acc"] == pytest.approx(1 / 4)   # one image per zero-shot class
    assert start["ut_top1"] == pytest.approx(1 / 6)
    assert start["ut_acc"] == pytest.approx(1 / 6)   # step 0: mean over phases of (1/3, 0)
    assert sorted(start["acc_row"]) == pytest.approx([0.0, 1 / 3])
    assert start["i2t_r1"] is None
    assert start["learning_acc"] is None and start["learning_acc_own"] is None
    assert start["seen_acc"] == pytest.approx(1 / 6)
    # after step 1 the three identical images of classes 0-2 get one class among 0-2: 1/3
    first = evaluate_step(clip, 1, "task_1", updated, prompts, phases, {"zs": (zero_shot, ["a {}."])})
    assert first["learning_acc"] == pytest.approx(first["acc_row"][0])
    assert first["seen_acc"] == pytest.approx(1 / 3)
    assert first["learning_acc_own"] == pytest.approx(1 / 3)  # classes 0-2 among themselves

    earlier = [start["acc_row"], [0.9, 0.1]]
    result = evaluate_step(clip, 2, "task_2", updated, prompts, phases, {"zs": (zero_shot, ["a {}."])},
                              previous_rows=earlier)
    assert result["acc_row"] == pytest.approx(start["acc_row"])
    assert result["bwt"] == pytest.approx(result["acc_row"][0] - 0.9)
    assert result["ut_acc"] == pytest.approx(1 / 6)  # mean over both phases after step 2
    # Among all six classes one phase gets nothing right (p is in the other); among its own
    # three classes each phase gets its one class right.
    assert result["learning_acc_own"] == pytest.approx(1 / 3)
    assert min(result["acc_row"]) == 0.0

    with pytest.raises(ValueError, match="acc rows of steps 0..1"):
        evaluate_step(clip, 2, "task_2", updated, prompts, phases, {"zs": (zero_shot, ["a {}."])})
    with pytest.raises(ValueError, match="one prompt per class"):
        evaluate_step(clip, 1, "task_1", updated, prompts[:5], phases, {"zs": (zero_shot, ["a {}."])})
    with pytest.raises(ValueError, match="outside"):
        evaluate_step(clip, 3, "task_3", updated, prompts, phases, {"zs": (zero_shot, ["a {}."])})


def test_evaluate_step_averages_several_zero_shot_sets_and_reports_each_retrieval_set(clip):
    updated, prompts, zero_shot, retrieval = _sets()
    other = ImageSet(_images(2, constant=50), np.arange(2), ("sun", "moon"))
    phases = [[0, 1, 2], [3, 4, 5]]
    result = evaluate_step(clip, 0, "pretrained", updated, prompts, phases,
                              {"a": (zero_shot, ["a {}."]), "b": (other, ["the {}"])},
                              {"first": (retrieval, 1), "second": (retrieval, 2)})
    assert result["zs_acc"] == pytest.approx((result["zs_acc/a"] + result["zs_acc/b"]) / 2)
    assert result["zs_acc/b"] == pytest.approx(1 / 2)  # identical images: one class wins
    assert result["i2t_r1"] == result["retrieval/first/i2t_r1"]
    assert "retrieval/second/t2i_r10" in result
