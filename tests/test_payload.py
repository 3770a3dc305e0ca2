"""KnowledgePayload: bit-exact safetensors round trip, no pickle, and rejection of malformed knowledge."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fedmkt.errors import FedMKTError
from fedmkt.payload import KnowledgePayload, smallest_id_dtype

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
ANSWERS = (" yes", " no", " café")  # one text per sample, the last with a 2-byte character


def make_payload(lengths=(2, 3, 1), k=4, vocab=50, sender="client_0", round_index=3, seed=0, id_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rows = sum(lengths)
    id_dtype = id_dtype or smallest_id_dtype(vocab)
    answer_bytes, answer_offsets = KnowledgePayload.encode_answers([ANSWERS[i % 3] for i in range(len(lengths))])
    return KnowledgePayload(
        sender=sender,
        round=round_index,
        vocab_size=vocab,
        sample_index=torch.arange(len(lengths), dtype=torch.long).flip(0),  # any order is allowed
        losses=torch.rand(len(lengths), generator=g) * 5,
        offsets=torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(lengths, dtype=torch.long).cumsum(0)]),
        token_ids=torch.randint(vocab, (rows,), generator=g).to(id_dtype),
        topk_ids=torch.randint(vocab, (rows, k), generator=g).to(id_dtype),
        topk_logits=(torch.randn(rows, k, generator=g) * 10).to(torch.float16),
        logsumexp=torch.full((rows,), 12.0),  # above every top-k value: a tail remains
        label_logprob=torch.zeros(rows),
        answer_bytes=answer_bytes,
        answer_offsets=answer_offsets,
    )


def test_answer_texts_travel_as_utf8_and_follow_their_samples_when_sorted():
    payload = make_payload()  # sample_index [2, 1, 0]
    back = KnowledgePayload.from_bytes(payload.to_bytes())
    assert [back.answer_text(row) for row in range(3)] == list(ANSWERS)
    assert back.answer_bytes.dtype == torch.uint8 and len(back.answer_bytes) == len(" yes no café".encode())
    ordered = back.in_sample_order()
    assert ordered.sample_index.tolist() == [0, 1, 2]
    assert [ordered.answer_text(row) for row in range(3)] == list(reversed(ANSWERS))
    assert torch.equal(ordered.sample(0)[0], back.sample(2)[0])  # tokens moved with their answer


def test_validate_rejects_answer_offsets_that_do_not_cover_the_bytes():
    payload = make_payload()
    payload.answer_offsets = payload.answer_offsets.clone()
    payload.answer_offsets[-1] += 3
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "answer_offsets")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so -0.0 vs 0.0 and NaN payloads compare exactly."""
    return t.contiguous().view(torch.uint8) if t.numel() else t


def _assert_one_line_error(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert "Fix:" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip_is_bit_exact_and_keeps_metadata():
    payload = make_payload()
    payload.topk_logits[0, 0] = -0.0  # sign of zero must survive
    back = KnowledgePayload.from_bytes(payload.to_bytes())
    assert (back.sender, back.round, back.vocab_size) == ("client_0", 3, 50)
    for name in FIELDS:
        sent, got = getattr(payload, name), getattr(back, name)
        assert got.dtype == sent.dtype, name
        assert got.shape == sent.shape, name
        assert torch.equal(_bits(got), _bits(sent)), name
    assert back.top_k == 4 and len(back) == 3
    assert back.temperature == payload.temperature


def test_temperature_travels_in_the_metadata_and_logsumexp_per_sample():
    payload = make_payload(lengths=(2, 3, 1))
    payload.temperature = 2.0
    back = KnowledgePayload.from_bytes(payload.to_bytes())
    assert back.temperature == 2.0
    assert torch.equal(back.logsumexp_of(1), payload.logsumexp[2:5].float())


def test_validate_rejects_a_logsumexp_that_does_not_cover_the_rows():
    payload = make_payload()
    payload.logsumexp = payload.logsumexp[:-1]
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "logsumexp shape")


def test_round_trip_large_vocab_uses_int32_ids():
    payload = make_payload(vocab=262_144)
    assert payload.topk_ids.dtype == torch.int32
    back = KnowledgePayload.from_bytes(payload.to_bytes())
    assert torch.equal(back.topk_ids, payload.topk_ids) and back.topk_ids.dtype == torch.int32


def test_ids_of_a_49k_vocabulary_take_two_bytes_on_the_wire_and_come_back_exact():
    # SmolLM2's vocabulary (49,152) overflows int16 but fits uint16: 2 bytes per id, not 4.
    payload = make_payload(lengths=(40, 40), k=16, vocab=49_152)
    payload.topk_ids[0, 0] = 49_151  # the largest id survives the unsigned round trip
    wide = KnowledgePayload(
        **{**payload.__dict__, "topk_ids": payload.topk_ids.long(), "token_ids": payload.token_ids.long()}
    )
    data = payload.to_bytes()
    ids_bytes = payload.token_ids.numel() + payload.topk_ids.numel()
    assert len(wide.to_bytes()) == len(data)  # the wire type depends on the vocabulary, not the sender's dtype
    assert len(data) < 2 * ids_bytes + payload.topk_logits.numel() * 2 + 2048
    back = KnowledgePayload.from_bytes(data)
    assert back.topk_ids.dtype == smallest_id_dtype(49_152) == torch.int32
    assert torch.equal(back.topk_ids, payload.topk_ids) and torch.equal(back.token_ids, payload.token_ids)


