"""Every row of docs/coming_from_trl.md: the command-line overrides it names give, on one
batch, the gradient of the TRL setting it maps (the loss written from TRL's documentation and
the method's paper in tests/trl_formulas.py).

Each row runs the real module, composed from its overrides, for one batch on tiny models. An
optimizer that records what it is handed captures each update's gradient and the weights the
update's forward saw; the TRL loss is then evaluated by autograd on a plain Hugging Face copy
of those weights, on the batch's own tokens (a sampled batch's responses, its rewards).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_unified import batch as F
from lightning_unified.config import build_run
from tests import trl_formulas as trl
from tests.lightning_helpers import compose_config, quiet_trainer, save_chat_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "coming_from_trl.md"

# a small built-in task, plain SGD (its update is the gradient times lr), nothing else per step
BASE = ["optimizer=sgd",
        "optimizer._target_=tests.test_coming_from_trl.RecordingSGD", "optimizer.lr=0.1", "scheduler=constant",
        "scheduler.num_warmup_steps=0",
        "module.samples_every_n_steps=null", "module.non_finite=null"]
BUILT_IN_TASK = ["task.num_train=64", "task.num_val=8", "task.batch_size=4", "task.val_batch_size=8"]
# RL rows: 4 prompts x 4 samples of 1 to 6 tokens (at temperature 2.5 the RL starting policy
# ends its answers at different lengths, so a per-sequence and a per-token mean differ)
RL = ["task.batch_size=4", "data_source.sampling.num_generations=4", "data_source.sampling.max_new_tokens=6",
      "data_source.sampling.temperature=2.5"]


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps, for each step, the weights the step's forward saw and the gradient it
    was handed (after the module's normaliser, before the update)."""

    records: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    losses: list[float] = []  # each step's loss as the closure returned it

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure()
        RecordingSGD.losses.append(float(loss))
        params = [p for group in self.param_groups for p in group["params"]]
        RecordingSGD.records.append(([p.detach().clone() for p in params],
                                     [p.grad.detach().clone() for p in params]))
        super().step()
        return loss


class KeepBatch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch = batch


@dataclass
class Captured:
    """One batch's run: the batch as the loss saw it, the plain HF model at each update's
    weights (``models[0]`` is the starting policy, TRL's reference), each update's gradient."""

    batch: dict
    models: list
    grads: list[list[torch.Tensor]]
    cfg: object

    def logits(self, update: int, model=None) -> torch.Tensor:
        b = self.batch
        return trl.completion_logits(model or self.models[update], b[F.PROMPT_IDS], b[F.RESPONSE_IDS],
                                     b[F.RESPONSE_MASK])

    @property
    def mask(self) -> torch.Tensor:
        return self.batch[F.RESPONSE_MASK].float()


def run_one_batch(overrides: list[str], tmp_path: Path, equal_prompts: bool = True) -> Captured:
    RecordingSGD.records, RecordingSGD.losses = [], []
    cfg = compose_config([*BASE, *overrides])
    run = build_run(cfg, tmp_path)
    keep = KeepBatch()
    quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[keep]).fit(run.module, datamodule=run.datamodule)
    if equal_prompts:  # TRL's side passes no position ids: left padding would shift them
        assert bool((keep.batch[F.PROMPT_MASK] == 1).all()), "equal-length prompts: no positions to reconcile"
    policy = run.module.policy
    models = []
    for weights, _ in RecordingSGD.records:
        model = AutoModelForCausalLM.from_config(policy.config)
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights, strict=True):
                p.copy_(w)
        models.append(model.train())
    return Captured(keep.batch, models, [g for _, g in RecordingSGD.records], cfg)


def trl_gradient(loss: torch.Tensor, model) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


# --- TRL's side of each row, from the captured batch ---------------------------------
def sft(loss_type):
    return lambda c: trl.sft_loss(c.logits(0), c.batch[F.RESPONSE_IDS], c.mask, loss_type)


