"""The party `LightningModule`: a frozen base LM with a LoRA adapter.

One module serves every phase a party goes through in a round:
- training on private data (batches carry only `targets`): task CE on answer tokens;
- training on public data with teacher targets (batches also carry `kd_ids`/`kd_probs`/`kd_mask`/`kd_eligible`):
  per sample `λ·CE + (1−λ)·T²·KD` (`fedmkt.losses.loss_weights`), KD the sparse top-k loss;
- prediction on public data: per-sample CE, top-k next-token logits and the log-sum-exp at every
  position, which is what the party shares with others.

No phase builds a [B, L, V] tensor: the model runs up to its final hidden states and the output
head runs a chunk at a time on the rows a loss or payload reads (`fedmkt.head`).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from fedmkt.config import LoRAConfig, OptimizerConfig, TransferConfig
from fedmkt.data.tokenize import IGNORE_INDEX
from fedmkt.dp import DPPlan, private_step
from fedmkt.errors import FedMKTError
from fedmkt.fastpaths import FAST
from fedmkt.head import ChunkKnowledge, OutputHead, final_hidden_states, head_knowledge, head_training_loss
from fedmkt.losses import kd_objective, loss_weights, sparse_kd_loss, token_cross_entropy
from fedmkt.schedule import ScheduleSpan, phase_lr_lambda
from fedmkt.selection import scored_targets


class PartyModule(L.LightningModule):
    """A party's trainable model: LoRA on a frozen base, with task and KD losses."""

    def __init__(
        self,
        base_model: PreTrainedModel,
        lora: LoRAConfig,
        optimizer: OptimizerConfig,
        transfer: TransferConfig,
        name: str = "party",
    ) -> None:
        super().__init__()
        self.name = name
        self.optimizer_config = optimizer
        self.transfer = transfer
        self.dp_plan: Optional[DPPlan] = None
        """Set for a client's private fine-tuning under `privacy.dp`: training steps are then DP-SGD steps."""
        self.save_hyperparameters(
            {"lora": vars(lora), "optimizer": vars(optimizer), "transfer": vars(transfer), "name": name}
        )
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            self.model = get_peft_model(base_model, peft_config)
        except ValueError as error:
            raise FedMKTError(
                f"{name}: LoRA target modules {list(lora.target_modules)} not found in {type(base_model).__name__} ({error}). "
                "Fix: set lora.target_modules to that architecture's projection names."
            ) from error
        # Synced explicitly by the participant, and only when the phase ran on several ranks: a
        # single-device party trains on rank 0 alone, where an implicit sync would wait forever.
        self.task_loss = MeanMetric(sync_on_compute=False)
        self.kd_loss = MeanMetric(sync_on_compute=False)
        self.schedule_span: Optional[ScheduleSpan] = None
        """This phase's part of the run's learning-rate schedule (set by the participant; None: a
        schedule of the phase's own)."""

    def configure_model(self) -> None:
        """Shard the model with FSDP2 when this phase's trainer uses `ModelParallelStrategy` (fsdp).

        Each decoder layer becomes its own FSDP unit (all-gathered only while it runs), the rest
        (embeddings, the tied head, the final norm) one root unit. Called at the start of every
        phase's trainer; the first call shards, later ones find the model sharded and keep it.
        Single-device and DDP trainers never call for sharding, so this is a no-op there.
        """
        from lightning.pytorch.strategies import ModelParallelStrategy
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.trainer.strategy, ModelParallelStrategy) or isinstance(self.model, FSDPModule):
            return
        self.shard(self.device_mesh["data_parallel"])

    def shard(self, mesh: Any) -> None:
        """FSDP2-shard the model over `mesh` (1-D, data parallel): each rank keeps 1/ranks of the weights.

        fedmkt calls it when the party is built (`distributed.coordinate`), so the whole model never
        sits on one device; `configure_model` only shards a model that is not sharded yet.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        layer_types = set(getattr(self.model.get_base_model(), "_no_split_modules", None) or [])
        if not layer_types:
            raise FedMKTError(
                f"{self.name}: {type(self.model.get_base_model()).__name__} does not name its decoder layers "
                "(`_no_split_modules`), so fsdp cannot shard it layer by layer. Fix: use strategy ddp for this party."
            )
        for module in self.model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full ``[B, L, V]`` logits (for inspection; the phases never need them whole)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _hidden_rows(self, batch: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The final hidden states at the ``[B, L]`` mask `rows`, as ``[N, H]``, with the rows' indices."""
        hidden = final_hidden_states(self.model, batch["input_ids"], batch["attention_mask"])
        where = rows.nonzero(as_tuple=True)
        return hidden[where], where

    # ---- training -------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self.task_loss.reset()
        self.kd_loss.reset()

    @property
    def automatic_optimization(self) -> bool:
        """Lightning steps the optimizer, except in DP-SGD, which steps it itself (`_private_step`)."""
        return self.dp_plan is None

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:  # Lightning's own __init__ sets it; the plan decides
        pass

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        if self.dp_plan is not None:
            return self._private_step(batch)
        return self._checked(*self._objective(batch))

    def _objective(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(the batch's objective, each sample's task CE, the mean KD over distilled positions or None)."""
        if not FAST.chunked_head:
            return self._objective_on_full_logits(batch)
        targets = batch["targets"]
        has_label = targets != IGNORE_INDEX
        transfer = self.transfer
        distilling = "kd_ids" in batch
        if distilling:
            mask = batch["kd_mask"].bool()
            ce_w, kd_w = loss_weights(
                has_label, mask, batch.get("kd_eligible"), transfer.ce_weight, transfer.temperature
            )
            hidden, where = self._hidden_rows(batch, has_label | mask)
            kd_ids = torch.where(mask[where].unsqueeze(-1), batch["kd_ids"][where], -1)
            loss, ce_rows, kd_rows = head_training_loss(
                OutputHead.of(self.model),
                hidden,
                targets[where],
                ce_w[where],
                kd_ids,
                batch["kd_probs"][where],
                kd_w[where],
                temperature=transfer.temperature,
                kind=transfer.kd_loss,
                tail=transfer.topk_target == "tail",
            )
        else:
            ce_w, _ = loss_weights(has_label)
            hidden, where = self._hidden_rows(batch, has_label)
            loss, ce_rows, kd_rows = head_training_loss(OutputHead.of(self.model), hidden, targets[where], ce_w[where])
        samples = len(targets)
        ce = _per_sample_mean(ce_rows, where[0], has_label[where], samples)
        distilled = mask[where] if distilling else None
        kd_mean = (kd_rows * distilled).sum() / distilled.sum().clamp_min(1) if distilling else None
        return loss, ce, kd_mean

    def _private_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One DP-SGD step on a Poisson batch (possibly empty): per-sample clipped gradients plus noise."""
        plan = self.dp_plan
        assert plan is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        rows = len(batch["input_ids"]) if batch else 0
        losses: list[torch.Tensor] = []

        def loss_of(row: int) -> torch.Tensor:
            sample = {key: value[row : row + 1] for key, value in batch.items() if isinstance(value, torch.Tensor)}
            loss, ce, _ = self._objective(sample)
            losses.append(ce.detach())
            return loss

        grads, _ = private_step(params, [lambda row=row: loss_of(row) for row in range(rows)], plan)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        self.lr_schedulers().step()
        if losses:
            ce = torch.cat(losses)
            self._checked(ce.mean(), ce, None)
        return None

    def _objective_on_full_logits(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The same objective through the model's [B, L, V] logits (`fastpaths.FAST.chunked_head` off)."""
        transfer = self.transfer
        logits = self(batch["input_ids"], batch["attention_mask"])
        ce = token_cross_entropy(logits, batch["targets"])
        if "kd_ids" not in batch:
            return ce.mean(), ce.detach(), None
        mask = batch["kd_mask"].bool()
        kd_ids = torch.where(mask.unsqueeze(-1), batch["kd_ids"], -1)
        kd = sparse_kd_loss(
            logits,
            kd_ids,
            batch["kd_probs"],
            transfer.temperature,
            transfer.kd_loss,
            tail=transfer.topk_target == "tail",
        )
        loss = kd_objective(ce, kd, mask, transfer.ce_weight, batch.get("kd_eligible"), transfer.temperature)
        kd_mean = (kd.detach() * mask).sum() / mask.sum().clamp_min(1)
        return loss, ce.detach(), kd_mean

    def _checked(self, loss: torch.Tensor, ce: torch.Tensor, kd_mean: torch.Tensor | None) -> torch.Tensor:
        """`loss`, after refusing a non-finite one and logging the phase's per-sample CE and KD means."""
        if not torch.isfinite(loss):
            raise FedMKTError(
                f"{self.name}: loss became {loss.item()} at step {self.global_step}. "
                "Fix: lower optimizer.lr, use precision 32-true, or check the data for empty answers."
            )
        samples = len(ce)
        self.task_loss.update(ce.mean())
        self.log("task_loss", ce.mean(), prog_bar=True, batch_size=samples)
        if kd_mean is not None:
            self.kd_loss.update(kd_mean)
            self.log("kd_loss", kd_mean, prog_bar=True, batch_size=samples)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.optimizer_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if config.schedule == "run" and self.schedule_span is not None:  # this phase's part of the run's schedule
            factor = phase_lr_lambda(self.schedule_span, total, config.warmup_ratio)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        # Rounded down: a warm-up step starts at lr 0, so with few steps a rounded-up warm-up would
        # waste a whole (sometimes the only) optimizer step of a phase.
        warmup = int(config.warmup_ratio * total)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- sharing knowledge -----------------------------------------------------------------

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-sample NLL of the scored text (`fedmkt.selection.scored_targets`: the answer, or prompt
        and answer under `kd_positions: all`; summed over its tokens, the participant divides it by
        the text's bytes), and at every real (non-pad) position the top-k logits, the log-sum-exp and
        the scored label's log-probability, moved to CPU."""
        mask = batch["attention_mask"].bool()
        scored = scored_targets(batch["input_ids"], batch["targets"], self.transfer.kd_positions, mask)
        if FAST.chunked_head:
            hidden, where = self._hidden_rows(batch, mask)
            targets = scored[where]
            knowledge = head_knowledge(
                OutputHead.of(self.model), hidden, targets, self.transfer.top_k, self.transfer.temperature
            )
            nll = -_per_sample_sum(knowledge.label_logprob, where[0], targets != IGNORE_INDEX, len(mask))
        else:  # the [B, L, V] logits, then the same numbers from them
            logits = self(batch["input_ids"], batch["attention_mask"])
            scored_tokens = (scored != IGNORE_INDEX).sum(dim=1)
            nll = token_cross_entropy(logits, scored).float() * scored_tokens
            rows, targets = logits[mask].float(), scored[mask]
            values, ids = logits[mask].topk(self.transfer.top_k, dim=-1)
            lse = torch.logsumexp(rows / self.transfer.temperature, dim=-1)
            picked = torch.log_softmax(rows, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
            knowledge = ChunkKnowledge(torch.where(targets != IGNORE_INDEX, picked, 0.0), values, ids, lse)
        return {
            "index": batch["index"].cpu(),
            "nll": nll.cpu(),
            "lengths": mask.sum(-1).cpu(),
            "token_ids": batch["input_ids"][mask].cpu(),
            "topk_ids": knowledge.topk_ids.cpu(),
            "topk_logits": knowledge.topk_values.to(torch.float16).cpu(),
            "logsumexp": knowledge.logsumexp.cpu(),
            "label_logprob": knowledge.label_logprob.cpu(),
        }


def _per_sample_sum(
    values: torch.Tensor, sample_of_row: torch.Tensor, counted: torch.Tensor, samples: int
) -> torch.Tensor:
    """Each sample's sum of `values` over its `counted` rows (0 for a sample with none), ``[samples]``."""
    kept = torch.where(counted, values.float(), 0.0)
    return torch.zeros(samples, dtype=torch.float32, device=values.device).index_add_(0, sample_of_row, kept)


def _per_sample_mean(
    values: torch.Tensor, sample_of_row: torch.Tensor, counted: torch.Tensor, samples: int
) -> torch.Tensor:
    """Each sample's mean of `values` over its `counted` rows (0 for a sample with none), ``[samples]``."""
    kept = torch.where(counted, values.float(), 0.0)
    sums = torch.zeros(samples, dtype=torch.float32, device=values.device).index_add_(0, sample_of_row, kept)
    counts = torch.zeros(samples, dtype=torch.float32, device=values.device).index_add_(
        0, sample_of_row, counted.float()
    )
    return sums / counts.clamp(min=1)
