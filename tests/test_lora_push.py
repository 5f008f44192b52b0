"""A LoRA policy pushed to a real vLLM server (CPU build, runtime LoRA loading): the base
weights once at start, then the adapter alone at each push, under one adapter name. The
server's log-probs under that name are the peft policy's, a prompt prefix cached under the
previous adapter is not reused, and each adapter push is a few percent of the model's
bytes (computed for SmolLM2-135M with the smollm2_grpo preset's adapter too)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import require_vllm

require_vllm()
pytest.importorskip("peft")

from lightning_unified.engines.transfer import WeightPusher  # noqa: E402
from lightning_unified.engines.adapters import adapter_entries  # noqa: E402
from lightning_unified.engines.transfer.client import ServerClient  # noqa: E402
from lightning_unified.engines.transfer.source import PolicySource  # noqa: E402
from lightning_unified.models.loading import load_causal_lm  # noqa: E402
from lightning_unified.models.lora import add_lora  # noqa: E402
from tests.transfer_helpers import (  # noqa: E402
    push_server,
    save_tiny_model,
    served_prompt_logp,
    served_sample,
    trainer_logp,
)

RANK = 2
ADAPTER = "policy"
# float32 on both ends; measured here: 5e-7 to 2e-6 under the adapter
LOGP_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora_push_server")
    server = push_server(save_tiny_model(directory / "model"), directory, lora_rank=RANK)
    yield server
    server.stop()


def lora_policy(model_dir: str, seed: int):
    """The served checkpoint with its base moved (the server must take it at start) and a
    trained-looking adapter (peft starts lora_B at zero, a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    policy = add_lora(model, r=RANK, alpha=2 * RANK)
    train_adapter(policy, generator)
    return policy


def train_adapter(policy, generator) -> None:
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_" in name:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def test_only_the_adapter_moves_and_the_server_scores_as_the_peft_policy(served, caplog) -> None:
    policy = lora_policy(served.model_dir, seed=0)
    generator = torch.Generator().manual_seed(1)
    pusher = WeightPusher([served.url], lora=True, adapter_name=ADAPTER, timeout_s=60)
    ids = torch.randint(3, 90, (60,), generator=generator).tolist()
    try:
        with caplog.at_level(logging.INFO, logger="lightning_unified.engines.transfer.pusher"):
            base = pusher.start(policy)
            full_bytes = PolicySource(policy).total_bytes()
            assert base.kind == "base" and base.bytes == full_bytes
            for version in (1, 2):
                stats = pusher.push(policy, version)
                adapter_bytes = sum(t.numel() * 4 for _, t in adapter_entries(policy))
                assert stats.kind == "adapter" and stats.bytes == adapter_bytes
                assert stats.bytes < 0.05 * full_bytes, f"{stats.bytes} B of adapter, {full_bytes} B of model"
                assert ServerClient(served.url, 10).weight_version() == str(version)
                gap = (served_prompt_logp(served.url, ADAPTER, ids) - trainer_logp(policy, ids)).abs().max().item()
                assert gap < LOGP_TOLERANCE, f"version {version}: {gap} off the peft policy's log-probs"
                train_adapter(policy, generator)
        # the base, pushed once: the served model's own name scores without the adapter
        with policy.disable_adapter():
            gap = (served_prompt_logp(served.url, served.model_dir, ids) - trainer_logp(policy, ids)).abs().max().item()
        assert gap < LOGP_TOLERANCE
        logged = [r.getMessage() for r in caplog.records if "adapter push" in r.getMessage()]
        assert len(logged) == 2 and f"{adapter_bytes / 1e6:.2f} MB" in logged[0] and " s" in logged[0]
    finally:
        pusher.close()


def test_a_prefix_cached_under_the_previous_adapter_is_not_reused(served) -> None:
    """Each version's adapter is loaded from a directory of its own, which vLLM's prefix
    cache keys its blocks by: a 300-token prompt sampled under version 1 is scored under
    version 2's adapter after the push."""
    policy = lora_policy(served.model_dir, seed=3)
    generator = torch.Generator().manual_seed(4)
    pusher = WeightPusher([served.url], lora=True, adapter_name=ADAPTER, timeout_s=60)
    ids = torch.randint(3, 90, (300,), generator=generator).tolist()
    try:
        pusher.start(policy)
        pusher.push(policy, 1)
        served_sample(served.url, ADAPTER, ids, seed=0)
        train_adapter(policy, generator)
        pusher.push(policy, 2, pause=None)
        tokens, logp = served_sample(served.url, ADAPTER, ids, seed=1)
        gap = (logp - trainer_logp(policy, ids + tokens, start=len(ids))).abs().max().item()
        assert gap < 1e-4, f"after the adapter push the sampled tokens are {gap} off the new adapter's log-probs"
    finally:
        pusher.close()


def test_a_lora_push_needs_a_policy_whose_adapters_alone_train(served) -> None:
    plain = load_causal_lm(served.model_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"lora=True\) moves a LoRA policy's adapters, but the policy has none"):
        WeightPusher([served.url], lora=True).start(plain)
    policy = lora_policy(served.model_dir, seed=5)
    policy.base_model.model.lm_head.weight.requires_grad_(True)  # as peft's modules_to_save would
    with pytest.raises(ValueError, match=r"also trains \['base_model.model.lm_head.weight'\]"):
        WeightPusher([served.url], lora=True).start(policy)


def test_smollm2_grpos_adapter_is_under_5_percent_of_the_model() -> None:
    """SmolLM2-135M's architecture (its config's values; weights on the meta device) with the
    smollm2_grpo preset's adapter (r 16 on every linear layer but the head): an adapter push
    moves 3.6% of the bytes a full push does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    with torch.device("meta"):
        policy = add_lora(LlamaForCausalLM(config), r=16, alpha=32)
    full = PolicySource(policy).total_bytes()
    adapter = sum(t.numel() * t.element_size() for _, t in adapter_entries(policy))
    assert full == 134_515_008 * 4  # the tied head sent once
    assert adapter / full == pytest.approx(0.0363, abs=5e-4)
