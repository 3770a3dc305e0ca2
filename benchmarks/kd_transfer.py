"""Does distillation alone move a teacher's knowledge into a student, within and across tokenizers?

KD only (lambda = 0: no labels), no private data, every public sample distilled (`selection: all`),
on the embedded ARC-Easy split (held-out questions, a public part, and a labelled part the teachers
fine-tune on). Three pairs, each against a control:

  same_tokenizer    SmolLM2 fine-tuned on the labelled part  -> a fresh SmolLM2
  cross_to_gemma    that fine-tuned SmolLM2                  -> a fresh Gemma-3-270M
  cross_to_smollm2  a Gemma fine-tuned on the labelled part  -> a fresh SmolLM2
  control           the same pair, with the teacher's top-k logits replaced by equal values (same
                    ids and positions, and in tail mode the same top-k mass, but no ranking), so
                    what a control gains is not the teacher's knowledge

For each pair: the teacher's and the student's zero-shot accuracy, the student's after KD and the
control's, each with its 95 % Wilson interval; the KD-minus-control difference with a paired
bootstrap interval over the same questions; and `gap_closed`, the share of the teacher-minus-student
gap that KD closes. Where transfer loses knowledge across tokenizers, `alignment` gives the numbers
to find where: positions matched one-to-one, teacher top-k ids with no receiver token, ids that
collide on one receiver token, and the teacher's probability mass left outside its top-k.

    OMP_NUM_THREADS=2 python benchmarks/kd_transfer.py                       # writes benchmarks/results/kd_transfer.json
    python benchmarks/kd_transfer.py --scale quick                           # the same steps in minutes
    python benchmarks/kd_transfer.py --try tail --override transfer.topk_target=tail
    OMP_NUM_THREADS=2 python benchmarks/kd_transfer.py --unlabelled          # writes benchmarks/results/kd_transfer_unlabelled.json

`--unlabelled` reads the public part without its answers (`data.public_labels: false`): the
teacher shares along its own answers, and the gold public answers are never read. Each student is
then compared with two control teachers (`transfer.teacher`): `hard`, the teacher's own answers
with flat top-k values (the `control` of the labelled run, so `control_*` holds it), and `random`,
an option drawn uniformly with flat values (what the format alone gives).

Every step (teacher fine-tuning, each evaluation, each distillation) is stored in `--state-dir`
(default `$FEDMKT_CACHE/kd_transfer`, else `~/.cache/fedmkt/kd_transfer`) as soon as it ends, keyed
by the settings it depends on, so the command resumes where it stopped, over several sittings,
and a try reuses every step its change cannot move. Nothing large is written to the repository:
the results JSON only.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch

from fedmkt.config import ModelSpec, RunConfig, parse_run_config
from fedmkt.data.parts import PartyData, party_data
from fedmkt.data.tokenize import encode_prompt_answer
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import paired_bootstrap
from fedmkt.federation.parties import build_participant, quiet_lightning
from fedmkt.files import atomic_write_bytes, atomic_write_text
from fedmkt.models import cache_root
from fedmkt.payload import KnowledgePayload
from fedmkt.received import PublicTokens
from fedmkt.selection import scored_bytes, scored_targets
from fedmkt.teacher_controls import flat_topk

SMOLLM2 = "embedded:smollm2-135m-instruct"
GEMMA = "embedded:gemma3-270m"
LEARNING_RATES = {SMOLLM2: 3.0e-4, GEMMA: 2.0e-4}
"""demo.yaml's learning rates: SmolLM2 as a client, Gemma as the server."""

PAIRS = {
    "same_tokenizer": (SMOLLM2, SMOLLM2),
    "cross_to_gemma": (SMOLLM2, GEMMA),
    "cross_to_smollm2": (GEMMA, SMOLLM2),
}
"""Pair name -> (teacher model, student model)."""

SCALES = {
    "full": {"eval_size": 1000, "public_size": 900, "labelled_size": None},
    "quick": {"eval_size": 40, "public_size": 24, "labelled_size": 24},
}
"""Held-out questions, public questions, and questions the teachers fine-tune on (None: the rest)."""

KD_SETTINGS = {"transfer.ce_weight": "0.0", "transfer.selection": "all"}
"""What makes a distillation KD alone: no label term, every public sample distilled."""


