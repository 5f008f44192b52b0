"""The teacher as a served model: a real vLLM OpenAI-compatible server (the CPU build) on
the loopback address serving the built-in task's teacher, and the same teacher as a frozen
vLLM engine in the process. Their log-probs are an HF forward's, a run through them is a
run through the HF teacher, a server that goes down stops the run by name and a resumed run
continues exactly, and a server with another vocabulary is refused at start."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unified import batch as F
from lightning_unified.config import train
from lightning_unified.models.loading import build_policy, load_causal_lm
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Dense, Importance, OnPolicy, Reference, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import checkpoint_path, digit_match
from lightning_unified.teachers.server import ServedTeacher, TeacherServerError
from tests.conftest import require_vllm
from tests.lightning_helpers import (FAST_TASK, compose_config, pairs_datamodule, quiet_trainer, save_chat_model,
                                    tiny_datamodule)
from tests.teacher_server import TeacherServer
from tests.test_runs import read_metrics

require_vllm()

TEACHER = checkpoint_path("teacher")
# float32 on both sides; measured here: at most 3e-6 between the server's log-probs and an
# HF forward of the same checkpoint (different kernels, same math)
LOGP_TOLERANCE = 1e-4
TOP_K = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = TeacherServer(TEACHER, tmp_path_factory.mktemp("server") / "server.log").start()
    yield running
    running.stop()


def student(hidden: int = 64, layers: int = 1, seed: int = 0):
    """A tiny Llama with the built-in task's vocabulary (heads of 32 and up: vLLM's CPU attention)."""
    return build_policy(tiny_datamodule().tokenizer, seed=seed, config={
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 32, "num_key_value_heads": hidden // 32, "max_position_embeddings": 64})


def data_batch(batch_size: int = 6) -> dict:
    return next(iter(tiny_datamodule(batch_size=batch_size).train_dataloader()))


def hf_logp(prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
    """[B, R, V] the teacher's log-probs at the response positions, from a full HF forward."""
    teacher = load_causal_lm(TEACHER).eval()
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    return torch.log_softmax(logits[:, prompt_ids.shape[1] - 1:-1].float(), -1)


def test_the_servers_log_probs_are_an_hf_forwards(server) -> None:
    batch = data_batch()
    datamodule = tiny_datamodule()
    teacher = ServedTeacher(server.url)
    teacher.start(student(), datamodule.tokenizer)
    scores = teacher.score(batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK],
                           TOP_K)
    mask = batch[F.RESPONSE_MASK].bool()
    expected = hf_logp(batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK])
    token = expected.gather(-1, batch[F.RESPONSE_IDS][..., None])[..., 0]
    assert (scores.token_logp[mask] - token[mask]).abs().max() < LOGP_TOLERANCE
    assert (scores.token_logp[~mask] == 0).all()
    best_logp, best_ids = expected.topk(TOP_K, dim=-1)
    assert (scores.topk_logp[mask] - best_logp[mask]).abs().max() < LOGP_TOLERANCE
    # ids agree wherever the teacher's probabilities are not tied within the tolerance
    distinct = (best_logp[..., :-1] - best_logp[..., 1:]).abs().min(-1).values > LOGP_TOLERANCE
    assert torch.equal(scores.topk_ids[mask & distinct], best_ids[mask & distinct])


def _distill(signal: Dense, steps: int = 3, sampling_engine: str = "hf", pairs: bool = False) -> UnifiedModule:
    """A few on-policy distillation steps; ``pairs``: the student reads digits two at a time,
    the built-in teacher one at a time (signal.teacher_tokenizer=auto)."""
    L.seed_everything(0)  # the same rows, the same samples
    datamodule = pairs_datamodule(batch_size=4) if pairs else tiny_datamodule(batch_size=4)
    policy = pairs_student() if pairs else student(hidden=128, layers=2)
    source = OnPolicy(sampling=Sampling(num_generations=2, temperature=1.0, engine=sampling_engine),
                      importance=Importance(ratio="none"))
    module = UnifiedModule(policy, datamodule.tokenizer, source, signal, max_new_tokens=4 if pairs else 6,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=datamodule)
    return module


