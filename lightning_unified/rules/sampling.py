"""The rules within the data source: how it samples (``data_source.sampling``), how it
corrects for the sampler (``data_source.importance``), and how a rollout is replayed."""

from __future__ import annotations

from lightning_unified.registry import RATIOS
from lightning_unified.rules import rule


@rule("lag-or-sync-every", "sampling", "data_source.sampling.max_lag", "data_source.sampling.sync_every")
def lag_or_sync_every(sampling) -> str | None:
    """Stale weights come from one of the two: a lag, or syncing the engine less often."""
    if sampling.max_lag and sampling.sync_every > 1:
        return (f"sampling.max_lag={sampling.max_lag} already samples from weights {sampling.max_lag} steps old; "
                f"sampling.sync_every={sampling.sync_every} would make them older still. Set one of them")
    return None


@rule("lag-keeps-the-engine-awake", "sampling", "data_source.sampling.max_lag", "data_source.sampling.vllm.sleep")
def lag_keeps_the_engine_awake(sampling) -> str | None:
    """A lag samples during the training step, when a sleeping engine could not."""
    if sampling.max_lag and sampling.vllm.get("sleep"):
        return (f"sampling.max_lag={sampling.max_lag} samples during the training step, so the engine cannot sleep "
                f"then: set sampling.vllm.sleep=false")
    return None


@rule("sleep-level-2-syncs-every-wake", "sampling", "data_source.sampling.vllm.sleep_level",
      "data_source.sampling.sync_every")
def sleep_level_2_syncs_every_wake(sampling) -> str | None:
    """Sleep level 2 discards the engine's weights, so every wake loads the policy's current ones."""
    if sampling.vllm.get("sleep") and sampling.vllm.get("sleep_level", 2) == 2 and sampling.sync_every > 1:
        return (f"sampling.vllm.sleep_level=2 discards the engine's weights while it sleeps, so each wake loads the "
                f"policy's current ones; sampling.sync_every={sampling.sync_every} keeps older weights on purpose. Set "
                f"sampling.vllm.sleep_level=1 (the weights wait on the CPU) or sampling.sync_every=1")
    return None


@rule("served-engine-needs-servers", "sampling", "data_source.sampling.engine", "data_source.sampling.server.urls",
      "data_source.sampling.server.launch")
def served_engine_needs_servers(sampling) -> str | None:
    """Servers to sample from: given by URL, or started by the run, one of the two."""
    if sampling.engine != "server":
        return None
    urls, launch = sampling.server.get("urls") or [], sampling.server.get("launch") or 0
    if not urls and not launch:
        return ("sampling.engine=server needs servers: sampling.server.urls=[http://HOST:PORT, ...] (each started "
                "with the command docs/guides/served_rollouts.md gives), or sampling.server.launch=N to start N on this "
                "machine")
    if urls and launch:
        return (f"sampling.server.urls names {len(urls)} server(s) and sampling.server.launch={launch} would start "
                f"more: set one of them")
    return None


@rule("vllm-reports-raw-or-sampled", "sampling", "data_source.sampling.engine", "data_source.sampling.behaviour",
      "data_source.sampling.temperature", "data_source.sampling.top_k", "data_source.sampling.top_p")
def vllm_reports_raw_or_sampled(sampling) -> str | None:
    """vLLM reports the raw distribution's log-probs or the sampled one's: the tempered,
    untruncated one under top-k/top-p at a temperature other than 1 is neither."""
    truncated = bool(sampling.top_k) or sampling.top_p < 1.0
    if sampling.engine in ("vllm", "server") and truncated and sampling.behaviour == "tempered" and (
            sampling.temperature != 1.0):
        return (f"sampling.engine={sampling.engine} reports the log-probs of the raw distribution or of the one it "
                f"sampled from (after temperature, top_k and top_p); sampling.behaviour=tempered with top_k/top_p at a "
                f"temperature other than 1 asks for neither. Set sampling.behaviour=sampled")
    return None


@rule("proximal-ratio-per-token", "importance", "data_source.importance.ratio", "data_source.importance.level")
def proximal_ratio_per_token(importance) -> str | None:
    """A ratio with a proximal policy weighs each token on its own."""
    if RATIOS[importance.ratio].proximal and importance.level == "sequence":
        return (f"importance.ratio={importance.ratio} weighs each token by its own proximal and behaviour ratios; "
                f"importance.level=sequence is not built for it: use level=token, or ratio=sequence_clip for a "
                f"sequence-level clip")
    return None


@rule("mask-needs-a-ratio", "importance", "data_source.importance.mask_low", "data_source.importance.mask_high",
      "data_source.importance.ratio")
def mask_needs_a_ratio(importance) -> str | None:
    """Masking tests the importance ratio, which ratio=none does not form."""
    if importance.masks and importance.ratio == "none":
        return "importance.mask_low / mask_high test the importance ratio; importance.ratio=none has none"
    return None


@rule("mask-band-in-order", "importance", "data_source.importance.mask_low", "data_source.importance.mask_high")
def mask_band_in_order(importance) -> str | None:
    """The band that keeps tokens runs from mask_low up to mask_high."""
    low, high = importance.mask_low, importance.mask_high
    if low is not None and high is not None and low >= high:
        return f"importance.mask_low must be below mask_high, got {low} >= {high}"
    return None


@rule("episodes-in-whole-rollouts", "on_policy", "data_source.environment.cls", "data_source.minibatches")
def episodes_in_whole_rollouts(data_source) -> str | None:
    """Mini-batches split a rollout by rows, and an episode may span several rows."""
    if data_source.environment.enabled and data_source.minibatches > 1:
        return ("data_source.minibatches > 1 splits a rollout by its rows, but an episode may span several rows (a "
                "template that rewrites history splits it); use minibatches=1 with data_source.environment")
    return None
