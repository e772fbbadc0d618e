"""DDAS, MoE-Adapters' Distribution Discriminative Auto-Selector: which task's router a batch of
test images takes, or none (the pretrained CLIP).

As MoE-Adapters (Yu et al., CVPR 2024) publishes it: the features are an ImageNet AlexNet's
conv5 maps (``alexnet.features`` without its last ReLU and max-pool; 256x13x13 for a 224 px
input) of the CLIP-preprocessed image, flattened and squashed by a sigmoid
(mtil/src/models/AutoEncoder.py:40-46, 177-185; evaluation.py:54-57); one autoencoder
``Linear(F, 100)+ReLU, Linear(100, F)+Sigmoid`` per task (AutoEncoder.py:13-31), trained with
MSE by Adam (weight decay 1e-4) at lr 0.01, x0.1 every 10 epochs (AutoEncoder.py:49-63, 160,
180); at test time each batch takes the task whose autoencoder reconstructs it best (batch-mean
MSE), or no adapter when that error exceeds a fixed threshold or the winner is the reference
autoencoder (evaluation.py:44-85).

The selector is a submodule of the image tower (``visual.task_selector``), so checkpoints keep
its autoencoders; the AlexNet is not part of the model: it is loaded (and cached per process)
from torchvision's weights or a local state dict when first needed.

Plain PyTorch; no Kedro import.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

AUTOENCODER_CODE = 100  # code_dims, AutoEncoder.py:13-31
CONV5_CHANNELS = 256


class DDASError(ValueError):
    """DDAS cannot run as configured (its AlexNet weights, the image size)."""


# --- the AlexNet conv5 features ---------------------------------------------------------------

def conv5_side(pixels: int) -> int:
    """Side of AlexNet's conv5 map for a square input: conv 11/4 pad 2, two 3/2 max-pools; the
    other convolutions keep the size. 224 -> 13; 0 where the input is too small (< 31 px)."""
    side = (pixels + 4 - 11) // 4 + 1
    for _ in range(2):
        side = (side - 3) // 2 + 1
    return max(side, 0)


def feature_count(image_size: int) -> int:
    """Length of the flattened conv5 features DDAS reads at ``image_size`` (43,264 at 224)."""
    side = conv5_side(int(image_size))
    if side < 1:
        raise DDASError(f"DDAS's AlexNet needs images of at least 31 px, this model reads {image_size} px; "
                        "use a larger model or set ddas: false")
    return CONV5_CHANNELS * side * side


def _missing_weights(reason: str) -> DDASError:
    return DDASError(
        f"DDAS needs ImageNet AlexNet weights: {reason}. Either run once online (torchvision caches "
        "AlexNet_Weights.IMAGENET1K_V1), or set ddas_alexnet_weights to a file saved with "
        "torch.save(torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict(), path); "
        "or set ddas: false")


def _alexnet_state(weights: str | None) -> dict[str, torch.Tensor]:
    if weights is None:
        try:
            state = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise _missing_weights(f"torchvision could not download them ({error})") from error
    else:
        if not Path(weights).is_file():
            raise _missing_weights(f"ddas_alexnet_weights '{weights}' is not a file")
        state = torch.load(weights, map_location="cpu", weights_only=True)
    # A whole AlexNet's state dict, or only its features' entries.
    if any(key.startswith("features.") for key in state):
        state = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
    return state


_EXTRACTORS: dict[tuple[str | None, str], nn.Module] = {}


def alexnet_conv5(weights: str | None, device: torch.device | str = "cpu") -> nn.Module:
    """``alexnet.features[:-2]`` with ImageNet weights (torchvision's, or the state dict saved
    at ``weights``), frozen, in eval mode on ``device``; loaded once per process."""
    key = (None if weights is None else str(weights), str(device))
    if key not in _EXTRACTORS:
        cpu = _EXTRACTORS.get((key[0], "cpu"))
        if cpu is None:
            with torch.device("meta"):  # the layout only: no 61M-parameter random init
                layers = torchvision.models.alexnet(weights=None).features[:-2]
            cpu = layers.to_empty(device="cpu")
            try:
                cpu.load_state_dict(_alexnet_state(weights))
            except RuntimeError as error:  # wrong keys or shapes
                raise _missing_weights(f"'{weights}' is not an AlexNet state dict ({error})") from error
            cpu.requires_grad_(False).eval()
            _EXTRACTORS[(key[0], "cpu")] = cpu
        _EXTRACTORS[key] = cpu if key[1] == "cpu" else cpu.to(device)
    return _EXTRACTORS[key]


@torch.no_grad()
def image_codes(extractor: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``sigmoid(flatten(conv5(pixels)))`` in float32 (the reference runs AlexNet in fp32)."""
    with torch.autocast(pixels.device.type, enabled=False):
        maps = extractor(pixels.float())
    return torch.sigmoid(maps.flatten(1))


# --- autoencoders and the choice ------------------------------------------------------------

