"""Peak memory of the KD loss: dense-target reference vs fedmkt's sparse top-k loss.

Each variant runs forward + backward in its own fresh subprocess. The subprocess allocates the
student's logits ``[B, L, V]`` (fp32, a leaf that requires grad) and the top-k targets, warms the
code path up on a tiny slice, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``),
records the current RSS as the baseline, runs ``loss.sum().backward()`` and reads the high-water
mark again. "Added peak" = high-water mark - baseline, i.e. everything the loss adds beyond the
logits themselves, *including* the ``[B, L, V]`` gradient that autograd hands back for the logits.

Because every loss (even ``F.cross_entropy``) must produce that gradient, the table also reports
the added peak with one gradient-sized buffer subtracted ("excl. grad") for the variants that
allocate a separate gradient. The ``sparse-inplace`` variant writes the gradient into the logits'
own storage, so it has no separate gradient buffer and both accountings coincide for it.

Loss and gradient agreement with the dense reference is checked exactly (max |diff| over every
element), by having each subprocess write its gradient to a scratch file that the parent compares
chunk by chunk with numpy memmaps.

    python benchmarks/kd_memory.py                      # V=262,144, 4x512, k in {16, 128}
    python benchmarks/kd_memory.py --vocab 32768 --length 128   # quick
    python benchmarks/kd_memory.py --device cuda        # on a GPU: peaks from torch.cuda.max_memory_allocated

With ``--device cuda`` the logits live on the GPU and "added peak" is
``torch.cuda.max_memory_allocated()`` (after ``reset_peak_memory_stats``) minus the memory allocated
before the loss, i.e. the same accounting with the CUDA caching allocator's counters instead of RSS.

At small sizes one chunk (64 positions by default) is a large share of all positions, so the ratios
only mean something at realistic sizes; the quick run is for checking agreement and plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("dense", "sparse", "sparse-inplace")
MiB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _make_inputs(batch: int, length: int, vocab: int, k: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(batch, length, vocab)
    logits.normal_(generator=g)  # filled in place: no second [B, L, V] tensor ever exists
    logits.mul_(2.0)
    # k distinct ids per position: a random base plus k distinct offsets (mod V).
    base = torch.randint(0, vocab, (batch, length, 1), generator=g)
    offsets = torch.randperm(vocab, generator=g)[:k]
    ids = (base + offsets) % vocab
    probs = torch.softmax(torch.randn(batch, length, k, generator=g) * 2, dim=-1)
    empty = torch.rand(batch, length, k, generator=g) < 0.05  # a few empty (-1) slots
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    ids[0, :3] = -1  # and a few fully empty positions
    return logits, ids, probs


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kd_reference import dense_kd_loss_reference

    from fedmkt.losses import sparse_kd_loss

    def loss_fn(x, ids, probs):
        if args.variant == "dense":
            return dense_kd_loss_reference(x, ids, probs, args.temperature, args.kind)
        return sparse_kd_loss(
            x, ids, probs, args.temperature, args.kind, args.chunk_size, inplace_grad=args.variant == "sparse-inplace"
        )

    cuda = args.device == "cuda"
    logits, ids, probs = _make_inputs(args.batch, args.length, args.vocab, args.k, args.seed)
    if cuda:
        logits, ids, probs = logits.cuda(), ids.cuda(), probs.cuda()
    # Warm-up on a small copy so one-time allocations (thread pools, kernels) are not counted.
    small = logits[:1, :8].clone().requires_grad_(True)
    loss_fn(small, ids[:1, :8], probs[:1, :8]).sum().backward()
    del small
    logits.requires_grad_(True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        exact, base_kib = True, torch.cuda.memory_allocated() / 1024
    else:
        exact = _reset_peak()
        base_kib = _status_kib("VmRSS")
        if not exact:  # fall back to the lifetime peak; valid because the logits were the high point
            base_kib = max(base_kib, _status_kib("VmHWM"))
    t0 = time.perf_counter()
    loss = loss_fn(logits, ids, probs)
    loss.sum().backward()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak_kib = torch.cuda.max_memory_allocated() / 1024 if cuda else _status_kib("VmHWM")

    grad = logits.grad
    out = Path(args.out)
    np.save(out.with_suffix(".loss.npy"), loss.detach().cpu().numpy())
    with open(out.with_suffix(".grad.bin"), "wb") as fh:  # row blocks: no second whole copy on the host
        flat = grad.detach().reshape(-1, args.vocab)
        for start in range(0, flat.shape[0], 256):
            flat[start : start + 256].cpu().contiguous().numpy().tofile(fh)
    print(
        json.dumps(
            {
                "variant": args.variant,
                "k": args.k,
                "added_mib": (peak_kib - base_kib) / 1024,
                "grad_aliases_logits": grad.data_ptr() == logits.data_ptr(),
                "grad_mib": grad.numel() * grad.element_size() / MiB,
                "wall_s": wall,
                "exact_peak_reset": exact,
                "max_abs_grad": float(grad.abs().max()),
            }
        )
    )


def _max_abs_diff(a_path: Path, b_path: Path, rows: int, cols: int) -> float:
    a = np.memmap(a_path, dtype=np.float32, mode="r", shape=(rows, cols))
    b = np.memmap(b_path, dtype=np.float32, mode="r", shape=(rows, cols))
    worst = 0.0
    for s in range(0, rows, 64):
        worst = max(worst, float(np.abs(a[s : s + 64] - b[s : s + 64]).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--ks", type=int, nargs="+", default=[16, 128])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kind", choices=["ce", "kl"], default="ce")
    p.add_argument(
        "--chunk-size", type=int, default=None, help="positions per chunk (default: fedmkt.losses.DEFAULT_CHUNK_SIZE)"
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the logits live; cuda measures torch.cuda.max_memory_allocated",
    )
    p.add_argument("--scratch", default=None, help="folder for the per-variant gradient files")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        from fedmkt.losses import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.variant:
        worker(args)
        return
    if "dense" not in args.variants:
        p.error("--variants must include dense (it is the reference)")

    n_rows = args.batch * args.length
    tensor_mib = n_rows * args.vocab * 4 / MiB
    print(
        f"V={args.vocab:,}  B x L={args.batch}x{args.length}  kind={args.kind}  "
        f"T={args.temperature}  chunk={args.chunk_size} positions  fp32 on {args.device.upper()}"
    )
    print(
        f"one [B, L, V] fp32 tensor = {tensor_mib:,.0f} MiB; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible (shared; other processes may be running)"
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kd_memory_") as tmp:
        for k in args.ks:
            results = {}
            for variant in args.variants:
                out = Path(tmp) / f"{variant}_k{k}"
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--variant",
                    variant,
                    "--k",
                    str(k),
                    "--out",
                    str(out),
                    "--vocab",
                    str(args.vocab),
                    "--batch",
                    str(args.batch),
                    "--length",
                    str(args.length),
                    "--temperature",
                    str(args.temperature),
                    "--kind",
                    args.kind,
                    "--chunk-size",
                    str(args.chunk_size),
                    "--seed",
                    str(args.seed),
                    "--device",
                    args.device,
                ]
                env = dict(os.environ)
                repo = str(Path(__file__).resolve().parent.parent)
                env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{variant} k={k} failed:\n{proc.stderr[-3000:]}")
                results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
                results[variant]["out"] = out
            dense = results["dense"]
            dense_loss = np.load(dense["out"].with_suffix(".loss.npy"))
            for variant in args.variants:
                r = results[variant]
                loss = np.load(r["out"].with_suffix(".loss.npy"))
                r["dloss"] = float(np.abs(loss - dense_loss).max())
                r["dgrad"] = (
                    0.0
                    if variant == "dense"
                    else _max_abs_diff(
                        r["out"].with_suffix(".grad.bin"), dense["out"].with_suffix(".grad.bin"), n_rows, args.vocab
                    )
                )
                separate = 0.0 if r["grad_aliases_logits"] else r["grad_mib"]
                r["excl_mib"] = r["added_mib"] - separate
                rows.append(r)
            for variant in args.variants:
                r = results[variant]
                r["ratio"] = r["added_mib"] / dense["added_mib"]
                r["ratio_excl"] = r["excl_mib"] / dense["excl_mib"]
                r["out"].with_suffix(".grad.bin").unlink()

    header = (
        "| variant | k | added peak MiB (incl. grad) | ratio vs dense | added peak MiB "
        "(excl. grad buffer) | ratio vs dense | wall s | max abs dloss | max abs dgrad |"
    )
    print()
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['variant']} | {r['k']} | {r['added_mib']:,.0f} | {r['ratio']:.3f} | "
            f"{r['excl_mib']:,.0f} | {r['ratio_excl']:.3f} | {r['wall_s']:.2f} | "
            f"{r['dloss']:.2e} | {r['dgrad']:.2e} |"
        )
    exact = all(r["exact_peak_reset"] for r in rows)
    how = (
        "torch.cuda.max_memory_allocated after reset_peak_memory_stats"
        if args.device == "cuda"
        else "VmHWM after reset via /proc/self/clear_refs"
    )
    print(f"\npeak = {how}: {exact}; max |grad| = {max(r['max_abs_grad'] for r in rows):.3g}; objective = loss.sum()")
    ok = all(r["dloss"] <= 1e-5 and r["dgrad"] <= 1e-5 for r in rows)
    print("agreement within 1e-5:", ok)
    for r in rows:
        if r["variant"] != "dense":
            print(
                f"k={r['k']} {r['variant']}: <= 1/10 of dense incl. grad buffer: "
                f"{r['ratio'] <= 0.1}; excl. grad buffer: {r['ratio_excl'] <= 0.1}"
            )


if __name__ == "__main__":
    main()
