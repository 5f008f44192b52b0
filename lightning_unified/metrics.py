"""What a step logs besides its loss: the diagnostics TRL and verl users read first.

The gradient norm before clipping, the learning rate, the policy's entropy on the loss
tokens, response lengths and the share cut at the limit, each reward function's mean and
standard deviation, and model FLOPs utilisation (``docs/metrics.md`` has the table, with the
peers' names). None of them reads the device on its own: each is a scalar kept on the
device in :class:`DeviceMetrics`, reduced over ranks with the step's loss sums, and read
back in the step's one existing ``tolist`` (:meth:`~lightning_unified.losses.aggregation.StepSums.total`).
They are made on the steps Lightning writes to its loggers only (``log_every_n_steps``), as
the loss is; MFU's token counts are the exception, made every step, because MFU covers the
steps since the last write, as ``train/tokens_per_sec`` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_unified import batch as fields


class DeviceMetrics:
    """Named scalars on the device until the step's one read: each summed over micro-batches
    and ranks (:meth:`add`), or the largest (:meth:`maximum`) or smallest (:meth:`minimum`)
    over them. Every rank must record the same names in a step: they are all-reduced."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._maxima: dict[tuple[str, float], Tensor] = {}  # (name, sign): a minimum is the maximum of -x
        self._constants: dict[tuple, Tensor] = {}

    def constant(self, values: list[int], device: torch.device) -> Tensor:
        """``values`` as a long tensor on ``device``, copied there once: on a GPU each copy
        from the host waits for the device's queue."""
        key = (tuple(values), str(device))
        if key not in self._constants:
            self._constants[key] = torch.as_tensor(values, dtype=torch.long, device=device)
        return self._constants[key]

    def add(self, name: str, value: Tensor) -> None:
        value = value.detach().to(torch.float64).reshape(())
        self._sums[name] = value if name not in self._sums else self._sums[name] + value

    def maximum(self, name: str, value: Tensor, sign: float = 1.0) -> None:
        value = sign * value.detach().to(torch.float64).reshape(())
        key = (name, sign)
        self._maxima[key] = value if key not in self._maxima else torch.maximum(self._maxima[key], value)

    def minimum(self, name: str, value: Tensor) -> None:
        self.maximum(name, value, sign=-1.0)

    def take(self) -> tuple[list[str], Tensor | None, list[tuple[str, float]], Tensor | None]:
        """(sum names, [n] float64 sums, (max name, sign), [m] float64 maxima), in name
        order (the same on every rank), and clears them."""
        sums, maxima = self._sums, self._maxima
        self._sums, self._maxima = {}, {}
        names, max_names = sorted(sums), sorted(maxima)
        return (names, torch.stack([sums[n] for n in names]) if names else None,
                max_names, torch.stack([maxima[n] for n in max_names]) if max_names else None)


# --- the gradient ---------------------------------------------------------------------

def grad_square_sum(parameters, world_size: int) -> Tensor | None:
    """This rank's share of the squared L2 norm of every gradient, a float64 scalar on the
    device, such that the sum over ranks is the squared norm of the whole gradient; None
    without gradients.

    A DDP gradient is the same on every rank, so each rank gives 1/world_size of it. An
    FSDP2 gradient is a DTensor: each rank holds a shard, given whole, divided by the ranks
    holding the same shard (a replicated mesh dimension, or ranks outside its mesh). One
    fused multi-tensor norm per group of gradients; nothing is read back."""
    local: dict[float, list[Tensor]] = {}
    for p in parameters:
        grad = p.grad
        if grad is None:
            continue
        copies = world_size
        if hasattr(grad, "to_local"):  # a DTensor: its shards are apart, its replicas alike
            for dim, placement in enumerate(grad.placements):
                if placement.is_shard():
                    copies //= grad.device_mesh.size(dim)
            grad = grad.to_local()
        local.setdefault(1.0 / max(copies, 1), []).append(grad.detach())
    if not local:
        return None
    parts = [share * torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum()
             for share, grads in local.items()]
    return torch.stack(parts).sum()


