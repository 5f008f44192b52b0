"""Sampling ahead of the trainer (``data_source.sampling.max_lag``): each batch is sampled by
the producer thread from the weights of ``max_lag`` steps before, its behaviour log-probs
are those weights' own, every on-policy method trains with it, and what cannot be corrected
is refused before training. Resume at lag 2 is in ``tests/test_resume.py``; two processes
(DDP, FSDP2) in ``tests/test_distributed_equivalence.py``."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unified import batch as fields
from lightning_unified.config import train
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.specs import Importance, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.stages import Stage
from lightning_unified.tasks.addition import digit_match
from lightning_unified.module import UnifiedModule
from tests.lightning_helpers import FAST_TASK, compose_config, quiet_trainer, tiny_datamodule, tiny_module
from tests.test_runs import read_metrics

STEPS = 5


class RecordRows(Stage):
    """Keeps, for every batch, what the sample stage handed the step."""

    name = "record_rows"

    def __init__(self):
        super().__init__(after="sample")
        self.batches: list[dict] = []

    def reads(self):
        return {fields.RESPONSE_IDS, fields.BEHAVIOUR_LOGP, fields.POLICY_VERSION}

    def run(self, trainer, host, batch, batch_idx):
        self.batches.append({"batch_idx": batch_idx, "step": host.progress["optimizer_steps"],
                             **{k: copy.deepcopy(batch[k]) for k in (
                                 fields.PROMPT_IDS, fields.PROMPT_MASK, fields.RESPONSE_IDS, fields.RESPONSE_MASK,
                                 fields.BEHAVIOUR_LOGP, fields.POLICY_VERSION)}})


class KeepWeights(L.Callback):
    """The policy's weights at the start of every batch: version v's are ``weights[v]``."""

    def __init__(self):
        self.weights: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = pl_module.progress["optimizer_steps"]
        self.weights[step] = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def lagged_run(max_lag: int, temperature: float = 1.0, steps: int = STEPS) -> tuple[UnifiedModule, RecordRows,
                                                                                    KeepWeights]:
    L.seed_everything(0, verbose=False)  # the loader's shuffle draws from the global RNG
    record, keep = RecordRows(), KeepWeights()
    source = OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=4, temperature=temperature,
                                        max_lag=max_lag))
    module = tiny_module(source, Sparse(rewards=[Reward(digit_match)]))
    module = UnifiedModule(module.policy, module.tokenizer, source, Sparse(rewards=[Reward(digit_match)]),
                           optimizer=module.optimizer_factory, stages=[record])
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[keep]).fit(module, datamodule=tiny_datamodule())
    return module, record, keep


@pytest.mark.parametrize("max_lag", [1, 2])
def test_each_rows_version_is_its_batch_index_minus_the_lag(max_lag: int) -> None:
    _, record, _ = lagged_run(max_lag)
    assert [b["batch_idx"] for b in record.batches] == list(range(STEPS))
    for b in record.batches:
        expected = max(0, b["batch_idx"] - max_lag)
        assert set(b[fields.POLICY_VERSION]) == {expected}, (b["batch_idx"], b[fields.POLICY_VERSION])
        assert len(b[fields.POLICY_VERSION]) == b[fields.RESPONSE_IDS].shape[0]


def test_behaviour_logp_are_a_full_forward_of_the_weights_that_sampled() -> None:
    """The producer's engine generates with a KV cache from its own copy of the weights;
    a full forward of the policy with those weights (kept at each batch's start) gives the
    same log-probs, to 1e-5 (float32, the same kernels), at the sampling temperature."""
    module, record, keep = lagged_run(max_lag=2, temperature=0.8)
    scorer = copy.deepcopy(module.policy)
    stale = 0
    for b in record.batches:
        version = b[fields.POLICY_VERSION][0]
        stale += version < b["step"]
        scorer.load_state_dict(keep.weights[version])
        logp = response_logprobs(scorer, b[fields.PROMPT_IDS], b[fields.PROMPT_MASK], b[fields.RESPONSE_IDS],
                                 b[fields.RESPONSE_MASK], temperature=0.8)
        mask = b[fields.RESPONSE_MASK].bool()
        torch.testing.assert_close(b[fields.BEHAVIOUR_LOGP][mask], logp[mask], rtol=0, atol=1e-5)
        # and not those of the weights the batch trains from, once they have moved
        if version < b["step"]:
            scorer.load_state_dict(keep.weights[b["step"]])
            now = response_logprobs(scorer, b[fields.PROMPT_IDS], b[fields.PROMPT_MASK], b[fields.RESPONSE_IDS],
                                    b[fields.RESPONSE_MASK], temperature=0.8)
            assert (now[mask] - logp[mask]).abs().max() > 1e-3
    assert stale == STEPS - 1, "every batch after the first trains on older weights' samples"


def test_a_fixed_lag_gives_the_same_rows_from_the_same_seed() -> None:
    first, second = lagged_run(max_lag=1, steps=3)[1], lagged_run(max_lag=1, steps=3)[1]
    for a, b in zip(first.batches, second.batches):
        assert torch.equal(a[fields.RESPONSE_IDS], b[fields.RESPONSE_IDS])
        torch.testing.assert_close(a[fields.BEHAVIOUR_LOGP], b[fields.BEHAVIOUR_LOGP], rtol=0, atol=0)


# every on-policy method, at lag 1, through the command line's configs
METHODS = {
    "grpo": ["experiment=rl"],
    "rloo": ["experiment=rl", "signal.advantage=rloo"],
    "ppo_clip": ["experiment=rl", "data_source.importance.ratio=ppo_clip"],
    "decoupled_ppo_clip": ["experiment=rl", "data_source.importance.ratio=decoupled_ppo_clip"],
    "sequence_masked": ["experiment=rl", "data_source.importance.level=sequence", "data_source.importance.mask_low=0.5",
                        "data_source.importance.mask_high=2"],
    "on_policy_distill": ["experiment=on_policy_distill"],
    "gkd_on_policy_half": ["experiment=gkd", "data_source.probability=1.0"],
    "online_dpo": ["experiment=online_dpo"],
    "self_distill": ["experiment=self_distill"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_on_policy_method_trains_at_lag_one(method: str, tmp_path: Path) -> None:
    cfg = compose_config([*METHODS[method], "data_source.sampling.max_lag=1", "data_source.sampling.num_generations=2",
                          "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
                          "save_policy=null", *FAST_TASK, "task.num_val=8", "task.val_batch_size=8"])
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    lags = [float(r["sampling/lag"]) for r in rows if r.get("sampling/lag")]
    assert lags == [0.0, 1.0, 1.0], lags
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    waits = [float(r["sampling/wait_seconds"]) for r in rows if r.get("sampling/wait_seconds")]
    assert len(waits) == 3 and all(w >= 0 for w in waits)
    # the two stale batches: the lag's share apart from the engine's mismatch, which the hf
    # engine's copy (the trainer's own kernels) does not have. (The first may be 0: the
    # schedule's warm-up starts at a learning rate of 0.)
    split = [(float(r["importance/lag_kl"]), float(r["importance/mismatch_kl"])) for r in rows
             if r.get("importance/lag_kl")]
    if METHODS[method][0] != "experiment=online_dpo" and method != "decoupled_ppo_clip":
        assert len(split) == 2 and split[-1][0] > 0 and all(m < 1e-6 for _, m in split), split


@pytest.mark.parametrize("overrides,message", [
    (["data_source=off_policy", "+data_source.sampling.max_lag=1"], "data_source=off_policy trains on the dataset"),
    (["experiment=on_policy_distill", "data_source.sampling.max_lag=1", "signal.divergence=sampled_reverse_kl"],
     "reads the teacher only at the sampled token"),
    (["experiment=rl", "data_source.sampling.max_lag=1", "data_source.sampling.sync_every=2"],
     "Set one of them"),
    (["experiment=rl", "data_source.sampling.max_lag=1", "data_source.sampling.vllm.sleep=true"],
     "cannot sleep then"),
    (["experiment=rl", "data_source.sampling.max_lag=-1"], "max_lag must be >= 0"),
])
def test_what_a_lag_cannot_correct_is_refused_before_training(overrides: list[str], message: str,
                                                              tmp_path: Path) -> None:
    with pytest.raises(Exception, match=message):
        train(compose_config([*overrides, *FAST_TASK]), tmp_path)
    assert not (tmp_path / "checkpoints").exists(), "refused before training"


@pytest.mark.parametrize("trainer", ["ddp", "fsdp2_cpu"])
@pytest.mark.parametrize("method", ["on_policy_distill", "online_dpo"])
def test_two_processes_sample_ahead_each_with_its_own_producer(trainer: str, method: str, tmp_path: Path) -> None:
    """The methods the distributed equivalence test does not compare at a lag (it compares
    RL and GKD): two ranks, each sampling ahead with its own producer, at the same lag."""
    from tests.test_runs import run_script

    run_script(*METHODS[method], f"trainer={trainer}", "data_source.sampling.max_lag=1",
               "data_source.sampling.num_generations=2", "trainer.max_steps=3", "trainer.val_check_interval=3",
               "trainer.log_every_n_steps=1", "save_policy=null", *FAST_TASK, "task.num_val=8",
               "task.val_batch_size=8", f"hydra.run.dir={tmp_path}")
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [float(r["sampling/lag"]) for r in rows if r.get("sampling/lag")] == [0.0, 1.0, 1.0]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows if r.get("train/loss"))


def test_a_lag_without_a_correction_runs_and_says_it_is_biased(caplog) -> None:
    """importance.ratio=none at a lag is the ablation that shows why the ratio is needed:
    it runs, with a warning that names the bias."""
    from lightning_unified.pipeline import check_method

    source = OnPolicy(sampling=Sampling(max_lag=2), importance=Importance(ratio="none"))
    with caplog.at_level("WARNING"):
        check_method(source, Sparse(rewards=[Reward(digit_match)]))
    assert "max_lag=2" in caplog.text and "the gradient is biased" in caplog.text


def test_a_checkpoint_sampled_ahead_resumes_only_at_its_lag(tmp_path: Path) -> None:
    """Refused before anything is cut: the rows logged after the step-2 checkpoint stay."""
    from tests.test_resume import rows

    common = ["experiment=rl", "data_source.sampling.num_generations=2", "trainer.max_steps=3",
              "checkpoint_every_n_steps=2", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
              "save_policy=null", *FAST_TASK, "task.num_val=8", "task.val_batch_size=8"]
    train(compose_config([*common, "data_source.sampling.max_lag=2"]), tmp_path)
    logged = rows(tmp_path)
    assert max(step for step, _, _ in logged) > 2, "rows after the step-2 checkpoint"
    for other in ("1", "0"):
        with pytest.raises(ValueError, match="resume it with data_source.sampling.max_lag=2"):
            train(compose_config([*common, "trainer.max_steps=4", f"data_source.sampling.max_lag={other}",
                                  "resume=true"]), tmp_path)
        assert rows(tmp_path) == logged


def test_each_rank_loads_its_own_batches_ahead_or_is_refused() -> None:
    """:func:`~lightning_unified.rollouts.ranks.this_ranks` on what the checkpoint keeps:
    each rank's own entry; another number of processes, an entry of another rank, or a
    one-rank state (written before each rank's were kept) under several ranks, refused."""
    from lightning_unified.rollouts.ranks import this_ranks

    ahead = {(0, 2): {"source_prompt_ids": torch.ones(1, 2, dtype=torch.long)}}
    entries = [{"rank": r, "max_lag": 2, "ahead": ahead, "kept": []} for r in (0, 1)]
    saved = {"world_size": 2, "per_rank": entries}
    assert this_ranks(saved, 0, 2) is entries[0] and this_ranks(saved, 1, 2) is entries[1]
    for world_size in (1, 4):
        with pytest.raises(ValueError, match=f"each of its 2 processes sampled ahead .* and this run has {world_size}: "
                                             f".* resume it with 2 processes"):
            this_ranks(saved, 0, world_size)
    with pytest.raises(ValueError, match="the checkpoint's rollouts for rank 1 are rank 0's"):
        this_ranks({"world_size": 2, "per_rank": [entries[0], entries[0]]}, 1, 2)
    with pytest.raises(ValueError, match="hold 1 ranks' states for world_size=2"):
        this_ranks({"world_size": 2, "per_rank": entries[:1]}, 0, 2)
    # nothing sampled ahead on any rank: any number of processes
    assert this_ranks({"world_size": 2, "per_rank": [{"rank": 0}, {"rank": 1}]}, 0, 1) == {}
    old = {"max_lag": 2, "ahead": ahead, "kept": []}  # one rank's state, as written before
    assert this_ranks(old, 0, 1) is old
    with pytest.raises(ValueError, match="one process's batches only .*rank 0's.*, and this run has 2 processes"):
        this_ranks(old, 1, 2)


def test_rows_restored_for_other_prompts_than_their_kept_batch_are_refused() -> None:
    from lightning_unified.rollouts.ahead import _check_restored_prompts

    prompts = torch.tensor([[5, 6], [7, 8]])
    rows = {"source_prompt_ids": prompts.clone()}
    kept = [({fields.PROMPT_IDS: prompts}, 2, 0)]  # the combined loader's (batch, batch_idx, dataloader_idx)
    _check_restored_prompts({"ahead": {(0, 2): rows}, "kept": kept})
    with pytest.raises(ValueError, match="rows sampled ahead for batch 2 of epoch 0 were sampled from other prompts"):
        _check_restored_prompts({"ahead": {(0, 2): {"source_prompt_ids": prompts.flip(0)}}, "kept": kept})
    with pytest.raises(ValueError, match="for batch 3 of epoch 0 but not that batch"):
        _check_restored_prompts({"ahead": {(0, 3): rows}, "kept": kept})


def test_a_lag_needs_a_loader_with_a_length() -> None:
    class Unsized(torch.utils.data.IterableDataset):
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    data = tiny_datamodule()
    loader = data.train_dataloader()
    batches = [b for _, b in zip(range(3), loader)]
    source = OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=4, max_lag=1))
    module = tiny_module(source, Sparse(rewards=[Reward(digit_match)]))
    with pytest.raises(ValueError, match="needs a training loader with a length"):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(
            module, train_dataloaders=torch.utils.data.DataLoader(Unsized(batches), batch_size=None))


