"""fedmkt.received: a receiver refuses every payload that does not fit what it knows, and recomputes the losses.

Each attack here passed `KnowledgePayload.from_bytes` before the receiver's checks existed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedmkt.config import TransferConfig
from fedmkt.errors import FedMKTError
from fedmkt.payload import KnowledgePayload
from fedmkt.received import Agreement, PublicTokens, payload_byte_limit, verify_payload

try:
    from test_federated_trainer import make_participant, qa
except ImportError:  # tests/ imported as a package
    from tests.test_federated_trainer import make_participant, qa

TOP_K = 4


@pytest.fixture
def honest(smollm2_tokenizer, make_tiny_llama, tmp_path):
    """A real participant's payload about the public set, and what the receiver knows."""
    party = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path, 1, TransferConfig(top_k=TOP_K))
    payload = KnowledgePayload.from_bytes(party.share_knowledge(round_index=2).to_bytes())
    public = PublicTokens(smollm2_tokenizer, qa(3, "public"), 48)
    agreed = Agreement(round=2, top_k=TOP_K, max_length=48, temperature=1.0, tokenizer_size=len(smollm2_tokenizer))
    return payload, agreed, public


def refused(payload, agreed, public, *needles):
    with pytest.raises(FedMKTError) as error:
        verify_payload(payload, agreed, public)
    message = str(error.value)
    assert message.startswith(f"refused payload from {payload.sender}:") and "Fix:" in message and "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_an_honest_payload_passes_and_its_losses_are_recomputed(honest):
    payload, agreed, public = honest
    checked = verify_payload(payload, agreed, public)
    torch.testing.assert_close(checked.losses, payload.losses, rtol=1e-5, atol=1e-5)
    # under kd_positions: all (the default) the recomputed loss is minus the summed label
    # log-probability over every position but each sample's last, per UTF-8 byte of prompt and answer
    for row, index in enumerate(payload.sample_index.tolist()):
        example = public.examples[index]
        assert payload.answer_text(row) == example.answer
        start, stop = int(payload.offsets[row]), int(payload.offsets[row + 1])
        expected = -payload.label_logprob[start : stop - 1].sum() / len((example.prompt + example.answer).encode())
        torch.testing.assert_close(checked.losses[row], expected)
        assert bool((payload.label_logprob[start : stop - 1] < 0).all())  # every predicted token is scored


def test_scoring_the_answer_alone_recomputes_over_its_positions(smollm2_tokenizer, make_tiny_llama, tmp_path):
    transfer = TransferConfig(top_k=TOP_K, kd_positions="answer")
    party = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path, 1, transfer)
    payload = party.share_knowledge(round_index=2)
    public = PublicTokens(smollm2_tokenizer, qa(3, "public"), 48)
    agreed = Agreement(2, TOP_K, 48, 1.0, len(smollm2_tokenizer), kd_positions="answer")
    checked = verify_payload(payload, agreed, public)
    for row, index in enumerate(payload.sample_index.tolist()):
        answer = public.examples[index].answer
        _, targets = public(index, answer)
        start, stop = int(payload.offsets[row]), int(payload.offsets[row + 1])
        expected = -payload.label_logprob[start:stop][targets != -100].sum() / len(answer.encode("utf-8"))
        torch.testing.assert_close(checked.losses[row], expected)
    # the same payload, checked as if prompt positions were distilled, scores them: it claimed nothing there
    with pytest.raises(FedMKTError, match="disagree"):
        verify_payload(payload, replace(agreed, kd_positions="all"), public)


def test_a_reported_loss_that_wins_every_sample_is_refused(honest):
    payload, agreed, public = honest
    refused(replace(payload, losses=torch.full_like(payload.losses, -1e30)), agreed, public, "a loss is negative")
    small = replace(payload, losses=payload.losses * 0.5)  # plausible, but not what its log-probabilities say
    refused(small, agreed, public, "losses that disagree with its label log-probabilities")


def test_claiming_confidence_its_logits_do_not_show_is_refused(honest):
    payload, agreed, public = honest
    confident = replace(payload, label_logprob=payload.label_logprob * 0.1)
    confident = replace(confident, losses=payload.losses * 0.1)  # the loss now matches the claim
    refused(confident, agreed, public, "disagree with its own top-k logits")


