"""Token alignment: reference vs ours, per stage, on the real Gemma-3 <-> SmolLM2 pair.

    python benchmarks/alignment.py            # full run (a few minutes on 2 cores)
    python benchmarks/alignment.py --quick    # smaller samples

Stages (each printed as a table: reference vs ours, wall time, ratio, mismatches):

1. **Vocabulary map (MinED)**, both directions. The reference is brute force (every source token
   against every destination token, one Levenshtein call each, as the FedMKT reference code does
   with ``editdistance``); over the full vocabulary it would take ~100 core-minutes per direction,
   so it is timed on ``--ref-tokens`` random tokens and extrapolated to the full vocabulary (the
   table says so). Correctness: on ``--check-tokens`` random tokens per direction our mapped
   token's distance must equal the brute-force minimum distance (``rapidfuzz.process.cdist``
   against the whole destination vocabulary), and on ``--tie-tokens`` of them our chosen id must
   equal the pure-Python reference's (same tie-break).
2. **Sequence DTW** on pairs of real texts (BoolQ passages) tokenised by both tokenizers and cut
   to ``--length`` tokens each: the pure-Python O(n*m) reference (``tests/reference_alignment.py``,
   C Levenshtein per cell like the reference code) vs ``fedmkt.alignment.dtw_path``; the paths
   must be identical.
3. **Sequence alignment per sample**, ``transfer.sequence_alignment`` ``dtw`` vs ``offsets``, on the
   same pairs, through ``TokenAligner.match_positions`` as a run calls it (token ids in, matched
   teacher position per receiver position out), with the positions each mode matches.
4. **Top-k re-indexing** of ``--samples`` x ``--length`` positions x ``--top-k``: the reference loop
   vs ``fedmkt.alignment.align_topk``; ids must be equal and probabilities within 1e-6.

Our vocabulary-map time is measured without the on-disk cache and after Numba's one-off JIT
compile (reported on its own line; it is cached on disk after the first use).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import reference_alignment as ref  # noqa: E402

from fedmkt.alignment import align_topk, build_vocab_map, dtw_path, vocab_strings  # noqa: E402
from fedmkt.alignment.mined import nearest_tokens  # noqa: E402


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def fmt_s(seconds: float) -> str:
    if seconds >= 100:
        return f"{seconds:,.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.2f} ms"


def load_pair():
    from fedmkt.config import ModelSpec
    from fedmkt.models import load_tokenizer

    gemma = load_tokenizer(ModelSpec("embedded:gemma3-270m"))
    smol = load_tokenizer(ModelSpec("embedded:smollm2-135m-instruct"))
    return {"Gemma-3": gemma, "SmolLM2": smol}


def bench_vocab_map(tokenizers, args) -> None:
    t0 = time.perf_counter()
    nearest_tokens(["warm", "up"], ["warp", "u"])
    compile_s = time.perf_counter() - t0

    strings, strings_s = {}, {}
    for name, tok in tokenizers.items():
        t0 = time.perf_counter()
        strings[name] = vocab_strings(tok)
        strings_s[name] = time.perf_counter() - t0

    rows = []
    total_ours = 0.0
    for src, dst in [("Gemma-3", "SmolLM2"), ("SmolLM2", "Gemma-3")]:
        s_str, d_str = strings[src], strings[dst]
        t0 = time.perf_counter()
        mapping = build_vocab_map(s_str, d_str)
        ours_s = time.perf_counter() - t0
        total_ours += ours_s

        rng = random.Random(0)
        timed = [i for i in rng.sample(range(len(s_str)), args.ref_tokens) if s_str[i]]
        t0 = time.perf_counter()
        for i in timed:
            ref.nearest_first_min(s_str[i], d_str, Levenshtein.distance)
        ref_per_token = (time.perf_counter() - t0) / len(timed)
        ref_full = ref_per_token * len(s_str)
        # Same tie-break as the pure-Python reference (slower: it also compares prefixes).
        tied = timed[: args.tie_tokens]
        ref_ids = ref.vocab_map([s_str[i] for i in tied], d_str, Levenshtein.distance)
        tie_mismatch = sum(int(a != b) for a, b in zip(mapping[tied].tolist(), ref_ids))

        check = [i for i in random.Random(1).sample(range(len(s_str)), args.check_tokens) if s_str[i]]
        candidates = [s for s in d_str if s]
        brute = process.cdist(
            [s_str[i] for i in check], candidates, scorer=Levenshtein.distance, dtype=np.int32, workers=-1
        ).min(axis=1)
        ours_d = np.array([Levenshtein.distance(s_str[i], d_str[mapping[i]]) for i in check])
        dist_mismatch = int((ours_d != brute).sum())

        rows.append(
            [
                f"{src} → {dst} ({len(s_str):,} → {len(d_str):,})",
                f"{fmt_s(ref_full)} (extrapolated from {len(timed)} tokens, {ref_per_token * 1000:.1f} ms/token)",
                fmt_s(ours_s),
                f"{ref_full / ours_s:,.0f}×",
                f"{dist_mismatch} / {len(check)} min-distance; {tie_mismatch} / {len(tied)} ids",
            ]
        )
    rows.append(["both directions", "", fmt_s(total_ours), "", ""])
    table(
        "Vocabulary map (MinED)",
        ["direction", "reference (brute force)", "ours", "ratio", "mismatches"],
        rows,
    )
    print(
        f"\nNormalised vocab strings: Gemma-3 {fmt_s(strings_s['Gemma-3'])}, SmolLM2 {fmt_s(strings_s['SmolLM2'])}; "
        f"First Numba call in this process (loads the on-disk JIT cache; a cold compile, once per install, takes ~20-40 s here): {fmt_s(compile_s)}."
    )
    bench_vocab_map.strings = strings


def bench_dtw(tokenizers, strings, args) -> None:
    from fedmkt.data.tasks import load_task

    passages = [e.prompt for e in load_task("boolq")]
    gemma, smol = tokenizers["Gemma-3"], tokenizers["SmolLM2"]
    pairs = []
    cursor = 0
    while len(pairs) < args.pairs:
        text, n = "", 0
        while n < args.length:
            text += passages[cursor] + "\n\n"
            cursor += 1
            n = min(
                len(gemma(text, add_special_tokens=False).input_ids),
                len(smol(text, add_special_tokens=False).input_ids),
            )
        a = [strings["Gemma-3"][i] for i in gemma(text, add_special_tokens=False).input_ids[: args.length]]
        b = [strings["SmolLM2"][i] for i in smol(text, add_special_tokens=False).input_ids[: args.length]]
        pairs.append((a, b))
    dtw_path(pairs[0][0][:4], pairs[0][1][:4])  # JIT warm-up

    ref_s = ours_s = 0.0
    mismatches = 0
    for a, b in pairs:
        t0 = time.perf_counter()
        expected = ref.dtw_path(a, b, Levenshtein.distance)
        ref_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        got = dtw_path(a, b)
        ours_s += time.perf_counter() - t0
        mismatches += int(got != expected)
    n = len(pairs)
    table(
        f"Sequence DTW ({n} real text pairs, {args.length} × {args.length} tokens, Gemma-3 vs SmolLM2)",
        ["", "reference (pure Python)", "ours", "ratio", "paths differing"],
        [["per pair", fmt_s(ref_s / n), fmt_s(ours_s / n), f"{ref_s / ours_s:,.0f}×", f"{mismatches} / {n}"]],
    )


def bench_sequence_modes(tokenizers, args) -> None:
    from fedmkt.alignment import TokenAligner
    from fedmkt.data.tasks import load_task
    from fedmkt.models import cache_root

    passages = [e.prompt for e in load_task("boolq")]
    rows = []
    for teacher, receiver in [("SmolLM2", "Gemma-3"), ("Gemma-3", "SmolLM2")]:
        t_tok, r_tok = tokenizers[teacher], tokenizers[receiver]
        aligner = TokenAligner(t_tok, r_tok, cache_root() / "vocab_maps")
        pairs, cursor = [], 0
        while len(pairs) < args.pairs:
            text = ""
            while min(len(t_tok(text).input_ids), len(r_tok(text).input_ids)) < args.length:
                text += passages[cursor] + "\n\n"
                cursor += 1
            pairs.append(
                (torch.tensor(t_tok(text).input_ids[: args.length]), torch.tensor(r_tok(text).input_ids[: args.length]))
            )
        cells = []
        for mode in ("dtw", "offsets"):
            aligner.sequence_alignment = mode
            aligner.match_positions(pairs[0][0][:4], pairs[0][1][:4])  # JIT warm-up
            matched = total = 0
            t0 = time.perf_counter()
            for t_ids, r_ids in pairs:
                got = aligner.match_positions(t_ids, r_ids)
                matched += int((got[:-1] >= 0).sum())
                total += len(r_ids) - 1
            cells.append((time.perf_counter() - t0, matched / total))
        (dtw_s, dtw_share), (off_s, off_share) = cells
        n = len(pairs)
        rows.append(
            [
                f"{teacher} → {receiver}",
                f"{fmt_s(dtw_s / n)} ({dtw_share:.1%})",
                f"{fmt_s(off_s / n)} ({off_share:.1%})",
                f"{dtw_s / off_s:,.0f}×",
            ]
        )
    table(
        f"Sequence alignment per sample ({args.pairs} BoolQ texts cut to {args.length} tokens; positions matched)",
        ["teacher → receiver", "dtw", "offsets", "ratio"],
        rows,
    )


def bench_reindex(args) -> None:
    # One intra-op thread: these are small tensor ops, and on a shared 2-core machine a second
    # torch thread mostly waits for a busy core (measured 10-30x slower, pure noise).
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    vocab_t, vocab_r, k, length = 262_144, 49_152, args.top_k, args.length
    vmap = torch.randint(-1, vocab_r, (vocab_t,), generator=gen)
    vmap[torch.rand(vocab_t, generator=gen) < 0.7] //= 8  # plenty of duplicate receiver ids
    cases = []
    for _ in range(args.samples):
        ids = torch.randint(0, vocab_t, (length, k), generator=gen)
        logits = torch.randn(length, k, generator=gen) * 3
        matched = torch.randint(-1, length, (length,), generator=gen)
        fallback = torch.randint(-1, vocab_r, (length,), generator=gen)
        cases.append((ids, logits, matched, fallback))
    align_topk(*cases[0][:3], vmap, cases[0][3])  # warm-up

    ref_s = ours_s = 0.0
    mismatches = 0
    vmap_list = vmap.tolist()
    for ids, logits, matched, fallback in cases:
        il, ll, ml, fl = ids.tolist(), logits.double().tolist(), matched.tolist(), fallback.tolist()
        t0 = time.perf_counter()
        exp_ids, exp_probs = ref.align_topk(il, ll, ml, vmap_list, fl, 1.0, k)
        ref_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        got_ids, got_probs = align_topk(ids, logits, matched, vmap, fallback)
        ours_s += time.perf_counter() - t0
        bad_rows = (got_ids != torch.tensor(exp_ids)).any(1) | (
            (got_probs - torch.tensor(exp_probs, dtype=torch.float32)).abs() > 1e-6
        ).any(1)
        mismatches += int(bad_rows.sum())
    table(
        f"Top-k re-indexing ({args.samples} samples × {length} positions × k={k}, teacher vocab 262,144, torch 1 thread)",
        ["", "reference (Python loop)", "ours (vectorised)", "ratio", "rows differing"],
        [
            [
                "all samples",
                fmt_s(ref_s),
                fmt_s(ours_s),
                f"{ref_s / ours_s:,.0f}×",
                f"{mismatches} / {args.samples * length}",
            ]
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller samples")
    parser.add_argument("--ref-tokens", type=int, default=None, help="tokens per direction timed with brute force")
    parser.add_argument(
        "--tie-tokens", type=int, default=5, help="tokens per direction checked vs the tie-break reference"
    )
    parser.add_argument("--check-tokens", type=int, default=None, help="tokens per direction checked vs brute force")
    parser.add_argument("--pairs", type=int, default=None, help="text pairs for DTW")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--samples", type=int, default=None, help="samples for re-indexing")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--stages", default="vocab,dtw,sequence,reindex")
    args = parser.parse_args()
    defaults = {"ref_tokens": (10, 40), "check_tokens": (500, 2000), "pairs": (2, 8), "samples": (4, 32)}
    for key, (quick, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)

    print(
        f"Machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}. "
        "Other processes may share these cores: wall times are indicative."
    )
    tokenizers = load_pair()
    stages = args.stages.split(",")
    if "vocab" in stages or "dtw" in stages:
        if "vocab" in stages:
            bench_vocab_map(tokenizers, args)
            strings = bench_vocab_map.strings
        else:
            strings = {name: vocab_strings(tok) for name, tok in tokenizers.items()}
        if "dtw" in stages:
            bench_dtw(tokenizers, strings, args)
    if "sequence" in stages:
        bench_sequence_modes(tokenizers, args)
    if "reindex" in stages:
        bench_reindex(args)


if __name__ == "__main__":
    main()
