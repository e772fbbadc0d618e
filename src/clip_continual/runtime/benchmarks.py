"""Benchmarks: a sequence of tasks plus an evaluation suite, all named by catalog entries.

Each task names the prepared dataset it trains on and the classes it learns (a phase of one
dataset, as in the paper's MST, or all of it, as in OST). The evaluation suite names the updated
task's test set, any number of zero-shot sets (each with its prompt templates) and any number of
retrieval sets. A benchmark's task count is part of its definition, known when pipelines are
registered: Kedro cannot reshape a pipeline from runtime parameters.

Prompts are named by their key in the benchmark's ``prompts`` parameters, so a user can change a
template with ``--params`` without touching code.
"""

from __future__ import annotations

from dataclasses import dataclass

from clip_continual.data import class_incremental, mtil
from clip_continual.data.karpathy import COCO_RETRIEVAL_FOLDS, FLICKR_RETRIEVAL_FOLDS

EVALUATIONS = ("phases", "datasets", "class_incremental")


@dataclass(frozen=True)
class Task:
    """One training session: ``train_set`` (a catalog entry) restricted to ``classes`` (empty:
    every class of the set, as in MTIL, where each task is a whole dataset). A task with its own
    ``test_set`` and ``prompt_key`` (MTIL) is evaluated on that set with those prompts."""

    name: str
    train_set: str
    classes: tuple[int, ...]
    test_set: str | None = None
    prompt_key: str | None = None


@dataclass(frozen=True)
class ZeroShotSet:
    """A held-out classification set scored zero-shot with the templates ``prompts[prompt_key]``."""

    dataset: str
    prompt_key: str


@dataclass(frozen=True)
class RetrievalSet:
    """An image-caption set; ``folds`` splits it into equal folds whose metrics are averaged
    (5 on COCO 5K: the 1K-test protocol); None takes ``evaluation.retrieval_folds``."""

    dataset: str
    folds: int | None = None


@dataclass(frozen=True)
class EvaluationSuite:
    """What is measured after every task. ``updated_prompt_key`` names the updated task's class
    prompt in ``prompts``. The first zero-shot set and the first retrieval set give the
    headline columns (``zs_acc`` averages all zero-shot sets; every set is also reported alone)."""

    updated_test: str | None = None  # None: each task brings its test set (MTIL)
    updated_prompt_key: str | None = None
    zero_shot: tuple[ZeroShotSet, ...] = ()
    retrieval: tuple[RetrievalSet, ...] = ()

    @property
    def datasets(self) -> tuple[str, ...]:
        sets = (self.updated_test, *(s.dataset for s in self.zero_shot), *(s.dataset for s in self.retrieval))
        return tuple(name for name in sets if name is not None)


@dataclass(frozen=True)
class Benchmark:
    """``params`` names the benchmark's own parameters block (``parameters_<name>.yml``), whose
    ``model``, ``continual_learning``, ``evaluation``, ``prompts`` and ``loader`` replace the global
    blocks; None (the embedded default) reads the global blocks. ``pretrained_model`` is the
    catalog entry the first task starts from; ``reference_set`` the image-caption pairs that
    replay methods (A-GEM, GEM, ZSCL) read: the embedded default's held-back shapes-world pairs,
    or ``<name>.reference_set``, built from the files ``<name>.reference`` names
    (``clip_continual.data.reference``); None where a benchmark has none."""

    name: str
    tasks: tuple[Task, ...]
    suite: EvaluationSuite
    default_teacher: str  # "previous" (MST) or "pretrained" (OST)
    description: str
    params: str | None = None
    pretrained_model: str = "pretrained_model"
    reference_set: str | None = "reference_set"  # image-caption pairs some methods replay
    # phases: the updated test set per phase (the paper's MST / OST); datasets: each task's own
    # test set among its own classes (MTIL); class_incremental: the test images of the classes
    # seen so far among those classes (class-incremental CIFAR-100).
    evaluation: str = "phases"

    def __post_init__(self) -> None:
        names = [task.name for task in self.tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"benchmark '{self.name}' needs tasks with distinct names, got {names}")
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"benchmark '{self.name}': evaluation must be one of {EVALUATIONS}")
        if self.evaluation == "datasets" and any(t.test_set is None or t.prompt_key is None for t in self.tasks):
            raise ValueError(f"benchmark '{self.name}': every task needs a test set and a prompt key")

    @property
    def test_sets(self) -> tuple[str, ...]:
        """Every catalog entry the evaluation reads."""
        own = (task.test_set for task in self.tasks if task.test_set is not None)
        return tuple(dict.fromkeys((*self.suite.datasets, *own)))

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def phases(self) -> tuple[tuple[int, ...], ...]:
        return tuple(task.classes for task in self.tasks)

    @property
    def protocol(self) -> str:
        return "ost" if len(self.tasks) == 1 else "mst"

    def params_block(self, block: str) -> str:
        """The parameters entry a node of this benchmark reads, e.g. ``params:coco_mst.evaluation``."""
        return f"params:{self.params}.{block}" if self.params else f"params:{block}"


