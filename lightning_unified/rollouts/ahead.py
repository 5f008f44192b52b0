"""The batches sampled ahead of the trainer (``data_source.sampling.max_lag = k >= 1``), the
owner's queue: at the start of batch ``t`` the owner takes batch ``t``'s rows, sampled
earlier, and hands batch ``t + k``'s prompts to the producer, which samples them from the
weights of step ``t`` while the trainer trains on batch ``t``.

- Each batch's rows carry the weights version that sampled them: ``t - k`` (the epoch's
  first ``k`` batches: the epoch's first step, sampled when it starts).
- The engine takes new weights at the batch boundary, once the producer is idle: a batch is
  never sampled from two versions, and with a fixed lag the same seed gives the same rows.
- Prompts of later batches come from the training loader's own iterator, pulled early
  (:func:`~lightning_unified.lightning_private.training_lookahead`); the fit loop later gets
  the very batches, so every stage after sampling sees the batch it always did.
- A checkpoint keeps the batches pulled early and their sampled rows: the loader's saved
  place is after them, and their weights exist nowhere else.
"""

from __future__ import annotations

import time

import torch

from lightning_unified import batch as fields
from lightning_unified.lightning_private import training_lookahead
from lightning_unified.losses.importance import mismatch_kl
from lightning_unified.rollouts.requests import mixed_batch_is_on_policy


