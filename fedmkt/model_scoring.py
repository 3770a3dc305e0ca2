"""Scoring one model on one evaluation set, with nothing of a run but the model (`fedmkt evaluate --model`).

The model is a run folder's party (its base rebuilt from the run's config, its adapter from a
round), a folder `fedmkt export` wrote (merged, or an adapter with its base), or any model spec a
config takes (`embedded:NAME`, a hub name, a local folder, a `.gguf` file) with an optional LoRA
adapter. The set is a data source as in the configs, or a task name: a run's own held-out set of
that task when the model is a run, else the held-out part that the preset `data.task: NAME` carves
with the given seed and size. No public or private set is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from fedmkt.config import DataConfig, DataSource, ModelSpec, RunConfig, run_config_from_text
from fedmkt.data.examples import Example
from fedmkt.data.parts import SourceReader
from fedmkt.data.sources import load_source
from fedmkt.data.tasks import TASK_FORMATS, load_task, split_task
from fedmkt.errors import FedMKTError
from fedmkt.output_folders import EXPORT_MARKER

__all__ = ["ScoredModel", "attach_adapter", "load_scored_model", "evaluation_set", "evaluation_examples", "score_model"]


@dataclass
class ScoredModel:
    """A model ready to score, its tokenizer, and what it is (for the printed line and `--out`)."""

    model: Any
    tokenizer: Any
    description: dict
    run_config: Optional[RunConfig] = None
    """The run's config when the model came from a run folder (its held-out sets and settings)."""


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and (folder / "adapters").is_dir()


