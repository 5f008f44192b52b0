"""The step's diagnostics (lightning_unified/metrics.py) against direct computations on the
same step: the entropy against a full softmax, the gradient norm against the one Lightning's
clipping computes, response lengths and the clipped share against the sampled batch, each
reward function's mean and spread against the functions called on the batch's completions.
That they are reduced over ranks is tests/test_distributed_equivalence.py's: two processes
log what one process logs."""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_unified import batch as F
from lightning_unified.losses.objective import chunked_weighted_nll
from lightning_unified.losses.weight_builders import indicator
from lightning_unified.metrics import FlopsModel, grad_square_sum, training_flops
from lightning_unified.models.forward import response_hidden
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OffPolicy, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match, exact_match
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule
from tests.test_runs import read_metrics


def full_softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_v p log p over the whole vocabulary at once: [..., V] -> [...]."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("grad", [True, False])
def test_entropy_of_the_chunked_loss_is_the_full_softmax_entropy(grad: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=grad)
    head = torch.randn(50, 16, dtype=torch.float64, requires_grad=grad)
    targets = torch.randint(0, 50, (3, 7))
    mask = (torch.rand(3, 7) > 0.3).double()
    with torch.set_grad_enabled(grad):
        out = chunked_weighted_nll(hidden, head, targets, mask, indicator, temperature=0.7, chunk_size=4,
                                   entropy=True)
    expected = full_softmax_entropy(hidden.detach() @ head.detach().T / 0.7) * mask  # [3, 7], 0 off the mask
    torch.testing.assert_close(out.token_entropy, expected, rtol=0, atol=1e-6)
    assert not out.token_entropy.requires_grad
    plain = chunked_weighted_nll(hidden, head, targets, mask, indicator, temperature=0.7, chunk_size=4)
    assert plain.token_entropy is None and torch.equal(plain.loss.detach(), out.loss.detach()), \
        "the entropy changes nothing of the loss"


class StepRecorder(L.Callback):
    """What each optimizer step should log, computed directly: the full-softmax entropy of the
    policy on the step's loss tokens (before its update), the norm Lightning's clipping sees,
    the learning rate the optimizer steps with."""

    def __init__(self) -> None:
        self.entropy_sum = self.tokens = 0.0
        self.entropies, self.norms, self.rates = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            hidden = response_hidden(pl_module.policy, batch[F.PROMPT_IDS], batch[F.PROMPT_MASK],
                                     batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK])
            logits = hidden.double() @ pl_module.policy.get_output_embeddings().weight.double().T  # [B, R, V]
            mask = F.loss_mask(batch).double()
            self.entropy_sum += float((full_softmax_entropy(logits) * mask).sum())
            self.tokens += float(mask.sum())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.entropies.append(self.entropy_sum / self.tokens)
        self.entropy_sum = self.tokens = 0.0
        self.rates.append(optimizer.param_groups[0]["lr"])


def logged(directory, name: str) -> list[float]:
    return [float(r[name]) for r in read_metrics(next(directory.rglob("metrics.csv"))) if r.get(name)]


