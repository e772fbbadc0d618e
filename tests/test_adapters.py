"""Parameter-efficient modules (RKR, MoE-Adapters): exact forward rules, a bit-for-bit frozen
backbone, checkpoints that load back adapted."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from clip_continual.methods.moe_adapters import MixtureOfAdapters, mixtures
from clip_continual.methods.rkr import Rectifier
from clip_continual.model.adapters import AdapterError, adapter_recipe, add_adapters
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint
from clip_continual.model.clip import set_trainable_parts
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def train_set(micro, random_image_set):
    return random_image_set(micro, 16, NUM_CLASSES)


# Seconds, not minutes; DDAS (tests/test_ddas.py) needs a model of 31 px or more.
SMALL = {"rkr": {}, "moe_adapters": {"experts": 4, "bottleneck": 8, "ddas": False}, "lora": {"rank": 4}}


def train(start, train_set, method, task_index=1, **options):
    options = {**SMALL[method], **options}
    config = TrainingConfig(method=method, method_options=options, steps=3, epochs=None,
                            batch_size=8, lr=1e-2, device="cpu", progress=False)
    prompts = [f"a photo of {name} ." for name in train_set.class_names]
    return fine_tune(start, train_set, prompts, config=config, task_index=task_index)


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain CLIP's tensors inside an adapted model, under the plain CLIP's keys."""
    state = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in key:
            if not key.endswith(".original"):
                continue  # the rectifier's own parameters
            owner, rest = key.split(".parametrizations.")
            key = f"{owner}.{rest.split('.')[0]}"
        elif ".mixture." in key or ".lora_" in key:
            continue
        state[key] = value
    return state


def outputs(clip, pixels, tokens):
    with torch.no_grad():
        return clip.model.encode_image(pixels), clip.model.encode_text(tokens)


@pytest.fixture(scope="module")
def inputs(micro):
    pixels = torch.randn(5, 3, micro.image_size, micro.image_size, generator=torch.Generator().manual_seed(1))
    return pixels, micro.tokenize(["a red circle", "a small blue square"])


# --- the forward rules ---------------------------------------------------------------------

def test_rectified_linear_is_scale_times_frozen_plus_low_rank(float64):
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    rectifier = Rectifier(3, 5, rank=2)
    with torch.no_grad():
        rectifier.down.copy_(torch.randn(2, 5))
        rectifier.scale.copy_(torch.tensor([0.5, 2.0, -1.0]))
    from clip_continual.methods.rkr import _ScaledBias

    parametrize.register_parametrization(layer, "weight", rectifier)
    parametrize.register_parametrization(layer, "bias", _ScaledBias(rectifier))
    x = torch.randn(4, 5)
    up, down, scale = rectifier.up.detach(), rectifier.down.detach(), rectifier.scale.detach()
    expected = (x @ weight.t() + bias + x @ down.t() @ up.t()) * scale  # CL-CLIP's (Wx + b + UDx) * s
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert torch.equal(layer.parametrizations.weight.original, weight)


def test_rank_larger_than_the_layer_is_refused():
    with pytest.raises(AdapterError, match="rank 9 must lie in"):
        Rectifier(4, 8, rank=9)


def test_mixture_routes_each_sample_to_its_top_k_experts(float64):
    torch.manual_seed(0)
    mixture = MixtureOfAdapters(width=6, experts=4, top_k=2, bottleneck=3, routers=1, dropout=0.0).eval()
    with torch.no_grad():
        mixture.gates[0].copy_(torch.randn(6, 4))
        for expert in mixture.experts:
            expert.up.weight.normal_()
    x = torch.randn(3, 5, 6)  # (batch, tokens, width)
    gates = mixture.routing(x[:, 0])
    assert ((gates > 0).sum(1) == 2).all() and torch.allclose(gates.sum(1), torch.ones(3))
    logits = x[:, 0] @ mixture.gates[0]
    expected = torch.zeros_like(x)
    for b in range(3):
        top = logits[b].topk(2)
        weights = top.values.softmax(0)
        for weight, index in zip(weights, top.indices):
            expert = mixture.experts[int(index)]
            hidden = torch.relu(x[b] @ expert.down.weight.t() + expert.down.bias)
            expected[b] += weight * 0.1 * (hidden @ expert.up.weight.t() + expert.up.bias)
    with torch.no_grad():
        torch.testing.assert_close(mixture(x), expected, rtol=0, atol=1e-12)
        # Sequence-first input (open_clip with batch_first False) gives the same numbers.
        torch.testing.assert_close(mixture(x.transpose(0, 1), batch_first=False).transpose(0, 1), expected,
                                   rtol=0, atol=1e-12)


def test_lora_starts_exactly_at_the_model_and_adds_a_scaled_low_rank_update(micro, inputs):
    from clip_continual.methods.lora import LoRALinear, SequentialLoRA

    plain_model, adapted = micro.clone(), micro.clone()
    SequentialLoRA(rank=4).prepare_student(adapted.model, "wm")
    plain_model.model.eval()
    adapted.model.eval()
    for plain, lora in zip(outputs(plain_model, *inputs), outputs(adapted, *inputs)):
        assert torch.equal(plain, lora)  # B = 0: not approximately, exactly the same numbers
    layers = {name: m for name, m in adapted.model.named_modules() if isinstance(m, LoRALinear)}
    blocks = len(micro.model.visual.transformer.resblocks) + len(micro.model.transformer.resblocks)
    assert len(layers) == 2 * blocks and all(name.endswith(("mlp.c_fc", "mlp.c_proj")) for name in layers)
    layer = next(iter(layers.values()))
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(3, layer.in_features)
        expected = x @ layer.weight.T + layer.bias + (x @ layer.lora_A.T @ layer.lora_B.T) / 2.0  # 1/sqrt(4)
        assert torch.allclose(layer(x), expected, atol=1e-5)


