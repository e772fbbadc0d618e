"""MoE-Adapters' DDAS as published: AlexNet conv5 codes, one autoencoder per task, one choice
per chunk of test images (text side included), a fixed threshold; and the class-incremental
settings (one shared router, router noise at evaluation). A 32 px CLIP and a random AlexNet
saved by the test: no download, seconds."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from clip_continual.evaluation.features import RoutedClasses, text_features
from clip_continual.evaluation.zero_shot import predict_images, zero_shot_classifier
from clip_continual.methods import MethodConfigError, get_method
from clip_continual.methods import ddas
from clip_continual.methods.ddas import DDASError, conv5_side, feature_count, fit_autoencoder
from clip_continual.methods.moe_adapters import mixtures
from clip_continual.model.adapters import adapter_recipe
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def small():
    """A 32 px CLIP: AlexNet's conv5 is 256x1x1 there (it needs 31 px at least)."""
    from clip_continual.model.clip import ModelSpec
    from clip_continual.model.sources import build_model

    torch.manual_seed(0)
    clip = build_model(ModelSpec("clip-continual-tiny-p8"))
    clip.model.eval()
    return clip


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A random AlexNet's features, saved as a state dict (as torchvision names them)."""
    with torch.device("meta"):
        layers = torchvision.models.alexnet(weights=None).features
    layers = layers.to_empty(device="cpu")
    torch.manual_seed(0)
    for layer in layers:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pt"
    torch.save({f"features.{key}": value for key, value in layers.state_dict().items()}, path)
    return str(path)


