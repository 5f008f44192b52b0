"""A vLLM engine's log-probs of given token ids: each response token's and the top-k at each
response position, read from the prompt positions of a request that generates one token at
most. How a frozen teacher in vLLM, and the rollout engine scoring self-distillation's
context prompt, score a batch."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_unified.engines.vllm_process import ENGINE_CALLS
from lightning_unified.teachers.scores import TeacherScores, scores_from_positions, sequences


def prompt_logprob_scores(llm, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                          top_k: int, source: str, lora_request=None) -> TeacherScores:
    """What the vLLM engine ``llm`` gives each row's prompt + response: the log-prob of every
    response token and, with ``top_k``, its top-k there (the prompt positions' log-probs of
    one request with one generated token at most). ``source`` names the engine in errors;
    ``lora_request`` the adapter it scores with (None: the engine's weights alone)."""
    from vllm import SamplingParams

    rows, prompt_lengths = sequences(prompt_ids, prompt_mask, response_ids, response_mask)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False)
    with ENGINE_CALLS, torch.inference_mode():  # one in-process engine at a time (vllm_process)
        outputs = llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False,
                               lora_request=lora_request)
    positions = [[{token: entry.logprob for token, entry in step.items()} for step in out.prompt_logprobs[start:]]
                 for out, start in zip(outputs, prompt_lengths)]
    tokens = [row[start:] for row, start in zip(rows, prompt_lengths)]
    return scores_from_positions(positions, tokens, response_ids.shape[1], top_k, source)
