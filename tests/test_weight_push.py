"""The policy's weights pushed to a real vLLM server (the CPU build, on the loopback address)
through vLLM's weight-transfer API and this package's ``lu_gloo`` backend, which the server
finds through setup.cfg's plugin entry point: after a push the server scores tokens as the
trainer does, holds the version sent, and serves a shared prompt prefix from the new
weights; the push streams in buckets; a server of another model, a version changed behind
the pusher's back, a hung and a dead server are each refused by URL. The last test kills the
module's server."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.conftest import require_vllm

require_vllm()

from lightning_unified.engines.transfer import WeightPusher, WeightPushError  # noqa: E402
from lightning_unified.engines.transfer.client import ServerClient  # noqa: E402
from lightning_unified.engines.transfer.source import PolicySource  # noqa: E402
from lightning_unified.models.loading import load_causal_lm  # noqa: E402
from tests.test_hf_engine import peak_cpu_bytes  # noqa: E402
from tests.transfer_helpers import (  # noqa: E402
    entry_points_text,
    push_server,
    save_tiny_model,
    served_prompt_logp,
    served_sample,
    trainer_logp,
)

# float32 on both ends; measured here: 1.4e-6 after a push (different kernels, same math)
LOGP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("push_server")
    model_dir = save_tiny_model(directory / "model")
    server = push_server(model_dir, directory)
    yield server
    server.stop()


def moved_policy(model_dir: str, seed: int, dtype=torch.float32):
    """The served checkpoint, every weight moved: what a few training steps make of it."""
    policy = load_causal_lm(model_dir, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return policy


def prompt(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 90, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_after_a_push_the_server_scores_as_the_trainer_and_holds_the_version(served) -> None:
    policy = moved_policy(served.model_dir, seed=1)
    pusher = WeightPusher([served.url], bucket_mb=0.05, timeout_s=60)
    try:
        pusher.start(policy)
        ids = prompt(60)
        for version in (1, 2):
            stats = pusher.push(policy, version)
            gap = (served_prompt_logp(served.url, served.model_dir, ids) - trainer_logp(policy, ids)).abs().max().item()
            assert gap < LOGP_TOLERANCE, f"version {version}: the server's log-probs are {gap} off the trainer's"
            assert ServerClient(served.url, 10).weight_version() == str(version)
            assert stats.servers == {served.url: str(version)} and stats.updated == [served.url]
            # every weight once, in float32 (the untied head included)
            assert stats.bytes == sum(p.numel() * 4 for p in policy.parameters())
            assert stats.seconds > 0
            with torch.no_grad():
                policy.model.norm.weight.mul_(1.5)
    finally:
        pusher.close()


@pytest.mark.parametrize("pause", ["wait", None])
def test_a_prompt_prefix_cached_before_a_push_is_served_from_the_new_weights(served, pause) -> None:
    """A prompt of three of the CPU backend's 128-token KV blocks is sampled (its blocks are
    cached), the weights move: the tokens sampled after the push carry the new weights'
    log-probs, whether the pusher paused the server (vLLM's ``/pause`` clears the cache
    too, a deprecated default) or the caller did (``pause=None``): without the pusher's own
    reset they were 1.7 nats off here."""
    policy = moved_policy(served.model_dir, seed=2)
    pusher = WeightPusher([served.url], timeout_s=60)
    try:
        pusher.start(policy)
        pusher.push(policy, 10)
        ids = prompt(300, seed=3)
        served_sample(served.url, served.model_dir, ids, seed=0)  # the prefix's blocks are cached now
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.mul_(1.3)
        pusher.push(policy, 11, pause=pause)
        tokens, logp = served_sample(served.url, served.model_dir, ids, seed=1)
        gap = (logp - trainer_logp(policy, ids + tokens, start=len(ids))).abs().max().item()
        assert gap < 1e-4, f"after the push the sampled tokens' log-probs are {gap} off the new weights'"
    finally:
        pusher.close()


def test_a_push_streams_in_buckets_without_a_second_copy_of_the_model(served) -> None:
    """A bf16 policy pushed to the float32 server: every tensor is cast (a copy) on its way.
    The push's peak allocation on the trainer stays within one bucket plus the largest
    tensor, the bound its stats state, far under the model's float32 bytes."""
    policy = moved_policy(served.model_dir, seed=4, dtype=torch.bfloat16)
    pusher = WeightPusher([served.url], bucket_mb=64 / 1024, timeout_s=60)
    try:
        pusher.start(policy)
        pushed = {}
        peak = peak_cpu_bytes(lambda: pushed.setdefault("stats", pusher.push(policy, 20)))
        stats = pushed["stats"]
        model_bytes = PolicySource(policy, torch.float32).total_bytes()
        assert stats.bytes == model_bytes
        largest = max(p.numel() for p in policy.parameters()) * 4
        assert stats.peak_extra_bytes <= 64 * 1024 + largest
        assert 0 < peak <= stats.peak_extra_bytes, f"peak {peak} B, bound {stats.peak_extra_bytes} B"
        assert stats.peak_extra_bytes < model_bytes / 3
    finally:
        pusher.close()


