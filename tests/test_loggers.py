"""logger=wandb and logger=mlflow on tiny runs, read back through each tool's own reader:
W&B's `wandb leet inspect --json` on the offline run's .wandb file, MLflow's client on the run's
own SQLite store. Each holds the composed config and every metric of metrics.csv, at the same
steps with the same values (so metrics added later are covered too), and the sampled
completions of samples.jsonl as a table. Nothing reaches the network: W&B runs offline,
MLflow tracks to a file, and neither reports telemetry or errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_unified.config import train
from lightning_unified.loggers import flat_config
from tests.lightning_helpers import FAST_TASK, compose_config
from tests.test_runs import read_metrics

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

# two optimizer steps, each logged, validated at 0 and 2 (SFT) with a sample log at every step
SHORT_RUN = [*FAST_TASK, "task.num_val=8", "trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.log_every_n_steps=1", "module.samples_every_n_steps=1", "save_policy=null"]


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> None:
    """W&B offline, its home and caches in the test's directory, no machine probing (it only
    costs time here); MLflow with no tracking URI of the environment and no telemetry."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                       "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off", "WANDB__DISABLE_META": "true",
                       "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_MACHINE_INFO": "true",
                       "WANDB__SAVE_REQUIREMENTS": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "DO_NOT_TRACK": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb_home"))
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


def csv_points(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every metric of metrics.csv: {name: {step: value}}."""
    points: dict[str, dict[int, float]] = {}
    for row in read_metrics(run_dir / "metrics.csv"):
        for name, value in row.items():
            if name != "step" and value != "":
                points.setdefault(name, {})[int(row["step"])] = float(value)
    return points


def samples(run_dir: Path, split: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [(r["prompt"], r["completion"]) for r in rows if r["split"] == split]


def assert_same_points(logged: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], tool: str) -> None:
    missing = sorted(set(expected) - set(logged))
    assert not missing, f"{tool} lacks metrics of metrics.csv: {missing}"
    for name, points in expected.items():
        for step, value in points.items():
            assert step in logged[name], f"{tool}: {name} at step {step} is missing"
            assert math.isclose(logged[name][step], value, rel_tol=1e-6, abs_tol=1e-9), (name, step)


def test_wandb_offline_run_holds_the_config_every_metric_and_the_samples(offline, tmp_path: Path) -> None:
    cfg = compose_config(["experiment=sft", *SHORT_RUN, "logger=wandb"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    [wandb_run] = (run_dir / "wandb").glob("offline-run-*")  # the run's files stay in its directory
    # W&B's own reader of the run's transaction log (the .wandb file), one JSON line per record
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    config, logged, tables = {}, {}, []
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
        elif record["type"] == "history":
            item = record["history"]["item"]
            for name, value in item.items():
                if isinstance(value, (int, float)) and not name.startswith("_"):
                    logged.setdefault(name, {})[int(item["trainer/global_step"])] = float(value)
            tables += [item[key + ".path"] for key in ("samples/train", "samples/val") if key + ".path" in item]
    # the composed config, flattened as a Hydra override names it
    expected = flat_config(cfg)
    assert {k: config.get(k) for k in expected} == expected
    assert config["data_source._target_"] == "lightning_unified.specs.OffPolicy" and config["task.batch_size"] == 8
    assert_same_points(logged, csv_points(run_dir), "W&B")
    # every validation's greedy completions as a W&B table, the rows samples.jsonl has
    rows = []
    for path in tables:
        table = json.loads((wandb_run / "files" / path).read_text())
        rows += [tuple(row[table["columns"].index(c)] for c in ("prompt", "completion")) for row in table["data"]]
    assert rows and rows == samples(run_dir, "val")
    # the run was ended, not left for the process's exit (a sweep's next run would log into it)
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


def test_mlflow_run_on_a_local_store_holds_the_config_every_metric_and_the_samples(offline, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    # RL: sampled batches give the training sample table, validations the held-out one
    cfg = compose_config(["experiment=rl", *SHORT_RUN, "task.batch_size=4", "data_source.sampling.num_generations=2",
                          "logger=mlflow", "logger.run_name=tiny_rl"])
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"  # the run's own store, under its directory
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lightning_unified")
    [found] = client.search_runs([experiment.experiment_id])
    run = client.get_run(found.info.run_id)
    assert run.info.run_name == "tiny_rl" and run.info.status == "FINISHED"
    # the composed config as parameters (Lightning's MLFlowLogger cuts a value at 250 characters) ...
    expected = {k: str(v)[:250] for k, v in flat_config(cfg).items()}
    assert {k: run.data.params.get(k) for k in expected} == expected
    # ... and whole, as the artifact config.yaml
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "data_source:" in config_yaml.read_text() and "OnPolicy" in config_yaml.read_text()
    # every metric of metrics.csv, under the name MLflow allows (Lightning drops other characters, e.g. '@')
    logged = {}
    for name, points in csv_points(run_dir).items():
        key = re.sub("[^a-zA-Z0-9_/. -]+", "", name)
        logged[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
    assert_same_points(logged, csv_points(run_dir), "MLflow")
    assert any(name.startswith("reward/") for name in logged), "the RL run's rewards are among them"
    # the sampled and the greedy completions as MLflow tables (the JSON of mlflow.log_table; its
    # load_table would read a completion "052" as the number 52)
    for split in ("train", "val"):
        path = client.download_artifacts(run.info.run_id, f"samples/{split}.json", str(tmp_path))
        table = json.loads(Path(path).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [(r["prompt"], r["completion"]) for r in rows] == samples(run_dir, split)
        assert all(("reward" if split == "train" else "exact_match") in r for r in rows)
    assert len(client.load_table(experiment.experiment_id, "samples/val.json", run_ids=[run.info.run_id])) == len(rows)
