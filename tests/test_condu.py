"""ConDU: unify-then-rebuild of task deltas, semantic voting, and a model that trains each task
from the pretrained CLIP, keeps its experts through a checkpoint and evaluates with them."""

from __future__ import annotations

import pytest
import torch

from clip_continual.methods.condu import rebuild_delta, stacked, unify_deltas, voters
from clip_continual.model.adapters import EvaluatedTask, adapter_recipe, evaluating_task
from clip_continual.model.checkpoints import load_checkpoint, save_checkpoint
from clip_continual.model.clip import encode_images
from clip_continual.training.config import TrainingConfig
from clip_continual.training.loop import fine_tune


def test_tasks_that_change_disjoint_parameters_are_rebuilt_exactly():
    generator = torch.Generator().manual_seed(0)
    owner = torch.randint(0, 3, (40,), generator=generator)  # which task changes each entry
    deltas = []
    for task in range(3):
        values = torch.randn(40, generator=generator)
        delta = torch.where(owner == task, values, torch.zeros(40))
        deltas.append({"w": delta[:30].view(5, 6), "b": delta[30:]})
    unified, masks, rescalers = unify_deltas(stacked(deltas))
    assert torch.equal(rescalers, torch.ones(3))
    for task, delta in enumerate(deltas):
        for name in delta:
            assert torch.equal(rebuild_delta(unified[name], masks[task][name], rescalers[task]), delta[name])


def test_conflicting_deltas_take_the_elected_sign_and_rescale_each_task():
    deltas = [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([-1.0, -3.0])}]
    unified, masks, rescalers = unify_deltas(stacked(deltas))
    # Entry 0: mean +0.5, so the sign is + and only task 1 agrees; entry 1: both agree on -.
    assert torch.equal(unified["w"], torch.tensor([2.0, -3.0]))
    assert masks[0]["w"].tolist() == [True, True] and masks[1]["w"].tolist() == [False, True]
    # mean |delta| / mean |unified * mask|: task 1 1.5 / 2.5, task 2 2 / 1.5.
    assert torch.allclose(rescalers, torch.tensor([1.5 / 2.5, 2.0 / 1.5]))


def test_voting_takes_the_pretrained_model_and_the_experts_of_the_nearest_prototypes():
    axes = torch.eye(4)
    prototypes = [axes[[0]], axes[[1, 2]], axes[[3]]]  # task 2 has two classes
    images = torch.nn.functional.normalize(torch.tensor([[0.1, 0.0, 1.0, 0.3], [1.0, 0.2, 0.0, 0.0]]), dim=-1)
    assert voters(images, prototypes, top_k=1).tolist() == [[0, 2], [0, 1]]
    assert voters(images, prototypes, top_k=2).tolist() == [[0, 2, 3], [0, 1, 2]]
    assert voters(images, prototypes, top_k=9).shape == (2, 4)  # at most every expert


@pytest.fixture(scope="module")
def three_tasks(micro, random_image_set):
    """The micro CLIP after ConDU tasks on the same images: tasks 1 and 2 with the same task
    seed (config seed + task index), so they train the same way exactly when both start from
    the pretrained model; task 3 with another."""
    images = random_image_set(micro, 16, 4)
    prompts = [f"a photo of {name} ." for name in images.class_names]

    def task(start, index):
        config = TrainingConfig(method="condu", method_options={"top_k": 1}, steps=2, epochs=None,
                                seed=2 - index if index < 3 else 7, batch_size=8, lr=1e-3, device="cpu",
                                progress=False)
        return fine_tune(start, images, prompts, config=config, task_index=index)[0]
    first = task(micro, 1)
    second = task(first, 2)
    third = task(second, 3)  # another seed: an expert of its own
    return first, second, third, images


def test_each_task_trains_from_the_pretrained_model_and_its_expert_is_kept(micro, three_tasks):
    first, second, _, _ = three_tasks
    pretrained = micro.model.state_dict()
    for model in (first, second):  # the live weights are the pretrained ones after every task
        state = model.model.state_dict()
        assert all(torch.equal(state[k], pretrained[k]) for k in pretrained)
    assert adapter_recipe(second.model)["classes"] == [4, 4]
    # Task 2 started where task 1 did: the same delta, unified without conflict, rebuilt exactly.
    experts = second.model.task_experts
    first_delta, second_delta = experts.task_delta(0), experts.task_delta(1)
    assert torch.equal(experts.rescalers, torch.ones(2))
    assert all(torch.equal(first_delta[k], second_delta[k]) for k in first_delta)
    conv = "visual.conv1.weight"
    assert torch.equal(first_delta[conv], first.model.task_experts.task_delta(0)[conv])
    assert first_delta[conv].abs().sum() > 0


