"""Every method on the embedded default over seeds, with the README's claims checked.

Runs each method variant (and the two bounds: the start model, and joint training on all
sessions at once) for every seed through the real ``kedro run`` path (``clip_continual.sweep``),
then prints the table of all methods (mean ± sample std over the seeds) and one PASS / FAIL line
per claim. A claim passes only when it holds on every seed and the difference it states is
larger than twice the larger seed standard deviation of the two sides.

    python benchmarks/embedded_claims.py --seeds 0 1 2 3 4 --jobs 2     # runs, then checks
    python benchmarks/embedded_claims.py --check-only                   # checks the runs made

Runs go to ``--out`` (default ``data/09_benchmarks/embedded_claims``): one working folder per
job, each with its own data and MLflow store (two runs of different seeds must not share the
prepared data). Runs already finished there are not repeated. One torch thread per job.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

PROJECT = Path(__file__).resolve().parents[1]
EXPERIMENT = "clip-continual"
CHANCE = 0.1  # ten digits
# The variants of the table (sweep syntax); the joint bound runs the one-session benchmark.
VARIANTS = ("ft", "lwf", "vr_lwf", "vr_lwf:continual_learning.alpha=0.5", "vr_lwf_zscl", "lwf_zscl",
            "geodl", "imm", "wise_ft", "ewc", "agem", "gem", "icarl", "rkr", "moe_adapters", "zscl",
            "rail", "lora", "condu", "condu_lora", "diki", "dpw")
JOINT = ("digits_ost", "ft:continual_learning.training.steps=250")  # 5 sessions x 50 steps at once
START_ROW, JOINT_ROW = "start model (zero-shot)", "joint (all sessions at once)"


def is_start(label: str) -> bool:
    """A start model's row: the default one's, or that of an FT variant from another start model."""
    return label == START_ROW or label.startswith("start model of ")


# --- running ---------------------------------------------------------------------------------

def job_folder(out: Path, job: int) -> Path:
    """A Kedro project folder of its own (the project's conf and code, its own data and store)."""
    folder = (out / f"job-{job}").resolve()  # the runs start inside it
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("conf", "pyproject.toml"):
        link = folder / name
        if not link.exists():
            link.symlink_to(PROJECT / name)
    (folder / "src").mkdir(exist_ok=True)  # Kedro wants a source folder inside; the code is installed
    return folder


def store_of(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def finished_rows(folder: Path, benchmark: str) -> list[dict[str, Any]]:
    """compare's rows of the job's store: the newest complete finished run per variant and seed."""
    from clip_continual.runtime.results import NoRunsToCompare, latest_finished_runs

    try:
        return latest_finished_runs(store_of(folder), EXPERIMENT, benchmark)
    except NoRunsToCompare:
        return []


def sweep(folder: Path, pipeline: str | None, spec: str, seed: int) -> bool:
    """One run through ``clip_continual.sweep`` in the job's folder; True when it finished."""
    command = [sys.executable, "-m", "clip_continual.sweep", "--methods", spec, "--seeds", str(seed),
               "--project-path", str(folder)] + (["--pipeline", pipeline] if pipeline else [])
    # The job folder links the project's pyproject.toml: Kedro's telemetry must not write into it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_of(folder), "OMP_NUM_THREADS": "1",
           "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    print(f"[{folder.name}] seed {seed}, {pipeline or 'digits_mst'}: {spec}", flush=True)
    with open(folder / "sweep.log", "a") as log:
        return subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode == 0


def joint_run(specs: Sequence[str]) -> tuple[str, str]:
    """The joint bound's pipeline and sweep spec, on the start model the variants share: where
    every variant sets the same start-model settings (``model``, ``pretraining``,
    ``data_preparation``), the joint run sets them too, so that it bounds them from the same start."""
    from clip_continual.runtime.run_key import START_MODEL_BLOCKS

    def start_settings(spec: str) -> tuple[str, ...]:
        items = (item.strip() for item in spec.partition(":")[2].split(","))
        return tuple(sorted(item for item in items if item.partition(".")[0] in START_MODEL_BLOCKS))

    pipeline, joint = JOINT
    shared = {start_settings(variant) for variant in specs}
    return (pipeline, ",".join([joint, *shared.pop()])) if len(shared) == 1 else JOINT


def run_job(folder: Path, seeds: Sequence[int], specs: Sequence[str]) -> int:
    """The job's runs not yet finished (``done.json`` lists those that were); failures count."""
    manifest = folder / "done.json"
    done = set(map(tuple, json.loads(manifest.read_text()))) if manifest.exists() else set()
    failures = 0
    for seed in seeds:
        for pipeline, spec in [(None, spec) for spec in specs] + [joint_run(specs)]:
            if (pipeline or "", spec, seed) in done:
                continue
            if sweep(folder, pipeline, spec, seed):
                done.add((pipeline or "", spec, seed))
                manifest.write_text(json.dumps(sorted(done, key=str)))
            else:
                failures += 1
    return failures


def run_all(out: Path, seeds: Sequence[int], jobs: int, specs: Sequence[str]) -> None:
    folders = [job_folder(out, job) for job in range(jobs)]
    with ThreadPoolExecutor(jobs) as pool:
        failures = sum(pool.map(lambda k: run_job(folders[k], seeds[k::jobs], specs), range(jobs)))
    if failures:
        print(f"{failures} sweep(s) failed: see {out}/job-*/sweep.log", file=sys.stderr)
# --- results -----------------------------------------------------------------------------------

def _history(client: Any, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def seed_results(folder: Path) -> dict[str, dict[int, dict[str, float]]]:
    """label -> seed -> this run's numbers; the start model's come from each seed's ft run (an FT
    variant's, such as ``ft (glyphs.count=6000)``, as ``start model of <its label>``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_of(folder))
    results: dict[str, dict[int, dict[str, float]]] = {}
    for benchmark in ("digits_mst", JOINT[0]):
        for row in finished_rows(folder, benchmark):
            label = JOINT_ROW if benchmark == JOINT[0] else row["method"]
            learning = _history(client, row["run_id"], "continual/learning_acc")
            own = list(_history(client, row["run_id"], "continual/learning_acc_own").values())
            results.setdefault(label, {})[row["seed"]] = {
                "digits": row["ut_acc"], "zs": row["zs_acc"], "a_acc": row["a_acc"], "bwt": row["bwt"],
                "learning": row["mean_learning_acc"], "min_learning": min(learning.values(), default=None),
                "learning_own": float(np.mean(own)) if own else None, "min_own": min(own, default=None),
                "i2t": row["i2t_r1"], "t2i": row["t2i_r1"], "params": row["trainable_parameters"],
                "s_task": row["wall_time_per_task_s"], "gain": _learning_gain(client, row["run_id"]),
                **{key: row.get(key) for _, key, _ in COST_COLUMNS}}
            if label == "ft" or label.startswith("ft ("):  # FT from another start model: a row of its own
                start = START_ROW if label == "ft" else f"start model of {label}"
                results.setdefault(start, {})[row["seed"]] = _start_model(client, row["run_id"])
    return results


def learning_gain(matrix: Any) -> float:
    """Mean over the sessions of R[t][t] - R[0][t]: how much better each session's digits are
    read right after learning them than the start model read them (all ten prompts). A method
    whose sessions do not move the model scores about 0, however well the start model reads."""
    rows = matrix.set_index("after")
    return float(np.mean([rows.loc[task, task] - rows.iloc[0][task] for task in rows.columns]))


def _learning_gain(client: Any, run_id: str) -> float | None:
    import tempfile

    import pandas as pd

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "accuracy_matrix.csv", folder)
        except Exception:  # a run without its report artifacts: no gain to show
            return None
        return learning_gain(pd.read_csv(path))


def _start_model(client: Any, run_id: str) -> dict[str, float]:
    """Step 0 of a run: the pretrained model before the first session."""
    at_start = {key: _history(client, run_id, name).get(0) for key, name in (
        ("digits", "continual/ut_acc"), ("zs", "continual/zs_acc"), ("i2t", "retrieval/i2t_r1"),
        ("t2i", "retrieval/t2i_r1"))}
    return {**at_start, "a_acc": (at_start["digits"] + at_start["zs"]) / 2, "params": 0}


def gather(*outs: Path) -> dict[str, dict[int, dict[str, float]]]:
    """Every job's rows; where two output folders ran a row for the same seed, the later's."""
    merged: dict[str, dict[int, dict[str, float]]] = {}
    for folder in (folder for out in outs for folder in sorted(out.glob("job-*"))):
        for label, seeds in seed_results(folder).items():
            merged.setdefault(label, {}).update(seeds)
    return merged


# --- the table and the claims --------------------------------------------------------------------

COLUMNS = (("digits", "digits"), ("zs", "ZS-Acc"), ("a_acc", "A-Acc"), ("bwt", "BWT"), ("learning", "learning"),
           ("min_learning", "min session"), ("gain", "gain"), ("learning_own", "learning (own)"),
           ("min_own", "min own"),
           ("i2t", "I→T R@1"), ("t2i", "T→I R@1"), ("s_task", "s / task"))


# What each row cost (compare's cost columns, runtime/results.py); the wall time and the peak
# memory depend on the machine and its load.
COST_COLUMNS = (("params stored", "stored_parameters", "{:,.0f}"), ("extra storage MiB", "extra_storage_mib", "{:.2f}"),
                ("peak memory MiB", "peak_memory_mib", "{:,.0f}"), ("device-hours", "device_hours", "{:.4f}"),
                ("images seen", "images_seen", "{:,.0f}"), ("fwd / step", "forward_passes_per_step", "{:g}"),
                ("teacher fwd / step", "teacher_forward_passes_per_step", "{:g}"),
                ("bwd / step", "backward_passes_per_step", "{:g}"))


def values(results: dict, label: str, key: str) -> np.ndarray:
    seeds = results.get(label, {})
    return np.array([seeds[s][key] for s in sorted(seeds) if seeds[s].get(key) is not None], dtype=float)


def cell(numbers: np.ndarray, digits: int = 3) -> str:
    if not len(numbers):
        return "–"
    spread = f" ± {numbers.std(ddof=1):.{digits}f}" if len(numbers) > 1 else ""
    return f"{numbers.mean():.{digits}f}{spread}"


def table(results: dict) -> str:
    starts = [label for label in results if is_start(label)]
    order = [*starts, JOINT_ROW] + [label for label in results if label not in (*starts, JOINT_ROW)]
    lines = ["| method | seeds | " + " | ".join(title for _, title in COLUMNS) + " | params |",
             "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for label in (label for label in order if label in results):
        params = values(results, label, "params")
        lines.append(f"| `{label}` | {len(results[label])} | " + " | ".join(
            cell(values(results, label, key), 1 if key == "s_task" else 3) for key, _ in COLUMNS)
            + f" | {f'{int(params.max()):,}' if len(params) else '–'} |")
    return "\n".join(lines)


def cost_table(results: dict) -> str:
    """The rows' costs, mean over their seeds (what a row keeps and passes per step do not vary)."""
    lines = ["| method | " + " | ".join(title for title, _, _ in COST_COLUMNS) + " |",
             "|---|" + "---|" * len(COST_COLUMNS)]
    for label in (label for label in results if not is_start(label)):
        means = [values(results, label, key) for _, key, _ in COST_COLUMNS]
        lines.append(f"| `{label}` | " + " | ".join(
            form.format(v.mean()) if len(v) else "–" for v, (_, _, form) in zip(means, COST_COLUMNS)) + " |")
    return "\n".join(lines)


def paired(results: dict, high: str, low: str, key: str, low_key: str | None = None) -> tuple[bool, str]:
    """``high``'s ``key`` above ``low``'s on every seed of both, by more than twice the larger
    seed standard deviation."""
    a, b = values(results, high, key), values(results, low, low_key or key)
    missing = [label for label, numbers in ((high, a), (low, b)) if not len(numbers)]
    if missing:
        return None, f"not run: {', '.join(missing)}"
    if len(a) != len(b) or len(a) < 2:
        return None, f"not comparable: {len(a)} and {len(b)} seeds (the same 2 or more on both sides)"
    difference, margin = a.mean() - b.mean(), 2 * max(a.std(ddof=1), b.std(ddof=1))
    every_seed = bool((a > b).all())
    return bool(every_seed and difference > margin), (
        f"{cell(a)} against {cell(b)}: difference {difference:+.3f}, 2 sd {margin:.3f}, "
        f"higher on {int((a > b).sum())} of {len(a)} seeds")


def within(results: dict, label: str, key: str, low: float, high: float) -> tuple[bool | None, str]:
    numbers = values(results, label, key)
    if not len(numbers):
        return None, f"not run: {label}"
    inside = bool(((numbers >= low) & (numbers <= high)).all())
    return inside, f"per seed {', '.join(f'{v:.3f}' for v in numbers)} (within [{low}, {high}])"


def every_method_learns(results: dict) -> tuple[bool | None, str]:
    """Mean learning accuracy minus twice its seed sd above chance, for every method."""
    below = []
    for label in results:
        if is_start(label):
            continue
        numbers = values(results, label, "learning")
        if len(numbers) < 2:
            continue  # a spread needs two seeds
        if numbers.mean() - 2 * numbers.std(ddof=1) <= CHANCE:
            below.append(f"{label} {cell(numbers)}")
    checked = sum(len(values(results, label, "learning")) >= 2 for label in results if not is_start(label))
    if not checked:
        return None, "not run: no method row with 2+ seeds"
    return not below, "below: " + "; ".join(below) if below else f"all {checked} rows of 2+ seeds above {CHANCE}"


def above_all(results: dict, best: str, key: str, excluded: Sequence[str]) -> tuple[bool, str]:
    """``best`` above every other row (not ``excluded``) by the paired margin."""
    if best not in results:
        return None, f"not run: {best}"
    failing, skipped = [], []
    for label in results:
        if label in (best, *excluded) or is_start(label):
            continue
        holds, why = paired(results, best, label, key)
        if holds is False:
            failing.append(f"{label}: {why}")
        elif holds is None:
            skipped.append(label)
    if len(skipped) == len(results) - 1 - sum(map(is_start, results)) - sum(x in results for x in excluded):
        return None, f"not comparable with any row: {', '.join(skipped)}"
    left = f" (not comparable: {', '.join(skipped)})" if skipped else ""
    return not failing, ("; ".join(failing) or "above every other method") + left


CLAIMS: tuple[tuple[str, Callable[[dict], tuple[bool, str]]], ...] = (
    ("start model: digits zero-shot (UT-Acc over all 10 digits) within 0.25-0.75",
     lambda r: within(r, START_ROW, "digits", 0.25, 0.75)),
    ("start model: shapes-world zero-shot >= 0.85", lambda r: within(r, START_ROW, "zs", 0.85, 1.0)),
    # What a session's loss trains: its digits among themselves (the paper's MST masks the
    # cross-entropy to the session's classes, CL-CLIP methods/ft.py text_fmask).
    ("FT learns every session: its digits among themselves >= 0.9 on each",
     lambda r: within(r, "ft", "min_own", 0.9, 1.0)),
    ("FT learns every session among all ten digits: >= 0.9 on each",
     lambda r: within(r, "ft", "min_learning", 0.9, 1.0)),
    ("every method learns: mean learning accuracy - 2 sd above chance (0.1)", every_method_learns),
    ("FT forgets: the start model's zero-shot above FT's final",
     lambda r: paired(r, START_ROW, "ft", "zs")),
    ("VR-LwF keeps more zero-shot than FT", lambda r: paired(r, "vr_lwf (alpha=1.0)", "ft", "zs")),
    ("VR-LwF keeps more zero-shot than LwF", lambda r: paired(r, "vr_lwf (alpha=1.0)", "lwf (alpha=1.0)", "zs")),
    ("VR-LwF's A-Acc above FT's", lambda r: paired(r, "vr_lwf (alpha=1.0)", "ft", "a_acc")),
    ("vr_lwf_zscl keeps more zero-shot than vr_lwf",
     lambda r: paired(r, "vr_lwf_zscl (alpha=1.0)", "vr_lwf (alpha=1.0)", "zs")),
    ("replay wins: GEM ends with the best digits accuracy of the sequential methods",
     lambda r: above_all(r, "gem", "digits", (JOINT_ROW,))),
    ("joint training bounds every method's final digits accuracy from above",
     lambda r: above_all(r, JOINT_ROW, "digits", ())),
)


def check(results: dict) -> list[dict[str, Any]]:
    outcomes = []
    for claim, test in CLAIMS:
        holds, why = test(results)
        outcomes.append({"claim": claim, "pass": holds, "detail": why})
        print(f"{VERDICTS[holds]}  {claim}: {why}")
    return outcomes


VERDICTS = {True: "PASS", False: "FAIL", None: "NOT RUN"}  # None: a row the claim reads was not run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), help="sweep variants to run")
    parser.add_argument("--out", type=Path, default=PROJECT / "data" / "09_benchmarks" / "embedded_claims")
    parser.add_argument("--check-only", action="store_true", help="check the runs already made")
    parser.add_argument("--also", nargs="+", type=Path, default=[],
                        help="more output folders (of other --out runs) whose runs join the table; "
                             "a row and seed run in several folders is taken from the last")
    args = parser.parse_args(argv)
    if not args.check_only:
        run_all(args.out, args.seeds, args.jobs, args.methods)
    results = {label: {seed: row for seed, row in seeds.items() if seed in args.seeds}
               for label, seeds in gather(args.out, *args.also).items()}
    results = {label: seeds for label, seeds in results.items() if seeds}
    print(table(results))
    print()
    print(cost_table(results))
    print()
    outcomes = check(results)
    checked = [o for o in outcomes if o["pass"] is not None]
    print(f"{sum(o['pass'] for o in checked)} of {len(checked)} claims checked pass "
          f"({len(outcomes) - len(checked)} not run)")
    (args.out / "claims.json").write_text(json.dumps({"results": results, "claims": outcomes}, indent=2))


if __name__ == "__main__":
    main()
