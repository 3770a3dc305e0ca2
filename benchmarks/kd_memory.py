"""Peak memory of the KD loss (dense-target reference vs sparse top-k loss) and of the whole training path.

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

The second table measures the training path a party runs, from the final hidden states ``[B, L, H]``
(H = 640, Gemma-3-270M's width) to the gradient of those states, in fp32 and bf16:

  logits-path   the path before the chunked head: ``lm_head`` on every position ([B, L, V] logits),
                then task CE and sparse KD on those logits (each allocating its own [B, L, V] gradient)
  chunked-head  ``fedmkt.head.head_training_loss``: the head a chunk of rows at a time, CE and KD
                and the hidden states' gradient computed in the same pass; no [B, L, V] tensor

"Added peak" is again the high-water mark minus the memory held before the call (hidden states,
head weight, targets), so it counts the logits, their gradients and every temporary.

    python benchmarks/kd_memory.py --path training    # only the training-path table
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
HEAD_VARIANTS = ("logits-path", "chunked-head")
HIDDEN = 640  # Gemma-3-270M's hidden size
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


def _head_inputs(args: argparse.Namespace):
    """Hidden states (a leaf), a head weight, labels on ~15 % of positions and top-k targets everywhere."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(args.batch, args.length, HIDDEN, generator=g).to(dtype)
    weight = (torch.randn(args.vocab, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    labels = torch.randint(0, args.vocab, (args.batch, args.length), generator=g)
    labels[torch.rand(args.batch, args.length, generator=g) > 0.15] = -100
    base = torch.randint(0, args.vocab, (args.batch, args.length, 1), generator=g)
    ids = (base + torch.randperm(args.vocab, generator=g)[: args.k]) % args.vocab
    probs = torch.softmax(torch.randn(args.batch, args.length, args.k, generator=g) * 2, dim=-1)
    return hidden, weight, labels, ids, probs


def head_worker(args: argparse.Namespace) -> None:
    import torch

    from fedmkt.head import OutputHead, head_training_loss
    from fedmkt.losses import loss_weights, sparse_kd_loss

    hidden, weight, labels, ids, probs = _head_inputs(args)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    ce_w, kd_w = loss_weights(labels != -100, mask, mask, 0.9, args.temperature)

    def logits_path(h):
        logits = h @ weight.T  # [B, L, V], as lm_head computes it
        keep = labels != -100
        label_ids = torch.where(keep, labels, -1).unsqueeze(-1)
        ce = sparse_kd_loss(logits, label_ids, keep.float().unsqueeze(-1), chunk_size=args.chunk_size)
        kd = sparse_kd_loss(logits, ids, probs, args.temperature, args.kind, args.chunk_size)
        return (ce * ce_w).sum() + (kd * kd_w).sum()

    def chunked_head(h):
        rows = h.reshape(-1, HIDDEN)
        head = OutputHead(weight)
        loss, _, _ = head_training_loss(
            head,
            rows,
            labels.reshape(-1),
            ce_w.reshape(-1),
            ids.reshape(-1, args.k),
            probs.reshape(-1, args.k),
            kd_w.reshape(-1),
            args.temperature,
            args.kind,
        )
        return loss

    run = logits_path if args.variant == "logits-path" else chunked_head
    small = hidden[:1, :8].clone().requires_grad_(True)  # warm-up, as in `worker`
    saved = labels, ids, probs, ce_w, kd_w
    labels, ids, probs, ce_w, kd_w = (t[:1, :8] for t in saved)
    run(small).backward()
    labels, ids, probs, ce_w, kd_w = saved
    del small
    hidden.requires_grad_(True)
    exact = _reset_peak()
    base_kib = _status_kib("VmRSS") if exact else max(_status_kib("VmRSS"), _status_kib("VmHWM"))
    t0 = time.perf_counter()
    loss = run(hidden)
    loss.backward()
    wall = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    out = Path(args.out)
    np.save(out.with_suffix(".loss.npy"), np.array([float(loss)]))
    np.save(out.with_suffix(".grad.npy"), hidden.grad.float().numpy())
    print(
        json.dumps(
            {
                "variant": args.variant,
                "dtype": args.dtype,
                "added_mib": (peak_kib - base_kib) / 1024,
                "wall_s": wall,
                "exact_peak_reset": exact,
            }
        )
    )


def training_path_table(args: argparse.Namespace, tmp: str) -> None:
    """Run both training-path variants per dtype in fresh subprocesses and print their added peaks."""
    print(
        f"\ntraining path: hidden [{args.batch}, {args.length}, {HIDDEN}] -> head (V={args.vocab:,}) -> CE (15 % of "
        f"positions) + KD (k={args.ks[0]}, every position) -> gradient of the hidden states"
    )
    rows = []
    for dtype in args.dtypes:
        results = {}
        for variant in HEAD_VARIANTS:
            out = Path(tmp) / f"{variant}_{dtype}"
            results[variant] = _subprocess(
                args,
                ["--variant", variant, "--dtype", dtype, "--k", str(args.ks[0]), "--out", str(out)],
            )
            results[variant]["out"] = out
        base = results["logits-path"]
        base_loss = float(np.load(base["out"].with_suffix(".loss.npy"))[0])
        base_grad = np.load(base["out"].with_suffix(".grad.npy"))
        for variant in HEAD_VARIANTS:
            r = results[variant]
            r["dloss"] = abs(float(np.load(r["out"].with_suffix(".loss.npy"))[0]) - base_loss)
            r["dgrad"] = float(np.abs(np.load(r["out"].with_suffix(".grad.npy")) - base_grad).max())
            r["ratio"] = r["added_mib"] / base["added_mib"]
            rows.append(r)
    print("| dtype | variant | added peak MiB | ratio vs logits-path | wall s | max abs dloss | max abs dgrad |")
    print("|" + "---|" * 7)
    for r in rows:
        print(
            f"| {r['dtype']} | {r['variant']} | {r['added_mib']:,.0f} | {r['ratio']:.3f} | {r['wall_s']:.2f} | "
            f"{r['dloss']:.2e} | {r['dgrad']:.2e} |"
        )
    for r in rows:
        if r["variant"] == "chunked-head":
            agree = (
                ""
                if r["dtype"] != "float32"
                else f"; loss and gradient within 1e-5: {max(r['dloss'], r['dgrad']) <= 1e-5}"
            )
            print(f"{r['dtype']} chunked-head: added peak <= 1/10 of the logits path: {r['ratio'] <= 0.1}{agree}")


def _subprocess(args: argparse.Namespace, extra: list[str]) -> dict:
    """One measurement in a fresh interpreter (its own high-water mark), returning its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    for flag, value in (
        ("--vocab", args.vocab),
        ("--batch", args.batch),
        ("--length", args.length),
        ("--temperature", args.temperature),
        ("--kind", args.kind),
        ("--chunk-size", args.chunk_size),
        ("--seed", args.seed),
        ("--device", args.device),
    ):
        cmd += [flag, str(value)]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(extra[:2])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    p.add_argument("--path", choices=["loss", "training", "both"], default="both", help="which table(s) to print")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS + HEAD_VARIANTS, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size is None:
        from fedmkt.losses import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.variant in HEAD_VARIANTS:
        head_worker(args)
        return
    if args.variant:
        worker(args)
        return
    if args.path == "training":
        with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kd_memory_") as tmp:
            training_path_table(args, tmp)
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
    if args.path == "both":
        with tempfile.TemporaryDirectory(dir=args.scratch, prefix="kd_memory_") as tmp:
            training_path_table(args, tmp)


if __name__ == "__main__":
    main()
