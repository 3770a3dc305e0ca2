"""What crosses a party boundary: knowledge about the public dataset, as tensors.

A `KnowledgePayload` holds, for every public sample the sender scored, its per-sample loss and
its top-k next-token logits at every token position (values + ids) with the log-sum-exp of the
whole vocabulary's logits there (so the receiver knows the teacher's true probabilities on the k
ids and the mass of the rest), plus the sender's own token ids for that sample (needed by the
receiver to align the two tokenizations), and the answer text it shared along (the gold answer
of a labelled public set, else its own answer) as UTF-8 bytes. Rows are ragged:
sample `s` owns rows `offsets[s]:offsets[s+1]` and answer bytes `answer_offsets[s]:answer_offsets[s+1]`.

Payloads travel as safetensors bytes — never pickles, never Python lists — so the receiver can
deserialise untrusted input safely, and the byte count we report is the real wire size.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedmkt.errors import FedMKTError

_TENSOR_FIELDS = (
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
_FLOAT_FIELDS = ("losses", "topk_logits", "logsumexp", "label_logprob")

MAX_PAYLOAD_BYTES = 4 * 1024**3
"""Largest payload `from_bytes` accepts by default (4 GiB). The paper's exchange (1,000 public
samples × 512 tokens × top-16) is about 50 MB; anything near this limit is a misconfiguration or
a hostile sender, and is refused before any tensor is parsed."""


def smallest_id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest signed integer type that holds every token id of a vocabulary (in memory)."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


def wire_id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type for token ids on the wire: uint16 up to 65,536 tokens, else int32.

    SmolLM2's 49,152 ids fit 2 bytes only unsigned; torch computes little on uint16, so ids are
    widened back to a signed type as soon as they are read.
    """
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


_ID_FIELDS = ("token_ids", "topk_ids")


