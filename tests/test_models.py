import time

import numpy as np
import pytest
import torch

from clip_continual.model.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from clip_continual.model.clip import ModelSpec, encode_text, set_trainable_parts, text_tower_parameters
from clip_continual.model.sources import (
    PretrainedWeightsUnavailable, UnknownArchitectureError, build_model, resolve_pretrained,
)


def test_tiny_model_builds_with_tokenizer_and_transforms():
    clip = build_model(ModelSpec("clip-continual-tiny"))
    assert clip.image_size == 32 and clip.context_length == 16
    tokens = clip.tokenize(["a photo of the digit seven"])
    assert tokens.shape == (1, 16) and tokens[0, 0] == 49406
    pixels = clip.preprocess(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert pixels.shape == (2, 3, 32, 32)
    with torch.no_grad():
        features = clip.model.encode_image(pixels, normalize=True)
    assert features.shape == (2, 64)


def test_preprocess_resizes_to_the_model_resolution(micro):
    pixels = micro.preprocess(np.full((3, 32, 32, 3), 255, dtype=np.uint8))
    assert pixels.shape == (3, 3, 16, 16)
    expected = (1.0 - micro.image_mean[0]) / micro.image_std[0]
    # Constant through bicubic resizing up to float32 rounding of the kernel weights' sum.
    assert torch.allclose(pixels[:, 0], torch.full_like(pixels[:, 0], expected), atol=1e-4)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(UnknownArchitectureError, match="unknown CLIP architecture 'ViT-Z-99'"):
        build_model(ModelSpec("ViT-Z-99"))


def test_offline_download_fails_fast_with_advice(monkeypatch):
    import clip_continual.model.sources as models

    monkeypatch.setattr(models, "_host_reachable", lambda host, port=443, timeout=3.0: False)
    monkeypatch.setattr(models, "_cached_hub_file", lambda hub, cache_dir: None)
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailable, match="not reachable.*local path"):
        build_model(ModelSpec("ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - started < 10


def test_real_network_probe_answers_quickly():
    # No reachable host on this port: the probe must give up within its timeout.
    from clip_continual.model.sources import _host_reachable

    started = time.perf_counter()
    assert _host_reachable("127.0.0.1", port=9, timeout=1.0) is False
    assert time.perf_counter() - started < 5


def test_unknown_tag_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match="neither a local file nor a pretrained tag"):
        build_model(ModelSpec("clip-continual-micro", pretrained="laion9000"))
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist. Point `model.pretrained`"):
        build_model(ModelSpec("clip-continual-micro", pretrained=str(tmp_path / "weights.pt")))
    # A named benchmark's own model block is the setting to fix.
    with pytest.raises(PretrainedWeightsUnavailable, match="Point `coco_ost.model.pretrained`"):
        resolve_pretrained(ModelSpec("clip-continual-micro", pretrained=str(tmp_path / "weights.pt")),
                           setting="coco_ost.model")


def test_local_state_dict_file_is_loaded(tmp_path, micro):
    path = tmp_path / "open_clip_weights.bin"
    torch.save(micro.model.state_dict(), path)
    loaded = build_model(ModelSpec("clip-continual-micro", pretrained=str(path)))
    for key, value in micro.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_encode_text_truncation_is_exact(micro64):
    tokens = micro64.tokenize(["a photo of the digit seven", "hi", "a much longer caption with many words"])
    expected = micro64.model.encode_text(tokens, normalize=True)
    # float64: the same sums in another order, so equal to rounding (~1e-16).
    torch.testing.assert_close(encode_text(micro64.model, tokens), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("parts", ["wm", "io", "to"])
def test_trainable_parts(parts, micro):
    model = micro.clone().model
    trainable = set_trainable_parts(model, parts)
    visual = {id(p) for p in model.visual.parameters()}
    text = {id(p) for p in text_tower_parameters(model)}
    chosen = {id(p) for p in trainable}
    assert chosen == {id(p) for p in model.parameters() if p.requires_grad}
    if parts == "wm":
        assert chosen == {id(p) for p in model.parameters()}
        assert model.logit_scale.requires_grad
    elif parts == "io":
        assert chosen == visual and not model.logit_scale.requires_grad
    else:
        assert chosen == text and not (chosen & visual) and not model.logit_scale.requires_grad
    with pytest.raises(ValueError, match="unknown parts"):
        set_trainable_parts(model, "everything")


def test_checkpoint_round_trip_is_exact(tmp_path, micro):
    clip = micro.clone()
    clip.metadata = {"task": "task_1", "steps": 5}
    save_checkpoint(clip, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.spec.architecture == "clip-continual-micro"
    assert loaded.metadata == {"task": "task_1", "steps": 5}
    for key, value in clip.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_checkpoint_write_is_atomic(tmp_path, micro, monkeypatch):
    target = tmp_path / "model.pt"
    save_checkpoint(micro, target)
    before = target.read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(micro, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_is_loadable_with_weights_only(tmp_path, micro):
    save_checkpoint(micro, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["format"] == "clip-continual/1" and "state_dict" in payload


def test_cached_hub_weights_are_found_without_network(tmp_path):
    # The Hugging Face cache layout: models--<org>--<name>/{refs/main, snapshots/<rev>/<file>}.
    from clip_continual.model.sources import _cached_hub_file

    repo = tmp_path / "models--timm--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert _cached_hub_file("timm/tiny-clip/", str(tmp_path)) is None
    (snapshot / "open_clip_model.safetensors").write_bytes(b"weights")
    found = _cached_hub_file("timm/tiny-clip/", str(tmp_path))
    assert found is not None and found.endswith("open_clip_model.safetensors")


def test_an_openai_vit_b_32_file_loads_as_openai_built_it(tmp_path):
    """OpenAI's ViT-B-32 layout (its state dict with input_resolution / context_length /
    vocab_size, in fp16), random weights, given as `model.pretrained` the way users give the real
    file: loaded with QuickGELU, in fp32, every weight as written."""
    import open_clip

    from clip_continual.model.clip import ModelSpec
    from clip_continual.model.sources import build_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        shapes = {k: v.shape for k, v in
                  open_clip.model.CLIP(**open_clip.get_model_config("ViT-B-32")).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(shape, generator=generator) * 0.02).half() for k, shape in shapes.items()}
    state |= {"input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)

    clip = build_model(ModelSpec("ViT-B-32", str(path)))
    loaded = clip.model.state_dict()
    for key in ("visual.conv1.weight", "transformer.resblocks.11.mlp.c_proj.weight", "text_projection"):
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], state[key].float())
    assert type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert clip.image_size == 224 and clip.context_length == 77
    with torch.no_grad():
        features = clip.model.encode_image(clip.preprocess(np.zeros((1, 32, 32, 3), np.uint8)))
    assert features.shape == (1, 512) and torch.isfinite(features).all()
