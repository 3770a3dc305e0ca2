"""Loading one data source — a local file or folder, an embedded task, or a Hub dataset — as examples.

A source is `{path, name, split, format, columns, limit}` (`fedmkt.config.DataSource`). Every kind
goes through `datasets`, then each row is mapped through `columns` onto the fields of its format
(`multiple_choice`: prompt, choices, answer; `generation`: prompt, response; an optional `id`) and
checked, so a bad row stops the run before any model loads, with the key to fix. A public source
may lack the answer field (`answer` or `response`): its rows are then read as questions without
answers (`answers_optional`); every other set needs them.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from fedmkt.config import DataSource
from fedmkt.data.examples import Example, Format, GenerationExample, QAExample, format_of
from fedmkt.errors import FedMKTError

__all__ = ["load_source", "FIELDS"]

FIELDS: dict[str, tuple[str, ...]] = {
    "multiple_choice": ("prompt", "choices", "answer"),
    "generation": ("prompt", "response"),
}
"""The fields each format needs; `id` and (multiple choice) `labels` are optional."""

_OPTIONAL_FIELDS = ("id", "labels")
ANSWER_FIELD = {"multiple_choice": "answer", "generation": "response"}
"""The field that holds the gold answer, per format (what an unlabelled public source lacks)."""
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EMBEDDED_PREFIX = "embedded:"
HUB_PREFIX = "hub:"


def load_source(
    source: DataSource, key: str, expected: Optional[Format] = None, answers_optional: bool = False
) -> list[Example]:
    """The examples of `source` (config key `key`, e.g. `clients[0].data`, named in every error).

    `expected` is the format the run scores in; a source of the other format is refused. With
    `answers_optional` (the public set) a source without the answer field gives examples without answers.
    """
    if source.limit is not None and source.limit < 1:
        raise FedMKTError(f"{key}.limit is {source.limit}. Fix: set it to a positive number of rows, or null for all.")
    if source.path.startswith(EMBEDDED_PREFIX):
        examples = _embedded(source, key)
    else:
        dataset = _load_dataset(source, key)
        declared = source.format or _infer_format(dataset.column_names, source.columns, expected)
        examples = _rows_to_examples(dataset, source, declared, key, answers_optional)
    if source.limit is not None:
        examples = examples[: source.limit]
    if not examples:
        raise FedMKTError(f"{key}: source {source.path} has no rows. Fix: point {key}.path at a non-empty dataset.")
    found = format_of(examples[0])
    if source.format is not None and source.format != found:
        raise FedMKTError(
            f"{key}: {source.path} holds {found} rows but {key}.format is {source.format}. "
            f"Fix: set {key}.format: {found}, or point {key}.path at {source.format} data."
        )
    if expected is not None and found != expected:
        raise FedMKTError(
            f"{key}: {source.path} is a {found} source but this run needs {expected} data (as its other sets are). "
            f"Fix: use {expected} data for {key}, or make every set of the run {found}."
        )
    return examples


def _embedded(source: DataSource, key: str) -> list[Example]:
    from fedmkt.data.tasks import TASKS, load_task

    task = source.path[len(EMBEDDED_PREFIX) :]
    if task not in TASKS:
        raise FedMKTError(
            f"{key}.path: unknown embedded task {task!r}. Fix: use one of "
            + ", ".join(f"embedded:{t}" for t in TASKS)
            + "."
        )
    if source.columns:
        raise FedMKTError(
            f"{key}.columns is set for the embedded task {task}, whose rows are already mapped. Fix: remove {key}.columns."
        )
    return load_task(task)


def _load_dataset(source: DataSource, key: str):
    """A `datasets.Dataset` for a local file, a `save_to_disk` folder or a Hub dataset."""
    import datasets

    if source.path.startswith(HUB_PREFIX):
        return _hub_dataset(source, key)
    path = Path(source.path).expanduser()
    if not path.exists():
        raise FedMKTError(
            f"{key}.path: {source.path} does not exist. Fix: point it at a .jsonl/.json/.csv/.parquet file, a "
            "datasets.save_to_disk folder, embedded:TASK, or hub:OWNER/NAME."
        )
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises several types for folders it cannot read
            raise FedMKTError(
                f"{key}.path: cannot read a saved dataset from {path} ({type(error).__name__}). "
                "Fix: point it at a folder written by datasets.Dataset.save_to_disk, or at a data file."
            ) from error
        return _one_split(loaded, source, key)
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise FedMKTError(
            f"{key}.path: {path.name} is not a data file fedmkt reads. Fix: use a .jsonl, .json, .csv or .parquet file."
        )
    if not path.read_bytes().strip():
        raise FedMKTError(
            f"{key}.path: {path} is empty. Fix: put one example per line in it, or point {key}.path at another file."
        )
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # malformed JSON/CSV surfaces as several datasets/pyarrow types
        raise FedMKTError(
            f"{key}.path: cannot parse {path} as {builder} ({type(error).__name__}: {' '.join(str(error).split())[:200]}). "
            "Fix: repair the file (JSON Lines: one object per line)."
        ) from error


def _hub_dataset(source: DataSource, key: str):
    import datasets

    name = source.path[len(HUB_PREFIX) :]
    fix = (
        f"Fix: load it once where there is network (datasets.load_dataset('{name}'"
        + (f", '{source.name}'" if source.name else "")
        + f", split='{source.split or 'train'}').save_to_disk('FOLDER')), then point {key}.path at FOLDER."
    )
    if not Path(name).is_dir() and not _hub_reachable(name):
        raise FedMKTError(
            f"{key}.path: the Hugging Face Hub cannot be reached (offline, or HF_HUB_OFFLINE is set) to load {name}. {fix}"
        )
    try:
        loaded = datasets.load_dataset(name, source.name, split=source.split)
    except (ConnectionError, OSError) as error:
        raise FedMKTError(
            f"{key}.path: cannot reach the Hugging Face Hub for {name} ({type(error).__name__}). {fix}"
        ) from error
    except Exception as error:  # DatasetNotFoundError, a wrong config or split name, ...
        raise FedMKTError(
            f"{key}.path: cannot load {name} ({type(error).__name__}: {' '.join(str(error).split())[:200]}). "
            f"Check {key}.name and {key}.split; without network: {fix[5:]}"
        ) from error
    return _one_split(loaded, source, key)


def _hub_reachable(name: str) -> bool:
    """Whether the Hub answers within seconds: `datasets` would otherwise retry for about half a minute."""
    import os

    from huggingface_hub import constants

    from fedmkt.model_sources import hub_status

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    return hub_status(constants.ENDPOINT, name, "datasets") != "unreachable"


def _one_split(loaded, source: DataSource, key: str):
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded
    if source.split is None and len(loaded) == 1:
        return next(iter(loaded.values()))
    if source.split not in loaded:
        raise FedMKTError(f"{key}: {source.path} has splits {', '.join(loaded)}. Fix: set {key}.split to one of them.")
    return loaded[source.split]


def _infer_format(column_names: list[str], columns: Optional[Mapping[str, str]], expected: Optional[Format]) -> Format:
    """Choices make multiple choice, a response generation; a prompt-only source is of the run's format."""
    mapped = set(column_names) | set(columns or {})
    if "choices" in mapped:
        return "multiple_choice"
    if "response" in mapped:
        return "generation"
    return expected or "multiple_choice"


