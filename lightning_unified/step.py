"""One training step of every method, top to bottom: the file to open first.

=====  ==============  ================================================================  =========================
step   what            how                                                               Lightning hook
=====  ==============  ================================================================  =========================
1      sample          responses from the rollout engine, with behaviour log-probs       on_train_batch_start
2      reference       log pi_ref of each response token (KL penalty, DPO's margin)      on_train_batch_start
3      teacher         the teacher's distribution, top-k or token log-probs              on_train_batch_start
4      rewards         reward functions (or the environment's rewards)                   on_train_batch_start
5      advantages      rewards to advantages (group baselines, the k1 penalty)           on_train_batch_start
6      preference      a pair's chosen and rejected rows                                 on_train_batch_start
7      importance      proximal log-probs (decoupled PPO)                                on_train_batch_start
8      updates         for each epoch, for each mini-batch: one optimizer step           optimizer_step
9      loss            the per-update fields (a sequence ratio, a pair's weights, the    training_step
                       spans' weights), the weight builders those fields call for, the
                       policy's forward, the one loss
10     normalise       the whole step's normaliser, the step's logs                      on_before_optimizer_step
11     after           diagnostics, state that follows the policy (each stage's          on_train_batch_end
                       ``after_batch``, the rollout owner's lag diagnostics)             (a callback's, and the module's)
=====  ==============  ================================================================  =========================

Steps 1-7 are the method's stages (:mod:`lightning_unified.stages`), the ones its data
source and signal need, in this order (:func:`lightning_unified.pipeline.method_stages`);
each adds named fields to the batch (:mod:`lightning_unified.batch`), and a user's own stage
joins them by name. Steps 9 and 10 run inside each optimizer step of step 8. Step 9 is the
one place where gradients flow: whatever the method, its loss is
``-sum stopgrad(w) * log pi_theta / normaliser``, and only the weight builders
(:mod:`lightning_unified.builder_choice`) differ. RL reads: sample, reference, rewards,
advantages, importance, then the updates; SFT: no stage (rewards and advantages when its data
is rewarded), one update; on-policy distillation: sample, teacher, importance.

:class:`~lightning_unified.module.UnifiedModule` calls steps 1-10 below from the hooks the
table names; step 11 runs in :class:`~lightning_unified.callbacks.stage_hooks.StagesAfterBatch`
(before a checkpoint is written) and the module's ``on_train_batch_end``. They read the
module only through what it holds (``host``).
"""

from __future__ import annotations

import torch

from lightning_unified import batch as fields
from lightning_unified.builder_choice import weight_builders_for
from lightning_unified.lightning_private import writes_logs_now
from lightning_unified.losses.aggregation import all_reduce_sum, count_tensor, normaliser, normaliser_tensor, token_terms
from lightning_unified.metrics import grad_square_sum, record_lengths, record_policy_tokens
from lightning_unified.models.forward import response_hidden
from lightning_unified.progress import log_step


def prepare_batch(host, batch: dict, batch_idx: int) -> None:
    """Steps 1-7: the method's stages, in their order, add their fields to the batch; then,
    on a step that writes logs, the batch's response lengths (sampled or the data's)."""
    host.pipeline.run(host.trainer, host, batch, batch_idx)
    if writes_logs_now(host.trainer) and fields.RESPONSE_IDS in batch:
        record_lengths(host.step_metrics, batch, host.stop_token_ids)


def make_updates(host, optimizer, closure) -> None:
    """Step 8: the batch's optimizer steps, each on its mini-batch of the rollout (PPO's
    epochs x mini-batches; one update per batch: Lightning's own step). Lightning's
    ``closure`` runs step 9 on the rows :meth:`RolloutUpdates.select` gives for the running
    update, then the backward and step 10. ``trainer.global_step`` and the schedule count
    batches, ``train/optimizer_steps`` counts these."""
    updates = host.updates
    try:
        for update in range(updates.count):
            updates.update = update  # the mini-batch this optimizer step trains on
            optimizer.step(closure=closure)
    finally:
        updates.update = 0
    host.progress["optimizer_steps"] += updates.count
    if updates.count > 1:
        host.log("train/optimizer_steps", host.progress["optimizer_steps"], batch_size=1)


