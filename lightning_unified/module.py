"""UnifiedModule: the policy forward, the weights from the batch's fields, the one loss.

SFT, distillation, RL and on-policy distillation are the same ``training_step``; what
differs is the batch the pipeline (:mod:`lightning_unified.pipeline`) hands it, and the
weight builder :mod:`lightning_unified.weighting` picks from its fields.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_unified import batch as fields
from lightning_unified.losses.aggregation import (
    AGGREGATIONS,
    LossCounts,
    all_reduce_sum,
    loss_counts,
    normaliser,
    token_terms,
)
from lightning_unified.callbacks.finite_guard import NonFiniteGuard
from lightning_unified.callbacks.rank_failure import RankFailureWatch
from lightning_unified.callbacks.reward import compute_rewards, decode_prompts
from lightning_unified.data.chat import stop_token_ids
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.engines.session import EngineSession
from lightning_unified.engines.session import close_all as close_all_engines
from lightning_unified.losses.weights import WeightSum
from lightning_unified.models.loading import (
    check_vocabulary,
    decoder,
    load_causal_lm,
    load_tokenizer,
    response_hidden,
)
from lightning_unified.models.lora import is_lora, merged_copy
from lightning_unified.models.loss_head import install_loss_head
from lightning_unified.pipeline import build_pipeline, check_method
from lightning_unified.schedule import build_scheduler
from lightning_unified.rewards.text import exact_match
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Preference, Reference, Reward, Sparse
from lightning_unified.weighting import builder_fields, select_weight_fn


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter does. Lightning registers this only
    for NCCL; a gloo group left to interpreter shutdown (ddp_spawn workers exit through
    sys.exit) can abort with "terminate called without an active exception"."""
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy_process_group)
    _EXIT_HOOK_REGISTERED = True


def _destroy_process_group() -> None:
    close_all_engines()  # an engine's own teardown needs the group
    if dist.is_initialized():
        dist.destroy_process_group()


_EXIT_HOOK_REGISTERED = False


