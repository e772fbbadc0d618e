"""DIKI, RAIL, ConDU (full and LoRA), DPW and LoRA through the MTIL pipeline's nodes on a short
sequence of the MTIL fixture (DTD then MNIST, one step each), under every protocol each defines:
MTIL with the task id, task-agnostic MTIL, ODCL-CIL, X-TAIL's pooled label space.

The chain is ``mtil_order1``'s own node functions on two of its datasets, run by a Kedro runner on
an in-memory catalog (a ``kedro run`` session costs 5-10 s here, one per method and protocol far
more than this file may take). Each method trains once; the other protocols evaluate the same
trained models again (training does not depend on the protocol). A ``kedro run`` that a
protocol refuses stops before its first node: one such run is the last test.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

import mtil_fixtures as fx
from clip_continual.data.torchvision_sets import load_split
from clip_continual.evaluation import sequences
from clip_continual.methods import condu
from clip_continual.model.adapters import adapter_recipe, image_classifier
from clip_continual.model.prefix_attention import GaussianTaskSelector
from clip_continual.pipelines import continual_learning, evaluation
from clip_continual.runtime.benchmarks import dataset_sequence
from project_helpers import KeptDataset, base_parameters, make_project, run_pipeline

DATASETS = ("dtd", "mnist")  # 4 and 10 classes in the fixture; mnist's images are greyscale
PROTOCOLS = {"mtil": ("given", "own"), "task_agnostic": ("hidden", "own"),
             "odcl_cil": ("hidden", "learned_tasks"), "xtail": ("hidden", "all_tasks")}
# Candidate classes of each pooled classifier the evaluation builds, step by step (0, 1, 2).
CANDIDATES = {"own": [4, 10, 4, 10, 4, 10], "learned_tasks": [4, 10, 4, 10, 14], "all_tasks": [14, 14, 14]}
# Each case: a method and its options (DPW† is dpw with reduced gates, MTIL_reduced_param.sh).
OPTIONS = {"rail": ("rail", {"hidden_dim": 64}), "lora": ("lora", {"rank": 4}), "condu": ("condu", {}),
           "condu_lora": ("condu_lora", {"rank": 4}), "diki": ("diki", {}), "dpw": ("dpw", {}),
           "dpw_reduced": ("dpw", {"gates": "reduced", "bottleneck": 4})}
SUPPORTED = {case: [p for p in PROTOCOLS if not (method == "dpw" and p == "xtail")]
             for case, (method, _) in OPTIONS.items()}


class Recorder:
    """What the evaluation did: the size of each pooled classifier, the task choices of the
    prefix methods (batch vote or DPW's per-image confidences) and ConDU's votes."""

    def __init__(self, patch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, list] = {"classes": [], "select": [], "select_confident": [], "voters": []}
        classes, select, confident, voters = (sequences.class_features, GaussianTaskSelector.select,
                                              GaussianTaskSelector.select_confident, condu.voters)
        patch.setattr(sequences, "class_features", self._wrap("classes", classes, lambda a: len(a[2])))
        patch.setattr(GaussianTaskSelector, "select", self._wrap("select", select, lambda a: len(a[0].means)))
        patch.setattr(GaussianTaskSelector, "select_confident",
                      self._wrap("select_confident", confident, lambda a: len(a[0].means)))
        patch.setattr(condu, "voters", self._wrap("voters", voters, lambda a: len(a[0])))

    def _wrap(self, key, function, seen):
        def wrapped(*args, **kwargs):
            self.calls[key].append(seen(args))
            return function(*args, **kwargs)
        return wrapped

    def take(self) -> dict[str, list]:
        taken = {key: list(values) for key, values in self.calls.items()}
        for values in self.calls.values():
            values.clear()
        return taken


def _parameters() -> dict:
    block = base_parameters()["mtil_order1"]
    block["continual_learning"]["training"].update(steps=1, batch_size=4, warmup_steps=0, precision="fp32",
                                                   progress=False, device="cpu")
    block["evaluation"].update(batch_size=64, device="cpu")
    block["loader"] = {"num_workers": 0, "persistent_workers": False}
    block["prompts"] = {"dtd": ["a photo of a {} texture."], "mnist": ['a photo of the number: "{}".']}
    return block


@pytest.fixture(scope="module")
def runs(tmp_path_factory, micro):
    """Per method, the catalog after its MTIL run and what each protocol's evaluation did."""
    root = tmp_path_factory.mktemp("raw")
    fx.write_dtd(root), fx.write_mnist(root)
    benchmark = dataset_sequence("mtil_order1", DATASETS, "MTIL order I's DTD and MNIST")
    train = continual_learning.create_pipeline(benchmark) + evaluation.create_pipeline(benchmark)
    evaluate = train.only_nodes_with_tags("evaluation") + evaluation.create_pipeline(benchmark)
    block = _parameters()
    data = {f"prepared_mtil_{key}_{split}": load_split(key, root, split) for key in DATASETS for split in ("train", "test")}
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("kedro", "clip_continual"):  # a log line per node, load and save costs seconds here
            patch.setattr(logging.getLogger(name), "level", logging.WARNING)
        recorder = Recorder(patch)
        for case, (method, options) in OPTIONS.items():
            continual = {**block["continual_learning"],
                         "methods": {**block["continual_learning"]["methods"], method: options}}
            inputs = {"params:method": method, "params:runtime_overrides": {}, "params:tracking": {"log_every": 1},
                      "mtil_order1.pretrained_model": micro.clone(), "mtil_order1.reference_set": None,
                      "mtil_order1.replay_vocabulary": None, "params:mtil_order1.continual_learning": continual,
                      **{f"params:mtil_order1.{key}": block[key] for key in ("evaluation", "loader", "prompts", "seed")},
                      **data}
            catalog = DataCatalog({name: KeptDataset(*([inputs[name]] if name in inputs else []))
                                   for name in train.datasets()})
            for number, protocol in enumerate(SUPPORTED[case]):
                identity, space = PROTOCOLS[protocol]
                catalog.save("params:mtil_order1.evaluation", {**block["evaluation"], "task_identity": identity,
                                                                "label_space": space})
                SequentialRunner().run(evaluate if number else train, catalog)
                results[case, protocol] = {"catalog": catalog, "summary": catalog.load("continual_summary"),
                                             "matrix": catalog.load("accuracy_matrix"),
                                             "last": catalog.load("mtil_order1.mnist.evaluation"), **recorder.take()}
    return results


CASES = [(case, protocol) for case, protocols in SUPPORTED.items() for protocol in protocols]


@pytest.mark.parametrize("case, protocol", CASES)
def test_each_method_runs_the_sequence_under_each_protocol(runs, case, protocol):
    run, (identity, space) = runs[case, protocol], PROTOCOLS[protocol]
    matrix = run["matrix"].set_index("after")
    assert matrix.shape == (3, 2) and list(matrix.columns) == list(DATASETS)
    assert list(matrix.index) == ["pretrained", *DATASETS]
    summary = run["summary"]
    assert (summary["task_identity"], summary["label_space"]) == (identity, space)
    assert summary["last"] == pytest.approx(matrix.to_numpy()[-1].mean())
    assert run["classes"] == CANDIDATES[space]  # the protocol's label space reached every step
    last = run["last"]
    assert (last["task_identity"], last["label_space"]) == (identity, space)
    _check_distinctive_state(case, protocol, run)


def _check_distinctive_state(case: str, protocol: str, run: dict) -> None:
    method, options = OPTIONS[case]
    catalog = run["catalog"]
    model = catalog.load("mtil_order1.mnist.model").model
    summary = catalog.load("mtil_order1.mnist.training_summary")
    if method == "rail":  # no gradient step; its ridge classifier over both datasets' classes
        assert summary["trainable_parameters"] == 0
        assert len(image_classifier(model).class_names) == 14
        assert catalog.load("mtil_order1.mnist.method_state")["ridge_inverse"].shape == (64, 64)
    elif method in ("diki", "dpw"):  # the task chosen by Gaussians, never read from the id
        assert len(model.visual.task_selector.means) == 2
        per_image = method == "dpw" and protocol == "odcl_cil"  # DPW's ODCL-CIL rule on learnt datasets
        # after task 1: a vote on dtd (or DPW's per-image rule) and on mnist; after task 2: both
        assert run["select_confident"] == ([1, 2, 2] if per_image else [])
        assert run["select"] == ([1] if per_image else [1, 1, 2, 2])
        if method == "dpw":  # the gates it was asked for, kept with the model
            assert adapter_recipe(model)["gates"] == options.get("gates", "full")
    elif method.startswith("condu"):  # one expert per task; with the id, the learnt tasks' own
        assert len(adapter_recipe(model)["classes"]) == 2
        voted = len(run["voters"])
        assert voted == (1 if protocol == "mtil" else 4)  # by id: only mnist before it is learnt
    else:  # lora: a plain adapter, trained
        assert adapter_recipe(model)["kind"] == "lora" and 0 < summary["trainable_parameters"]


def test_dpw_under_xtail_is_refused_before_the_first_node(tmp_path):
    """`kedro run --pipelines xtail --params method=dpw`: DPW defines no inference among every
    domain's classes; the run stops in its checks, before any node, with the reason and the fix."""
    from clip_continual.runtime.preflight import PreflightError

    project = make_project(tmp_path / "project")
    with pytest.raises(PreflightError, match=r"method 'dpw' defines no inference among the classes of "
                                             r"evaluation.label_space: all_tasks \(it defines own, learned_tasks\)"):
        run_pipeline(project, ["xtail"], params={"method": "dpw"})
    assert not [path for path in (project / "data").rglob("*") if path.is_file()]  # nothing prepared or trained