def test_more_logits_than_agreed_is_refused(honest):
    payload, agreed, public = honest
    wide = replace(
        payload,
        topk_ids=payload.topk_ids.repeat(1, 16),
        topk_logits=payload.topk_logits.repeat(1, 16),
    )
    refused(wide, agreed, public, f"top-{TOP_K * 16} logits where transfer.top_k is {TOP_K}")


def test_tokens_that_are_not_the_public_question_are_refused(honest):
    payload, agreed, public = honest
    refused(
        replace(payload, token_ids=torch.zeros_like(payload.token_ids)), agreed, public, "not the sender's tokenization"
    )
    # A private row passed off as public sample 0: other text, so other tokens; the message quotes neither.
    secret = qa(1, "secret-private-record")
    private, _ = PublicTokens(public.tokenizer, secret, 48)(0, secret[0].answer)
    rows = int(payload.offsets[1] - payload.offsets[0])
    forged = payload.token_ids.clone()
    forged[: min(rows, len(private))] = private[:rows].to(forged.dtype)
    message = refused(replace(payload, token_ids=forged), agreed, public, "public sample(s) 0")
    assert "secret" not in message


def test_another_round_vocabulary_length_or_temperature_is_refused(honest):
    payload, agreed, public = honest
    refused(payload, replace(agreed, round=3), public, "for round 2, not round 3")
    refused(payload, replace(agreed, tokenizer_size=agreed.tokenizer_size + 5000), public, "for a tokenizer of")
    refused(payload, replace(agreed, max_length=4), public, "over data.max_length = 4")
    refused(payload, replace(agreed, temperature=2.0), public, "temperature 1.0, not 2.0")


def _scored_rows(payload, public):
    """Per sample under kd_positions: all: (start, stop, labels), labels being each position's next
    token (-100 at the last), in the payload's order."""
    rows = []
    for row, index in enumerate(payload.sample_index.tolist()):
        input_ids, _ = public(index, payload.answer_text(row))
        labels = torch.cat([input_ids[1:], torch.tensor([-100])])
        rows.append((int(payload.offsets[row]), int(payload.offsets[row + 1]), labels))
    return rows


def test_a_far_off_filler_logit_does_not_widen_the_tolerance(honest):
    """The attack: one top-k value of -60,000 per position once widened the slack to ~3,000 nats,
    so a listed label could claim probability 1 (loss 0) whatever its logit said."""
    payload, agreed, public = honest
    logits, claimed = payload.topk_logits.clone(), payload.label_logprob.clone()
    for start, _stop, targets in _scored_rows(payload, public):
        for position in (targets != -100).nonzero().flatten().tolist():
            row = start + position
            label = int(targets[position])
            listed = (payload.topk_ids[row] == label).nonzero().flatten().tolist()
            others = [j for j in range(TOP_K) if j not in listed]
            logits[row, others[-1]] = -60000.0  # the filler (lowering a logit keeps the log-sum-exp valid)
            claimed[row] = 0.0
    forged = replace(payload, topk_logits=logits, label_logprob=claimed, losses=torch.zeros_like(payload.losses))
    refused(forged, agreed, public, "disagree with its own top-k logits")


def test_a_log_sum_exp_below_that_of_its_own_top_k_is_refused(honest):
    payload, agreed, public = honest
    low = payload.topk_logits.float().amax(dim=1) - 5.0  # the listed probabilities would sum to far more than 1
    forged = replace(payload, logsumexp=low, label_logprob=torch.minimum(payload.label_logprob, torch.zeros(1)))
    refused(forged, agreed, public, "below that of its own top-k logits")