def load_scored_model(
    model: str,
    party: Optional[str] = None,
    round_index: Optional[int] = None,
    adapter: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> ScoredModel:
    """The model `--model` names (see the module docstring), in eval mode."""
    folder = Path(model).expanduser()
    if folder.is_dir() and _is_run(folder):
        from fedmkt.export import load_trained

        if adapter is not None:
            raise FedMKTError(
                "--model RUN_DIR and --adapter both name the adapter. Fix: pick it with --round N, or give a base model with --adapter."
            )
        party = party or "server"
        loaded, tokenizer, round_index = load_trained(folder, party, round_index)
        config = run_config_from_text((folder / "config.yaml").read_text())
        return ScoredModel(loaded, tokenizer, {"model": str(folder), "party": party, "round": round_index}, config)
    if party is not None or round_index is not None:
        raise FedMKTError(
            f"--party and --round pick a run's model, but {model} is not a run folder (no config.yaml and adapters/). "
            "Fix: drop them, or pass a run_dir as --model."
        )
    if folder.is_dir() and (folder / EXPORT_MARKER).is_file() and (folder / "adapter_config.json").is_file():
        if adapter is not None:
            raise FedMKTError(f"{model} is an adapter export: it holds its adapter. Fix: drop --adapter.")
        return _adapter_export(folder)
    from fedmkt.models import load_model, load_tokenizer

    spec = ModelSpec(source=model)
    tokenizer = load_tokenizer(spec, cache_dir, key="--model")
    base = load_model(spec, cache_dir, key="--model")
    loaded = attach_adapter(base, adapter) if adapter is not None else base
    return ScoredModel(loaded.eval(), tokenizer, {"model": model, "adapter": adapter})


def attach_adapter(base: Any, adapter: str, party: Optional[str] = None) -> Any:
    """`base` with the LoRA adapter in folder `adapter`, or a one-line error (naming `party`'s own
    adapter as the fix when the model is a run's party)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        example = f"a folder such as RUN_DIR/adapters/round_1/{party}" if party else "a folder peft saved"
        raise FedMKTError(f"no LoRA adapter at {adapter}. Fix: pass {example}.")
    try:
        return PeftModel.from_pretrained(base, adapter)
    except (RuntimeError, ValueError, OSError, KeyError) as error:  # another model's adapter: sizes, modules
        whose = f"{party}'s model" if party else "the model"
        fix = (
            f"pass {party}'s own adapter, e.g. RUN_DIR/adapters/round_1/{party}"
            if party
            else "pass the adapter trained on this base model"
        )
        raise FedMKTError(
            f"adapter {adapter} does not fit {whose} ({type(error).__name__}: {' '.join(str(error).split())[:300]}). Fix: {fix}."
        ) from error


def _adapter_export(folder: Path) -> ScoredModel:
    """An adapter export: its base is named relative to the folder (`base`) or is a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = json.loads((folder / "adapter_config.json").read_text())
    base_name = settings.get("base_model_name_or_path") or ""
    beside = folder / base_name
    base = AutoModelForCausalLM.from_pretrained(
        str(beside) if base_name and beside.is_dir() else base_name, revision=settings.get("revision")
    )
    model = attach_adapter(base, str(folder)).eval()
    return ScoredModel(model, AutoTokenizer.from_pretrained(folder), {"model": str(folder)})


def evaluation_set(value: str) -> Union[DataSource, str]:
    """What `--eval VALUE` names: a data source, or a task name (checked before any model loads)."""
    if value in TASK_FORMATS:
        return value
    if not value.lstrip().startswith("{"):
        return DataSource(path=value)
    try:
        parsed = yaml.safe_load(value)
        if not isinstance(parsed, dict):
            raise TypeError("not a mapping")
        return DataSource(**parsed)
    except (TypeError, yaml.YAMLError) as error:
        problem = " ".join(str(error).split()).replace("DataSource.__init__() ", "")
        raise FedMKTError(
            f"--eval {value} is not a data source ({problem}). Fix: give one such as "
            "'{path: eval.jsonl, columns: {prompt: question}}', a path, or a task name (arc_easy, ...)."
        ) from None


def evaluation_examples(
    wanted: Union[DataSource, str],
    run_config: Optional[RunConfig] = None,
    seed: int = 42,
    eval_size: Optional[int] = None,
) -> tuple[str, list[Example]]:
    """(what was scored, its examples) for what `evaluation_set` read (see the module docstring)."""
    if isinstance(wanted, str):
        return wanted, _task_held_out(wanted, run_config, seed, eval_size)
    return wanted.path, load_source(wanted, "--eval")


def _task_held_out(task: str, run_config: Optional[RunConfig], seed: int, eval_size: Optional[int]) -> list[Example]:
    """A run's own held-out set of `task`, else the preset's held-out part of it."""
    if run_config is not None:
        reader = SourceReader(run_config)
        named = reader.evaluation_sets()
        if named is not None and task in named:
            return named[task]
        if run_config.data.task == task and run_config.data.eval is None:
            return reader.evaluation()
    size = eval_size if eval_size is not None else DataConfig.eval_size
    return split_task(load_task(task), 1, size, None, seed).evaluation


def score_model(
    scored: ScoredModel,
    examples: list[Example],
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int = 32,
) -> tuple[dict, list[dict]]:
    """(scores, per-question record) of the model on `examples`: acc, acc_norm, n and acc_ci for
    multiple choice, rouge_l, exact_match and n for generation."""
    from fedmkt.data.examples import GenerationExample
    from fedmkt.evaluation import evaluate_generation, evaluate_multiple_choice

    what = scored.description.get("party") or Path(scored.description["model"]).name
    if examples and isinstance(examples[0], GenerationExample):
        scores = evaluate_generation(
            scored.model,
            scored.tokenizer,
            examples,
            batch_size=batch_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            progress=f"{what} · evaluate",
        )
        return scores, [{"id": example.uid} for example in examples]
    scores = evaluate_multiple_choice(
        scored.model,
        scored.tokenizer,
        examples,
        batch_size=batch_size,
        max_length=max_length,
        progress=f"{what} · evaluate",
    )
    record = [{"id": e.uid, "correct": hit == "1"} for e, hit in zip(examples, scores.pop("correct"))]
    return scores, record
