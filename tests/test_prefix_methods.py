"""DIKI's residual prefix attention and the Gaussian task choice it shares with DPW: the model
starts as the frozen CLIP, each test image takes its likeliest task's slot, and an adapted
model (slots and Gaussians) loads back from its checkpoint."""

from __future__ import annotations

import pytest
import torch

from clip_continual.methods import get_method
from clip_continual.model.adapters import adapter_recipe, image_routing
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint
from clip_continual.model.clip import encode_images, encode_text
from clip_continual.model.prefix_attention import GaussianTaskSelector, branches_off, prefix_branches
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune

METHODS = ["diki", "dpw"]


@pytest.fixture(scope="module")
def inputs(micro):
    pixels = torch.randn(6, 3, micro.image_size, micro.image_size, generator=torch.Generator().manual_seed(1))
    return pixels, micro.tokenize(["a red circle", "a small blue square"])


def features(clip, pixels, tokens):
    with torch.no_grad():
        return encode_images(clip.model, pixels), encode_text(clip.model, tokens)


@pytest.mark.parametrize("method", METHODS)
def test_an_adapted_model_starts_as_the_frozen_clip(micro, inputs, method):
    adapted = micro.clone()
    get_method(method).prepare_student(adapted.model, "wm")
    adapted.model.eval()  # no task learnt: no image is routed, no branch runs
    assert image_routing(adapted.model) is None
    for plain, ours in zip(features(micro, *inputs), features(adapted, *inputs)):
        torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)
    if method == "diki":  # training reads DIKI's fresh slot: zero values, a zero branch
        assert adapter_recipe(adapted.model)["slots"] == 1
        adapted.model.train()
        for plain, ours in zip(features(micro, *inputs), features(adapted, *inputs)):
            torch.testing.assert_close(ours, plain, rtol=0, atol=1e-6)


def test_each_image_takes_its_likeliest_task_and_a_batch_votes():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 3.0
    selector = GaussianTaskSelector(8, batchwise=False, vote_batch=4)
    for centre in centres:
        selector.add_task(centre + 0.1 * torch.randn(200, 8, generator=generator))
    truth = torch.tensor([2, 0, 1, 1, 0, 2])
    test = centres[truth] + 0.1 * torch.randn(6, 8, generator=generator)
    route = selector.select(test)
    assert torch.equal(route.slots, truth)
    # The weight: sigmoid(log p / D - 1) of the chosen task's density (DIKI.py:171-172).
    best = torch.distributions.MultivariateNormal(selector.means[truth], selector.covariances[truth]).log_prob(test)
    torch.testing.assert_close(route.weights, torch.sigmoid(best / 8 - 1), rtol=0, atol=1e-6)
    selector.batchwise = True  # chunks of 4 then 2: each takes its most frequent task (ties: the lower)
    assert selector.select(test).slots.tolist() == [1, 1, 1, 1, 0, 0]
    assert selector.select(test[[0, 5, 5, 1]]).slots.tolist() == [2] * 4
    # An image's route names its slot and its batch's mean weight, for the text tower.
    slot, text_weight = selector.table[int(selector.last_routes[0])]
    assert slot == 2 and text_weight == pytest.approx(float(selector.choose(test[[0, 5, 5, 1]]).weights.mean()))


