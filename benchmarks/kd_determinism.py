"""Is the sparse KD backward bitwise reproducible on this device? (Exact `--resume` rests on it.)

The backward adds each slot's term into the logits' gradient with ``scatter_add_``, which on CUDA
uses atomic adds in no fixed order. Order only matters where two addends meet one element: with
unique ids per position each element receives at most one non-zero addend (empty slots add an
exact 0), and that sum is exact in any order. fedmkt's alignment keeps the first occurrence of
every id (`alignment/reindex.py`), so its KD targets are unique per position and the backward
is deterministic; duplicate ids, which fedmkt never produces, would make it order-dependent.

This runs the backward twice on the same inputs, once with fedmkt-like unique ids (empty slots
included) and once with deliberately duplicated ids, and reports whether the gradients are
bitwise equal. It exits non-zero if the unique-id case is not.

    python benchmarks/kd_determinism.py --device cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

from fedmkt.losses import sparse_kd_loss


def targets(
    batch: int, length: int, vocab: int, k: int, duplicates: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids/probs as alignment hands them over: unique ids per position, some empty (-1) slots."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (batch, length, 1), generator=g)
    ids = (base + torch.randperm(vocab, generator=g)[:k]) % vocab
    if duplicates:
        ids[..., 1::2] = ids[..., 0:1]  # half the slots repeat slot 0's id
    else:
        empty = torch.rand(batch, length, k, generator=g) < 0.1
        ids = torch.where(empty, torch.full_like(ids, -1), ids)
    probs = torch.softmax(torch.randn(batch, length, k, generator=g) * 2, dim=-1)
    return ids, probs


def gradient(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    leaf = logits.clone().requires_grad_(True)
    sparse_kd_loss(leaf, ids, probs, temperature=1.0, kind="ce").sum().backward()
    return leaf.grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    logits = torch.randn(args.batch, args.length, args.vocab, generator=torch.Generator().manual_seed(0)).to(device)
    verdict = {}
    for duplicates in (False, True):
        ids, probs = (t.to(device) for t in targets(args.batch, args.length, args.vocab, args.k, duplicates, seed=1))
        first = gradient(logits, ids, probs)
        diffs = [float((gradient(logits, ids, probs) - first).abs().max()) for _ in range(args.repeats)]
        verdict[duplicates] = all(d == 0.0 for d in diffs)
        label = "duplicated ids (never produced by fedmkt)" if duplicates else "unique ids (as fedmkt aligns them)"
        print(
            f"{device.type} V={args.vocab:,} {args.batch}x{args.length} k={args.k}, {label}: "
            f"bitwise equal over {args.repeats} reruns: {verdict[duplicates]} (max |diff| {max(diffs):.3g})"
        )
    return 0 if verdict[False] else 1


if __name__ == "__main__":
    sys.exit(main())
