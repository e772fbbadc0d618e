"""Recipes: one precedence for every setting, `kedro recipe` to show it, and every benchmark x
method default equal to its published recipe (``upstream_recipes.py``, read from the authors'
code)."""

from __future__ import annotations

import json
import warnings

import pytest
from click.testing import CliRunner

from clip_continual.runtime.benchmarks import BENCHMARKS, Benchmark, EvaluationSuite, Task
from clip_continual.runtime.recipe import RUNTIME_OVERRIDES, resolve_recipe, resolve_task
from project_helpers import REPO_ROOT
from upstream_recipes import UPSTREAM, UPSTREAM_5SHOT

PAIRS = [(benchmark, method) for benchmark, methods in UPSTREAM.items() for method in methods]


def _parameters(env: str = "base") -> dict:
    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env=env,
                                      merge_strategy={"parameters": "soft"})["parameters"])


@pytest.fixture(scope="module")
def base_params():
    return _parameters()


def _mismatches(recipe, expected: dict[str, tuple]) -> list[str]:
    """Each setting of ``expected`` (``<task>/<setting>`` for one task) against every task."""
    wrong = []
    for task in recipe.tasks:
        for key, (value, citation) in expected.items():
            owner, _, setting = key.rpartition("/")
            if owner and owner != task.task or not owner and f"{task.task}/{key}" in expected:
                continue
            got = task.settings.get(setting, "<absent>")
            if got != value and not (isinstance(value, float) and got == pytest.approx(value)):
                wrong.append(f"{task.task}: {setting} = {got!r}, upstream {value!r} ({citation}; ours from "
                             f"{task.sources.get(setting)})")
    return wrong


@pytest.mark.parametrize(("benchmark_name", "method"), PAIRS)
def test_the_default_recipe_is_the_published_one(base_params, benchmark_name, method):
    recipe = resolve_recipe(BENCHMARKS[benchmark_name], base_params, method)
    assert not _mismatches(recipe, UPSTREAM[benchmark_name][method])
    assert recipe.upstream, "the benchmark's block names the scripts it follows"
    for task in recipe.tasks:
        assert task.training_config().build_method().name == method


@pytest.mark.parametrize("benchmark_name", ["mtil_order1", "mtil_order2"])
def test_the_five_shot_environment_runs_moe_adapters_few_shot_recipe(benchmark_name):
    params = _parameters("mtil_5shot")
    recipe = resolve_recipe(BENCHMARKS[benchmark_name], params, "moe_adapters")
    assert not _mismatches(recipe, UPSTREAM_5SHOT["moe_adapters"])
    zscl = resolve_recipe(BENCHMARKS[benchmark_name], params, "zscl").tasks[0].settings
    assert (zscl["few_shot"], zscl["training.steps"]) == (5, 1000)  # no few-shot recipe of its own


@pytest.mark.parametrize("method", ["condu", "condu_lora"])
def test_the_five_shot_environment_runs_condu_few_shot_recipes_on_order_one(method):
    recipe = resolve_recipe(BENCHMARKS["mtil_order1"], _parameters("mtil_5shot"), method)
    assert not _mismatches(recipe, UPSTREAM_5SHOT[method])


# --- one precedence, each level --------------------------------------------------------------

_BENCH = Benchmark("toy", (Task("a", "train", (0,)), Task("b", "train", (1,))), EvaluationSuite(),
                   default_teacher="previous", description="two tasks", params="toy")


def _settings(block: dict, overrides: dict | None = None, method: str = "zscl") -> dict[str, dict]:
    params = {"method": method, "toy": {"seed": 3, "continual_learning": block}}
    return {t.task: t for t in resolve_recipe(_BENCH, params, overrides=overrides).tasks}


def test_each_level_wins_over_the_one_below():
    block = {"training": {"lr": 1.0, "steps": 5}, "method_options": {"temperature": 3.0},
             "methods": {"zscl": {"temperature": 4.0, "l2": 0.5, "training": {"lr": 2.0},
                                  "task_training": {"b": {"lr": 4.0}}}},
             "task_training": {"a": {"lr": 3.0}, "b": {"lr": 3.5, "steps": 7}}}
    tasks = _settings(block)
    a, b = tasks["a"], tasks["b"]
    assert a.settings["method.image_loss"] == 1.0 and "ZeroShotContinualLearning" in a.sources["method.image_loss"]
    assert a.settings["training.eps"] == 1e-8 and "TrainingConfig" in a.sources["training.eps"]  # shared defaults
    assert a.settings["method.temperature"] == 4.0  # per-method block over the block's method_options
    assert a.sources["method.temperature"] == "toy.continual_learning.methods.zscl.temperature"
    assert a.settings["training.lr"] == 3.0  # a task entry over the per-method block
    assert (b.settings["training.lr"], b.settings["training.steps"]) == (4.0, 7)  # per-method task entry
    assert b.sources["training.lr"] == "toy.continual_learning.methods.zscl.task_training.b.lr"
    assert a.settings["training.steps"] == 5 and a.settings["seed"] == 3
    no_tasks = _settings({**block, "task_training": {}, "methods": {"zscl": {"training": {"lr": 2.0}}}})
    assert no_tasks["a"].settings["training.lr"] == 2.0  # the per-method block over the block
    assert no_tasks["a"].settings["method.temperature"] == 3.0  # the block's method_options over the default