def test_where_test_batches_mix_tasks_each_image_decides_alone():
    """A batch vote assumes a batch of one task's images (DIKI's MTIL test loader); on a test set
    that mixes the phases' images it would give most images another task's slot."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 8) * 3.0
    selector = GaussianTaskSelector(8, batchwise=True, vote_batch=256)
    for centre in centres:
        selector.add_task(centre + 0.1 * torch.randn(200, 8, generator=generator))
    truth = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    test = centres[truth] + 0.1 * torch.randn(len(truth), 8, generator=generator)
    assert selector.select(test).slots.tolist() == [2] * len(truth)
    route = selector.select(test, mixed_batches=True)
    assert torch.equal(route.slots, truth)
    torch.testing.assert_close(route.batch_weights, route.weights, rtol=0, atol=0)  # a batch of one
    texts = [selector.table[int(r)] for r in selector.last_routes]
    assert [slot for slot, _ in texts] == truth.tolist()
    assert [weight for _, weight in texts] == pytest.approx(route.weights.tolist())


def test_branches_off_restores_what_it_found_when_nested(micro):
    adapted = micro.clone()
    get_method("diki").prepare_student(adapted.model, "wm")
    branches = prefix_branches(adapted.model)
    with branches_off(adapted.model):
        with branches_off(adapted.model.visual):  # as the routing hook does inside a caller's block
            pass
        assert all(branch.bypass for branch in branches)
    assert not any(branch.bypass for branch in branches)


def train(start, train_set, method, task_index=1, options=None):
    config = TrainingConfig(method=method, steps=3, epochs=None, batch_size=8, lr=0.5, optimizer="sgd",
                            device="cpu", progress=False, method_options=options or {})
    prompts = [f"a photo of {name} ." for name in train_set.class_names]
    return fine_tune(start, train_set, prompts, config=config, task_index=task_index)


DPW_REDUCED = {"gates": "reduced", "bottleneck": 4}  # DPW†: MTIL_reduced_param.sh


@pytest.mark.parametrize("method, options", [("diki", None), ("dpw", None), ("dpw", DPW_REDUCED)],
                         ids=["diki", "dpw", "dpw_reduced"])
def test_two_tasks_route_and_load_back_with_their_gaussians(micro, random_image_set, inputs, tmp_path, method,
                                                            options):
    train_set = random_image_set(micro, 40, 4)
    first, summary = train(micro, train_set, method, options=options)
    assert 0 < summary["trainable_parameters"] < sum(p.numel() for p in micro.model.parameters()) / 5
    second, _ = train(first, train_set, method, task_index=2, options=options)
    recipe = adapter_recipe(second.model)
    assert (recipe["slots"], recipe["tasks"]) == (2, 2)
    assert second.model.visual.task_selector.means.shape == (2, micro.model.visual.output_dim)
    path = tmp_path / "model.pt"
    save_checkpoint(second, path)
    loaded = load_checkpoint(path)
    assert adapter_recipe(loaded.model) == recipe
    state, again = second.model.state_dict(), loaded.model.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    second.model.eval(), loaded.model.eval()
    images = [encode_images(model, inputs[0]).detach() for model in (second.model, loaded.model)]
    assert torch.equal(*images)
    routing = image_routing(loaded.model)
    slots = {routing.table[int(route)][0] for route in routing.last_routes}
    assert slots <= {0, 1}
    # Text under a route reads that route's slot: it differs from the frozen CLIP's once trained.
    # At full weight: under 0.825 DPW zeroes the gates below 1 - weight, where DPW†'s random
    # gates still are after three steps.
    route = int(routing.last_routes[0])
    routing.table[route] = (routing.table[route][0], 1.0)
    with torch.no_grad(), routing.text_route(loaded.model, route):
        routed_text = encode_text(loaded.model, inputs[1])
    assert not torch.allclose(routed_text, encode_text(micro.model, inputs[1]).detach(), atol=1e-6)


def test_a_streaming_pass_keeps_one_batchs_classifiers_and_predicts_the_same(micro, random_image_set):
    """DIKI's routes are new for every chunk of images: once a batch is scored its class
    features go (``RoutedClasses.forget``), without changing a prediction; DDAS's recurring
    routes (one per task) stay cached."""
    from clip_continual.evaluation.features import RoutedClasses
    from clip_continual.evaluation.zero_shot import predict_images, predictions_among, zero_shot_classifier

    images = random_image_set(micro, 40, 4)
    model, _ = train(micro, images, "diki")
    classes = zero_shot_classifier(model, images.class_names, ["a photo of {}."])
    assert isinstance(classes, RoutedClasses) and classes.single_use
    kept = RoutedClasses(classes._compute)  # the same classifiers, never forgotten
    forgetting = predict_images(model, images, classes, batch_size=8)
    assert classes._done == {}
    assert (forgetting == predict_images(model, images, kept, batch_size=8)).all()
    assert len(kept._done) >= 5  # a route per batch at least, every one kept
    among = predictions_among(model, images, classes, [None, [0, 1]], batch_size=8, loader=None)
    assert classes._done == {} and (among[0] == forgetting).all()
    recurring = RoutedClasses(lambda route: torch.zeros(2, 3))
    recurring[0]
    recurring.forget(torch.tensor([0]))
    assert 0 in recurring._done


def test_dpw_gates_normalise_only_past_one_and_the_adapter_takes_the_excess(float64):
    from clip_continual.methods.dpw import GatedValuePrefix
    from clip_continual.model.prefix_attention import PrefixRoute

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    branch = GatedValuePrefix(attn, "text", length=4, positions=5, bottleneck=8, basis="pretrained", heads=[])
    branch.add_slot(attn, heads={"text": 2})
    branch.eval()
    slot, tokens = branch.slots[0], torch.randn(3, 5, 16)
    values = slot.values.view(4, 2, 8).transpose(0, 1)  # (heads, prefixes, head width)
    with torch.no_grad():
        slot.gate_bias.fill_(-40.0)  # gates ~0: no normalisation, no adapter (rt = 0)
        quiet = branch.branch(tokens, attn, PrefixRoute(0))
        assert quiet.abs().max() < 1e-12
        slot.gate_bias.fill_(40.0)  # every gate 1: divided by their sum 4, the adapter times 4 - 1
        full = branch.branch(tokens, attn, PrefixRoute(0))
        adapter = slot.up(tokens @ branch.down) * 0.05
        expected = values.mean(dim=1).reshape(1, 1, 16) + adapter * 3
        torch.testing.assert_close(full, expected, rtol=0, atol=1e-12)
        # Weighted at evaluation: the whole branch scales with the route's weight.
        torch.testing.assert_close(branch.branch(tokens, attn, PrefixRoute(0, 0.9, 0.9)), 0.9 * full, rtol=0, atol=1e-12)


def test_dpw_reduced_gates_read_each_heads_slice_through_an_orthogonal_projection(float64):
    """DPW† (attention_reduced_param.py:324-328, 389-394): head j's gate scores the j-th slice of
    the token, width E / h, through h random orthogonal (E / h, n) projections."""
    from clip_continual.methods.dpw import GatedValuePrefix, gate_score

    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    branch = GatedValuePrefix(attn, "visual", length=3, positions=5, bottleneck=4, basis="pretrained", heads=[],
                              gates="reduced")
    branch.add_slot(attn, heads={"visual": 4})
    slot, tokens = branch.slots[0], torch.randn(2, 5, 16)
    assert slot.gate.shape == (4, 4, 3) and slot.gate_bias.shape == (4, 5, 3)
    eye = torch.eye(3, dtype=slot.gate.dtype).expand(4, 3, 3)
    torch.testing.assert_close(slot.gate.transpose(1, 2) @ slot.gate, eye, rtol=0, atol=1e-12)
    # Upstream's layout: query (L, B, E) viewed as (L, B h, E / h), then (B, h, L, E / h).
    query = tokens.transpose(0, 1)
    patch = query.reshape(5, 2 * 4, 4).transpose(0, 1).reshape(2, 4, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(gate_score(tokens, slot), patch @ slot.gate + slot.gate_bias, rtol=0, atol=1e-12)


def test_dpw_reduced_takes_a_quarter_of_the_heads_whatever_the_task():
    from clip_continual.methods.dpw import REDUCED_SCORE, prefix_heads

    assert [prefix_heads(h, REDUCED_SCORE, 8, 768) for h in (12, 8, 3)] == [4, 2, 1]  # 2^round(log2(h // 4)), >= 1


def test_dpw_prefix_heads_follow_the_fine_grained_score():
    from clip_continual.methods.dpw import fine_grained_score, prefix_heads

    assert [prefix_heads(12, s, 8, 768) for s in (0.01, 0.7, 3.0)] == [1, 8, 32]  # 2^round(log2(int(12 s)))
    assert prefix_heads(2, 10.0, 8, 32) == 4  # capped where 20 -> 16 heads would not fit a width of 32
    images = torch.nn.functional.normalize(torch.eye(3, 4).repeat_interleave(2, 0) + 0.01, dim=1)
    texts = torch.nn.functional.normalize(torch.eye(3, 4), dim=1)
    labels = torch.arange(3).repeat_interleave(2)
    # Orthogonal classes, identical images within each, all recognised: (1 + 1) / 2 / (~0 + 10 / 3).
    assert fine_grained_score(images, labels, texts) == pytest.approx(0.3, rel=0.02)


def test_dpw_odcl_cil_scales_each_learnt_tasks_block_by_its_confidence(micro):
    """DPW.py:209-233 (``is_CIL``): each image alone takes its likeliest task's slot at that
    confidence; task t's classes are encoded with slot t at the image's confidence c_t and their
    logits multiplied by c_t, concatenated over the learnt tasks. Computed here by hand."""
    import numpy as np
    import torch.nn.functional as F

    from clip_continual.data.common import ImageSet
    from clip_continual.evaluation.features import evaluating, routed_feature_batches, routed_scores
    from clip_continual.evaluation.protocols import EvaluationProtocol
    from clip_continual.evaluation.sequences import _pooled_classifier, pooled_predictions
    from clip_continual.model.adapters import EvaluatedTask, evaluating_task
    from clip_continual.model.prefix_attention import PrefixRoute, add_slot, frozen_image_features, set_route

    clip = micro.clone()
    get_method("dpw").prepare_student(clip.model, "wm")
    rng = np.random.default_rng(3)
    sets = [ImageSet(rng.integers(0, 256, (6, micro.image_size, micro.image_size, 3), dtype=np.uint8),
                     np.arange(6) % k, tuple(f"{word} {i}" for i in range(k)))
            for word, k in (("circle", 3), ("square", 2))]
    selector, template = clip.model.visual.task_selector, ["a photo of a {}."]
    clip.model.eval()
    with torch.no_grad():
        for shift in (-0.5, 0.5):  # two learnt tasks: a slot (SVD-initialised, non-zero) and a Gaussian each
            add_slot(clip.model, heads={"visual": 1, "text": 1})
            pixels = torch.randn(80, 3, micro.image_size, micro.image_size) + shift
            selector.add_task(frozen_image_features(clip.model.visual, pixels))
        pixels = [clip.preprocess(s.images, "cpu") for s in sets]
        frozen = torch.cat([frozen_image_features(clip.model.visual, p) for p in pixels])
        log_p = torch.distributions.MultivariateNormal(selector.means, selector.covariances).log_prob(frozen.unsqueeze(1))
    selector.scale = float(log_p.abs().max())  # confidences well inside (0, 1)
    confidence = torch.sigmoid(log_p / selector.scale - 1)
    assert (confidence[:, 0] - confidence[:, 1]).abs().min() > 1e-3
    selector.pooled_inference = "task_confidence"

    told = EvaluatedTask(images=None, label_space="learned_tasks", candidates=(0, 1))
    with evaluating(clip, "cpu") as target, torch.no_grad(), evaluating_task(clip.model, told):
        classes = _pooled_classifier(clip, [(s, template) for s in sets], (0, 1), None, 64, target, "learned_tasks")
        scores = torch.cat([routed_scores(f, routes, classes) for s in sets
                            for f, routes in routed_feature_batches(clip, s, 64)])
    with evaluating(clip, "cpu") as target:
        got = pooled_predictions(clip, 2, [(s, template) for s in sets], EvaluationProtocol("hidden", "learned_tasks"),
                                 64, target)
    expected = []
    with torch.no_grad():
        for image, c in zip(torch.cat(pixels), confidence):
            weight, slot = c.max(dim=0)
            set_route(clip.model.visual, PrefixRoute(slot.view(1), weight.view(1), weight.view(1)))
            features = F.normalize(clip.model.visual.forward(image.unsqueeze(0)), dim=-1)
            set_route(clip.model.visual, None)
            logits = []
            for task, images in enumerate(sets):
                set_route(clip.model.transformer, PrefixRoute(task, float(c[task]), float(c[task])))
                texts = F.normalize(encode_text(clip.model, clip.tokenize([f"a photo of a {n}." for n in images.class_names])), dim=-1)
                set_route(clip.model.transformer, None)
                logits.append(float(c[task]) * features @ texts.t())
            expected.append(torch.cat(logits, dim=1))
    torch.testing.assert_close(scores, torch.cat(expected), rtol=0, atol=1e-5)
    assert np.concatenate([predictions for predictions, _ in got]).tolist() == torch.cat(expected).argmax(1).tolist()
    assert [labels.tolist() for _, labels in got] == [[0, 1, 2, 0, 1, 2], [3, 4, 3, 4, 3, 4]]  # union index
    assert len({selector.table[r][0] for r in selector.table}) == 1  # each image a route of its own (no slot)


def test_phase_evaluations_tell_the_routing_that_their_batches_mix_tasks(micro, random_image_set, monkeypatch):
    """The digits' and class-incremental CIFAR-100's test sets hold every phase's images: their
    images are routed one by one; a zero-shot set of the suite keeps the batch vote."""
    from clip_continual.evaluation.sequences import evaluate_class_incremental_step
    from clip_continual.evaluation.step import evaluate_step

    train_set = random_image_set(micro, 40, 4)
    second, _ = train(train(micro, train_set, "diki")[0], train_set, "diki", task_index=2)
    told: list[bool] = []
    original = GaussianTaskSelector.select
    monkeypatch.setattr(GaussianTaskSelector, "select",
                        lambda self, features, mixed_batches=False: told.append(mixed_batches)
                        or original(self, features, mixed_batches))
    prompts = [f"a photo of {name} ." for name in train_set.class_names]
    evaluate_step(second, 2, "task_2", train_set, prompts, [[0, 1], [2, 3]],
                  {"zs": (random_image_set(micro, 6, 3), ["a {}."])}, batch_size=16, device="cpu",
                  previous_rows=[[0.0, 0.0], [0.0, 0.0]])
    assert told == [True] * 3 + [False]  # 40 test images in batches of 16, then the zero-shot set
    told.clear()
    evaluate_class_incremental_step(second, 2, "task_2", train_set, ["a {}."], [[0, 1], [2, 3]], 16, "cpu",
                                    previous_rows=[[0.0, 0.0], [0.0, 0.0]])
    assert told == [True] * 3
