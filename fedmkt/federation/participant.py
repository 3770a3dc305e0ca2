"""One party at run time: its module, tokenizer and data, and a Lightning `Trainer` per phase.

The FedMKT protocol (see `trainer.py`) only calls the named phases below; a participant never
touches another participant's objects — what it learns about others arrives as payloads.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from safetensors.torch import load_file

from fedmkt.adapters import adapter_state, is_sharded, load_adapter_state, under_model_keys
from fedmkt.callbacks import (
    AlignmentCacheCallback,
    PhaseDeadlineCallback,
    PhaseLines,
    PhaseProgressBar,
    SelectiveTransferCallback,
)
from fedmkt.config import PartyConfig, PrivacyConfig, TransferConfig
from fedmkt.data.datamodule import DistillationDataModule, PartyDataModule, TokenizedSample
from fedmkt.data.examples import Example, Format
from fedmkt.data.tokenize import encode_prompt_answer
from fedmkt.dp import DPPlan, epsilon_after, plan_dp
from fedmkt.errors import FedMKTError
from fedmkt.evaluation import evaluate_generation, evaluate_multiple_choice, held_out_scores, summary_keys
from fedmkt.federation.distributed import (
    gather_predictions,
    lightning_strategy,
    party_processes,
    shards_weights,
    sum_over_ranks,
)
from fedmkt.federation.protocol import PhaseStats
from fedmkt.files import atomic_write_dir
from fedmkt.party_module import PartyModule
from fedmkt.payload import KnowledgePayload, smallest_id_dtype
from fedmkt.privacy import add_logit_noise
from fedmkt.progress import on_terminal
from fedmkt.public_answers import OwnAnswers, answer_public
from fedmkt.received import Agreement, PublicTokens, verify_payload
from fedmkt.schedule import ScheduleSpan, run_span
from fedmkt.selection import best_teachers, dual_min_ce, scored_bytes, scored_targets
from fedmkt.teacher_controls import flat_topk, random_answers
from fedmkt.teacher_targets import TeacherAligners, teacher_losses

_PHASE_OFFSETS = {"fine_tune": 1, "distill": 2}


def phase_seed(seed: int, round_index: int, phase: str) -> int:
    """The seed of one phase of one round: distinct per phase and round, the same on every resume."""
    return seed + 1000 * round_index + _PHASE_OFFSETS[phase]


class Participant:
    """A server or client in this process: fine-tune, share knowledge, distill, evaluate (a `FederatedParty`)."""

    def __init__(
        self,
        name: str,
        config: PartyConfig,
        transfer: TransferConfig,
        module: Union[PartyModule, Callable[[], PartyModule]],
        tokenizer,
        data: PartyDataModule,
        evaluation: list[Example],
        peer_tokenizers: dict,
        cache_dir: Path,
        max_length: int,
        seed: int,
        phase_timeout_s: Optional[float] = None,
        privacy: Optional[PrivacyConfig] = None,
        own_evaluation: Optional[list[Example]] = None,
        data_format: Format = "multiple_choice",
        max_new_tokens: int = 32,
        rounds: int = 1,
        public_gold: Optional[list[Example]] = None,
        evaluation_sets: Optional[dict[str, list[Example]]] = None,
        trained_phases: tuple[str, ...] = ("fine_tune", "distill"),
    ) -> None:
        self.name = name
        self.config = config
        self.transfer = transfer
        # A callable builds the module on first use: a rank that never runs this party never loads it.
        self._module = module if isinstance(module, PartyModule) else None
        self._build_module = None if isinstance(module, PartyModule) else module
        self.tokenizer = tokenizer
        self.data = data
        self.evaluation = evaluation
        self.evaluation_sets = evaluation_sets
        """Named held-out sets (e.g. one per domain), each scored as `eval_<name>_*`; `evaluation` pools them."""
        self.own_evaluation = own_evaluation
        """Held-out examples from this client's own domain, scored besides the common set."""
        self.data_format = data_format
        self.max_new_tokens = max_new_tokens
        self.round_index = 0
        """The round of the phase that ran last (0 before round 1): labels progress bars."""
        self.max_length = max_length
        self.seed = seed
        self.phase_timeout_s = phase_timeout_s
        self.privacy = privacy or PrivacyConfig()
        self.rounds = rounds
        """The run's rounds: what a DP-SGD plan spreads its epsilon over, and the run's LR schedule."""
        self.trained_phases = trained_phases
        """The phases this party trains in each round of the run's mode, in order (the LR schedule's plan)."""
        self.alignment = TeacherAligners(
            tokenizer,
            peer_tokenizers,
            cache_dir,
            transfer.temperature,
            transfer.sequence_alignment,
            transfer.topk_target,
        )
        self._public_losses: Optional[torch.Tensor] = None  # valid until the weights change
        self._public_tokens: dict[str, PublicTokens] = {}  # each teacher's tokens of the public set
        self.public_labelled = all(example.labelled for example in data.public_examples)
        """Whether the public set has answers; without them this party answers the questions itself."""
        self.public_gold = public_gold
        """The gold answers behind an unlabelled public set, read only for `public_answer_accuracy`."""
        self.public_answer_accuracy: Optional[float] = None
        """How often the answers this party last shared equal the gold ones (None: not known)."""
        self._own_answers: Optional[OwnAnswers] = None  # valid until the weights change

    @property
    def module(self) -> PartyModule:
        """The party's LightningModule, built now if it was deferred."""
        if self._module is None:
            self._module = self._build_module()
        return self._module

    @property
    def num_public(self) -> int:
        """Samples in the public set (the same questions for every party)."""
        return len(self.data.public_examples)

    @property
    def module_loaded(self) -> bool:
        """Whether this process holds the party's model (it does once any phase ran here)."""
        return self._module is not None

    def _label(self, phase: str) -> str:
        return f"{self.name} · {phase} · round {self.round_index}"

    def _trainer(
        self, phase: str, max_epochs: int = 1, reporters: tuple[L.Callback, ...] = (), clip: bool = True
    ) -> L.Trainer:
        """A phase's Trainer; `reporters` are callbacks that log what the phase was given (never change it).
        `clip=False` leaves gradient clipping to the phase (DP-SGD clips each sample's gradient itself)."""
        settings = self.config.trainer
        bars = settings.enable_progress_bar and on_terminal()  # a log gets plain lines instead of bars
        progress: list[L.Callback] = []
        if settings.enable_progress_bar:
            progress.append(PhaseProgressBar(self._label(phase)) if bars else PhaseLines(self._label(phase)))
        return L.Trainer(
            accelerator=settings.accelerator,
            devices=settings.devices,
            strategy=lightning_strategy(settings),
            precision=settings.precision,
            max_epochs=max_epochs,
            accumulate_grad_batches=settings.accumulate_grad_batches,
            gradient_clip_val=(self.config.optimizer.grad_clip or None) if clip else None,
            callbacks=list(reporters)
            + progress
            + ([PhaseDeadlineCallback(self.phase_timeout_s)] if self.phase_timeout_s else []),
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=bars,
            num_sanity_val_steps=0,
            # An FSDP2 party's all-gather buffers must not become inference tensors in a predict:
            # its next training phase writes into them (gloo runs already get no_grad from Lightning).
            inference_mode=not shards_weights(settings),
        )

    def schedule_span(self, phase: str, round_index: int) -> Optional[ScheduleSpan]:
        """Where `phase` of round `round_index` lies on this party's run-long LR schedule
        (`fedmkt.schedule`): its fine-tuning plans private × local_epochs samples, its distillation
        public × distill_epochs. None where the party does not train that phase in this mode."""
        planned = {
            "fine_tune": len(self.data.private) * self.config.local_epochs,
            "distill": self.num_public * self.config.distill_epochs,
        }
        phases = {name: planned[name] for name in self.trained_phases if planned[name] > 0}
        return run_span(phases, phase, round_index, self.rounds) if phase in phases else None

    def _fit(self, trainer: L.Trainer, datamodule: L.LightningDataModule, seed: int, phase: str) -> PhaseStats:
        L.seed_everything(seed, verbose=False)
        start = time.perf_counter()
        self.module.schedule_span = self.schedule_span(phase, self.round_index)
        try:
            trainer.fit(self.module, datamodule=datamodule)
        finally:
            self.module.schedule_span = None
        self._park()
        self._public_losses = None
        self._own_answers = None
        spans_ranks = trainer.world_size > 1
        return PhaseStats(
            task_loss=_phase_mean(self.module.task_loss, spans_ranks, empty=float("nan")),
            kd_loss=_phase_mean(self.module.kd_loss, spans_ranks, empty=0.0),
            train_seconds=time.perf_counter() - start,
            ranks=trainer.world_size,
            sharded=is_sharded(self.module.model),
        )

    # ---- phases ---------------------------------------------------------------------------

    def fine_tune(self, round_index: int) -> PhaseStats:
        """Step 1: local fine-tuning on private data (task CE; DP-SGD under `privacy.dp`)."""
        self.round_index = round_index
        if self.config.local_epochs == 0 or not self.data.private:
            return PhaseStats()
        plan = self.dp_plan()
        trainer = self._trainer("fine_tune", self.config.local_epochs, clip=plan is None)
        seed = phase_seed(self.seed, round_index, "fine_tune")
        self.data.shuffle_seed = seed  # a fresh private-data order every round
        self.module.dp_plan = self.data.dp_plan = plan
        try:
            stats = self._fit(trainer, self.data, seed, "fine_tune")
        finally:
            self.module.dp_plan = self.data.dp_plan = None
        if plan is None:
            return stats
        return replace(stats, dp_epsilon=epsilon_after(plan, round_index), dp_delta=plan.delta)

    def dp_plan(self) -> Optional[DPPlan]:
        """This client's DP-SGD plan under `privacy.dp` (None for the server and without DP)."""
        dp = self.privacy.dp
        if not dp.enabled or self.name == "server":
            return None
        return plan_dp(dp, len(self.data.private), self.config.batch_size, self.config.local_epochs, self.rounds)

    def share_knowledge(self, round_index: int) -> KnowledgePayload:
        """Steps 2/7: per-sample loss and top-k logits along each public question's answer (noised if
        privacy asks): the gold answer of a labelled public set, else this party's own answer."""
        self.round_index = round_index
        answers = self._shared_answers(round_index)
        outputs = self._predict_public("share_knowledge", answers)
        lengths = torch.cat([o["lengths"] for o in outputs])
        index = torch.cat([o["index"] for o in outputs]).long()
        texts = [answers[i] for i in index.tolist()]
        scored = self._scored_bytes(index.tolist(), answers)
        id_dtype = smallest_id_dtype(self.module.vocab_size)
        answer_bytes, answer_offsets = KnowledgePayload.encode_answers(texts)
        payload = KnowledgePayload(
            sender=self.name,
            round=round_index,
            vocab_size=self.module.vocab_size,
            sample_index=index,
            losses=torch.cat([o["nll"] for o in outputs]) / scored,
            offsets=torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            token_ids=torch.cat([o["token_ids"] for o in outputs]).to(id_dtype),
            topk_ids=torch.cat([o["topk_ids"] for o in outputs]).to(id_dtype),
            topk_logits=torch.cat([o["topk_logits"] for o in outputs]),
            logsumexp=torch.cat([o["logsumexp"] for o in outputs]).float(),
            label_logprob=torch.cat([o["label_logprob"] for o in outputs]).float(),
            answer_bytes=answer_bytes,
            answer_offsets=answer_offsets,
            temperature=self.transfer.temperature,
        ).in_sample_order()
        if self.transfer.teacher != "real":  # a control: the same answers' positions, no ranking
            public = PublicTokens(self.tokenizer, self.data.public_examples, self.max_length)
            positions = self.transfer.kd_positions

            def targets_of(row: int) -> torch.Tensor:
                return scored_targets(*public(int(payload.sample_index[row]), payload.answer_text(row)), positions)

            payload = flat_topk(payload, targets_of, self._scored_bytes(payload.sample_index.tolist(), answers))
        return add_logit_noise(payload, self.privacy)  # noise from OS entropy: no receiver can regenerate it

    def _shared_answers(self, round_index: int) -> list[Optional[str]]:
        """The answer each public question is shared along (None: this party has none to share)."""
        examples = self.data.public_examples
        if self.public_labelled:
            return [example.answer for example in examples]
        own = self.own_answers()
        if self.public_gold is not None:
            self.public_answer_accuracy = own.accuracy_against(self.public_gold)
        if self.transfer.teacher == "random":
            return list(random_answers(examples, self.seed + 1000 * round_index + 3))
        return list(own.texts)

    def own_answers(self) -> OwnAnswers:
        """This party's own answers to the unlabelled public questions (reused while its weights stand)."""
        if self._own_answers is None:
            model, device = self._scoring_model()
            progress = self._label("answer public") if self.config.trainer.enable_progress_bar else None
            self._own_answers = answer_public(
                model,
                self.tokenizer,
                self.data.public_examples,
                self.data_format,
                self.config.eval_batch_size,
                self.max_length,
                self.max_new_tokens,
                device,
                progress,
            )
            self._park()
        return self._own_answers

    def _scored_bytes(self, indices: list[int], answers: list[Optional[str]]) -> torch.Tensor:
        """Bytes of each public sample's scored text (`fedmkt.selection.scored_bytes`), as the divisor of its NLL."""
        examples, positions = self.data.public_examples, self.transfer.kd_positions
        return torch.tensor([scored_bytes(examples[i].prompt, answers[i], positions) for i in indices])

    def public_losses(self) -> torch.Tensor:
        """The receiver's own per-sample NLL per byte of the scored text along the gold answers, for
        DualMinCE (reused if fresh)."""
        if self._public_losses is None:
            self._predict_public("public_losses", [example.answer for example in self.data.public_examples])
        return self._public_losses

    def losses_on(self, answers: list[Optional[str]]) -> torch.Tensor:
        """The receiver's own NLL per byte of each public question answered with `answers` (+inf where None).

        Scoring the answer alone, multiple choice reads the per-option NLLs of its own answering
        pass; otherwise (generation, or prompt and answer under `kd_positions: all`) the texts are scored.
        """
        losses = torch.full((self.num_public,), float("inf"))
        if self.data_format == "multiple_choice" and self.transfer.kd_positions == "answer":
            own = self.own_answers()
            for index, (example, answer) in enumerate(zip(self.data.public_examples, answers)):
                if answer is not None:
                    losses[index] = own.nll_per_byte(index, example, answer)
            return losses
        outputs = self._predict_public("own_losses", answers, cache=False)
        index = torch.cat([o["index"] for o in outputs]).long()
        nll = torch.cat([o["nll"] for o in outputs])
        losses[index] = nll / self._scored_bytes(index.tolist(), answers)
        return losses

    def _samples(self, answers: list[Optional[str]]) -> list[TokenizedSample]:
        """The public questions followed by `answers`, in this party's tokens (questions without one left out)."""
        examples = self.data.public_examples
        return [
            TokenizedSample(i, *encode_prompt_answer(self.tokenizer, examples[i].prompt, answer, self.max_length))
            for i, answer in enumerate(answers)
            if answer is not None
        ]

    def _predict_public(
        self, phase: str, answers: list[Optional[str]], cache: bool = True
    ) -> list[dict[str, torch.Tensor]]:
        """Score the public questions answered with `answers` (all ranks' shards when the party spans
        ranks); with `cache`, keeps the NLL per byte of gold answers for DualMinCE."""
        L.seed_everything(self.seed, verbose=False)
        self.data.scored = None if self.public_labelled and cache else self._samples(answers)
        try:
            outputs = self._trainer(phase).predict(self.module, datamodule=self.data)
        finally:
            self.data.scored = None
        self._park()
        if party_processes(self.config.trainer) > 1:  # each rank predicted a shard of the public data
            outputs = gather_predictions(outputs)
        if self.public_labelled and cache:
            index = torch.cat([o["index"] for o in outputs]).long()
            nll = torch.cat([o["nll"] for o in outputs])
            per_byte = nll / self._scored_bytes(index.tolist(), answers)
            self._public_losses = torch.full((self.num_public,), float("inf"))
            self._public_losses[index] = per_byte
        return outputs

    def distill(self, round_index: int, teacher_payloads: dict[str, KnowledgePayload]) -> PhaseStats:
        """Steps 4–6 / 9–11: select (DualMinCE), align the selected samples, train on λ·CE + (1−λ)·KD."""
        self.round_index = round_index
        if self.config.distill_epochs == 0:  # a frozen party (e.g. the LLM in LLM2SLM) learns nothing
            return PhaseStats()
        teacher_payloads = self._verified(round_index, teacher_payloads)
        losses = teacher_losses(teacher_payloads, self.num_public)
        if self.public_labelled:
            own, samples = self.public_losses(), list(self.data.public)
        else:  # each sample's best teacher's answer: the receiver's own loss and its training text
            answers = _best_teachers_answers(best_teachers(losses), teacher_payloads, self.num_public)
            own = self.losses_on(answers)
        selection = dual_min_ce(own, losses, require_improvement=self.transfer.selection == "dualmince")
        if not self.public_labelled:  # no label to train on: only the selected samples, on their teacher's answer
            chosen = set((selection.teacher_of_sample >= 0).nonzero().flatten().tolist())
            samples = [s for s in self._samples(answers) if s.index in chosen]
            if not samples:
                return PhaseStats(selected=0, teacher_counts=selection.counts())
        by_index: list[Optional[TokenizedSample]] = [None] * self.num_public
        for sample in samples:
            by_index[sample.index] = sample
        targets = self.alignment.align_selected(selection, teacher_payloads, by_index)
        seed = phase_seed(self.seed, round_index, "distill")
        data = DistillationDataModule(
            public=samples,
            targets=targets,
            batch_size=self.config.batch_size,
            pad_id=self.data.pad_id,
            seed=seed,
            top_k=self.transfer.top_k,
            kd_positions=self.transfer.kd_positions,
        )
        selected, cache = SelectiveTransferCallback(selection), AlignmentCacheCallback(self.alignment)
        stats = self._fit(
            self._trainer("distill", self.config.distill_epochs, (selected, cache)), data, seed, "distill"
        )
        return replace(
            stats,
            selected=selection.num_selected,
            teacher_counts=selection.counts(),
            callbacks=selected.metrics | cache.metrics,  # the run's loggers get them through the round's stats
        )

    def _verified(self, round_index: int, payloads: dict[str, KnowledgePayload]) -> dict[str, KnowledgePayload]:
        """The teachers' payloads checked against what this party knows (`fedmkt.received`), losses recomputed.

        A payload that fails is left out with a warning (one bad client must not stop the server
        learning from the others); if every one fails, the phase stops with the first reason.
        """
        verified, refused = {}, []
        for teacher, payload in payloads.items():
            tokenizer = self.alignment.teacher_tokenizers[teacher]
            if teacher not in self._public_tokens:
                self._public_tokens[teacher] = PublicTokens(tokenizer, self.data.public_examples, self.max_length)
            agreed = Agreement(
                round=round_index,
                top_k=self.transfer.top_k,
                max_length=self.max_length,
                temperature=self.transfer.temperature,
                tokenizer_size=len(tokenizer),
                noised=self.privacy.logit_noise > 0,
                public_labelled=self.public_labelled,
                max_new_tokens=self.max_new_tokens,
                kd_positions=self.transfer.kd_positions,
            )
            try:
                verified[teacher] = verify_payload(payload, agreed, self._public_tokens[teacher])
            except FedMKTError as error:
                refused.append(error)
                warnings.warn(f"{self.name}: {error}", stacklevel=2)
        if refused and not verified:
            raise refused[0]
        return verified

    def evaluate(self) -> dict:
        """Scores of base + adapter on the common held-out set, and on this client's own set if it has one.

        Multiple choice: `eval_accuracy` (log-likelihood), `eval_accuracy_norm`, `eval_n` and the
        95 % Wilson interval `eval_accuracy_ci`, and `eval_correct` ("1"/"0" per question, in
        order, for paired comparisons); generation: `eval_rouge_l`, `eval_exact_match`,
        `eval_n`. The own set gives the same keys with the prefix `own_eval`. With named sets, each
        gives them with the prefix `eval_<name>`, and `eval_*` pools them (each question scored once).
        """
        start = time.perf_counter()
        model, device = self._scoring_model()
        stats = held_out_scores(
            lambda examples, what: self._scores(model, examples, what, device), self.evaluation, self.evaluation_sets
        )
        if self.own_evaluation:
            stats |= summary_keys(self._scores(model, self.own_evaluation, "evaluate own set", device), "own_eval")
        self._park()
        if self.public_answer_accuracy is not None:  # the diagnostic of the answers this party last shared
            stats["public_answer_accuracy"] = self.public_answer_accuracy
        return stats | {"eval_seconds": time.perf_counter() - start}

    def _scoring_model(self) -> tuple[torch.nn.Module, torch.device]:
        """The model on the device it scores on (evaluation, answering): a GPU where the party may use one."""
        model = self.module.model
        if is_sharded(model):  # scored through its shards, where they live: never whole on one device
            return model, next(model.parameters()).device
        use_gpu = torch.cuda.is_available() and self.config.trainer.accelerator in ("auto", "gpu", "cuda")
        device = torch.device("cuda" if use_gpu else "cpu")
        return model.to(device), device

    def _scores(self, model, examples: list[Example], what: str, device: torch.device) -> dict:
        """The evaluation function's scores of `model` on `examples` (progress labelled `what`)."""
        settings = {"batch_size": self.config.eval_batch_size, "max_length": self.max_length, "device": device}
        progress = self._label(what) if self.config.trainer.enable_progress_bar else None
        if self.data_format == "generation":
            return evaluate_generation(
                model, self.tokenizer, examples, max_new_tokens=self.max_new_tokens, progress=progress, **settings
            )
        return evaluate_multiple_choice(model, self.tokenizer, examples, progress=progress, **settings)

    def _park(self) -> None:
        """Move the model off the accelerator while other parties work, unless it fits there.

        A model on a GPU with at least `RESIDENT_FREE_SHARE` of its memory still free stays (the
        next phase starts at once, without a copy each way); otherwise it goes to the CPU. FSDP2
        shards stay on their devices: they are bound to the party's device mesh, and each shard is
        small by design.
        """
        if is_sharded(self.module.model):  # FSDP2 keeps the root unit (embeddings, head) gathered after a forward
            self.module.model.reshard()
            return
        device = next(self.module.parameters()).device
        if device.type == "cuda" and room_to_stay(device):
            return
        self.module.cpu()

    # ---- state for checkpoints and adapter averaging --------------------------------------

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights only (what FedAvg exchanges and checkpoints store), gathered if sharded."""
        return adapter_state(self.module.model)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt LoRA weights (fedavg's average, or a checkpoint's); the cached own losses are stale then."""
        load_adapter_state(self.module.model, state)
        self._public_losses = None
        self._own_answers = None

    def load_adapter(self, directory: Path) -> None:
        """Restore LoRA weights saved by `save_adapter`."""
        weights = Path(directory) / "adapter_model.safetensors"
        if not weights.is_file():
            raise FedMKTError(
                f"{self.name}: adapter {weights} is missing. Fix: resume from a run_dir whose checkpoint is complete."
            )
        self.load_adapter_state(load_file(weights))

    def cached_public_losses(self) -> Optional[torch.Tensor]:
        """This party's own public-data CE if still valid for its current weights."""
        return self._public_losses

    def restore_public_losses(self, losses: Optional[torch.Tensor]) -> None:
        """Put back the own losses a checkpoint saved with the adapter they belong to."""
        self._public_losses = losses

    def save_adapter(self, directory: Path, state: Optional[dict[str, torch.Tensor]] = None) -> None:
        """LoRA weights (safetensors) + adapter config, written to a temporary folder then renamed.

        `state` is an already gathered `adapter_state()` (how a sharded party's rank 0 writes).
        """
        if state is None:
            state = self.adapter_state()
        model = self.module.model
        atomic_write_dir(
            directory,
            lambda tmp: model.save_pretrained(tmp, safe_serialization=True, state_dict=under_model_keys(model, state)),
        )