def adapted(small, alexnet_file, tasks=2, **options):
    """A copy of ``small`` with MoE adapters (``tasks`` routers and autoencoders) whose routers
    and experts differ from task to task, in eval mode."""
    clip = small.clone()
    method = get_method("moe_adapters", experts=4, bottleneck=8, ddas_alexnet_weights=alexnet_file, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(tasks):
        method.prepare_student(clip.model, "wm")
        clip.model.visual.task_selector.add_task()
        adapter_recipe(clip.model)["ddas_tasks"] += 1
    with torch.no_grad():
        for mixture in mixtures(clip.model):
            for weights in [*mixture.gates, *[e.up.weight for e in mixture.experts]]:
                weights.copy_(torch.randn(weights.shape, generator=generator))
    clip.model.eval()
    return clip


def images_of(clip, brightness, seed=0, count=4):
    """uint8 images of about one brightness, with noise."""
    rng = np.random.default_rng(seed)
    images = np.clip(brightness + rng.normal(0, 10, (count, clip.image_size, clip.image_size, 3)), 0, 255)
    return images.astype(np.uint8)


def pixels_of(clip, brightness, seed=0):
    return clip.preprocess(images_of(clip, brightness, seed), "cpu")


def mean_code_autoencoder(autoencoder, codes):
    """An autoencoder that outputs the mean of ``codes`` whatever its input: it reconstructs
    images like those best."""
    with torch.no_grad():
        autoencoder.decoder.weight.zero_()
        autoencoder.decoder.bias.copy_(torch.logit(codes.mean(0).clamp(1e-4, 1 - 1e-4)))


def test_conv5_features_follow_alexnets_shape_rule():
    with torch.device("meta"):
        layers = torchvision.models.alexnet(weights=None).features[:-2]
        for size in (31, 32, 64, 100, 224):
            shape = layers(torch.empty(1, 3, size, size)).shape
            assert conv5_side(size) == shape[-1] == shape[-2] and feature_count(size) == shape[1:].numel()
    assert feature_count(224) == 256 * 13 * 13  # the reference's Linear(43264, 100)
    with pytest.raises(DDASError, match="at least 31 px.*ddas: false"):
        feature_count(16)


def test_each_chunk_takes_the_task_that_reconstructs_it_best(small, alexnet_file):
    clip = adapted(small, alexnet_file, ddas_batch=4, ddas_threshold=10.0)
    selector = clip.model.visual.task_selector
    dark, bright = pixels_of(clip, 30), pixels_of(clip, 220, seed=1)
    for autoencoder, pixels in zip(selector.autoencoders, (dark, bright)):
        mean_code_autoencoder(autoencoder, selector.codes(pixels))
    with torch.no_grad():
        routes = selector.select(torch.cat([bright, dark, bright[:2]]))
        assert routes.tolist() == [1] * 4 + [0] * 4 + [1] * 2  # chunks of 4 consecutive images
        mixed = torch.cat([bright[:1], dark[:2], bright[1:2]])
        assert len(set(selector.select(mixed).tolist())) == 1  # one chunk: one task for all four
        assert selector.select(mixed, mixed_batches=True).tolist() == [1, 0, 0, 1]  # a phase evaluation
        plain = small.model.encode_image(dark)
        routed = clip.model.encode_image(dark)
        assert selector.last_routes.tolist() == [0] * 4
        assert not torch.allclose(routed, plain, atol=1e-3)
        best = min(float(autoencoder.error(selector.codes(dark))) for autoencoder in selector.autoencoders)
        selector.threshold = best / 2  # no autoencoder is good enough: the pretrained CLIP answers
        assert torch.equal(clip.model.encode_image(dark), plain)
        assert selector.last_routes.tolist() == [-1] * 4


def test_the_reference_autoencoder_sends_its_chunks_to_the_pretrained_clip(small, alexnet_file):
    clip = adapted(small, alexnet_file, tasks=1, ddas_batch=4, ddas_threshold=10.0)
    selector = clip.model.visual.task_selector
    dark, bright = pixels_of(clip, 30), pixels_of(clip, 220, seed=1)
    mean_code_autoencoder(selector.autoencoders[0], selector.codes(dark))
    mean_code_autoencoder(selector.add_reference(), selector.codes(bright))
    with torch.no_grad():
        assert selector.select(torch.cat([dark, bright])).tolist() == [0] * 4 + [-1] * 4


def test_the_text_side_follows_each_chunks_task(small, alexnet_file):
    clip = adapted(small, alexnet_file, ddas_batch=4, ddas_threshold=10.0)
    selector = clip.model.visual.task_selector
    dark, bright = pixels_of(clip, 30), pixels_of(clip, 220, seed=1)
    for autoencoder, pixels in zip(selector.autoencoders, (dark, bright)):
        mean_code_autoencoder(autoencoder, selector.codes(pixels))
    names, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a {}."]
    classes = zero_shot_classifier(clip, names, templates, batch_size=8)
    assert isinstance(classes, RoutedClasses)
    per_route = {}
    for route in (-1, 0, 1):  # what each route's text tower gives, by hand
        with selector.text_route(clip.model, route):
            prompts = text_features(clip, [t.format(n) for n in names for t in templates])
        per_route[route] = torch.nn.functional.normalize(prompts.view(3, 2, -1).mean(1), dim=-1)
        torch.testing.assert_close(classes[route], per_route[route], rtol=0, atol=0)
    assert not torch.allclose(per_route[0], per_route[1], atol=1e-3)
    plain = zero_shot_classifier(small, names, templates, batch_size=8)
    torch.testing.assert_close(per_route[-1], plain, rtol=0, atol=1e-5)  # no adapter: the plain text tower
    uint8 = np.concatenate([images_of(clip, 220, seed=1), images_of(clip, 30)])
    predicted = predict_images(clip, uint8, classes, batch_size=8)
    with torch.no_grad():
        features = torch.nn.functional.normalize(clip.model.encode_image(clip.preprocess(uint8, "cpu")), dim=-1)
    expected = np.concatenate([(features[:4] @ per_route[1].T).argmax(1).numpy(),
                               (features[4:] @ per_route[0].T).argmax(1).numpy()])
    assert np.array_equal(predicted, expected)


def test_missing_alexnet_weights_fail_before_training_with_both_fixes(small, monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(ddas, "_EXTRACTORS", {})
    method = get_method("moe_adapters", experts=4, bottleneck=8)  # ddas on by default
    with pytest.raises(DDASError, match="could not download.*run once online.*ddas_alexnet_weights"):
        method.prepare_student(small.clone().model, "wm")
    missing = get_method("moe_adapters", ddas_alexnet_weights=str(tmp_path / "missing.pt"))  # built: no file read
    with pytest.raises(MethodConfigError, match="ddas_alexnet_weights .* is not a file"):
        missing.check_files()  # a benchmark's input check, before its data is prepared
    with pytest.raises(MethodConfigError, match="ddas_reference .* is not a folder"):
        get_method("moe_adapters", ddas_reference=str(tmp_path / "tiny")).check_files()
    get_method("moe_adapters", ddas=False, ddas_reference=str(tmp_path / "tiny")).check_files()  # unused


def _write_folder(root, rng):
    from PIL import Image

    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return str(root)


def test_training_fits_the_reference_and_task_autoencoders_and_checkpoints_keep_them(
        small, alexnet_file, random_image_set, tmp_path):
    from clip_continual.training.config import TrainingConfig
    from clip_continual.training.loop import fine_tune

    images = random_image_set(small, 8, 2)
    options = {"experts": 4, "bottleneck": 8, "ddas_steps": 3, "ddas_alexnet_weights": alexnet_file,
               "ddas_reference": _write_folder(tmp_path / "reference", np.random.default_rng(0)),
               "ddas_reference_steps": 2, "ddas_batch": 3}
    config = TrainingConfig(method="moe_adapters", method_options=options, steps=1, epochs=None,
                            batch_size=4, lr=1e-2, device="cpu", progress=False)
    prompts = [f"a photo of {name} ." for name in images.class_names]
    first, _ = fine_tune(small, images, prompts, config=config, task_index=1)
    recipe = adapter_recipe(first.model)
    assert (recipe["ddas_tasks"], recipe["ddas_reference"], recipe["ddas_batch"]) == (1, 1, 3)
    path = tmp_path / "ddas.pt"
    save_checkpoint(first, path)
    loaded = load_checkpoint(path)
    selector = loaded.model.visual.task_selector
    assert selector.reference is not None and len(selector.autoencoders) == 1 and selector.batch == 3
    first.model.eval(), loaded.model.eval()
    pixels = first.preprocess(images.images, "cpu")
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), first.model.encode_image(pixels))
    reference = {k: v.clone() for k, v in selector.reference.state_dict().items()}
    second, _ = fine_tune(loaded, images, prompts, config=config, task_index=2)
    again = second.model.visual.task_selector
    assert len(again.autoencoders) == 2 and adapter_recipe(second.model)["routers"] == 2
    assert all(torch.equal(v, reference[k]) for k, v in again.reference.state_dict().items())  # fitted once


