"""The sample stage: on-policy responses, G per prompt from the current policy, with the
behaviour log-probs of the distribution sampled from. It asks the run's rollout owner
(:mod:`lightning_unified.rollouts`) for a batch's rows, sampled now or ahead of the
trainer, and puts them into the batch."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_unified import batch as fields
from lightning_unified.environments.tools import describe_tool_call_format
from lightning_unified.failures import report
from lightning_unified.rollouts.requests import mixed_batch_is_on_policy, sampling_request
from lightning_unified.rollouts.rows import sample_rows
from lightning_unified.specs import OnPolicy
from lightning_unified.stages.base import Stage


class SampleStage(Stage):
    """G responses per prompt (or G episodes), from the rollout owner; a mixed source's batch
    keeps the data's responses when its draw says so."""

    name = "sample"

    def __init__(self, data_source: OnPolicy):
        super().__init__()
        self.data_source = data_source

    def reads(self) -> set[str]:
        return {fields.PROMPT_IDS, fields.PROMPT_MASK}

    def writes(self) -> set[str]:
        # the prompts (and their per-row lists) come back as G copies each
        return {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK, fields.LOSS_MASK,
                fields.BEHAVIOUR_LOGP, fields.GROUP_SIZE, fields.POLICY_VERSION, fields.SAMPLED, fields.REFERENCES,
                fields.PROMPTS, fields.TEACHER_NAMES, fields.TEACHER_PROMPTS,
                *((fields.EPISODE, fields.ENVIRONMENT_REWARDS, fields.FAILED) if self.data_source.environment.enabled
                  else ()),
                *((fields.TOKEN_VERSION,) if self.data_source.sampling.engine == "server" else ())}

    def is_on_policy(self, epoch: int, batch_idx: int) -> bool:
        return mixed_batch_is_on_policy(self.data_source.probability, self.data_source.seed, epoch, batch_idx)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        on_policy = self.is_on_policy(trainer.current_epoch, batch_idx)
        if self.data_source.probability < 1.0:
            pl_module.log("sampling/on_policy", float(on_policy), batch_size=1)
        batch[fields.SAMPLED] = on_policy
        if not on_policy:
            fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                           who="a mixed data source's off-policy batch")
            pl_module.rollouts.feed(trainer, pl_module, batch_idx)  # the batches ahead still come
            return
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="sampling")
        step = pl_module.progress["optimizer_steps"]
        rows = pl_module.rollouts.rows(trainer, pl_module, batch, batch_idx)
        self.apply(batch, rows)
        # the lag at the batch's first update (per token when each has its version), and at its
        # last (a replayed rollout's)
        lag, lag_max = _lags(batch, step, rows["version"])
        pl_module.log("sampling/lag", lag, batch_size=1)
        pl_module.log("sampling/lag_max", lag_max + self.data_source.updates_per_batch - 1, batch_size=1)
        # the lengths (sampling/response_length...), the EOS and clipped shares, over every rank:
        # the step's diagnostics (lightning_unified.metrics.record_lengths)
        lengths = batch[fields.RESPONSE_MASK].sum(-1).float()
        # generation's own seconds (in the producer's thread when sampled ahead)
        pl_module.log("sampling/seconds", rows["seconds"], batch_size=1)
        pl_module.log("sampling/tokens_per_sec", lengths.sum() / rows["seconds"], batch_size=1)
        for name, value in rows.get("environment", {}).items():  # per-episode means of a multi-turn rollout
            pl_module.log(f"environment/{name}", value, batch_size=len(set(batch[fields.EPISODE])))
        if "failures" in rows:  # episodes whose environment raised: counted here, in the trainer's thread
            report(pl_module, "environment", rows["episodes"], rows["failures"])

    def apply(self, batch: dict, rows: dict) -> None:
        """The sampled rows into the batch: the prompts as G copies each (or, for episodes,
        as each row's own), their responses, and every per-prompt list repeated alike."""
        group = self.data_source.sampling.num_generations
        for name in (fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                     fields.BEHAVIOUR_LOGP):
            batch[name] = rows[name]
        # one sampled turn: every token is the policy's; an episode's rows say which are
        batch[fields.LOSS_MASK] = rows.get(fields.LOSS_MASK, rows[fields.RESPONSE_MASK])
        batch[fields.GROUP_SIZE] = group
        batch[fields.POLICY_VERSION] = [rows["version"]] * rows[fields.RESPONSE_IDS].shape[0]
        if fields.TOKEN_VERSION in rows:  # each token's version, and each row's is its first token's
            versions, mask = rows[fields.TOKEN_VERSION], rows[fields.RESPONSE_MASK].bool()
            batch[fields.TOKEN_VERSION] = versions
            first = versions.masked_fill(~mask, torch.iinfo(versions.dtype).max).min(-1).values
            batch[fields.POLICY_VERSION] = [min(int(v), rows["version"]) if m else rows["version"]
                                            for v, m in zip(first.tolist(), mask.any(-1).tolist())]
        # each row's prompt in the loader's batch: G consecutive rows per prompt, or an episode's rows
        source = rows.get("prompt_index") or [i for i in range(rows["source_prompt_ids"].shape[0])
                                               for _ in range(group)]
        for name in (fields.REFERENCES, fields.PROMPTS, fields.TEACHER_NAMES, fields.TEACHER_PROMPTS):  # per-prompt lists, now one entry per row
            if name in batch:
                batch[name] = [batch[name][i] for i in source]
        if fields.EPISODE in rows:
            batch[fields.EPISODE] = rows[fields.EPISODE]
            batch[fields.ENVIRONMENT_REWARDS] = rows[fields.ENVIRONMENT_REWARDS]
            batch[fields.FAILED] = rows[fields.FAILED]

    def sample_into(self, batch: dict, pl_module: L.LightningModule, max_new_tokens: int, synced: bool,
                    seed: int = 0) -> None:
        """Replace the batch's prompts by G copies each and add their sampled responses,
        from the module's rollout engine (synced with the policy first, when due): one
        batch sampled now, outside a training loop."""
        request = sampling_request(self.data_source.sampling, pl_module, seed=seed, synced=synced,
                                   max_new_tokens=max_new_tokens)
        step = pl_module.progress["optimizer_steps"]
        with pl_module.rollouts.engine_for(step) as engine:
            rows = sample_rows(engine, pl_module, batch, request, self.data_source)
        rows["version"] = pl_module.rollouts.weights_version(step)
        self.apply(batch, rows)

    def setup(self, trainer, host, stage: str) -> None:
        spec = self.data_source.environment
        if stage == "fit" and spec.enabled:
            rank_zero_info(f"episodes against {getattr(spec.cls, '__qualname__', spec.cls)}: up to {spec.max_turns} "
                           f"policy turns and {spec.max_tokens} tokens each; tool calls read as "
                           f"{describe_tool_call_format(host.tokenizer)}")


def _lags(batch: dict, step: int, version: int) -> tuple[float, float]:
    """(mean, max) of the steps between the weights that sampled the batch and those it
    trains: over its response tokens when each carries its version, else the batch's."""
    versions = batch.get(fields.TOKEN_VERSION)
    if versions is None:
        return float(step - version), float(step - version)
    mask = fields.loss_mask(batch).bool()
    lags = (step - versions)[mask].double()
    return (float(lags.mean()), float(lags.max())) if lags.numel() else (0.0, 0.0)