def test_wire_format_is_plain_safetensors_without_pickle(monkeypatch):
    payload = make_payload()
    data = payload.to_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert set(header) == set(FIELDS) | {"__metadata__"}
    assert header["__metadata__"] == {"sender": "client_0", "round": "3", "vocab_size": "50", "temperature": "1.0"}
    # The byte count is the real wire size: header + raw tensor bytes, nothing else.
    tensor_bytes = sum(getattr(payload, name).numel() * getattr(payload, name).element_size() for name in FIELDS)
    assert len(data) == 8 + header_len + tensor_bytes

    def forbidden(*args, **kwargs):
        raise AssertionError("payload deserialisation must never unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    back = KnowledgePayload.from_bytes(data)
    assert torch.equal(back.token_ids, payload.token_ids)


def test_in_sample_order_sorts_samples_and_moves_their_rows_with_them():
    payload = make_payload(lengths=(2, 3, 1))
    shuffled = KnowledgePayload(
        **{
            **payload.__dict__,
            "sample_index": torch.tensor([2, 0, 1]),
        }
    )
    ordered = shuffled.in_sample_order()
    assert ordered.sample_index.tolist() == [0, 1, 2]
    assert ordered.offsets.tolist() == [0, 3, 4, 6]  # sample 0 owned rows 2:5, sample 1 row 5, sample 2 rows 0:2
    for name in ("token_ids", "topk_ids", "topk_logits", "logsumexp"):
        rows = getattr(shuffled, name)
        assert torch.equal(getattr(ordered, name), torch.cat([rows[2:5], rows[5:6], rows[0:2]])), name
    assert ordered.losses.tolist() == shuffled.losses[[1, 2, 0]].tolist()
    ordered.validate()
    assert ordered.in_sample_order() is ordered


def test_sample_returns_the_rows_of_one_sample_as_long_and_float():
    payload = make_payload(lengths=(2, 3, 1))
    token_ids, topk_ids, topk_logits = payload.sample(1)
    assert token_ids.dtype == topk_ids.dtype == torch.long and topk_logits.dtype == torch.float32
    assert torch.equal(token_ids, payload.token_ids[2:5].long())
    assert torch.equal(topk_ids, payload.topk_ids[2:5].long())
    assert torch.equal(topk_logits, payload.topk_logits[2:5].float())
    assert payload.sample(2)[0].shape == (1,)


def test_smallest_id_dtype_boundaries():
    assert smallest_id_dtype(32_768) == torch.int16  # ids 0..32767 fit int16
    assert smallest_id_dtype(32_769) == torch.int32
    assert smallest_id_dtype(49_152) == torch.int32
    assert smallest_id_dtype(262_144) == torch.int32


def test_empty_payload_is_valid_and_round_trips():
    payload = make_payload(lengths=())
    payload.validate(num_public=10)
    back = KnowledgePayload.from_bytes(payload.to_bytes())
    assert len(back) == 0 and back.topk_ids.shape == (0, 4)


# ---- validation ---------------------------------------------------------------------------------


def test_valid_payload_passes_with_and_without_public_size():
    payload = make_payload()  # samples 2, 1, 0
    payload.validate()
    payload.validate(num_public=3)  # the largest index fits a public set of 3 ...
    with pytest.raises(FedMKTError) as error:  # ... but not one of 2
        payload.validate(num_public=2)
    _assert_one_line_error(error, "client_0", "sample_index outside the public dataset of 2")
    payload.sample_index[0] = -1
    with pytest.raises(FedMKTError) as error:
        payload.validate(num_public=3)
    _assert_one_line_error(error, "sample_index outside the public dataset of 3")


@pytest.mark.parametrize(
    "where", ["topk_logits_nan", "topk_logits_inf", "losses_nan", "losses_inf", "logsumexp_nan", "logsumexp_inf"]
)
def test_validate_rejects_non_finite_values(where):
    payload = make_payload()
    bad = float("nan") if where.endswith("nan") else float("-inf")
    if where.startswith("topk_logits"):
        payload.topk_logits[1, 2] = bad
    elif where.startswith("logsumexp"):
        payload.logsumexp[3] = bad
    else:
        payload.losses[0] = bad
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "client_0", "NaN/inf")


@pytest.mark.parametrize("name", ["token_ids", "topk_ids"])
@pytest.mark.parametrize("value", [50, -1])
def test_validate_rejects_ids_outside_the_vocabulary(name, value):
    payload = make_payload(vocab=50)
    getattr(payload, name).view(-1)[0] = value
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, name, "vocabulary of 50")