def test_the_class_incremental_setup_shares_one_router_and_may_keep_noise_at_evaluation(micro, random_image_set):
    from clip_continual.training.config import TrainingConfig
    from clip_continual.training.loop import fine_tune

    with pytest.raises(MethodConfigError, match="router_per_task: false shares one router; set ddas: false"):
        get_method("moe_adapters", router_per_task=False)
    images = random_image_set(micro, 8, 2)
    prompts = [f"a photo of {name} ." for name in images.class_names]
    options = {"experts": 2, "top_k": 2, "bottleneck": 8, "router_per_task": False, "frozen_per_task": 0,
               "ddas": False, "label_smoothing": 0.0}
    model = micro
    for task in (1, 2):
        config = TrainingConfig(method="moe_adapters", method_options={**options, "eval_noise": task == 2},
                                steps=2, epochs=None, batch_size=4, lr=1e-2, device="cpu", progress=False)
        model, _ = fine_tune(model, images, prompts, config=config, task_index=task)
        assert adapter_recipe(model.model)["routers"] == 1
        assert all(len(m.gates) == 1 and not m.frozen.any() for m in mixtures(model.model))
    model.model.eval()
    pixels = model.preprocess(images.images, "cpu")
    with torch.no_grad():
        noisy = [model.model.encode_image(pixels) for _ in range(2)]
        assert not torch.equal(*noisy)  # eval_noise: the router's noise stays on
        for mixture in mixtures(model.model):
            mixture.eval_noise = False
        assert torch.equal(model.model.encode_image(pixels), model.model.encode_image(pixels))