class Autoencoder(nn.Module):
    """``sigmoid(W2 relu(W1 x))`` (AutoEncoder.py:13-31)."""

    def __init__(self, features: int, code: int = AUTOENCODER_CODE) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, code)
        self.decoder = nn.Linear(code, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.relu(self.encoder(x))))

    def error(self, codes: torch.Tensor) -> torch.Tensor:
        """Batch-mean MSE (``nn.MSELoss()``, evaluation.py:59-71)."""
        return F.mse_loss(self(codes), codes)


class TaskSelector(nn.Module):
    """One autoencoder per learnt task (``autoencoders``) and optionally a ``reference`` one
    (the reference's AE0, trained on TinyImageNet). ``select(pixels)`` routes each chunk of
    ``batch`` consecutive images to one task, -1 for none; ``threshold``, ``batch`` and
    ``weights`` (the AlexNet state dict, None: torchvision's) are settings, not state.

    Evaluation reads the protocol of ``model.adapters.image_routing``: ``routes()``,
    ``text_route(model, route)`` and ``last_routes`` (each image's route in the last forward).
    """

    def __init__(self, features: int, tasks: int = 0, reference: bool = False, threshold: float = 0.0655,
                 batch: int = 128, weights: str | None = None) -> None:
        super().__init__()
        self.features = features
        self.autoencoders = nn.ModuleList(Autoencoder(features) for _ in range(tasks))
        self.reference = Autoencoder(features) if reference else None
        self.threshold, self.batch, self.weights = float(threshold), int(batch), weights
        self.last_routes: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return len(self.autoencoders) > 0

    def add_task(self, device: torch.device | str = "cpu") -> Autoencoder:
        self.autoencoders.append(Autoencoder(self.features).to(device))
        return self.autoencoders[-1]

    def add_reference(self, device: torch.device | str = "cpu") -> Autoencoder:
        self.reference = Autoencoder(self.features).to(device)
        return self.reference

    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        return image_codes(alexnet_conv5(self.weights, pixels.device), pixels)

    @torch.no_grad()
    def choose(self, codes: torch.Tensor) -> int:
        """The task of one chunk: argmin of the batch-mean errors, ties to the earlier
        autoencoder (the reference first); -1 above the threshold or for the reference."""
        candidates = ([self.reference] if self.reference is not None else []) + list(self.autoencoders)
        errors = torch.stack([autoencoder.error(codes) for autoencoder in candidates])
        best = int(errors.argmin())
        if float(errors[best]) > self.threshold or self.reference is not None and best == 0:
            return -1
        return best - (self.reference is not None)

    def select(self, pixels: torch.Tensor, mixed_batches: bool = False) -> torch.Tensor:
        """(B,) each image's task: one per chunk of ``batch`` consecutive images, or per image
        where the test batches mix tasks (``EvaluatedTask.mixed_batches``: a phase evaluation)."""
        routes = [torch.full((len(chunk),), self.choose(self.codes(chunk)), dtype=torch.long)
                  for chunk in pixels.split(1 if mixed_batches else self.batch)]
        return torch.cat(routes).to(pixels.device)

    def routes(self) -> list[int]:
        """Every route an image may take: -1 (no adapter), then each learnt task."""
        return [-1, *range(len(self.autoencoders))]

    @contextlib.contextmanager
    def text_route(self, model: nn.Module, route: int) -> Iterator[None]:
        """Encode text with task ``route``'s router (-1: no adapter), as the reference builds
        one text classifier per task (evaluation.py:20-41)."""
        chosen = [m for m in model.transformer.modules() if hasattr(m, "route")]
        for mixture in chosen:
            mixture.route = route
        try:
            yield
        finally:
            for mixture in chosen:
                mixture.route = None


def training_rows(count: int, steps: int, batch_size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """The rows of each of ``steps`` batches: shuffled epochs over ``count`` images, the last
    batch of an epoch short (the reference's shuffled DataLoader, AutoEncoder.py:131-199)."""
    generator = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = generator.permutation(count)
        batches += [order[begin:begin + batch_size] for begin in range(0, count, batch_size)]
    return batches[:steps]


def regroup(chunks: Iterable[torch.Tensor], sizes: Iterable[int]) -> Iterator[torch.Tensor]:
    """The rows of ``chunks`` (read in any chunk size) again as batches of ``sizes``."""
    buffer: list[torch.Tensor] = []
    held = 0
    chunks = iter(chunks)
    for size in sizes:
        while held < size:
            chunk = next(chunks)
            buffer.append(chunk)
            held += len(chunk)
        joined = torch.cat(buffer)
        yield joined[:size]
        buffer, held = [joined[size:]], held - size


def fit_autoencoder(autoencoder: Autoencoder, batches: Iterable[torch.Tensor], per_epoch: int) -> None:
    """Adam (weight decay 1e-4) on each batch of codes in turn, lr 0.01 x0.1 every 10 epochs of
    ``per_epoch`` batches (AutoEncoder.py:49-63, 160, 180; the 0.003 given to Adam there is
    overwritten before the first step)."""
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=0.01, weight_decay=1e-4)
    autoencoder.train()
    for step, codes in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * 0.1 ** (step // per_epoch // 10)
        loss = autoencoder.error(codes)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    autoencoder.eval()
