"""Compare the runs of a multirun (the 2x2 sweep, say) from their metrics.csv files.

    python scripts/train.py -m data_source=off_policy,on_policy signal=sparse,dense
    python scripts/compare.py multirun/<date>/<time> --out comparison

writes ``comparison.md`` (each run's method, final held-out metric, steps, training time and
tokens trained on; then each run that failed, with the last line of its log) and
``comparison.png`` (the held-out metric against steps and against training time, one line
per finished run). Training time is ``train/train_seconds``: each step's wall
time, sampling and scoring included, validation excluded. Needs matplotlib (the ``plots``
extra; scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf


@dataclass
class Run:
    name: str
    method: str
    # (step, held-out metric) rows, in order
    held_out: list[tuple[int, float]]
    # step -> training seconds and tokens trained on, at that step
    seconds: dict[int, float]
    tokens: dict[int, float]

    def at_or_before(self, table: dict[int, float], step: int) -> float:
        earlier = [s for s in table if s <= step]
        return table[max(earlier)] if earlier else 0.0


def method_of(run_dir: Path) -> str:
    """'data_source x signal' (and the experiment, if one was named) from Hydra's record."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return run_dir.name
    choices = OmegaConf.load(hydra_file).hydra.runtime.choices
    method = f"{choices.get('data_source')} x {choices.get('signal')}"
    return f"{method} ({choices['experiment']})" if choices.get("experiment") else method


def read_run(run_dir: Path, metric: str) -> Run | None:
    path = run_dir / "metrics.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        found = sorted(k for k in rows[0] if k.startswith("val/"))
        raise SystemExit(f"{path}: no column {metric!r}; its held-out metrics are {found}")
    held_out, seconds, tokens = [], {}, {}
    previous = 0
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        step = int(row["step"])
        if step < previous:
            raise SystemExit(f"{path}, line {line}: step {step} after step {previous}: the file holds more than one "
                             f"run (a run started again in the same directory); compare runs from directories of "
                             f"their own")
        previous = step
        if row.get(metric):
            held_out.append((step, float(row[metric])))
        if row.get("train/train_seconds"):
            seconds[step] = float(row["train/train_seconds"])
        if row.get("train/tokens_seen"):
            tokens[step] = float(row["train/tokens_seen"])
    if not held_out:
        return None
    return Run(run_dir.name, method_of(run_dir), held_out, seconds, tokens)


def find_runs(sweep: Path) -> list[Path]:
    """The sweep's run directories (Hydra's record, or a metrics.csv), failed ones included."""
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "metrics.csv").is_file()))
    if not runs:
        raise SystemExit(f"{sweep}: no run directories (each holds .hydra/ or a metrics.csv)")
    return runs


# what scripts/train.py's log says last (lightning_unified.config.FINISHED / FAILED)
FINISHED, FAILED = "the run finished", "the run failed"


@dataclass
class Failure:
    name: str
    method: str
    steps: int | None  # the last step its metrics.csv holds, None without one
    last_line: str  # its log's last line, or what stands in for it


def last_log_line(run_dir: Path) -> tuple[str | None, bool]:
    """(the run's log's last line without Hydra's prefix, whether the log says it finished);
    (None, False) without a log."""
    logs = sorted(run_dir.glob("*.log"))
    if not logs:
        return None, False
    lines = [line for line in logs[0].read_text(errors="replace").splitlines() if line.strip()]
    finished = any(f"] - {FINISHED}" in line for line in lines)
    last = lines[-1].split("] - ", 1)[-1] if lines else "(its log is empty)"
    return last, finished


def failure_of(run_dir: Path, run: Run | None, metric: str) -> Failure | None:
    """Why ``run_dir``'s run did not finish, or None when it did: its log ends without the
    line a finished run writes last (a run without a log counts as finished when it has
    held-out rows)."""
    last, finished = last_log_line(run_dir)
    if last is None:
        finished = run is not None
        last = "(no log)" if run is not None or (run_dir / "metrics.csv").is_file() else "(no log, no metrics.csv)"
    if finished and run is not None:
        return None
    steps = None
    if (run_dir / "metrics.csv").is_file():
        with (run_dir / "metrics.csv").open(newline="") as f:
            steps = max((int(row["step"]) for row in csv.DictReader(f) if row.get("step")), default=None)
    if finished:  # finished, but never validated
        last = f"no {metric} rows"
    return Failure(run_dir.name, method_of(run_dir), steps, last)


def failures_table(failures: list[Failure]) -> str:
    lines = ["## Runs that did not finish", "", "| run | method | last step logged | its log's last line |",
             "|---|---|---|---|"]
    for f in failures:
        lines.append(f"| {f.name} | {f.method} | {'-' if f.steps is None else f.steps} | "
                     f"{f.last_line.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def table(runs: list[Run], metric: str) -> str:
    lines = [f"| run | method | start {metric} | final {metric} | steps | training time, s | tokens trained on |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        last_step = max([*run.seconds, run.held_out[-1][0]])
        lines.append(
            f"| {run.name} | {run.method} | {run.held_out[0][1]:.3f} | {run.held_out[-1][1]:.3f} | {last_step} | "
            f"{run.at_or_before(run.seconds, last_step):.0f} | {run.at_or_before(run.tokens, last_step):,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for run in runs:
        steps = [s for s, _ in run.held_out]
        values = [v for _, v in run.held_out]
        by_step.plot(steps, values, marker="o", markersize=3, label=run.method)
        by_time.plot([run.at_or_before(run.seconds, s) for s in steps], values, marker="o", markersize=3,
                     label=run.method)
    by_step.set_xlabel("optimizer steps")
    by_time.set_xlabel("training time, s (sampling and scoring included)")
    by_step.set_ylabel(f"held-out {metric}")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path, help="a multirun directory (its runs are subdirectories)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metric", default="val/exact_match", help="the held-out column to compare")
    args = parser.parse_args()
    if not args.sweep.is_dir():
        raise SystemExit(f"{args.sweep} is not a directory")
    runs, failures = [], []
    for path in find_runs(args.sweep):
        run = read_run(path, args.metric) if (path / "metrics.csv").is_file() else None
        failure = failure_of(path, run, args.metric)
        if failure is None:
            runs.append(run)
        else:
            failures.append(failure)
            print(f"failed: {path}: {failure.last_line}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    report = f"# {args.sweep}\n\n" + (table(runs, args.metric) if runs else "No run finished.\n")
    (args.out / "comparison.md").write_text(report + ("\n" + failures_table(failures) if failures else ""))
    if not runs:
        raise SystemExit(f"{args.sweep}: no run finished; {args.out / 'comparison.md'} lists why each stopped")
    plot(runs, args.metric, args.out / "comparison.png")
    print(f"wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}")


if __name__ == "__main__":
    main()
