"""The weight push's timing for ``scripts/benchmark_served.py``: a random Llama saved to disk,
a launched server of it, and the :class:`~lightning_unified.engines.transfer.WeightPusher`'s
full pushes, then a LoRA policy's base and adapter pushes to a LoRA-enabled server, each
with the pusher's own memory bound and the pushing process's measured peak growth."""

from __future__ import annotations

import statistics
import time
from pathlib import Path


def launch(directory: Path, model_dir: str, server_cpus: str, lora_rank: int | None):
    """One server of ``model_dir`` on ``server_cpus`` that takes weights over lu_gloo."""
    from lightning_unified.engines.server_fleet import ServerFleet, serve_env
    from lightning_unified.engines.transfer import server_flags

    fleet = ServerFleet(directory, 1)
    flags, env = server_flags("lu_gloo", lora_rank)
    started = time.perf_counter()
    (url,) = fleet.start(model_dir, command_args=dict(dtype="float32", max_model_len=512, kv_cache_gib=1, extra=flags),
                         env=serve_env(env), cpu_sets=[server_cpus])
    return fleet, url, time.perf_counter() - started


def timed_push(pusher, policy, version: int) -> dict:
    """One push, with the pushing process's peak resident set above its resident set before."""
    from peak_memory import process_memory, reset_peak  # scripts/, beside this file

    reset_peak("cpu")
    before = process_memory()[0]
    stats = pusher.push(policy, version)
    return {"version": version, "kind": stats.kind, "bytes": stats.bytes, "seconds": stats.seconds,
            "peak_extra_bytes": stats.peak_extra_bytes, "rss_growth_bytes": process_memory()[1] - before}


def push_cell(args) -> dict:
    """Full pushes to a plain server, then a LoRA policy's base and adapter pushes to a
    LoRA-enabled one, each server stopped before the next starts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_unified.engines.adapters import adapter_entries
    from lightning_unified.engines.transfer import WeightPusher
    from lightning_unified.models.loading import load_causal_lm
    from lightning_unified.models.lora import add_lora
    from peak_memory import process_memory, reset_peak

    scratch = Path(args.scratch) / "push"
    heads = args.push_hidden // 64  # heads of 64, a size vLLM's CPU attention serves
    config = LlamaConfig(vocab_size=args.push_vocab, hidden_size=args.push_hidden, num_hidden_layers=args.push_layers,
                         intermediate_size=args.push_hidden * 8 // 3 // 64 * 64, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = str(scratch / "model")
    LlamaForCausalLM(config).save_pretrained(model_dir)  # random weights: what moves is their bytes
    shape = {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
             "intermediate": config.intermediate_size, "vocab": config.vocab_size}
    result = {"model": shape, "bucket_mb": args.bucket_mb}

    policy = load_causal_lm(model_dir, dtype=torch.float32)
    result["model"]["parameters"] = sum(p.numel() for p in policy.parameters())
    fleet, url, result["full_server_start_s"] = launch(scratch / "server_full", model_dir, args.server_cpus, None)
    pusher = WeightPusher([url], bucket_mb=args.bucket_mb, timeout_s=600)
    try:
        pusher.start(policy)
        result["full"] = [timed_push(pusher, policy, version) for version in range(1, args.pushes + 2)]
    finally:
        pusher.close()
        fleet.stop()
    del policy

    policy = add_lora(load_causal_lm(model_dir, dtype=torch.float32), r=args.lora_rank, alpha=2 * args.lora_rank)
    generator = torch.Generator().manual_seed(1)
    fleet, url, result["lora_server_start_s"] = launch(scratch / "server_lora", model_dir, args.server_cpus,
                                                       args.lora_rank)
    pusher = WeightPusher([url], bucket_mb=args.bucket_mb, timeout_s=600, lora=True, adapter_name="policy")
    try:
        reset_peak("cpu")
        before = process_memory()[0]
        base = pusher.start(policy)  # the base weights, pushed whole
        result["lora_base"] = {"bytes": base.bytes, "seconds": base.seconds, "peak_extra_bytes": base.peak_extra_bytes,
                               "rss_growth_bytes": process_memory()[1] - before}
        result["lora"] = []
        for version in range(1, args.pushes + 2):
            with torch.no_grad():  # a trained-looking adapter each version (peft starts lora_B at 0)
                for _, tensor in adapter_entries(policy):
                    tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
            result["lora"].append(timed_push(pusher, policy, version))
    finally:
        pusher.close()
        fleet.stop()
    result["lora_rank"] = args.lora_rank
    return result


def summarise_push(result: dict) -> dict:
    """Medians after the first (warm-up) push of each kind."""
    rows = {}
    for kind in ("full", "lora"):
        kept = result[kind][1:] or result[kind]
        med = {key: statistics.median(p[key] for p in kept) for key in ("bytes", "seconds", "peak_extra_bytes",
                                                                         "rss_growth_bytes")}
        med["s_per_gb"] = med["seconds"] / (med["bytes"] / 1e9)
        med["pushes"] = len(kept)
        rows[kind] = med
    rows["lora"]["fraction_of_model"] = rows["lora"]["bytes"] / rows["full"]["bytes"]
    rows["lora"]["vs_full_seconds"] = rows["lora"]["seconds"] / rows["full"]["seconds"]
    base = result["lora_base"]
    rows["lora_base"] = {**base, "s_per_gb": base["seconds"] / (base["bytes"] / 1e9), "pushes": 1}
    return rows


def push_table(summary: dict, result: dict) -> str:
    full = summary["full"]["bytes"]
    model = result["model"]
    lines = [f"Llama hidden {model['hidden']}, {model['layers']} layers, intermediate {model['intermediate']}, "
             f"vocabulary {model['vocab']} ({model['parameters'] / 1e6:.1f}M parameters, float32), "
             f"bucket {result['bucket_mb']} MB, LoRA rank {result['lora_rank']}; medians of "
             f"{summary['full']['pushes']} pushes after one warm-up",
             "",
             "| push | MB | seconds | s/GB | fraction of the model | peak_extra MB (bound) "
             "| RSS growth MB (measured) |",
             "|---|---|---|---|---|---|---|"]
    for kind, label in (("full", "full"), ("lora_base", "LoRA base (once, at start)"), ("lora", "LoRA adapter")):
        row = summary[kind]
        lines.append(f"| {label} | {row['bytes'] / 1e6:.2f} | {row['seconds']:.3f} | {row['s_per_gb']:.2f} | "
                     f"{row['bytes'] / full:.2%} | {row['peak_extra_bytes'] / 1e6:.2f} | "
                     f"{row['rss_growth_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)
