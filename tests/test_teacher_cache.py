"""The offline teacher cache: written in resumable shards, read by example index, equal to
the live top-k teacher, and refused when made for another tokenizer, dataset or setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.stages.teacher import TeacherStage
from lightning_unified.data.teacher_cache import CacheMismatch, TeacherCache, shard_path, write_teacher_cache
from lightning_unified.specs import Dense, OffPolicy, OnPolicy
from tests.lightning_helpers import (
    FAST_TASK,
    chat_tokenizer,
    quiet_trainer,
    save_tiny_teacher,
    tiny_datamodule,
    tiny_module,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cached(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    datamodule = tiny_datamodule(batch_size=8)
    out = write_teacher_cache(datamodule.training_examples(), teacher=teacher, tokenizer=datamodule.tokenizer,
                              out=tmp_path / "cache", top_k=6, shard_size=20, batch_size=7)
    return teacher, datamodule, out


def test_cached_fields_equal_the_live_top_k_teacher(cached) -> None:
    teacher, datamodule, out = cached
    module = tiny_module(OffPolicy(), Dense(teacher=teacher))
    batch = next(iter(datamodule.train_dataloader()))
    assert F.EXAMPLE_INDEX in batch
    live = dict(batch)
    live_cb = TeacherStage(Dense(teacher=teacher, top_k=4))
    from lightning_unified.models.loading import load_causal_lm

    live_cb.models["teacher"] = load_causal_lm(teacher).eval()
    live_cb.run(None, module, live, 0)
    cache = TeacherCache(out)
    cache.check(tokenizer=datamodule.tokenizer, examples=datamodule.training_examples(), teacher=None, top_k=4,
                temperature=1.0)
    ids, logp = cache.rows(batch[F.EXAMPLE_INDEX], batch[F.RESPONSE_MASK], 4)
    mask = batch[F.RESPONSE_MASK].bool()
    assert torch.equal(ids[mask], live[F.TEACHER_TOPK_IDS][mask])
    torch.testing.assert_close(logp[mask], live[F.TEACHER_TOPK_LOGP][mask].float(), atol=1e-6, rtol=1e-6)


def test_training_from_the_cache_equals_training_with_the_live_teacher(cached) -> None:
    teacher, _, out = cached
    policies = []
    for signal in (Dense(teacher=teacher, top_k=6), Dense(teacher=teacher, top_k=6, cache=str(out))):
        torch.manual_seed(0)
        module = tiny_module(OffPolicy(), signal)
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
        trainer.fit(module, datamodule=tiny_datamodule(batch_size=8))
        teacher_cb = module.pipeline.stage("teacher")
        assert (not teacher_cb.models) == signal.cached, "a cached run loads no teacher"
        policies.append(module.policy.state_dict())
    for key in policies[0]:
        torch.testing.assert_close(policies[1][key], policies[0][key], atol=1e-6, rtol=1e-5)


def test_an_interrupted_write_resumes_at_the_missing_shard(cached) -> None:
    teacher, datamodule, out = cached
    shards = sorted(out.glob("shard-*.pt"))
    assert len(shards) == 4  # 64 examples in shards of 20
    before = {p.name: (p.stat().st_mtime_ns, torch.load(p, weights_only=True)) for p in shards}
    shard_path(out, 2).unlink()
    with pytest.raises(CacheMismatch, match="shard 2 of the cache is missing"):
        TeacherCache(out).check(tokenizer=datamodule.tokenizer, examples=None, teacher=None, top_k=6, temperature=1.0)
    write_teacher_cache(datamodule.training_examples(), teacher=teacher, tokenizer=datamodule.tokenizer, out=out,
                        top_k=6, shard_size=20, batch_size=5)
    for p in sorted(out.glob("shard-*.pt")):
        again = torch.load(p, weights_only=True)
        if p.name != "shard-00002.pt":
            assert p.stat().st_mtime_ns == before[p.name][0], "whole shards are kept, not rewritten"
        for key in again:
            torch.testing.assert_close(again[key], before[p.name][1][key])
    with pytest.raises(CacheMismatch, match="top_k=6, this run has top_k=8"):
        write_teacher_cache(datamodule.training_examples(), teacher=teacher, tokenizer=datamodule.tokenizer, out=out,
                            top_k=8, shard_size=20)


def test_a_cache_for_something_else_is_refused(cached, tmp_path) -> None:
    teacher, datamodule, out = cached
    examples = datamodule.training_examples()
    cache = TeacherCache(out)
    ok = dict(tokenizer=datamodule.tokenizer, examples=examples, teacher=None, top_k=6, temperature=1.0)
    cache.check(**ok)
    with pytest.raises(CacheMismatch, match="made with tokenizer="):
        cache.check(**{**ok, "tokenizer": chat_tokenizer()})
    with pytest.raises(CacheMismatch, match="made for another dataset"):
        cache.check(**{**ok, "examples": examples[:-1]})
    with pytest.raises(CacheMismatch, match="made with temperature=1.0, this run has temperature=2.0"):
        cache.check(**{**ok, "temperature": 2.0})
    with pytest.raises(CacheMismatch, match="top-6; signal.top_k=7 asks for more"):
        cache.check(**{**ok, "top_k": 7})
    with pytest.raises(CacheMismatch, match="made with teacher="):
        cache.check(**{**ok, "teacher": str(tmp_path / "another")})
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TeacherCache(tmp_path / "nowhere")


def test_a_cache_needs_forward_kl_on_data() -> None:
    with pytest.raises(ValueError, match="signal.cache holds the teacher's top-k"):
        Dense(teacher="t", cache="c", divergence="reverse_kl")
    with pytest.raises(ValueError, match="sampled responses need a live teacher"):
        tiny_module(OnPolicy(), Dense(teacher="t", cache="c")).configure_callbacks()


def test_the_script_writes_a_cache_a_run_then_reads(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "cache_teacher.py"), "experiment=distill",
                    f"+cache.out={cache}", "+cache.top_k=8", *FAST_TASK, f"hydra.run.dir={tmp_path / 'c'}"],
                   check=True, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert (cache / "manifest.json").is_file()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=distill",
                           f"signal.cache={cache}", "signal.top_k=8", "trainer.fast_dev_run=true", *FAST_TASK,
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wrong = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=distill",
                            f"signal.cache={cache}", "signal.top_k=8", "trainer.fast_dev_run=true", *FAST_TASK,
                            "task.num_train=200", f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=300)
    assert wrong.returncode != 0 and "made for another dataset" in wrong.stderr