@pytest.mark.parametrize("signal", [dict(divergence="sampled_reverse_kl"), dict(divergence="forward_kl", top_k=TOP_K)],
                         ids=["sampled_token", "top_k"])
def test_distillation_through_the_server_is_distillation_through_hf(server, signal: dict) -> None:
    through_hf = _distill(Dense(teacher=TEACHER, **signal))
    through_server = _distill(Dense(engine="server", url=server.url, **signal))
    assert_same_run(through_hf, through_server, student(hidden=128, layers=2), moved=1e-3, other="server")


def assert_same_run(through_hf: UnifiedModule, through_other: UnifiedModule, start, *, moved: float,
                    other: str) -> None:
    """The hf teacher's run moved the policy from ``start`` by more than ``moved``, and the
    ``other`` teacher's run ended at the same parameters."""
    change = max((a - b).abs().max().item() for a, b in zip(through_hf.policy.parameters(), start.parameters()))
    assert change > moved, "the steps moved the policy"
    for (name, a), b in zip(through_hf.policy.named_parameters(), through_other.policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name} differs between hf and {other} teachers")


def pairs_student():
    """A tiny Llama that reads digits two at a time (heads of 32: vLLM's CPU attention)."""
    return build_policy(pairs_datamodule().tokenizer, seed=0, config={
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64})


@pytest.mark.parametrize("signal", [dict(divergence="sampled_reverse_kl"), dict(divergence="uld", top_k=TOP_K)],
                         ids=["span_reverse_kl", "uld_top_k"])
@pytest.mark.parametrize("engine", ["server", "vllm"])
def test_a_served_teacher_with_another_tokenizer_is_the_hf_teachers_run(server, signal: dict, engine: str) -> None:
    across = dict(signal, teacher=TEACHER, teacher_tokenizer="auto")
    through_hf = _distill(Dense(**across), steps=2, pairs=True)
    served = dict(url=server.url) if engine == "server" else dict(vllm={"kv_cache_gib": 0.25})
    through_served = _distill(Dense(engine=engine, **served, **across), steps=2, pairs=True)
    # the steps must move the policy 10x beyond the comparison's tolerance
    assert_same_run(through_hf, through_served, pairs_student(), moved=1e-4, other=engine)


def _penalised_rl(reference: Reference | None, steps: int = 3, temperature: float = 1.0) -> UnifiedModule:
    """GRPO with a KL penalty to ``reference``: the same rows and samples in every call."""
    L.seed_everything(0)
    datamodule = tiny_datamodule(batch_size=4)
    source = OnPolicy(sampling=Sampling(num_generations=2, temperature=temperature),
                      importance=Importance(ratio="none"))
    module = UnifiedModule(student(hidden=128, layers=2), datamodule.tokenizer, source,
                           Sparse(rewards=[Reward(digit_match)], advantage="grpo"), reference=reference,
                           max_new_tokens=6, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    quiet_trainer(max_steps=steps, limit_val_batches=0).fit(module, datamodule=datamodule)
    return module


@functools.cache
def _unpenalised_rl() -> UnifiedModule:
    """The run without a reference, which both estimators' cases compare against: run once."""
    return _penalised_rl(None)


@pytest.mark.parametrize("estimator", ["k3", "k1"])
def test_a_served_reference_gives_the_hf_references_run(server, estimator: str) -> None:
    """The server serves the built-in teacher; as the reference it pulls the policy towards
    itself (kl_coef 1, so the penalty is most of the update)."""
    through_hf = _penalised_rl(Reference(path=TEACHER, estimator=estimator, kl_coef=1.0))
    through_server = _penalised_rl(Reference(engine="server", url=server.url, estimator=estimator, kl_coef=1.0))
    without = _unpenalised_rl()
    penalty = max((a - b).abs().max().item() for a, b in zip(through_hf.policy.parameters(), without.policy.parameters()))
    assert penalty > 1e-3, "the reference's penalty changed the updates"
    for (name, a), b in zip(through_hf.policy.named_parameters(), through_server.policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name} differs between hf and served references")


def test_a_served_reference_refuses_a_loss_temperature_it_cannot_score_at(server) -> None:
    with pytest.raises(ValueError, match=r"reference.engine=server returns the reference's log-probs at temperature 1, "
                                         r"but the loss's log-probs are at temperature 0.7"):
        _penalised_rl(Reference(engine="server", url=server.url), steps=1, temperature=0.7)


def test_the_in_process_vllm_teacher_scores_as_hf_does() -> None:
    batch = data_batch()
    from lightning_unified.teachers.vllm import InProcessTeacher

    teacher = InProcessTeacher(TEACHER, kv_cache_gib=0.25)
    policy, tokenizer = student(), tiny_datamodule().tokenizer
    before = torch.random.get_rng_state()
    teacher.start(policy, tokenizer)
    # vLLM seeds the global generators; the run's samples must not depend on an engine's start
    assert torch.equal(torch.random.get_rng_state(), before)
    try:
        scores = teacher.score(batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS],
                               batch[F.RESPONSE_MASK], TOP_K)
    finally:
        teacher.close()
    mask = batch[F.RESPONSE_MASK].bool()
    expected = hf_logp(batch[F.PROMPT_IDS], batch[F.PROMPT_MASK], batch[F.RESPONSE_IDS], batch[F.RESPONSE_MASK])
    assert (scores.token_logp[mask] - expected.gather(-1, batch[F.RESPONSE_IDS][..., None])[..., 0][mask]).abs().max() \
        < LOGP_TOLERANCE
    assert (scores.topk_logp[mask] - expected.topk(TOP_K, dim=-1).values[mask]).abs().max() < LOGP_TOLERANCE


