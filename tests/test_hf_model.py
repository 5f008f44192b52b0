"""The chunked loss on a real Hugging Face causal LM (tiny Llama, random weights, saved and
loaded from a local directory) gives the same loss and the same gradient for every
parameter as the model's own cross-entropy: the math layer fits real checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import chunked_weighted_nll


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_sft_weights_reproduce_the_models_own_loss_and_gradients(tiny_llama_dir) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (3, 12), generator=gen)
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt is not trained on
    labels[2, 9:] = -100  # a shorter response

    outputs = model(input_ids=input_ids, labels=labels)
    # HF computes its loss in float32; the same cross-entropy on its float64 logits is exact
    reference = torch.nn.functional.cross_entropy(
        outputs.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(reference.float(), outputs.loss.float(), rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(reference, list(model.parameters()))

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]  # position t predicts t + 1
    targets = labels[:, 1:]
    scale = token_scale((targets != -100).double(), "token_mean")  # float64 normaliser
    out = chunked_weighted_nll(hidden, model.lm_head.weight, targets, scale, weight_builders.indicator, chunk_size=7)
    got = torch.autograd.grad(out.loss, list(model.parameters()))

    torch.testing.assert_close(out.loss, reference)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": "all-linear"}])
def test_gradient_checkpointing_recomputes_each_layer_and_keeps_the_gradient(lora) -> None:
    """model.gradient_checkpointing: each decoder layer runs again in the backward (so its
    activations were not kept), and every trainable parameter's gradient is the same."""
    from lightning_unified.models.loading import build_policy
    from tests.lightning_helpers import TINY, tiny_datamodule

    tokenizer = tiny_datamodule().tokenizer
    input_ids = torch.randint(3, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # peft draws the adapters' initial weights from the global RNG
        model = build_policy(tokenizer, config=TINY, seed=0, lora=lora, gradient_checkpointing=checkpointing)
        model.train()
        mlp = (model.get_base_model() if lora else model).model.layers[0].mlp
        count, forward = [], mlp.forward  # (forward hooks do not fire when a checkpoint recomputes)
        mlp.forward = lambda *a, forward=forward, count=count, **k: count.append(1) or forward(*a, **k)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        calls.append(len(count))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert calls == [1, 2], calls
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