@dataclass(frozen=True)
class Bench:
    """One benchmark's settings: the scale, the run config every party derives from, and where state lives."""

    scale: str
    config: RunConfig
    state: Path

    def key(self, *parts: Any) -> str:
        """A step's name: its parts plus a hash of the settings it depends on."""
        text = json.dumps([self.scale, *[p if isinstance(p, (str, int, float)) else asdict(p) for p in parts]])
        return (
            "-".join(str(p) for p in parts if isinstance(p, str)) + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]
        )


CONTROLS = ("hard", "random")
"""The control teachers of an `--unlabelled` run, each a `transfer.teacher` setting of the real teacher."""


def base_config(scale: str, overrides: list[str]) -> RunConfig:
    """demo.yaml at the benchmark's scale: one client (its private part is the teachers' labelled part)."""
    sizes = SCALES[scale]
    arguments = ["--config", "demo", "--logging.wandb", "false", "--logging.csv", "false"]
    arguments += ["--data.eval_size", str(sizes["eval_size"]), "--data.public_size", str(sizes["public_size"])]
    if sizes["labelled_size"] is not None:
        arguments += ["--data.pool_size", str(sizes["public_size"] + sizes["labelled_size"])]
    else:
        arguments += ["--data.pool_size", "null"]
    for item in [*overrides, *(f"{k}={v}" for k, v in KD_SETTINGS.items())]:
        key, _, value = item.partition("=")
        arguments += [f"--{key}", value]
    config = parse_run_config(arguments)
    config.clients = config.clients[:1]
    for party in (config.server, config.clients[0]):
        party.trainer.enable_progress_bar = True
    return config


def pair_config(bench: Bench, teacher: str, student: str) -> RunConfig:
    """The teacher as the server, the student as client_0 (so each knows the other's tokenizer)."""
    config = deepcopy(bench.config)
    config.server.model = ModelSpec(source=teacher, dtype="float32")
    config.server.optimizer.lr = LEARNING_RATES[teacher]
    config.clients[0].model = ModelSpec(source=student, dtype="float32")
    config.clients[0].optimizer.lr = LEARNING_RATES[student]
    config.run_dir = str(bench.state / "runs")
    return config


_PROGRAM = Path(sys.argv[0]).stem or "kd_transfer"
"""The benchmark running (dp_cost.py shares these steps), as its progress lines name it."""


def cached(bench: Bench, name: str, compute: Callable[[], dict]) -> dict:
    """The stored result of step `name`, or computed now and stored before anything else runs."""
    path = bench.state / f"{name}.json"
    if path.is_file():
        print(f"[{_PROGRAM}] {name}: reused {path}", flush=True)
        return json.loads(path.read_text())
    print(f"[{_PROGRAM}] {name}: running", flush=True)
    start = time.perf_counter()
    result = compute() | {"seconds": round(time.perf_counter() - start, 1)}
    atomic_write_text(path, json.dumps(result))
    print(f"[{_PROGRAM}] {name}: done in {result['seconds']:.0f} s ({_accuracy_text(result)})", flush=True)
    return result


def _accuracy_text(result: dict) -> str:
    return f"accuracy {result['eval_accuracy']:.3f}" if "eval_accuracy" in result else "no evaluation"


def eval_scores(stats: dict) -> dict:
    keep = ("eval_accuracy", "eval_accuracy_ci", "eval_n", "eval_correct", "eval_seconds")
    return {key: stats[key] for key in keep}


def release(*objects: Any) -> None:
    del objects
    gc.collect()


def teacher_step(bench: Bench, model: str, data: PartyData, unlabelled: bool = False) -> tuple[dict, dict[str, Path]]:
    """Fine-tune `model` on the labelled part, evaluate it, and store its knowledge of the public part.

    Returns the result and the payload files by teacher kind: `real`, and with `unlabelled` the
    controls of `CONTROLS` shared by the same fine-tuned teacher.
    """
    config = pair_config(bench, model, model)
    parts = ["teacher", model.split(":")[-1], config.server, config.transfer.top_k, config.transfer.temperature]
    name = bench.key(*parts, *(["unlabelled"] if unlabelled else []))
    kinds = ("real", *CONTROLS) if unlabelled else ("real",)
    paths = {kind: bench.state / (f"{name}.payload" if kind == "real" else f"{name}-{kind}.payload") for kind in kinds}

    def compute() -> dict:
        teacher = build_participant(config, "server", data=data)
        stats = teacher.fine_tune(1)
        scores = eval_scores(teacher.evaluate())
        for kind, path in paths.items():
            teacher.transfer = replace(teacher.transfer, teacher=kind)
            atomic_write_bytes(path, teacher.share_knowledge(1).to_bytes())
        accuracy = {"public_answer_accuracy": teacher.public_answer_accuracy} if unlabelled else {}
        release(teacher)
        return scores | {"task_loss": stats.task_loss} | accuracy

    if not all(path.is_file() and _readable(path) for path in paths.values()):
        # a result without its payloads, or with one this version cannot read, is incomplete
        (bench.state / f"{name}.json").unlink(missing_ok=True)
    return cached(bench, name, compute), paths