def test_the_command_line_wins_over_every_level_and_replaces_nothing_else():
    block = {"training": {"lr": 1.0, "steps": 5},
             "methods": {"zscl": {"training": {"lr": 2.0}}}, "task_training": {"a": {"lr": 3.0}}}
    overrides = {"toy": {"continual_learning": {"training": {"lr": 9.0}}}}
    tasks = _settings({**block, "training": {**block["training"], "lr": 9.0}}, overrides)
    for task in tasks.values():
        assert task.settings["training.lr"] == 9.0
        assert task.sources["training.lr"] == "--params toy.continual_learning.training.lr"
        assert task.settings["training.steps"] == 5  # its sibling stays
    other = _settings(block, {"toy.continual_learning.methods.ewc.penalty": 1.0})  # another method's
    assert "method.penalty" not in other["a"].settings and other["a"].settings["training.lr"] == 3.0


def test_null_keeps_the_methods_default_but_is_a_value_for_training():
    tasks = _settings({"alpha": None, "training": {"steps": None, "epochs": 2},
                       "methods": {"vr_lwf": {"alpha": None}}}, method="vr_lwf")
    settings = tasks["a"].settings
    assert settings["alpha"] == 0.5 and "VocabularyReplayLwF" in tasks["a"].sources["alpha"]
    assert settings["training.steps"] is None and settings["training.epochs"] == 2
    assert settings["teacher"] == "previous" and "auto" in tasks["a"].sources["teacher"]


def test_a_misplaced_setting_is_refused_with_its_name(base_params):
    from clip_continual.training.config import TrainingConfigError

    task = resolve_task("zscl", {"training": {"lrr": 1.0}}, "continual_learning", "t", seed=0,
                        seed_source="seed", default_teacher="previous")
    with pytest.raises(TrainingConfigError, match=r"unknown training parameter\(s\) \['lrr'\]"):
        task.training_config()


def test_label_smoothing_reaches_every_method_zscl_runs_on_mtil(base_params):
    """The bug this precedence fixed: a method's options replaced the benchmark's smoothing."""
    for method in ("ft", "lwf", "vr_lwf", "ewc", "agem", "gem", "icarl", "wise_ft", "imm", "geodl", "rkr"):
        (task, *_) = resolve_recipe(BENCHMARKS["mtil_order1"], base_params, method).tasks
        assert task.training_config().build_method().label_smoothing == 0.2, method


# --- kedro recipe ----------------------------------------------------------------------------

def _recipe_command(monkeypatch, *args: str):
    from clip_continual.cli import cli

    monkeypatch.chdir(REPO_ROOT)
    return CliRunner().invoke(cli, ["recipe", *args], catch_exceptions=False)


def test_kedro_recipe_prints_each_value_with_its_file(monkeypatch, tmp_path):
    result = _recipe_command(monkeypatch, "--pipeline", "mtil_order1", "--method", "zscl", "--json",
                             "--params", "mtil_order1.continual_learning.training.lr=0.001",
                             "--output", str(tmp_path / "recipe.json"))
    assert result.exit_code == 0, result.output
    shown = json.loads((tmp_path / "recipe.json").read_text())
    assert (shown["benchmark"], shown["method"]) == ("mtil_order1", "zscl")
    aircraft = shown["tasks"][0]
    assert aircraft["task"] == "aircraft"
    assert aircraft["settings"]["training.lr"] == 0.001  # --params beat the per-task rate
    assert aircraft["sources"]["training.lr"] == "--params mtil_order1.continual_learning.training.lr"
    assert aircraft["settings"]["method.average_every"] == 100
    assert aircraft["sources"]["method.average_every"] == (
        "mtil_order1.continual_learning.methods.zscl.average_every (conf/base/parameters_mtil_order1.yml)")
    text = _recipe_command(monkeypatch, "--pipeline", "mtil_order1", "--method", "zscl").output
    assert "follows: ZSCL mtil/scripts/ZSCL.sh" in text and "Task mnist:" in text


def test_kedro_recipe_names_a_bad_setting(monkeypatch):
    result = CliRunner().invoke(__import__("clip_continual.cli", fromlist=["cli"]).cli,
                                ["recipe", "--pipeline", "nope"])
    assert result.exit_code != 0 and "no benchmark 'nope'" in result.output
    bad = _recipe_command(monkeypatch, "--method", "zscl", "--params", "continual_learning.training.lr=-1")
    assert bad.exit_code == 1 and "lr must be a positive, finite number" in bad.output


def test_the_runtime_overrides_reach_the_parameters():
    from clip_continual.settings import ProjectConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = ProjectConfigLoader(str(REPO_ROOT / "conf"), base_env="base", default_run_env="base",
                                     runtime_params={"method": "ft"}, merge_strategy={"parameters": "soft"})
        assert loader["parameters"][RUNTIME_OVERRIDES] == {"method": "ft"}


@pytest.mark.parametrize("method", ["moe_adapters", "rkr", "lora", "condu_lora"])
def test_frozen_backbone_methods_train_at_their_own_rate_on_the_embedded_default(base_params, method):
    """Why moe_adapters and rkr learnt at chance on the embedded default, and lora stayed where it
    started: their modules start as the identity (MoE experts: zero up-projection, output x 0.1;
    RKR: zero low-rank term; LoRA: zero up-projection), so at the rate every other method shares
    there (Adam 1e-4, 50 steps) they hardly moved and the model stayed the start model. Each
    takes its own rate there (MoE-Adapters' 1e-3, ConDU's LoRA rate for MNIST, 1e-3)."""
    shared = resolve_recipe(BENCHMARKS["digits_mst"], base_params, "ft").tasks[0].settings["training.lr"]
    (task, *_) = resolve_recipe(BENCHMARKS["digits_mst"], base_params, method).tasks
    assert task.settings["training.lr"] >= 10 * shared
    assert task.sources["training.lr"] == f"continual_learning.methods.{method}.training.lr"
