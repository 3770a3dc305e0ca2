"""The control teachers: flat top-k values keep ids and top-k mass but no ranking, and pass a receiver's checks."""

from __future__ import annotations

import pytest
import torch

from fedmkt.data.examples import QAExample
from fedmkt.payload import KnowledgePayload
from fedmkt.received import Agreement, verify_payload
from fedmkt.teacher_controls import flat_topk, random_answers

ANSWER = " ab"  # 3 bytes


def payload(temperature: float = 2.0) -> KnowledgePayload:
    g = torch.Generator().manual_seed(0)
    rows, k = 5, 4
    logits = (torch.randn(rows, k, generator=g) * 3).sort(dim=1, descending=True).values
    answer_bytes, answer_offsets = KnowledgePayload.encode_answers([ANSWER])
    return KnowledgePayload(
        sender="server",
        round=1,
        vocab_size=50,
        sample_index=torch.arange(1),
        losses=torch.ones(1),
        offsets=torch.tensor([0, rows]),
        token_ids=torch.arange(rows).to(torch.int16),
        topk_ids=torch.randint(50, (rows, k), generator=g).to(torch.int16),
        topk_logits=logits.half(),
        logsumexp=torch.logsumexp(logits / temperature, dim=1) + 0.7,  # 1 - e^-0.7 of the mass is outside
        label_logprob=-torch.arange(1.0, rows + 1),
        answer_bytes=answer_bytes,
        answer_offsets=answer_offsets,
        temperature=temperature,
    )


class OnePublicQuestion:
    """Public sample 0 in the sender's tokens: position 1's label is its 3rd top-k id, position 3's is no top-k id."""

    def __init__(self, sent: KnowledgePayload) -> None:
        self.examples = [QAExample("q0", "Q:", (ANSWER, " cd"), 0)]
        self.targets = torch.full((5,), -100)
        self.targets[1] = int(sent.topk_ids[1, 2])
        self.targets[3] = next(i for i in range(50) if i not in sent.topk_ids[3].tolist())
        self.token_ids = sent.token_ids.long()

    def __call__(self, index: int, answer: str):
        assert (index, answer) == (0, ANSWER)
        return self.token_ids, self.targets


def test_the_control_keeps_ids_and_top_k_mass_but_no_ranking():
    sent = payload()
    public = OnePublicQuestion(sent)
    control = flat_topk(sent, lambda row: public(0, ANSWER)[1], torch.tensor([3]))
    assert torch.equal(control.topk_ids, sent.topk_ids) and torch.equal(control.logsumexp, sent.logsumexp)
    values = control.topk_logits.float()
    assert torch.equal(values, values[:, :1].expand_as(values))  # one value per position
    mass = lambda p: (p.topk_logits.float() / p.temperature - p.logsumexp[:, None]).exp().sum(1)  # noqa: E731
    torch.testing.assert_close(mass(control), mass(sent), rtol=2e-3, atol=0)  # fp16 values
    torch.testing.assert_close(mass(sent), torch.full((5,), float(torch.exp(torch.tensor(-0.7)))), rtol=2e-3, atol=0)


def test_the_controls_label_log_probabilities_are_its_own_and_pass_a_receivers_checks():
    """At T = 1 a receiver refuses label log-probabilities that disagree with the top-k (fedmkt.received);
    the control's are those of its even distribution, and its loss their sum per byte of the answer."""
    sent = payload(temperature=1.0)
    public = OnePublicQuestion(sent)
    control = flat_topk(sent, lambda row: public(0, ANSWER)[1], torch.tensor([3]))
    even = control.topk_logits[1, 0].float() - control.logsumexp[1]  # log(top-k mass / k)
    assert float(control.label_logprob[1]) == pytest.approx(float(even), abs=1e-6)
    assert float(control.label_logprob[3]) == float(sent.label_logprob[3])  # not listed: its own
    assert float(control.losses[0]) == pytest.approx(-(float(even) + float(sent.label_logprob[3])) / 3, abs=1e-6)
    agreed = Agreement(round=1, top_k=4, max_length=16, temperature=1.0, tokenizer_size=50, kd_positions="answer")
    verify_payload(control, agreed, public)  # passes
    forged = flat_topk(sent, lambda row: public(0, ANSWER)[1], torch.tensor([3]))
    forged.label_logprob[1] = 0.0  # claims certainty its flat top-k does not give
    forged.losses[0] = -float(forged.label_logprob[3]) / 3
    with pytest.raises(Exception, match="disagree with its own top-k"):
        verify_payload(forged, agreed, public)


def test_random_answers_are_options_drawn_evenly_and_reproducibly():
    questions = [QAExample(f"q{i}", "Q:", (" a", " b", " c", " d"), None) for i in range(4000)]
    drawn = random_answers(questions, seed=7)
    assert drawn == random_answers(questions, seed=7) and drawn != random_answers(questions, seed=8)
    counts = {option: drawn.count(option) for option in (" a", " b", " c", " d")}
    assert all(900 <= count <= 1100 for count in counts.values()), counts  # 1000 each, ±5 sd


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_control_of_a_peaked_payload_never_outweighs_its_log_sum_exp(temperature):
    """Top-k that hold nearly all the mass, with values that float16 rounds up: the flat values must
    still pass the receiver's rule that the top-k's log-sum-exp is at most the shared one."""
    from fedmkt.received import _topk_logsumexp_excess

    sent = payload(temperature)
    g = torch.Generator().manual_seed(1)
    peaked = torch.cat([30 + torch.rand(5, 1, generator=g) * 8, torch.randn(5, 3, generator=g) + 20], dim=1)
    rounded = peaked.half()
    # the whole vocabulary's log-sum-exp: the exact top-k (not the rounded ones) and almost nothing else
    true_lse = torch.logsumexp(peaked / temperature, dim=1) + 1e-6
    sent = KnowledgePayload(**{**sent.__dict__, "topk_logits": rounded, "logsumexp": true_lse})
    public = OnePublicQuestion(sent)
    control = flat_topk(sent, lambda row: public(0, ANSWER)[1], torch.tensor([3]))
    assert bool((_topk_logsumexp_excess(control) <= 0).all())
    # and keeps the mass up to float16 steps: one step down, and the rounding of the values it came from
    mass = (control.topk_logits.float() / temperature - control.logsumexp[:, None]).exp().sum(1)
    steps = 3 * 2.0**-11 * control.topk_logits[:, 0].float().abs() / temperature
    assert bool((mass <= 1.0 + 1e-6).all()) and bool((mass >= torch.exp(-steps) - 1e-6).all())
