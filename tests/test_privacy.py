"""The privacy boundary: what leaves a party is public-sample knowledge only, as safetensors bytes.

Two tiny federations (real tokenizers, random-init models, 1 round, no evaluation) run with
`FederatedTrainer._send` wrapped so that every payload that crosses a party boundary, and its bytes,
are captured. The client payloads are then checked against an independent tokenisation of the
public and private questions. `privacy.logit_noise` (clipped Gaussian noise on the shared logits)
is unit-tested, and checked end to end on the wire.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import fedmkt.federation.trainer as trainer_module
from fedmkt.cli import main
from fedmkt.config import ModelSpec, PartyConfig, PrivacyConfig, RunConfig, parse_run_config
from fedmkt.data.tasks import load_task, split_task
from fedmkt.data.tokenize import encode_prompt_answer
from fedmkt.federation.protocol import PhaseStats
from fedmkt.federation.trainer import FederatedTrainer
from fedmkt.models import load_tokenizer
from fedmkt.payload import KnowledgePayload
from fedmkt.privacy import add_logit_noise

FIELDS = (
    "sample_index",
    "losses",
    "offsets",
    "token_ids",
    "topk_ids",
    "topk_logits",
    "logsumexp",
    "label_logprob",
    "answer_bytes",
    "answer_offsets",
)
CLIENTS = ("client_0", "client_1")
# 12 pooled questions: 4 public + 4 private per client; 1 round, evaluation off (not needed here).
SETTINGS = [
    "--config",
    "tiny",
    "--federation.rounds",
    "1",
    "--federation.evaluate_before",
    "false",
    "--federation.evaluate_every_round",
    "false",
    "--logging.wandb",
    "false",
    "--logging.csv",
    "false",
    "--data.pool_size",
    "12",
    "--data.max_length",
    "64",
]
NOISE = 1.0  # privacy.logit_noise of the fedavg run (the fedmkt run shares raw logits)


# ---- capturing every payload that crosses a boundary ----------------------------------------------


class Unpickled(AssertionError):
    pass


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    def forbidden(*args, **kwargs):
        calls.append(args[:1])
        raise Unpickled("payload deserialisation must never unpickle")

    for module, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)


def _run_capturing(run_dir: Path, *extra: str) -> SimpleNamespace:
    """A tiny run in which every `_send` is recorded, with unpickling forbidden while it deserialises."""
    sends, unpickle_calls = [], []
    original = FederatedTrainer._send

    def capturing_send(self, payload, receivers):
        data = payload.to_bytes()
        with pytest.MonkeyPatch.context() as patch:
            _forbid_unpickling(patch, unpickle_calls)
            received = original(self, payload, receivers)
        sends.append(SimpleNamespace(trainer=self, payload=payload, data=data, receivers=[r.name for r in receivers]))
        return received

    args = [*SETTINGS, "--run_dir", str(run_dir), *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FederatedTrainer, "_send", capturing_send)
        code = main(["fit", *args])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    return SimpleNamespace(
        sends=sends,
        unpickle_calls=unpickle_calls,
        summary=summary,
        config=parse_run_config(args),
        trainer=sends[0].trainer if sends else None,
    )


@pytest.fixture(scope="module")
def fedmkt_run(tmp_path_factory):
    return _run_capturing(tmp_path_factory.mktemp("privacy") / "fedmkt")


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    return _run_capturing(
        tmp_path_factory.mktemp("privacy") / "fedavg",
        "--federation.mode",
        "fedavg",
        "--privacy.logit_noise",
        str(NOISE),
    )


@pytest.fixture(scope="module")
def own_tokenisation(fedmkt_run):
    """Every party's tokenisation of the public and the private questions, computed independently."""
    config = fedmkt_run.config
    split = split_task(
        load_task(config.data.task, config.data.data_dir),
        len(config.clients),
        config.data.eval_size,
        config.data.pool_size,
        config.seed,
    )
    specs = {"server": config.server} | {name: config.clients[i] for i, name in enumerate(CLIENTS)}

    def encode(examples, tokenizer):
        return [
            tuple(encode_prompt_answer(tokenizer, e.prompt, e.answer, config.data.max_length)[0].tolist())
            for e in examples
        ]

    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        tokenizer = load_tokenizer(spec.model, config.cache_dir)
        private = split.private[i - 1] if name != "server" else []
        out[name] = SimpleNamespace(
            public=encode(split.public, tokenizer), private=encode(private, tokenizer), private_examples=private
        )
    out["split"] = split
    return out