def class_tasks(train_set: str, phases: tuple[tuple[int, ...], ...]) -> tuple[Task, ...]:
    """``task_1 .. task_T``, each a phase of one training set."""
    return tuple(Task(f"task_{k}", train_set, tuple(phase)) for k, phase in enumerate(phases, start=1))


def consecutive_phases(num_classes: int, per_task: int) -> tuple[tuple[int, ...], ...]:
    """Classes 0..C-1 in their order, ``per_task`` at a time (the paper's MST splits)."""
    if num_classes % per_task:
        raise ValueError(f"{num_classes} classes do not split into tasks of {per_task}")
    return tuple(tuple(range(start, start + per_task)) for start in range(0, num_classes, per_task))


def _paper_benchmark(name: str, train_set: str, phases: tuple[tuple[int, ...], ...],
                     suite: EvaluationSuite, teacher: str, description: str) -> Benchmark:
    """A benchmark on downloaded data: its own parameters block and pretrained CLIP."""
    return Benchmark(name, class_tasks(train_set, phases), suite, teacher, description,
                     params=name, pretrained_model=f"{name}.pretrained_model",
                     reference_set=f"{name}.reference_set")


_SHAPES_SUITE = EvaluationSuite(
    updated_test="digits_test",
    updated_prompt_key="digits",
    zero_shot=(ZeroShotSet("shapes_zero_shot", "shapes"),),
    retrieval=(RetrievalSet("shapes_retrieval"),),
)

def _paper_suite(updated_test: str, prompt_key: str) -> EvaluationSuite:
    """The paper's suite (PAPER.md): zero-shot on the held-out tiered-ImageNet classes, retrieval
    on COCO 5K (mean of five 1K folds) and Flickr30K 1K."""
    return EvaluationSuite(
        updated_test=updated_test,
        updated_prompt_key=prompt_key,
        zero_shot=(ZeroShotSet("prepared_zero_shot", "zero_shot"),),
        retrieval=(RetrievalSet("prepared_coco_retrieval", COCO_RETRIEVAL_FOLDS),
                   RetrievalSet("prepared_flickr_retrieval", FLICKR_RETRIEVAL_FOLDS)),
    )


# COCO: 80 classes in category-id order.
_COCO_SUITE = _paper_suite("prepared_coco_test", "coco")
_EUROSAT_SUITE = _paper_suite("prepared_eurosat_test", "eurosat")

