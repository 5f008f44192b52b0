"""LoRA trains only its adapters and exports what peft loads; the reference model scores
exactly what a direct forward gives; the k1 penalty in the reward has the gradient of the
KL it estimates; a run with a reference logs train/kl_ref."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_unified import batch as F
from lightning_unified.stages.reference import ReferenceStage
from lightning_unified.config import train
from lightning_unified.losses import advantages as adv
from lightning_unified.losses import weight_builders
from lightning_unified.losses.objective import chunked_weighted_nll
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OffPolicy, OnPolicy, Reference, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
from tests.lightning_helpers import FAST_TASK, TINY, compose_config, quiet_trainer, save_tiny_teacher, tiny_datamodule
from tests.test_runs import read_metrics
from tests.test_teacher import full_response_logits

LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def lora_module(reference: Reference | None = None, data_source=None, signal=None) -> UnifiedModule:
    data = tiny_datamodule()
    policy = build_policy(data.tokenizer, config=TINY, seed=0, lora=LORA)
    return UnifiedModule(policy, data.tokenizer, data_source or OffPolicy(), signal or Sparse(),
                         optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), reference=reference,
                         samples_every_n_steps=None)


def test_lora_trains_only_adapters_and_exports_what_peft_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    module = lora_module()
    before = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=tiny_datamodule())
    changed = {k for k, v in module.policy.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed and all("lora_" in k for k in changed), sorted(changed)
    assert {k for k in before if "lora_" in k} == changed, "every adapter weight moved"

    # the checkpoint holds the adapters only
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), sorted(state)[:5]

    module.save_pretrained(str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    batch = next(iter(tiny_datamodule(batch_size=4).train_dataloader()))
    ids, mask = batch[F.PROMPT_IDS], batch[F.PROMPT_MASK]
    data = tiny_datamodule()
    base = build_policy(data.tokenizer, config=TINY, seed=0)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    module.policy.eval()
    with torch.no_grad():
        want = module.policy(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-4)


def test_reference_logprobs_equal_a_direct_forward(tmp_path: Path) -> None:
    path = save_tiny_teacher(tmp_path / "reference")
    module = UnifiedModule(build_policy(tiny_datamodule().tokenizer, config=TINY), tiny_datamodule().tokenizer,
                           OffPolicy(), Sparse(), reference=Reference(path=path))
    callback = ReferenceStage(module.reference)
    callback.setup(None, module, "fit")
    callback.on_fit_start(None, module)
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    callback.run(None, module, batch, 0)
    with torch.no_grad():
        logp = torch.log_softmax(full_response_logits(AutoModelForCausalLM.from_pretrained(path), batch), -1)
    want = logp.gather(-1, batch[F.RESPONSE_IDS][..., None]).squeeze(-1) * batch[F.RESPONSE_MASK]
    torch.testing.assert_close(batch[F.REFERENCE_LOGP], want)


def test_with_lora_the_reference_is_the_base_model_with_adapters_off() -> None:
    module = lora_module(reference=Reference())
    base = build_policy(tiny_datamodule().tokenizer, config=TINY, seed=0).eval()
    with torch.no_grad():  # move the adapters away from their no-op start, as training would
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    callback = ReferenceStage(module.reference)
    callback.setup(None, module, "fit")
    assert callback.model is None, "no second copy of the weights"
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    callback.run(None, module, batch, 0)
    with torch.no_grad():
        logp = torch.log_softmax(full_response_logits(base, batch), -1)
        adapted = torch.log_softmax(full_response_logits(module.policy, batch), -1)
    ids = batch[F.RESPONSE_IDS][..., None]
    want = logp.gather(-1, ids).squeeze(-1) * batch[F.RESPONSE_MASK]
    torch.testing.assert_close(batch[F.REFERENCE_LOGP], want)
    assert not torch.allclose(adapted.gather(-1, ids).squeeze(-1) * batch[F.RESPONSE_MASK], want)


def test_with_lora_a_reference_path_is_that_model_not_the_base(tmp_path: Path) -> None:
    """reference.path names the reference under LoRA too (it used to be ignored there)."""
    path = save_tiny_teacher(tmp_path / "reference")
    module = lora_module(reference=Reference(path=path))
    callback = ReferenceStage(module.reference)
    callback.setup(None, module, "fit")
    assert callback.model is not None, "the reference at reference.path is loaded"
    batch = next(iter(tiny_datamodule(batch_size=6).train_dataloader()))
    callback.run(None, module, batch, 0)
    with torch.no_grad():
        logp = torch.log_softmax(full_response_logits(AutoModelForCausalLM.from_pretrained(path).eval(), batch), -1)
    want = logp.gather(-1, batch[F.RESPONSE_IDS][..., None]).squeeze(-1) * batch[F.RESPONSE_MASK]
    torch.testing.assert_close(batch[F.REFERENCE_LOGP], want)


def test_k1_penalty_in_the_reward_has_the_gradient_of_the_kl() -> None:
    """Two-step sequences over 3 tokens, enumerated: with advantages -kl_coef * sum_t (l - l_ref)
    on every token (kl_penalized_rewards with reward 0), the weighted loss's gradient is
    exactly kl_coef * grad KL(pi || pi_ref) between sequence distributions."""
    torch.manual_seed(0)
    vocab, states, coef = 3, 4, 0.3
    table = torch.randn(vocab, states, dtype=torch.float64, requires_grad=True)
    ref_table = torch.randn(vocab, states, dtype=torch.float64)
    onehot = torch.eye(states, dtype=torch.float64)
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # [9, 2]
    hidden = torch.stack([onehot[0].expand(len(sequences), -1), onehot[1 + sequences[:, 0]]], dim=1)
    logp = torch.log_softmax(hidden @ table.T, -1).gather(-1, sequences[..., None])[..., 0]  # [9, 2]
    ref_logp = torch.log_softmax(hidden @ ref_table.T, -1).gather(-1, sequences[..., None])[..., 0]
    mask = torch.ones_like(logp)
    penalised = adv.kl_penalized_rewards(torch.zeros(9, dtype=torch.float64), logp.detach(), ref_logp, mask,
                                         kl_coef=coef)
    torch.testing.assert_close(penalised, -coef * (logp - ref_logp).detach().sum(-1))
    seq_prob = logp.sum(-1).exp().detach()
    out = chunked_weighted_nll(hidden, table, sequences, seq_prob[:, None].expand(-1, 2).contiguous(),
                               weight_builders.advantage_indicator, fields={"advantages": adv.to_tokens(penalised, mask)})
    (got,) = torch.autograd.grad(out.loss, table)
    kl = (logp.sum(-1).exp() * (logp.sum(-1) - ref_logp.sum(-1))).sum()
    (want,) = torch.autograd.grad(coef * kl, table)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_a_run_with_a_reference_logs_kl_ref(estimator: str, tmp_path: Path) -> None:
    cfg = compose_config(["experiment=rl", f"reference={estimator}", "reference.kl_coef=0.1", "trainer.max_steps=3",
                          "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "optimizer.lr=1e-2",
                          "data_source.sampling.num_generations=2", "save_policy=null", *FAST_TASK])
    train(cfg, tmp_path)
    kls = [float(r["train/kl_ref"]) for r in read_metrics(tmp_path / "metrics.csv") if r.get("train/kl_ref")]
    assert len(kls) == 3 and kls[0] == pytest.approx(0.0, abs=1e-6), "the reference is the starting policy"
    assert kls[-1] > 1e-6, "the policy moved away from it"


def test_k1_needs_sampled_rewards() -> None:
    # refused when the module is built, before any step
    with pytest.raises(ValueError, match="k1 puts the KL penalty in the reward"):
        lora_module(reference=Reference(estimator="k1"))
    rl = lora_module(Reference(estimator="k1"), OnPolicy(sampling=Sampling(num_generations=2)),
                     Sparse(rewards=[Reward(digit_match)]))
    assert any(isinstance(s, ReferenceStage) for s in rl.pipeline)


def test_a_reference_with_another_vocabulary_is_refused(tmp_path: Path) -> None:
    from tests.lightning_helpers import save_chat_model

    other = save_chat_model(tmp_path / "other")  # 100 tokens against the policy's 15
    module = UnifiedModule(build_policy(tiny_datamodule().tokenizer, config=TINY), tiny_datamodule().tokenizer,
                           OffPolicy(), Sparse(), reference=Reference(path=other))
    with pytest.raises(ValueError, match=r"reference .* has a vocabulary of 100 tokens and the policy 15"):
        ReferenceStage(module.reference).setup(None, module, "fit")


@pytest.mark.parametrize("overrides, where", [
    ([], "k3 KL x 0.05 to reference the starting policy"),
    (["reference.engine=server", "reference.url=http://127.0.0.1:8012", "reference.kl_coef=0.1"],
     "k3 KL x 0.1 to reference server http://127.0.0.1:8012"),
])
def test_the_start_line_names_the_reference(overrides: list[str], where: str, tmp_path: Path) -> None:
    from lightning_unified.config import build_run, describe_method

    cfg = compose_config(["experiment=rl", "reference=k3", *overrides, *FAST_TASK])
    assert where in describe_method(cfg, build_run(cfg, tmp_path))
