"""Pretraining of the embedded default, seed by seed: data generation, pretraining and the
pretrained model's zero-shot accuracy and retrieval R@1, with wall-clock and CPU seconds.

Runs the project's own nodes with the parameters in conf/base (overridable as with
``kedro run --params``), so the numbers are those a ``kedro run --params seed=S`` would produce.
Nothing is written into the project. On a shared CPU wall time depends on the load; CPU time
(this process, all threads) is the steadier figure.

    python benchmarks/pretraining_seeds.py --seeds 0,1,2,3,4
    python benchmarks/pretraining_seeds.py --seeds 2 --params pretraining.steps=300,pretraining.batch_size=64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from kedro.config import OmegaConfigLoader

from clip_continual.pipelines.data_preparation import nodes as data_nodes
from clip_continual.pipelines.pretraining import nodes as pretraining_nodes
from clip_continual.evaluation.zero_shot import zero_shot_accuracy
from clip_continual.model.checkpoints import save_checkpoint
from clip_continual.runtime.sweep import merge_params, parse_params

PROJECT = Path(__file__).resolve().parents[1]


def project_parameters(overrides: str | None) -> dict[str, Any]:
    """conf/base parameters with overrides in the syntax of ``kedro run --params``."""
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="local",
                               merge_strategy={"parameters": "soft"})
    return merge_params(loader["parameters"], parse_params(overrides))


def timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_seed(params: dict[str, Any], seed: int, save: Path | None = None) -> dict[str, float]:
    data = params["data_preparation"]

    def generate() -> tuple[Any, Any, Any]:
        return (data_nodes.generate_pretraining_corpus(data, seed),
                data_nodes.generate_shapes_zero_shot_set(data, seed),
                data_nodes.generate_shapes_retrieval_set(data, seed))

    (corpus, zero_shot, retrieval), data_wall, data_cpu = timed(generate)
    pretraining = {**params["pretraining"], "progress": False}
    model, train_wall, train_cpu = timed(
        pretraining_nodes.pretrain_clip, corpus, None, params["model"], pretraining, data, seed)
    metrics = pretraining_nodes.evaluate_pretrained(
        model, zero_shot, retrieval, params["prompts"], params["evaluation"])
    _, digits_test = data_nodes.prepare_digits(data, seed)
    # The updated task's zero-shot start: each test digit among the ten digit prompts (UT-Acc).
    digits = zero_shot_accuracy(model, digits_test, [params["prompts"]["digits"]], params["evaluation"]["batch_size"])
    if save:
        save_checkpoint(model, save / f"pretrained_seed{seed}.pt")
    return {"seed": seed, **metrics, "digits_zs": digits, "data_wall_s": data_wall, "data_cpu_s": data_cpu,
            "pretrain_wall_s": train_wall, "pretrain_cpu_s": train_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--params", default=None, metavar="KEY=VALUE,...",
                        help="overrides as in kedro run --params, e.g. pretraining.steps=300")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is far steadier on a loaded CPU")
    parser.add_argument("--save", type=Path, default=None, help="folder to keep each pretrained model in")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = project_parameters(args.params)
    print(f"model {params['model']['architecture']}, pretraining {params['pretraining']}, "
          f"corpus {params['data_preparation']['shapes']['corpus_size']}, "
          f"{torch.get_num_threads()} torch threads")
    print("| seed | zs_acc | digits zero-shot | I→T R@1 | T→I R@1 | data s (wall / CPU) | pretraining s (wall / CPU) |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        row = run_seed(params, seed, args.save)
        print(f"| {seed} | {row['zs_acc']:.3f} | {row['digits_zs']:.3f} | {row['i2t_r1']:.3f} | "
              f"{row['t2i_r1']:.3f} | {row['data_wall_s']:.1f} / {row['data_cpu_s']:.1f} | "
              f"{row['pretrain_wall_s']:.1f} / {row['pretrain_cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