def _readable(payload_path: Path) -> bool:
    try:
        KnowledgePayload.from_bytes(payload_path.read_bytes())
    except FedMKTError:
        return False
    return True


def payload_digest(payload_path: Path) -> int:
    """The payload's content as a number for a step key: a student distilled from other bytes is another step."""
    return int(hashlib.sha256(payload_path.read_bytes()).hexdigest()[:15], 16)


def zero_shot_step(bench: Bench, model: str, data: PartyData) -> dict:
    config = pair_config(bench, model, model)
    name = bench.key("zero_shot", model.split(":")[-1], config.clients[0].model)

    def compute() -> dict:
        student = build_participant(config, "client_0", data=data)
        scores = eval_scores(student.evaluate())
        release(student)
        return scores

    return cached(bench, name, compute)


def student_step(
    bench: Bench, pair: str, control: bool, payload_path: Path, data: PartyData, kind: Optional[str] = None
) -> dict:
    """Distil a fresh student from the teacher's payload (or the control's) and evaluate it.

    `control` flattens the payload's top-k here; a payload a control teacher already shared is given
    with its own `kind` name and `control` off.
    """
    teacher, student = PAIRS[pair]
    config = pair_config(bench, teacher, student)
    kind = kind or ("control" if control else "kd")
    name = bench.key(pair, kind, config.clients[0], config.transfer, payload_path.name, payload_digest(payload_path))

    def compute() -> dict:
        payload = KnowledgePayload.from_bytes(payload_path.read_bytes())
        party = build_participant(config, "client_0", data=data)
        if control:
            tokenizer = party.alignment.teacher_tokenizers["server"]
            public = PublicTokens(tokenizer, party.data.public_examples, party.max_length)
            positions, rows = config.transfer.kd_positions, range(len(payload))
            examples = [party.data.public_examples[int(payload.sample_index[row])] for row in rows]
            payload = flat_topk(
                payload,
                lambda row: scored_targets(
                    *public(int(payload.sample_index[row]), payload.answer_text(row)), positions
                ),
                torch.tensor([scored_bytes(examples[row].prompt, payload.answer_text(row), positions) for row in rows]),
            )
        stats = party.distill(1, {"server": payload})
        scores = eval_scores(party.evaluate())
        alignment = alignment_losses(party, payload, data) if kind == "kd" else {}
        release(party)
        return scores | {"kd_loss": stats.kd_loss, "task_loss": stats.task_loss, "alignment": alignment}

    return cached(bench, name, compute)


def alignment_losses(party: Any, payload: KnowledgePayload, data: PartyData) -> dict:
    """Where a teacher's knowledge can be lost on its way to this student, counted over the public set.

    matched: share of the student's positions matched one-to-one to a teacher position (the rest
    get a one-hot on the next token); unmapped: share of the teacher's top-k slots, at matched
    positions, whose token has no receiver token; collided: share that land on a receiver id an
    earlier slot already took; outside_topk: the teacher's mean probability mass outside its top-k.
    """
    aligner = party.alignment.aligner("server")
    matched = positions = slots = unmapped = collided = 0
    for row in range(len(payload)):
        token_ids, topk_ids, _ = payload.sample(row)
        example = party.data.public_examples[int(payload.sample_index[row])]
        receiver_ids = encode_prompt_answer(
            party.tokenizer, example.prompt, payload.answer_text(row), party.max_length
        )[0]
        match = aligner.match_positions(token_ids, receiver_ids)
        positions += len(match)
        hit = match[match >= 0]
        matched += len(hit)
        mapped = aligner.vocab_map[topk_ids[hit]]
        slots += mapped.numel()
        unmapped += int((mapped < 0).sum())
        for ids in mapped.tolist():
            kept = [i for i in ids if i >= 0]
            collided += len(kept) - len(set(kept))
    probs = (payload.topk_logits.float() / payload.temperature - payload.logsumexp[:, None]).exp().sum(1)
    return {
        "matched": matched / max(positions, 1),
        "unmapped": unmapped / max(slots, 1),
        "collided": collided / max(slots, 1),
        "outside_topk": float(1 - probs.clamp(max=1).mean()),
    }


