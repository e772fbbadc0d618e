"""What the user reads is the settings in force: run names and ``recipe.*`` params per benchmark,
sweeps that set the seed (and any override) where the benchmark reads it and check every run
first, `compare`'s grouping by variant and trained seed, and run keys that ignore the worker
count and the device. Cheap: no training, no Kedro run, no MLflow store."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import pytest

from clip_continual.methods import method_class
from clip_continual.runtime import sweep
from clip_continual.runtime.benchmarks import BENCHMARKS
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, block_path_of, lookup, resolve_recipe, seed_path_of
from clip_continual.runtime.results import choose_results, log_grouping, trained_seed
from clip_continual.runtime.run_key import compute_run_key, run_name_of
from clip_continual.runtime.tracking import variant_label, variant_overrides
from project_helpers import REPO_ROOT


@pytest.fixture(scope="module")
def parameters():
    """(the project's parameters, those of conf/base alone)."""
    return sweep.sweep_parameters(REPO_ROOT, "base")


def _alpha_in_conf(params, benchmark, method):
    """The alpha conf/ gives ``method`` on ``benchmark``, read without the recipe code."""
    block = block_path_of(benchmark)
    for path in (f"{block}.methods.{method}.alpha", f"{block}.alpha"):
        if lookup(params, path) is not None:
            return lookup(params, path)
    return inspect.signature(method_class(method).__init__).parameters["alpha"].default


# --- names and params per benchmark -------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_run_name_and_logged_params_are_the_benchmarks_own(parameters, name):
    _, base = parameters
    benchmark = BENCHMARKS[name]
    alpha, seed = _alpha_in_conf(base, benchmark, "lwf"), lookup(base, seed_path_of(benchmark))
    recipe = resolve_recipe(benchmark, base, "lwf")
    logged = recipe.params_to_log()
    assert (logged["benchmark"], logged["method"], logged["alpha"], logged["seed"]) == (name, "lwf", alpha, seed)
    assert run_name_of(recipe, [name], base) == f"lwf alpha={alpha:g} seed={seed} on {name}"
    # What tells runs apart comes first and fits MLflow's run-name column (about 22 characters).
    assert len(run_name_of(resolve_recipe(benchmark, base, "moe_adapters"), [name], base).partition(" on ")[0]) <= 22
    assert variant_label("lwf", logged["alpha"], {}) == f"lwf (alpha={alpha})"


def test_the_issues_examples_are_labelled_as_they_train(parameters):
    _, base = parameters
    for name, alpha, seed in (("eurosat_mst", 2.0, 10), ("coco_mst", 0.5, 10)):
        recipe = resolve_recipe(BENCHMARKS[name], base, "lwf")
        assert run_name_of(recipe, [name], base) == f"lwf alpha={alpha:g} seed={seed} on {name}"
        assert {k: recipe.params_to_log()[k] for k in ("alpha", "seed")} == {"alpha": alpha, "seed": seed}


# --- sweeps -------------------------------------------------------------------------------------

def test_a_sweep_sets_the_seed_and_overrides_where_the_benchmark_reads_them(parameters):
    project, base = parameters
    eurosat = BENCHMARKS["eurosat_mst"]
    variants = [sweep.Variant.parse("vr_lwf:continual_learning.alpha=0.5"), sweep.Variant("ft")]
    runs = sweep.planned_runs(variants, [3, 4], sweep.parse_params("continual_learning.training.steps=2"),
                              eurosat, base)
    assert runs[0] == {"method": "vr_lwf", "eurosat_mst": {
        "seed": 3, "continual_learning": {"alpha": 0.5, "training": {"steps": 2}}}}
    for run, (method, seed) in zip(runs, [("vr_lwf", 3), ("ft", 3), ("vr_lwf", 4), ("ft", 4)]):
        params = {**sweep.merge_params(project, run), RUNTIME_OVERRIDES: run}
        recipe = resolve_recipe(eurosat, params, overrides=run)
        assert {t.settings["seed"] for t in recipe.tasks} == {seed}
        assert {t.settings["training.steps"] for t in recipe.tasks} == {2}
        overrides = variant_overrides(run, base, method)  # what the tracking hook names a variant by
        alpha = " alpha=0.5" if method == "vr_lwf" else ""
        assert run_name_of(recipe, ["eurosat_mst"], params, overrides) == (
            f"{method}{alpha} eurosat_mst.steps=2 seed={seed} on eurosat_mst")  # the setting the sweep changed
    # The embedded default reads the top-level seed.
    assert sweep.planned_runs([sweep.Variant("ft")], [1], None, BENCHMARKS["digits_mst"], base) == [
        {"method": "ft", "seed": 1}]


def test_a_run_from_another_start_model_is_a_variant_of_its_own(parameters):
    _, base = parameters
    run = {"method": "ft", "data_preparation": {"glyphs": {"count": 6000}},
           "pretraining": {"steps": 10, "progress": False}, "model": {"cache_dir": "/tmp/weights"}}
    overrides = variant_overrides(run, base, "ft")
    assert overrides == {"glyphs.count": 6000, "pretraining.steps": 10}  # where it is cached is not one
    assert variant_label("ft", None, overrides) == "ft (glyphs.count=6000, pretraining.steps=10)"
    recipe = resolve_recipe(BENCHMARKS["digits_mst"], base, "ft")
    assert run_name_of(recipe, ["digits_mst"], base, overrides) == (
        f"ft glyphs.count=6000 pretraining.steps=10 seed={base['seed']} on digits_mst")


def test_every_sweep_run_is_checked_before_the_first_starts(parameters, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(sweep, "run_sweep", lambda *args: started.append(args))
    monkeypatch.setattr(sweep, "sweep_parameters", lambda path, env: parameters)  # read once, by the fixture
    command = ["--methods", "ft", "lwf:continual_learning.training.lrr=0.1", "--seeds", "0",
               "--pipeline", "mtil_order1", "--project-path", str(REPO_ROOT), "--env", "base"]
    with pytest.raises(SystemExit):
        sweep.main(command)
    error = capsys.readouterr().err
    assert "sweep run 2/2 (method=lwf mtil_order1.seed=0)" in error
    assert "'mtil_order1.continual_learning.training.lrr'" in error and not started
    project, base = parameters
    runs = sweep.planned_runs([sweep.Variant.parse("lwf:continual_learning.teacher=nobody")], [0], None,
                              BENCHMARKS["coco_mst"], base)
    with pytest.raises(sweep.SweepError, match=r"run 1/1 .*unknown teacher 'nobody'"):
        sweep.check_runs(runs, project, base, BENCHMARKS["coco_mst"])
    sweep.main(command[:2] + command[3:])  # without the typo: checked, then run
    assert len(started) == 1 and started[0][1][0]["mtil_order1"]["seed"] == 0


# --- compare: rows by variant and the seed a run trained with ------------------------------------

def _run(run_id, variant="vr_lwf (alpha=2.0)", trained="10", status="FINISHED", benchmark="eurosat_mst",
         params=None):
    params = {**({"recipe.seed": trained} if trained is not None else {}), **(params or {})}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, run_name=f"name-{run_id}", status=status),
        data=SimpleNamespace(tags={"variant": variant, "benchmark": benchmark, "method": variant.split()[0]},
                             params=params, metrics={}))


