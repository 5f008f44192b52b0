"""Self-distillation: the policy is its own teacher, shown privileged context; no second
copy of the weights, and the teacher's fields are a no-grad forward on the longer prompt."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.stages.sample import SampleStage
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.data.chat import contextual_prompt
from lightning_unified.data.collate import pad
from lightning_unified.specs import Dense, OnPolicy, Sampling
from tests.lightning_helpers import quiet_trainer, tiny_datamodule, tiny_module

TEMPLATE = "{reference}={prompt}"


def sampled_batch(module, spec):
    batch = next(iter(tiny_datamodule(batch_size=4).train_dataloader()))
    SampleStage(spec).sample_into(batch, module, max_new_tokens=5, synced=False)
    return batch


@pytest.mark.parametrize("divergence", ["reverse_kl", "sampled_reverse_kl"])
def test_teacher_fields_are_the_policy_on_the_context_prompt(divergence: str) -> None:
    spec = OnPolicy(sampling=Sampling(num_generations=2))
    signal = Dense(teacher="self", teacher_context=TEMPLATE, divergence=divergence)
    module = tiny_module(spec, signal)
    batch = sampled_batch(module, spec)
    TeacherStage(signal).run(None, module, batch, 0)
    assert module.policy.training, "the policy goes back to train mode after scoring"

    # independently: the context prompt as text, tokenized, left-padded, one plain HF forward
    texts = [f"{r}={p}" for r, p in zip(batch[F.REFERENCES], batch[F.PROMPTS])]
    ids, mask = pad([module.tokenizer(t, add_special_tokens=False).input_ids for t in texts],
                    module.tokenizer.pad_token_id, "left")
    response, response_mask = batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK]
    full_mask = torch.cat([mask, response_mask], 1)
    module.policy.eval()
    with torch.no_grad():
        logits = module.policy(input_ids=torch.cat([ids, response], 1), attention_mask=full_mask,
                               position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0)).logits
    module.policy.train()
    expected = torch.log_softmax(logits[:, ids.shape[1] - 1: -1].float(), -1)  # [B, R, V]
    valid = response_mask.bool()
    if divergence == "sampled_reverse_kl":
        got = batch[F.TEACHER_TOKEN_LOGP]
        want = expected.gather(-1, response[..., None])[..., 0]
        torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    else:
        teacher = batch[F.TEACHER]
        got = torch.log_softmax(torch.nn.functional.linear(teacher.hidden, teacher.head_weight), -1)
        torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=1e-5)
        assert teacher.head_weight.data_ptr() == module.policy.lm_head.weight.data_ptr(), "no copy of the weights"


def test_self_distillation_trains_without_a_second_model() -> None:
    """Two updates per rollout: the teacher's head is a copy taken before the first, so the
    second update's teacher is still the one that scored the batch."""
    spec = OnPolicy(sampling=Sampling(num_generations=2), updates_per_rollout=2)
    signal = Dense(teacher="self", teacher_context=TEMPLATE, divergence="reverse_kl")
    module = tiny_module(spec, signal)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=tiny_datamodule(batch_size=4))
    teacher = module.pipeline.stage("teacher")
    assert not teacher.models and not teacher.served and teacher.copy_head
    assert torch.isfinite(trainer.callback_metrics["train/objective"])
    assert float(trainer.callback_metrics["train/objective"]) > 0, "the context makes the teacher differ"
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


def test_self_teacher_needs_a_context() -> None:
    with pytest.raises(ValueError, match="signal.teacher=self .* without signal.teacher_context"):
        Dense(teacher="self")


def test_context_template_errors_name_the_column() -> None:
    with pytest.raises(ValueError, match=r"names \{answer\}, but an example has only \['prompt', 'reference'\]"):
        contextual_prompt("1+1=", "{answer} {prompt}", {"reference": "2"})
    with pytest.raises(ValueError, match=r"uses \{reference\}, which this example does not have"):
        contextual_prompt("1+1=", "{reference} {prompt}", {"reference": None})


def test_chat_context_replaces_the_last_user_message() -> None:
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    out = contextual_prompt(prompt, "{prompt} (the answer is {reference})", {"reference": "4"})
    assert out == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2? (the answer is 4)"}]
    assert prompt[1]["content"] == "2+2?", "the student's prompt is left as it was"


