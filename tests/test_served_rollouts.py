"""Training through real vLLM servers (``sampling.engine=server``, the CPU build on the
loopback address): the servers sample exactly the trainer's weights after every push
(``importance/mismatch_kl`` at float32's noise), every token carries the version that
sampled it, two servers share the requests, at a lag of 1 with in-flight updates the
producer's requests go on across a push, a killed server is left out while another is
alive (one that hangs, here), and the run stops naming the URL of the last one when it
dies, its last checkpoint intact. Two DDP processes with one server give the one-process
update. A server the run launches itself is stopped with it.

Two servers serve the whole module; the last two tests hang one and kill the other."""

from __future__ import annotations

import csv
import functools
import os
import re
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tests.conftest import require_vllm

require_vllm()

from lightning_unified.engines.transfer.client import ServerClient  # noqa: E402
from lightning_unified.models.loading import build_policy  # noqa: E402
from lightning_unified.module import UnifiedModule  # noqa: E402
from lightning_unified.specs import Dense, Importance, OnPolicy, Reward, Sampling, Sparse  # noqa: E402
from lightning_unified.tasks.addition import digit_match, exact_match  # noqa: E402
from tests.lightning_helpers import tiny_datamodule  # noqa: E402
from tests.test_vllm_engine import ENGINE_TINY  # noqa: E402
from tests.transfer_helpers import push_server  # noqa: E402

# float32 on both ends: the measured mismatch is 1e-13; a server a step behind is 1e-3 off
MISMATCH_BOUND = 1e-6


def policy_of(datamodule):
    return build_policy(datamodule.tokenizer, config=ENGINE_TINY, seed=0)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers of the tests' policy, started from its checkpoint (the first push gives
    them the run's own weights anyway)."""
    directory = tmp_path_factory.mktemp("served_rollouts")
    model_dir = directory / "model"
    policy_of(tiny_datamodule()).save_pretrained(model_dir)
    started = []
    try:
        for index in range(2):
            started.append(push_server(str(model_dir), directory / f"server_{index}",
                                       extra_args=("--skip-tokenizer-init",)))
        yield started
    finally:
        for server in started:
            server.stop()


def served_module(server: dict, max_lag: int = 0) -> UnifiedModule:
    datamodule = tiny_datamodule()
    spec = OnPolicy(sampling=Sampling(num_generations=2, temperature=1.0, engine="server", max_lag=max_lag,
                                      server={"timeout_s": 60, "push_timeout_s": 60, **server}),
                    importance=Importance(ratio="truncated"))
    return UnifiedModule(policy_of(datamodule), datamodule.tokenizer, spec,
                         Sparse(rewards=[Reward(exact_match), Reward(digit_match)]),
                         optimizer=functools.partial(torch.optim.SGD, lr=0.5), max_new_tokens=6)