def test_the_experts_survive_a_checkpoint_and_score_a_known_task_with_its_expert(three_tasks, tmp_path):
    _, second, _, images = three_tasks
    save_checkpoint(second, tmp_path / "condu.pt")
    loaded = load_checkpoint(tmp_path / "condu.pt")
    first_state, loaded_state = second.model.state_dict(), loaded.model.state_dict()
    assert first_state.keys() == loaded_state.keys()
    assert all(torch.equal(first_state[k], loaded_state[k]) for k in first_state)
    pixels = loaded.preprocess(images.images[:3])
    loaded.model.eval()
    with torch.no_grad():
        voted = loaded.model.encode_image(pixels)  # open_clip's own path: the live model
        ensemble = encode_images(loaded.model, pixels, normalize=False).view(3, 3, -1)
        with evaluating_task(loaded.model, EvaluatedTask(images=1)):
            oracle = encode_images(loaded.model, pixels, normalize=False).view(3, 3, -1)
    # Voting: the pretrained model's block and one expert's (top_k 1); a known task: its expert only.
    assert torch.allclose(ensemble[:, 0], torch.nn.functional.normalize(voted, dim=-1), atol=1e-6)
    assert ((ensemble.norm(dim=-1) > 0).sum(1) == 2).all()
    assert (oracle.norm(dim=-1) > 0).tolist() == [[False, False, True]] * 3


def test_the_ensemble_scores_as_the_average_of_the_voters_logits(micro, three_tasks):
    """ConDU's agnostic_evaluate averages the logits of the pretrained model and the top-k
    experts; the concatenated features give the same scores times one constant."""
    from clip_continual.evaluation.features import image_features
    from clip_continual.evaluation.zero_shot import zero_shot_classifier

    _, _, third, images = three_tasks
    templates = ["a photo of {}.", "a drawing of a {}."]
    experts = third.model.task_experts
    plain_models = []
    for task in range(experts.tasks + 1):
        model = micro.clone()
        if task:
            state = model.model.state_dict()
            model.model.load_state_dict({k: state[k] + d for k, d in experts.task_delta(task - 1).items()},
                                        strict=False)
        plain_models.append(model)

    def cosines(clip):
        return image_features(clip, images.images) @ zero_shot_classifier(clip, images.class_names, templates).T
    logits = torch.stack([cosines(m) for m in plain_models])  # (models, images, classes), logit scale aside
    chosen = voters(image_features(micro, images.images), experts.prototypes(), experts.top_k)
    averaged = torch.stack([logits[chosen[i], i].mean(0) for i in range(len(chosen))])
    scores = cosines(third)
    voters_per_image, models = chosen.shape[1], experts.tasks + 1
    assert torch.allclose(scores, averaged * (voters_per_image / models) ** 0.5, atol=1e-5)
    # A learnt task (ordinary MTIL, a seen dataset) is scored by its own expert alone; a task
    # not learnt yet by voting, as with no task given.
    with evaluating_task(third.model, EvaluatedTask(images=2)):
        oracle = cosines(third)
    assert torch.allclose(oracle, logits[3], atol=1e-6) and not torch.allclose(oracle, logits[1], atol=1e-3)
    with evaluating_task(third.model, EvaluatedTask(images=3)):
        unseen = cosines(third)
    assert torch.equal(unseen, scores)


def test_the_lora_variant_trains_and_unifies_only_the_lora_factors(micro, three_tasks, tmp_path):
    images = three_tasks[-1]
    config = TrainingConfig(method="condu_lora", method_options={"rank": 2}, steps=2, epochs=None,
                            batch_size=8, lr=1e-2, device="cpu", progress=False)
    trained, summary = fine_tune(micro, images, [f"a photo of {n} ." for n in images.class_names],
                                 config=config, task_index=1)
    experts = trained.model.task_experts
    assert experts.names and all(".lora_" in name for name in experts.names)
    assert summary["trainable_parameters"] == sum(p.numel() for n, p in trained.model.named_parameters()
                                                  if ".lora_" in n)
    assert any(bool(delta.any()) for delta in experts.task_delta(0).values())
    state, plain = trained.model.state_dict(), micro.model.state_dict()
    assert all(torch.equal(state[k], plain[k]) for k in plain)  # the backbone never changes
    save_checkpoint(trained, tmp_path / "condu_lora.pt")
    loaded = load_checkpoint(tmp_path / "condu_lora.pt").model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
