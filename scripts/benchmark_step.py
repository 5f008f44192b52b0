"""Benchmark the project's whole training step against a plain PyTorch loop, per quadrant.

Each method runs twice on the same model, batch and optimizer (AdamW):

- ``plain``: a hand-written loop as careful as an expert's: the decoder's hidden states,
  the output projection applied only at the positions in the loss (what TRL's
  ``logits_to_keep`` does), the method's loss (cross-entropy, forward KL to a teacher's
  logits, exact reverse KL on sampled responses, GRPO's group-normalised policy gradient),
  backward, step; under bf16 autocast when ``--precision bf16-mixed``;
- ``project``: ``UnifiedModule`` in a plain ``L.Trainer`` with that precision, its
  callbacks (sampling, teacher, rewards) included, timed between the ends of
  consecutive steps, so everything a step costs counts.

Methods: ``sft``, ``distill`` (forward KL to a teacher of the policy's shape),
``on_policy_distill`` (the student samples ``--gen`` tokens, exact reverse KL),
``grpo`` (``--groups`` prompts x ``--samples`` samples of ``--gen`` tokens) and
``cached_distill`` (forward KL from an offline top-k teacher cache written by
scripts/cache_teacher.py: no teacher forward; its baseline is the plain SFT loop).

Each cell runs in its own subprocess, so peak memory is that process's (CUDA allocator
peak, or VmHWM on CPU) above what the model and optimizer already hold. Times are medians
of ``--steps`` steps after ``--warmup``; ratios are project / plain from this run. Each cell
runs ``--repeats`` times, plain and project alternating, and the table gives the median of
the runs' medians with the spread (lowest-highest) of the runs' time ratios. Prints a
table; ``--out`` appends JSON lines.

``--log-every-n-steps 1`` makes every timed step write its logs, and so make and read every
metric of docs/metrics.md (at Lightning's default of 50 the timed steps write none);
``--no-detailed-metrics`` leaves out the entropy, the gradient norm and MFU
(``module.detailed_metrics=false``): the two runs' ratios are what those metrics cost.

``--interleave`` times the two loops in one process instead, a plain step after each
project step, and divides the two medians of that process. A machine whose speed drifts
between processes and over seconds (a shared host: this project's CPU runners move a plain
step by 20% between runs) then slows both alike, and the ratio is what it measures. It
gives no memory figures, since both loops share the process. ``--control`` adds an A/A row
per method: the plain loop against a second copy of itself, interleaved the same way. Its
ratio is what this machine makes of two identical loops (on the 2-core CPU runners, single
processes 0.97-1.04, runs of five 1.00-1.02): a project ratio inside that band is not a
measured difference.

On a CPU both variants keep freed heap memory between steps
(:mod:`lightning_unified.host_memory`, the project's default on a CPU; the plain loop does
the same, as an expert tuning a CPU loop would). ``--release-host-memory`` runs both with
glibc's defaults instead.

    python scripts/benchmark_step.py                                   # small model, CPU
    python scripts/benchmark_step.py --vocab 131072 --hidden 256       # a 131k vocabulary, CPU
    python scripts/benchmark_step.py --device cuda --precision bf16-mixed --hidden 1024 --layers 12 \\
        --vocab 151936 --batch 16 --prompt 128 --response 384 --gen 64   # the 0.5B shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from peak_memory import memory_now, reset_peak

METHODS = ("sft", "distill", "on_policy_distill", "grpo", "cached_distill")
PAD, EOS = 0, 1


def length_reward(completions: list[str], **_) -> torch.Tensor:
    """A cheap reward that varies between samples: how many distinct tokens a sample has."""
    return torch.tensor([float(len(set(c.split()))) for c in completions])


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   padding_side="left")


def build_model(args, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.prompt + max(args.response, args.gen) + 8,
                         tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    with device:  # initialised where it runs: a 0.5B model's random init on a CPU takes long
        return LlamaForCausalLM(config)


def make_batch(args, on_policy: bool) -> dict:
    """Random tokens (never PAD or EOS), every row full length: the same batch every step."""
    g = torch.Generator().manual_seed(0)
    rows = args.groups if args.method == "grpo" else args.batch
    prompt = torch.randint(2, args.vocab, (rows, args.prompt), generator=g)
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt)}
    if not on_policy:
        response = torch.randint(2, args.vocab, (rows, args.response), generator=g)
        response[:, -1] = EOS
        batch.update(response_ids=response, response_mask=torch.ones_like(response))
    return batch


def autocast(args):
    if args.precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return nullcontext()


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def start_profiler(args):
    """torch.profiler over the timed steps (``--profile``), else None."""
    if not args.profile:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


def save_profile(args, profiler) -> None:
    """The top operators by self time, as a table, and a Chrome trace (chrome://tracing)."""
    if profiler is None:
        return
    profiler.stop()
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.method}_{args.variant}"
    sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(profiler.key_averages().table(sort_by=sort, row_limit=40))
    profiler.export_chrome_trace(str(out / f"{name}.trace.json"))