def _sends_from(run, sender: str) -> list:
    return [s for s in run.sends if s.payload.sender == sender]


# ---- client payloads hold public-sample knowledge only -----------------------------------------


def _assert_public_only(send, own, top_k: int) -> None:
    payload = send.payload
    public = own.public
    # Every sample is a public one, each exactly once.
    assert sorted(payload.sample_index.tolist()) == list(range(len(public)))
    # The token ids are the sender's own tokenisation of the PUBLIC questions, sample by sample ...
    sent_sequences = []
    for row, sample in enumerate(payload.sample_index.tolist()):
        token_ids = tuple(payload.sample(row)[0].tolist())
        assert token_ids == public[sample], (payload.sender, sample)
        sent_sequences.append(token_ids)
    # ... and no private question's sequence crosses the boundary.
    assert not set(sent_sequences) & set(own.private)
    # One top-k row per public token, nothing else: the size is bounded by public tokens x k.
    rows = sum(len(s) for s in public)
    assert payload.token_ids.shape == (rows,)
    assert payload.topk_ids.shape == payload.topk_logits.shape == (rows, top_k)
    assert payload.losses.shape == (len(public),) and payload.offsets.shape == (len(public) + 1,)


def test_client_payloads_hold_only_public_sample_knowledge(fedmkt_run, own_tokenisation):
    assert fedmkt_run.summary["rounds"][0]["failed"] == {}
    for client in CLIENTS:
        sends = _sends_from(fedmkt_run, client)
        assert len(sends) == 1 and sends[0].receivers == ["server"] and sends[0].payload.round == 1
        assert own_tokenisation[client].private, "the client must have private data for this check to mean anything"
        _assert_public_only(sends[0], own_tokenisation[client], fedmkt_run.config.transfer.top_k)
    # The private questions really are different questions from the public ones.
    split = own_tokenisation["split"]
    assert not {e.uid for e in split.public} & {e.uid for part in split.private for e in part}


def test_server_payload_holds_only_public_sample_knowledge(fedmkt_run, own_tokenisation):
    (send,) = _sends_from(fedmkt_run, "server")
    assert send.receivers == list(CLIENTS)
    _assert_public_only(send, own_tokenisation["server"], fedmkt_run.config.transfer.top_k)


def test_wire_bytes_are_the_payload_fields_and_nothing_else(fedmkt_run):
    assert len(fedmkt_run.sends) == 3  # two clients up, the server down
    for send in fedmkt_run.sends:
        header_length = int.from_bytes(send.data[:8], "little")
        header = json.loads(send.data[8 : 8 + header_length])
        assert set(header) == set(FIELDS) | {"__metadata__"}
        assert set(header["__metadata__"]) == {"sender", "round", "vocab_size", "temperature"}
        # No weight, gradient or optimizer tensor: the only floats are one loss per sample, the top-k
        # values, and per position one log-sum-exp and one label log-probability.
        tensors = load_safetensors(send.data)
        floats = {name for name, t in tensors.items() if t.is_floating_point()}
        assert floats == {"losses", "topk_logits", "logsumexp", "label_logprob"}
        assert tensors["logsumexp"].shape == tensors["label_logprob"].shape == tensors["token_ids"].shape
        # the answer each sample was shared along: here the public set's own (labelled) answers, as UTF-8
        assert (
            tensors["answer_bytes"].dtype == torch.uint8
            and len(tensors["answer_offsets"]) == len(tensors["losses"]) + 1
        )
        # The wire size is exactly the header plus these tensors.
        assert len(send.data) == 8 + header_length + sum(t.numel() * t.element_size() for t in tensors.values())