def gkd(beta, temperature):
    def loss(c: Captured):
        teacher = AutoModelForCausalLM.from_pretrained(c.cfg.signal.teacher)
        with torch.no_grad():
            teacher_logits = c.logits(0, teacher)
        return trl.generalized_jsd_loss(c.logits(0), teacher_logits, c.mask, beta=beta, temperature=temperature)
    return loss


def grpo(loss_type, scale_rewards="group", update=0, **kwargs):
    def loss(c: Captured):
        ids, n = c.batch[F.RESPONSE_IDS], c.batch[F.GROUP_SIZE]
        temperature = c.cfg.data_source.sampling.temperature  # TRL's GRPOConfig(temperature=...)
        # the weights that sampled (old) and the starting policy (reference) score once, no grad
        with torch.no_grad():
            old = trl.token_logp(c.logits(0), ids, temperature)
        advantages = trl.group_advantages(c.batch[F.REWARDS], n, scale_rewards)
        assert advantages.abs().sum() > 0, "a row whose advantages are all 0 would compare two zeros"
        return trl.grpo_loss(trl.token_logp(c.logits(update), ids, temperature), old, advantages, c.mask,
                             loss_type=loss_type, ref_logp=old, **kwargs)
    return loss


def preference(loss_type, beta, gamma=0.0):
    def loss(c: Captured):
        marks, ids = c.batch[F.PREFERENCE], c.batch[F.RESPONSE_IDS]
        chosen, rejected = (marks == 1).nonzero()[:, 0], (marks == -1).nonzero()[:, 0]
        lengths = c.mask.sum(-1)
        assert (lengths[chosen] != lengths[rejected]).all(), "pairs of different lengths"
        with torch.no_grad():
            ref = trl.token_logp(c.logits(0), ids)
        return trl.preference_loss(trl.token_logp(c.logits(0), ids), c.mask, chosen, rejected,
                                   loss_type=loss_type, beta=beta, ref_logp=ref, gamma=gamma)
    return loss


@dataclass
class Row:
    trl: str  # the TRL trainer and options, as docs/coming_from_trl.md names them
    overrides: list[str]  # the command line here, as the page gives it
    loss: Callable[[Captured], torch.Tensor]
    update: int = 0  # the update of the batch whose gradient is compared (1: the second, ratios away from 1)
    setup: list[str] = field(default_factory=list)  # the test's own settings (sizes), not part of the mapping


PPO = ["data_source.importance.ratio=ppo_clip", "data_source.importance.eps_low=0.2",
       "data_source.importance.eps_high=0.2", "signal.std_eps=1e-4"]
