"""The replayed vocabulary: the text rows VR-LwF distils on.

Three modes:

- ``paper`` (VR-LwF): every training step draws ``size`` (P = 100) fresh pseudo-words, each a row
  ``[SOT, length (8) uniform ids in [min_id, max_id], EOT]`` zero-padded to the context length.
- ``fixed`` (ZSCL's LwF-VR): ``size`` (1000) pseudo-words of ``length`` (10) ids drawn once per
  task; the same rows at every step of that task.
- ``words``: real words, from the tokenizer's own vocabulary (whole lower-case alphabetic words)
  or from a word-list file, tokenized with the model's tokenizer. Like ``paper``, every step
  samples ``size`` of them afresh (without replacement), so the distilled texts keep changing.

Every draw is a pure function of ``(seed, task_index, step)``: a run that is resumed, or a step
that is recomputed, sees exactly the same rows. Because EOT (49407) is the largest id and the
random ids stop at 49404, CLIP's argmax pooling always reads the EOT position.

Plain Python and PyTorch; no Kedro import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOT_ID = 49406
EOT_ID = 49407
MAX_RANDOM_ID = 49404
VOCABULARY_MODES = ("paper", "fixed", "words")
DEFAULT_SIZES = {"paper": 100, "fixed": 1000, "words": 100}
DEFAULT_LENGTHS = {"paper": 8, "fixed": 10, "words": None}

# Distinct stream tags so a paper-mode step and a fixed-mode task never share random numbers.
_STREAM_STEP = 1
_STREAM_TASK = 2


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of non-negative integer keys (order matters)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class VocabularyConfig:
    """How to build the replayed vocabulary. ``size``/``length`` of None take the mode's default."""

    mode: str = "paper"
    size: int | None = None
    length: int | None = None
    seed: int = 10
    words_file: str | None = None
    min_id: int = 0
    max_id: int = MAX_RANDOM_ID
    sot_id: int = SOT_ID
    eot_id: int = EOT_ID

    def __post_init__(self) -> None:
        if self.mode not in VOCABULARY_MODES:
            raise ValueError(
                f"unknown vocabulary mode '{self.mode}': choose one of {', '.join(VOCABULARY_MODES)}"
            )
        if self.size is None:
            object.__setattr__(self, "size", DEFAULT_SIZES[self.mode])
        if self.length is None:
            object.__setattr__(self, "length", DEFAULT_LENGTHS[self.mode])
        _require_int("size", self.size, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        if self.mode == "words":
            if self.length is not None:
                raise ValueError(
                    "vocabulary 'length' applies to pseudo-words only; in mode 'words' the "
                    "tokenizer decides each word's length. Remove 'length'."
                )
        else:
            _require_int("length", self.length, minimum=1)
            if self.words_file is not None:
                raise ValueError(
                    f"'words_file' is only read in mode 'words', not '{self.mode}'. Remove it or "
                    f"set mode: words."
                )
        for name in ("min_id", "max_id", "sot_id", "eot_id"):
            _require_int(name, getattr(self, name), minimum=0)
        if self.min_id > self.max_id:
            raise ValueError(f"min_id ({self.min_id}) must not exceed max_id ({self.max_id})")
        # Argmax pooling must land on EOT: it has to be the largest id in every row.
        if not (self.max_id < self.eot_id and self.sot_id < self.eot_id):
            raise ValueError(
                f"eot_id ({self.eot_id}) must be larger than max_id ({self.max_id}) and sot_id "
                f"({self.sot_id}) so that CLIP's argmax pooling reads the EOT position"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> VocabularyConfig:
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown vocabulary parameter(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        return cls(**params)

    @property
    def row_length(self) -> int | None:
        """Tokens per pseudo-word row before padding (SOT + ids + EOT)."""
        return None if self.length is None else self.length + 2


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"vocabulary '{name}' must be an integer >= {minimum}, got {value!r}")


def pseudo_word_rows(
    count: int, length: int, context_length: int, generator: torch.Generator,
    min_id: int = 0, max_id: int = MAX_RANDOM_ID, sot_id: int = SOT_ID, eot_id: int = EOT_ID,
) -> torch.Tensor:
    """``count`` rows ``[SOT, length random ids, EOT, 0...]`` of width ``context_length``."""
    if context_length < length + 2:
        raise ValueError(
            f"context length {context_length} cannot hold pseudo-words of {length} ids plus SOT "
            f"and EOT ({length + 2} tokens); lower the vocabulary 'length' to at most "
            f"{context_length - 2}"
        )
    rows = torch.zeros(count, context_length, dtype=torch.long)
    rows[:, 0] = sot_id
    rows[:, 1 : length + 1] = torch.randint(min_id, max_id + 1, (count, length), generator=generator)
    rows[:, length + 1] = eot_id
    return rows


def _generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def tokenizer_words(tokenizer: Any) -> list[str]:
    """Whole lower-case alphabetic words of a CLIP BPE vocabulary, in the tokenizer's id order."""
    encoder = getattr(tokenizer, "encoder", None)
    if not isinstance(encoder, Mapping):
        raise ValueError(
            f"the tokenizer {type(tokenizer).__name__} exposes no BPE vocabulary ('encoder'); "
            f"give a word list with 'words_file' instead"
        )
    words = []
    for token, _ in sorted(encoder.items(), key=lambda item: item[1]):
        if token.endswith("</w>"):
            stem = token[: -len("</w>")]
            # Single letters are not words; capitals never come out of CLIP's lower-casing tokenizer.
            if len(stem) > 1 and stem.isascii() and stem.isalpha() and stem.islower():
                words.append(stem)
    return words


def read_word_file(path: str | Path) -> list[str]:
    """One word (or short phrase) per line; blank lines and '#' comments are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"vocabulary words_file '{path}' does not exist; give a text file with one word per "
            f"line, or drop 'words_file' to use the tokenizer's own vocabulary"
        )
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"vocabulary words_file '{path}' contains no words (one per line expected)")
    return list(dict.fromkeys(words))  # duplicates would be sampled twice as often


class ReplayVocabulary:
    """The replayed vocabulary of one run: its spec, the model's context length, and for mode
    ``words`` the tokenized word table. ``tokens(task_index, step)`` gives the rows to distil on.
    """

    def __init__(
        self,
        config: VocabularyConfig,
        context_length: int,
        words: list[str] | None = None,
        word_tokens: torch.Tensor | None = None,
    ) -> None:
        _require_int("context_length", context_length, minimum=1)
        if config.row_length is not None and context_length < config.row_length:
            raise ValueError(
                f"context length {context_length} cannot hold pseudo-words of {config.length} ids "
                f"plus SOT and EOT ({config.row_length} tokens); lower the vocabulary 'length' to "
                f"at most {context_length - 2} or use a model with a longer context"
            )
        if config.mode == "words":
            if words is None or word_tokens is None:
                raise ValueError("mode 'words' needs the words and their token table; use build_vocabulary")
            if word_tokens.ndim != 2 or len(word_tokens) != len(words):
                raise ValueError(
                    f"word token table of shape {tuple(word_tokens.shape)} does not match "
                    f"{len(words)} words"
                )
            if word_tokens.shape[1] > context_length:
                raise ValueError(
                    f"word token rows have {word_tokens.shape[1]} tokens, more than the context "
                    f"length {context_length}"
                )
            if config.size > len(words):
                raise ValueError(
                    f"vocabulary size {config.size} exceeds the {len(words)} available words; "
                    f"lower 'size' or give a longer word list"
                )
            padded = torch.zeros(len(words), context_length, dtype=torch.long)
            padded[:, : word_tokens.shape[1]] = word_tokens.long()
            word_tokens = padded
        self.config = config
        self.context_length = int(context_length)
        self.words = None if words is None else list(words)
        self.word_tokens = word_tokens
        self._fixed_tables: dict[int, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return int(self.config.size)

    @property
    def fixed_within_task(self) -> bool:
        """True when every step of a task sees the same rows (teacher features can be cached)."""
        return self.config.mode == "fixed"

    def tokens(self, task_index: int, step: int) -> torch.Tensor:
        """The (size, context_length) LongTensor of rows for this step of this task (on CPU)."""
        if task_index < 0 or step < 0:
            raise ValueError(f"task_index and step must be >= 0, got {task_index}, {step}")
        config = self.config
        if config.mode == "fixed":
            return self.task_table(task_index)
        generator = _generator(derive_seed(config.seed, _STREAM_STEP, task_index, step))
        if config.mode == "paper":
            return pseudo_word_rows(
                config.size, config.length, self.context_length, generator,
                config.min_id, config.max_id, config.sot_id, config.eot_id,
            )
        chosen = torch.randperm(len(self.words), generator=generator)[: config.size]
        return self.word_tokens[chosen]

    def task_table(self, task_index: int) -> torch.Tensor:
        """Mode ``fixed``: the rows drawn once for this task (deterministic from seed and task)."""
        if self.config.mode != "fixed":
            raise ValueError(f"only mode 'fixed' has one table per task, not '{self.config.mode}'")
        if task_index not in self._fixed_tables:
            config = self.config
            generator = _generator(derive_seed(config.seed, _STREAM_TASK, task_index))
            self._fixed_tables[task_index] = pseudo_word_rows(
                config.size, config.length, self.context_length, generator,
                config.min_id, config.max_id, config.sot_id, config.eot_id,
            )
        return self._fixed_tables[task_index]

    # --- storage as plain arrays (np.savez / np.load with allow_pickle=False) --------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        config = self.config
        arrays = {
            "mode": np.asarray(config.mode, dtype=str),
            "size": np.asarray(config.size, dtype=np.int64),
            "length": np.asarray(-1 if config.length is None else config.length, dtype=np.int64),
            "seed": np.asarray(config.seed, dtype=np.int64),
            "words_file": np.asarray(config.words_file or "", dtype=str),
            "min_id": np.asarray(config.min_id, dtype=np.int64),
            "max_id": np.asarray(config.max_id, dtype=np.int64),
            "sot_id": np.asarray(config.sot_id, dtype=np.int64),
            "eot_id": np.asarray(config.eot_id, dtype=np.int64),
            "context_length": np.asarray(self.context_length, dtype=np.int64),
        }
        if self.words is not None:
            used = int((self.word_tokens != 0).any(dim=0).nonzero().max()) + 1
            arrays["words"] = np.asarray(self.words, dtype=str)
            # Trailing padding is dropped (and restored on load) to keep the file small.
            arrays["word_tokens"] = self.word_tokens[:, :used].numpy().astype(np.int32)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ReplayVocabulary:
        required = {"mode", "size", "length", "seed", "words_file", "min_id", "max_id", "sot_id",
                    "eot_id", "context_length"}
        missing = sorted(required - set(arrays))
        if missing:
            raise ValueError(f"stored vocabulary lacks the arrays {missing}; rebuild it")
        length = int(arrays["length"])
        config = VocabularyConfig(
            mode=str(arrays["mode"]),
            size=int(arrays["size"]),
            length=None if length < 0 else length,
            seed=int(arrays["seed"]),
            words_file=str(arrays["words_file"]) or None,
            min_id=int(arrays["min_id"]),
            max_id=int(arrays["max_id"]),
            sot_id=int(arrays["sot_id"]),
            eot_id=int(arrays["eot_id"]),
        )
        words = word_tokens = None
        if config.mode == "words":
            if "words" not in arrays or "word_tokens" not in arrays:
                raise ValueError("stored vocabulary of mode 'words' lacks its word table; rebuild it")
            words = [str(w) for w in arrays["words"]]
            word_tokens = torch.from_numpy(np.asarray(arrays["word_tokens"]).astype(np.int64))
        return cls(config, int(arrays["context_length"]), words=words, word_tokens=word_tokens)

    def describe(self) -> dict[str, Any]:
        """A small, loggable summary."""
        summary = {"mode": self.config.mode, "size": self.size, "length": self.config.length,
                   "seed": self.config.seed, "context_length": self.context_length}
        if self.words is not None:
            summary["available_words"] = len(self.words)
        return summary


def build_vocabulary(
    config: VocabularyConfig,
    context_length: int,
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
) -> ReplayVocabulary:
    """Build the vocabulary for a model of ``context_length``; mode ``words`` also needs the
    model's ``tokenizer`` (``ClipModel.tokenizer``)."""
    if config.mode != "words":
        return ReplayVocabulary(config, context_length)
    if tokenizer is None:
        raise ValueError("vocabulary mode 'words' needs the model's tokenizer to tokenize the words")
    words = read_word_file(config.words_file) if config.words_file else tokenizer_words(tokenizer)
    if not words:
        raise ValueError("the tokenizer vocabulary yielded no whole words; give a 'words_file'")
    word_tokens = tokenizer(words)
    if word_tokens.shape[1] != context_length:
        # The tokenizer pads to its own context; the model's may be shorter or longer.
        word_tokens = tokenizer(words, context_length=context_length)
    logger.info("replayed vocabulary: %d candidate words, %d sampled per step", len(words), config.size)
    return ReplayVocabulary(config, context_length, words=words, word_tokens=word_tokens)
