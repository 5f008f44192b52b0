"""The sample stage: on-policy responses, G per prompt from the current policy, through the run's
rollout engine (:mod:`lightning_unified.engines`), and record the behaviour log-probs of the
distribution sampled from."""

from __future__ import annotations

import random
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_unified import batch as fields
from lightning_unified.callbacks.precision import trainer_precision
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.environments.sampling import sample_episodes
from lightning_unified.environments.tools import describe_tool_call_format
from lightning_unified.failures import report
from lightning_unified.specs import OnPolicy
from lightning_unified.stages.base import Stage
from lightning_unified.stages.sample_ahead import SamplingAhead, check_resumed_lag


def mixed_batch_is_on_policy(probability: float, seed: int, epoch: int, batch_idx: int) -> bool:
    """The same draw on every rank, and again after a resume, and known ahead of the batch
    (a producer sampling ahead asks): it depends only on the seed, the epoch and the batch."""
    if probability >= 1.0:
        return True
    if probability <= 0.0:
        return False
    return random.Random(f"{seed}:{epoch}:{batch_idx}").random() < probability


def sampling_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """The draws of one batch on one rank: whenever it is sampled (now, or ahead of the
    trainer), and whatever else used the global RNG before."""
    return random.Random(f"sample:{seed}:{epoch}:{batch_idx}:{rank}").getrandbits(63)


