"""The ``hf`` rollout engine samples from the run's settings alone, whatever the checkpoint's
``generation_config`` says, and its copy of the weights at a lag is built without a second
initialisation and scores a stale batch without [B, R, V] logits."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_unified import batch as fields
from lightning_unified.engines.hf import HFEngine
from lightning_unified.models.loading import build_policy
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
from lightning_unified.validation import greedy_answers
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule
from tests.test_async_rollouts import RecordRows

# what a checkpoint's generation_config may say that changes the distribution generate
# draws from: penalties and bans applied to the scores even when greedy, warpers, and
# settings with no neutral value but unset (suppress_tokens), which generate fills from
# the model's own config whatever config it is given
CHECKPOINT_GENERATION = dict(repetition_penalty=1.5, no_repeat_ngram_size=1, do_sample=True, temperature=0.5,
                             top_k=3)


def checkpoint_with_generation_config(directory: Path) -> str:
    """A tiny Llama saved with save_pretrained, its generation_config saying
    :data:`CHECKPOINT_GENERATION` and suppressing one digit."""
    data = tiny_datamodule()
    model = build_policy(data.tokenizer, config=TINY, seed=0)
    model.generation_config.update(**CHECKPOINT_GENERATION,
                                   suppress_tokens=[data.tokenizer.convert_tokens_to_ids("7")])
    model.save_pretrained(directory)
    data.tokenizer.save_pretrained(directory)
    return str(directory)


def module_from(path: str, source: OnPolicy, stages=()) -> UnifiedModule:
    return UnifiedModule(path, tiny_datamodule().tokenizer, source, Sparse(rewards=[Reward(digit_match)]),
                         stages=list(stages), max_new_tokens=8)


def test_behaviour_logp_are_the_trainers_whatever_the_checkpoint_says(tmp_path: Path, caplog) -> None:
    """At lag 0 the engine generates with the training model, loaded with its checkpoint's
    generation_config: the log-probs it records are still those a full forward of the same
    weights gives the sampled tokens at the run's temperature (to 1e-5 in float32), and the
    run says once which checkpoint settings it ignored."""
    path = checkpoint_with_generation_config(tmp_path / "model")
    record = RecordRows()
    source = OnPolicy(sampling=Sampling(num_generations=4, max_new_tokens=8, temperature=0.8))
    module = module_from(path, source, [record])
    assert module.policy.generation_config.repetition_penalty == 1.5, "the checkpoint's config is loaded"
    start = copy.deepcopy(module.policy)
    L.seed_everything(0, verbose=False)
    with caplog.at_level(logging.WARNING, logger="lightning_unified.engines.plain_generation"):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=tiny_datamodule())
    rows = record.batches[0]
    mask = rows[fields.RESPONSE_MASK].bool()
    expected = response_logprobs(start, rows[fields.PROMPT_IDS], rows[fields.PROMPT_MASK], rows[fields.RESPONSE_IDS],
                                 rows[fields.RESPONSE_MASK], temperature=0.8)
    torch.testing.assert_close(rows[fields.BEHAVIOUR_LOGP][mask], expected[mask], rtol=0, atol=1e-5)
    said = [r.getMessage() for r in caplog.records if "generation_config" in r.getMessage()]
    assert len(said) == 1, said  # two batches sampled, one line
    for setting in ("repetition_penalty=1.5", "no_repeat_ngram_size=1", "suppress_tokens=", "top_k=3",
                    "temperature=0.5", "data_source.sampling"):
        assert setting in said[0]


def plain_argmax(policy, prompt_ids, prompt_mask, max_new_tokens: int, stops: list[int]) -> list[list[int]]:
    """Each row's greedy answer by full forwards of the unpadded prompt, one token at a time."""
    answers = []
    with torch.no_grad():
        for ids, mask in zip(prompt_ids, prompt_mask):
            sequence, answer = ids[mask.bool()].tolist(), []
            for _ in range(max_new_tokens):
                token = int(policy(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
                sequence.append(token)
                answer.append(token)
                if token in stops:
                    break
            answers.append(answer)
    return answers


def test_greedy_validation_is_the_plain_models_argmax(tmp_path: Path) -> None:
    """Validation's greedy answers are the argmax of the model's own distribution at every
    step, not of the scores after the checkpoint's repetition penalty and bans."""
    module = module_from(checkpoint_with_generation_config(tmp_path / "model"),
                         OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=8)))
    batch = next(iter(tiny_datamodule(batch_size=8).val_dataloader()))
    ids, mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
    answers = greedy_answers(module, ids, mask)
    module.policy.eval()
    expected = plain_argmax(module.policy, ids, mask, 8, module.stop_token_ids)
    assert answers == module.tokenizer.batch_decode(expected, skip_special_tokens=True)


