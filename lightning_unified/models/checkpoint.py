"""What a checkpoint holds of the policy, and what it must match to be resumed: the
method and the trainable parameters' names and shapes (LoRA: only the adapters)."""

from __future__ import annotations

from torch import nn

from lightning_unified.models.lora import is_lora, merged_copy, merged_from_state
from lightning_unified.models.sharding import is_sharded


def fingerprint(method: str, policy: nn.Module) -> dict:
    return {"method": method,
            "parameters": [[name, list(p.shape)] for name, p in policy.named_parameters() if p.requires_grad]}


def check_fingerprint(mine: dict, saved: dict | None) -> None:
    """A checkpoint from another model or another method is refused, not half-loaded."""
    if not saved:
        return
    if saved["method"] != mine["method"]:
        raise ValueError(f"the checkpoint was written by a run with {saved['method']}; this run has "
                         f"{mine['method']}: resume it with the method it was trained with")
    theirs, ours = dict((n, s) for n, s in saved["parameters"]), dict((n, s) for n, s in mine["parameters"])
    if theirs != ours:
        missing = sorted(set(ours) - set(theirs))
        extra = sorted(set(theirs) - set(ours))
        reshaped = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
        detail = (f"{reshaped[0]} is {theirs[reshaped[0]]} there and {ours[reshaped[0]]} here" if reshaped else
                  f"{missing[0]} is not in it" if missing else f"it has {extra[0]}, which this policy lacks")
        raise ValueError(f"the checkpoint holds another model's trainable parameters ({detail}); resume "
                         f"with the model.path / model.lora it was trained with")


def trainable_state(state_dict: dict, policy: nn.Module, prefix: str = "policy.") -> dict:
    """The module's state dict without the policy's frozen weights when it has LoRA
    adapters (the base comes from model.path again); unchanged otherwise."""
    if not is_lora(policy):
        return state_dict
    trainable = {f"{prefix}{n}" for n, p in policy.named_parameters() if p.requires_grad}
    return {k: v for k, v in state_dict.items() if k in trainable or not k.startswith(prefix)}


def save_policy(policy: nn.Module, tokenizer, directory: str, merged_directory: str | None = None,
                writer: bool = True) -> None:
    """The policy and tokenizer as a Hugging Face directory (``from_pretrained`` loads it;
    with LoRA it holds the adapter, which peft loads onto the base model), plus, with LoRA
    and ``merged_directory``, a plain model with the adapters merged in. Every rank calls
    it: a sharded policy is gathered first (a collective), then only the ``writer`` writes."""
    state_dict = None
    if is_sharded(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if writer:
        policy.save_pretrained(directory, state_dict=state_dict)
        tokenizer.save_pretrained(directory)
        if merged_directory is not None and is_lora(policy):
            # a sharded policy's shards cannot be merged on one rank: its gathered state is
            merged = merged_copy(policy) if state_dict is None else merged_from_state(policy, state_dict)
            merged.save_pretrained(merged_directory)
            tokenizer.save_pretrained(merged_directory)


# where a checkpoint keeps what this library adds to Lightning's
STATE_KEY = "lightning_unified"


def write_run_state(checkpoint: dict, progress: dict, mine: dict, policy: nn.Module) -> None:
    """Add the run's progress and fingerprint to a Lightning checkpoint, and drop a LoRA
    policy's frozen base weights from its state dict."""
    checkpoint[STATE_KEY] = {"progress": dict(progress), "fingerprint": mine}
    checkpoint["state_dict"] = trainable_state(checkpoint["state_dict"], policy)


def read_run_state(checkpoint: dict, mine: dict) -> dict:
    """The saved progress of a checkpoint that matches the fingerprint ``mine`` (refused by
    name otherwise)."""
    saved = checkpoint.get(STATE_KEY, {})
    check_fingerprint(mine, saved.get("fingerprint"))
    return saved.get("progress", {})
