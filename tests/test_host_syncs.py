"""The step reads nothing back to the host per parameter or per field: the number of host
syncs (``.item()``, ``float(t)``, ``bool(t)`` on a tensor) in one training step, outside the
optimizer's own update, is the same for a 2-layer and a 6-layer model, and small. The step
counted writes its logs, so it makes every diagnostic of docs/metrics.md (the gradient
norm, the entropy, lengths, each reward's mean and spread, MFU), which add no read.

Two parts of a step are left out of the count, because their reads are not the step's to
remove: the rollout engine's generation (Hugging Face ``generate`` checks its stopping
criteria once per new token; an inference engine runs its own loop) and the rewards, which
decode the responses and score the text on the host by design."""

from __future__ import annotations

import functools
import sys

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Dense, OffPolicy, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match, exact_match
from tests.lightning_helpers import TINY, quiet_trainer, save_tiny_teacher, tiny_datamodule

SYNC_OPS = {"aten._local_scalar_dense", "aten.is_nonzero"}
# The reads a step makes, whatever the model's depth: the non-finite guard's one decision
# (skip the optimizer or not), the normaliser's one read of the step's summed counts
# (``tolist``, counted by a wrapper: it does not pass through the dispatcher), per model
# forward transformers' own look at the attention mask (the policy's, and a teacher's: one
# decision per forward, which reads once, or twice when the rows are padded), and
# the loss's target-range check, which reads back on a CPU only (on an accelerator it is a
# device-side assert)
MAX_SYNCS = 5
# exactly those, on a CPU: the guard's decision, the one tolist, the range check, and one mask
# decision per forward (the policy's; the teacher's too when there is one). An exact count,
# so that one more read anywhere in the step (a new metric's among them) fails the test
EXACT_SYNCS = {"sft": 4, "rl": 4, "distill": 5, "on_policy_distill": 5}


