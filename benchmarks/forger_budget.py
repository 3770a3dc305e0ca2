"""How far a consistent forger can still move a receiver's distillation targets.

DualMinCE distills a sample from a teacher only if the teacher's NLL of the scored text is below
the receiver's own, and a receiver checks each scored label log-probability against the teacher's
top-k (fedmkt.received). At a scored position whose next token is y, the mass a teacher puts on
any other token is at most 1 - q(y), so -log(1 - moved) <= -log q(y): a teacher that wins a
sample moves, summed over its n scored positions, at most the receiver's own NLL B in these units,
and at most 1 - exp(-B / n) of the mass per position on average (uniform is the best it can do).

This prints that bound for a config's receiver (the demo's client_0 by default) on its public set,
scored as `transfer.kd_positions` says: the receiver's mean NLL per scored token, and the mean mass
a forger that wins the sample could move per position (quartiles over samples). Under
`kd_positions: answer` the prompt positions are not distilled at all.

    OMP_NUM_THREADS=1 python benchmarks/forger_budget.py                # the demo's 50 public samples, ~1 min
    python benchmarks/forger_budget.py --config tiny --samples 20 --out budget.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import torch

from fedmkt.config import parse_run_config
from fedmkt.data.parts import party_data
from fedmkt.data.tokenize import IGNORE_INDEX, encode_prompt_answer
from fedmkt.models import load_model, load_tokenizer
from fedmkt.selection import scored_targets


def per_token_nll(model, tokenizer, examples, max_length: int, kd_positions: str) -> list[float]:
    """Per sample, the model's mean NLL (nats) over the scored next tokens of prompt + gold answer."""
    means = []
    with torch.no_grad():
        for example in examples:
            input_ids, targets = encode_prompt_answer(tokenizer, example.prompt, example.answer, max_length)
            labels = scored_targets(input_ids, targets, kd_positions)
            logits = model(input_ids[None]).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            means.append(float(nll) / int((labels != IGNORE_INDEX).sum()))
    return means


def quartiles(values: list[float]) -> list[float]:
    ordered = torch.tensor(sorted(values))
    return [float(torch.quantile(ordered, q)) for q in (0.25, 0.5, 0.75)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--party", default="client_0", help="the receiver (server or client_N)")
    parser.add_argument("--samples", type=int, default=200, help="public samples to score (the first N)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    config = parse_run_config(["--config", args.config, "--logging.wandb", "false"])
    data = party_data(config, args.party)
    gold = data.public if data.public_labelled else data.public_gold  # scored along the gold answers
    if gold is None:
        parser.error("the bound is computed along gold answers: use a public source that has them")
    spec = config.parties()[args.party].model
    examples = gold[: args.samples]
    model = load_model(spec, config.cache_dir, seed=config.seed).eval()
    tokenizer = load_tokenizer(spec, config.cache_dir)
    rows = []
    for positions in ("all", "answer"):
        nll = per_token_nll(model, tokenizer, examples, config.data.max_length, positions)
        moved = [1.0 - math.exp(-value) for value in nll]
        rows.append({"kd_positions": positions, "nll_per_token": quartiles(nll), "movable_mass": quartiles(moved)})
    print(f"receiver {args.party} ({spec.source}), {len(examples)} public samples of {args.config}")
    print(
        "| scored positions | receiver NLL per token (q1 / median / q3) | mass a winning forger can move per position |"
    )
    print("|---|---|---|")
    for row in rows:
        nll, moved = ("{:.2f} / {:.2f} / {:.2f}".format(*row[key]) for key in ("nll_per_token", "movable_mass"))
        print(f"| {row['kd_positions']} | {nll} | {moved} |")
    if args.out:
        args.out.write_text(json.dumps({"config": args.config, "party": args.party, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
