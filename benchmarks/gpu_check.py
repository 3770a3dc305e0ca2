"""Helpers for `benchmarks/gpu_check.sh`: portable assets, the GPU config, and the run checks.

    python benchmarks/gpu_check.py assets DIR          # where the embedded model packages are installed
    python benchmarks/gpu_check.py config DIR OUT.yaml # tiny.yaml on CUDA in bf16-mixed, models from DIR (--device cpu: dry run)
    python benchmarks/gpu_check.py verify RUN_DIR      # finite losses, every adapter saved
    python benchmarks/gpu_check.py same RUN_A RUN_B    # an exact --resume: same numbers, same adapter bytes

`assets` writes only what tiny.yaml's random-init models need, each party's config.json and real
tokenizer (about 37 MiB: Gemma-3's 262,144-token vocabulary and SmolLM2's 49,152), so the check
can be copied to a GPU machine without the model packages or a network.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PARTIES = {"server": "gemma3", "client": "smollm2"}
TIMINGS = {"train_seconds", "eval_seconds"}  # wall-clock, never equal between two runs


def write_assets(directory: Path) -> None:
    """config.json + tokenizer of tiny.yaml's two base models, no weights."""
    from transformers import AutoConfig

    from fedmkt.config import ModelSpec
    from fedmkt.models import _loadable, load_tokenizer

    tiny = yaml.safe_load((REPO / "lightning_configs" / "tiny.yaml").read_text())
    for name, source in (
        ("gemma3", tiny["server"]["model"]["source"]),
        ("smollm2", tiny["clients"][0]["model"]["source"]),
    ):
        spec = ModelSpec(source)
        AutoConfig.from_pretrained(_loadable(spec, None).path).save_pretrained(directory / name)
        load_tokenizer(spec).save_pretrained(directory / name)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    print(f"assets in {directory}: {size / 2**20:.1f} MiB")


def write_config(assets: Path, out: Path, device: str = "cuda") -> None:
    """tiny.yaml with every party on one CUDA device in bf16-mixed, loading from `assets`.

    `device` cpu (32-true) is the dry run that checks the script's plumbing on a machine without a GPU.
    """
    config = yaml.safe_load((REPO / "lightning_configs" / "tiny.yaml").read_text())
    config["server"]["model"]["source"] = str(assets.resolve() / PARTIES["server"])
    for client in config["clients"]:
        client["model"]["source"] = str(assets.resolve() / PARTIES["client"])
    for party in [config["server"], *config["clients"]]:
        on_gpu = device == "cuda"
        party["trainer"] |= {
            "accelerator": "gpu" if on_gpu else "cpu",
            "devices": 1,
            "precision": "bf16-mixed" if on_gpu else "32-true",
        }
    out.write_text(yaml.safe_dump(config, sort_keys=False))


def verify(run_dir: Path) -> list[str]:
    """Problems with a finished run: non-finite losses or missing adapters (empty: none)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    problems = []
    for record in summary["rounds"]:
        for party, stats in record["parties"].items():
            if stats.get("failed"):
                problems.append(f"round {record['round']} {party} failed: {stats['failed']}")
            for key in ("task_loss", "kd_loss", "distill_task_loss"):
                value = stats.get(key)
                if value is not None and not math.isfinite(value):
                    problems.append(f"round {record['round']} {party} {key}={value}")
            if not (run_dir / "adapters" / f"round_{record['round']}" / party / "adapter_model.safetensors").is_file():
                problems.append(f"round {record['round']} {party}: adapter missing")
    if not summary["rounds"]:
        problems.append("no rounds recorded")
    return problems


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def differences(a: Path, b: Path) -> list[str]:
    """Where two runs differ: per-round numbers (timings aside) or adapter file bytes."""
    rounds_a = _without_timings(json.loads((a / "summary.json").read_text())["rounds"])
    rounds_b = _without_timings(json.loads((b / "summary.json").read_text())["rounds"])
    found = [] if rounds_a == rounds_b else ["summary.json rounds differ"]
    for weights in sorted((a / "adapters").rglob("adapter_model.safetensors")):
        twin = b / weights.relative_to(a)
        if not twin.is_file() or twin.read_bytes() != weights.read_bytes():
            found.append(f"{weights.relative_to(a)} differs")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("assets").add_argument("directory", type=Path)
    config = commands.add_parser("config")
    config.add_argument("assets", type=Path)
    config.add_argument("out", type=Path)
    config.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    commands.add_parser("verify").add_argument("run_dir", type=Path)
    same = commands.add_parser("same")
    same.add_argument("a", type=Path)
    same.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "assets":
        write_assets(args.directory)
    elif args.command == "config":
        write_config(args.assets, args.out, args.device)
    else:
        problems = verify(args.run_dir) if args.command == "verify" else differences(args.a, args.b)
        for problem in problems:
            print(f"FAIL: {problem}")
        if problems:
            return 1
        print(
            "ok: losses finite, adapters saved"
            if args.command == "verify"
            else "ok: resumed run equals the uninterrupted one, adapters bitwise"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