@pytest.mark.parametrize("noised, temperature", [(True, 1.0), (False, 2.0)])
def test_where_log_probabilities_cannot_be_checked_the_sender_is_ranked_by_what_it_would_teach(
    honest, noised, temperature
):
    """Noised logits or T != 1: the reported losses and label log-probabilities are not used. A sender
    claiming loss 0 is ranked by the loss of its shared distribution on the scored text."""
    payload, agreed, public = honest
    shared = replace(
        payload,
        temperature=temperature,
        logsumexp=torch.logsumexp(payload.topk_logits.float() / temperature, dim=1),  # no mass outside the k ids
        losses=torch.zeros_like(payload.losses),
        label_logprob=torch.zeros_like(payload.label_logprob),
    )
    checked = verify_payload(shared, replace(agreed, noised=noised, temperature=temperature), public)
    for row, (start, _stop, targets) in enumerate(_scored_rows(payload, public)):
        total = 0.0
        for position in (targets != -100).nonzero().flatten().tolist():
            distribution = torch.log_softmax(payload.topk_logits[start + position].float() / temperature, dim=0)
            listed = (payload.topk_ids[start + position] == targets[position]).nonzero().flatten()
            total += float(distribution[listed[0]]) if len(listed) else -30.0  # unlisted: no mass, the floor
        example = public.examples[int(payload.sample_index[row])]
        text_bytes = len((example.prompt + payload.answer_text(row)).encode("utf-8"))
        assert float(checked.losses[row]) == pytest.approx(-total / text_bytes, rel=1e-4)
        assert float(checked.losses[row]) > 0  # not the claimed 0


def test_the_byte_limit_follows_the_public_set(honest):
    payload, _, _ = honest
    data = payload.to_bytes()
    limit = payload_byte_limit(num_public=3, max_length=48, top_k=TOP_K)
    assert len(data) < limit < 4 * 1024**3 // 1000  # far below the old fixed 4 GiB cap
    # the paper's exchange (1,000 samples x 512 tokens x top-16, about 50 MB) fits its limit
    assert 50e6 < payload_byte_limit(1000, 512, 16) < 200e6
    with pytest.raises(FedMKTError, match="over the"):
        KnowledgePayload.from_bytes(data, max_bytes=len(data) - 1)


def test_a_receiver_leaves_a_refused_teacher_out_and_distils_from_the_rest(
    smollm2_tokenizer, make_tiny_llama, tmp_path
):
    transfer = TransferConfig(top_k=TOP_K, selection="all")
    receiver = make_participant("client_0", smollm2_tokenizer, make_tiny_llama, tmp_path, 0, transfer)
    receiver.alignment.teacher_tokenizers = {"peer": smollm2_tokenizer, "liar": smollm2_tokenizer}
    honest_teacher = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path, 1, transfer)
    payload = honest_teacher.share_knowledge(round_index=1)
    liar = replace(payload, sender="liar", losses=torch.zeros_like(payload.losses))
    with pytest.warns(UserWarning, match="refused payload from liar"):
        stats = receiver.distill(1, {"peer": payload, "liar": liar})
    assert stats.teacher_counts == {"peer": 3}
    with pytest.raises(FedMKTError, match="refused payload from liar"):
        receiver.distill(1, {"liar": liar})


def _with_answers(payload, texts):
    answer_bytes, answer_offsets = KnowledgePayload.encode_answers(texts)
    return replace(payload, answer_bytes=answer_bytes, answer_offsets=answer_offsets)


def test_an_answer_the_question_does_not_allow_is_refused(honest):
    """Labelled: only the gold answer; unlabelled: one of the options; never bytes that are not UTF-8."""
    payload, agreed, public = honest
    texts = [payload.answer_text(row) for row in range(len(payload))]
    other = next(c for c in public.examples[0].choices if c != texts[0])
    # labelled: another option (with tokens that would not match either) is refused as an answer
    refused(_with_answers(payload, [other, *texts[1:]]), agreed, public, "does not allow", "public sample(s) 0")
    refused(
        _with_answers(payload, [" not an option", *texts[1:]]),
        replace(agreed, public_labelled=False),
        public,
        "does not allow",
    )
    broken = _with_answers(payload, texts)
    broken.answer_bytes[0] = 0xFF
    with pytest.raises(FedMKTError, match="not UTF-8"):
        verify_payload(broken, agreed, public)