def mask_decision_frame():
    """The frame of transformers' decision whether a forward's attention mask can be
    skipped, if this read is part of it: its reads depend on the rows' padding."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "_ignore_causal_mask_sdpa":
            return frame
        frame = frame.f_back
    return None


class CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count, self.paused, self.active = 0, False, False
        self.where: list[str] = []
        self.decision = None  # the mask decision whose read was counted last

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and str(func.overloadpacket) in SYNC_OPS:
            import traceback

            decision = mask_decision_frame()
            if decision is not None and decision is self.decision:
                return func(*args, **(kwargs or {}))  # the same decision's second read
            self.decision = decision

            self.count += 1
            frames = [f for f in traceback.extract_stack() if "lightning_unified" in f.filename]
            self.where.append(f"{frames[-1].filename.rsplit('/', 1)[1]}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **(kwargs or {}))


class StepCounter(L.Callback):
    """Counts the syncs of the second training step (the first pays one-time set-up), from
    its batch's start to its end, with the optimizer's own update left out (paused from the
    end of Lightning's closure to the optimizer's step post-hook)."""

    def __init__(self) -> None:
        self.mode = CountSyncs()
        self.counts: list[int] = []
        self.where: list[list[str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(lambda *a: setattr(self.mode, "paused", False))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode.count, self.mode.where, self.mode.active = 0, [], True
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.mode.active = False
        self.counts.append(self.mode.count)
        self.where.append(list(self.mode.where))


def signal_for(method: str, teacher: str):
    rewards = [Reward(exact_match), Reward(digit_match)]
    sampled = OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=4))
    return {
        "sft": (OffPolicy(), Sparse()),
        "distill": (OffPolicy(), Dense(teacher=teacher)),
        "rl": (sampled, Sparse(rewards=rewards)),
        "on_policy_distill": (OnPolicy(sampling=Sampling(num_generations=1, max_new_tokens=4)),
                              Dense(teacher=teacher, divergence="reverse_kl")),
    }[method]


def paused_while(mode: CountSyncs, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        mode.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            mode.paused = False

    return run


def syncs_of_a_step(method: str, layers: int, teacher: str, monkeypatch) -> tuple[int, list[str]]:
    datamodule = tiny_datamodule(batch_size=4)
    policy = build_policy(datamodule.tokenizer, config={**TINY, "num_hidden_layers": layers}, seed=0)
    source, signal = signal_for(method, teacher)
    module = UnifiedModule(policy, datamodule.tokenizer, source, signal, max_new_tokens=4,
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), samples_every_n_steps=None,
                           peak_flops=1e12)  # MFU, which a CPU's unknown peak would leave out
    counter = StepCounter()
    from lightning_unified.stages import AdvantagesStage, RewardsStage
    from lightning_unified.engines import hf

    monkeypatch.setattr(hf.HFEngine, "generate", paused_while(counter.mode, hf.HFEngine.generate))
    real_tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if counter.mode.active and not counter.mode.paused:
            counter.mode.count += 1
            counter.mode.where.append("tolist")
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    from lightning.pytorch.plugins.precision import Precision

    real_after_closure = Precision._after_closure

    def then_pause(self, model, optimizer):
        # the end of Lightning's closure (loss, backward, the hooks before the optimizer's
        # update, the non-finite guard among them): what follows is the update itself
        out = real_after_closure(self, model, optimizer)
        counter.mode.paused = True
        return out

    monkeypatch.setattr(Precision, "_after_closure", then_pause)
    for stage in (RewardsStage, AdvantagesStage):
        monkeypatch.setattr(stage, "run", paused_while(counter.mode, stage.run))
    logged = []
    real_log = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log", lambda self, name, *a, **k: logged.append(name) or real_log(
        self, name, *a, **k))
    # every step writes its logs: the counted step makes and reads every metric of the table
    # (docs/metrics.md: the entropy, the gradient norm, lengths, each reward's, MFU's counts)
    quiet_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, callbacks=[counter]).fit(
        module, datamodule=datamodule)
    expected = {"train/grad_norm", "train/entropy", "train/lr", "train/mfu",
                *(("sampling/response_length_max", "sampling/clipped_fraction") if source.samples
                  else ("data/response_length_max",)),
                *(("reward/exact_match", "reward/exact_match_std") if method == "rl" else ())}
    assert expected <= set(logged), f"{method}: the counted steps log {sorted(expected - set(logged))} too"
    return counter.counts[-1], counter.where[-1]


@pytest.mark.parametrize("method", ["sft", "distill", "rl", "on_policy_distill"])
def test_host_syncs_do_not_grow_with_the_model(method: str, tmp_path, monkeypatch) -> None:
    teacher = save_tiny_teacher(tmp_path / "teacher")
    shallow, where_shallow = syncs_of_a_step(method, 2, teacher, monkeypatch)
    deep, where_deep = syncs_of_a_step(method, 6, teacher, monkeypatch)
    assert shallow == deep, f"{method}: {shallow} syncs at 2 layers, {deep} at 6: {where_shallow} / {where_deep}"
    assert shallow <= MAX_SYNCS, f"{method}: {shallow} host syncs in one step: {where_shallow}"
    assert shallow == EXACT_SYNCS[method], f"{method}: {shallow} host syncs in one step: {where_shallow}"


def test_prompts_are_decoded_only_for_reward_functions_that_name_them() -> None:
    from lightning_unified import batch as F
    from lightning_unified.stages import RewardsStage

    seen = []

    def wants_prompts(completions, prompts, **_):
        seen.append(prompts)
        return torch.zeros(len(completions))

    module = UnifiedModule(build_policy(tiny_datamodule().tokenizer, config=TINY), tiny_datamodule().tokenizer,
                           OnPolicy(sampling=Sampling(num_generations=2)), Sparse(rewards=[Reward(exact_match)]))
    batch = next(iter(tiny_datamodule(batch_size=2).train_dataloader()))
    batch.update({F.RESPONSE_IDS: batch[F.RESPONSE_IDS], F.BEHAVIOUR_LOGP: torch.zeros(batch[F.RESPONSE_IDS].shape),
                  F.GROUP_SIZE: 2})
    calls = []
    real = module.tokenizer.batch_decode
    module.tokenizer.batch_decode = lambda *a, **k: calls.append(1) or real(*a, **k)
    trainer = quiet_trainer(max_steps=1)
    trainer.strategy.connect(module)
    RewardsStage(Sparse(rewards=[Reward(exact_match)])).run(trainer, module, dict(batch), 0)
    assert len(calls) == 1, "the responses only: exact_match does not name prompts"
    RewardsStage(Sparse(rewards=[Reward(wants_prompts)])).run(trainer, module, dict(batch), 0)
    assert len(calls) == 3 and len(seen[0]) == 2, "the responses and the prompts, for the function that names them"