# --- the copy sampling at a lag ---------------------------------------------------------

RANDOM_FILLS = {"normal_", "uniform_", "random_", "bernoulli_", "exponential_", "log_normal_", "cauchy_",
                "geometric_", "trunc_normal_"}


class OpsOnMemory(TorchDispatchMode):
    """The random fills run on real (not meta) tensors, and the bytes of real tensors made
    by factory ops (``empty``), while the mode is on."""

    def __init__(self) -> None:
        super().__init__()
        self.fills: list[str] = []
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        if name in RANDOM_FILLS and isinstance(first, torch.Tensor) and first.device.type != "meta":
            self.fills.append(name)
        if name.startswith("empty") and isinstance(out, torch.Tensor) and out.device.type != "meta":
            self.allocated += out.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_the_copy_is_built_on_the_meta_device_and_equals_the_policy(tied: bool) -> None:
    """Building the copy runs no random initialisation (nor draws from torch's RNG), gives
    its parameters memory once, and after the sync its logits are the policy's (the
    rotary frequencies, which no state dict carries, included)."""
    data = tiny_datamodule()
    policy = build_policy(data.tokenizer, config={**TINY, "tie_word_embeddings": tied}, seed=0).eval()
    weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in policy.parameters()}
    buffers = sum(b.untyped_storage().nbytes() for b in policy.buffers())
    engine = HFEngine(copy=True)
    rng = torch.random.get_rng_state()
    with OpsOnMemory() as seen:
        engine.start(policy)
    assert seen.fills == [], "the copy's parameters were initialised before the sync overwrote them"
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert seen.allocated <= sum(weights.values()) + buffers, "the copy's parameters were given memory twice"
    own = {p.untyped_storage().data_ptr() for p in engine.model.parameters()}
    assert len(own) == len(weights), "tied weights share one tensor in the copy too"
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        ids, mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
        torch.testing.assert_close(engine.model(input_ids=ids, attention_mask=mask).logits,
                                   policy(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def peak_cpu_bytes(work) -> int:
    """The peak of torch's CPU allocations while ``work()`` runs, above what was allocated
    before it: every allocation and free the allocator reports to the profiler, in order
    (temporaries inside a kernel, such as logsumexp's, included)."""
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    sizes, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
    assert sizes, "the profiler reported no allocation"
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def test_the_copys_lag_scoring_never_holds_batch_by_vocabulary_logits() -> None:
    """``token_logp`` (``importance/lag_kl`` and ``mismatch_kl`` at a lag) at a 131k
    vocabulary: the scoring's peak memory stays under a quarter of one [B, R, V] float32
    tensor (the head runs chunk by chunk, as the trainer's), and its log-probs are the
    trainer's own."""
    vocab, rows, prompt, response = 131_072, 16, 4, 128
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**{**TINY, "max_position_embeddings": 256}, vocab_size=vocab)).eval()
    engine = HFEngine(copy=True)
    engine.start(policy)
    prompt_ids = torch.randint(0, vocab, (rows, prompt))
    response_ids = torch.randint(0, vocab, (rows, response))
    prompt_mask = torch.ones_like(prompt_ids)
    response_mask = torch.ones_like(response_ids)
    response_mask[0, 100:] = 0
    scored = {}

    def work():
        scored["logp"] = engine.token_logp(prompt_ids, prompt_mask, response_ids, response_mask, 0.8)

    peak = peak_cpu_bytes(work)
    logits_bytes = rows * response * vocab * 4  # one [B, R, V] float32 tensor: 1 GiB
    assert peak < logits_bytes / 4, f"scoring peaked at {peak / 2**20:.0f} MiB"
    from lightning_unified.models.loss_head import install_loss_head

    install_loss_head(policy)
    expected = response_logprobs(policy, prompt_ids, prompt_mask, response_ids, response_mask, temperature=0.8)
    torch.testing.assert_close(scored["logp"], expected, rtol=0, atol=1e-5)
    assert (scored["logp"][0, 100:] == 0).all()


def test_the_copy_at_a_lag_is_in_the_trainers_compute_dtype() -> None:
    """Under bf16-mixed the policy keeps float32 master weights; the hf engine's copy, which
    only samples and scores, is built in bf16 (a float32 replica would be twice the size)."""
    from tests.lightning_helpers import tiny_module

    module = tiny_module(OnPolicy(sampling=Sampling(num_generations=2, max_lag=1)), Sparse(rewards=[Reward(digit_match)]))
    quiet_trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed").fit(module, datamodule=tiny_datamodule())
    assert next(module.policy.parameters()).dtype == torch.float32
    assert {p.dtype for p in module.rollouts.engine.model.parameters()} == {torch.bfloat16}
    module.rollouts.close()