@dataclass
class KnowledgePayload:
    """Top-k logits and per-sample losses of one party on the public dataset."""

    sender: str
    """Name of the party that produced it (e.g. `client_0`, `server`)."""

    round: int
    """Federated round it belongs to."""

    vocab_size: int
    """Size of the sender's vocabulary (ids must lie below it)."""

    sample_index: torch.Tensor
    """[N] long: index of each sample in the public dataset."""

    losses: torch.Tensor
    """[N] float32: the sender's NLL of each sample's scored text (the answer, or prompt and answer
    under `kd_positions: all`: `fedmkt.selection.scored_targets`), in nats per UTF-8 byte of that
    text (comparable across tokenizers)."""

    offsets: torch.Tensor
    """[N+1] long: row ranges of each sample in the per-token tensors."""

    token_ids: torch.Tensor
    """[T] ids of the sender's own input tokens."""

    topk_ids: torch.Tensor
    """[T, k] ids of the top-k next-token logits at each position."""

    topk_logits: torch.Tensor
    """[T, k] float16 values of those logits."""

    logsumexp: torch.Tensor
    """[T] float32: ``log sum_v exp(logit_v / temperature)`` over the sender's whole vocabulary at
    each position, so ``exp(topk_logits / temperature - logsumexp)`` are its true probabilities."""

    label_logprob: torch.Tensor
    """[T] float32: the log-probability (temperature 1) the sender gives each position's scored
    label (its next token where that is scored), 0 where the position has none; the sample's loss
    is minus their sum per byte of the scored text, which is how a receiver recomputes it
    (`fedmkt.received`)."""

    answer_bytes: torch.Tensor = None  # type: ignore[assignment]
    """[B] uint8: the answer texts the samples were shared along, UTF-8, one after another."""

    answer_offsets: torch.Tensor = None  # type: ignore[assignment]
    """[N+1] long: byte ranges of each sample's answer text in `answer_bytes`."""

    temperature: float = 1.0
    """The temperature `logsumexp` was taken at (the run's `transfer.temperature`)."""

    def __post_init__(self) -> None:
        if self.answer_bytes is None:  # no answers given: empty texts (a receiver refuses them)
            self.answer_bytes = torch.zeros(0, dtype=torch.uint8)
            self.answer_offsets = torch.zeros(len(self.sample_index) + 1, dtype=torch.long)

    @staticmethod
    def encode_answers(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(answer_bytes, answer_offsets)` for the answer texts of the samples, in order."""
        encoded = [text.encode("utf-8") for text in texts]
        lengths = torch.tensor([len(b) for b in encoded], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) else None
        return (data.clone() if data is not None else torch.zeros(0, dtype=torch.uint8)), offsets

    def answer_text(self, row: int) -> str:
        """The `row`-th sample's answer text (a `FedMKTError` where its bytes are not UTF-8)."""
        start, end = int(self.answer_offsets[row]), int(self.answer_offsets[row + 1])
        try:
            return bytes(self.answer_bytes[start:end].tolist()).decode("utf-8")
        except UnicodeDecodeError:
            raise FedMKTError(
                f"rejected payload from {self.sender}: the answer text of its sample row {row} is not UTF-8. "
                "Fix: nothing is distilled from it; check the sender's fedmkt version."
            ) from None

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    def __len__(self) -> int:
        return int(self.sample_index.numel())

    def sample(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token_ids, topk_ids, topk_logits) of the `row`-th sample in this payload, ids as long."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return (
            self.token_ids[start:end].long(),
            self.topk_ids[start:end].long(),
            self.topk_logits[start:end].float(),
        )

    def in_sample_order(self) -> KnowledgePayload:
        """The same payload with its samples sorted by `sample_index` (how it travels, whatever order it was scored in)."""
        order = self.sample_index.argsort()
        if bool((order == torch.arange(len(order))).all()):
            return self
        starts, lengths = self.offsets[:-1][order], self.offsets.diff()[order]
        rows = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, lengths)]) if len(order) else starts
        text_starts, text_lengths = self.answer_offsets[:-1][order], self.answer_offsets.diff()[order]
        text_rows = [torch.arange(int(s), int(s + n)) for s, n in zip(text_starts, text_lengths)]
        text_rows = torch.cat(text_rows) if text_rows else torch.zeros(0, dtype=torch.long)
        return replace(
            self,
            answer_bytes=self.answer_bytes[text_rows],
            answer_offsets=torch.cat([torch.zeros(1, dtype=torch.long), text_lengths.cumsum(0)]),
            sample_index=self.sample_index[order],
            losses=self.losses[order],
            offsets=torch.cat([torch.zeros(1, dtype=self.offsets.dtype), lengths.cumsum(0)]),
            token_ids=self.token_ids[rows],
            topk_ids=self.topk_ids[rows],
            topk_logits=self.topk_logits[rows],
            logsumexp=self.logsumexp[rows],
            label_logprob=self.label_logprob[rows],
        )

    def logsumexp_of(self, row: int) -> torch.Tensor:
        """The `row`-th sample's per-position log-sum-exp (see `logsumexp`), as float32."""
        return self.logsumexp[int(self.offsets[row]) : int(self.offsets[row + 1])].float()

    def to_bytes(self) -> bytes:
        """Serialise with safetensors (the metadata carries sender, round and vocab size)."""
        tensors = {name: getattr(self, name).contiguous() for name in _TENSOR_FIELDS}
        if wire_id_dtype(self.vocab_size) == torch.uint16:
            for name in _ID_FIELDS:
                ids = tensors[name]
                if not ids.numel() or (int(ids.min()) >= 0 and int(ids.max()) < 2**16):
                    tensors[name] = ids.to(torch.uint16)
                # else: they travel as they are, and the receiver's validation names the bad ids
        metadata = {
            "sender": self.sender,
            "round": str(self.round),
            "vocab_size": str(self.vocab_size),
            "temperature": repr(float(self.temperature)),
        }
        return save_safetensors(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int | None = None, num_public: int | None = None) -> KnowledgePayload:
        """Deserialise and validate bytes received from another party.

        Payloads over `max_bytes` (default `MAX_PAYLOAD_BYTES`) are refused unread; with
        `num_public`, sample indices are also checked against the public dataset's size.
        """
        limit = MAX_PAYLOAD_BYTES if max_bytes is None else max_bytes
        if len(data) > limit:
            raise FedMKTError(
                f"received payload is {len(data):,} bytes, over the {limit:,}-byte limit; it was refused unread. "
                "Fix: lower data.pool_size, data.max_length or transfer.top_k, or raise fedmkt.payload.MAX_PAYLOAD_BYTES if the size is expected."
            )
        try:
            tensors = load_safetensors(data)
            metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
        except (SafetensorError, ValueError, json.JSONDecodeError) as error:
            raise FedMKTError(
                f"received payload is not valid safetensors data ({error}). Fix: check the sender's fedmkt version."
            ) from error
        missing = [name for name in _TENSOR_FIELDS if name not in tensors] + [
            key for key in ("sender", "round", "vocab_size", "temperature") if key not in metadata
        ]
        if missing:
            raise FedMKTError(f"received payload lacks {missing}. Fix: check the sender's fedmkt version.")
        unexpected = sorted(set(tensors) - set(_TENSOR_FIELDS))
        if unexpected:  # nothing beyond the declared fields may cross the boundary
            raise FedMKTError(
                f"received payload carries unexpected tensors {unexpected}. Fix: check the sender's fedmkt version."
            )
        try:
            round_index, vocab_size = int(metadata["round"]), int(metadata["vocab_size"])
            temperature = float(metadata["temperature"])
        except ValueError as error:
            raise FedMKTError(
                f"received payload has malformed round/vocab_size/temperature metadata ({error}). Fix: check the sender's fedmkt version."
            ) from error
        for name in _ID_FIELDS:  # widen 2-byte unsigned wire ids to a signed type torch can compute with
            if tensors[name].dtype == torch.uint16:
                tensors[name] = tensors[name].to(smallest_id_dtype(vocab_size))
        payload = cls(
            sender=metadata["sender"], round=round_index, vocab_size=vocab_size, temperature=temperature, **tensors
        )
        payload.validate(num_public=num_public)
        return payload

    def validate(self, num_public: int | None = None) -> None:
        """Reject malformed knowledge before anything is distilled from it."""
        n, rows = len(self), int(self.token_ids.numel())
        problems = []
        wrong_dtype = [
            name
            for name in _TENSOR_FIELDS
            if getattr(self, name).is_floating_point() != (name in _FLOAT_FIELDS)
            or (getattr(self, name).dtype in (torch.bool, torch.uint8)) != (name == "answer_bytes")
            or getattr(self, name).is_complex()
        ]
        if wrong_dtype:  # ids must be integers and values floats before anything below compares them
            raise FedMKTError(
                f"rejected payload from {self.sender}: {wrong_dtype} have the wrong dtype (ids must be signed integers, "
                "losses/logits floats). Fix: nothing is distilled from it; check the sender's fedmkt version."
            )
        if self.sample_index.ndim != 1 or self.token_ids.ndim != 1:
            problems.append(
                f"sample_index/token_ids must be 1-D, got shapes {tuple(self.sample_index.shape)}/{tuple(self.token_ids.shape)}"
            )
        elif self.losses.shape != (n,) or self.offsets.shape != (n + 1,):
            problems.append(
                f"losses/offsets shapes {tuple(self.losses.shape)}/{tuple(self.offsets.shape)} do not fit {n} samples"
            )
        elif int(self.offsets[0]) != 0 or int(self.offsets[-1]) != rows or bool((self.offsets.diff() < 0).any()):
            problems.append("offsets are not a non-decreasing cover of the token rows")
        if self.topk_ids.ndim != 2 or self.topk_ids.shape != self.topk_logits.shape or self.topk_ids.shape[0] != rows:
            problems.append(
                f"top-k shapes {tuple(self.topk_ids.shape)}/{tuple(self.topk_logits.shape)} do not match {rows} token rows"
            )
        elif rows and self.topk_ids.shape[1] == 0:  # would count as distilled while carrying no logits
            problems.append("top-k has no columns (k = 0)")
        text_bytes = int(self.answer_bytes.numel())
        if self.answer_bytes.ndim != 1 or self.answer_offsets.shape != (n + 1,):
            problems.append(f"answer_bytes/answer_offsets shapes do not fit {n} samples")
        elif (
            int(self.answer_offsets[0]) != 0
            or int(self.answer_offsets[-1]) != text_bytes
            or bool((self.answer_offsets.diff() < 0).any())
        ):
            problems.append("answer_offsets are not a non-decreasing cover of the answer bytes")
        for name in ("logsumexp", "label_logprob"):
            if getattr(self, name).shape != (rows,):
                problems.append(f"{name} shape {tuple(getattr(self, name).shape)} does not match {rows} token rows")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature {self.temperature} is not positive")
        finite = [torch.isfinite(getattr(self, name).float()).all() for name in _FLOAT_FIELDS]
        if not all(bool(ok) for ok in finite):
            problems.append("losses, logits, logsumexp or label_logprob contain NaN/inf")
        for name in ("token_ids", "topk_ids"):
            ids = getattr(self, name)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                problems.append(f"{name} fall outside the sender's vocabulary of {self.vocab_size}")
        if self.sample_index.ndim == 1 and n and int(self.sample_index.unique().numel()) != n:
            problems.append("sample_index repeats a sample")
        if (
            num_public is not None
            and n
            and (int(self.sample_index.min()) < 0 or int(self.sample_index.max()) >= num_public)
        ):
            problems.append(f"sample_index outside the public dataset of {num_public} samples")
        if problems:
            raise FedMKTError(
                f"rejected payload from {self.sender}: {'; '.join(problems)}. Fix: nothing is distilled from it; check that party's model and data."
            )
