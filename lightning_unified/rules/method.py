"""The rules of a method: what a data source, a signal and a reference ask of each other,
and of the trainer that runs them. ``method`` rules are handed a
:class:`~lightning_unified.specs.Method`; ``trainer`` rules the Trainer and the module."""

from __future__ import annotations

from lightning_unified.registry import ADVANTAGES
from lightning_unified.rules import rule


def _sampled(method) -> bool:
    return method.data_source.samples


def _episodes(method) -> bool:
    return _sampled(method) and method.data_source.environment.enabled


def _environment_name(method) -> str:
    cls = method.data_source.environment.cls
    return getattr(cls, "__qualname__", repr(cls))


@rule("off-policy-samples-nothing", "config", "data_source", "data_source.sampling")
def off_policy_samples_nothing(values) -> str | None:
    """Off-policy data is never sampled, so sampling settings have nothing to act on."""
    source = values.get("data_source")
    if hasattr(source, "get") and str(source.get("_target_", "")).endswith("OffPolicy") and "sampling" in source:
        return ("data_source=off_policy trains on the dataset's responses and samples nothing, so "
                "data_source.sampling (max_lag among them) has nothing to act on: use data_source=on_policy or "
                "data_source=mixed")
    return None


@rule("k1-is-in-the-reward", "method", "reference.estimator", "data_source", "signal")
def k1_is_in_the_reward(method) -> str | None:
    """k1 is subtracted from sampled responses' rewards: RL only."""
    reference = method.reference
    if reference is not None and reference.estimator == "k1" and not (_sampled(method) and method.signal.kind == "sparse"):
        return ("reference.estimator=k1 puts the KL penalty in the reward of sampled responses; it needs "
                "data_source=on_policy with signal=sparse (use k3 elsewhere)")
    return None


@rule("cache-scores-the-data", "method", "signal.cache", "data_source")
def cache_scores_the_data(method) -> str | None:
    """A cache scored the dataset's responses; sampled ones need a live teacher."""
    if method.signal.kind == "dense" and method.signal.cached and _sampled(method):
        return ("signal.cache holds the teacher's scores of the dataset's responses; sampled responses need a live "
                "teacher (drop signal.cache, or use data_source=off_policy)")
    return None


@rule("episodes-without-pairs", "method", "data_source.environment.cls", "signal")
def episodes_without_pairs(method) -> str | None:
    """Online DPO's pairs of multi-turn episodes are not built."""
    if _episodes(method) and method.signal.kind == "preference":
        return (f"data_source.environment ({_environment_name(method)}) with signal=preference: online DPO's pairs of "
                f"multi-turn episodes are not built; use signal=sparse (RL) or signal=dense (on-policy distillation)")
    return None


@rule("episodes-rewarded-by-the-environment", "method", "data_source.environment.cls", "signal.rewards")
def episodes_rewarded_by_the_environment(method) -> str | None:
    """An environment gives each episode its reward: reward functions would score it twice."""
    if _episodes(method) and method.signal.kind == "sparse" and method.signal.rewards:
        return (f"data_source.environment ({_environment_name(method)}) gives each episode its reward (the sum of its "
                f"steps' rewards); signal.rewards would score the episodes again. Set signal.rewards=[] and reward in "
                f"the environment's step")
    return None


@rule("episodes-without-k1", "method", "data_source.environment.cls", "reference.estimator")
def episodes_without_k1(method) -> str | None:
    """The k1 penalty in an episode's reward is not built."""
    if _episodes(method) and method.reference is not None and method.reference.estimator == "k1":
        return ("reference.estimator=k1 with data_source.environment: the k1 penalty in an episode's reward is not "
                "built; use reference=k3 (a loss term on the policy's tokens)")
    return None


@rule("sampling-needs-rewards", "method", "data_source", "signal.rewards")
def sampling_needs_rewards(method) -> str | None:
    """RL and online DPO on sampled responses need rewards to tell them apart."""
    signal = method.signal
    if not _sampled(method) or _episodes(method) or signal.kind not in ("sparse", "preference") or signal.rewards:
        return None
    what = ("RL, which needs rewards: without them every sampled token would be pushed up" if signal.kind == "sparse"
            else "online DPO, which needs rewards to pick each prompt's chosen and rejected samples")
    return (f"signal={signal.kind} on sampled responses (data_source=on_policy) is {what}. Set signal.rewards, e.g. "
            f"signal.rewards='[{{_target_: lightning_unified.specs.Reward, fn: {{_target_: "
            f"lightning_unified.rewards.numeric_answer, _partial_: true}}}}]' (built-in rewards: "
            f"lightning_unified.rewards); the built-in addition task's rewards apply only with task=addition")


