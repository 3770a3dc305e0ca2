"""`fedmkt export` / `generate`: a trained party in a folder that plain transformers and peft load, scoring as fedmkt does."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmkt.cli import main
from fedmkt.config import run_config_from_text
from fedmkt.data.parts import party_data
from fedmkt.evaluation import choice_loglikelihoods, evaluate_multiple_choice
from fedmkt.export import load_trained

FAST = ["--config", "tiny", "--federation.rounds", "1", "--federation.evaluate_before", "false"]
FAST += ["--logging.wandb", "false", "--data.pool_size", "9", "--data.max_length", "48"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    assert main(["fit", *FAST, "--run_dir", str(run_dir)]) == 0
    return run_dir


def _questions(run_dir):
    config = run_config_from_text((run_dir / "config.yaml").read_text())
    return party_data(config, "client_0").evaluation


@pytest.mark.parametrize("merge", [True, False])
def test_an_exported_party_loads_with_plain_transformers_or_peft_and_scores_the_same(
    trained, tmp_path, merge, capsys, monkeypatch
):
    out = tmp_path / ("merged" if merge else "adapter")
    args = ["export", "--run", str(trained), "--party", "client_0", "--out", str(out)]
    assert main(args + (["--merge"] if merge else [])) == 0
    assert "round-1 model" in capsys.readouterr().out
    if merge:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not any("lora" in name for name, _ in model.named_parameters())
    else:
        from peft import AutoPeftModelForCausalLM

        monkeypatch.chdir(out)  # peft reads the relative base name against the current folder
        model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
        # a random-init base only fedmkt makes travels with the adapter, named relative to it
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    tokenizer = AutoTokenizer.from_pretrained(out)
    questions = _questions(trained)
    ours, their_tokenizer, _ = load_trained(trained, "client_0")
    expected = choice_loglikelihoods(ours, their_tokenizer, questions, max_length=48)
    got = choice_loglikelihoods(model, tokenizer, questions, max_length=48)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # and the same per-question record the run's summary holds for that round
    summary = json.loads((trained / "summary.json").read_text())
    recorded = summary["rounds"][0]["parties"]["client_0"]["eval_correct"]
    assert evaluate_multiple_choice(model, tokenizer, questions, max_length=48)["correct"] == recorded


def test_generate_prints_the_partys_greedy_completion(trained, capsys):
    prompt = "Question: Which gas do plants take in?\nAnswer:"
    args = ["generate", "--run", str(trained), "--party", "client_1", "--prompt", prompt, "--max_new_tokens", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # the oracle: the merged export, asked through plain transformers for 5 greedy tokens
    model, tokenizer, _ = load_trained(trained, "client_1")
    merged = model.merge_and_unload()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert printed == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"


def test_unknown_party_or_round_is_one_line(trained, capsys):
    assert main(["export", "--run", str(trained), "--party", "client_9", "--out", "x"]) == 2
    assert "unknown party `client_9`" in capsys.readouterr().err
    assert main(["export", "--run", str(trained), "--party", "server", "--out", "x", "--round", "4"]) == 2
    assert "no round-4 adapter of server. Fix: use --round with one of [1]" in capsys.readouterr().err


def test_a_second_export_replaces_the_first_and_nothing_else(trained, tmp_path, capsys):
    out = tmp_path / "exports" / "client_0"
    (tmp_path / "exports" / "keep.txt").parent.mkdir(parents=True)
    (tmp_path / "exports" / "keep.txt").write_text("mine")
    base = ["export", "--run", str(trained), "--party", "client_0", "--out", str(out)]
    assert main(base) == 0
    marker = json.loads((out / "fedmkt_export.json").read_text())
    assert marker == {
        "fedmkt_export": 1,
        "run": str(trained.resolve()),
        "party": "client_0",
        "round": 1,
        "merged": False,
    }
    assert main([*base, "--merge"]) == 0
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    assert json.loads((out / "fedmkt_export.json").read_text())["merged"] is True
    assert (tmp_path / "exports" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["client_0", "keep.txt"]
    assert (trained / "summary.json").is_file()


def test_an_adapter_export_travels_and_others_can_read_it(trained, tmp_path, monkeypatch):
    """Copied elsewhere, the export loads with plain peft + transformers; its files follow the umask."""
    import os
    import shutil
    import stat

    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "made" / "client_0"
    old_mask = os.umask(0o022)
    try:
        assert main(["export", "--run", str(trained), "--party", "client_0", "--out", str(out)]) == 0
    finally:
        os.umask(old_mask)
    for path in (out, out / "adapter_config.json", out / "base", out / "base" / "config.json"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, (path, oct(mode))  # group and others may read
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    base = AutoModelForCausalLM.from_pretrained(moved / "base")
    model = PeftModel.from_pretrained(base, moved).eval()
    monkeypatch.chdir(moved)
    auto = AutoPeftModelForCausalLM.from_pretrained(moved).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, auto(input_ids=ids).logits)
    ours, _, _ = load_trained(trained, "client_0")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [("--prompt", "  ", "--prompt is empty"), ("--max_new_tokens", "0", "--max_new_tokens is 0")],
)
def test_generate_refuses_an_empty_prompt_or_no_tokens_in_one_line(tmp_path, capsys, flag, value, needle):
    argv = ["generate", "--run", str(tmp_path), "--party", "server", "--prompt", "Hi", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Fix:" in err