# --- the plain loop ------------------------------------------------------------------


def generate(model, batch: dict, num: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses [B * num, gen] and their prompts, with the KV cache."""
    prompt = batch["prompt_ids"].repeat_interleave(num, 0)
    mask = batch["prompt_mask"].repeat_interleave(num, 0)
    model.eval()
    with torch.no_grad(), autocast(args):
        out = model.generate(input_ids=prompt, attention_mask=mask, do_sample=True, max_new_tokens=args.gen,
                             min_new_tokens=args.gen, pad_token_id=PAD, eos_token_id=EOS, top_k=0)
    model.train()
    return prompt, out[:, prompt.shape[1]:]


def response_logits(model, prompt: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Logits [B, R, V] at the positions that predict the response: the head projects only
    those hidden states, never the prompt's (a third to a half of the vocabulary work)."""
    ids = torch.cat([prompt, response], 1)
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, P + R, H]
    return model.lm_head(hidden[:, prompt.shape[1] - 1: -1])


def plain_step(args, model, teacher, optimizer, batch, tokenizer) -> None:
    if args.method in ("sft", "distill", "cached_distill"):
        prompt, response = batch["prompt_ids"], batch["response_ids"]
    elif args.method == "grpo":
        prompt, response = generate(model, batch, args.samples, args)
    else:
        prompt, response = generate(model, batch, 1, args)
    with autocast(args):
        logits = response_logits(model, prompt, response).float()
        if args.method in ("sft", "cached_distill"):
            loss = F.cross_entropy(logits.flatten(0, 1), response.flatten())
        elif args.method == "grpo":
            texts = tokenizer.batch_decode(response)
            rewards = length_reward(texts).to(logits.device).view(-1, args.samples)
            advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1, 1)
            logp = torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]
            loss = -(advantages * logp).mean()
        else:
            with torch.no_grad():
                teacher_logp = torch.log_softmax(response_logits(teacher, prompt, response).float(), -1)
            student_logp = torch.log_softmax(logits, -1)
            if args.method == "distill":  # KL(teacher || student)
                loss = F.kl_div(student_logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True,
                                reduction="batchmean")
            else:  # KL(student || teacher)
                loss = F.kl_div(teacher_logp.flatten(0, 1), student_logp.flatten(0, 1), log_target=True,
                                reduction="batchmean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_baseline(args):
    """The plain loop, set up: one timed step, ``step() -> seconds``. A cached
    distillation's baseline is plain SFT: the claim is that its step costs an SFT step."""
    args = argparse.Namespace(**{**vars(args), "method": "sft" if args.method == "cached_distill" else args.method})
    device = torch.device(args.device)
    if device.type == "cpu" and not args.release_host_memory:
        from lightning_unified.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    tokenizer = build_tokenizer(args.vocab)
    model = build_model(args, seed=0).to(device)
    teacher = build_model(args, seed=1).to(device).eval().requires_grad_(False) if "distill" in args.method \
        else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {k: v.to(device) for k, v in make_batch(args, on_policy=args.method in ("grpo", "on_policy_distill")).items()}

    def step() -> float:
        sync(args)
        start = time.perf_counter()
        plain_step(args, model, teacher, optimizer, batch, tokenizer)
        sync(args)
        return time.perf_counter() - start

    return step


def run_plain(args) -> dict:
    step = plain_baseline(args)
    times, profiler = [], None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            base, _ = memory_now(args.device)
            reset_peak(args.device)
            profiler = start_profiler(args)
        seconds = step()
        if i >= args.warmup:
            times.append(seconds)
    _, peak = memory_now(args.device)
    save_profile(args, profiler)
    return {"median_s": statistics.median(times), "peak_extra_mib": (peak - base) / 2**20}


def run_control(args) -> dict:
    """Two copies of the plain loop, a step of each in turn in one process: the interleaved
    result's shape, the second copy in the project's place."""
    first, second = plain_baseline(args), plain_baseline(args)
    times = [(first(), second()) for _ in range(args.warmup + args.steps)][args.warmup:]
    return {"median_s": statistics.median(b for _, b in times), "plain_median_s": statistics.median(a for a, _ in times)}


# --- the project ---------------------------------------------------------------------


class SameBatch(torch.utils.data.IterableDataset):
    """``batch`` ``times`` times, each time in a new dict."""

    def __init__(self, batch: dict, times: int):
        self.batch, self.times = batch, times

    def __iter__(self):
        return (dict(self.batch) for _ in range(self.times))


def run_project(args) -> dict:
    import lightning as L

    from lightning_unified.module import UnifiedModule
    from lightning_unified.specs import Dense, Importance, OffPolicy, OnPolicy, Reward, Sampling, Sparse

    tokenizer = build_tokenizer(args.vocab)
    model = build_model(args, seed=0)
    workdir = Path(tempfile.mkdtemp(prefix="lu-bench-"))
    on_policy = args.method in ("grpo", "on_policy_distill")
    batch = make_batch(args, on_policy)
    if args.method in ("distill", "on_policy_distill"):
        build_model(args, seed=1).save_pretrained(workdir / "teacher")
        signal = Dense(teacher=str(workdir / "teacher"),
                       divergence="forward_kl" if args.method == "distill" else "reverse_kl")
    elif args.method == "cached_distill":
        signal = Dense(teacher=str(workdir / "teacher"), cache=str(workdir / "cache"), top_k=args.top_k)
        write_cache(args, workdir, batch, tokenizer)
    elif args.method == "grpo":
        signal = Sparse(rewards=[Reward(length_reward)], advantage="grpo")
    else:
        signal = Sparse()
    if on_policy:
        num = args.samples if args.method == "grpo" else 1
        source = OnPolicy(sampling=Sampling(num_generations=num, max_new_tokens=args.gen),
                          importance=Importance(ratio="none"))
    else:
        source = OffPolicy()
    module = UnifiedModule(model, tokenizer, source, signal, optimizer=partial(torch.optim.AdamW, lr=1e-5),
                           max_new_tokens=args.gen, samples_every_n_steps=None, non_finite=None,
                           chunk_size=args.chunk_size, compile_loss=args.compile,
                           keep_freed_host_memory=not args.release_host_memory,
                           detailed_metrics=not args.no_detailed_metrics)

    class Data(L.LightningDataModule):
        max_new_tokens = args.gen

        def train_dataloader(self):
            # the same collated batch every step, as the plain loop steps on one batch (what
            # is timed is the step, not a collate function); example_index keys the teacher
            # cache. A new dict each step: the callbacks add their fields to it
            collated = {**batch, "example_index": torch.arange(batch["prompt_ids"].shape[0])}
            return torch.utils.data.DataLoader(SameBatch(collated, args.warmup + args.steps + 1), batch_size=None)

    plain = plain_baseline(args) if args.variant == "interleaved" else None

    class StepClock(L.Callback):
        """Marks the end of each step. Interleaved, it then runs one plain step and marks the
        next project step's start after it, so each project step is timed from the end of a
        plain step to its own end: everything Lightning and the callbacks do between steps
        still counts, the plain step does not."""

        def __init__(self):
            self.starts, self.ends, self.plain, self.base, self.peak, self.profiler = [], [], [], 0, 0, None

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            sync(args)
            self.ends.append(time.perf_counter())
            if plain is not None:
                self.plain.append(plain())
            self.starts.append(time.perf_counter())
            if len(self.ends) == args.warmup:
                self.base, _ = memory_now(args.device)
                reset_peak(args.device)
                self.profiler = start_profiler(args)

        def on_train_end(self, trainer, pl_module):
            _, self.peak = memory_now(args.device)
            save_profile(args, self.profiler)

    clock = StepClock()
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        precision=args.precision, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
                        log_every_n_steps=args.log_every_n_steps)
    trainer.fit(module, datamodule=Data())
    times = [end - start for start, end in zip(clock.starts[args.warmup - 1:], clock.ends[args.warmup:])]
    if plain is not None:  # both loops' memory in one process: no peak of its own to report
        return {"median_s": statistics.median(times), "plain_median_s": statistics.median(clock.plain[args.warmup:])}
    return {"median_s": statistics.median(times), "peak_extra_mib": (clock.peak - clock.base) / 2**20}


