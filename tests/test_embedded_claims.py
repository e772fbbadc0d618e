"""benchmarks/embedded_claims.py: the claims about the embedded default pass only with a margin
larger than the seed spread, on every seed, and fail otherwise (the instrument can fail)."""

from __future__ import annotations


import pytest

from project_helpers import benchmark_script


@pytest.fixture(scope="module")
def claims():
    return benchmark_script("embedded_claims")


def results(**rows: list[float]) -> dict:
    """label -> seed -> {"zs": value}, seeds 0.. in order."""
    return {label: {seed: {"zs": value, "learning": value} for seed, value in enumerate(values)}
            for label, values in rows.items()}


def test_a_difference_passes_only_beyond_twice_the_seed_spread_on_every_seed(claims):
    clear = results(a=[0.90, 0.91, 0.92], b=[0.50, 0.52, 0.51])
    assert claims.paired(clear, "a", "b", "zs")[0]
    within_noise = results(a=[0.90, 0.60, 0.92], b=[0.50, 0.80, 0.51])  # a higher on average only
    holds, why = claims.paired(within_noise, "a", "b", "zs")
    assert not holds and "higher on 2 of 3 seeds" in why
    small = results(a=[0.52, 0.62, 0.42], b=[0.50, 0.60, 0.40])  # higher on every seed, by less than 2 sd
    assert not claims.paired(small, "a", "b", "zs")[0]
    assert not claims.paired(results(a=[0.9, 0.9], b=[0.1]), "a", "b", "zs")[0]  # unequal seeds


def test_ranges_and_learning_above_chance(claims):
    assert claims.within(results(s=[0.3, 0.7]), "s", "zs", 0.25, 0.75)[0]
    assert not claims.within(results(s=[0.3, 0.8]), "s", "zs", 0.25, 0.75)[0]
    learnt = results(ft=[0.8, 0.85, 0.9], moe=[0.12, 0.4, 0.1])
    holds, why = claims.every_method_learns(learnt)
    assert not holds and why.startswith("below: moe")


def test_the_table_names_every_row_with_its_seeds(claims):
    rows = results(ft=[0.5, 0.7])
    rows[claims.START_ROW] = {0: {"zs": 0.99}, 1: {"zs": 0.98}}
    table = claims.table(rows).splitlines()
    assert table[2].startswith(f"| `{claims.START_ROW}` | 2 | ") and "0.985 ± 0.007" in table[2]
    assert table[3].startswith("| `ft` | 2 | ") and "0.600 ± 0.141" in table[3]


def test_a_claim_on_a_row_not_run_says_so(claims):
    assert claims.paired(results(a=[0.9, 0.8]), "a", "b", "zs") == (None, "not run: b")
    assert claims.above_all(results(a=[0.9, 0.8]), "gem", "zs", ())[0] is None


def test_ft_learns_every_session_is_checked_among_its_own_digits_and_among_all_ten(claims):
    rows = {"ft": {0: {"min_own": 0.95, "min_learning": 0.3}, 1: {"min_own": 0.97, "min_learning": 0.4}}}
    verdicts = [test(rows)[0] for claim, test in claims.CLAIMS if claim.startswith("FT learns every session")]
    assert verdicts == [True, False]


def test_the_cost_table_shows_each_rows_mean_cost(claims):
    rows = {"ft": {0: {"stored_parameters": 100.0, "device_hours": 0.001}, 1: {"stored_parameters": 100.0,
                                                                               "device_hours": 0.003}}}
    line = claims.cost_table(rows).splitlines()[2]
    assert line.startswith("| `ft` | 100 | – | – | 0.0020 |")


def test_a_method_whose_sessions_do_not_move_the_model_gains_nothing(claims):
    import pandas as pd

    still = pd.DataFrame({"after": ["pretrained", "task_1", "task_2"], "task_1": [0.4, 0.4, 0.4],
                          "task_2": [0.5, 0.5, 0.5]})
    learnt = still.assign(task_1=[0.4, 0.9, 0.6], task_2=[0.5, 0.5, 0.8])
    assert claims.learning_gain(still) == 0.0
    assert claims.learning_gain(learnt) == pytest.approx((0.5 + 0.3) / 2)


def test_the_joint_bound_starts_from_the_start_model_every_variant_shares(claims):
    glyphs = "data_preparation.glyphs.count=6000"
    pipeline, plain = claims.JOINT
    assert claims.joint_run(["ft", "lwf:continual_learning.alpha=0.5"]) == claims.JOINT
    assert claims.joint_run([f"ft:{glyphs}", f"lwf:continual_learning.alpha=0.5,{glyphs}"]) == (
        pipeline, f"{plain},{glyphs}")
    assert claims.joint_run(["ft", f"ft:{glyphs}"]) == claims.JOINT  # two start models: the plain one


def test_an_ft_variant_from_another_start_model_brings_its_own_start_row_and_claims_on_ft_are_not_run(claims):
    rows = results(**{"ft (glyphs.count=6000)": [0.7, 0.72], "start model of ft (glyphs.count=6000)": [0.5, 0.52]})
    assert claims.within(rows, "ft", "zs", 0.9, 1.0) == (None, "not run: ft")
    assert claims.every_method_learns(rows)[1] == "all 1 rows of 2+ seeds above 0.1"  # the start row is no method
    assert claims.table(rows).splitlines()[2].startswith("| `start model of ft (glyphs.count=6000)` | 2 |")
    assert claims.every_method_learns({}) == (None, "not run: no method row with 2+ seeds")
