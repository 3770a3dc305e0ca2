"""What a GPU does with fedmkt's phases: tokens/s, model-FLOP utilisation and peak memory per phase.

Full-size Gemma-3-270M and SmolLM2-135M with random weights (the config.json and tokenizer that
`gpu_check.py assets` writes: no weights, no network), LoRA as in demo.yaml, bf16 weights, at
length 512:

  fine_tune   training steps, batch 4, task CE on the last 15 % of each row (answers)
  distill     training steps, batch 4, per-sample lambda*CE + (1-lambda)*KD with top-16 targets at every position
  share       the public-logit pass, batch 16: top-k, log-sum-exp and label log-probabilities per position
  evaluate    ARC-Easy multiple choice (embedded questions), questions per second

MFU counts 6 x parameters x tokens for a training step and 2 x parameters x tokens for a forward
(the usual approximation; the output head counts in full although fedmkt runs it only on the rows
it reads, so MFU reads low where that saving is large) against the device's dense bf16 peak
(`--peak-tflops`, default from the device name: H100/H200 989). Peak memory is
`torch.cuda.max_memory_allocated` per phase after `reset_peak_memory_stats`.

    python benchmarks/gpu_throughput.py --assets gpu_check_assets          # on the GPU (a few minutes)
    python benchmarks/gpu_throughput.py --assets gpu_check_assets --device cpu --quick   # dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 peak per device family (TFLOP/s)."""

MODELS = {"gemma3-270m": "gemma3", "smollm2-135m": "smollm2"}


def build(assets: Path, name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A PartyModule with random full-size weights (LoRA r=8 on q/k/v/o) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
    from fedmkt.party_module import PartyModule

    folder = assets / MODELS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    module = PartyModule(
        model,
        LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        OptimizerConfig(lr=1e-4),
        TransferConfig(top_k=16, ce_weight=0.9),
        name=name,
    ).to(device)
    return module, AutoTokenizer.from_pretrained(folder)


def batch(rows: int, length: int, vocab: int, device: torch.device, kd: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (rows, length), generator=g)
    targets = torch.full_like(input_ids, -100)
    answer = int(length * 0.85)
    targets[:, answer - 1 : -1] = input_ids[:, answer:]
    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "targets": targets,
        "index": torch.arange(rows),
    }
    if kd:
        out["kd_ids"] = torch.stack([torch.randperm(vocab, generator=g)[:16] for _ in range(rows * length)]).view(
            rows, length, 16
        )
        out["kd_probs"] = torch.softmax(torch.randn(rows, length, 16, generator=g), -1)
        out["kd_mask"] = torch.ones(rows, length, dtype=torch.bool)
        out["kd_mask"][:, -1] = False
        out["kd_eligible"] = out["kd_mask"].clone()
    return {k: v.to(device) for k, v in out.items()}


def timed(device: torch.device, run, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak memory in GiB) of `run()`, after one warm-up call."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def measure(args: argparse.Namespace, name: str) -> list[dict]:
    from fedmkt.data.tasks import load_task
    from fedmkt.evaluation import evaluate_multiple_choice

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module, tokenizer = build(Path(args.assets), name, device, dtype)
    params = sum(p.numel() for p in module.parameters())
    vocab = module.vocab_size
    length = 64 if args.quick else 512
    train_rows, share_rows = (2, 4) if args.quick else (4, 16)
    repeats = 1 if args.quick else 5
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    rows = []

    def step(kd: bool):
        data = batch(train_rows, length, vocab, device, kd)

        def run():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = module.training_step(data, 0)
            loss.backward()
            optimizer.step()

        return run

    for phase, run, tokens, flops_per_token in (
        ("fine_tune", step(False), train_rows * length, 6 * params),
        ("distill", step(True), train_rows * length, 6 * params),
    ):
        seconds, peak = timed(device, run, repeats)
        rows.append(_row(name, phase, tokens / seconds, flops_per_token, peak, args))
    share = batch(share_rows, length, vocab, device, False)

    def predict():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            module.predict_step(share, 0)

    seconds, peak = timed(device, predict, repeats)
    rows.append(_row(name, "share", share_rows * length / seconds, 2 * params, peak, args))
    questions = load_task("arc_easy")[: 16 if args.quick else 256]
    module.eval()

    def evaluate():
        evaluate_multiple_choice(module.model, tokenizer, questions, batch_size=16, max_length=length, device=device)

    seconds, peak = timed(device, evaluate, 1)
    rows.append({"model": name, "phase": "evaluate", "questions_per_s": len(questions) / seconds, "peak_gib": peak})
    return rows


def _row(name: str, phase: str, tokens_per_s: float, flops_per_token: float, peak: float, args) -> dict:
    achieved = tokens_per_s * flops_per_token / 1e12
    return {
        "model": name,
        "phase": phase,
        "tokens_per_s": tokens_per_s,
        "tflops": achieved,
        "mfu": achieved / args.peak_tflops if args.peak_tflops else None,
        "peak_gib": peak,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", required=True, help="the folder `gpu_check.py assets` wrote")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="length 64, tiny batches, one repeat (a dry run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # the phases run without a Trainer here
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device. Fix: run on a GPU machine, or --device cpu --quick for a dry run")
        name = torch.cuda.get_device_name(0)
        if args.peak_tflops is None:
            args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        print(f"device: {name}; bf16 peak {args.peak_tflops} TFLOP/s")
    rows = []
    for model in MODELS:  # one at a time: the first model's memory is freed before the second loads
        rows += measure(args, model)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | phase | tokens/s | questions/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else "–"
        print(
            f"| {row['model']} | {row['phase']} | {row.get('tokens_per_s', float('nan')):,.0f} | "
            f"{row.get('questions_per_s', float('nan')):.1f} | {row.get('tflops', float('nan')):.1f} | {mfu} | "
            f"{row['peak_gib']:.2f} |"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