class SampleStage(Stage):
    name = "sample"

    def __init__(self, data_source: OnPolicy):
        super().__init__()
        self.data_source = data_source
        # max_lag >= 1: the batches sampled ahead of the trainer, by the rollout owner's producer
        self.ahead = SamplingAhead(self, data_source.sampling.max_lag) if data_source.sampling.max_lag else None

    def reads(self) -> set[str]:
        return {fields.PROMPT_IDS, fields.PROMPT_MASK}

    def writes(self) -> set[str]:
        # the prompts (and their per-row lists) come back as G copies each
        return {fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK, fields.LOSS_MASK,
                fields.BEHAVIOUR_LOGP, fields.GROUP_SIZE, fields.POLICY_VERSION, fields.SAMPLED, fields.REFERENCES,
                fields.PROMPTS, fields.TEACHER_NAMES, fields.TEACHER_PROMPTS,
                *((fields.EPISODE, fields.ENVIRONMENT_REWARDS, fields.FAILED) if self.data_source.environment.enabled
                  else ())}

    def _max_new_tokens(self, pl_module: L.LightningModule) -> int:
        """The sampling spec's, else the module's (which falls back to the datamodule's)."""
        return self.data_source.sampling.max_new_tokens or pl_module.max_new_tokens

    def is_on_policy(self, epoch: int, batch_idx: int) -> bool:
        return mixed_batch_is_on_policy(self.data_source.probability, self.data_source.seed, epoch, batch_idx)

    def request(self, pl_module: L.LightningModule, *, seed: int, synced: bool,
                max_new_tokens: int | None = None) -> GenerationRequest:
        """What the engine is asked for one batch (``max_new_tokens`` None: the run's)."""
        spec = self.data_source.sampling
        return GenerationRequest(
            max_new_tokens=max_new_tokens or self._max_new_tokens(pl_module),
            stop_token_ids=tuple(pl_module.stop_token_ids), pad_token_id=pl_module.tokenizer.pad_token_id,
            temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, behaviour=spec.behaviour, seed=seed,
            synced=synced,
        )

    def batch_request(self, pl_module: L.LightningModule, trainer: L.Trainer, epoch: int,
                      batch_idx: int) -> GenerationRequest:
        """The request for one training batch on this rank, whenever it is sampled."""
        return self.request(pl_module, seed=sampling_seed(self.data_source.seed, epoch, batch_idx,
                                                          trainer.global_rank), synced=trainer.world_size > 1)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int) -> None:
        on_policy = self.is_on_policy(trainer.current_epoch, batch_idx)
        if self.data_source.probability < 1.0:
            pl_module.log("sampling/on_policy", float(on_policy), batch_size=1)
        batch[fields.SAMPLED] = on_policy
        if not on_policy:
            fields.require(batch, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                           who="a mixed data source's off-policy batch")
            if self.ahead is not None:
                self.ahead.feed(trainer, pl_module, batch_idx)
            return
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="sampling")
        step = pl_module.progress["optimizer_steps"]
        if self.ahead is not None:
            rows = self.ahead.rows_for(trainer, pl_module, batch, batch_idx)
            self.ahead.feed(trainer, pl_module, batch_idx)  # then the batches ahead, from this step's weights
        else:
            request = self.batch_request(pl_module, trainer, trainer.current_epoch, batch_idx)
            # the engine rests again after the block: its memory is the training step's until the next rollout
            with pl_module.rollouts.engine_for(step) as engine:
                sync_seconds = pl_module.rollouts.take_sync_seconds()  # started and synced: what follows is generation
                if sync_seconds is not None:
                    pl_module.log("sampling/sync_seconds", sync_seconds, batch_size=1)
                rows = self.sample_with(engine, pl_module, batch, request)
            # the weights that sampled: older than the policy's when the engine syncs every few steps
            rows["version"] = pl_module.rollouts.weights_version(step)
        self.apply(batch, rows)
        lag = step - rows["version"]
        # the lag at the batch's first update, and at its last (a replayed rollout's)
        pl_module.log("sampling/lag", float(lag), batch_size=1)
        pl_module.log("sampling/lag_max", float(lag + self.data_source.updates_per_batch - 1), batch_size=1)
        lengths = batch[fields.RESPONSE_MASK].sum(-1).float()
        stops = torch.as_tensor(pl_module.stop_token_ids, device=lengths.device)
        ended = torch.isin(batch[fields.RESPONSE_IDS], stops).any(-1).float()
        n = lengths.numel()
        pl_module.log("sampling/response_length", lengths.mean(), batch_size=n)
        pl_module.log("sampling/eos_fraction", ended.mean(), batch_size=n)
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

    @torch.no_grad()
    def sample_with(self, engine, pl_module: L.LightningModule, prompts: dict, request: GenerationRequest) -> dict:
        """G responses to each prompt of ``prompts`` (a batch's prompt fields) from
        ``engine``, or G episodes against the environment, with their behaviour log-probs,
        under the trainer's precision: the fields :meth:`apply` puts into the batch, and the
        seconds generation took."""
        group = self.data_source.sampling.num_generations
        given_ids, given_mask = prompts[fields.PROMPT_IDS], prompts[fields.PROMPT_MASK]
        started = time.perf_counter()
        if self.data_source.environment.enabled:
            with trainer_precision(pl_module):
                rows = sample_episodes(engine, pl_module, prompts, request, self.data_source.environment, group)
        else:
            prompt_ids = given_ids.repeat_interleave(group, dim=0)
            prompt_mask = given_mask.repeat_interleave(group, dim=0)
            with trainer_precision(pl_module):
                rollout = engine.generate(pl_module.policy, prompt_ids, prompt_mask, request)
            rows = {fields.PROMPT_IDS: prompt_ids, fields.PROMPT_MASK: prompt_mask,
                    fields.RESPONSE_IDS: rollout.response_ids, fields.RESPONSE_MASK: rollout.response_mask,
                    fields.BEHAVIOUR_LOGP: rollout.logp}
        return {**rows, "source_prompt_ids": given_ids, "seconds": time.perf_counter() - started}

    def sample_into(self, batch: dict, pl_module: L.LightningModule, max_new_tokens: int, synced: bool,
                    seed: int = 0) -> None:
        """Replace the batch's prompts by G copies each and add their sampled responses,
        from the module's rollout engine (synced with the policy first, when due)."""
        request = self.request(pl_module, seed=seed, synced=synced, max_new_tokens=max_new_tokens)
        step = pl_module.progress["optimizer_steps"]
        with pl_module.rollouts.engine_for(step) as engine:
            rows = self.sample_with(engine, pl_module, batch, request)
        rows["version"] = pl_module.rollouts.weights_version(step)
        self.apply(batch, rows)

    def setup(self, trainer, host, stage: str) -> None:
        spec = self.data_source.environment
        if stage == "fit" and spec.enabled:
            rank_zero_info(f"episodes against {getattr(spec.cls, '__qualname__', spec.cls)}: up to {spec.max_turns} "
                           f"policy turns and {spec.max_tokens} tokens each; tool calls read as "
                           f"{describe_tool_call_format(host.tokenizer)}")

    # --- sampling ahead (max_lag >= 1) ---------------------------------------------------
    def on_train_start(self, trainer, host) -> None:
        if self.ahead is not None:
            self.ahead.on_train_start(trainer, host)

    def teardown(self, trainer, host, stage: str) -> None:
        # batches handed over past the run's last step are not trained: drop what has not
        # started (the checkpoints that keep them are written by now)
        if self.ahead is not None and stage == "fit" and host.rollouts.producer is not None:
            host.rollouts.producer.clear()

    def after_batch(self, trainer, host, outputs, batch: dict, batch_idx: int) -> None:
        if self.ahead is not None and fields.is_sampled(batch):
            self.ahead.log_lag_and_mismatch(host, outputs, batch)

    def state_dict(self) -> dict:
        return self.ahead.state_dict() if self.ahead is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ahead is not None:
            self.ahead.load_state_dict(state)
        else:
            check_resumed_lag(state, 0)

