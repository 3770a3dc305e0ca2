"""How learnable are the aligned KD targets? A check of token alignment on the real demo models.

For each direction (client SmolLM2 -> server Gemma-3 and back), the teacher's top-k logits on the
first N public samples of the demo split are aligned to the receiver's tokenizer exactly as a run
does. The pretrained receiver (no adapter) is then scored on those targets:

* *KD on matched positions*: the soft-target cross-entropy of the receiver on the aligned targets,
  at the positions the sequence alignment matched one-to-one (the rest are one-hot fallbacks);
* *own top-k as target*: the same loss with the receiver's own top-k as target, a floor for
  comparison;
* *ending elsewhere*: matched positions whose two tokens end at different bytes of the text (the
  receiver is taught what follows a different prefix);
* *unlearnable slots*: target slots with probability > 0.01 on which the receiver puts less than
  e^-20. A correct map can still produce a few (the two tokenizers cut a word differently); a
  vocabulary-map error shows up as many slots on one kind of token.

    python benchmarks/kd_targets.py --task boolq --samples 8

Each direction is scored under three sequence-alignment rules in the same process, all with the
run's vocabulary map: *dtw, end-blind* (the previous rule: a DTW pair is one-to-one when each side
has one partner on the path, wherever the two tokens end), *dtw* (such pairs only where both
tokens end at the same byte of the text) and *offsets* (every position whose token ends where a
teacher token ends; no dynamic programming). ``--modes`` picks among them.

Read-only: trains nothing and writes nothing but the vocabulary-map cache.
"""

from __future__ import annotations

import argparse
import copy
from collections import Counter

import torch

from fedmkt.alignment import TokenAligner, dtw_path
from fedmkt.config import parse_run_config
from fedmkt.data.parts import federation_data
from fedmkt.federation.parties import build_participant
from fedmkt.losses import sparse_kd_loss

UNLEARNABLE_LOG_PROB = -20.0


def end_blind_aligner(aligner: TokenAligner) -> TokenAligner:
    """A copy of `aligner` with the previous DTW rule: one partner each side, ends not compared."""
    legacy = copy.copy(aligner)

    def match_positions(teacher_input_ids, receiver_input_ids):
        teacher = aligner._spell(aligner.teacher_strings, teacher_input_ids)
        receiver = aligner._spell(aligner.receiver_strings, receiver_input_ids)
        out = torch.full((len(receiver),), -1, dtype=torch.long)
        path = dtw_path(teacher, receiver)
        receiver_degree = Counter(j for _, j in path)
        teacher_degree = Counter(i for i, _ in path)
        for i, j in path:
            if receiver_degree[j] == 1 and teacher_degree[i] == 1:
                out[j] = i
        return out

    legacy.match_positions = match_positions
    return legacy


def with_mode(aligner: TokenAligner, mode: str) -> TokenAligner:
    """A copy of `aligner` using `mode` (``dtw``, ``offsets`` or ``dtw-end-blind``)."""
    if mode == "dtw-end-blind":
        return end_blind_aligner(aligner)
    copied = copy.copy(aligner)
    copied.sequence_alignment = mode
    return copied


def check_direction(aligner, teacher, receiver, teacher_payload, receiver_payload, samples: int) -> dict:
    """KD loss of `receiver` on `teacher`'s aligned targets, its own-top-k floor, and unlearnable slots."""
    unlearnable: Counter = Counter()
    kd, own_floor, matched_share, elsewhere, matched_count = [], [], [], [], []
    for i in range(samples):
        t_ids, t_top, t_logits = teacher_payload.sample(i)
        r_ids = receiver.data.public[i].input_ids
        ((ids, probs),) = aligner.align([t_ids], [t_top], [t_logits], [r_ids])
        positions = aligner.match_positions(t_ids, r_ids)  # teacher position per receiver position, or -1
        matched = positions[:-1] >= 0
        matched_share.append(matched.float().mean().item())
        t_ends, r_ends = aligner.end_offsets(t_ids, r_ids)
        pairs = positions[:-1][matched]
        elsewhere.append(int((r_ends[:-1][matched] != t_ends[pairs]).sum()))
        matched_count.append(int(matched.sum()))
        with torch.no_grad():
            logits = receiver.module(r_ids[None], torch.ones_like(r_ids)[None])
        kd.append(sparse_kd_loss(logits, ids[None], probs[None])[0][:-1][matched].mean().item())
        log_probs = torch.log_softmax(logits[0].float(), -1)
        _, own_top, own_logits = receiver_payload.sample(i)
        own_probs = torch.softmax(own_logits.float(), -1)
        own_floor.append(-(own_probs * log_probs.gather(1, own_top.long())).sum(1)[:-1].mean().item())
        for pos in range(len(r_ids) - 1):
            for slot in range(ids.shape[1]):
                target = int(ids[pos, slot])
                if target >= 0 and probs[pos, slot] > 0.01 and log_probs[pos, target] < UNLEARNABLE_LOG_PROB:
                    j = int(positions[pos])
                    source = teacher.tokenizer.convert_ids_to_tokens(int(t_top[j, slot])) if j >= 0 else "(fallback)"
                    unlearnable[(source, receiver.tokenizer.convert_ids_to_tokens(target))] += 1
    return {
        "matched": sum(matched_share) / samples,
        "elsewhere": sum(elsewhere) / max(1, sum(matched_count)),
        "kd": sum(kd) / samples,
        "own": sum(own_floor) / samples,
        "unlearnable": unlearnable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--task", default="boolq")
    parser.add_argument("--samples", type=int, default=8, help="public samples to check")
    parser.add_argument("--modes", default="dtw-end-blind,dtw,offsets", help="sequence-alignment rules to compare")
    args = parser.parse_args()

    config = parse_run_config(["--config", args.config, "--data.task", args.task, "--logging.wandb", "false"])
    data = federation_data(config, ["server", "client_0"])
    parties = {name: build_participant(config, name, data[name]) for name in ("server", "client_0")}
    for party in parties.values():
        party.data.public = party.data.public[: args.samples]
    payloads = {name: party.share_knowledge(round_index=1) for name, party in parties.items()}

    rows = []
    for teacher, receiver in (("client_0", "server"), ("server", "client_0")):
        current = parties[receiver].alignment.aligner(teacher)
        for rules in args.modes.split(","):
            aligner = with_mode(current, rules)
            result = check_direction(
                aligner, parties[teacher], parties[receiver], payloads[teacher], payloads[receiver], args.samples
            )
            worst = ", ".join(f"{s!r}->{d!r} ×{c}" for (s, d), c in result["unlearnable"].most_common(3))
            rows.append(
                f"| {teacher} → {receiver} | {rules} | {result['matched']:.1%} | {result['elsewhere']:.1%} | {result['kd']:.2f} | {result['own']:.2f} "
                f"| {sum(result['unlearnable'].values())} | {worst} |"
            )
    print(f"\n{args.task}, first {args.samples} public samples, pretrained models, nats:\n")
    print(
        "| teacher → receiver | sequence alignment | positions matched | of them ending elsewhere | KD on matched positions | own top-k as target | unlearnable slots | most frequent |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