class BatchesAhead:
    """The owner's (``owner``, a :class:`~lightning_unified.rollouts.owner.Rollouts`) batches
    sampled ``max_lag`` ahead."""

    def __init__(self, owner, max_lag: int):
        self.owner, self.max_lag = owner, max_lag
        self._trainer = None  # from training's start: what a checkpoint reads
        self._restored: dict | None = None  # a checkpoint's batches ahead, until training starts
        self._scoring = None  # the producer's job scoring this batch with the engine's newest weights

    def on_train_start(self, trainer, host) -> None:
        self._trainer = trainer
        restored, self._restored = self._restored, None
        if not restored or not restored.get("ahead"):
            return
        _check_restored_prompts(restored)
        # before the fit loop's first fetch: the loader resumes after the batches pulled early
        training_lookahead(trainer, kept=restored["kept"])
        for key, rows in restored["ahead"].items():
            self.owner.producer.put(tuple(key), {k: _to(v, host.device) for k, v in rows.items()})

    def rows_for(self, trainer, host, batch: dict, batch_idx: int) -> dict:
        """Batch ``batch_idx``'s sampled rows (waiting for the producer if it is not done)."""
        epoch = trainer.current_epoch
        if not self.owner.producer.holds((epoch, batch_idx)):
            # the epoch's first batch: nothing was sampled ahead, so it is sampled now
            self._hand_over(trainer, host, epoch, batch_idx, batch, host.progress["optimizer_steps"])
        started = time.perf_counter()
        rows = self.owner.take((epoch, batch_idx))
        # how long the trainer waited: the sampling that the training step did not hide
        host.log("sampling/wait_seconds", time.perf_counter() - started, batch_size=1)
        _check_same_prompts(rows, batch, batch_idx)
        self._score_with_newest_weights(trainer, host, epoch, batch_idx, rows)
        return rows

    def _score_with_newest_weights(self, trainer, host, epoch: int, batch_idx: int, rows: dict) -> None:
        """A stale batch's tokens, scored by the engine once it holds this step's weights
        (queued in the producer before the next batch's sampling): against the behaviour
        log-probs that is the lag's share of the ratio (the same engine, older weights),
        against the trainer's own the engine's mismatch (the same weights)."""
        spec = self.owner.data_source.sampling
        step = host.progress["optimizer_steps"]
        truncated = spec.top_k or spec.top_p < 1.0
        self._scoring = None
        if rows["version"] >= step or (truncated and spec.behaviour == "sampled"):
            return  # nothing stale; or a behaviour the engine's plain log-probs are not
        if not spec.lag_diagnostics or not _logs_this_step(trainer):
            # diagnostics only, and as costly as a prefill of every row (a second request per
            # row on a server): made for the steps whose metrics Lightning records alone
            return
        ids, mask = rows[fields.PROMPT_IDS], rows[fields.PROMPT_MASK]
        response, response_mask = rows[fields.RESPONSE_IDS], rows[fields.RESPONSE_MASK]

        def job(engine, version: int):
            return engine.token_logp(ids, mask, response, response_mask, spec.temperature)

        self._scoring = ("score", epoch, batch_idx)
        self.owner.produce(self._scoring, step, job)

    def log_lag_and_mismatch(self, host, outputs, batch: dict) -> None:
        """``importance/lag_kl`` and ``importance/mismatch_kl`` of a stale batch, from the
        score :meth:`_score_with_newest_weights` asked for (one update per batch only: with
        more, the loss's log-probs are no longer this step's weights')."""
        if self._scoring is None or not fields.is_sampled(batch):
            return
        engine_logp, self._scoring = self.owner.take(self._scoring), None
        if (engine_logp is None or host.data_source.updates_per_batch != 1 or not isinstance(outputs, dict)
                or "target_logp" not in outputs):
            return
        mask = fields.loss_mask(batch)
        tokens = int(mask.sum())
        host.log("importance/lag_kl", mismatch_kl(engine_logp, batch[fields.BEHAVIOUR_LOGP], mask), batch_size=tokens)
        host.log("importance/mismatch_kl", mismatch_kl(outputs["target_logp"], engine_logp, mask), batch_size=tokens)

    def feed(self, trainer, host, batch_idx: int) -> None:
        """At batch ``batch_idx``'s start (sampled or not: a mixed source's off-policy batch
        too), hand the producer the batches up to ``max_lag`` ahead that it does not hold
        yet, to sample from the weights of this step."""
        lookahead = training_lookahead(trainer)
        epoch, step = trainer.current_epoch, host.progress["optimizer_steps"]
        source = self.owner.data_source
        for ahead in range(1, self.max_lag + 1):
            later = batch_idx + ahead
            if (self.owner.producer.holds((epoch, later))
                    or not mixed_batch_is_on_policy(source.probability, source.seed, epoch, later)):
                continue
            # the epoch ends first: the next epoch's first batch is sampled when it starts. Its
            # loader is never asked past its last batch: a stateful loader that ran into its end
            # is saved as a finished epoch, and a run resumed from that checkpoint would start the
            # next epoch's order one epoch on
            upcoming = lookahead.peek(ahead) if lookahead.length is None or later < lookahead.length else None
            if upcoming is None:
                break
            self._hand_over(trainer, host, epoch, later, upcoming[0], step)

    def _hand_over(self, trainer, host, epoch: int, batch_idx: int, prompts: dict, step: int) -> None:
        request = self.owner.request(trainer, host, epoch, batch_idx)
        prompts = {k: _to(v, host.device) for k, v in prompts.items()}

        def job(engine, version: int) -> dict:
            rows = self.owner.sample(engine, host, prompts, request)
            rows["version"] = version
            return rows

        self.owner.produce((epoch, batch_idx), step, job)

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The rows sampled ahead (waiting for the producer's running jobs) and the batches
        the loader gave early, on the CPU."""
        if self.owner.producer is None:
            return {}
        ahead = {key: {k: _to(v, "cpu") for k, v in rows.items()}
                 for key, rows in self.owner.producer.results().items() if key[0] != "score"}
        lookahead = training_lookahead(self._trainer) if ahead else None
        kept = list(lookahead.kept) if lookahead is not None else []
        return {"max_lag": self.max_lag, "ahead": ahead, "kept": kept} if ahead else {}

    def load_state_dict(self, state: dict) -> None:
        self.check_resumed_lag(state, self.max_lag)
        self._restored = state

    @staticmethod
    def check_resumed_lag(state: dict, max_lag: int) -> None:
        """A checkpoint that keeps batches sampled ahead resumes only at the lag that sampled
        them: the loader's saved place is after them."""
        if state.get("ahead") and state["max_lag"] != max_lag:
            raise ValueError(f"the checkpoint was sampled {state['max_lag']} batches ahead of the trainer and keeps "
                             f"those batches; resume it with data_source.sampling.max_lag={state['max_lag']}, not "
                             f"{max_lag}")


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check_same_prompts(rows: dict, batch: dict, batch_idx: int) -> None:
    """The rows were sampled from the prompts the loader gave early: the batch the fit loop
    hands the step must be the same (a hook that changes prompts after the loader would be
    ignored by the producer). On a CPU compared here; on an accelerator on the device,
    never read back on the hot path: a difference surfaces as a device-side assert with
    this message at the next sync."""
    given = batch[fields.PROMPT_IDS]
    sampled = rows["source_prompt_ids"]
    message = (f"sampling.max_lag: batch {batch_idx}'s prompts differ from those sampled ahead for it{{}}; a hook "
               f"between the loader and the step (on_before_batch_transfer, on_after_batch_transfer) must not change "
               f"prompts")
    if sampled.shape != given.shape:
        raise RuntimeError(message.format(f" (shapes {tuple(sampled.shape)} and {tuple(given.shape)})"))
    message = message.format("")
    if given.device.type == "cpu":
        if not torch.equal(sampled.cpu(), given):
            raise RuntimeError(message)
    else:
        torch._assert_async(torch.eq(sampled.to(given.device, non_blocking=True), given).all(), message)


def _check_restored_prompts(restored: dict) -> None:
    """A checkpoint's rows sampled ahead were sampled from its kept batches' prompts (this
    rank's own: :mod:`~lightning_unified.rollouts.ranks` checked the entry's rank). Compared
    whole, on the CPU, once per resume: a checkpoint whose rows and batches disagree would
    train on responses to other prompts."""
    kept = {item[1]: item[0] for item in restored["kept"]}  # the combined loader's (batch, batch_idx, dataloader_idx)
    for (epoch, batch_idx), rows in restored["ahead"].items():
        batch = kept.get(batch_idx)
        if batch is None:
            raise ValueError(f"the checkpoint keeps rows sampled ahead for batch {batch_idx} of epoch {epoch} but not "
                             f"that batch (it keeps batches {sorted(kept)}): it was not written by this package, or "
                             f"was edited")
        sampled, given = rows["source_prompt_ids"].cpu(), batch[fields.PROMPT_IDS].cpu()
        if sampled.shape != given.shape or not torch.equal(sampled, given):
            raise ValueError(f"the checkpoint's rows sampled ahead for batch {batch_idx} of epoch {epoch} were sampled "
                             f"from other prompts than the batch it keeps for it: it was not written by this package, "
                             f"or was edited")


def _logs_this_step(trainer) -> bool:
    """Lightning records this training step's metrics (every ``log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
