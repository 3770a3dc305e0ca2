"""How many DualMinCE selections comparing losses per byte changes against comparing token means.

Runs a config (default: the demo, 2 rounds) and, at every distillation, selects the samples twice
from the same losses: as fedmkt does (each party's NLL of the scored text per UTF-8 byte of it: the
answer, or prompt and answer under `kd_positions: all`) and as the reference does (the NLL's mean
over the party's own scored tokens, i.e. the same sums divided by each party's token count). Between parties with one tokenizer both order samples alike; across
tokenizers they differ where one tokenizer cuts the answer more finely. Prints, per round and
receiver, how many samples each rule selects and on how many the two disagree.

    OMP_NUM_THREADS=2 python benchmarks/per_byte_selection.py                  # the demo (about 7 min on 2 cores)
    python benchmarks/per_byte_selection.py --config tiny --run-dir runs/per_byte_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

import fedmkt.federation.participant as participant_module
from fedmkt.config import parse_run_config
from fedmkt.data.tokenize import IGNORE_INDEX, encode_prompt_answer
from fedmkt.run import fit
from fedmkt.selection import scored_bytes, scored_targets


def tokens_per_byte(tokenizer, examples, max_length: int, kd_positions: str) -> torch.Tensor:
    """Per public sample, the scored text's token count in `tokenizer` divided by its UTF-8 bytes."""
    ratios = []
    for example in examples:
        scored = scored_targets(
            *encode_prompt_answer(tokenizer, example.prompt, example.answer, max_length), kd_positions
        )
        ratios.append(int((scored != IGNORE_INDEX).sum()) / scored_bytes(example.prompt, example.answer, kd_positions))
    return torch.tensor(ratios)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the counts as JSON here")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="per_byte_")) / "run"
    config = parse_run_config(["--config", args.config, "--logging.wandb", "false", "--run_dir", str(run_dir)])
    rows: list[dict] = []
    receiver: dict = {}
    original_distill, original_select = participant_module.Participant.distill, participant_module.dual_min_ce

    def distill(self, round_index, payloads):
        receiver.update(party=self, round=round_index)
        return original_distill(self, round_index, payloads)

    def select(own, teacher_losses, require_improvement=True):
        party = receiver["party"]
        examples, length, positions = party.data.public_examples, party.max_length, party.transfer.kd_positions
        own_ratio = tokens_per_byte(party.tokenizer, examples, length, positions)
        token_mean = {
            name: losses / tokens_per_byte(party.alignment.teacher_tokenizers[name], examples, length, positions)
            for name, losses in teacher_losses.items()
        }
        by_byte = original_select(own, teacher_losses, require_improvement)
        by_token = original_select(own / own_ratio, token_mean, require_improvement)
        changed = int((by_byte.teacher_of_sample != by_token.teacher_of_sample).sum())
        rows.append(
            {
                "round": receiver["round"],
                "receiver": party.name,
                "selected_per_byte": by_byte.num_selected,
                "selected_token_mean": by_token.num_selected,
                "changed": changed,
                "samples": len(own),
            }
        )
        print(f"[per_byte_selection] {rows[-1]}", flush=True)
        return by_byte

    participant_module.Participant.distill = distill
    participant_module.dual_min_ce = select
    try:
        fit(config, overwrite=run_dir.exists())
    finally:
        participant_module.Participant.distill, participant_module.dual_min_ce = original_distill, original_select
    print("\n| round | receiver | selected (per byte) | selected (token mean) | selections that differ |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['round']} | {row['receiver']} | {row['selected_per_byte']} | {row['selected_token_mean']} "
            f"| {row['changed']} of {row['samples']} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"config": args.config, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
