"""Benchmark padding-free training (module.packing=true) against padded batches.

Tokens per second of the whole training step (``UnifiedModule`` in a plain ``L.Trainer``,
callbacks included, timed from the end of one step to the end of the next) for SFT and
GRPO, packed against padded, in the same run, on:

- ``longtail``: generated data whose prompt and response lengths are log-normal with
  medians of ``--prompt-median`` (60) and ``--response-median`` (200) tokens and a standard
  deviation of log-length of 0.99, so the 99th percentile is 10x the median; lengths are
  capped at 10x the median. Token ids are uniform over the vocabulary (the cost of a step
  does not depend on which tokens they are);
- ``uniform``: every prompt and response of one length (the built-in task's shape), where
  packing has nothing to remove and must not be slower.

GRPO samples ``--gen`` tokens per response from the policy (lengths vary where EOS is
sampled) for ``--groups`` prompts x ``--samples`` samples; its prompts follow the workload's
prompt lengths. Tokens counted are the sequences' real tokens (prompt + response, no
padding), the same for both variants; the padding fraction is the share of the padded
layout's positions that are padding, averaged over the timed steps.

    python scripts/benchmark_packing.py                                  # a 4-layer Llama, CPU
    python scripts/benchmark_packing.py --model data/smollm2/model --steps 3 --batch 4   # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from functools import partial

import lightning as L
import torch

from lightning_unified import OffPolicy, OnPolicy, Reward, Sampling, Sparse, UnifiedModule
from lightning_unified.models.loading import load_causal_lm, load_tokenizer
from lightning_unified.models.packing import pack

from benchmark_step import EOS, PAD, build_tokenizer  # the step benchmark's word-level tokenizer

SIGMA = math.log(10) / 2.326  # the 99th percentile of a log-normal at 10x its median


class StepTimer(L.Callback):
    """Seconds between consecutive training batch ends, and each batch's padding fraction."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.padding: list[float] = []
        self.tokens: list[int] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
            packed = pack(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"])
            self.padding.append(packed.padding_fraction)
            self.tokens.append(packed.real_tokens)
        self._last = time.perf_counter()


def lengths(rng: torch.Generator, count: int, median: int, workload: str) -> list[int]:
    if workload == "uniform":
        return [median] * count
    draws = torch.exp(torch.randn(count, generator=rng) * SIGMA) * median
    return [int(min(max(round(float(x)), 1), 10 * median)) for x in draws]


def make_batches(args, vocab: int, pad: int, eos: int, workload: str, responses: bool) -> list[dict]:
    """``--steps + --warmup + 1`` batches of ``--batch`` sequences, left-padded prompts and
    right-padded responses ending in EOS, as the collator lays them out."""
    rng = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(args.steps + args.warmup + 1):
        size = args.batch if responses else args.groups
        p_len = lengths(rng, size, args.prompt_median, workload)
        r_len = lengths(rng, size, args.response_median, workload)
        P, R = max(p_len), max(r_len)
        batch = {"prompt_ids": torch.full((size, P), pad), "prompt_mask": torch.zeros(size, P, dtype=torch.long)}
        for i, n in enumerate(p_len):
            batch["prompt_ids"][i, P - n:] = torch.randint(2, vocab, (n,), generator=rng)
            batch["prompt_mask"][i, P - n:] = 1
        if responses:
            batch["response_ids"] = torch.full((size, R), pad)
            batch["response_mask"] = torch.zeros(size, R, dtype=torch.long)
            for i, n in enumerate(r_len):
                batch["response_ids"][i, :n] = torch.randint(2, vocab, (n,), generator=rng)
                batch["response_ids"][i, n - 1] = eos
                batch["response_mask"][i, :n] = 1
        batch["references"] = [None] * size
        batches.append(batch)
    return batches


def distinct_tokens(completion_ids, completion_mask, **_) -> torch.Tensor:
    """A reward that varies between samples: the number of distinct tokens of a response."""
    return torch.tensor([float(len(set(ids[m.bool()].tolist()))) for ids, m in zip(completion_ids, completion_mask)])


def run(args, method: str, workload: str, packing: bool) -> dict:
    torch.manual_seed(args.seed)
    if args.model:
        tokenizer, policy = load_tokenizer(args.model), load_causal_lm(args.model)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = build_tokenizer(args.vocab)  # a word-level tokenizer over t2 ... t<vocab>
        heads = max(1, args.hidden // 64)
        policy = LlamaForCausalLM(LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=22 * (args.prompt_median + args.response_median), tie_word_embeddings=False,
            pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS))
    vocab = policy.get_output_embeddings().weight.shape[0]
    sft = method == "sft"
    batches = make_batches(args, min(vocab, len(tokenizer)), tokenizer.pad_token_id, tokenizer.eos_token_id,
                           workload, responses=sft)
    data_source = OffPolicy() if sft else OnPolicy(sampling=Sampling(num_generations=args.samples,
                                                                     max_new_tokens=args.gen))
    signal = Sparse() if sft else Sparse(rewards=[Reward(distinct_tokens)], advantage="grpo")
    module = UnifiedModule(policy, tokenizer, data_source, signal, optimizer=partial(torch.optim.AdamW, lr=1e-5),
                           samples_every_n_steps=None, packing=packing)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer])
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    times, tokens = timer.times[args.warmup:], timer.tokens[args.warmup:]
    return {"method": method, "workload": workload, "packing": packing,
            "step_s": statistics.median(times), "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, times)),
            "padding_fraction": statistics.mean(timer.padding[args.warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local Hugging Face directory (default: a generated Llama)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--methods", default="sft,grpo")
    parser.add_argument("--workloads", default="longtail,uniform")
    parser.add_argument("--batch", type=int, default=8, help="SFT sequences per step")
    parser.add_argument("--groups", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="GRPO samples per prompt")
    parser.add_argument("--gen", type=int, default=32, help="GRPO tokens sampled per response")
    parser.add_argument("--prompt-median", type=int, default=60)
    parser.add_argument("--response-median", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append one JSON line per cell here")
    args = parser.parse_args()
    print(f"| method | workload | padding fraction | padded tokens/s | packed tokens/s | packed / padded |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        for workload in args.workloads.split(","):
            padded = run(args, method, workload, packing=False)
            packed = run(args, method, workload, packing=True)
            speedup = packed["tokens_per_s"] / padded["tokens_per_s"]
            print(f"| {method} | {workload} | {padded['padding_fraction']:.2f} | {padded['tokens_per_s']:,.0f} | "
                  f"{packed['tokens_per_s']:,.0f} | {speedup:.2f}x |", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    for cell in (padded, packed):
                        f.write(json.dumps({**cell, "model": args.model or f"llama {args.layers}x{args.hidden}"}) + "\n")


if __name__ == "__main__":
    main()
