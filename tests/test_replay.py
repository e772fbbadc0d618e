"""The replayed vocabulary: pseudo-word rows, reproducibility, modes, storage, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_continual.methods.vocabulary import (
    EOT_ID, MAX_RANDOM_ID, SOT_ID, ReplayVocabulary, VocabularyConfig, build_vocabulary, pseudo_word_rows,
    tokenizer_words,
)
from clip_continual.model.clip import encode_text

CONTEXT = 16  # the micro model's context length


def paper_vocabulary(seed: int = 10, **overrides) -> ReplayVocabulary:
    return build_vocabulary(VocabularyConfig(mode="paper", seed=seed, **overrides), CONTEXT)


def test_paper_rows_have_sot_ids_eot_and_padding():
    rows = paper_vocabulary().tokens(task_index=0, step=0)
    length = 8
    assert rows.shape == (100, CONTEXT) and rows.dtype == torch.long
    assert (rows[:, 0] == SOT_ID).all()
    ids = rows[:, 1 : length + 1]
    assert ids.min() >= 0 and ids.max() <= MAX_RANDOM_ID
    assert (rows[:, length + 1] == EOT_ID).all()
    assert (rows[:, length + 2 :] == 0).all()
    # CLIP pools at the argmax token: it must be the EOT position of every row.
    assert (rows.argmax(dim=-1) == length + 1).all()


def test_paper_ids_cover_the_whole_range():
    rows = paper_vocabulary(size=5000).tokens(0, 0)[:, 1:9]
    assert rows.min() < 100 and rows.max() > MAX_RANDOM_ID - 100


def test_paper_rows_are_reproducible_and_fresh_per_step_and_task():
    first, again = paper_vocabulary(seed=3), paper_vocabulary(seed=3)
    assert torch.equal(first.tokens(0, 5), again.tokens(0, 5))
    # Order of calls does not matter: a row set is a function of (seed, task, step).
    again.tokens(0, 9)
    assert torch.equal(first.tokens(1, 2), again.tokens(1, 2))
    assert not torch.equal(first.tokens(0, 0), first.tokens(0, 1))
    assert not torch.equal(first.tokens(0, 0), first.tokens(1, 0))
    assert not torch.equal(first.tokens(0, 0), paper_vocabulary(seed=4).tokens(0, 0))


def test_fixed_rows_stay_within_a_task_and_change_between_tasks():
    vocabulary = build_vocabulary(VocabularyConfig(mode="fixed", seed=1), CONTEXT)
    rows = vocabulary.tokens(0, 0)
    assert rows.shape == (1000, CONTEXT)
    assert (rows[:, 11] == EOT_ID).all() and (rows[:, 12:] == 0).all()
    assert torch.equal(rows, vocabulary.tokens(0, 17))
    assert not torch.equal(rows, vocabulary.tokens(1, 0))
    rebuilt = build_vocabulary(VocabularyConfig(mode="fixed", seed=1), CONTEXT)
    assert torch.equal(rebuilt.tokens(1, 3), vocabulary.tokens(1, 0))
    assert vocabulary.fixed_within_task and not paper_vocabulary().fixed_within_task


def test_truncated_encoding_of_pseudo_words_is_exact(micro64):
    rows = paper_vocabulary(size=7).tokens(0, 0)
    with torch.no_grad():
        fast = encode_text(micro64.model, rows)
        full = micro64.model.encode_text(rows, normalize=True)
    # float64: the same sums in another order, so equal to rounding (~1e-16).
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["paper", "fixed"])
def test_arrays_round_trip_through_npz(tmp_path, mode):
    vocabulary = build_vocabulary(VocabularyConfig(mode=mode, size=20, seed=7), CONTEXT)
    path = tmp_path / "vocabulary.npz"
    np.savez(path, **vocabulary.to_arrays())
    with np.load(path, allow_pickle=False) as stored:
        loaded = ReplayVocabulary.from_arrays(dict(stored))
    assert loaded.config == vocabulary.config
    assert torch.equal(loaded.tokens(2, 4), vocabulary.tokens(2, 4))


def test_word_file_vocabulary(micro, tmp_path):
    words_file = tmp_path / "words.txt"
    words_file.write_text("# animals\ncat\ndog\n\nhorse\ncat\nzebra\nbig red apple\n")
    config = VocabularyConfig(mode="words", size=3, words_file=str(words_file))
    vocabulary = build_vocabulary(config, micro.context_length, micro.tokenizer)
    assert vocabulary.words == ["cat", "dog", "horse", "zebra", "big red apple"]
    rows = vocabulary.tokens(0, 0)
    assert rows.shape == (3, CONTEXT)
    assert (rows[:, 0] == SOT_ID).all() and ((rows == EOT_ID).sum(dim=1) == 1).all()
    # Sampled without replacement, fresh per step, reproducible.
    assert len({tuple(r.tolist()) for r in rows}) == 3
    assert torch.equal(rows, vocabulary.tokens(0, 0))
    assert any(not torch.equal(rows, vocabulary.tokens(0, s)) for s in range(1, 6))
    table = {tuple(micro.tokenize([w])[0].tolist()) for w in vocabulary.words}
    assert all(tuple(r.tolist()) in table for r in rows)

    path = tmp_path / "words.npz"
    np.savez(path, **vocabulary.to_arrays())
    with np.load(path, allow_pickle=False) as stored:
        loaded = ReplayVocabulary.from_arrays(dict(stored))
    assert loaded.words == vocabulary.words
    assert torch.equal(loaded.tokens(3, 1), vocabulary.tokens(3, 1))


def test_tokenizer_vocabulary_words(micro):
    words = tokenizer_words(micro.tokenizer)
    assert len(words) > 10_000
    assert all(w.isalpha() and w.islower() and len(w) > 1 for w in words[:500])
    assert "dog" in words and "photo" in words


def test_word_file_errors(micro, tmp_path):
    missing = VocabularyConfig(mode="words", size=2, words_file=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_vocabulary(missing, CONTEXT, micro.tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="contains no words"):
        build_vocabulary(VocabularyConfig(mode="words", words_file=str(empty)), CONTEXT, micro.tokenizer)
    few = tmp_path / "few.txt"
    few.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="exceeds the 2 available words"):
        build_vocabulary(VocabularyConfig(mode="words", size=5, words_file=str(few)), CONTEXT, micro.tokenizer)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        build_vocabulary(VocabularyConfig(mode="words", words_file=str(few), size=1), CONTEXT)


def test_invalid_configurations_are_explained():
    with pytest.raises(ValueError, match="cannot hold pseudo-words of 20 ids"):
        build_vocabulary(VocabularyConfig(length=20), CONTEXT)
    with pytest.raises(ValueError, match="cannot hold"):
        pseudo_word_rows(2, 15, CONTEXT, torch.Generator())
    with pytest.raises(ValueError, match="unknown vocabulary mode 'random'"):
        VocabularyConfig(mode="random")
    with pytest.raises(ValueError, match="size"):
        VocabularyConfig(size=0)
    with pytest.raises(ValueError, match="argmax pooling"):
        VocabularyConfig(max_id=EOT_ID)
    with pytest.raises(ValueError, match="only read in mode 'words'"):
        VocabularyConfig(mode="paper", words_file="words.txt")
    with pytest.raises(ValueError, match="unknown vocabulary parameter"):
        VocabularyConfig.from_params({"mode": "paper", "sizes": 3})
    with pytest.raises(ValueError, match="must be >= 0"):
        paper_vocabulary().tokens(-1, 0)


def test_defaults_follow_the_mode():
    assert (VocabularyConfig().size, VocabularyConfig().length) == (100, 8)
    fixed = VocabularyConfig.from_params({"mode": "fixed"})
    assert (fixed.size, fixed.length) == (1000, 10)
