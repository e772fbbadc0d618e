"""benchmarks/gpu_check.py at ``--scale small``: the full check's code paths on CPU in seconds,
so that the GPU check keeps working between the times it runs on a GPU."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from clip_continual.runtime.schema import check_parameters
from project_helpers import REPO_ROOT, benchmark_script


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_script("gpu_check")


def test_the_small_check_measures_every_switch_and_writes_one_report(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    # The kedro_run stage alone takes longer than this test may; its parameters are checked below.
    returned = gpu_check.main(["--scale", "small", "--stages", "training,evaluation,loader", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    runs = {(row["method"], row["switch"]) for row in report["training"]}
    switches = ["baseline", "tf32", "compile", "channels_last", "foreach", "activation_checkpointing"]
    assert runs == {(method, switch) for method in ("ft", "vr_lwf") for switch in switches}
    for row in report["training"]:
        assert row["ms_per_step"] > 0 and math.isfinite(row["images_per_s"]) and row["peak_memory_mib"] > 0
        assert row["ratio"] == 1.0 or row["switch"] != "baseline"
    assert report["evaluation"]["images_per_s"] > 0 and report["loader"]["images_per_s"] > 0
    estimate = report["mtil_order1"]
    for key in ("ft_baseline", "ft_fastest", "vr_lwf_baseline", "vr_lwf_fastest"):
        assert estimate[key]["total_h"] == pytest.approx(estimate[key]["training_h"] + estimate["evaluation_h"])
    assert estimate["ft_fastest"]["training_h"] <= estimate["ft_baseline"]["training_h"]


def _merged(defaults: dict, overrides: dict) -> dict:
    merged = dict(defaults)
    for key, value in overrides.items():
        merged[key] = _merged(defaults.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def test_the_kedro_run_stage_sets_only_known_parameters(gpu_check):
    from kedro.config import OmegaConfigLoader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = dict(OmegaConfigLoader(str(REPO_ROOT / "conf"), base_env="base",
                                          default_run_env="base")["parameters"])
    for scale in gpu_check.SCALES.values():
        check_parameters(_merged(defaults, scale.kedro_parameters), defaults)
    with pytest.raises(ValueError, match="steps"):  # the check can fail
        check_parameters(_merged(defaults, {"continual_learning": {"training": {"steps": "many"}}}), defaults)


def test_an_unknown_stage_is_refused(gpu_check, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--scale", "small", "--stages", "trainng", "--out", str(tmp_path / "x.json")])