class UnifiedModule(L.LightningModule):
    """One LightningModule for every (data_source, signal) pair.

    ``policy`` is a Hugging Face causal LM (a peft LoRA model too) or a local path to one;
    ``tokenizer`` a tokenizer or a path to one. ``optimizer`` is a partial taking the
    trainable parameters (default ``functools.partial(torch.optim.AdamW, lr=1e-3)``);
    ``scheduler`` a partial taking the optimizer, stepped every optimizer step (one that
    takes ``num_training_steps`` and leaves it unset gets the steps this fit will make).
    ``aggregation`` is the loss normaliser (:data:`lightning_unified.losses.aggregation.AGGREGATIONS`),
    counted over the whole optimizer step: every accumulated micro-batch on every rank.
    ``reference`` adds a KL penalty to a frozen reference. ``temperature`` divides the
    policy's logits in the loss; None follows the sampler's temperature. ``chunk_size`` is the
    loss's tokens per chunk (None: chosen for the device); ``compile_loss`` fuses each chunk's
    vocabulary math with ``torch.compile`` (:mod:`lightning_unified.losses.chunk_math`).
    ``max_new_tokens`` bounds greedy
    validation and, unless the sampling spec says otherwise, sampling; None takes the
    datamodule's ``max_new_tokens``. ``val_rewards`` ({name: fn}) score the greedy
    validation completions as ``val/<name>``; None takes the datamodule's ``val_rewards``,
    else exact match. ``samples_every_n_steps`` writes sampled completions to
    ``<log dir>/samples.jsonl`` (None: never). ``non_finite``: what a step with a NaN or
    infinite gradient does (:class:`~lightning_unified.callbacks.NonFiniteGuard`): ``skip``
    it (stopping after ``max_non_finite_steps`` in a row), ``stop``, or None (no check).
    """

    def __init__(
        self,
        policy: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | str,
        data_source: OffPolicy | OnPolicy,
        signal: Sparse | Dense | Preference,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        *,
        reference: Reference | None = None,
        aggregation: str = "token_mean",
        constant_normaliser: float | None = None,
        temperature: float | None = None,
        chunk_size: int | None = None,
        compile_loss: bool = False,
        max_new_tokens: int | None = None,
        val_rewards: dict[str, Callable] | None = None,
        samples_every_n_steps: int | None = 50,
        non_finite: str | None = "skip",
        max_non_finite_steps: int = 3,
    ):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.policy = load_causal_lm(policy) if isinstance(policy, str) else policy
        if not isinstance(self.policy, nn.Module):
            raise TypeError(f"policy must be a Hugging Face causal LM or a path to one, got {type(policy).__name__}")
        check_vocabulary(self.policy, self.tokenizer, "policy")
        self.policy.train()  # from_pretrained returns eval mode; Lightning toggles it from here on
        install_loss_head(self.policy)  # the loss runs inside the head's forward (FSDP2 needs that)
        # EOS and the chat template's end-of-turn token end a response
        self.stop_token_ids = stop_token_ids(self.tokenizer)
        check_method(data_source, signal, reference)
        self.data_source = data_source
        self.signal = signal
        self.reference = reference
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW, lr=1e-3)
        self.scheduler_factory = scheduler
        self.aggregation = aggregation
        self.constant_normaliser = constant_normaliser
        # the policy in the loss is the one the sampler drew from, unless set apart on purpose:
        # a loss at temperature 1 against samples at 0.7 starts every ratio away from 1
        if temperature is None:
            temperature = data_source.sampling.temperature if data_source.samples else 1.0
        if temperature <= 0:
            raise ValueError(f"module.temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.compile_loss = compile_loss
        self._max_new_tokens = max_new_tokens
        self._val_rewards = val_rewards
        self.samples_every_n_steps = samples_every_n_steps
        self.non_finite = non_finite
        self.max_non_finite_steps = max_non_finite_steps
        if non_finite is not None:
            NonFiniteGuard(non_finite, max_non_finite_steps)  # bad settings fail here, not at fit
        # where sampled responses and greedy validation answers are generated
        sampling = data_source.sampling if data_source.samples else None
        self.engine_session = EngineSession() if sampling is None else EngineSession(
            sampling.engine, sampling.vllm, sampling.sync_every, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, behaviour=sampling.behaviour)
        self.val_metrics = nn.ModuleDict()
        self._pipeline: list[L.Callback] | None = None
        # [surrogate, objective, tokens, sequences] summed over this optimizer step's
        # micro-batches on this rank; reset at the step
        self._step_sums: torch.Tensor | None = None
        # what a run has trained on so far, kept across a resume (see on_save_checkpoint)
        self.progress = {"tokens_seen": 0.0, "train_seconds": 0.0, "optimizer_steps": 0.0}
        self._step_started: float | None = None
        # several updates per rollout: which one is running, and the log-probs of this pass
        self._update_index = 0
        self._pass_logp: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        _destroy_process_group_at_exit()
        self._evaluate_without_inference_mode()
        if stage == "fit" and self.data_source.updates_per_batch > 1 and self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"data_source.updates_per_rollout x minibatches = {self.data_source.updates_per_batch} optimizer steps "
                f"per batch cannot be combined with trainer.accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches}: set it to 1 and make the batch larger instead"
            )
        for name in self.val_rewards:
            if name not in self.val_metrics:
                self.val_metrics[name] = MeanMetric()

    def _evaluate_without_inference_mode(self) -> None:
        """Under ModelParallelStrategy (FSDP2), validate under no_grad, not inference_mode:
        FSDP2's unshard inside ``generate`` writes to parameters, and "Inference tensors do
        not track version counter" stops the run (on NCCL; Lightning already uses no_grad
        on gloo, and for FSDP1)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        for loop in (self.trainer.validate_loop, self.trainer.fit_loop.epoch_loop.val_loop, self.trainer.test_loop,
                     self.trainer.predict_loop):
            loop.inference_mode = False

    # --- the pipeline -------------------------------------------------------------------
    def configure_callbacks(self) -> list[L.Callback]:
        """The pipeline, built once. Lightning asks again at every ``validate`` and ``fit``;
        callbacks it already holds are not handed over twice (that would replace them, and
        say so on the console at every call)."""
        if self._pipeline is None:
            self._pipeline = build_pipeline(self.data_source, self.signal, self.reference, self.samples_every_n_steps)
            if self.non_finite is not None:
                self._pipeline.append(NonFiniteGuard(self.non_finite, self.max_non_finite_steps))
            self._pipeline.append(RankFailureWatch())
        held = self._trainer.callbacks if self._trainer is not None else []
        return [c for c in self._pipeline if not any(c is h for h in held)]

    @property
    def max_new_tokens(self) -> int:
        if self._max_new_tokens is not None:
            return self._max_new_tokens
        value = getattr(self._datamodule(), "max_new_tokens", None)
        if value is None:
            raise ValueError("UnifiedModule needs max_new_tokens (the datamodule has no max_new_tokens)")
        return value

    @property
    def val_rewards(self) -> dict[str, Callable]:
        """{name: reward fn} scoring greedy validation completions: the module's, else the
        datamodule's, else exact match."""
        if self._val_rewards is not None:
            return dict(self._val_rewards)
        return dict(getattr(self._datamodule(), "val_rewards", None) or {"exact_match": exact_match})

    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    # --- training -----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                       who="training_step")
        full_batch = batch
        batch = self._update_batch(full_batch)
        # stages that must see the policy as it is at this very update (a sequence-level
        # ratio, a preference margin) refresh their fields here, once per optimizer step
        for stage in self._pipeline or ():
            hook = getattr(stage, "on_update_start", None)
            if hook is not None:
                hook(self.trainer, self, batch)
        mask = batch[fields.RESPONSE_MASK]
        # Each micro-batch contributes its SUM of per-token terms; on_before_optimizer_step
        # divides the gradient by the normaliser of the whole optimizer step (every
        # micro-batch, every rank), which is known only once the step's last micro-batch has
        # run. So any split into micro-batches and ranks gives the gradient of the whole batch.
        importance = self.data_source.importance if self.data_source.samples else None
        weight_fn = WeightSum(select_weight_fn(batch, self.signal, importance, self.reference))
        hidden = response_hidden(self.policy, batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK],
                                 batch[fields.RESPONSE_IDS], mask)
        out = self.policy.get_output_embeddings()(hidden, loss_inputs={
            "targets": batch[fields.RESPONSE_IDS],
            "token_scale": token_terms(mask, self.aggregation, constant=self.constant_normaliser),
            "weight_fn": weight_fn, "fields": builder_fields(batch), "teacher": batch.get(fields.TEACHER),
            "temperature": self.temperature, "chunk_size": self.chunk_size, "compile": self.compile_loss,
        })
        counts = loss_counts(mask)
        # [surrogate, objective, tokens, sequences] of this step so far, on this rank
        sums = torch.stack([out.loss.detach().double(), out.objective.double(),
                            out.loss.new_tensor(counts.tokens, dtype=torch.float64),
                            out.loss.new_tensor(counts.sequences, dtype=torch.float64)])
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums
        self.log("train/response_tokens", mask.sum().float(), batch_size=mask.shape[0])
        # Lightning divides the loss by accumulate_grad_batches; the step's normaliser replaces that
        return {"loss": out.loss * self.trainer.accumulate_grad_batches,
                "target_logp": self._rollout_logp(full_batch, out.target_logp.detach())}

    # --- several updates per sampled batch (data_source.updates_per_rollout, minibatches) --
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Each training batch makes ``data_source.updates_per_batch`` optimizer steps: the
        closure (training_step + backward) runs once per step, each time on the next
        mini-batch of the same rollout (see :meth:`_update_batch`). With one update this is
        Lightning's own optimizer_step. ``trainer.global_step`` and the learning-rate
        schedule count training batches (rollouts); ``train/optimizer_steps`` counts steps."""
        updates = self.data_source.updates_per_batch
        for update in range(updates):
            self._update_index = update
            optimizer.step(closure=optimizer_closure)
        self._update_index = 0
        self.progress["optimizer_steps"] += updates
        if updates > 1:
            self.log("train/optimizer_steps", self.progress["optimizer_steps"], batch_size=1)

    def _update_batch(self, batch: dict) -> dict:
        """The rows this update trains on: the whole batch, or for several updates per
        rollout mini-batch ``update % minibatches`` of it: contiguous whole groups (a
        prompt's samples, a preference pair), in order."""
        if self.data_source.updates_per_batch == 1:
            return batch
        start, stop = self._update_rows(batch)
        return fields.select_rows(batch, start, stop)

    def _update_rows(self, batch: dict) -> tuple[int, int]:
        minibatches = self.data_source.minibatches
        group = batch.get(fields.GROUP_SIZE, 1)
        groups = batch[fields.RESPONSE_IDS].shape[0] // group
        if groups < minibatches:
            raise ValueError(f"data_source.minibatches={minibatches} splits a batch by prompt, but this batch has "
                             f"{groups} prompts; use fewer mini-batches or more prompts per batch")
        part = self._update_index % minibatches
        return group * (groups * part // minibatches), group * (groups * (part + 1) // minibatches)

    def _rollout_logp(self, batch: dict, logp: torch.Tensor) -> torch.Tensor:
        """[B, R] the loss's log-probs of every row of the batch: this update's rows written
        into a buffer, so the batch's last update hands callbacks the whole final pass."""
        if self.data_source.updates_per_batch == 1:
            return logp
        if self._update_index == 0 or self._pass_logp is None or self._pass_logp.shape != batch[fields.RESPONSE_IDS].shape:
            self._pass_logp = torch.zeros(batch[fields.RESPONSE_IDS].shape, dtype=logp.dtype, device=logp.device)
        start, stop = self._update_rows(batch)
        self._pass_logp[start:stop] = logp
        return self._pass_logp

    def on_before_optimizer_step(self, optimizer) -> None:
        """Divide the summed gradient by the whole step's normaliser, and log the step's
        loss and objective with the same normaliser (one all-reduce per step). DDP and FSDP
        average gradients over ranks, so the factor carries the world size; gradient
        clipping runs after this hook, on the normalised gradient."""
        if self._step_sums is None:
            return
        total = all_reduce_sum(self._step_sums)
        self._step_sums = None
        norm = normaliser(self.aggregation, LossCounts(tokens=float(total[2]), sequences=float(total[3])))
        factor = self.trainer.world_size / norm
        # one multi-tensor kernel for all gradients, not a launch per parameter
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        self.log("train/loss", (total[0] / norm).float(), prog_bar=True, batch_size=1)
        self.log("train/objective", (total[1] / norm).float(), batch_size=1)
        # throughput: every rank's response tokens over the step's wall time, from the end of
        # the previous step (or of a validation), so loading, sampling and scoring count
        now = time.perf_counter()
        seconds = now - self._step_started if self._step_started is not None else 0.0
        self._step_started = now
        self.progress["tokens_seen"] += float(total[2])
        self.progress["train_seconds"] += seconds
        if seconds > 0:
            self.log("train/tokens_per_sec", float(total[2]) / seconds, prog_bar=True, batch_size=1)
        self.log("train/tokens_seen", self.progress["tokens_seen"], batch_size=1)
        self.log("train/train_seconds", self.progress["train_seconds"], batch_size=1)

    # --- generation: the rollout engine, holding the policy's current weights ----------
    def rollout_engine(self):
        """The engine that samples responses and answers validation prompts (``hf``: the
        policy's own ``generate``; ``vllm``: an engine synced with the policy's weights every
        ``sampling.sync_every`` optimizer steps)."""
        return self.engine_session.ready(self.policy, self.progress["optimizer_steps"])

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        request = GenerationRequest(
            max_new_tokens=self.max_new_tokens, stop_token_ids=tuple(self.stop_token_ids),
            pad_token_id=self.tokenizer.pad_token_id, greedy=True,
            synced=self.trainer.world_size > 1 if self._trainer is not None else False,
        )
        rollout = self.rollout_engine().generate(self.policy, prompt_ids, prompt_mask, request)
        return self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)

    def on_fit_start(self) -> None:
        # a trainer.validate() before fit leaves the metrics' state as inference tensors,
        # which fit's no-grad validation cannot update in place; reset makes fresh ones
        for metric in self.val_metrics.values():
            metric.reset()

    def on_train_start(self) -> None:
        self._step_started = time.perf_counter()

    def on_validation_end(self) -> None:
        if self._step_started is not None:  # validation time is not training time
            self._step_started = time.perf_counter()

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        fields.require(batch, fields.PROMPT_IDS, fields.PROMPT_MASK, who="validation_step")
        completions = self.generate_greedy(batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK])
        references = batch.get(fields.REFERENCES, [None] * len(completions))
        prompts = decode_prompts(self.tokenizer, batch)
        scores = {}
        for name, fn in self.val_rewards.items():
            value, _ = compute_rewards([Reward(fn)], completions=completions, references=references, prompts=prompts,
                                       completion_ids=None, completion_mask=None)
            scores[name] = value
            self.val_metrics[name].update(value.to(self.device))
            self.log(f"val/{name}", self.val_metrics[name], prog_bar=True, batch_size=value.numel())
        return {"completions": completions, "prompts": prompts, "scores": scores}

    # --- checkpoints: LoRA keeps only its adapters; progress survives a resume ----------
    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed into this module: the method (the
        data_source and signal kinds) and the trainable parameters' names and shapes."""
        return {
            "method": f"data_source={type(self.data_source).__name__}, signal={type(self.signal).__name__}",
            "parameters": [[name, list(p.shape)] for name, p in self.policy.named_parameters() if p.requires_grad],
        }

    def _check_fingerprint(self, saved: dict | None) -> None:
        """A checkpoint from another model or another method is refused, not half-loaded."""
        if not saved:
            return
        mine = self.fingerprint()
        if saved["method"] != mine["method"]:
            raise ValueError(f"the checkpoint was written by a run with {saved['method']}; this run has "
                             f"{mine['method']}: resume it with the method it was trained with")
        theirs, ours = dict((n, s) for n, s in saved["parameters"]), dict((n, s) for n, s in mine["parameters"])
        if theirs != ours:
            missing = sorted(set(ours) - set(theirs))
            extra = sorted(set(theirs) - set(ours))
            reshaped = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
            detail = (f"{reshaped[0]} is {theirs[reshaped[0]]} there and {ours[reshaped[0]]} here" if reshaped else
                      f"{missing[0]} is not in it" if missing else f"it has {extra[0]}, which this policy lacks")
            raise ValueError(f"the checkpoint holds another model's trainable parameters ({detail}); resume "
                             f"with the model.path / model.lora it was trained with")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lightning_unified"] = {"progress": dict(self.progress), "fingerprint": self.fingerprint()}
        if is_lora(self.policy):
            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in trainable or not k.startswith("policy.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("lightning_unified", {})
        self._check_fingerprint(saved.get("fingerprint"))
        self.progress.update(saved.get("progress", {}))
        if is_lora(self.policy):
            self.strict_loading = False  # the frozen base weights come from model.path, not the checkpoint

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        # with LoRA only the adapters train; frozen parameters never reach the optimizer
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        # its length is what this run will make, unless the config sets one
        scheduler = build_scheduler(self.scheduler_factory, optimizer, self.trainer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Under ModelParallelStrategy (FSDP2), shard each decoder layer, the embeddings and
        the loss head as their own units (embeddings and head as one unit when they share
        their weight); other strategies leave the model alone."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or self.policy_is_sharded():
            return
        from torch.distributed.fsdp import fully_shard

        mesh = mesh["data_parallel"]
        # the blocks Hugging Face never splits across devices (decoder layers) are the units
        blocks = set(getattr(self.policy, "_no_split_modules", None) or [])
        body = decoder(self.policy)
        for module in body.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh)
        head = self.policy.get_output_embeddings()
        if head.weight is self.policy.get_input_embeddings().weight:
            # tied embeddings (SmolLM2, Gemma): one parameter, so one unit for both modules
            fully_shard([body, head], mesh=mesh)
        else:
            fully_shard(body, mesh=mesh)
            fully_shard(head, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)

    def policy_is_sharded(self) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.policy.parameters())

    def save_pretrained(self, directory: str, merged_directory: str | None = None) -> None:
        """The policy and tokenizer as a Hugging Face directory (``from_pretrained`` loads it;
        with LoRA it holds the adapter, which peft loads onto the base model), plus, with
        LoRA and ``merged_directory``, a plain model with the adapters merged in.
        Call it on every rank: a sharded policy is gathered first (a collective), then
        rank 0 writes."""
        state_dict = None
        if self.policy_is_sharded():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state_dict = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
        if self._trainer is None or self.trainer.is_global_zero:
            self.policy.save_pretrained(directory, state_dict=state_dict)
            self.tokenizer.save_pretrained(directory)
            if merged_directory is not None and is_lora(self.policy):
                merged_copy(self.policy).save_pretrained(merged_directory)
                self.tokenizer.save_pretrained(merged_directory)