# --- a self-teacher that does not move with every update ------------------------------------
def _trainable(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.policy.parameters() if p.requires_grad]


@pytest.mark.parametrize("schedule", ["frozen", "ema", "refresh"])
def test_a_lagging_self_teacher_scores_with_its_own_weights(schedule: str) -> None:
    """After a few steps, the teacher's fields are those of a policy holding the snapshot's
    weights (the starting ones for frozen, the average for ema, the last refresh's), and the
    policy keeps its own weights, bit for bit."""
    spec = OnPolicy(sampling=Sampling(num_generations=2))
    signal = Dense(teacher="self", teacher_context=TEMPLATE, divergence="sampled_reverse_kl", self_teacher=schedule,
                   self_teacher_decay=0.5, self_teacher_every=2)
    module = tiny_module(spec, signal)
    module.optimizer_factory = functools.partial(torch.optim.SGD, lr=0.5)
    start, history = _trainable(module), []

    class Record(L.Callback):  # the policy's weights after each optimizer step
        def on_train_batch_end(self, trainer, pl_module, *args):
            history.append(_trainable(pl_module))

    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=tiny_datamodule(batch_size=4))
    teacher = module.pipeline.stage("teacher")
    expected = {"frozen": start, "refresh": history[1]}.get(schedule)  # refreshed after step 2 of 3
    if schedule == "ema":
        expected = start
        for weights in history:
            expected = [0.5 * e + 0.5 * w for e, w in zip(expected, weights)]
    for got, want in zip(teacher.snapshot.weights, expected):
        torch.testing.assert_close(got, want)
    assert any(not torch.equal(a, b) for a, b in zip(history[-1], expected)), "the policy moved away from its teacher"

    # the teacher's fields: the policy with the snapshot's weights, on the context prompt
    batch = sampled_batch(module, spec)
    before = _trainable(module)
    teacher.run(None, module, batch, 0)
    assert all(torch.equal(a, b) for a, b in zip(_trainable(module), before)), "the policy's weights are back"
    copy = tiny_module(spec, Dense(teacher="self", teacher_context=TEMPLATE, divergence="sampled_reverse_kl"))
    with torch.no_grad():
        for p, w in zip((p for p in copy.policy.parameters() if p.requires_grad), expected):
            p.copy_(w)
    alone = dict(batch)
    TeacherStage(copy.signal).run(None, copy, alone, 0)
    valid = batch[F.RESPONSE_MASK].bool()
    torch.testing.assert_close(batch[F.TEACHER_TOKEN_LOGP][valid], alone[F.TEACHER_TOKEN_LOGP][valid])


def test_a_lagging_self_teacher_resumes_with_its_weights(tmp_path) -> None:
    from lightning_unified.config import train
    from tests.lightning_helpers import FAST_TASK, compose_config
    from tests.test_runs import read_metrics

    run = ["experiment=self_distill", f"signal.teacher_context='{TEMPLATE}'", "signal.self_teacher=ema",
           "signal.self_teacher_decay=0.5", "optimizer.lr=0.05", "trainer.max_steps=4", "checkpoint_every_n_steps=2",
           "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "save_policy=null",
           "data_source.sampling.num_generations=2", *FAST_TASK, "task.num_val=16"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(compose_config(run), whole)
    train(compose_config([*run, "trainer.max_steps=2"]), cut)
    train(compose_config([*run, "resume=true"]), cut)

    def losses(path):
        return [(r["step"], r["train/loss"]) for r in read_metrics(path / "metrics.csv") if r.get("train/loss")]

    assert losses(cut) == losses(whole) and len(losses(whole)) == 4


def test_self_teacher_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"signal.self_teacher=frozen chooses the weights of a self-teacher"):
        Dense(teacher="/some/teacher", self_teacher="frozen")
    with pytest.raises(ValueError, match=r"signal.self_teacher must be one of"):
        Dense(teacher="self", teacher_context=TEMPLATE, self_teacher="slow")
    with pytest.raises(ValueError, match=r"signal.self_teacher_decay must be in \[0, 1\)"):
        Dense(teacher="self", teacher_context=TEMPLATE, self_teacher="ema", self_teacher_decay=1.0)
