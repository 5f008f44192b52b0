"""A reward model: a local ``AutoModelForSequenceClassification`` scoring prompt + completion.

Loaded once, on first use (so a config that names it pickles cheaply into spawned
workers), frozen, and run in batches without a gradient. Its tokenizer is its own: the
text is re-tokenized, so the policy and the reward model need not share a vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.specs.model import ModelRef


class RewardModel:
    """``RewardModel(path)(completions=..., prompts=...) -> [B]``: the model's score (the
    logit of its single label, or of ``label`` when it has several) for each prompt +
    completion. ``device``: where it runs (``auto``: the first GPU if any, else CPU)."""

    __name__ = "reward_model"

    def __init__(self, path: str, *, batch_size: int = 16, max_length: int = 1024, label: int = 0,
                 device: str = "auto", trust_remote_code: bool = False, dtype: str | None = None,
                 attn_implementation: str | None = None):
        if batch_size < 1:
            raise ValueError(f"RewardModel.batch_size must be >= 1, got {batch_size}")
        # the model named as every model of a run is (a policy, a teacher, a reference)
        self.model = ModelRef.of(path, {"dtype": dtype, "attn_implementation": attn_implementation,
                                        "trust_remote_code": trust_remote_code}, "RewardModel")
        self.path, self.batch_size, self.max_length, self.label = path, batch_size, max_length, label
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._model = self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None, "_tokenizer": None}  # workers load their own

    def _load(self) -> None:
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lightning_unified.models.loading import DTYPES

        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"reward model: no Hugging Face checkpoint at {self.path} (config.json is missing)")
        ref = self.model
        self._tokenizer = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=ref.trust_remote_code)
        if self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        loading = {"trust_remote_code": ref.trust_remote_code}
        if ref.dtype is not None:
            loading["dtype"] = DTYPES[ref.dtype]
        if ref.attn_implementation is not None:
            loading["attn_implementation"] = ref.attn_implementation
        model = AutoModelForSequenceClassification.from_pretrained(ref.path, **loading)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self._tokenizer.pad_token_id
        if not 0 <= self.label < model.config.num_labels:
            raise ValueError(f"reward model {self.path}: label {self.label} but it has {model.config.num_labels}")
        self._model = model.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def __call__(self, completions: list[str], prompts: list[str] | None = None, **_) -> Tensor:
        if self._model is None:
            self._load()
        prompts = prompts if prompts is not None else [""] * len(completions)
        texts = [p + c for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self._tokenizer(texts[start:start + self.batch_size], padding=True, truncation=False,
                                      return_tensors="pt")
            longest = encoded.input_ids.shape[1]
            if longest > self.max_length:
                raise ValueError(f"reward model {self.path}: a prompt + completion has {longest} tokens, over its "
                                 f"max_length={self.max_length}")
            logits = self._model(**encoded.to(self.device)).logits  # [b, labels]
            scores.append(logits[:, self.label].float().cpu())
        return torch.cat(scores)
