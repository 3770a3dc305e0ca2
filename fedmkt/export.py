"""Taking a trained party away: a folder `transformers` or `peft` loads as it is, and a one-line try.

`export_party` reads a finished (or interrupted) run folder: its resolved `config.yaml`, the party's
adapter of a round and its tokenizer, and writes

* with `merge`: the base model with the adapter merged into it, plus the tokenizer, which
  `AutoModelForCausalLM.from_pretrained(out)` loads (lm-evaluation-harness's `hf` model, or any
  Hugging Face-compatible server);
* without: the adapter and the tokenizer, which `AutoPeftModelForCausalLM.from_pretrained(out)`
  loads. A hub base is named by its hub id (and revision); a base only this machine has (an
  embedded or `.gguf` model, converted, or a random-init one) is written to `out/base/` and named
  `base`, relative to the export, so the folder can be moved or copied: load it with
  `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)` (peft reads a
  relative base name against the current folder, so `AutoPeftModelForCausalLM` loads it from inside
  `out`). A base in a local model folder is named by its absolute path.

The export's files get the permissions the user's umask gives, so others can read what is meant
to be handed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from fedmkt.config import RunConfig, run_config_from_text
from fedmkt.data.tokenize import prompt_ids
from fedmkt.errors import FedMKTError
from fedmkt.files import atomic_write_dir
from fedmkt.models import load_model, load_tokenizer
from fedmkt.output_folders import EXPORT_MARKER, check_export_target, export_marker_text

__all__ = ["export_party", "generate_text", "load_trained"]


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FedMKTError(f"{run_dir} holds no run (no config.yaml). Fix: pass the run_dir of a fedmkt run as --run.")
    return run_config_from_text(path.read_text())


def adapter_of(run_dir: Path, party: str, round_index: Optional[int] = None) -> tuple[int, Path]:
    """(round, folder) of the party's adapter: that round's, or the last one the run saved."""
    rounds = sorted(
        int(folder.parent.name.split("_", 1)[1])
        for folder in run_dir.glob(f"adapters/round_*/{party}")
        if (folder / "adapter_model.safetensors").is_file()
    )
    if not rounds:
        raise FedMKTError(
            f"{run_dir} holds no adapter of {party}. Fix: check the party name (server, client_0, ...) and that a round finished."
        )
    if round_index is None:
        round_index = rounds[-1]
    if round_index not in rounds:
        raise FedMKTError(
            f"{run_dir} holds no round-{round_index} adapter of {party}. Fix: use --round with one of {rounds}."
        )
    return round_index, run_dir / "adapters" / f"round_{round_index}" / party


def _base_model(run_dir: Path, party: str) -> Any:
    """The party's base model exactly as the run built it (a random-init base from the same seed)."""
    config = _run_config(run_dir)
    parties = config.parties()
    return load_model(parties[party].model, config.cache_dir, seed=config.seed + list(parties).index(party))


def load_trained(run_dir: Path, party: str, round_index: Optional[int] = None) -> tuple[Any, Any, int]:
    """(PEFT model of base + the party's adapter, its tokenizer, the round) from a run folder, in eval mode."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    config = _run_config(run_dir)
    parties = config.parties()
    if party not in parties:
        raise FedMKTError(f"unknown party `{party}`. Fix: use one of {', '.join(parties)}.")
    round_index, adapter = adapter_of(run_dir, party, round_index)
    base = _base_model(run_dir, party)
    saved_tokenizer = run_dir / "tokenizers" / party
    if saved_tokenizer.is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer)
    else:
        tokenizer = load_tokenizer(parties[party].model, config.cache_dir)
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer, round_index


def export_party(
    run_dir: Path, party: str, out: Path, round_index: Optional[int] = None, merge: bool = False
) -> tuple[Path, int]:
    """Write the party's trained model to `out` (see the module docstring); returns (out, round).

    `out` must be new, empty or an earlier export (`fedmkt.output_folders`): checked before anything loads.
    """
    run_dir = Path(run_dir)
    out = check_export_target(out, run_dir)
    model, tokenizer, round_index = load_trained(run_dir, party, round_index)
    spec = _run_config(run_dir).parties()[party].model
    marker = export_marker_text(run_dir, party, round_index, merge)
    if merge:

        def write_merged(folder: Path) -> None:
            model.merge_and_unload().save_pretrained(folder, safe_serialization=True)
            tokenizer.save_pretrained(folder)
            (folder / EXPORT_MARKER).write_text(marker)

        atomic_write_dir(out, write_merged, shared=True)
        return out, round_index

    local_dir = Path(spec.source).expanduser()
    written_base = spec.random_init or spec.source.startswith("embedded:") or spec.source.endswith(".gguf")
    from_hub = not written_base and not local_dir.exists()

    def write_adapter(folder: Path) -> None:
        if from_hub:
            base_name = spec.source
        elif not written_base:  # a model folder on this machine
            base_name = str(local_dir.resolve())
        else:  # a base only fedmkt makes (converted or random-init): written next to the adapter
            # loaded afresh: the PEFT model's own base has the adapter's layers injected into it
            _base_model(run_dir, party).save_pretrained(folder / "base", safe_serialization=True)
            tokenizer.save_pretrained(folder / "base")
            base_name = "base"  # relative to the export: the folder travels
        model.peft_config["default"].base_model_name_or_path = base_name
        if from_hub and spec.revision:
            model.peft_config["default"].revision = spec.revision
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / EXPORT_MARKER).write_text(marker)

    atomic_write_dir(out, write_adapter, shared=True)
    return out, round_index


@torch.no_grad()
def generate_text(
    run_dir: Path, party: str, prompt: str, round_index: Optional[int] = None, max_new_tokens: int = 64
) -> str:
    """The party's greedy completion of `prompt` (tokenised as in training), up to an end-of-sequence token."""
    model, tokenizer, _ = load_trained(Path(run_dir), party, round_index)
    ids = torch.tensor([prompt_ids(tokenizer, prompt)[0]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
