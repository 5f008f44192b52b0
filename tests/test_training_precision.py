"""The policy trains on float32 master weights whatever its checkpoint's dtype: a bf16
checkpoint loaded with the default config gets float32 weights and float32 AdamW state,
and one step at an RL-sized learning rate (1e-6) moves them; the named bf16 option
(``model.dtype=bfloat16``) keeps bf16 weights, says what it costs, and loses that update."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lightning_unified.config import build_run
from lightning_unified.models.loading import build_policy
from tests.lightning_helpers import FAST_TASK, TINY, compose_config, tiny_datamodule

WATCHED = "model.layers.0.self_attn.q_proj.weight"  # every one of its weights gets a gradient


def save_bf16_checkpoint(directory: Path) -> str:
    """A tiny Llama saved in bf16 (as most hub checkpoints are), with its tokenizer."""
    tokenizer = tiny_datamodule().tokenizer
    build_policy(tokenizer, config=TINY, seed=0).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def one_step(checkpoint: str, out: Path, *extra: str):
    """One SFT step at lr 1e-6 through the composed config (conf/model's defaults)."""
    cfg = compose_config(["experiment=sft", f"model.path={checkpoint}", "optimizer.lr=1e-6", "scheduler=constant",
                          "scheduler.num_warmup_steps=0", "trainer.max_steps=1", "+trainer.limit_val_batches=0",
                          "save_policy=null", *FAST_TASK, *extra])
    run = build_run(cfg, out)
    before = dict(run.module.policy.named_parameters())[WATCHED].detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.trainer.fit(run.module, datamodule=run.datamodule)
    after = dict(run.module.policy.named_parameters())[WATCHED].detach()
    optimizer = run.trainer.optimizers[0]
    state_dtypes = {t.dtype for s in optimizer.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")}
    moved = (after != before).float().mean().item()  # the share of the layer's weights the step changed
    return run.module.policy, state_dtypes, moved, [str(w.message) for w in caught]


def test_a_bf16_checkpoint_trains_on_float32_master_weights(tmp_path: Path) -> None:
    checkpoint = save_bf16_checkpoint(tmp_path / "bf16")
    assert '"dtype": "bfloat16"' in (tmp_path / "bf16" / "config.json").read_text()

    policy, state, moved, said = one_step(checkpoint, tmp_path / "default")
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert state == {torch.float32}, "AdamW's moments follow the weights"
    # AdamW's first step moves every weight with a gradient by about lr = 1e-6
    assert moved > 0.99, f"float32 weights: only {moved:.1%} moved"
    assert not any("rounds back to the weight" in s for s in said)

    policy, state, moved, said = one_step(checkpoint, tmp_path / "bf16_weights", "model.dtype=bfloat16")
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16} and state == {torch.bfloat16}
    # the cost, measured: bf16 keeps 8 significant bits, so a 1e-6 step on weights of ~0.02
    # (spacing ~1e-4) rounds back; only weights within ~2.6e-4 of zero can still move
    assert moved < 0.05, f"bf16 weights: {moved:.1%} moved"
    assert any("rounds back to the weight" in s and "model.dtype" in s for s in said), said