def update_loss(host, batch: dict) -> dict:
    """Step 9: one update's loss, on the rows it trains on.

    Each micro-batch contributes its SUM of per-token terms over the whole step's normaliser
    (every micro-batch, every rank): any split gives the whole batch's gradient. With one
    micro-batch a step the normaliser scales the loss here; with several it is known after
    the last, and step 10 applies it."""
    rows = host.updates.select(batch)
    if host.objective is not None:
        # a loss on a head of its own instead of w x grad log pi (a reward model's pairs):
        # summed per micro-batch and normalised over the step as the one loss is
        terms = host.objective.terms(host, rows)
        host.step_sums.add(terms.loss, terms.objective, terms.mask, group_size=terms.group_size, counts=terms.counts)
        return {"loss": scaled_for_step(host, terms.loss, terms.counts)}
    # fields that must see the policy as it is at this very update (a sequence-level
    # ratio, a preference margin, the spans' weights), once per optimizer step
    host.pipeline.on_update(host.trainer, host, rows)
    # the weights this update's fields call for, and the fields those builders need
    importance = host.data_source.importance if host.data_source.samples else None
    builders = weight_builders_for(rows, host.signal, importance, host.reference)
    fields.require_each(rows, builders.needs)  # a stage missing is named, before any forward
    mask = fields.loss_mask(rows)  # the tokens in the loss; every forward attends to the response mask's
    trainer = host.trainer
    # the entropy, read from the loss's own log-probs, on the steps that write logs
    entropy = host.detailed_metrics and writes_logs_now(trainer)
    hidden = response_hidden(host.policy, rows[fields.PROMPT_IDS], rows[fields.PROMPT_MASK], rows[fields.RESPONSE_IDS],
                             rows[fields.RESPONSE_MASK], host.packing)
    out = host.policy.get_output_embeddings()(hidden, loss_inputs={
        "targets": rows[fields.RESPONSE_IDS], "weight_fn": builders.weight_fn, "fields": fields.per_token_fields(rows),
        "token_scale": token_terms(mask, host.aggregation, constant=host.constant_normaliser),
        "teacher": rows.get(fields.TEACHER), "temperature": host.temperature, "chunk_size": host.chunk_size,
        "compile": host.compile_loss, "entropy": entropy,
    })
    if entropy:
        host.step_metrics.add("entropy", out.token_entropy.sum())
    if host.flops_model is not None:  # MFU covers every step since the last write
        record_policy_tokens(host.step_metrics, rows[fields.PROMPT_MASK], rows[fields.RESPONSE_MASK])
    # the loss's log-probs of every row, for the diagnostics after the batch's last update
    target_logp = host.updates.rollout_logp(batch, out.target_logp.detach())
    group_size = rows.get(fields.GROUP_SIZE, 1)
    counts = count_tensor(mask, group_size, rows.get(fields.FAILED))
    host.step_sums.add(out.loss, out.objective, mask, rows.get(fields.TEACHER_INDEX), out.token_objective,
                       group_size=group_size, counts=counts)
    return {"loss": scaled_for_step(host, out.loss, counts), "target_logp": target_logp}


def scaled_for_step(host, loss: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A micro-batch's summed ``loss`` as its share of the optimizer step's mean."""
    trainer = host.trainer
    if trainer.accumulate_grad_batches == 1:
        # on the device, never read here; the factor reaches every gradient through the
        # backward pass the loss makes anyway, not through a pass over them afterwards.
        # DDP and FSDP average gradients over ranks, so it carries the world size
        norm = normaliser_tensor(host.aggregation, all_reduce_sum(counts), count_empty=host.count_empty)
        return loss * (trainer.world_size / norm).to(loss.dtype)
    # Lightning divides the loss by accumulate_grad_batches; the step's normaliser replaces that
    return loss * trainer.accumulate_grad_batches


def normalise_update(host) -> None:
    """Step 10, before the optimizer steps: with several micro-batches a step, divide the
    summed gradient by the whole step's normaliser (with one, the loss carried it); log the
    step's loss and objective with the same normaliser (one all-reduce of the step's sums,
    besides the counts' all-reduce step 9 makes with one micro-batch). DDP and FSDP average
    gradients over ranks, so the factor carries the world size; gradient clipping runs
    after this, on the normalised gradient (the gradient norm logged is the normalised gradient's, before clipping).
    The step's diagnostics (:mod:`lightning_unified.metrics`) join that one read."""
    trainer = host.trainer
    write = writes_logs_now(trainer)
    if write and host.detailed_metrics:
        square = grad_square_sum(host.trained_modules().parameters(), trainer.world_size)
        if square is not None:  # a step the non-finite guard skipped has none
            host.step_metrics.add("grad_square", square)
    total = host.step_sums.total(host.step_metrics)  # the step's one read back to the host
    if total is None:
        return
    norm = normaliser(host.aggregation, total.counts, count_empty=host.count_empty)
    grad_scale = 1.0  # what the gradients are multiplied by after the read
    if trainer.accumulate_grad_batches != 1:
        # one multi-tensor kernel for all gradients, not a launch per parameter
        grads = [p.grad for p in host.trained_modules().parameters() if p.grad is not None]
        grad_scale = trainer.world_size / norm
        if grads:
            torch._foreach_mul_(grads, grad_scale)
    log_step(host, total, norm, write, grad_scale)
