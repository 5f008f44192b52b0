"""Models: loading any Hugging Face causal LM and its tokenizer (:mod:`loading`), LoRA
adapters (:mod:`lora`), and the output head that computes the loss inside its own forward
(:mod:`loss_head`)."""

from lightning_unified.models.loading import build_policy, load_causal_lm
from lightning_unified.models.forward import response_hidden

__all__ = ["build_policy", "load_causal_lm", "response_hidden"]