@rule("vllm-self-teacher-needs-vllm-sampling", "method", "signal.teacher", "teacher.engine",
      "data_source.sampling.engine")
def vllm_self_teacher_needs_vllm_sampling(method) -> str | None:
    """A self-teacher scored by vLLM is scored by the run's own vLLM rollout engine (in process or served)."""
    signal = method.signal
    if (signal.kind == "dense" and signal.is_self and signal.teacher.served
            and not (_sampled(method) and method.data_source.sampling.engine in ("vllm", "server"))):
        return ("signal.teacher=self with teacher.engine=vllm is scored by the run's own vLLM rollout engine: it "
                "needs data_source=on_policy (or mixed) with data_source.sampling.engine=vllm (or server)")
    return None


@rule("grouped-advantage-needs-a-group", "method", "signal.advantage", "data_source.sampling.num_generations")
def grouped_advantage_needs_a_group(method) -> str | None:
    """An advantage that compares a prompt's samples needs two or more of them."""
    signal = method.signal
    if (_sampled(method) and method.data_source.sampling.num_generations < 2 and signal.kind == "sparse"
            and ADVANTAGES[signal.advantage].grouped):
        return (f"signal.advantage={signal.advantage!r} compares each sample with the others of its prompt, but "
                f"data_source.sampling.num_generations=1: set it to 2 or more, or use signal.advantage=reinforce")
    return None


@rule("online-dpo-needs-a-pair", "method", "signal", "data_source.sampling.num_generations")
def online_dpo_needs_a_pair(method) -> str | None:
    """Online DPO picks a chosen and a rejected sample of each prompt."""
    if _sampled(method) and method.data_source.sampling.num_generations < 2 and method.signal.kind == "preference":
        return ("online DPO picks a chosen and a rejected sample of each prompt (signal=preference on sampled "
                "responses): set data_source.sampling.num_generations to 2 or more")
    return None


@rule("replay-needs-a-ratio", "method", "data_source.updates_per_rollout", "data_source.minibatches",
      "data_source.importance.ratio")
def replay_needs_a_ratio(method) -> str | None:
    """Replayed samples come from an older policy: the policy gradient needs the ratio."""
    source = method.data_source
    if source.updates_per_batch > 1 and method.signal.kind == "sparse" and source.importance.ratio == "none":
        return (f"data_source.updates_per_rollout={source.updates_per_rollout} with minibatches={source.minibatches} "
                f"replays samples after the policy has moved; importance.ratio=none ignores that. Use token, "
                f"truncated, ppo_clip or sequence_clip")
    return None


@rule("lag-uncorrected", "method", "data_source.sampling.max_lag", "data_source.importance.ratio",
      severity="warning")
def lag_uncorrected(method) -> str | None:
    """A lag without an importance ratio trains a biased gradient (an ablation)."""
    lag = method.data_source.sampling.max_lag if _sampled(method) else 0
    if lag and method.signal.kind == "sparse" and method.data_source.importance.ratio == "none":
        return (f"data_source.sampling.max_lag={lag} trains on responses sampled {lag} steps ago and "
                f"importance.ratio=none does not correct for it: the gradient is biased (an ablation; use truncated, "
                f"the default, token, ppo_clip, sequence_clip or decoupled_ppo_clip)")
    return None


@rule("lag-needs-a-distribution-teacher", "method", "data_source.sampling.max_lag", "signal.divergence")
def lag_needs_a_distribution_teacher(method) -> str | None:
    """A teacher read only at the sampled token needs tokens of the policy being trained."""
    lag = method.data_source.sampling.max_lag if _sampled(method) else 0
    signal = method.signal
    if lag and signal.kind == "dense" and signal.teacher_gives in ("token_logp", "spans"):
        return (f"data_source.sampling.max_lag={lag} with signal.divergence={signal.divergence!r}: that divergence "
                f"reads the teacher only at the sampled token, an estimate that needs tokens sampled from the policy "
                f"being trained, and nothing corrects it for a lag yet. Use a divergence over the teacher's "
                f"distribution or top-k (reverse_kl, forward_kl, jsd), or max_lag=0")
    return None


