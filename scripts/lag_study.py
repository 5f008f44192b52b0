"""Train the same method at several ``max_lag`` values and seeds, and compare them: held-out
accuracy against steps and against training time, the mean over seeds.

    python scripts/lag_study.py --study rl --seeds 0 1 2 --out docs/async_rl
    python scripts/lag_study.py --study opd --seeds 0 1 2 --out docs/async_opd

Each run is ``scripts/train.py`` in a process of its own, in ``--runs/<study>/<label>_seed<s>``
(a finished run is reused: delete its directory to run it again). Writes ``<out>.md`` (per
setting: the final held-out metric, mean and spread over seeds, seconds per step and the
training time) and ``<out>.png`` (two panels; needs matplotlib, the ``plots`` extra).
Training time is ``train/train_seconds`` (validation excluded).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["trainer.val_check_interval=50", "trainer.log_every_n_steps=1", "save_policy=null",
          "module.samples_every_n_steps=null", "checkpoint_every_n_steps=1000"]
STUDIES = {
    # the built-in RL task (GRPO from the task's starting checkpoint), the default truncated ratio
    "rl": {
        "metric": "val/exact_match",
        # the first 300 of the sweep's 700 steps (0.14 to about 0.25 at lag 0)
        "base": ["experiment=rl", "trainer.max_steps=300"],
        "settings": {
            "lag 0": ["data_source.sampling.max_lag=0"],
            "lag 1": ["data_source.sampling.max_lag=1"],
            "lag 2": ["data_source.sampling.max_lag=2"],
            "lag 4": ["data_source.sampling.max_lag=4"],
            "lag 4, no correction": ["data_source.sampling.max_lag=4", "data_source.importance.ratio=none"],
        },
    },
    # on-policy distillation on the built-in task (reverse KL to the task's teacher)
    "opd": {
        "metric": "val/exact_match",
        # the first 600 of the sweep's 2,500 steps
        "base": ["experiment=on_policy_distill", "trainer.max_steps=600"],
        "settings": {
            "lag 0": ["data_source.sampling.max_lag=0"],
            "lag 2": ["data_source.sampling.max_lag=2"],
        },
    },
}


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def curve(run: Path, metric: str) -> tuple[list[tuple[int, float, float]], float]:
    """[(step, training seconds, metric)] at each validation, and the median step seconds."""
    rows = read_rows(run / "metrics.csv")
    seconds = {int(r["step"]): float(r["train/train_seconds"]) for r in rows if r.get("train/train_seconds")}
    points = []
    for r in rows:
        if r.get(metric):
            step = int(r["step"])
            before = [s for s in seconds if s <= step]
            points.append((step, seconds[max(before)] if before else 0.0, float(r[metric])))
    ordered = sorted(seconds.items())
    per_step = [(b - a) / (sb - sa) for (sa, a), (sb, b) in zip(ordered, ordered[1:]) if sb > sa]
    return points, statistics.median(per_step) if per_step else float("nan")


def run_one(study: dict, label: str, seed: int, runs: Path) -> Path:
    out = runs / f"{label.replace(' ', '_').replace(',', '')}_seed{seed}"
    if (out / "done").is_file():  # written once a run has finished
        return out
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *study["base"], *study["settings"][label], *COMMON,
           f"seed={seed}", f"hydra.run.dir={out}"]
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} seed {seed} failed:\n{done.stderr[-3000:]}")
    (out / "done").write_text("")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), default="rl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="outputs/lag_study")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    study = STUDIES[args.study]
    runs = Path(args.runs) / args.study
    results = {label: [curve(run_one(study, label, seed, runs), study["metric"]) for seed in args.seeds]
               for label in study["settings"]}
    metric = study["metric"]
    lines = [f"| setting | {metric} at the end (mean ± sd over {len(args.seeds)} seeds) | each seed | "
             f"s per step (median) | training s |", "|---|---|---|---|---|"]
    for label, per_seed in results.items():
        finals = [points[-1][2] for points, _ in per_seed]
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        step_s = statistics.median(s for _, s in per_seed)
        train_s = statistics.median(points[-1][1] for points, _ in per_seed)
        lines.append(f"| {label} | {statistics.mean(finals):.3f} ± {spread:.3f} | "
                     f"{', '.join(f'{f:.3f}' for f in finals)} | {step_s:.3f} | {train_s:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is None:
        return
    Path(f"{args.out}.md").write_text(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for label, per_seed in results.items():
        steps = [p[0] for p in per_seed[0][0]]
        if not all([p[0] for p in points] == steps for points, _ in per_seed):
            continue
        mean = [statistics.mean(points[i][2] for points, _ in per_seed) for i in range(len(steps))]
        seconds = [statistics.mean(points[i][1] for points, _ in per_seed) for i in range(len(steps))]
        by_step.plot(steps, mean, marker="o", label=label)
        by_time.plot(seconds, mean, marker="o", label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (validation excluded)")
    for ax in (by_step, by_time):
        ax.set_ylabel(f"{metric} (mean over seeds)")
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle(f"{args.study}: held-out accuracy by max_lag")
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=110)


if __name__ == "__main__":
    main()