def cell(result: dict) -> dict:
    return {"acc": result["eval_accuracy"], "ci": list(result["eval_accuracy_ci"]), "n": result["eval_n"]}


def report(bench: Bench, overrides: list[str], results: dict) -> dict:
    """The results JSON: settings, n, and per pair the accuracies, the difference to the control and the gap closed."""
    pairs = {}
    for pair, (teacher, student) in PAIRS.items():
        if pair not in results:
            continue
        got = results[pair]
        teacher_acc = got["teacher"]["eval_accuracy"]
        zero_shot = got["zero_shot"]["eval_accuracy"]
        student_acc = got["kd"]["eval_accuracy"]
        diff, interval = paired_bootstrap(got["kd"]["eval_correct"], got["control"]["eval_correct"])
        controls = {}
        for control in CONTROLS if "random" in got else ():
            versus, versus_ci = paired_bootstrap(got["kd"]["eval_correct"], got[control]["eval_correct"])
            controls |= {
                f"{control}_control_acc": got[control]["eval_accuracy"],
                f"{control}_control_ci": list(got[control]["eval_accuracy_ci"]),
                f"diff_vs_{control}": {"diff": versus, "ci": versus_ci},
            }
        gap = teacher_acc - zero_shot
        pairs[pair] = {
            "teacher": teacher,
            "student": student,
            "teacher_acc": teacher_acc,
            "teacher_ci": list(got["teacher"]["eval_accuracy_ci"]),
            "student_zero_shot_acc": zero_shot,
            "student_zero_shot_ci": list(got["zero_shot"]["eval_accuracy_ci"]),
            "student_acc": student_acc,
            "ci": list(got["kd"]["eval_accuracy_ci"]),
            "control_acc": got["control"]["eval_accuracy"],
            "control_ci": list(got["control"]["eval_accuracy_ci"]),
            "diff_vs_control": {"diff": diff, "ci": interval},
            "gap_closed": (student_acc - zero_shot) / gap if gap > 0 else None,
            "control_gap_closed": (got["control"]["eval_accuracy"] - zero_shot) / gap if gap > 0 else None,
            "kd_loss": got["kd"]["kd_loss"],
            "alignment": got["kd"]["alignment"],
            "seconds": {part: got[part]["seconds"] for part in ("teacher", "zero_shot", "kd", *CONTROLS) if part in got}
            | {"control": got["control"]["seconds"]},
            **controls,
        }
        if "public_answer_accuracy" in got["teacher"]:
            pairs[pair]["teacher_public_answer_accuracy"] = got["teacher"]["public_answer_accuracy"]
    config = bench.config
    return {
        "settings": {
            "scale": bench.scale,
            "task": config.data.task,
            "public_size": config.data.public_size,
            "transfer": asdict(config.transfer),
            "learning_rates": {name.split(":")[-1]: lr for name, lr in LEARNING_RATES.items()},
            "distill_epochs": config.clients[0].distill_epochs,
            "teacher_fine_tune_epochs": config.server.local_epochs,
            "batch_size": config.clients[0].batch_size,
            "max_length": config.data.max_length,
            "overrides": overrides,
            "machine": machine(),
        },
        "public_labels": config.data.public_labels is not False,
        "n_eval": config.data.eval_size,
        "n_labelled": results.get("n_labelled"),
        "pairs": pairs,
    }


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def table(result: dict) -> str:
    """A Markdown table of the pairs (accuracy in %, intervals, difference to the control, gap closed)."""
    lines = [
        f"n = {result['n_eval']} held-out ARC-Easy questions; accuracy in % with its 95 % interval.",
        "",
        "| pair | teacher | student zero-shot | student after KD | control | KD − control | gap closed (control) |",
        "|---|---|---|---|---|---|---|",
    ]

    def pct(value: float, interval: list[float]) -> str:
        return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"

    def signed(diff: dict) -> str:
        return f"{100 * diff['diff']:+.1f} [{100 * diff['ci'][0]:+.1f}, {100 * diff['ci'][1]:+.1f}]"

    unlabelled = any("diff_vs_random" in pair for pair in result["pairs"].values())
    if unlabelled:  # the control is the hard teacher; the random one is a column of its own
        lines[2] = lines[2].replace(
            "| control | KD − control |", "| hard control | KD − hard | random control | KD − random |"
        )
        lines[3] = "|---|---|---|---|---|---|---|---|---|"
    for name, pair in result["pairs"].items():
        gap = "–" if pair["gap_closed"] is None else f"{pair['gap_closed']:.2f} ({pair['control_gap_closed']:.2f})"
        random = (
            f"| {pct(pair['random_control_acc'], pair['random_control_ci'])} | {signed(pair['diff_vs_random'])} "
            if unlabelled
            else ""
        )
        lines.append(
            f"| {name} | {pct(pair['teacher_acc'], pair['teacher_ci'])} "
            f"| {pct(pair['student_zero_shot_acc'], pair['student_zero_shot_ci'])} "
            f"| {pct(pair['student_acc'], pair['ci'])} | {pct(pair['control_acc'], pair['control_ci'])} "
            f"| {signed(pair['diff_vs_control'])} {random}| {gap} |"
        )
    return "\n".join(lines)