ROWS = [
    Row('SFTTrainer(loss_type="nll")', ["experiment=sft"], sft("nll")),
    Row('SFTTrainer(loss_type="dft")', ["experiment=dft"], sft("dft")),
    Row("GKDTrainer(lmbda=0.0, beta=0.0, temperature=0.9)",
        ["experiment=gkd", "data_source.probability=0", "signal.divergence=forward_kl",
         "data_source.sampling.temperature=0.9", "signal.temperature=0.9"], gkd(0.0, 0.9)),
    Row("GKDTrainer(lmbda=1.0, beta=0.5, temperature=0.9)",
        ["experiment=gkd", "data_source.probability=1", "signal.divergence=jsd", "signal.beta=0.5",
         "data_source.sampling.temperature=0.9", "signal.temperature=0.9"], gkd(0.5, 0.9),
        setup=["data_source.sampling.max_new_tokens=4"]),
    Row("GKDTrainer(lmbda=1.0, beta=1.0, temperature=0.9)",
        ["experiment=gkd", "data_source.probability=1", "signal.divergence=reverse_kl",
         "data_source.sampling.temperature=0.9", "signal.temperature=0.9"], gkd(1.0, 0.9),
        setup=["data_source.sampling.max_new_tokens=4"]),
    Row('GRPOTrainer(loss_type="dapo")', ["experiment=rl", *PPO], grpo("dapo"), setup=RL),
    Row('GRPOTrainer(loss_type="bnpo")', ["experiment=rl", *PPO], grpo("bnpo"), setup=RL),
    Row('GRPOTrainer(loss_type="grpo")', ["experiment=rl", *PPO, "module.aggregation=seq_mean_token_mean"],
        grpo("grpo"), setup=RL),
    Row('GRPOTrainer(loss_type="dr_grpo", max_completion_length=6, per_device_train_batch_size=16)',
        ["experiment=rl", *PPO, "module.aggregation=constant", "module.constant_normaliser=96"],
        grpo("dr_grpo", max_completion_length=6), setup=RL),
    Row('GRPOTrainer(scale_rewards="batch")', ["experiment=rl", *PPO, "signal.advantage=grpo_batch_std"],
        grpo("dapo", "batch"), setup=RL),
    Row('GRPOTrainer(scale_rewards="none")', ["experiment=rl", *PPO, "signal.advantage=dr_grpo"],
        grpo("dapo", "none"), setup=RL),
    Row("GRPOTrainer(num_iterations=2, epsilon=0.1, epsilon_high=0.5)",
        ["experiment=rl", "data_source.updates_per_rollout=2", "data_source.importance.ratio=ppo_clip",
         "data_source.importance.eps_low=0.1", "data_source.importance.eps_high=0.5", "signal.std_eps=1e-4"],
        grpo("dapo", update=1, epsilon=0.1, epsilon_high=0.5), update=1, setup=RL),
    Row("GRPOTrainer(num_iterations=2, beta=0.04)",
        ["experiment=rl", "data_source.updates_per_rollout=2", *PPO, "reference=k3", "reference.kl_coef=0.04"],
        grpo("dapo", update=1, beta=0.04), update=1, setup=RL),
    Row('GRPOTrainer(num_iterations=2, importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, '
        "epsilon_high=4e-4)",
        ["experiment=rl", "data_source.updates_per_rollout=2", "data_source.importance.ratio=sequence_clip",
         "data_source.importance.eps_low=3e-4", "data_source.importance.eps_high=4e-4", "signal.std_eps=1e-4",
         "module.aggregation=seq_mean_token_mean"],
        grpo("grpo", update=1, importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), update=1,
        setup=RL),
    Row('DPOTrainer(loss_type="sigmoid", beta=0.1)', ["experiment=dpo", "signal.beta=0.1"],
        preference("sigmoid", 0.1)),
    Row('DPOTrainer(loss_type="ipo", beta=0.1)', ["experiment=dpo", "signal.loss=ipo", "signal.beta=0.1"],
        preference("ipo", 0.1)),
    Row('CPOTrainer(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5)',
        ["experiment=dpo", "signal.loss=simpo", "signal.beta=2.0", "signal.gamma=0.5"],
        preference("simpo", 2.0, 0.5)),
]


@pytest.fixture(scope="module")
def pairs_task(tmp_path_factory) -> list[str]:
    """Preference pairs whose chosen and rejected answers differ in length (prompts of one
    length), on a tiny chat model: the data a DPO user brings."""
    directory = tmp_path_factory.mktemp("pairs")
    model = save_chat_model(directory / "model")
    rows = [{"prompt": f"{a}+{b}=?", "reference": str(a + b), "chosen": f"It is {a + b}." if a % 2 else str(a + b),
             "rejected": str(a + b + 1) if a % 2 else f"Maybe {a + b + 1}, or so."}
            for a in range(1, 9) for b in range(1, 9)]
    for name in ("train", "val"):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"model.path={model}", "task=files", f"task.train={directory / 'train.jsonl'}",
            f"task.val={directory / 'val.jsonl'}", "task.max_response_tokens=24", "task.batch_size=4"]


