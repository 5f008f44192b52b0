"""Benchmark sampling ahead of the trainer: the SmolLM2 GRPO step (``experiment=smollm2_grpo``)
at ``max_lag`` 0 against 1, on both engines, alternating in one sitting, with the process's
memory broken down.

Each cell (engine, lag, threads) runs in a subprocess of its own, ``--rounds`` times in the
order lag 0, lag 1, lag 0, lag 1, ... so drift in the machine's speed falls on both alike.
Per cell, the medians over the steps after ``--warmup``:

- ``step``: the time between the ends of consecutive training batches;
- ``sampling``: generation's own seconds (``sampling/seconds``: in the producer's thread
  at lag 1, in the step at lag 0);
- ``wait``: at lag 1, how long the step waited for the producer (``sampling/wait_seconds``),
  so ``hidden = 1 - wait / sampling`` is the share of sampling the overlap hid;
- ``train``: the step less the sampling it waited for (lag 0: less all of it).

Memory: the process's resident set (RSS) when the run is built, after the engine's start
and first rollout, after the first optimizer step, and its peak (VmHWM) at the end, with
the parts that can be counted exactly: the policy's weights, the optimizer's state, the
engine's copy of the weights (hf at lag >= 1; vLLM: its model's parameters), vLLM's KV
cache as configured, and the freed memory glibc holds in its heap after the first step
(the allocator's slack: ``module.keep_freed_host_memory`` keeps it on purpose). ``--split`` adds cells with the cores split: the trainer on
``--trainer-threads`` and the producer on ``--producer-threads`` torch threads.

    python scripts/benchmark_lag.py --model data/smollm2/model --data data/smollm2
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
MIB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def heap_free_held() -> int:
    """Bytes glibc holds freed in its heap (mallinfo2's fordblks): the allocator's slack."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return -1


def engine_weight_bytes(engine) -> int:
    """The rollout engine's own copy of the weights, where it holds one."""
    model = getattr(engine, "model", None)
    if model is not None:  # hf with weights of its own
        return tensor_bytes(model.state_dict().values())
    llm = getattr(engine, "llm", None)
    if llm is not None:  # vLLM in this process: its model runner's parameters
        try:
            executor = llm.llm_engine.model_executor
            worker = executor.driver_worker.worker
            return tensor_bytes(worker.model_runner.model.state_dict().values())
        except AttributeError:
            return -1
    return 0


def cell(args) -> dict:
    import lightning as L
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from peak_memory import process_memory
    from step_clock import fit_and_time_steps

    from lightning_unified.config import build_run
    from tests.lightning_helpers import compose_config

    if args.trainer_threads:
        torch.set_num_threads(args.trainer_threads)
    overrides = ["experiment=smollm2_grpo", f"model.path={args.model}", f"task.train={Path(args.data) / 'train.jsonl'}",
                 f"task.val={Path(args.data) / 'val.jsonl'}", f"task.max_response_tokens={args.gen}",
                 f"trainer.max_steps={args.warmup + args.steps + 1}", "+trainer.limit_val_batches=0",
                 "+trainer.enable_progress_bar=false", "save_policy=null", "module.samples_every_n_steps=null",
                 "trainer.log_every_n_steps=1", f"data_source.sampling.engine={args.engine}",
                 f"data_source.sampling.max_lag={args.lag}",
                 f"data_source.sampling.producer_threads={args.producer_threads or 'null'}"]
    overrides += args.extra
    if args.engine == "vllm":
        overrides.append(f"data_source.sampling.vllm.kv_cache_gib={args.kv_cache_gib}")
    run = build_run(compose_config(overrides), Path(args.scratch) / f"{args.engine}_lag{args.lag}")
    memory = {"built": process_memory()[0]}
    per_step: list[dict] = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            per_step.append({k: float(metrics[k]) for k in ("sampling/seconds", "sampling/wait_seconds")
                             if k in metrics})
            if batch_idx == 0:
                memory["first_step"] = process_memory()[0]
                memory["heap_free_after_first_step"] = heap_free_held()
                memory["optimizer_state"] = tensor_bytes(
                    t for state in trainer.optimizers[0].state.values() for t in state.values()
                    if isinstance(t, torch.Tensor))

        def on_before_backward(self, trainer, pl_module, loss):
            if "sampled" not in memory:
                memory["sampled"] = process_memory()[0]  # the engine started, the first batch sampled

    run.trainer.callbacks.append(Probe())
    steps = fit_and_time_steps(run, args.warmup)
    module = run.module
    memory["peak"] = process_memory()[1]
    memory["weights"] = tensor_bytes(module.policy.state_dict().values())
    memory["trainable"] = tensor_bytes(p for p in module.policy.parameters() if p.requires_grad)
    memory["engine_weights"] = engine_weight_bytes(module.rollouts.engine)
    memory["kv_cache"] = int(args.kv_cache_gib * 2**30) if args.engine == "vllm" else 0
    kept = per_step[args.warmup:]
    sampling = statistics.median(s.get("sampling/seconds", 0.0) for s in kept)
    wait = statistics.median(s.get("sampling/wait_seconds", s.get("sampling/seconds", 0.0)) for s in kept)
    step = statistics.median(steps)
    return {"engine": args.engine, "lag": args.lag, "trainer_threads": args.trainer_threads or torch.get_num_threads(),
            "producer_threads": args.producer_threads, "step": step, "sampling": sampling, "wait": wait,
            "train": step - (wait if args.lag else sampling), "steps": steps,
            "memory_mib": {k: round(v / MIB, 1) for k, v in memory.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/smollm2/model")
    parser.add_argument("--data", default="data/smollm2")
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default="vllm,hf")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--split", action="store_true", help="add lag-1 cells with the cores split")
    parser.add_argument("--trainer-threads", type=int, default=None)
    parser.add_argument("--producer-threads", type=int, default=None)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every cell, e.g. "
                        "model.gradient_checkpointing=true")
    parser.add_argument("--scratch", default="outputs/benchmark_lag")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cell", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lag", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(cell(args)), flush=True)
        return
    plan = []
    for engine in args.engines.split(","):
        for _ in range(args.rounds):
            plan += [(engine, 0, None, None), (engine, 1, None, None)]
            if args.split:
                plan.append((engine, 1, 1, 1))
    results = []
    for engine, lag, trainer_threads, producer_threads in plan:
        cmd = [sys.executable, __file__, "--model", args.model, "--data", args.data, "--gen", str(args.gen),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--kv-cache-gib", str(args.kv_cache_gib),
               "--scratch", args.scratch, "--cell", "--engine", engine, "--lag", str(lag), "--extra", *args.extra]
        if trainer_threads:
            cmd += ["--trainer-threads", str(trainer_threads), "--producer-threads", str(producer_threads)]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{engine} lag {lag} failed:\n{done.stderr[-4000:]}")
        results.append({**json.loads(line[len("RESULT "):]), "cell_seconds": time.perf_counter() - started})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{'engine':<6} {'lag':>3} {'threads':>8} {'step s':>7} {'sampling s':>10} {'wait s':>7} {'train s':>8} "
          f"{'hidden':>7} {'vs lag 0':>8} {'peak MiB':>9}")
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["engine"], r["lag"], r["trainer_threads"], r["producer_threads"]), []).append(r)
    for (engine, lag, tt, pt), rs in groups.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("step", "sampling", "wait", "train")}
        base = statistics.median(r["step"] for r in groups[next(k for k in groups if k[0] == engine and k[1] == 0)])
        hidden = 1 - med["wait"] / med["sampling"] if lag and med["sampling"] else 0.0
        peak = statistics.median(r["memory_mib"]["peak"] for r in rs)
        threads = f"{tt}/{pt or tt}" if lag else f"{tt}"
        print(f"{engine:<6} {lag:>3} {threads:>8} {med['step']:>7.2f} {med['sampling']:>10.2f} {med['wait']:>7.2f} "
              f"{med['train']:>8.2f} {hidden:>7.0%} {med['step'] / base:>7.2f}x {peak:>9.0f}")
    print("\nmemory (MiB, first round's cells):")
    for (engine, lag, tt, pt), rs in groups.items():
        print(f"  {engine} lag {lag} threads {tt}/{pt}: {rs[0]['memory_mib']}")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "args": {k: v for k, v in vars(args).items() if k not in ("cell", "engine", "lag")}})
                        + "\n")


if __name__ == "__main__":
    main()