def test_validate_accepts_the_largest_id():
    payload = make_payload(vocab=50)
    payload.topk_ids[0, 0] = 49
    payload.token_ids[0] = 49
    payload.validate()
    payload.vocab_size = 49  # the same ids from a sender whose vocabulary ends one id earlier
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "token_ids fall outside", "topk_ids fall outside", "vocabulary of 49")


def test_validate_rejects_topk_shape_mismatch():
    payload = make_payload()
    payload.topk_logits = payload.topk_logits[:, :3]
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "top-k shapes")


def test_validate_rejects_topk_rows_that_do_not_match_tokens():
    payload = make_payload()
    payload.topk_ids, payload.topk_logits = payload.topk_ids[:-1], payload.topk_logits[:-1]
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "token rows")


def test_validate_rejects_wrong_losses_shape():
    payload = make_payload()
    payload.losses = payload.losses[:2]
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "losses/offsets shapes")


@pytest.mark.parametrize(
    "offsets",
    [[1, 2, 5, 6], [0, 2, 5, 7], [0, 4, 3, 6], [0, 2, 5, 5]],
    ids=["not-from-zero", "past-the-end", "decreasing", "short-of-the-end"],
)
def test_validate_rejects_bad_offsets(offsets):
    payload = make_payload(lengths=(2, 3, 1))
    payload.offsets = torch.tensor(offsets)
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "offsets")


def test_validate_rejects_sample_index_outside_the_public_set():
    payload = make_payload()  # sample_index = [2, 1, 0]
    payload.validate(num_public=3)
    with pytest.raises(FedMKTError) as error:
        payload.validate(num_public=2)
    _assert_one_line_error(error, "sample_index", "2 samples")
    payload.sample_index[0] = -1
    with pytest.raises(FedMKTError):
        payload.validate(num_public=3)


def test_validate_rejects_duplicate_sample_index():
    payload = make_payload()
    payload.sample_index = torch.tensor([0, 0, 1])
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "sample_index", "repeat")


def test_validate_rejects_float_ids():
    payload = make_payload()
    payload.topk_ids = payload.topk_ids.float() + 0.5
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "topk_ids", "dtype")


def test_validate_lists_every_problem_in_one_line():
    payload = make_payload(vocab=50)
    payload.topk_logits[0, 0] = float("nan")
    payload.topk_ids[0, 0] = 999
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "NaN/inf", "topk_ids fall outside")


# ---- deserialising untrusted bytes ---------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 8 + b"{}"], ids=["empty", "short", "huge-header"])
def test_from_bytes_rejects_non_safetensors_data(data):
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "not valid safetensors")


def test_from_bytes_rejects_a_pickle():
    payload = make_payload()
    with pytest.raises(FedMKTError):
        KnowledgePayload.from_bytes(pickle.dumps({n: getattr(payload, n) for n in FIELDS}))


def test_from_bytes_names_missing_fields():
    payload = make_payload()
    tensors = {n: getattr(payload, n) for n in FIELDS if n != "losses"}
    data = save_safetensors(tensors, metadata={"sender": "client_0", "round": "1"})
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "losses", "vocab_size")


def test_from_bytes_rejects_unexpected_tensors():
    # Nothing beyond the declared fields may cross the boundary (e.g. private token ids).
    payload = make_payload()
    tensors = {n: getattr(payload, n) for n in FIELDS} | {"private_ids": torch.arange(4)}
    data = save_safetensors(
        tensors, metadata={"sender": "client_0", "round": "1", "vocab_size": "50", "temperature": "1.0"}
    )
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "private_ids")


def test_from_bytes_rejects_malformed_metadata():
    payload = make_payload()
    tensors = {n: getattr(payload, n) for n in FIELDS}
    data = save_safetensors(
        tensors, metadata={"sender": "client_0", "round": "one", "vocab_size": "50", "temperature": "1.0"}
    )
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "round")
    data = save_safetensors(
        tensors, metadata={"sender": "client_0", "round": "1", "vocab_size": "50", "temperature": "-2"}
    )
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "temperature -2.0 is not positive")


def test_from_bytes_validates_content():
    payload = make_payload()
    payload.topk_logits[0, 0] = float("inf")
    data = payload.to_bytes()  # the sender does not check; the receiver must
    with pytest.raises(FedMKTError) as error:
        KnowledgePayload.from_bytes(data)
    _assert_one_line_error(error, "rejected payload from client_0", "NaN/inf")


def test_validate_rejects_multi_dimensional_index_or_tokens():
    payload = make_payload(lengths=(2, 2))
    payload.sample_index = payload.sample_index.view(1, 2)
    with pytest.raises(FedMKTError) as error:
        payload.validate()
    _assert_one_line_error(error, "must be 1-D")
    payload = make_payload(lengths=(2, 2))
    payload.token_ids = payload.token_ids.view(2, 2)
    with pytest.raises(FedMKTError):
        payload.validate()