def run(scale: str, overrides: list[str], state: Path, pairs: list[str], unlabelled: bool = False) -> dict:
    quiet_lightning()
    config = base_config(scale, [*overrides, *(["data.public_labels=false"] if unlabelled else [])])
    bench = Bench(scale, config, state / scale)
    bench.state.mkdir(parents=True, exist_ok=True)
    split = party_data(config, "client_0")  # unlabelled: the public part without its answers (no gold)
    labelled = PartyData(split.public, split.private, split.evaluation, None, split.format)
    public_only = PartyData(split.public, [], split.evaluation, None, split.format)
    print(
        f"[kd_transfer] {len(split.evaluation)} held-out, {len(split.public)} public, {len(split.private)} labelled "
        f"questions; state in {bench.state}",
        flush=True,
    )
    results: dict = {"n_labelled": len(split.private)}
    teachers: dict[str, tuple[dict, Path]] = {}
    for pair in pairs:
        teacher, student = PAIRS[pair]
        if teacher not in teachers:
            teachers[teacher] = teacher_step(bench, teacher, labelled, unlabelled)
        teacher_result, payloads = teachers[teacher]
        results[pair] = {
            "teacher": teacher_result,
            "zero_shot": zero_shot_step(bench, student, public_only),
            "kd": student_step(bench, pair, False, payloads["real"], public_only),
        }
        if unlabelled:  # the hard teacher is the control: the same answers with flat top-k values
            for control in CONTROLS:
                results[pair][control] = student_step(bench, pair, False, payloads[control], public_only, control)
            results[pair]["control"] = results[pair]["hard"]
        else:
            results[pair]["control"] = student_step(bench, pair, True, payloads["real"], public_only)
    return report(bench, overrides, results)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a transfer/data setting")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--state-dir", type=Path, default=None, help="where each step's result is kept")
    parser.add_argument("--try", dest="try_name", default=None, help="write to results/kd_transfer/tries/NAME.json")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--unlabelled", action="store_true", help="the public part without its answers: teachers share their own"
    )
    args = parser.parse_args(argv)
    if args.override and not args.try_name and args.out is None:
        parser.error(
            "--override changes the settings: name the try with --try NAME (kd_transfer.json holds the defaults)"
        )
    state = args.state_dir or cache_root() / "kd_transfer"
    result = run(args.scale, args.override, state, args.pairs, args.unlabelled)
    results_dir = Path(__file__).parent / "results"
    stem = "kd_transfer_unlabelled" if args.unlabelled else "kd_transfer"
    if args.out is not None:
        out = args.out
    elif args.try_name:
        out = results_dir / "kd_transfer" / "tries" / f"{args.try_name}.json"
    elif args.scale == "full":
        out = results_dir / f"{stem}.json"
    else:
        out = state / args.scale / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    print(table(result))
    print(f"[kd_transfer] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