def test_an_in_process_vllm_reference_scores_as_the_hf_reference_does() -> None:
    from lightning_unified.stages.reference import ReferenceStage
    from lightning_unified.specs import OffPolicy

    rows = data_batch()

    def scored(reference: Reference) -> torch.Tensor:
        module = UnifiedModule(student(), tiny_datamodule().tokenizer, OffPolicy(), Sparse(), reference=reference)
        callback = ReferenceStage(module.reference)
        callback.setup(None, module, "fit")
        try:
            batch = dict(rows)
            callback.run(None, module, batch, 0)
        finally:
            callback.teardown(None, module, "fit")
        return batch[F.REFERENCE_LOGP]

    through_vllm = scored(Reference(engine="vllm", path=TEACHER))
    through_hf = scored(Reference(path=TEACHER))
    assert (through_hf != 0).sum() > 10
    assert (through_vllm - through_hf).abs().max() < LOGP_TOLERANCE


def test_a_served_and_a_local_teacher_each_score_the_rows_their_data_names(server, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from lightning_unified.stages.teacher import TeacherStage
    from lightning_unified.specs import OffPolicy
    from lightning_unified.tasks.files import FilesDataModule

    rows = [{"prompt": f"{a:02d}+{b:02d}=", "response": f"{a + b:03d}", "teacher": "served" if a % 2 else "local"}
            for a, b in zip(range(10, 22), range(40, 52))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = FilesDataModule(train=str(tmp_path / "train.jsonl"), tokenizer=TEACHER, max_response_tokens=4,
                           batch_size=8, shuffle=False)
    batch = next(iter(data.train_dataloader()))
    local = checkpoint_path("rl_start")  # another model with the task's vocabulary

    def scored(signal: Dense) -> dict:
        module = UnifiedModule(student(), data.tokenizer, OffPolicy(), signal)
        callback = TeacherStage(signal)
        # a teacher alone scores every row, whatever the data names
        callback.setup(SimpleNamespace(datamodule=data if signal.routed else None), module, "fit")
        out = dict(batch)
        try:
            callback.run(None, module, out, 0)
        finally:
            callback.teardown(None, module, "fit")
        return out

    routed = scored(Dense(teachers={"served": {"engine": "server", "url": server.url}, "local": {"path": local}},
                          top_k=TOP_K))
    mask = batch[F.RESPONSE_MASK].bool()
    for position, alone in enumerate((Dense(engine="server", url=server.url, top_k=TOP_K),
                                      Dense(teacher=local, top_k=TOP_K))):
        expected = scored(alone)
        rows = (routed[F.TEACHER_INDEX] == position) & mask.any(-1)
        assert rows.any()
        torch.testing.assert_close(routed[F.TEACHER_TOPK_LOGP][rows][mask[rows]],
                                   expected[F.TEACHER_TOPK_LOGP][rows][mask[rows]].float())
        assert torch.equal(routed[F.TEACHER_TOPK_IDS][rows][mask[rows]], expected[F.TEACHER_TOPK_IDS][rows][mask[rows]])
    assert routed[F.TEACHER_INDEX].tolist() == [0 if a % 2 else 1 for a in range(10, 18)]


def test_a_server_with_another_vocabulary_is_refused_at_start(tmp_path: Path) -> None:
    other = TeacherServer(save_chat_model(tmp_path / "chat", num_attention_heads=2, num_key_value_heads=2),
                          tmp_path / "other.log").start()
    try:
        with pytest.raises(TeacherServerError, match=rf"teacher server {other.url} \(.*chat\) uses another "
                                                      rf"vocabulary than the policy"):
            ServedTeacher(other.url).start(student(), tiny_datamodule().tokenizer)
    finally:
        other.stop()


def test_served_teachers_refuse_what_needs_the_whole_distribution() -> None:
    for divergence in ("reverse_kl", "jsd"):
        with pytest.raises(ValueError, match=r"signal.divergence=forward_kl with signal.top_k=K .* "
                                             r"signal.divergence=sampled_reverse_kl"):
            Dense(engine="server", url="http://127.0.0.1:1", divergence=divergence)
    with pytest.raises(ValueError, match="set teacher.url"):
        Dense(engine="server", divergence="sampled_reverse_kl")


RUN = ["experiment=on_policy_distill", "signal.divergence=sampled_reverse_kl", "teacher.engine=server",
       "trainer.max_steps=6", "checkpoint_every_n_steps=2", "trainer.val_check_interval=2",
       "trainer.log_every_n_steps=1", "save_policy=null", "data_source.sampling.num_generations=2",
       "teacher.server.retries=2", "teacher.server.backoff_s=0.2", "teacher.server.timeout_s=10",
       *FAST_TASK, "task.num_val=16"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["train/loss"])) for r in read_metrics(run_dir / "metrics.csv") if r.get("train/loss")]


