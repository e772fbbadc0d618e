"""Contrastive pretraining: determinism, the sparse token-embedding update, the optimizers."""

from __future__ import annotations

import torch

from clip_continual.data.shapes import make_corpus
from clip_continual.training.config import TrainingConfig
from clip_continual.training.pretraining import PretrainingConfig, pretrain
from clip_continual.training.schedule import build_optimizer

CONFIG = dict(steps=3, batch_size=8, warmup_steps=1, progress=False, device="cpu")


def corpus_tokens(clip, corpus) -> torch.Tensor:
    return torch.unique(clip.tokenize([str(c) for c in corpus.captions[:, 0]]))


def test_sparse_update_trains_only_the_token_rows_the_corpus_uses(micro):
    corpus = make_corpus(16, seed=0, image_size=micro.image_size)
    trained, summary = pretrain(micro, corpus, PretrainingConfig(**CONFIG))
    before = micro.model.token_embedding.weight
    after = trained.model.token_embedding.weight
    used = corpus_tokens(micro, corpus)
    unused = torch.ones(len(before), dtype=torch.bool)
    unused[used] = False
    assert torch.equal(after[unused], before[unused])  # no weight decay, no update
    assert not torch.equal(after[used], before[used])
    assert trained.model.token_embedding.sparse is False  # what fine-tuning and checkpoints expect
    assert micro.model.token_embedding.sparse is False
    assert summary["steps"] == 3


def test_dense_update_decays_every_token_row(micro):
    corpus = make_corpus(16, seed=0, image_size=micro.image_size)
    config = PretrainingConfig(**CONFIG, sparse_token_embedding=False)
    trained, _ = pretrain(micro, corpus, config)
    before, after = micro.model.token_embedding.weight, trained.model.token_embedding.weight
    assert (after != before).any(dim=1).all()


def test_pretraining_is_deterministic_and_the_recipe_is_in_the_fingerprint(micro):
    corpus = make_corpus(16, seed=0, image_size=micro.image_size)
    first, _ = pretrain(micro, corpus, PretrainingConfig(**CONFIG))
    second, _ = pretrain(micro, corpus, PretrainingConfig(**CONFIG))
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    dense = PretrainingConfig(**CONFIG, sparse_token_embedding=False)
    assert dense.fingerprint() != PretrainingConfig(**CONFIG).fingerprint()


def test_continual_training_uses_the_fused_optimizer_on_cpu(micro):
    parameters = list(micro.clone().model.parameters())
    for kind in ("adam", "adamw"):
        config = TrainingConfig(method="ft", optimizer=kind, steps=1, device="cpu")
        assert build_optimizer(parameters, config).defaults["fused"] is True


def test_a_reused_checkpoint_charges_no_pretraining_to_the_run_that_reused_it(micro):
    from clip_continual.pipelines.pretraining import nodes

    model_params, data = {"architecture": "clip-continual-micro"}, {"shapes": {}, "image_size": 32}
    key = nodes._source_key(model_params, PretrainingConfig.from_params({**CONFIG, "seed": 0}), data)
    cached = micro.clone()
    cached.metadata.update({"source": key, "pretraining": {"train_seconds": 234.0}, nodes.PAID_HERE: True})
    assert nodes.paid_costs(cached.metadata) == {"train_seconds": 234.0}  # the run that pretrained
    reused = nodes.pretrain_clip(None, cached, model_params, CONFIG, data, 0)
    assert reused is cached and nodes.paid_costs(reused.metadata) == {}
