"""Data sources: every kind of path, column mapping, formats, and each bad input as one line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest

from fedmkt.config import DataSource
from fedmkt.data.examples import GenerationExample, QAExample
from fedmkt.data.parts import check_disjoint
from fedmkt.data.sources import load_source
from fedmkt.errors import FedMKTError

ROWS = [
    {"id": "a", "prompt": "Question: 2 + 2?\nAnswer:", "choices": ["3", "4"], "answer": 1},
    {"id": "b", "prompt": "Question: 3 + 3?\nAnswer:", "choices": ["6", "7", "8"], "answer": 0},
]
EXPECTED = [
    QAExample("a", "Question: 2 + 2?\nAnswer:", (" 3", " 4"), 1),
    QAExample("b", "Question: 3 + 3?\nAnswer:", (" 6", " 7", " 8"), 0),
]
GEN_ROWS = [{"prompt": "Capital of France?", "response": "Paris"}, {"prompt": "Capital of Peru? ", "response": "Lima"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path, key: str = "data.public", **fields) -> list:
    return load_source(DataSource(path=str(path), **fields), key)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_file_kind_gives_the_same_examples(tmp_path, suffix):
    path = tmp_path / f"set{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, ROWS)
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load(path) == EXPECTED


def test_csv_generation_rows_and_their_continuation_space(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text('prompt,response\nCapital of France?,Paris\n"Capital of Peru? ",Lima\n')
    examples = load(path, format="generation")
    # One space between prompt and response, unless the prompt already ends with one.
    assert [(e.prompt, e.response) for e in examples] == [
        ("Capital of France?", " Paris"),
        ("Capital of Peru? ", "Lima"),
    ]
    assert all(isinstance(e, GenerationExample) for e in examples)
    assert [e.uid for e in examples] == ["set-0", "set-1"]  # no id column: file name and row


def test_saved_dataset_folders_and_splits(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load(tmp_path / "single") == EXPECTED
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS[1:])}
    ).save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict", split="test") == EXPECTED[1:]
    with pytest.raises(FedMKTError, match=r"has splits train, test\. Fix: set data\.public\.split"):
        load(tmp_path / "dict")


def test_embedded_tasks_use_every_offline_row():
    arc = load("embedded:arc_easy")
    # 570 validation questions (saved split) + 2,376 test questions (task files), none repeated.
    assert len(arc) == 570 + 2376 and len({e.uid for e in arc}) == len(arc)
    nq = load("embedded:nq_open")
    assert isinstance(nq[0], GenerationExample) and nq[0].response.startswith(" ")
    assert len(load("embedded:arc_easy", limit=5)) == 5


def test_hub_path_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    # datasets.load_dataset("OWNER/NAME") reads a local folder of that name first: the same call
    # that downloads from the Hub where there is network.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "quiz").mkdir(parents=True)
    write_jsonl(tmp_path / "acme" / "quiz" / "train.jsonl", ROWS)
    examples = load("hub:acme/quiz", split="train")
    assert [(e.prompt, e.choices, e.answer_index) for e in examples] == [
        (e.prompt, e.choices, e.answer_index) for e in EXPECTED
    ]


def test_hub_without_network_is_one_line_within_seconds(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(FedMKTError) as raised:
        load("hub:acme/not-here", key="clients[1].data", split="train")
    message = str(raised.value)
    assert time.perf_counter() - start < 10
    assert (
        "cannot be reached" in message
        and "save_to_disk" in message
        and "point clients[1].data.path at FOLDER" in message
    )
    assert "\n" not in message


def test_column_map_reaches_nested_columns_and_turns_labels_into_indices(tmp_path):
    rows = [
        {
            "question": "Which is a gas?",
            "choices": {"text": ["iron", "oxygen"], "label": ["1", "2"]},
            "answerKey": "2",
            "uid": "q1",
        },
        {
            "question": "Which is wet?",
            "choices": {"text": ["water", "sand", "salt"], "label": ["A", "B", "C"]},
            "answerKey": "A",
            "uid": "q2",
        },
    ]
    path = write_jsonl(tmp_path / "arc_like.jsonl", rows)
    columns = {
        "id": "uid",
        "prompt": "question",
        "choices": "choices.text",
        "labels": "choices.label",
        "answer": "answerKey",
    }
    assert load(path, columns=columns) == [
        QAExample("q1", "Which is a gas?", (" iron", " oxygen"), 1),
        QAExample("q2", "Which is wet?", (" water", " sand", " salt"), 0),
    ]


@pytest.mark.parametrize("answer, index", [("C", 2), ("c", 2), ("2", 1), (0, 0)])
def test_letters_and_one_based_digits_without_a_label_column(tmp_path, answer, index):
    path = write_jsonl(tmp_path / "letters.jsonl", [{"prompt": "Pick", "choices": ["x", "y", "z"], "answer": answer}])
    assert load(path)[0].answer_index == index


# ---- bad input: one line that names the key and the fix ----------------------------------------


def one_line(call) -> str:
    with pytest.raises(FedMKTError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and "Fix:" in message, message
    return message


def test_a_path_that_does_not_exist(tmp_path):
    message = one_line(lambda: load(tmp_path / "nope.jsonl", key="clients[0].data"))
    assert "clients[0].data.path" in message and "does not exist" in message


@pytest.mark.parametrize(
    "rows, columns, needle",
    [
        ([{"prompt": "Q", "choices": ["a", "b"]}], None, "no column 'answer' for field 'answer'"),
        ([{"prompt": "Q", "choices": ["a", "b"], "answer": 2}], None, "line 1 of"),
        (
            [{"prompt": "Q", "choices": ["a", "b"], "answer": 1}, {"prompt": "", "choices": ["a", "b"], "answer": 0}],
            None,
            "line 2 of",
        ),
        (
            [{"prompt": "Q", "choices": ["a", "b"], "answer": 1}],
            {"prompt": "question"},
            "no column 'question' for field 'prompt'",
        ),
        ([{"prompt": "Q", "choices": ["a", "b"], "answer": 1}], {"promt": "prompt"}, "unknown field(s) promt"),
    ],
    ids=["missing-field", "answer-out-of-range", "empty-prompt", "absent-column", "unknown-field"],
)
def test_bad_rows_and_column_maps(tmp_path, rows, columns, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert needle in one_line(lambda: load(path, key="data.eval", columns=columns))


def test_answer_out_of_range_says_so(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "choices": ["a", "b"], "answer": 2}])
    assert "out of range for its 2 choices" in one_line(lambda: load(path))


def test_an_empty_source(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]")
    for path in (tmp_path / "empty.jsonl", tmp_path / "empty.json"):
        message = one_line(lambda path=path: load(path, key="data.public"))
        assert "data.public" in message and ("is empty" in message or "no rows" in message or "cannot parse" in message)
    assert "is empty" in one_line(lambda: load(tmp_path / "empty.jsonl", key="data.public"))


def test_the_wrong_format(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", ROWS)
    message = one_line(lambda: load(mc, key="data.eval", format="generation"))
    assert "holds multiple_choice rows but data.eval.format is generation" in message
    generation = write_jsonl(tmp_path / "gen.jsonl", GEN_ROWS)
    message = one_line(lambda: load_source(DataSource(path=str(generation)), "data.public", "multiple_choice"))
    assert "is a generation source but this run needs multiple_choice data" in message
    message = one_line(lambda: load_source(DataSource(path="embedded:nq_open"), "clients[0].data", "multiple_choice"))
    assert "clients[0].data" in message and "generation" in message


def test_overlap_is_found_by_normalised_content_not_only_by_id():
    train = [QAExample("t1", "Question: What is 2+2?\nAnswer:", (" 4", " 5"), 0)]
    same_text = QAExample("e9", "question:  what is 2+2?   answer:", (" 4", " 5"), 1)  # other id, case, spaces
    other = QAExample("t1", "Question: a different one", (" 4", " 5"), 0)  # same id, other text: fine
    check_disjoint({"data.eval": [other]}, {"data.public": train})
    message = one_line(lambda: check_disjoint({"data.eval": [other, same_text]}, {"clients[1].data": train}))
    assert "1 example(s) of data.eval are also in clients[1].data" in message
    # nothing of the training twin, which may be a private row on a Flower node, is quoted
    assert "t1" not in message and "2+2" not in message