def write_cache(args, workdir: Path, batch: dict, tokenizer) -> None:
    """The teacher's top-k for the benchmark batch, written by scripts/cache_teacher.py's
    own function, before the timed run."""
    from lightning_unified.data.teacher_cache import write_teacher_cache

    build_model(args, seed=1).save_pretrained(workdir / "teacher")
    tokenizer.save_pretrained(workdir / "teacher")
    rows = [{k: v[i].tolist() for k, v in batch.items()} for i in range(batch["prompt_ids"].shape[0])]
    examples = [{"prompt_ids": [t for t, m in zip(r["prompt_ids"], r["prompt_mask"]) if m],
                 "response_ids": [t for t, m in zip(r["response_ids"], r["response_mask"]) if m]} for r in rows]
    write_teacher_cache(examples, teacher=str(workdir / "teacher"), tokenizer=tokenizer, out=workdir / "cache",
                        top_k=args.top_k, device=args.device, dataset_id="benchmark")


# --- the driver ----------------------------------------------------------------------


def run_cell(args, variant: str, method: str) -> dict:
    """One variant of one method in its own process: {median_s, peak_extra_mib}."""
    child = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--method", method]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(child, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{variant} {method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    """The command line (scripts/gpu_checks.py builds its cells from it too)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="sequences per off-policy step")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--response", type=int, default=64, help="response tokens (off-policy)")
    parser.add_argument("--gen", type=int, default=16, help="sampled tokens (on-policy)")
    parser.add_argument("--groups", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--samples", type=int, default=4, help="GRPO samples per prompt")
    parser.add_argument("--top-k", type=int, default=64, help="the cached teacher's top-k")
    parser.add_argument("--chunk-size", type=int, default=None, help="the loss's chunk (default: the device rule)")
    parser.add_argument("--compile", action="store_true", help="the project's loss with its chunk math compiled")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile the timed steps with torch.profiler: a table of the top operators and a "
                             "Chrome trace per cell, written to DIR (the profiler slows the steps it times: take "
                             "the figures from a run without it)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each cell; the table gives their median")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--release-host-memory", action="store_true",
                        help="CPU: both variants with glibc's default heap trimming (by default both keep freed "
                             "heap memory between steps, see lightning_unified/host_memory.py)")
    parser.add_argument("--log-every-n-steps", type=int, default=50,
                        help="the trainer's log_every_n_steps: the step's metrics are made and read on those "
                             "steps only (1: every timed step pays for them)")
    parser.add_argument("--no-detailed-metrics", action="store_true",
                        help="module.detailed_metrics=false: no entropy, gradient norm or MFU (docs/metrics.md)")
    parser.add_argument("--out", default=None, help="append one JSON line per method here")
    parser.add_argument("--interleave", action="store_true",
                        help="time both loops in one process, a plain step after each project step, so a noisy "
                             "machine slows both alike (no memory figures: both loops share the process)")
    parser.add_argument("--control", action="store_true",
                        help="with --interleave: also time the plain loop against a second copy of itself in one "
                             "process (an A/A row per method): how far apart two identical loops come out on this "
                             "machine, the noise floor under the ratios")
    parser.add_argument("--variant", choices=["plain", "project", "interleaved", "control"], help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:  # a child: one cell
        child = {"plain": run_plain, "project": run_project, "interleaved": run_project, "control": run_control}
        result = child[args.variant](args)
        print(json.dumps(result))
        return

    if args.control and not args.interleave:
        parser.error("--control compares two plain loops in one process: it needs --interleave")
    if args.profile and args.interleave:
        parser.error("--profile profiles each loop in its own process: leave out --interleave")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    shape = (f"vocab={args.vocab} hidden={args.hidden} layers={args.layers} batch={args.batch} "
             f"prompt={args.prompt} response={args.response} gen={args.gen} precision={args.precision}"
             f"{' compile' if args.compile else ''}{' release-host-memory' if args.release_host_memory else ''}"
             f"{' interleaved' if args.interleave else ''} log_every_n_steps={args.log_every_n_steps}"
             f"{' no-detailed-metrics' if args.no_detailed_metrics else ''}")
    print(f"{device_name}: {shape}; medians of {args.steps} steps, median of {args.repeats} runs; "
          f"ratios project / plain (spread: the runs' lowest-highest)")
    print(f"{'method':<19}{'plain s':>9}{'project s':>11}{'time x':>8}{'spread':>12}{'plain MiB':>11}"
          f"{'project MiB':>13}{'mem x':>7}")
    cells = [(m, v) for m in args.methods.split(",") for v in (("interleaved", "control") if args.control else (None,))]
    for method, variant in cells:
        if method not in METHODS:
            parser.error(f"--methods: unknown {method!r}; choose from {METHODS}")
        runs = {"plain": [], "project": []}
        for _ in range(args.repeats):
            if args.interleave:
                both = run_cell(args, variant or "interleaved", method)
                runs["plain"].append({"median_s": both["plain_median_s"], "peak_extra_mib": None})
                runs["project"].append({"median_s": both["median_s"], "peak_extra_mib": None})
                continue
            for side in ("plain", "project"):
                runs[side].append(run_cell(args, side, method))
        plain_s = statistics.median(r["median_s"] for r in runs["plain"])
        project_s = statistics.median(r["median_s"] for r in runs["project"])
        ratios = [b["median_s"] / a["median_s"] for a, b in zip(runs["plain"], runs["project"])]
        plain_mib = statistics.median(r["peak_extra_mib"] for r in runs["plain"]) if not args.interleave else None
        project_mib = statistics.median(r["peak_extra_mib"] for r in runs["project"]) if not args.interleave else None
        label = f"{method} (A/A)" if variant == "control" else method
        row = {"method": method, "control": variant == "control", "device": device_name, "shape": shape,
               "repeats": args.repeats,
               "plain_s": plain_s, "project_s": project_s, "time_ratio": project_s / plain_s,
               "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
               "plain_peak_mib": plain_mib, "project_peak_mib": project_mib,
               # below a MiB the process's high-water mark is noise, not a peak to divide by
               "memory_ratio": project_mib / plain_mib if plain_mib is not None and plain_mib >= 1 else None,
               "interleaved": args.interleave, "runs": runs}
        ratio = f"{row['memory_ratio']:>7.2f}" if row["memory_ratio"] is not None else f"{'n/a':>7}"
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        mib = (f"{plain_mib:>11.0f}{project_mib:>13.0f}" if plain_mib is not None else f"{'n/a':>11}{'n/a':>13}")
        print(f"{label:<19}{plain_s:>9.3f}{project_s:>11.3f}{row['time_ratio']:>8.2f}{spread:>12}{mib}{ratio}",
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