def train(module: UnifiedModule, run_dir: Path, steps: int, callbacks=(), checkpoints: bool = False) -> list[dict]:
    """``steps`` optimizer steps; the logged rows (metrics.csv)."""
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=run_dir, logger=CSVLogger(run_dir, name="", version=""),
                        enable_checkpointing=checkpoints, callbacks=[
                            *callbacks, *([ModelCheckpoint(run_dir / "checkpoints", every_n_train_steps=1,
                                                           save_last=True)] if checkpoints else [])])
    try:
        trainer.fit(module, datamodule=tiny_datamodule())
    finally:
        module.rollouts.close()
    return metric_rows(run_dir)


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def values(rows: list[dict], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


class CountRequests(Callback):
    """Each server's requests answered by the end of training (the engine forgets its
    servers when it closes)."""

    requests: dict[str, int] = {}

    def on_train_end(self, trainer, module) -> None:
        self.requests = {server.url: server.requests for server in module.rollouts.engine.servers}


class KillAfterStep(Callback):
    """Signal a server's process group once the trainer has finished ``step`` steps: SIGKILL
    (it dies) or SIGSTOP (it hangs: its connections open, nothing answered)."""

    def __init__(self, pid: int, step: int, sent: int = signal.SIGKILL):
        self.pid, self.step, self.sent = pid, step, sent

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and self.pid is not None:
            os.killpg(self.pid, self.sent)
            self.pid = None


def test_a_launched_server_samples_the_trainers_weights_and_stops_with_the_run(tmp_path) -> None:
    """``launch=1``: the run starts its server (its log in the run directory), pushes every
    step's weights, samples exactly them, and leaves no process behind."""
    module = served_module({"launch": 1, "kv_cache_gib": 0.25})
    rows = train(module, tmp_path, steps=3)
    mismatch = values(rows, "importance/mismatch_kl")
    assert len(mismatch) == 3 and max(mismatch) <= MISMATCH_BOUND, mismatch
    assert values(rows, "sampling/lag") == [0.0, 0.0, 0.0]
    assert values(rows, "sampling/server_failures") == [0.0, 0.0, 0.0]
    model_bytes = sum(p.numel() * 4 for p in module.policy.parameters())  # ENGINE_TINY ties nothing
    assert values(rows, "sampling/sync_mb") == [model_bytes / 2**20] * 3
    log = tmp_path / "servers" / "server_0.log"
    assert log.is_file() and "weight" in log.read_text(errors="replace").lower()
    fleet_pids = [int(line.split()[0]) for line in os.popen("pgrep -f vllm.entrypoints.openai.api_server -a")
                  if str(tmp_path) in line]
    assert fleet_pids == [], f"the launched server outlived its run: {fleet_pids}"


def test_two_servers_share_the_requests_and_in_flight_updates_keep_them_going(servers, tmp_path) -> None:
    """At ``max_lag=1`` with ``update=in_flight`` the producer samples the next batch while
    the trainer pushes: every token carries the version that sampled it, the lag per token
    is at most 1, both servers answer, and each push leaves both at the step's version."""
    urls = [server.url for server in servers]
    module, counted = served_module({"urls": urls, "update": "in_flight"}, max_lag=1), CountRequests()
    rows = train(module, tmp_path, steps=4, callbacks=[counted])
    lags, lag_max = values(rows, "sampling/lag"), values(rows, "sampling/lag_max")
    assert len(lags) == 4 and all(0 <= lag <= 1 for lag in lags) and max(lag_max) == 1, (lags, lag_max)
    assert sum(lags) > 0, "from the second batch on, tokens were sampled a step before they trained"
    # the stale batches, scored by the servers once they hold the step's weights: the same weights
    mismatch = values(rows, "importance/mismatch_kl")
    assert mismatch and max(mismatch) <= MISMATCH_BOUND, mismatch
    # the last push was at the last batch's start (the weights after the last step sample nothing)
    assert [ServerClient(url, 10).weight_version() for url in urls] == ["3", "3"]
    assert sorted(counted.requests) == sorted(urls) and min(counted.requests.values()) > 0, counted.requests


def test_two_ddp_processes_with_one_launched_server_give_the_one_process_update(tmp_path) -> None:
    """DDP on 2 processes through one server that rank 0 launches: each rank sends its own
    prompts, rank 0 alone pushes, once per version, and the update is the one process's
    (the rows are identical: the most likely token only, read in order, as
    tests/test_distributed_equivalence.py compares every layout)."""
    from transformers import AutoModelForCausalLM

    from tests.test_distributed_equivalence import GREEDY, SHARED
    from tests.test_runs import read_metrics, run_script, train_in_its_layout

    rl = ["experiment=rl", "signal.advantage=reinforce", "data_source.sampling.num_generations=2", *GREEDY, *SHARED]
    train_in_its_layout([*rl, "trainer=cpu", "task.batch_size=8"], tmp_path / "one_process")
    done = run_script(*rl, "trainer=ddp", "task.batch_size=4", "data_source.sampling.engine=server",
                      "data_source.sampling.server.launch=1", "data_source.sampling.server.kv_cache_gib=0.25",
                      f"hydra.run.dir={tmp_path / 'served'}", timeout=600)
    pushes = re.findall(r"weights full push \(version (\d+)\)", done.stdout + done.stderr)
    # each version once, by rank 0 alone (version 2: the last validation's answers)
    assert pushes == ["0", "1", "2"], f"one push per version, by rank 0 alone: {pushes}"
    rows = read_metrics(tmp_path / "served" / "metrics.csv")
    validations = sum(1 for r in rows if r.get("val/exact_match"))
    log = (tmp_path / "served" / "servers" / "server_0.log").read_text(errors="replace")
    # 2 steps x 2 ranks x 4 prompts (a request each, for its 2 samples), and each validation's
    # 16 greedy answers
    assert log.count("POST /inference/v1/generate") == 2 * 2 * 4 + validations * 16
    mismatch = [float(r["importance/mismatch_kl"]) for r in rows if r.get("importance/mismatch_kl")]
    assert len(mismatch) == 2 and max(mismatch) <= MISMATCH_BOUND, mismatch
    served, alone = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "policy").state_dict()
                     for run in ("served", "one_process"))
    for key in alone:
        torch.testing.assert_close(served[key], alone[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert not [line for line in os.popen("pgrep -af vllm.entrypoints.openai.api_server") if str(tmp_path) in line]


def test_a_request_the_server_refuses_is_named_and_the_server_stays_in_use(servers) -> None:
    """A prompt longer than the served context is the row's fault, not the server's: the error
    names the server and the request, and the server is not left out (before, a refusal
    counted as a server failure, and one bad row took every server out in turn)."""
    from lightning_unified.engines.base import GenerationRequest
    from lightning_unified.engines.served import ServedEngine

    policy = policy_of(tiny_datamodule())
    engine = ServedEngine(urls=[servers[0].url], timeout_s=30, push_timeout_s=30)
    try:
        engine.start(policy)
        too_long = policy.config.max_position_embeddings + 1
        request = GenerationRequest(max_new_tokens=4, stop_token_ids=(2,), pad_token_id=0, seed=1)
        with pytest.raises(ValueError, match=re.escape(servers[0].url) + f".*{too_long} prompt tokens"):
            engine.generate(policy, torch.full((1, too_long), 5), torch.ones(1, too_long, dtype=torch.long), request)
        assert engine.server_failures == 0 and engine.servers[0].down is None
        fine = engine.generate(policy, torch.full((1, 4), 5), torch.ones(1, 4, dtype=torch.long), request)
        assert fine.response_mask.sum() > 0
    finally:
        engine.close()


def test_a_prompts_samples_go_in_one_request_and_are_the_tokens_of_one_request_per_row(servers) -> None:
    """A group's rows share a prompt: they go in one request with ``n`` samples (a request per
    prompt, not per row), and vLLM's seed of the ``i``-th sample (the request's + ``i``) is
    the row's own, so the tokens and log-probs are those of one request per row."""
    from lightning_unified.engines.base import GenerationRequest
    from lightning_unified.engines.served import ServedEngine
    from lightning_unified.engines.server_requests import GENERATE, call, generate_body, read_samples

    policy = policy_of(tiny_datamodule())
    url = servers[0].url
    engine = ServedEngine(urls=[url], timeout_s=30, push_timeout_s=30)
    try:
        engine.start(policy)
        request = GenerationRequest(max_new_tokens=6, stop_token_ids=(2,), pad_token_id=0, seed=7, temperature=1.0)
        prompts = torch.tensor([[5, 6, 7]] * 3 + [[8, 9, 10]] * 3)  # 2 prompts x 3 samples
        before = _generate_requests(servers[0].log_path)
        rollout = engine.generate(policy, prompts, torch.ones_like(prompts), request)
        assert _generate_requests(servers[0].log_path) - before == 2, "one request per prompt"
        for row, prompt in enumerate(prompts.tolist()):
            alone = read_samples(call(url, GENERATE, generate_body(prompt, request, row), timeout_s=30), url,
                                 with_logp=True, samples=1)[0]
            length = int(rollout.response_mask[row].sum())
            assert rollout.response_ids[row, :length].tolist() == alone.token_ids, f"row {row}"
            torch.testing.assert_close(rollout.logp[row, :length], torch.tensor(alone.logprobs), rtol=0, atol=1e-5)
        assert len({tuple(r) for r in rollout.response_ids[:3].tolist()}) > 1, "a prompt's samples differ"
    finally:
        engine.close()


def _generate_requests(log: Path) -> int:
    """The sampling requests the server's access log shows."""
    return log.read_text(errors="replace").count("POST /inference/v1/generate")


def test_a_self_teacher_scored_by_the_servers_is_scored_by_the_policy(servers, tmp_path) -> None:
    """On-policy self-distillation with ``teacher.engine=vllm`` through a server: the server
    holds this step's weights (pushed for the sampling), so its log-probs of the context
    prompt are the policy's forward's, and the run trains as the one scored by the policy."""
    policies = {}
    for engine in ("vllm", "hf"):
        datamodule = tiny_datamodule()
        spec = OnPolicy(sampling=Sampling(num_generations=2, temperature=1.0, engine="server",
                                          server={"urls": [servers[0].url], "timeout_s": 60}),
                        importance=Importance(ratio="none"))
        module = UnifiedModule(policy_of(datamodule), datamodule.tokenizer, spec,
                               Dense(teacher="self", teacher_context="{reference}={prompt}", engine=engine,
                                     divergence="sampled_reverse_kl"),
                               optimizer=functools.partial(torch.optim.SGD, lr=0.5), max_new_tokens=6)
        train(module, tmp_path / engine, steps=3)
        policies[engine] = module.policy
    moved = max((a - b).abs().max().item() for a, b in zip(policies["hf"].parameters(),
                                                            policy_of(tiny_datamodule()).parameters()))
    assert moved > 1e-3, "the steps moved the policy"
    for (name, a), b in zip(policies["hf"].named_parameters(), policies["vllm"].parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=f"{name}: server-scored and forward-scored differ")


def test_two_servers_one_hung_the_run_goes_on_and_counts_it(servers, tmp_path) -> None:
    """A server that stops answering (SIGSTOP) is left out after its timeout (5 s here, on
    its push or its requests), and the other takes its requests."""
    urls = [server.url for server in servers]
    module = served_module({"urls": urls, "timeout_s": 5, "push_timeout_s": 5})
    rows = train(module, tmp_path, steps=3, callbacks=[KillAfterStep(servers[1].process.pid, 1, signal.SIGSTOP)])
    assert values(rows, "sampling/server_failures")[-1] == 1.0
    assert max(values(rows, "importance/mismatch_kl")) <= MISMATCH_BOUND
    assert ServerClient(urls[0], 10).weight_version() == "2"  # pushed before the third batch's sampling


def test_the_only_server_killed_stops_the_run_naming_it_with_its_checkpoint_intact(servers, tmp_path) -> None:
    url = servers[0].url
    module = served_module({"urls": [url]})
    with pytest.raises(Exception, match=re.escape(url)):
        train(module, tmp_path, steps=4, checkpoints=True, callbacks=[KillAfterStep(servers[0].process.pid, step=2)])
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2