@pytest.mark.parametrize("row", ROWS, ids=[r.trl.split("(")[0] + "(" + r.trl.split("(", 1)[1][:40] for r in ROWS])
def test_the_row_gives_trls_gradient(row: Row, tmp_path: Path, request) -> None:
    task = request.getfixturevalue("pairs_task") if row.overrides[0] == "experiment=dpo" else BUILT_IN_TASK
    captured = run_one_batch([*row.overrides, *task, *row.setup], tmp_path)
    model = captured.models[row.update]
    want = trl_gradient(row.loss(captured), model)
    got = captured.grads[row.update]
    assert max(w.abs().max() for w in want) > 1e-4, "the comparison is not between two zeros"
    for g, w in zip(got, want, strict=True):  # each tensor to 1e-4 of its largest entry
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-6, (g - w).abs().max()


MISMATCHED = [  # (what differs, overrides, TRL's side): each must be caught
    ("grpo's loss against dapo's overrides", ["experiment=rl", *PPO], grpo("grpo")),
    ("a batch std against a group std", ["experiment=rl", *PPO], grpo("dapo", "batch")),
    ("epsilon_high 0.5 against 0.1", ["experiment=rl", "data_source.updates_per_rollout=2",
                                      "data_source.importance.ratio=ppo_clip", "data_source.importance.eps_low=0.1",
                                      "data_source.importance.eps_high=0.1", "signal.std_eps=1e-4"],
     grpo("dapo", update=1, epsilon=0.1, epsilon_high=0.5)),
    ("the k3 term left out", ["experiment=rl", "data_source.updates_per_rollout=2", *PPO],
     grpo("dapo", update=1, beta=0.04)),
]


@pytest.mark.parametrize("case", MISMATCHED, ids=[m[0] for m in MISMATCHED])
def test_a_row_that_does_not_match_is_caught(case, tmp_path: Path) -> None:
    _, overrides, loss = case
    update = 1 if "data_source.updates_per_rollout=2" in overrides else 0
    captured = run_one_batch([*overrides, *BUILT_IN_TASK, *RL], tmp_path)
    want = trl_gradient(loss(captured), captured.models[update])
    worst = max(((g - w).abs().max() / w.abs().max()).item() for g, w in zip(captured.grads[update], want))
    assert worst > 1e-2, f"the comparison cannot tell these apart ({worst:.1e})"


def test_the_clip_acts_in_the_second_update(tmp_path: Path) -> None:
    """The clipped rows compare something only if the second update's ratios left [0.9, 1.5]
    for some tokens and not for others, and some lie between 1.1 and 1.5 (clipped by a
    symmetric 0.1, not by epsilon_high=0.5); the same batch, re-scored here."""
    row = next(r for r in ROWS if r.trl.startswith("GRPOTrainer(num_iterations=2, epsilon"))
    captured = run_one_batch([*row.overrides, *BUILT_IN_TASK, *row.setup], tmp_path)
    ids, mask = captured.batch[F.RESPONSE_IDS], captured.mask.bool()
    temperature = captured.cfg.data_source.sampling.temperature
    with torch.no_grad():
        ratio = (trl.token_logp(captured.logits(1), ids, temperature)
                 - trl.token_logp(captured.logits(0), ids, temperature)).exp()[mask]
    outside = (ratio < 0.9) | (ratio > 1.5)
    assert outside.any() and (~outside).any() and ((ratio > 1.1) & (ratio < 1.5)).any(), ratio


def test_the_page_lists_every_row() -> None:
    """Each row's TRL setting and its overrides appear on the page, as written here."""
    page = DOC.read_text()
    for row in ROWS:
        assert f"`{row.trl}`" in page, row.trl
        assert " ".join(row.overrides) in page, row.overrides
    tested = len(re.findall(r"^\| `[A-Z][A-Za-z]+Trainer\(", page, flags=re.M))
    assert tested == len(ROWS), f"the page's table has {tested} rows, the test {len(ROWS)}"