@pytest.mark.parametrize("diagnostics,scorings", [("true", 2), ("false", 0)])
def test_stale_batches_are_scored_for_diagnostics_only_on_logged_steps(diagnostics: str, scorings: int,
                                                                       tmp_path: Path, monkeypatch) -> None:
    """The lag's diagnostics cost the engine a prefill of every row (a second request per row
    on a server): made only on the steps whose metrics Lightning records, and not at all with
    lag_diagnostics=false. At lag 1 over 4 steps with log_every_n_steps=2, the stale batches
    are steps 1-3, and steps 1 and 3 are logged: two scorings, not three (before: every stale
    step)."""
    from lightning_unified.engines.hf import HFEngine

    calls = []
    scored = HFEngine.token_logp
    monkeypatch.setattr(HFEngine, "token_logp", lambda self, *a, **k: calls.append(1) or scored(self, *a, **k))
    cfg = compose_config([*METHODS["grpo"], "data_source.sampling.max_lag=1", "data_source.sampling.num_generations=2",
                          f"data_source.sampling.lag_diagnostics={diagnostics}",
                          "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=2",
                          "save_policy=null", *FAST_TASK, "task.num_val=8", "task.val_batch_size=8"])
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert len(calls) == scorings, calls
    assert len([r for r in rows if r.get("importance/lag_kl")]) == scorings