def test_grad_norm_entropy_and_learning_rate_are_the_steps_own(tmp_path, monkeypatch) -> None:
    """Two micro-batches a step (the gradient is normalised after the step's read), clipping
    active: the logged norm is the one clip_grad_norm_ returns on that step, before it clips."""
    recorder = StepRecorder()
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        expected = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        norm = real_clip(parameters, max_norm, *args, **kwargs)
        torch.testing.assert_close(norm, expected)
        recorder.norms.append(float(norm))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    datamodule = tiny_datamodule(batch_size=4)
    module = UnifiedModule(build_policy(datamodule.tokenizer, config=TINY, seed=0), datamodule.tokenizer, OffPolicy(),
                           Sparse(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                           scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
                           samples_every_n_steps=None)
    quiet_trainer(max_steps=3, limit_val_batches=0, accumulate_grad_batches=2, gradient_clip_val=0.05,
                  log_every_n_steps=1, logger=CSVLogger(tmp_path), callbacks=[recorder]).fit(module,
                                                                                         datamodule=datamodule)
    assert len(recorder.norms) == 3 and min(recorder.norms) > 0.05, "clipping was active on every step"
    assert logged(tmp_path, "train/grad_norm") == pytest.approx(recorder.norms, rel=1e-5)
    assert logged(tmp_path, "train/entropy") == pytest.approx(recorder.entropies, abs=1e-6)
    assert logged(tmp_path, "train/lr") == pytest.approx(recorder.rates) == [1e-2, 5e-3, 2.5e-3]
    lengths = logged(tmp_path, "data/response_length")
    assert len(lengths) == 3 and all(length > 0 for length in lengths)


class BatchRecorder(L.Callback):
    """Each sampled batch as the loss saw it (its responses, completions and references)."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append({k: batch[k] for k in (F.RESPONSE_IDS, F.RESPONSE_MASK, F.COMPLETIONS, F.REFERENCES)})


def test_response_lengths_clipped_share_and_each_rewards_mean_are_the_batchs(tmp_path) -> None:
    """Three sampled tokens at most from an untrained policy: some responses end at EOS, the
    others are cut at the limit."""
    limit = 3
    recorder = BatchRecorder()
    datamodule = tiny_datamodule(batch_size=4)
    module = UnifiedModule(build_policy(datamodule.tokenizer, config=TINY, seed=0), datamodule.tokenizer,
                           OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=limit)),
                           Sparse(rewards=[Reward(exact_match), Reward(digit_match, weight=0.5)]),
                           samples_every_n_steps=None)
    quiet_trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                  callbacks=[recorder]).fit(module, datamodule=datamodule)
    clipped_seen = []
    for step, batch in enumerate(recorder.batches):
        lengths = batch[F.RESPONSE_MASK].sum(-1).double()
        ended = torch.isin(batch[F.RESPONSE_IDS], torch.tensor(module.stop_token_ids)).any(-1)
        assert bool((lengths[~ended] == limit).all()), "a response without a stop token is one cut at the limit"
        clipped_seen.append(float((~ended).double().mean()))
        for name, expected in (("sampling/response_length", lengths.mean()), ("sampling/response_length_max",
                               lengths.max()), ("sampling/response_length_min", lengths.min()),
                               ("sampling/clipped_fraction", (~ended).double().mean()),
                               ("sampling/eos_fraction", ended.double().mean())):
            assert logged(tmp_path, name)[step] == pytest.approx(float(expected)), f"step {step}: {name}"
        for fn in (exact_match, digit_match):
            scores = torch.as_tensor(fn(completions=batch[F.COMPLETIONS], references=batch[F.REFERENCES]),
                                     dtype=torch.float64)
            name = fn.__name__
            assert logged(tmp_path, f"reward/{name}")[step] == pytest.approx(float(scores.mean()), abs=1e-7)
            assert logged(tmp_path, f"reward/{name}_std")[step] == pytest.approx(float(scores.std()), abs=1e-7)
    assert 0 < sum(clipped_seen) < len(clipped_seen), f"some responses cut, some not: {clipped_seen}"


def test_extra_metrics_off_and_mfu_with_a_configured_peak(tmp_path) -> None:
    """``detailed_metrics=false`` leaves out the entropy and the norm; ``peak_flops`` gives
    MFU: the step's model FLOPs over its wall time over the peak."""
    datamodule = tiny_datamodule(batch_size=4)
    policy = build_policy(datamodule.tokenizer, config=TINY, seed=0)
    module = UnifiedModule(policy, datamodule.tokenizer, OffPolicy(), Sparse(), detailed_metrics=False,
                           samples_every_n_steps=None)
    quiet_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, logger=CSVLogger(tmp_path / "off")).fit(
        module, datamodule=datamodule)
    names = set(read_metrics(next((tmp_path / "off").rglob("metrics.csv")))[0])
    assert not names & {"train/grad_norm", "train/entropy", "train/mfu"} and "train/lr" in names
    module = UnifiedModule(policy, datamodule.tokenizer, OffPolicy(), Sparse(), peak_flops=1e12,
                           samples_every_n_steps=None)
    quiet_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, logger=CSVLogger(tmp_path / "on")).fit(
        module, datamodule=datamodule)
    flops = FlopsModel(policy, 1e12, 1)
    # untied: the input embedding is a lookup, the output layer a matmul
    assert flops.parameters == sum(p.numel() for p in policy.parameters()) - policy.config.vocab_size * 64
    assert (flops.layers, flops.width) == (2, 64)
    rows = [r for r in read_metrics(next((tmp_path / "on").rglob("metrics.csv"))) if r.get("train/mfu")]
    assert len(rows) == 2 and all(0 < float(r["train/mfu"]) < 1 for r in rows)
    with pytest.raises(ValueError, match="module.peak_flops"):
        UnifiedModule(policy, datamodule.tokenizer, OffPolicy(), Sparse(), peak_flops=0)
    assert training_flops(10, 2, 4, tokens=3, square_lengths=9) == 6 * 10 * 3 + 12 * 2 * 4 * 9


def test_grad_square_sum_counts_a_replicated_gradient_once_and_every_shard() -> None:
    """Across ranks the shares sum to the whole gradient's squared norm: a replicated (DDP)
    gradient gives 1/world_size per rank; a DTensor shard gives itself."""
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    assert float(grad_square_sum([p], world_size=4)) * 4 == pytest.approx(16.0)
    assert grad_square_sum([torch.nn.Parameter(torch.ones(2))], world_size=1) is None
    assert math.isclose(float(grad_square_sum([p], world_size=1)), 16.0)