def test_a_server_that_goes_down_stops_the_run_by_name_and_a_resume_continues_exactly(tmp_path: Path, caplog) -> None:
    port_server = TeacherServer(TEACHER, tmp_path / "server.log").start()
    try:
        whole = tmp_path / "whole"
        train(compose_config([*RUN, f"teacher.url={port_server.url}"]), whole)
        killer = [f"callbacks=[{{_target_: tests.teacher_server.KillServerAfter, pid: {port_server.process.pid}, "
                  f"step: 3}}]"]
        broken = tmp_path / "broken"
        with caplog.at_level(logging.WARNING, logger="lightning_unified.teachers.server"), \
                pytest.raises(TeacherServerError, match=rf"teacher server {port_server.url} .* did not answer POST "
                                                        rf"/v1/completions: 3 attempts .* rerun with resume=true"):
            train(compose_config([*RUN, f"teacher.url={port_server.url}", *killer]), broken)
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert len(retries) >= 2, retries
        port_server.process = None
        port_server.start()  # the same address, back up
        train(compose_config([*RUN, f"teacher.url={port_server.url}", "resume=true"]), broken)
    finally:
        port_server.stop()
    assert _losses(broken) == _losses(whole)
    assert [s for s, _ in _losses(whole)] == list(range(6))


@pytest.mark.parametrize("options, message", [
    (dict(url="localhost:8000"), r"teacher.url must be the server's http:// or https:// address, got 'localhost:8000'"),
    (dict(url="http://127.0.0.1:1", timeout_s=0), r"teacher.server.timeout_s must be > 0, got 0"),
    (dict(url="http://127.0.0.1:1", retries=-1), r"teacher.server.retries must be >= 0, got -1"),
    (dict(url="http://127.0.0.1:1", max_in_flight=0), r"teacher.server.max_in_flight must be >= 1, got 0"),
])
def test_bad_server_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServedTeacher(**options)