def _lookup(row: Mapping[str, Any], column: str) -> Any:
    """`row[column]`, where `a.b` reaches into a nested mapping (e.g. `choices.text`)."""
    value: Any = row
    for part in column.split("."):
        value = value[part]
    return value


def _has_column(dataset, column: str) -> bool:
    head, *rest = column.split(".")
    if head not in dataset.column_names:
        return False
    feature = dataset.features.get(head) if dataset.features is not None else None
    for part in rest:
        if isinstance(feature, Mapping) and part in feature:
            feature = feature[part]
        elif hasattr(feature, "feature") and isinstance(feature.feature, Mapping) and part in feature.feature:
            feature = feature.feature[part]
        else:
            return False
    return True


def _rows_to_examples(
    dataset, source: DataSource, fmt: Format, key: str, answers_optional: bool = False
) -> list[Example]:
    columns = dict(source.columns or {})
    unknown = sorted(set(columns) - set(FIELDS["multiple_choice"]) - set(FIELDS["generation"]) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise FedMKTError(
            f"{key}.columns maps unknown field(s) {', '.join(unknown)}. Fix: map only prompt, choices, answer, "
            "response, id or labels."
        )
    other: Format = "generation" if fmt == "multiple_choice" else "multiple_choice"
    needed = [f for f in FIELDS[fmt] if not (answers_optional and f == ANSWER_FIELD[fmt])]
    if all(_has_column(dataset, columns.get(f, f)) for f in FIELDS[other]) and not all(
        _has_column(dataset, columns.get(f, f)) for f in needed
    ):
        raise FedMKTError(
            f"{key}: {source.path} holds {other} rows but {key}.format is {fmt}. "
            f"Fix: set {key}.format: {other}, or point {key}.path at {fmt} data."
        )
    mapping = {field: columns.get(field, field) for field in (*FIELDS[fmt], *_OPTIONAL_FIELDS)}
    for field, column in mapping.items():
        if not _has_column(dataset, column):
            optional = field in _OPTIONAL_FIELDS or (answers_optional and field == ANSWER_FIELD[fmt])
            if optional and field not in columns:
                continue
            raise FedMKTError(
                f"{key}: {source.path} has no column {column!r} for field {field!r} (columns: {', '.join(dataset.column_names)}). "
                f"Fix: set {key}.columns.{field} to the column that holds it."
            )
    present = {field: column for field, column in mapping.items() if _has_column(dataset, column)}
    examples: list[Example] = []
    label = Path(source.path).stem if not source.path.startswith(HUB_PREFIX) else source.path[len(HUB_PREFIX) :]
    for index, row in enumerate(dataset):
        if source.limit is not None and index >= source.limit:
            break
        values = {field: _lookup(row, column) for field, column in present.items()}
        try:
            examples.append(_example(values, fmt, f"{label}-{index}"))
        except (TypeError, ValueError) as error:
            suffix = Path(source.path).suffix.lower()  # files count lines from 1 (a CSV's first is its header)
            where = {".jsonl": f"line {index + 1}", ".csv": f"line {index + 2}"}.get(suffix, f"row {index}")
            raise FedMKTError(f"{key}: {where} of {source.path} {error}. Fix: repair or drop that row.") from None
    return examples


def _continuation(prompt: str, text: str) -> str:
    """`text` as it follows `prompt`: one space between them unless either side already has it."""
    return text if not text or text[0].isspace() or prompt[-1:].isspace() else f" {text}"


def _text(values: Mapping[str, Any], field: str) -> str:
    value = values[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"has no text in field {field!r} (got {value!r})")
    return value


def _answer_index(answer: Any, choices: list[str], labels: Optional[list[Any]]) -> int:
    """The gold option's index: an int, a label out of `labels`, a letter (A = 0) or a 1-based digit."""
    if isinstance(answer, bool):
        raise ValueError(f"has a boolean answer {answer!r}; expected an index into choices")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and labels is not None and answer in [str(label) for label in labels]:
        index = [str(label) for label in labels].index(answer)
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip()) - 1
    else:
        raise ValueError(f"has answer {answer!r}, which is neither an index, a letter nor one of the labels")
    if not 0 <= index < len(choices):
        raise ValueError(f"has answer {answer!r} out of range for its {len(choices)} choices")
    return index


def _example(values: Mapping[str, Any], fmt: Format, default_uid: str) -> Example:
    uid = str(values["id"]) if values.get("id") is not None else default_uid
    prompt = _text(values, "prompt")
    if fmt == "generation":
        response = _continuation(prompt, _text(values, "response")) if "response" in values else None
        return GenerationExample(uid, prompt, response)
    choices = values["choices"]
    if (
        not isinstance(choices, (list, tuple))
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise ValueError(f"has choices {choices!r}; expected a list of at least two non-empty strings")
    labels = values.get("labels")
    index = (
        _answer_index(values["answer"], list(choices), list(labels) if labels is not None else None)
        if "answer" in values
        else None
    )
    return QAExample(uid, prompt, tuple(_continuation(prompt, c) for c in choices), index)
