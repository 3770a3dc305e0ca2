"""A vocabulary size is read from the tokenizer once, then from its record, until the tokenizer changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmkt.config import ModelSpec
from fedmkt.errors import FedMKTError
from fedmkt.vocabulary_sizes import vocabulary_size


def _word_tokenizer_folder(folder: Path, words: list[str]) -> Path:
    """A model folder whose tokenizer knows exactly `words` plus <unk> (its size is known without fedmkt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{word: index + 1 for index, word in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    LlamaConfig(vocab_size=len(vocab)).save_pretrained(folder)
    return folder


def test_the_size_is_the_tokenizers_length_and_later_reads_need_no_tokenizer(tmp_path, monkeypatch):
    folder = _word_tokenizer_folder(tmp_path / "model", ["a", "b", "c"])
    spec = ModelSpec(str(folder))
    assert vocabulary_size(spec, str(tmp_path / "cache")) == 4

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the recorded size should have been used")

    monkeypatch.setattr("fedmkt.models.load_tokenizer", no_tokenizer)
    assert vocabulary_size(spec, str(tmp_path / "cache")) == 4
    with pytest.raises(AssertionError):  # another cache holds no record: the tokenizer is read
        vocabulary_size(spec, str(tmp_path / "other_cache"))


def test_a_changed_tokenizer_is_read_again(tmp_path):
    folder = _word_tokenizer_folder(tmp_path / "model", ["a", "b"])
    cache = str(tmp_path / "cache")
    assert vocabulary_size(ModelSpec(str(folder)), cache) == 3
    _word_tokenizer_folder(folder, ["a", "b", "c", "d", "e"])
    from fedmkt.models import _load_tokenizer_cached

    _load_tokenizer_cached.cache_clear()  # as a later process would: in-process loads last one process
    assert vocabulary_size(ModelSpec(str(folder)), cache) == 6


def test_a_damaged_record_is_replaced(tmp_path):
    folder = _word_tokenizer_folder(tmp_path / "model", ["a"])
    cache = tmp_path / "cache"
    assert vocabulary_size(ModelSpec(str(folder)), str(cache)) == 2
    (record,) = (cache / "vocabulary_sizes").iterdir()
    record.write_text("{not json")
    assert vocabulary_size(ModelSpec(str(folder)), str(cache)) == 2
    assert json.loads(record.read_text())["size"] == 2


def test_a_missing_source_is_an_error_naming_its_key(tmp_path):
    with pytest.raises(FedMKTError, match=r"clients\[1\]\.model\.source"):
        vocabulary_size(ModelSpec(str(tmp_path / "nowhere")), str(tmp_path), key="clients[1].model.source")


@pytest.mark.slow
def test_print_config_with_recorded_sizes_imports_no_torch():
    """`--print_config` answers before heavy imports once each tokenizer's size is recorded (the first call)."""
    program = (
        "import sys\n"
        "from fedmkt.cli import main\n"
        "try:\n"
        "    main(['fit', '--config', 'tiny', '--print_config'])\n"
        "except SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'transformers', 'peft') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    first = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "HEAVY []" in again.stderr, again.stderr
    assert again.stdout == first.stdout
