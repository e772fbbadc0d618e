"""Why a task-routing method learns what it learns on the embedded digits: for each session of a
finished ``digits_mst`` run, the accuracy on the session's test digits among its own two digits,
read six ways from the run's checkpoints.

    python benchmarks/task_routing.py data/09_benchmarks/embedded_claims_rest/job-0 diki

- ``as evaluated``: as the pipeline scores it (``learning_acc_own``), the whole test set at once;
- ``batch vote``: the same mixed test set with DIKI's and DPW's batch vote over each batch of
  256 images (what the pipeline did before phase evaluations routed each image alone);
- ``session alone``: the session's digits as a test set of their own, so every batch holds one
  task's images, as DIKI, DPW and ConDU evaluate each dataset upstream;
- ``task given``: ConDU's own expert of the session (its ``evaluate``, when the task is known);
- ``start model``: the frozen CLIP the method starts from (prefix branches off, or ConDU's
  pretrained weights), i.e. what the session's digits got before any learning;
- ``routed right``: the share of the session's digits whose task choice is the session (DIKI /
  DPW: each image's likeliest Gaussian; ConDU: its best-ranked prototype).

The project folder is a Kedro project that ran the method (the claims script's job folders are);
the newest run folder of the method under ``data/06_models/digits_mst`` is read.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from clip_continual.data.common import ImageSet
from clip_continual.data.digits import DIGIT_NAMES, DIGIT_PROMPT
from clip_continual.evaluation.features import class_features, evaluating, text_features
from clip_continual.evaluation.step import evaluate_step
from clip_continual.evaluation.zero_shot import predictions_among, seen_accuracy
from clip_continual.methods.condu import rank_tasks
from clip_continual.model.adapters import EvaluatedTask, evaluating_task
from clip_continual.model.checkpoints import load_checkpoint
from clip_continual.model.clip import ClipModel, encode_images
from clip_continual.model.prefix_attention import branches_off, frozen_image_features
from clip_continual.runtime.benchmarks import BENCHMARKS

PHASES = [list(phase) for phase in BENCHMARKS["digits_mst"].phases]
PROMPTS = [DIGIT_PROMPT.format(name) for name in DIGIT_NAMES]
COLUMNS = ("as evaluated", "batch vote", "session alone", "task given", "start model", "routed right")


def image_set(path: Path) -> ImageSet:
    arrays = np.load(path)
    return ImageSet(images=arrays["images"], labels=arrays["labels"], class_names=tuple(arrays["class_names"]))


def own_accuracy(clip: ClipModel, images: ImageSet, phase: list[int]) -> float:
    with evaluating(clip, "cpu") as target:
        classes = class_features(clip, lambda: text_features(clip, PROMPTS, 256, target), images.class_names)
        (predicted,) = predictions_among(clip, images, classes, [phase], 256, None)
    return seen_accuracy(predicted, images.labels, phase)


@contextlib.contextmanager
def start_model(clip: ClipModel) -> Iterator[None]:
    """The frozen CLIP within the block."""
    experts = getattr(clip.model, "task_experts", None)
    with experts.plain() if experts is not None else branches_off(clip.model):
        yield


def routed_right(clip: ClipModel, session: ImageSet, task: int) -> float | None:
    visual = clip.model.visual
    with torch.inference_mode():
        pixels = clip.preprocess(session.images, "cpu")
        selector = getattr(visual, "task_selector", None)
        if selector is not None and selector.active:
            chosen = selector.confidences(frozen_image_features(visual.eval(), pixels)).argmax(dim=1)
            return float((chosen == task).float().mean())
        experts = getattr(clip.model, "task_experts", None)
        if experts is not None:
            with experts.plain():  # the pretrained features ConDU ranks prototypes by (voters)
                features = torch.nn.functional.normalize(encode_images(clip.model.eval(), pixels).float(), dim=-1)
            return float((rank_tasks(features, experts.prototypes())[:, 0] == task).float().mean())
    return None


def session_row(clip: ClipModel, step: int, test: ImageSet, suite: dict[str, Any]) -> dict[str, Any]:
    phase = PHASES[step - 1]
    keep = np.isin(test.labels, phase)
    session = ImageSet(images=test.images[keep], labels=test.labels[keep], class_names=test.class_names)
    evaluated = evaluate_step(clip, step, f"task_{step}", test, PROMPTS, PHASES, suite,
                              previous_rows=[[0.0] * len(PHASES)] * step)
    row = {"as evaluated": evaluated["learning_acc_own"], "batch vote": own_accuracy(clip, test, phase),
           "session alone": own_accuracy(clip, session, phase)}
    if getattr(clip.model, "task_experts", None) is not None:
        with evaluating_task(clip.model, EvaluatedTask(images=step - 1)):
            row["task given"] = own_accuracy(clip, session, phase)
    with start_model(clip):
        row["start model"] = own_accuracy(clip, session, phase)
    row["routed right"] = routed_right(clip, session, step - 1)
    return row


def run_folder(project: Path, method: str) -> Path:
    folders = sorted((project / "data/06_models/digits_mst").glob(f"{method}-*"), key=lambda p: p.stat().st_mtime)
    if not folders:
        raise SystemExit(f"no '{method}' run under {project}/data/06_models/digits_mst: run it there first")
    return folders[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path, help="a Kedro project folder that ran digits_mst")
    parser.add_argument("method", help="the method's name, e.g. diki, dpw, condu")
    args = parser.parse_args()
    test = image_set(args.project / "data/03_primary/digits_test.npz")
    suite = {"shapes": (image_set(args.project / "data/03_primary/shapes_zero_shot.npz"), ["a photo of a {}"])}
    folder = run_folder(args.project, args.method)
    print(f"{args.method}: {folder}")
    print("| session | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1))
    for step in range(1, len(PHASES) + 1):
        row = session_row(load_checkpoint(folder / f"task_{step}.pt"), step, test, suite)
        cells = ["–" if row.get(c) is None else f"{row[c]:.3f}" for c in COLUMNS]
        print(f"| {step} ({PHASES[step - 1][0]}/{PHASES[step - 1][1]}) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