# --- adapted CLIPs ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rkr", "moe_adapters", "lora"])
def test_adapters_start_as_the_identity_and_only_they_train(micro, train_set, inputs, method):
    before = {k: v.clone() for k, v in micro.model.state_dict().items()}
    trained, summary = train(micro, train_set, method)
    assert adapter_recipe(micro.model) is None  # the start model is left alone
    assert all(torch.equal(v, before[k]) for k, v in micro.model.state_dict().items())
    # The backbone inside the trained model is bit-for-bit the start model.
    backbone = backbone_state(trained.model)
    assert backbone.keys() == before.keys()
    assert all(torch.equal(backbone[k], before[k]) for k in before)
    # Task 1 trains every adapter parameter (one router; no expert frozen yet) and nothing else.
    adapters = [p for name, p in trained.model.named_parameters()
                if ".parametrizations.weight.0." in name or ".mixture." in name or ".lora_" in name]
    assert summary["trainable_parameters"] == sum(p.numel() for p in adapters)
    assert summary["trainable_parameters"] < sum(p.numel() for p in micro.model.parameters()) / 5
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    # A fresh adapter changes nothing: same outputs as the plain model.
    fresh = micro.clone()
    trained_method = TrainingConfig(method=method, method_options=SMALL[method], steps=1, epochs=None).build_method()
    trained_method.prepare_student(fresh.model, "wm")
    fresh.model.eval()
    for plain, adapted in zip(outputs(micro, *inputs), outputs(fresh, *inputs)):
        # The same function through other kernels (parametrised weights, the mixture block):
        # float32 features of norm ~1 agree to a few ulps (1e-7); 1e-5 is 100 ulps.
        assert torch.allclose(plain, adapted, atol=1e-5)


@pytest.mark.parametrize("method", ["rkr", "moe_adapters", "lora"])
def test_adapted_checkpoint_loads_back_adapted(micro, train_set, inputs, tmp_path, method):
    trained, _ = train(micro, train_set, method)
    path = tmp_path / "adapted.pt"
    save_checkpoint(trained, path)
    loaded = load_checkpoint(path)
    assert adapter_recipe(loaded.model) == adapter_recipe(trained.model)
    first, second = trained.model.state_dict(), loaded.model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    loaded.model.eval()
    for a, b in zip(outputs(trained, *inputs), outputs(loaded, *inputs)):
        assert torch.equal(a, b)
    # ...and keeps training as the same kind of model (the next task).
    again, _ = train(loaded, train_set, method, task_index=2)
    assert adapter_recipe(again.model)["kind"] == adapter_recipe(trained.model)["kind"]


def test_rkr_parts_choose_the_adapted_towers(micro, train_set):
    trained, _ = train(micro.clone(), train_set, "rkr")
    visual = {id(p) for p in trained.model.visual.parameters()}
    chosen = set_trainable_parts(trained.model, "io")
    assert chosen and all(id(p) in visual for p in chosen)
    image_only = micro.clone()
    add_adapters(image_only.model, {"kind": "rkr", "rank": 2, "towers": ["visual"]})
    assert not any(isinstance(m, Rectifier) for m in image_only.model.transformer.modules())
    with pytest.raises(AdapterError, match="already carries rkr adapters"):
        add_adapters(image_only.model, {"kind": "rkr", "rank": 2, "towers": ["visual", "text"]})


def test_moe_adds_a_router_per_task_and_freezes_the_most_used_experts(micro, train_set):
    first, _ = train(micro, train_set, "moe_adapters", frozen_per_task=1)
    assert adapter_recipe(first.model)["routers"] == 1
    for mixture in mixtures(first.model):
        assert int(mixture.frozen.sum()) == 1
        assert mixture.usage[mixture.frozen].item() == mixture.usage.max().item() > 0
    frozen_before = {
        name: p.detach().clone() for name, p in first.model.named_parameters()
        if ".mixture.experts." in name and _expert_frozen(first.model, name)
    }
    second, _ = train(first, train_set, "moe_adapters", task_index=2, frozen_per_task=1)
    assert adapter_recipe(second.model)["routers"] == 2
    params = dict(second.model.named_parameters())
    assert frozen_before and all(torch.equal(params[name], value) for name, value in frozen_before.items())
    assert all(len(m.gates) == 2 for m in mixtures(second.model))


def _expert_frozen(model, name):
    owner, rest = name.split(".mixture.experts.")
    mixture = model.get_submodule(f"{owner}.mixture")
    return bool(mixture.frozen[int(rest.split(".")[0])])


def test_moe_settings_are_checked():
    from clip_continual.methods import MethodConfigError, get_method

    with pytest.raises(MethodConfigError, match="top_k .3. cannot exceed experts .2."):
        get_method("moe_adapters", experts=2, top_k=3)
    with pytest.raises(MethodConfigError, match="rank must be a positive integer"):
        get_method("rkr", rank=0)