@rule("served-reference-at-temperature-1", "method", "reference.engine", "module.temperature",
      "data_source.sampling.temperature")
def served_reference_at_temperature_1(method) -> str | None:
    """A served reference reports log-probs at temperature 1, the loss's must be too."""
    reference = method.reference
    if reference is not None and reference.served and method.temperature != 1.0:
        return (f"reference.engine={reference.engine} returns the reference's log-probs at temperature 1, but the "
                f"loss's log-probs are at temperature {method.temperature} (module.temperature, or "
                f"data_source.sampling.temperature when that is null): sample at temperature 1, set "
                f"module.temperature=1, or use reference.engine=hf")
    return None


@rule("replay-without-accumulation", "trainer", "data_source.updates_per_rollout", "data_source.minibatches",
      "trainer.accumulate_grad_batches")
def replay_without_accumulation(trainer, host) -> str | None:
    """Replaying a rollout and accumulating micro-batches both split the optimizer step."""
    updates = host.data_source.updates_per_batch
    if updates > 1 and trainer.accumulate_grad_batches != 1:
        return (f"data_source.updates_per_rollout x minibatches = {updates} optimizer steps per batch cannot be "
                f"combined with trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: set it to 1 and "
                f"make the batch larger instead")
    return None


@rule("self-teacher-copy-unsharded", "trainer", "signal.self_teacher", "trainer.strategy")
def self_teacher_copy_unsharded(trainer, host) -> str | None:
    """A self-teacher with weights of its own keeps a copy of the policy's, not built for FSDP2's shards."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    signal = host.signal
    if (signal.kind == "dense" and signal.is_self and signal.teacher.weights != "live"
            and isinstance(trainer.strategy, ModelParallelStrategy)):
        return (f"signal.self_teacher={signal.teacher.weights} keeps a copy of the policy's weights, which is not "
                f"built for a sharded (FSDP2) policy yet, and trainer.strategy is FSDP2's ModelParallelStrategy; use "
                f"trainer=ddp, or signal.self_teacher=live")
    return None


@rule("reward-model-trains-on-pairs", "method", "signal", "data_source", "reference")
def reward_model_trains_on_pairs(method) -> str | None:
    """A reward model learns from the data's pairs; it samples nothing and has no policy to hold near a reference."""
    if method.signal.kind != "reward_model":
        return None
    if _sampled(method):
        return ("signal=reward_model trains a scalar head on the data's preference pairs and samples nothing: use "
                "data_source=off_policy (the data's chosen and rejected columns; the built-in task: task.pairs=true)")
    if method.reference is not None:
        return ("signal=reward_model trains a scalar head, not a policy: a reference's KL penalty (reference=...) has "
                "nothing to act on; drop it (reference=null) with data_source=off_policy")
    return None


@rule("reward-model-validates-pairs", "trainer", "signal", "validation.num_samples")
def reward_model_validates_pairs(trainer, host) -> str | None:
    """A reward model is validated on its held-out pairs; it writes no answers to sample."""
    validation = getattr(host, "validation", None)
    if host.signal.kind == "reward_model" and validation is not None and validation.num_samples is not None:
        return (f"signal=reward_model is validated by its held-out pairs' accuracy and margin; it writes no answers, "
                f"so validation.num_samples={validation.num_samples} has nothing to sample: set it to null")
    return None


@rule("reward-model-unsharded", "trainer", "signal", "trainer.strategy")
def reward_model_unsharded(trainer, host) -> str | None:
    """The reward model's scalar head and its save are not built for FSDP2's shards."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if host.signal.kind == "reward_model" and isinstance(trainer.strategy, ModelParallelStrategy):
        return ("signal=reward_model's scalar head and its AutoModelForSequenceClassification save are not built for "
                "a sharded (FSDP2) decoder yet, and trainer.strategy is FSDP2's ModelParallelStrategy; use trainer=ddp "
                "(or one process), with LoRA for a large model")
    return None