def _best_teachers_answers(
    best: torch.Tensor, payloads: dict[str, KnowledgePayload], num_public: int
) -> list[Optional[str]]:
    """Per public sample, the answer text its best teacher shared along (None: no teacher scored it)."""
    names = sorted(payloads)
    rows = {name: {int(i): row for row, i in enumerate(payloads[name].sample_index.tolist())} for name in names}
    answers: list[Optional[str]] = [None] * num_public
    for index, teacher in enumerate(best.tolist()):
        if teacher >= 0:
            name = names[teacher]
            answers[index] = payloads[name].answer_text(rows[name][index])
    return answers


RESIDENT_FREE_SHARE = 0.5
"""A party stays on its GPU between phases while at least this share of the GPU's memory is free."""


def room_to_stay(device: torch.device) -> bool:
    """Whether a party on `device` may stay there: enough memory is left for the other parties' phases."""
    free, total = torch.cuda.mem_get_info(device)
    return free >= RESIDENT_FREE_SHARE * total


def _phase_mean(metric, spans_ranks: bool, empty: float) -> float:
    """A phase's mean loss (a `MeanMetric`); over every rank's batches when the phase ran on several ranks.

    Read after Lightning's teardown has moved the module, metric states included, to the CPU; the
    sum runs over fedmkt's gloo group because an NCCL default group has no CPU backend. Every rank
    of the phase takes part, also one that saw no batch, so none waits for a missing peer.
    """
    totals = torch.stack([metric.mean_value.detach().double().cpu(), metric.weight.detach().double().cpu()])
    if spans_ranks:
        totals = sum_over_ranks(totals)
    weighted_sum, weight = totals.tolist()
    return empty if weight == 0 else weighted_sum / weight
