"""Benchmark the chunked weighted loss against a plain PyTorch loop doing the same math.

For each signal (SFT's cross-entropy, forward KL to a full teacher, reverse KL, GKD's JSD) it times a
forward + backward of the loss head, from hidden states to gradients, and measures its peak
memory, for:

- ``plain``: full logits ``hidden @ W.T`` then ``F.cross_entropy`` / ``F.kl_div``, the way a
  hand-written loop does it (the teacher's logits materialised too);
- ``chunked``: :func:`lightning_unified.losses.objective.chunked_weighted_nll`;
- ``compiled`` (with ``--compile``): the same with its per-chunk math through
  ``torch.compile`` (the compile happens in the untimed warm-up step).

Each variant runs in its own subprocess, so peak memory is the process's real high-water
mark (on CPU: VmHWM after resetting it; on CUDA: the allocator's peak), above what the
inputs already hold. Times are medians over repeats; ratios are chunked / plain from this
same run. Prints a table and writes it as JSON with ``--out``.

    python scripts/benchmark_objective.py                     # 131k vocabulary, CPU
    python scripts/benchmark_objective.py --device cuda --tokens 16384 --hidden 4096 --compile
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from peak_memory import memory_now as _memory_now, reset_peak as _reset_peak

SIGNALS = ("sft", "forward_kl", "reverse_kl", "jsd")
JSD_BETA = 0.5


def _plain_step(signal, hidden, head, targets, teacher_hidden, teacher_head):
    logits = hidden @ head.T  # [N, V]
    if signal == "sft":
        loss = F.cross_entropy(logits.float(), targets)
    else:
        with torch.no_grad():
            teacher_logp = torch.log_softmax((teacher_hidden @ teacher_head.T).float(), -1)  # [N, V]
        student_logp = torch.log_softmax(logits.float(), -1)
        if signal == "forward_kl":
            loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
        elif signal == "jsd":  # GKD's beta-JSD: beta KL(T || M) + (1 - beta) KL(S || M)
            mixture = torch.logaddexp(teacher_logp + math.log(JSD_BETA), student_logp + math.log(1 - JSD_BETA))
            loss = (JSD_BETA * F.kl_div(mixture, teacher_logp, log_target=True, reduction="batchmean")
                    + (1 - JSD_BETA) * F.kl_div(mixture, student_logp, log_target=True, reduction="batchmean"))
        else:
            loss = F.kl_div(teacher_logp, student_logp, log_target=True, reduction="batchmean")
    loss.backward()
    return loss


def _chunked_step(signal, hidden, head, targets, teacher_hidden, teacher_head, chunk_size, compile):
    from lightning_unified.losses import weight_builders
    from lightning_unified.losses.objective import TeacherLogits, chunked_weighted_nll

    scale = torch.full(targets.shape, 1.0 / targets.numel(), device=hidden.device)
    builder = {"sft": weight_builders.indicator, "forward_kl": weight_builders.forward_kl, "reverse_kl": weight_builders.reverse_kl,
               "jsd": partial(weight_builders.jsd, beta=JSD_BETA)}[signal]
    teacher = None if signal == "sft" else TeacherLogits(hidden=teacher_hidden, head_weight=teacher_head)
    out = chunked_weighted_nll(hidden, head, targets, scale, builder, teacher=teacher, chunk_size=chunk_size,
                               compile=compile)
    out.loss.backward()
    return out.objective  # the real objective (CE, KL), comparable to the plain loop's loss


def run_one(args: argparse.Namespace) -> dict:
    """One variant, one signal, in this process: median time and peak memory."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    head = (torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) / args.hidden**0.5).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    teacher_hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype)
    teacher_head = torch.randn(args.vocab, args.hidden, device=device, dtype=dtype) / args.hidden**0.5
    if args.variant == "plain":
        step = partial(_plain_step, args.signal)
    else:
        step = partial(_chunked_step, args.signal, chunk_size=args.chunk_size, compile=args.variant == "compiled")
    inputs = (hidden, head, targets, teacher_hidden, teacher_head)

    step(*inputs)  # warm-up (allocator, kernels)
    hidden.grad = head.grad = None
    base, _ = _memory_now(device)
    _reset_peak(device)
    step(*inputs)
    _, peak = _memory_now(device)
    hidden.grad = head.grad = None

    times = []
    for _ in range(args.repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(*inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        hidden.grad = head.grad = None
    return {
        "signal": args.signal,
        "variant": args.variant,
        "median_s": statistics.median(times),
        "peak_extra_mib": (peak - base) / 2**20,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the loss (batch x response length)")
    parser.add_argument("--hidden", type=int, default=128, help="width of the final hidden states")
    parser.add_argument("--vocab", type=int, default=131072, help="vocabulary size (131k as in Llama 3)")
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: auto)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant; the median is reported")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--signals", default=",".join(SIGNALS), help=f"comma-separated subset of {SIGNALS}")
    parser.add_argument("--compile", action="store_true", help="also time the loss with its chunk math compiled")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--variant", choices=["plain", "chunked", "compiled"], help=argparse.SUPPRESS)
    parser.add_argument("--signal", choices=SIGNALS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # a child process: measure one cell of the table
        print(json.dumps(run_one(args)))
        return

    variants = ("plain", "chunked", "compiled") if args.compile else ("plain", "chunked")
    rows = []
    for signal in args.signals.split(","):
        if signal not in SIGNALS:
            parser.error(f"--signals: unknown signal {signal!r}; choose from {SIGNALS}")
        cell = {}
        for variant in variants:
            child = [sys.executable, __file__, "--variant", variant, "--signal", signal] + sys.argv[1:]
            done = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _repo_root()})
            if done.returncode != 0:
                sys.exit(f"{variant} {signal} failed:\n{done.stderr}")
            cell[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        plain = cell["plain"]
        row = {"signal": signal, "plain_s": plain["median_s"], "plain_peak_mib": plain["peak_extra_mib"]}
        for variant in variants[1:]:
            ours = cell[variant]
            row.update({
                f"{variant}_s": ours["median_s"],
                f"{variant}_time_ratio": ours["median_s"] / plain["median_s"],
                f"{variant}_peak_mib": ours["peak_extra_mib"],
                f"{variant}_memory_ratio": ours["peak_extra_mib"] / max(plain["peak_extra_mib"], 1e-9),
                f"{variant}_loss_diff": abs(ours["loss"] - plain["loss"]),
            })
        rows.append(row)

    print(
        f"tokens={args.tokens} hidden={args.hidden} vocab={args.vocab} dtype={args.dtype} "
        f"device={args.device} repeats={args.repeats} (medians; ratios against plain)"
    )
    header = f"{'signal':<11}{'plain s':>10}{'plain MiB':>11}"
    for variant in variants[1:]:
        header += f"{variant + ' s':>13}{'time x':>8}{'mem x':>7}{'|dloss|':>9}"
    print(header)
    for r in rows:
        line = f"{r['signal']:<11}{r['plain_s']:>10.3f}{r['plain_peak_mib']:>11.0f}"
        for v in variants[1:]:
            line += (f"{r[v + '_s']:>13.3f}{r[v + '_time_ratio']:>8.2f}{r[v + '_memory_ratio']:>7.2f}"
                     f"{r[v + '_loss_diff']:>9.1e}")
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=2)
        print(f"results written to {args.out}")


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    main()