def test_payloads_deserialise_without_unpickling(fedmkt_run, monkeypatch):
    # In the run: nothing reached pickle / torch.load while `_send` deserialised (they were patched to fail).
    assert fedmkt_run.unpickle_calls == []
    # And again on the captured bytes.
    calls: list = []
    _forbid_unpickling(monkeypatch, calls)
    for send in fedmkt_run.sends:
        back = KnowledgePayload.from_bytes(send.data)
        assert torch.equal(back.topk_ids, send.payload.topk_ids) and back.sender == send.payload.sender
    assert calls == []


def test_in_fedmkt_mode_every_byte_counted_is_a_payload(fedmkt_run):
    parties = fedmkt_run.summary["rounds"][0]["parties"]
    for client in CLIENTS:
        (send,) = _sends_from(fedmkt_run, client)
        assert parties[client]["bytes_sent"] == len(send.data)
    (server_send,) = _sends_from(fedmkt_run, "server")
    assert parties["server"]["bytes_sent"] == len(server_send.data) * len(CLIENTS)
    assert parties["server"]["bytes_received"] == sum(len(s.data) for c in CLIENTS for s in _sends_from(fedmkt_run, c))


# ---- FedAvg is the one mode where adapter weights move ------------------------------------------


def test_fedavg_moves_exactly_the_adapter_bytes_on_top_of_the_payloads(fedavg_run, fedmkt_run, own_tokenisation):
    parties = fedavg_run.summary["rounds"][0]["parties"]
    clients = {c.name: c for c in fedavg_run.trainer.clients}
    for client in CLIENTS:
        (send,) = _sends_from(fedavg_run, client)
        _assert_public_only(
            send, own_tokenisation[client], fedavg_run.config.transfer.top_k
        )  # payloads stay public-only
        state = clients[client].adapter_state()
        assert state and all("lora_" in key for key in state)
        adapter_bytes = len(save_safetensors({k: v.contiguous() for k, v in state.items()}))
        assert adapter_bytes >= sum(v.numel() * v.element_size() for v in state.values())
        assert parties[client]["bytes_sent"] == len(send.data) + adapter_bytes
        assert parties[client]["bytes_received"] == len(_sends_from(fedavg_run, "server")[0].data) + adapter_bytes
        # Same payload size as in fedmkt mode: the growth is the adapter and nothing else.
        fedmkt_sent = fedmkt_run.summary["rounds"][0]["parties"][client]["bytes_sent"]
        assert parties[client]["bytes_sent"] - fedmkt_sent == adapter_bytes


class _Party:
    """A stand-in participant with a LoRA-shaped adapter that keeps its own ledger of the bytes it hands out.

    The ledger is the oracle: it counts at the party's boundary what the protocol says travels (a
    client's payload to the server, the server's to every client; in FedAvg each client's adapter
    to the server, and the average back to each client), independently of how the trainer counts.
    """

    def __init__(self, name: str, ledger: dict[str, int]) -> None:
        self.name = name
        self.ledger = ledger
        self.num_public = 3
        self.adapter = {"lora_A.weight": torch.ones(8, 64), "lora_B.weight": torch.zeros(64, 8)}

    def fine_tune(self, round_index):
        return PhaseStats(task_loss=1.0)

    def share_knowledge(self, round_index):
        rows, k = 6, 2
        payload = KnowledgePayload(
            sender=self.name,
            round=round_index,
            vocab_size=100,
            sample_index=torch.arange(3),
            losses=torch.ones(3),
            offsets=torch.arange(0, rows + 1, 2),
            token_ids=torch.arange(rows).to(torch.int16),
            topk_ids=torch.arange(rows * k).view(rows, k).to(torch.int16),
            topk_logits=torch.zeros(rows, k).half(),
            logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
            label_logprob=torch.zeros(rows),
        )
        receivers = len(CLIENTS) if self.name == "server" else 1
        self.ledger[self.name] += len(payload.to_bytes()) * receivers
        return payload

    def distill(self, round_index, payloads):
        return PhaseStats(task_loss=1.0)

    def evaluate(self):
        return {"eval_accuracy": 0.5}

    def adapter_state(self):
        state = {k: v.clone() for k, v in self.adapter.items()}
        self.ledger[self.name] += len(save_safetensors(state))  # leaves this client for the server
        return state

    def load_adapter_state(self, state):
        self.ledger["server"] += len(save_safetensors({k: v.contiguous() for k, v in state.items()}))  # the average
        self.adapter = state

    def save_adapter(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)

    def cached_public_losses(self):
        return None