class _Client:
    """Every run logged steps 0..5 but ``incomplete``."""

    def __init__(self, incomplete=()):
        self.incomplete = set(incomplete)

    def get_metric_history(self, run_id, name):
        return [SimpleNamespace(step=k) for k in range(3 if run_id in self.incomplete else 6)]


def test_compare_groups_by_variant_and_trained_seed_and_says_what_it_left_out(caplog):
    runs = [_run("new"), _run("failed", trained="11", status="FAILED"), _run("short", trained="9"),
            _run("old"), _run("s11", trained="11"), _run("ft", variant="ft"),
            _run("legacy", trained=None, params={"eurosat_mst.seed": "9", "seed": "0"}),  # before recipe.seed
            _run("unknown", trained=None, params={"seed": "1"})]
    kept, left_out = choose_results(_Client(incomplete={"short"}), runs)
    assert {key: run.info.run_id for key, run in kept.items()} == {
        ("vr_lwf (alpha=2.0)", "10"): "new", ("vr_lwf (alpha=2.0)", "11"): "s11",
        ("ft", "10"): "ft", ("vr_lwf (alpha=2.0)", "9"): "legacy"}
    reasons = {run.info.run_id: reason for run, reason in left_out}
    assert "FAILED" in reasons["failed"] and "incomplete" in reasons["short"]
    assert reasons["old"] == "older duplicate of vr_lwf (alpha=2.0), seed 10: run new is the newer one"
    assert "does not say which seed" in reasons["unknown"]
    with caplog.at_level(logging.INFO, logger="clip_continual.runtime.results"):
        log_grouping(kept, left_out)
    assert ("compare: row 'vr_lwf (alpha=2.0)' averages 3 run(s): seed 9: legacy (name-legacy); "
            "seed 10: new (name-new); seed 11: s11 (name-s11)") in caplog.messages
    assert any(m.startswith("compare: left out run old (name-old): older duplicate") for m in caplog.messages)


def test_the_seed_a_run_trained_with_is_its_benchmarks():
    assert trained_seed(_run("a", trained="3", params={"seed": "0"})) == "3"
    assert trained_seed(_run("b", trained=None, params={"eurosat_mst.seed": "10", "seed": "0"})) == "10"
    assert trained_seed(_run("c", trained=None, params={"seed": "0"})) is None  # eurosat_mst does not read it
    assert trained_seed(_run("d", trained=None, benchmark="digits_mst", params={"seed": "2"})) == "2"


# --- run keys: the science, not the workers or the device ---------------------------------------

@pytest.mark.parametrize("name", ["digits_mst", "eurosat_mst", "mtil_order1"])
def test_the_run_key_ignores_the_worker_count_and_the_device(parameters, name):
    _, base = parameters
    block = block_path_of(BENCHMARKS[name])
    one_worker = compute_run_key(base)
    changes = [f"{block}.training.distributed.workers=2", f"{block}.training.distributed.backend=torch",
               f"{block}.training.device=cpu", "continual_learning.training.distributed.use_gpu=true",
               f"{block}.methods.lwf.training.distributed.workers=4",
               # speed switches that change the rounding only
               f"{block}.training.compile=true", f"{block}.training.channels_last=true",
               f"{block}.training.fused=false", f"{block}.training.activation_checkpointing=true"]
    if BENCHMARKS[name].params:
        changes += [f"{name}.loader.pin_memory=false", f"{name}.evaluation.device=cuda"]
    for change in changes:
        assert compute_run_key(sweep.merge_params(base, sweep.parse_params(change))) == one_worker, change
    # What a run computes still changes it.
    assert compute_run_key(sweep.merge_params(base, sweep.parse_params(f"{block}.training.lr=0.5"))) != one_worker
    assert compute_run_key(sweep.merge_params(base, sweep.parse_params(f"{block}.training.tf32=true"))) != one_worker
    assert compute_run_key(sweep.merge_params(base, sweep.parse_params(f"{seed_path_of(BENCHMARKS[name])}=7"))) \
        != one_worker