def test_a_server_reporting_another_version_is_refused_naming_both(served) -> None:
    policy = moved_policy(served.model_dir, seed=5)
    pusher = WeightPusher([served.url], timeout_s=60)
    try:
        pusher.start(policy)
        pusher.push(policy, 30)
        ServerClient(served.url, 10).set_weight_version("999")  # another trainer, behind the pusher's back
        with pytest.raises(WeightPushError, match=rf"{served.url} reports weight version '999', but this pusher last "
                                                  rf"set '30'") as refused:
            pusher.push(policy, 31)
        assert refused.value.stats.servers == {served.url: None}
        assert pusher.versions == {served.url: None}
        with pytest.raises(RuntimeError, match="no server takes weights any more"):
            pusher.push(policy, 32)
    finally:
        pusher.close()
        ServerClient(served.url, 10).resume()  # the refused server was paused


@pytest.mark.parametrize("change, difference", [
    ({"hidden_size": 128, "intermediate_size": 256}, r"hidden_size is 64, the policy's 128"),
    ({"vocab_size": 116}, r"vocab_size is 100, the policy's 116"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers is 2, the policy's 3"),
])
def test_a_server_of_another_model_is_refused_at_start(served, change, difference) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(served.model_dir)
    for key, value in change.items():
        setattr(config, key, value)
    policy = AutoModelForCausalLM.from_config(config)
    pusher = WeightPusher([served.url], timeout_s=60)
    with pytest.raises(ValueError, match=rf"{served.url} serves another model than the policy: its config's "
                                         rf"{difference}"):
        pusher.start(policy)
    pusher.close()


def test_a_server_with_a_longer_context_than_the_policys_is_refused(served) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(served.model_dir)
    config.max_position_embeddings = 256
    with pytest.raises(ValueError, match=rf"{served.url} serves max_model_len=512, beyond the policy's "
                                         r"max_position_embeddings=256"):
        WeightPusher([served.url], timeout_s=60).start(AutoModelForCausalLM.from_config(config))


def test_the_plugin_is_setup_cfgs_entry_point_and_registers_once() -> None:
    """The entry point the server found is setup.cfg's; registering again (vLLM loads plugins
    in several processes, the pusher registers too) changes nothing."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from lightning_unified.engines.transfer.plugin import register

    assert "lightning_unified = lightning_unified.engines.transfer.plugin:register" in entry_points_text()
    register()
    loaders = WeightTransferEngineFactory._registry["lu_gloo"], WeightTransferTrainerFactory._registry["lu_gloo"]
    register()
    assert (WeightTransferEngineFactory._registry["lu_gloo"], WeightTransferTrainerFactory._registry["lu_gloo"]) == loaders
    assert WeightTransferEngineFactory._registry["lu_gloo"]().__name__ == "GlooWeightTransferEngine"
    assert WeightTransferTrainerFactory._registry["lu_nccl"]().__name__ == "CheckedNCCLTrainerWeightTransferEngine"


def test_a_hung_then_a_dead_server_is_named_and_left_out(served) -> None:
    """Runs last: it stops the module's server. A hung server (stopped) fails the push within
    the pusher's timeout, by URL, and is no longer pushed to; once killed, a new pusher's
    start names it at once."""
    policy = moved_policy(served.model_dir, seed=6)
    timeout_s = 5
    pusher = WeightPusher([served.url], timeout_s=timeout_s)
    pusher.start(policy)
    pusher.push(policy, 40)
    os.killpg(served.process.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(WeightPushError, match=rf"{served.url} did not answer GET /weight_info in {timeout_s} s") as failed:
            pusher.push(policy, 41)
        assert time.monotonic() - began < 3 * timeout_s
        assert failed.value.stats.servers == {served.url: None} and failed.value.stats.updated == []
    finally:
        os.killpg(served.process.pid, signal.SIGKILL)
        served.process.wait(timeout=60)
    pusher.close()
    began = time.monotonic()
    with pytest.raises(Exception, match=rf"{served.url} did not answer GET /v1/models"):
        WeightPusher([served.url], timeout_s=timeout_s).start(policy)
    assert time.monotonic() - began < timeout_s
