"""What `privacy.logit_noise` costs: the same federated run with noise 0, 1 and 3 on the shared logits.

    python benchmarks/privacy_noise.py                      # tiny.yaml, as shipped (2 rounds)
    python benchmarks/privacy_noise.py --demo               # also a reduced demo.yaml run (real models, 1 round)
    python benchmarks/privacy_noise.py --skip-tiny --real-logits 20   # noise on the real models' logits only
    python benchmarks/privacy_noise.py --noise 0 1 3 --out runs/privacy_noise

Each run goes through `fedmkt fit` in this process (same seed for every noise level), and prints,
per noise level and party: held-out accuracy before and after, DualMinCE selections, KD loss and
the run's wall time. It also measures what the noise does to the knowledge itself, on every
payload a party shares: how often the noised top-1 slot is still the sender's top-1, and the KL
divergence from the sender's top-k distribution to the noised one (softmax over the k slots, T=1).

This is a cost measurement, not a privacy claim: the noise is clipped Gaussian noise with no
privacy accountant, so it gives no (epsilon, delta) differential-privacy guarantee.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TINY = ["--config", "tiny"]
DEMO = ["--config", "demo", "--data.eval_size", "40", "--data.pool_size", "30", "--federation.rounds", "1"]


class NoiseProbe:
    """Compares each payload that crosses a boundary with the same payload before noise.

    Wraps the participant's `add_logit_noise` (to see the raw logits) and `FederatedTrainer._send`
    (so that only payloads actually sent are counted, not a party's own public-loss pass).
    """

    def __init__(self) -> None:
        import fedmkt.federation.participant as participant
        from fedmkt.federation.trainer import FederatedTrainer

        self.participant, self.trainer_class = participant, FederatedTrainer
        self.original_noise, self.original_send = participant.add_logit_noise, FederatedTrainer._send
        self.pending: dict[int, tuple[int, int, float]] = {}
        self.reset()

    def reset(self) -> None:
        self.positions, self.top1_kept, self.kl_sum = 0, 0, 0.0
        self.pending.clear()

    def __enter__(self) -> NoiseProbe:
        probe = self

        def noise(payload, privacy, generator=None):
            noised = probe.original_noise(payload, privacy, generator)
            raw, new = payload.topk_logits.float(), noised.topk_logits.float()
            log_p, log_q = raw.log_softmax(-1), new.log_softmax(-1)
            kept = int((new.argmax(-1) == raw.argmax(-1)).sum()) if raw.numel() else 0
            kl = float((log_p.exp() * (log_p - log_q)).sum()) if raw.numel() else 0.0
            probe.pending[id(noised)] = (raw.shape[0], kept, kl)
            return noised

        def send(self, payload, receivers):
            positions, kept, kl = probe.pending.pop(id(payload), (0, 0, 0.0))
            probe.positions += positions
            probe.top1_kept += kept
            probe.kl_sum += kl
            return probe.original_send(self, payload, receivers)

        self.participant.add_logit_noise = noise
        self.trainer_class._send = send
        return self

    def __exit__(self, *exc) -> None:
        self.participant.add_logit_noise = self.original_noise
        self.trainer_class._send = self.original_send

    def summary(self) -> tuple[float, float]:
        if not self.positions:
            return float("nan"), float("nan")
        return self.top1_kept / self.positions, self.kl_sum / self.positions


def run_once(base: list[str], noise: float, run_dir: Path, probe: NoiseProbe) -> dict:
    from fedmkt.cli import main

    args = ["fit", *base, "--run_dir", str(run_dir), "--privacy.logit_noise", str(noise), "--logging.wandb", "false"]
    probe.reset()
    start = time.perf_counter()
    code = main(args)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"run failed ({' '.join(args)}), exit code {code}")
    summary = json.loads((run_dir / "summary.json").read_text())
    top1, kl = probe.summary()
    return {"noise": noise, "wall_s": wall, "summary": summary, "top1_kept": top1, "kl": kl}


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def table(name: str, results: list[dict]) -> str:
    lines = [
        f"### {name}",
        "",
        "| noise σ | party | acc zero-shot | acc final | selected per round | kd_loss per round | top-1 kept | KL(raw‖noised) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        summary = result["summary"]
        parties = list(summary["rounds"][-1]["parties"])
        for i, party in enumerate(parties):
            zero = summary["zero_shot"].get(party, {}).get("eval_accuracy")
            final = summary["rounds"][-1]["parties"][party].get("eval_accuracy")
            selected = "/".join(str(r["parties"][party].get("selected", "–")) for r in summary["rounds"])
            kd = "/".join(_fmt(r["parties"][party].get("kd_loss"), ".3f") for r in summary["rounds"])
            shared = i == 0
            lines.append(
                f"| {result['noise']:g} | {party} | {_fmt(zero)} | {_fmt(final)} | {selected} | {kd} | "
                + (f"{result['top1_kept']:.1%} | {result['kl']:.3f} | {result['wall_s']:.0f} |" if shared else " | | |")
            )
    return "\n".join(lines)


def real_logit_distortion(noises: list[float], questions: int, top_k: int = 16, clip: float = 10.0) -> str:
    """Noise applied to the top-k logits of the real pretrained models (no training, no federation).

    The demo's models (SmolLM2-135M-Instruct, Gemma-3-270M) score `questions` ARC-Easy public
    questions (prompt + correct answer, the demo's split); their top-k logits at every position go
    through `add_logit_noise` exactly as a shared payload would.
    """
    from fedmkt.config import ModelSpec, PrivacyConfig
    from fedmkt.data.tasks import load_task, split_task
    from fedmkt.data.tokenize import encode_prompt_answer
    from fedmkt.models import load_model, load_tokenizer
    from fedmkt.payload import KnowledgePayload
    from fedmkt.privacy import add_logit_noise

    split = split_task(load_task("arc_easy"), 2, 120, 150, 42)
    examples = split.public[:questions]
    lines = [
        f"### Real models' top-{top_k} logits ({questions} public ARC-Easy questions, clip {clip:g})",
        "",
        "| model | positions | centred top-k norm: median | share clipped | noise σ | top-1 kept | KL(raw‖noised) |",
        "|---|---|---|---|---|---|---|",
    ]
    for source in ("embedded:smollm2-135m-instruct", "embedded:gemma3-270m"):
        spec = ModelSpec(source)
        tokenizer, model = load_tokenizer(spec), load_model(spec).eval()
        values = []
        with torch.no_grad():
            for example in examples:
                input_ids, _ = encode_prompt_answer(tokenizer, example.prompt, example.answer, 128)
                values.append(model(input_ids[None]).logits[0].topk(top_k, dim=-1).values.float())
        logits = torch.cat(values)
        rows = logits.shape[0]
        payload = KnowledgePayload(
            sender=source,
            round=1,
            vocab_size=1,
            sample_index=torch.arange(1),
            losses=torch.zeros(1),
            offsets=torch.tensor([0, rows]),
            token_ids=torch.zeros(rows, dtype=torch.int32),
            topk_ids=torch.zeros(rows, top_k, dtype=torch.int32),
            topk_logits=logits.half(),
            logsumexp=torch.logsumexp(logits.float(), dim=-1),
            label_logprob=torch.zeros(rows),
        )
        norms = (logits - logits.max(-1, keepdim=True).values).norm(dim=-1)
        for noise in [1e-9, *[n for n in noises if n > 0]]:  # 1e-9: the clipping alone
            noised = add_logit_noise(
                payload, PrivacyConfig(logit_noise=noise, logit_clip=clip), torch.Generator().manual_seed(0)
            ).topk_logits.float()
            raw = payload.topk_logits.float()
            log_p, log_q = raw.log_softmax(-1), noised.log_softmax(-1)
            kept = float((noised.argmax(-1) == raw.argmax(-1)).float().mean())
            kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            lines.append(
                f"| {source.removeprefix('embedded:')} | {rows} | {float(norms.median()):.2f} | {float((norms > clip).float().mean()):.1%} "
                f"| {'0 (clip only)' if noise < 1e-6 else format(noise, 'g')} | {kept:.1%} | {kl:.3f} |"
            )
        del model
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="privacy.logit_noise values")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy_noise"), help="folder for the runs")
    parser.add_argument("--demo", action="store_true", help="also run the reduced demo (real models; minutes per run)")
    parser.add_argument("--skip-tiny", action="store_true", help="no tiny runs")
    parser.add_argument(
        "--real-logits",
        type=int,
        default=0,
        metavar="N",
        help="also noise the real models' top-k logits on N public questions (no training)",
    )
    args = parser.parse_args()

    if args.real_logits:
        print("\n" + real_logit_distortion(args.noise, args.real_logits) + "\n", flush=True)

    configs = [] if args.skip_tiny else [("tiny.yaml (2 rounds, 12 eval questions)", "tiny", TINY)]
    if args.demo:
        configs.append(("demo.yaml reduced (1 round, eval_size 40, pool_size 30)", "demo", DEMO))
    with NoiseProbe() as probe:
        for title, short, base in configs:
            results = []
            for noise in args.noise:
                results.append(run_once(base, noise, args.out / f"{short}_noise{noise:g}", probe))
                print(f"[{short}] noise {noise:g}: {results[-1]['wall_s']:.0f} s", flush=True)
            print("\n" + table(title, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