def learning_rates(optimizers) -> dict[str, float]:
    """``train/lr`` of a single parameter group, else ``train/lr/pg<i>`` of each (numbered
    over every optimizer): the rate this optimizer step uses (the scheduler steps after it)."""
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    if len(groups) == 1:
        return {"train/lr": groups[0]["lr"]}
    return {f"train/lr/pg{i}": group["lr"] for i, group in enumerate(groups)}


# --- the batch: response lengths, rewards ---------------------------------------------

def record_lengths(metrics: DeviceMetrics, batch: dict, stop_token_ids: list[int]) -> None:
    """The responses' lengths (mean, max, min) of a batch; for sampled ones
    (``sampling/...``) also the share that holds a stop token and the share cut at the
    limit (its policy's last token is no stop token: the response, or an episode's last
    turn, ran into the sampling limit); the data's (``data/...``) are lengths only."""
    mask = batch[fields.RESPONSE_MASK]
    lengths = mask.sum(-1).to(torch.float64)  # [B]
    prefix = "sampling" if fields.is_sampled(batch) else "data"
    metrics.add(f"{prefix}/rows", lengths.new_full((), lengths.numel()))  # a fill: no copy from the host
    metrics.add(f"{prefix}/response_length_sum", lengths.sum())
    metrics.maximum(f"{prefix}/response_length_max", lengths.max())
    metrics.minimum(f"{prefix}/response_length_min", lengths.min())
    if prefix != "sampling":
        return
    ids = batch[fields.RESPONSE_IDS]
    stops = metrics.constant(stop_token_ids, ids.device)
    metrics.add("sampling/eos_rows", torch.isin(ids, stops).any(-1).sum())
    # the policy's own tokens (a failed row's too): an episode's environment turns are not the policy's
    policy = batch.get(fields.LOSS_MASK, mask).bool()
    positions = torch.arange(policy.shape[-1], device=policy.device)
    last = torch.where(policy, positions, -1).amax(-1)  # [B], -1 for a row with no token
    last_token = ids.gather(-1, last.clamp_min(0)[:, None]).squeeze(-1)
    cut = (last >= 0) & ~torch.isin(last_token, stops)
    metrics.add("sampling/clipped_rows", cut.sum())


def reward_statistics(values: dict[str, Tensor]) -> Tensor:
    """[n, 3] (sum, sum of squares, count) of each reward function's [B] scores over the rows
    it scored (finite), in ``values``' order: computed where the scores are (the host)."""
    rows = []
    for scores in values.values():
        scored = torch.isfinite(scores)
        kept = torch.where(scored, scores, 0.0).double()
        rows.append(torch.stack([kept.sum(), kept.square().sum(), scored.sum().double()]))
    return torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)


def rewards_to_device(metrics: DeviceMetrics | None, rewards: Tensor, values: dict[str, Tensor],
                      device: torch.device) -> Tensor:
    """The rewards [B] on ``device``; with ``metrics`` (a step that writes logs), each reward
    function's sum, sum of squares and count join them in the same one copy from the host
    and are recorded (``reward/<name>``, ``reward/<name>_std`` over every rank)."""
    if metrics is None or not values:
        return rewards.to(device)
    n = rewards.shape[0]
    packed = torch.cat([rewards.double(), reward_statistics(values).reshape(-1)]).to(device)
    for name, (total, squares, count) in zip(values, packed[n:].reshape(-1, 3)):
        metrics.add(f"reward/{name}/sum", total)
        metrics.add(f"reward/{name}/squares", squares)
        metrics.add(f"reward/{name}/count", count)
    return packed[:n].to(rewards.dtype)


# --- model FLOPs ----------------------------------------------------------------------

