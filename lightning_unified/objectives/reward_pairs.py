"""A reward model's objective: Bradley-Terry on a scalar head over the decoder, from the
data's preference pairs (:class:`lightning_unified.specs.RewardPairs`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_unified import batch as fields
from lightning_unified.losses.aggregation import count_tensor
from lightning_unified.losses.bradley_terry import bradley_terry_loss, pair_statistics
from lightning_unified.losses.preference import pair_rows
from lightning_unified.models.scalar_head import ScalarHead, as_sequence_classifier, sequence_scores
from lightning_unified.specs import RewardPairs

log = logging.getLogger(__name__)

# what validation logs, as val/<name>: TRL's eval accuracy and margin
VAL_METRICS = ("pair_accuracy", "reward_margin")


@dataclass(frozen=True)
class ObjectiveTerms:
    """One micro-batch's share of an optimizer step, as the step sums it: ``loss`` and
    ``objective`` are sums over the micro-batch's pairs (the step divides by the whole step's
    normaliser), ``counts`` its :func:`~lightning_unified.losses.aggregation.count_tensor`."""

    loss: Tensor
    objective: Tensor
    mask: Tensor
    counts: Tensor
    group_size: int


class RewardPairsObjective(nn.Module):
    """The scalar head and its loss. The causal LM's own output head takes no part: when it
    is not tied to the input embeddings it is frozen, so neither the optimizer nor DDP waits
    for a gradient it never gets."""

    def __init__(self, signal: RewardPairs, policy: nn.Module):
        super().__init__()
        self.signal = signal
        config = policy.config
        self.head = ScalarHead(config.hidden_size, getattr(config, "initializer_range", 0.02))
        output, inputs = policy.get_output_embeddings(), policy.get_input_embeddings()
        if output is not None and output.weight is not inputs.weight:
            output.requires_grad_(False)

    def scores(self, host, rows: dict) -> Tensor:
        """[B] each row's score (prompt + response) on the head."""
        if host.packing.enabled:
            raise ValueError("module.packing=true is not built for signal=reward_model (its forward reads one "
                             "token per sequence from padded rows); set module.packing=false")
        return sequence_scores(host.policy, self.head, rows[fields.PROMPT_IDS], rows[fields.PROMPT_MASK],
                               rows[fields.RESPONSE_IDS], rows[fields.RESPONSE_MASK], host.stop_token_ids)

    def pairs(self, rows: dict, scores: Tensor, who: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(chosen scores [P], rejected scores [P], margins [P] or None) of the batch's pairs."""
        if fields.PREFERENCE not in rows:
            raise ValueError(f"signal=reward_model's {who} needs preference pairs: data with chosen and rejected columns "
                             f"(the built-in task: task.pairs=true for training, task.val_pairs=true for validation)")
        chosen, rejected = pair_rows(rows[fields.PREFERENCE], rows.get(fields.GROUP_SIZE, 2))
        margin = rows.get(fields.PAIR_MARGIN)
        return scores[chosen], scores[rejected], None if margin is None else margin.to(scores.device)[chosen]

    def terms(self, host, rows: dict) -> ObjectiveTerms:
        """This micro-batch's Bradley-Terry loss summed over its pairs (with the centring
        term), its plain Bradley-Terry objective, and its counts (one group per pair)."""
        chosen, rejected, margin = self.pairs(rows, self.scores(host, rows), "training data")
        loss = bradley_terry_loss(chosen, rejected, margin=margin,
                                  center_coefficient=self.signal.center_rewards_coefficient)  # [P]
        with torch.no_grad():
            objective = bradley_terry_loss(chosen, rejected, margin=margin)
        stats = pair_statistics(chosen, rejected)
        pairs = chosen.numel()
        host.log("train/pair_accuracy", stats["accuracy"].mean(), batch_size=pairs, prog_bar=True)
        host.log("train/reward_margin", stats["margin"].mean(), batch_size=pairs)
        host.log("train/reward_mean", (chosen + rejected).detach().mean() / 2, batch_size=pairs)
        mask = rows[fields.RESPONSE_MASK]
        return ObjectiveTerms(loss.sum(), objective.sum(), mask, count_tensor(mask, rows.get(fields.GROUP_SIZE, 2)),
                              rows.get(fields.GROUP_SIZE, 2))

    @torch.no_grad()
    def validate(self, host, batch: dict) -> dict:
        """Held-out pairs: the share the head ranks right (``val/pair_accuracy``; a tie is
        wrong) and the mean score gap (``val/reward_margin``), over every pair of every rank."""
        chosen, rejected, _ = self.pairs(batch, self.scores(host, batch), "validation")
        stats = pair_statistics(chosen, rejected)
        for name, key in zip(VAL_METRICS, ("accuracy", "margin")):
            if name not in host.val_metrics:
                host.val_metrics[name] = MeanMetric().to(host.device)
            host.val_metrics[name].update(stats[key].to(host.device))
            host.log(f"val/{name}", host.val_metrics[name], prog_bar=True, batch_size=chosen.numel(),
                     metric_attribute=f"val_metrics.{name}")
        return {"scores": {"chosen": chosen, "rejected": rejected}}

    def save(self, host, directory: str, merged_directory: str | None = None, writer: bool = True) -> None:
        """The reward model as an ``AutoModelForSequenceClassification`` directory with the
        run's tokenizer, which :class:`lightning_unified.rewards.RewardModel` and
        ``from_pretrained`` load as they are; with LoRA the adapters are merged in (a scorer
        needs the whole model), so ``merged_directory`` adds nothing and is not written."""
        if merged_directory is not None:
            log.info("signal=reward_model writes one merged model to %s; save_merged adds nothing", directory)
        if writer:
            as_sequence_classifier(host.policy, self.head, host.tokenizer.pad_token_id).save_pretrained(directory)
            host.tokenizer.save_pretrained(directory)