def test_a_server_that_is_not_there_is_named_after_its_retries(caplog) -> None:
    from tests.teacher_server import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="lightning_unified.teachers.server"), \
            pytest.raises(TeacherServerError, match=rf"teacher server {url} did not answer GET /v1/models: 3 attempts"):
        ServedTeacher(url, retries=2, backoff_s=0.05, timeout_s=2).start(None, None)
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2


def test_an_in_process_teacher_with_another_vocabulary_is_refused_before_its_engine_starts(tmp_path: Path) -> None:
    from lightning_unified.teachers.vllm import InProcessTeacher

    other = InProcessTeacher(save_chat_model(tmp_path / "chat", num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"teacher .*chat \(teacher.engine=vllm\) has a vocabulary of \d+ tokens "
                                         r"and the policy 15"):
        other.start(student(), tiny_datamodule().tokenizer)
    assert other.llm is None


def test_a_vllm_teacher_beside_a_vllm_sampler_is_the_hf_teachers_run() -> None:
    """Two in-process engines in one training process (the student's sampler, synced every
    step, and the frozen teacher): the same updates as the hf teacher beside the sampler."""
    require_vllm()
    signal = dict(divergence="forward_kl", top_k=TOP_K)
    through_hf = _distill(Dense(teacher=TEACHER, **signal), steps=2, sampling_engine="vllm")
    through_vllm = _distill(Dense(teacher=TEACHER, engine="vllm", vllm={"kv_cache_gib": 0.25}, **signal), steps=2,
                            sampling_engine="vllm")
    start = student(hidden=128, layers=2)
    moved = max((a - b).abs().max().item() for a, b in zip(through_hf.policy.parameters(), start.parameters()))
    assert moved > 1e-3, "the steps moved the policy"
    for (name, a), b in zip(through_hf.policy.named_parameters(), through_vllm.policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name} differs between hf and vllm teachers")


@pytest.fixture(scope="module")
def tool_teacher_server(tmp_path_factory):
    """The tool task's teacher behind a real server."""
    running = TeacherServer(checkpoint_path("multiply_teacher"), tmp_path_factory.mktemp("tool_server") / "server.log")
    yield running.start()
    running.stop()


def _distill_episodes(signal: Dense) -> UnifiedModule:
    """Two steps of on-policy distillation over the tool task's episodes (the policy calls
    multiply, reads it, answers), from its start policy, with the same samples each time."""
    from lightning_unified.specs import Environment
    from lightning_unified.tasks.multiply import MultiplyDataModule, MultiplyEnvironment

    L.seed_everything(0)
    data = MultiplyDataModule(num_train=8, num_val=4, batch_size=2, shuffle=False)
    source = OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio="none"),
                      environment=Environment(cls=MultiplyEnvironment, max_turns=3, max_tokens=64))
    module = UnifiedModule(checkpoint_path("multiply_start"), data.tokenizer, source, signal,
                           optimizer=functools.partial(torch.optim.SGD, lr=0.5), samples_every_n_steps=None)
    quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=data)
    return module


@pytest.mark.parametrize("signal", [dict(divergence="sampled_reverse_kl"), dict(divergence="forward_kl", top_k=TOP_K)],
                         ids=["sampled_token", "top_k"])
@pytest.mark.parametrize("engine", ["server", "vllm"])
def test_a_served_or_vllm_teacher_over_multi_turn_episodes_is_the_hf_teachers_run(tool_teacher_server, signal: dict,
                                                                                   engine: str) -> None:
    """The teacher scores whole trajectories (the tool's turns as context) token ids in,
    log-probs out: through the server or an in-process vLLM engine, the same update as
    the teacher in the training process."""
    teacher = checkpoint_path("multiply_teacher")
    through_hf = _distill_episodes(Dense(teacher=teacher, **signal))
    other = (Dense(engine="server", url=tool_teacher_server.url, **signal) if engine == "server"
             else Dense(teacher=teacher, engine="vllm", **signal))
    through_other = _distill_episodes(other)
    start = load_causal_lm(checkpoint_path("multiply_start"))
    assert_same_run(through_hf, through_other, start, moved=1e-3, other=engine)