BENCHMARKS = {
    "digits_mst": Benchmark(
        name="digits_mst",
        tasks=class_tasks("digits_train", consecutive_phases(10, 2)),
        suite=_SHAPES_SUITE,
        default_teacher="previous",
        description="handwritten digits, 5 sessions of 2 classes (multi-session training)",
    ),
    "digits_ost": Benchmark(
        name="digits_ost",
        tasks=class_tasks("digits_train", (tuple(range(10)),)),
        suite=_SHAPES_SUITE,
        default_teacher="pretrained",
        description="handwritten digits, all 10 classes at once (one-session training)",
    ),
    "coco_ost": _paper_benchmark(
        "coco_ost", "prepared_coco_train", (tuple(range(80)),), _COCO_SUITE, "pretrained",
        "COCO 2014 object crops, all 80 classes at once (the paper's OST)",
    ),
    "coco_mst": _paper_benchmark(
        "coco_mst", "prepared_coco_train", consecutive_phases(80, 10), _COCO_SUITE, "previous",
        "COCO 2014 object crops, 8 sessions of 10 classes in category order (the paper's MST)",
    ),
    "eurosat_mst": _paper_benchmark(
        "eurosat_mst", "prepared_eurosat_train", consecutive_phases(10, 2), _EUROSAT_SUITE, "previous",
        "EuroSAT RGB, 5 sessions of 2 classes (the paper's remote-sensing MST)",
    ),
}
DEFAULT_BENCHMARK = "digits_mst"


def dataset_sequence(name: str, datasets: tuple[str, ...], description: str) -> Benchmark:
    """A benchmark whose tasks are whole MTIL datasets in sequence (prepared_mtil_<key>_<split>),
    each test set evaluated after every task; ``evaluation.task_identity`` and ``label_space``
    (``evaluation.protocols``) say under which protocol."""
    tasks = tuple(
        Task(key, f"prepared_mtil_{key}_train", (), test_set=f"prepared_mtil_{key}_test", prompt_key=key)
        for key in datasets
    )
    return Benchmark(
        name=name, tasks=tasks, suite=EvaluationSuite(), default_teacher="previous", description=description,
        params=name, pretrained_model=f"{name}.pretrained_model", evaluation="datasets",
        reference_set=f"{name}.reference_set",
    )


def _mtil(order: str) -> Benchmark:
    """MTIL (ZSCL): each task fine-tunes on one whole dataset of the order."""
    return dataset_sequence(
        f"mtil_{order}", mtil.order(order),
        f"MTIL {order.replace('order', 'order ')}: 11 datasets in sequence, each test set after every task (ZSCL)")


def _xtail() -> Benchmark:
    """X-TAIL (RAIL): ten domains, 16 shots per class, every test image among all domains' classes
    with no domain id (parameters_xtail.yml sets the protocol and the shots)."""
    return dataset_sequence(
        "xtail", mtil.XTAIL_DOMAINS,
        "X-TAIL: 10 domains (MTIL order 1 without CIFAR-100), 16 shots per class, every test image "
        "among the classes of all domains, no domain id (RAIL)")


def _cifar100(steps: int) -> Benchmark:
    """Class-incremental CIFAR-100 in ZSCL's class order."""
    name = f"cifar100_{steps}steps"
    return Benchmark(
        name=name, tasks=class_tasks("prepared_cifar100_cil_train", class_incremental.cifar100_phases(steps)),
        suite=EvaluationSuite(updated_test="prepared_cifar100_cil_test", updated_prompt_key="cifar100"),
        default_teacher="previous",
        description=f"class-incremental CIFAR-100, {steps} steps of {100 // steps} classes (ZSCL's order)",
        params=name, pretrained_model=f"{name}.pretrained_model", evaluation="class_incremental",
        reference_set=f"{name}.reference_set",
    )


BENCHMARKS.update({b.name: b for b in (_mtil("order1"), _mtil("order2"), _xtail())})
BENCHMARKS.update({b.name: b for b in (_cifar100(steps) for steps in class_incremental.STEP_COUNTS)})


def benchmark_in_force(pipeline_names: list[str] | tuple[str, ...] | None) -> Benchmark:
    """The benchmark a run of ``pipeline_names`` trains on: the first that names one, else the
    embedded default (``__default__``, ``continual_learning``, ...). ``evaluate_checkpoints_<name>``
    evaluates on benchmark ``<name>``."""
    for name in pipeline_names or ["__default__"]:
        name = name.removeprefix("evaluate_checkpoints_")
        if name in BENCHMARKS:
            return BENCHMARKS[name]
    return BENCHMARKS[DEFAULT_BENCHMARK]