@pytest.mark.parametrize("mode", sorted(trainer_module._MODE_STEPS))
def test_the_bytes_a_run_reports_are_what_left_each_party(mode, tmp_path):
    config = RunConfig(
        server=PartyConfig(model=ModelSpec("embedded:gemma3-270m")),
        clients=[PartyConfig(model=ModelSpec("embedded:smollm2-135m-instruct")) for _ in CLIENTS],
    )
    config.federation.mode = mode
    ledger = {name: 0 for name in ("server", *CLIENTS)}
    server, clients = _Party("server", ledger), [_Party(name, ledger) for name in CLIENTS]
    record = FederatedTrainer(server, clients, config, tmp_path).run_round(1)
    for name, stats in record["parties"].items():
        assert stats["bytes_sent"] == ledger[name], (mode, name)
    assert (sum(ledger.values()) > 0) == (mode in ("fedavg", "fedmkt", "llm2slm")), mode  # only they share


# ---- privacy.logit_noise ------------------------------------------------------------------------


def _payload(rows: int = 2000, k: int = 16, scale: float = 6.0, dtype=torch.float32, seed: int = 0) -> KnowledgePayload:
    g = torch.Generator().manual_seed(seed)
    return KnowledgePayload(
        sender="client_0",
        round=1,
        vocab_size=1000,
        sample_index=torch.arange(2),
        losses=torch.rand(2, generator=g),
        offsets=torch.tensor([0, rows // 2, rows]),
        token_ids=torch.randint(1000, (rows,), generator=g).to(torch.int16),
        topk_ids=torch.randint(1000, (rows, k), generator=g).to(torch.int16),
        topk_logits=(torch.randn(rows, k, generator=g) * scale).sort(dim=-1, descending=True).values.to(dtype),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
    )


def _clip_reference(logits: torch.Tensor, clip: float) -> torch.Tensor:
    """Centred on each row's max, rows longer than `clip` scaled down to norm `clip` (written out row by row)."""
    out = []
    for row in logits.float():
        centred = row - row.max()
        norm = float(centred.norm())
        out.append(centred * (clip / norm) if norm > clip else centred)
    return torch.stack(out)


def test_zero_noise_is_the_identity():
    payload = _payload()
    assert add_logit_noise(payload, PrivacyConfig(logit_noise=0.0, logit_clip=0.5), _generator(1)) is payload


def test_noise_changes_the_logits_and_withholds_the_losses_and_label_log_probabilities():
    payload = _payload(dtype=torch.float16)
    noisy = add_logit_noise(payload, PrivacyConfig(logit_noise=1.0), _generator(1))
    assert (noisy.sender, noisy.round, noisy.vocab_size) == (payload.sender, payload.round, payload.vocab_size)
    for name in ("sample_index", "offsets", "token_ids", "topk_ids"):
        assert torch.equal(getattr(noisy, name), getattr(payload, name)), name
    # Un-noised, they would tell a receiver what the noise hides: sent as zeros.
    assert not noisy.losses.any() and not noisy.label_logprob.any()
    assert noisy.topk_logits.dtype == torch.float16 and noisy.topk_logits.shape == payload.topk_logits.shape
    assert not torch.equal(noisy.topk_logits, payload.topk_logits)
    noisy.validate(num_public=2)  # still a valid payload (finite values)


def test_noise_withholds_the_true_logsumexp():
    # The log-sum-exp of the raw logits would tell the receiver their scale before clipping; under
    # noise the payload's is that of the noised top-k values, so their probabilities sum to 1.
    payload = _payload()
    noisy = add_logit_noise(payload, PrivacyConfig(logit_noise=1.0), _generator(1))
    probs = (noisy.topk_logits.float() - noisy.logsumexp[:, None]).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
    assert not torch.allclose(noisy.logsumexp, payload.logsumexp)


def test_clipping_bounds_each_positions_centred_norm():
    clip, sigma = 4.0, 1e-4
    payload = _payload(scale=1.0)
    payload.topk_logits = (
        payload.topk_logits * torch.linspace(0.05, 3.0, len(payload.topk_logits))[:, None]
    )  # short and long rows
    centred_norms = (payload.topk_logits - payload.topk_logits.max(-1, keepdim=True).values).norm(dim=-1)
    assert (centred_norms > clip).any() and (centred_norms < clip).any()  # both kinds of rows occur
    noisy = add_logit_noise(payload, PrivacyConfig(logit_noise=sigma, logit_clip=clip), _generator(0)).topk_logits
    reference = _clip_reference(payload.topk_logits, clip)
    assert torch.allclose(noisy, reference, atol=10 * sigma)  # with negligible noise: exactly the clipped logits
    assert float(noisy.norm(dim=-1).max()) <= clip + 10 * sigma * math.sqrt(payload.top_k)
    # Rows within the clip are only centred; longer rows keep their direction.
    inside = centred_norms < clip
    assert torch.allclose(
        noisy[inside], (payload.topk_logits - payload.topk_logits.max(-1, keepdim=True).values)[inside], atol=10 * sigma
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_given_generator_is_reproducible():
    payload, privacy = _payload(), PrivacyConfig(logit_noise=2.0)
    first = add_logit_noise(payload, privacy, _generator(7)).topk_logits
    assert torch.equal(first, add_logit_noise(payload, privacy, _generator(7)).topk_logits)
    assert not torch.equal(first, add_logit_noise(payload, privacy, _generator(8)).topk_logits)


def test_a_receiver_holding_the_run_config_cannot_regenerate_the_noise():
    # The attack: noise seeded from the config's seed (and round, phase) can be regenerated and
    # subtracted. Without a generator, the noise comes from OS entropy: two calls on the same
    # payload differ, and no seed a receiver might derive reproduces either.
    payload, privacy = _payload(rows=200), PrivacyConfig(logit_noise=2.0)
    first = add_logit_noise(payload, privacy).topk_logits
    second = add_logit_noise(payload, privacy).topk_logits
    assert not torch.equal(first, second)
    for seed in [0, 42, 42 + 1000 + 3, 42 + 2000 + 3]:  # the run seed and the old per-phase seeds
        assert not torch.equal(first, add_logit_noise(payload, privacy, _generator(seed)).topk_logits)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_noise_std_matches_logit_noise(sigma):
    payload = _payload(rows=2000, k=16)  # 32,000 noised values
    noisy = add_logit_noise(payload, PrivacyConfig(logit_noise=sigma, logit_clip=10.0), _generator(3)).topk_logits
    residual = noisy - _clip_reference(payload.topk_logits, 10.0)
    assert float(residual.std()) == pytest.approx(sigma, rel=0.03)
    assert abs(float(residual.mean())) < 0.03 * sigma


def test_the_noise_is_applied_to_what_crosses_the_wire(fedavg_run, fedmkt_run):
    """Round-1 client payloads of the two runs come from identical models; only the fedavg run noised them."""
    clip = fedavg_run.config.privacy.logit_clip
    for client in CLIENTS:
        (raw,), (noised,) = _sends_from(fedmkt_run, client), _sends_from(fedavg_run, client)
        for name in ("sample_index", "offsets", "token_ids", "topk_ids"):
            assert torch.equal(getattr(raw.payload, name), getattr(noised.payload, name)), name
        assert raw.payload.losses.any() and not noised.payload.losses.any()  # withheld under noise
        assert noised.payload.topk_logits.dtype == torch.float16
        residual = noised.payload.topk_logits.float() - _clip_reference(raw.payload.topk_logits, clip)
        assert residual.numel() > 500
        assert float(residual.std()) == pytest.approx(NOISE, rel=0.15)
        # What was received (after the round trip) is the noised payload, not the raw one.
        back = KnowledgePayload.from_bytes(noised.data)
        assert torch.equal(back.topk_logits, noised.payload.topk_logits)