@pytest.mark.parametrize("kd_positions", ["answer", "all"])
def test_an_unlabelled_payload_along_any_option_passes(smollm2_tokenizer, make_tiny_llama, tmp_path, kd_positions):
    """A sender on an unlabelled public set shares along its own options; a receiver accepts each."""
    from fedmkt.data.examples import without_answer

    transfer = TransferConfig(top_k=TOP_K, kd_positions=kd_positions)
    party = make_participant("peer", smollm2_tokenizer, make_tiny_llama, tmp_path, 1, transfer, unlabelled=True)
    payload = KnowledgePayload.from_bytes(party.share_knowledge(round_index=2).to_bytes())
    examples = [without_answer(e) for e in qa(3, "public")]
    public = PublicTokens(smollm2_tokenizer, examples, 48)
    agreed = Agreement(2, TOP_K, 48, 1.0, len(smollm2_tokenizer), public_labelled=False, kd_positions=kd_positions)
    checked = verify_payload(payload, agreed, public)
    own = party.own_answers()
    assert [payload.answer_text(row) for row in range(len(payload))] == own.texts
    if kd_positions == "all":  # the sender's loss is the one it would have as a receiver of the same text
        torch.testing.assert_close(checked.losses, party.losses_on(own.texts), rtol=1e-4, atol=1e-5)
        return
    for row, example in enumerate(qa(3, "public")):  # its own loss is its NLL of its own option, per byte
        expected = own.nll_per_byte(row, example, own.texts[row])
        assert float(checked.losses[row]) == pytest.approx(expected, rel=1e-3, abs=1e-4)


def _consistent_forgery(payload, public, attacker_token: int = 42):
    """The attack: at answer positions the label as top-1 with a huge margin (log-probability ~0);
    at every other position `attacker_token` as top-1 with p > 0.99, the label unlisted and its
    log-probability claimed at the most the top-k allow. Self-consistent, so it passes every check
    that reads only the sender's own numbers."""
    ids, logits = payload.topk_ids.clone(), torch.zeros_like(payload.topk_logits)
    claimed = torch.zeros_like(payload.label_logprob)
    for row, (start, stop, labels) in enumerate(_scored_rows(payload, public)):
        index = int(payload.sample_index[row])
        _, answer_targets = public(index, payload.answer_text(row))
        for position in range(stop - start - 1):
            label = int(labels[position])
            steered = attacker_token if attacker_token != label else attacker_token + 1
            top = label if int(answer_targets[position]) != -100 else steered
            fillers = [t for t in range(100, 100 + TOP_K) if t != label][: TOP_K - 1]
            ids[start + position] = torch.tensor([top, *fillers], dtype=ids.dtype)
            logits[start + position, 0] = 20.0
    lse = torch.logsumexp(logits.float(), dim=1) + 1e-4  # almost all mass in the top-k
    listed = logits.float() - lse[:, None]
    for start, stop, labels in _scored_rows(payload, public):
        for position in range(stop - start - 1):
            at = start + position
            hit = (ids[at] == int(labels[position])).nonzero().flatten()
            claimed[at] = listed[at, hit[0]] if len(hit) else listed[at].min()
    forged = replace(payload, topk_ids=ids, topk_logits=logits, logsumexp=lse, label_logprob=claimed)
    return forged, claimed


def test_a_consistent_forger_that_steers_prompt_positions_loses_every_sample(honest):
    """Under kd_positions: all a receiver distills prompt positions too, so they are scored: the
    forger's p > 0.99 on its own token there costs it every sample against an honest receiver."""
    from fedmkt.selection import dual_min_ce

    payload, agreed, public = honest
    own = verify_payload(payload, agreed, public).losses  # an honest receiver's own scores
    forged, claimed = _consistent_forgery(payload, public)
    answer_only = replace(agreed, kd_positions="answer")
    # scored on the answer alone, the forgery passes and wins every sample
    for scoring in (answer_only, agreed):
        losses = torch.zeros(len(payload))
        for row, (start, stop, _labels) in enumerate(_scored_rows(payload, public)):
            index = int(payload.sample_index[row])
            example = public.examples[index]
            _, answer_targets = public(index, example.answer)
            scored = (
                claimed[start:stop][answer_targets != -100] if scoring is answer_only else claimed[start : stop - 1]
            )
            text = example.answer if scoring is answer_only else example.prompt + example.answer
            losses[row] = -scored.sum() / len(text.encode("utf-8"))
        checked = verify_payload(replace(forged, losses=losses), scoring, public)
        wins = dual_min_ce(own, {"forger": checked.losses}).num_selected
        assert wins == (len(payload) if scoring is answer_only else 0), (scoring.kd_positions, checked.losses, own)