def peak_flops_per_device(configured: float | None, device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak FLOP/s: ``module.peak_flops`` when set, else Lightning's table for
    a CUDA device and the step's compute dtype (what its ``ThroughputMonitor`` uses); None
    where unknown (a CPU), and MFU is then not logged."""
    if configured is not None:
        if configured <= 0:
            raise ValueError(f"module.peak_flops must be a positive FLOP/s figure per device, got {configured}")
        return float(configured)
    if device.type != "cuda" or dtype is None:
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, dtype)


def matmul_parameters(policy: nn.Module) -> int:
    """The parameters a token's forward multiplies by: all, less an input embedding that is
    not also the output layer (a lookup, not a matmul). FSDP2 shards count whole."""
    total = sum(p.numel() for p in policy.parameters())
    embedding, head = policy.get_input_embeddings(), policy.get_output_embeddings()
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        total -= embedding.weight.numel()
    return total


def attention_width(config) -> tuple[int, int]:
    """(layers, heads x head width) of a Hugging Face decoder's config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def record_policy_tokens(metrics: DeviceMetrics, prompt_mask: Tensor, response_mask: Tensor) -> None:
    """The trained forward's real tokens and the sum of its sequences' squared lengths."""
    lengths = (prompt_mask.sum(-1) + response_mask.sum(-1)).to(torch.float64)  # [B]
    metrics.add("flops/tokens", lengths.sum())
    metrics.add("flops/square_lengths", lengths.square().sum())


def training_flops(parameters: int, layers: int, width: int, tokens: float, square_lengths: float) -> float:
    """Model FLOPs of a forward and backward pass over sequences of ``tokens`` tokens in all,
    whose squared lengths sum to ``square_lengths``: 6 per parameter per token, plus
    attention's 12 x layers x width per token per token of context (PaLM's appendix B,
    verl's FlopsCounter; causal masking's saving is not subtracted, by convention)."""
    return 6.0 * parameters * tokens + 12.0 * layers * width * square_lengths


class FlopsModel:
    """The policy's FLOPs per trained token and the peak of the ranks together: MFU's parts."""

    def __init__(self, policy: nn.Module, peak_per_device: float, world_size: int):
        self.parameters = matmul_parameters(policy)
        self.layers, self.width = attention_width(policy.config)
        self.peak = peak_per_device * world_size

    def step_flops(self, reduced: dict[str, float]) -> float:
        """The FLOPs of a step's trained forwards and backwards, from its reduced counts."""
        return training_flops(self.parameters, self.layers, self.width, reduced.get("flops/tokens", 0.0),
                              reduced.get("flops/square_lengths", 0.0))


# --- the step's logs ---------------------------------------------------------------------

def derived(reduced: dict[str, float], tokens: float, grad_scale: float) -> dict[str, float]:
    """The logged values from the step's reduced sums: means from sums and counts, the
    unbiased standard deviation from sums of squares, the gradient norm from its square
    (times ``grad_scale``, the factor the gradients still get after the read). ``tokens``:
    the step's loss tokens, over which the entropy is a token mean."""
    out = {}
    if "grad_square" in reduced:
        out["train/grad_norm"] = math.sqrt(max(reduced["grad_square"], 0.0)) * abs(grad_scale)
    if "entropy" in reduced and tokens > 0:
        out["train/entropy"] = reduced["entropy"] / tokens
    for prefix in ("sampling", "data"):
        rows = reduced.get(f"{prefix}/rows", 0.0)
        if rows <= 0:
            continue
        out[f"{prefix}/response_length"] = reduced[f"{prefix}/response_length_sum"] / rows
        out[f"{prefix}/response_length_max"] = reduced[f"{prefix}/response_length_max"]
        out[f"{prefix}/response_length_min"] = reduced[f"{prefix}/response_length_min"]
        for name in ("eos", "clipped"):
            if f"{prefix}/{name}_rows" in reduced:
                out[f"{prefix}/{name}_fraction"] = reduced[f"{prefix}/{name}_rows"] / rows
    for key in reduced:
        if key.startswith("reward/") and key.endswith("/count"):
            name, count = key[len("reward/"):-len("/count")], reduced[key]
            if count <= 0:
                continue  # no row scored: nothing to say
            mean = reduced[f"reward/{name}/sum"] / count
            variance = (reduced[f"reward/{name}/squares"] - count * mean * mean) / max(count - 1.0, 1.0)
            out[f"reward/{name}"] = mean
            out[f"reward/{name}_std"] = math.sqrt(max(variance, 0.0))
    return out
