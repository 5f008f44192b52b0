"""The checks a lent GPU runs, one line each with its figure (``scripts/gpu_checks.sh`` runs
them all, each in its own process, in at most 8 minutes on one H100):

- ``vllm``: the vLLM engine in the training process at the 0.5B shape (Qwen2.5-0.5B's:
  hidden 896, 24 layers, vocabulary 151,936), bf16-mixed: GRPO steps sampled through it with
  CUDA graphs and sleep level 2 (sync at lag 0), then sampled ahead in the producer thread
  (``max_lag=1``); sampled tokens/s, sync seconds, ``importance/mismatch_kl`` between the bf16
  engine and the bf16-autocast trainer;
- ``fsdp2``: FSDP2 (``ModelParallelStrategy``) on one GPU under bf16-mixed: the
  MixedPrecisionPolicy's bf16 gather and float32 master weights and gradients, seconds per
  SFT step, and a distributed checkpoint written;
- ``packing``: padding-free SFT through FlashAttention's variable-length kernel (where
  ``flash_attn`` is installed; the CPU smoke uses sdpa's block-diagonal mask) against padded
  batches: the loss's agreement and tokens/s;
- ``step``: the whole step against the careful plain loop (``benchmark_step.py``), SFT and
  distillation at a 151,936 vocabulary: time and memory ratios.

Each line carries the process's peak GPU memory. A check whose software is missing (vLLM,
flash-attn) prints ``skip`` and why. ``--cpu-smoke`` runs the same code on a CPU at tiny
sizes (CI runs it): it proves the checks run, not their figures.

    bash scripts/gpu_checks.sh                       # every check (a GPU)
    python scripts/gpu_checks.py --check fsdp2       # one check
    python scripts/gpu_checks.py --cpu-smoke --check fsdp2,step
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from benchmark_step import EOS, PAD, build_tokenizer  # noqa: E402

CHECKS = ("vllm", "fsdp2", "packing", "step")
# Qwen2.5-0.5B's shape, random weights (the machine reaches no hub); tiny on a CPU
SHAPES = {"gpu": dict(vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, prompt=128,
                      response=256, batch=16, groups=8, samples=8, gen=128, steps=4),
          "cpu": dict(vocab=512, hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, prompt=8, response=8,
                      batch=4, groups=2, samples=2, gen=4, steps=2)}


class Skip(Exception):
    """The check cannot run here (its software is missing); said, not failed."""


def model(shape: dict, seed: int = 0, attn: str | None = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         intermediate_size=shape["intermediate"], tie_word_embeddings=True,
                         max_position_embeddings=4 * (shape["prompt"] + shape["response"] + shape["gen"]),
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    if attn:
        config._attn_implementation = attn
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)  # float32: the master weights a run loads


def batch(shape: dict, rows: int, responses: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, shape["vocab"], (rows, shape["prompt"]), generator=g)
    # the first three quarters shared by every row, as a chat template's header is: vLLM's
    # prefix cache then holds it across syncs, and a stale one shows in mismatch_kl
    prompt[:, : 3 * shape["prompt"] // 4] = prompt[0, : 3 * shape["prompt"] // 4]
    out = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "references": [None] * rows}
    if responses:
        response = torch.randint(2, shape["vocab"], (rows, shape["response"]), generator=g)
        response[:, -1] = EOS
        out.update(response_ids=response, response_mask=torch.ones_like(response))
    return out


def distinct_tokens(completion_ids, completion_mask, **_) -> torch.Tensor:
    """A reward that varies between samples: the distinct tokens of each response."""
    return torch.tensor([float(len(set(i[m.bool()].tolist()))) for i, m in zip(completion_ids, completion_mask)])


def collector():
    from lightning.pytorch.loggers import Logger

    class Collect(Logger):
        """Every logged row, in memory."""

        def __init__(self):
            super().__init__()
            self.rows: list[dict] = []

        name, version = "collect", 0

        def log_metrics(self, metrics, step=None):
            self.rows.append({k: float(v) for k, v in metrics.items()})

        def log_hyperparams(self, *args, **kwargs):
            pass

        def values(self, key: str) -> list[float]:
            return [r[key] for r in self.rows if key in r]

    return Collect()


def fit(args, module, data: dict, steps: int, **trainer_options):
    """``steps`` training steps of ``module`` on ``data`` (the same batch each step); the rows
    it logged and the median seconds of the steps after the first."""
    import lightning as L

    logger, ends = collector(), []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    # a list (a loader with a length: sampling ahead needs one), a fresh dict per step
    rows = [{**data, "example_index": torch.arange(len(data["references"]))} for _ in range(steps + 1)]
    loader = torch.utils.data.DataLoader(rows, batch_size=None)
    options = dict(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                   max_steps=steps, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   callbacks=[Clock(), *trainer_options.pop("callbacks", [])])
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, train_dataloaders=loader)
    step_s = statistics.median(b - a for a, b in zip(ends, ends[1:])) if len(ends) > 1 else float("nan")
    return trainer, logger, step_s


def last(logger, key: str) -> float:
    values = logger.values(key)
    if not values:
        raise AssertionError(f"{key} was never logged")
    return values[-1]


# --- the checks ---------------------------------------------------------------------------


def check_vllm(args, shape: dict) -> dict:
    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not installed")
    from lightning_unified import OnPolicy, Reward, Sampling, Sparse, UnifiedModule
    from lightning_unified.specs import Importance

    tokenizer, figures = build_tokenizer(shape["vocab"]), {}
    on_gpu = args.device == "cuda"
    for lag in (0, 1):
        # lag 0: the GPU preset's engine (CUDA graphs, sleep level 2); lag 1: sampled ahead in
        # the producer thread, where the engine cannot sleep
        vllm = {"enforce_eager": not on_gpu, "sleep": on_gpu and lag == 0, "sleep_level": 2,
                **({"gpu_memory_utilization": 0.4} if on_gpu else {"kv_cache_gib": 0.25})}
        sampling = Sampling(num_generations=shape["samples"], max_new_tokens=shape["gen"], engine="vllm", vllm=vllm,
                            max_lag=lag)
        module = UnifiedModule(model(shape), tokenizer, OnPolicy(sampling=sampling, importance=Importance()),
                               Sparse(rewards=[Reward(distinct_tokens)], advantage="grpo"),
                               optimizer=partial(torch.optim.AdamW, lr=1e-6), samples_every_n_steps=None)
        try:
            _, logger, step_s = fit(args, module, batch(shape, shape["groups"], responses=False), shape["steps"])
        finally:
            module.rollouts.close()
        figures[f"lag{lag}_mismatch_kl"] = last(logger, "importance/mismatch_kl")
        figures[f"lag{lag}_step_s"] = step_s
        figures[f"lag{lag}_sampled_tokens_per_s"] = statistics.median(logger.values("sampling/tokens_per_sec"))
        if lag == 0:  # the first "sync" is the engine's start; the rest are weight syncs (with the wake)
            syncs = logger.values("sampling/sync_seconds")
            figures["start_s"], figures["sync_s"] = syncs[0], statistics.median(syncs[1:] or [float("nan")])
    # bf16 against bf16-autocast: small but not float32's ~1e-9; a broken sync is >> 0.1
    for lag in (0, 1):
        assert 0 <= figures[f"lag{lag}_mismatch_kl"] < 0.05, figures
    return figures


def check_fsdp2(args, shape: dict) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_unified import OffPolicy, Sparse, UnifiedModule

    seen: dict = {"gathered": set()}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            layer = pl_module.policy.model.layers[0].mlp.down_proj
            layer.register_forward_pre_hook(lambda m, a: seen["gathered"].add(str(m.weight.dtype)))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            local = [getattr(p, "to_local", lambda p=p: p)() for p in pl_module.policy.parameters()]
            seen["master"] = {str(p.dtype) for p in local}
            seen["grads"] = {str(p.grad.to_local().dtype) for p in pl_module.policy.parameters() if p.grad is not None}

    module = UnifiedModule(model(shape), build_tokenizer(shape["vocab"]), OffPolicy(), Sparse(),
                           optimizer=partial(torch.optim.AdamW, lr=1e-6), samples_every_n_steps=None)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer, _, step_s = fit(args, module, batch(shape, shape["batch"], responses=True), shape["steps"],
                             strategy=strategy, callbacks=[Spy()])
    assert seen["gathered"] == {"torch.bfloat16"}, seen
    assert seen["master"] == seen["grads"] == {"torch.float32"}, seen
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        trainer.save_checkpoint(Path(directory) / "step.ckpt")
        saved = time.perf_counter() - started
        shards = len(list((Path(directory) / "step.ckpt").glob("*.distcp")))
    assert shards >= 1, "a distributed checkpoint is a directory of shards"
    return {"step_s": step_s, "gathered": "bf16", "master_and_grads": "fp32", "checkpoint_s": saved, "shards": shards}


def check_packing(args, shape: dict) -> dict:
    on_gpu = args.device == "cuda"
    if on_gpu and importlib.util.find_spec("flash_attn") is None:
        raise Skip("flash-attn is not installed (FlashAttention's variable-length kernel)")
    # the CPU smoke runs the same check through sdpa's block-diagonal mask
    attn = "flash_attention_2" if on_gpu else "sdpa"
    from lightning_unified import OffPolicy, Sparse, UnifiedModule

    data = batch(shape, shape["batch"], responses=True)
    lengths = torch.linspace(0.1, 1.0, shape["batch"])  # long-tailed: the longest row sets the padded width
    for i, share in enumerate(lengths):
        keep = max(1, int(share * shape["response"]))
        data["response_mask"][i, keep:] = 0
        data["response_ids"][i, keep:] = PAD
    results = {}
    for packing in (False, True):
        module = UnifiedModule(model(shape, attn=attn), build_tokenizer(shape["vocab"]), OffPolicy(),
                               Sparse(), optimizer=partial(torch.optim.AdamW, lr=1e-6), samples_every_n_steps=None,
                               packing=packing)
        _, logger, step_s = fit(args, module, data, shape["steps"])
        results[packing] = (logger.values("train/loss")[0], step_s)
    tokens = int(data["response_mask"].sum() + data["prompt_mask"].sum())
    gap = abs(results[True][0] - results[False][0]) / abs(results[False][0])
    assert gap < 1e-2, f"packed and padded first-step losses differ by {gap:.2e} (relative)"
    return {"attention": attn, "loss_gap_rel": gap, "padded_tokens_per_s": tokens / results[False][1],
            "packed_tokens_per_s": tokens / results[True][1], "speedup": results[False][1] / results[True][1]}


def check_step(args, shape: dict) -> dict:
    """``benchmark_step.py``'s cells: each variant in its own process on a GPU (its own peak);
    in one process on a CPU (a smoke: no figure to keep)."""
    flags = ["--device", args.device, "--precision", "bf16-mixed", "--vocab", str(shape["vocab"]), "--hidden",
             str(max(64, shape["hidden"])), "--layers", str(min(shape["layers"], 12)), "--batch", str(shape["batch"]),
             "--prompt", str(shape["prompt"]), "--response", str(shape["response"]), "--steps",
             str(shape["steps"] + 1), "--warmup", "1", "--repeats", "1", "--methods", "sft,distill"]
    if args.cpu_smoke:  # both variants in this process: the code runs, the figures mean nothing
        import benchmark_step

        figures = {}
        for method in ("sft", "distill"):
            cell = benchmark_step.build_parser().parse_args([*flags, "--method", method])
            plain = benchmark_step.run_plain(argparse.Namespace(**{**vars(cell), "variant": "plain"}))
            project = benchmark_step.run_project(argparse.Namespace(**{**vars(cell), "variant": "project"}))
            figures[f"{method}_time_x"] = project["median_s"] / plain["median_s"]
        return figures
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "step.jsonl"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_step.py"), *flags, "--out", str(out)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-2000:] or done.stdout[-2000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    figures = {}
    figures["peak_gib"] = max(row["project_peak_mib"] for row in rows) / 1024  # the cells' own, above the model
    for row in rows:
        figures[f"{row['method']}_time_x"] = row["time_ratio"]
        figures[f"{row['method']}_mem_x"] = row["memory_ratio"]
        figures[f"{row['method']}_peak_mib"] = row["project_peak_mib"]
    return figures


# --- the driver ---------------------------------------------------------------------------


def run_check(name: str, args) -> int:
    """One check: its line, ``CHECK name ok|FAIL|skip | figures``; 0 unless it failed."""
    shape = SHAPES["cpu" if args.cpu_smoke else "gpu"]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        figures = globals()[f"check_{name}"](args, shape)
        status, code = "ok", 0
    except Skip as reason:
        figures, status, code = {"why": str(reason)}, "skip", 0
    except Exception as error:  # noqa: BLE001 - one line says what failed; the traceback goes to stderr
        traceback.print_exc()
        figures, status, code = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}, "FAIL", 1
    figures["seconds"] = time.perf_counter() - started
    if args.device == "cuda" and "peak_gib" not in figures and not args.cpu_smoke:
        # this process's; a check that runs its cells in processes of their own reports theirs
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"CHECK {name} {status} | {text}", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--cpu-smoke", action="store_true", help="run on a CPU at tiny sizes (what CI runs)")
    args = parser.parse_args()
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run on one, or pass --cpu-smoke")
    names = args.check.split(",")
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--check: unknown {unknown}; choose from {CHECKS}")
    sys.exit(max(run_check(name, args) for name in names))


if __name__ == "__main__":
    main()
