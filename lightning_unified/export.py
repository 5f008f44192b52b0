"""Any checkpoint of a run as a Hugging Face directory (``scripts/export.py``): a one-process
or DDP ``.ckpt`` file, or an FSDP2 distributed checkpoint (a directory of each rank's
shards), read in one process without the optimizer's state; a LoRA policy as its adapter,
or merged into a plain model.

The policy is rebuilt from the run's config (the one the checkpoint keeps, else the run
directory's ``.hydra/config.yaml``, else ``--config``) with its tokenizer (``--tokenizer``,
else the task's), and the checkpoint's weights are loaded into it, every one accounted for:
a checkpoint that does not fit the config is refused by name, never half-loaded."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import lightning_unified.config  # noqa: F401 - registers the resolvers a run's .hydra/config.yaml uses
from lightning_unified.callbacks.export import CARD_KEY
from lightning_unified.models.checkpoint import save_policy
from lightning_unified.models.loading import load_tokenizer
from lightning_unified.models.lora import is_lora
from lightning_unified.models.model_card import CardFacts, write_model_card

# Lightning keeps the module's weights under this key, the policy's under this prefix
STATE, PREFIX = "state_dict", "policy."
OBJECTIVE = "objective."  # a reward model's scalar head (lightning_unified.objectives)
METADATA = "meta.pt"  # a distributed checkpoint's non-tensor state (Lightning's name)


def read_meta(checkpoint: Path) -> dict:
    """The checkpoint's contents (a file, mapped rather than read whole: the optimizer's state
    can be twice the model), or a distributed checkpoint's ``meta.pt`` (all but the shards)."""
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint (a .ckpt file, or an FSDP2 checkpoint's directory)")
    path = checkpoint / METADATA if checkpoint.is_dir() else checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is a directory without {METADATA}, so not a whole distributed checkpoint "
                                f"(a run killed while writing it?): export another one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=checkpoint.is_file())
    except Exception as error:
        raise ValueError(f"{path} cannot be read as a checkpoint ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); it may be truncated or not a checkpoint") from error


def run_directory(checkpoint: Path) -> Path | None:
    """``<run dir>`` of ``<run dir>/checkpoints/<name>``; None for a checkpoint moved elsewhere."""
    parent = checkpoint.absolute().parent
    return parent.parent if parent.name == "checkpoints" else None


def run_config(checkpoint: Path, meta: dict, config: Path | None = None) -> tuple[DictConfig, CardFacts, str]:
    """(config, what the model card states, where they came from): ``config`` when given, else
    the config the checkpoint keeps, else ``<run dir>/.hydra/config.yaml``."""
    card = meta.get(CARD_KEY) or {}
    step = int(meta.get("global_step", 0))
    if config is None and card.get("config"):
        facts = CardFacts(**{f.name: card[f.name] for f in fields(CardFacts) if f.name in card})
        facts.step = step
        return OmegaConf.create(card["config"]), facts, f"the checkpoint {checkpoint}"
    run_dir = run_directory(checkpoint)
    if config is None:
        if run_dir is None or not (run_dir / ".hydra" / "config.yaml").is_file():
            where = f"{run_dir}/.hydra/config.yaml does not exist" if run_dir else \
                "it is not in a run directory's checkpoints/ folder"
            raise FileNotFoundError(f"{checkpoint} keeps no config (written before checkpoints kept one), and {where}: "
                                    f"give the run's config with --config <run dir>/.hydra/config.yaml")
        config = run_dir / ".hydra" / "config.yaml"
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    cfg = OmegaConf.load(config)
    choices = {}
    hydra_file = Path(config).parent / "hydra.yaml"
    if hydra_file.is_file():  # the config groups the run picked, for the card
        picked = (yaml.safe_load(hydra_file.read_text()) or {}).get("hydra", {}).get("runtime", {}).get("choices", {})
        choices = {k: str(v) for k, v in picked.items() if v is not None and not k.startswith("hydra")}
    facts = CardFacts(step=step, choices=choices, config=OmegaConf.to_yaml(cfg, resolve=True),
                      base_model=cfg.model.get("path"), **_validation(meta))
    return cfg, facts, str(config)


def _validation(meta: dict) -> dict:
    """The latest validation figures, from the export callback's state in an older checkpoint."""
    for key, state in (meta.get("callbacks") or {}).items():
        if str(key).startswith("PolicyExport") and isinstance(state, dict) and state.get("validation"):
            return {"validation": state["validation"], "validation_step": state.get("validation_step")}
    return {}


def run_tokenizer(cfg: DictConfig, tokenizer: str | None, source: str):
    """The tokenizer the run trained with: ``tokenizer`` when given; else ``task.tokenizer``
    (a file task's, the model's directory by default); else the task's own (the built-in
    tasks build theirs)."""
    task = cfg.get("task") or {}
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if task.get("tokenizer"):
        return load_tokenizer(task.tokenizer, pad_token=task.get("pad_token"),
                              trust_remote_code=bool(task.get("trust_remote_code", False)))
    try:
        return instantiate(task).tokenizer
    except Exception as error:
        raise ValueError(f"the run's tokenizer: the config from {source} sets no task.tokenizer, and its task "
                         f"({task.get('_target_')}) could not be built to give its own ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}): give the tokenizer's "
                         f"directory with --tokenizer DIR") from error


def build_run_policy(cfg: DictConfig, tokenizer, source: str) -> nn.Module:
    """The run's policy as its config builds it (model.path loaded, or a fresh model from
    model.config and the seed; LoRA adapters added), on the CPU."""
    if "model" not in cfg:
        raise ValueError(f"the config from {source} has no model section: give the run's config with --config")
    try:
        return instantiate(cfg.model, tokenizer=tokenizer)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"the run's model.path ({cfg.model.get('path')}, from {source}) cannot be loaded "
                                f"here: {error}. Put the model there, or give --config with model.path set to "
                                f"where it is") from error


def load_policy_weights(policy: nn.Module, checkpoint: Path, meta: dict) -> int:
    """Load the checkpoint's policy weights into ``policy``; returns how many tensors. Every
    one must be a weight of the policy, of its shape, and every weight of the policy must be
    in it, but for a LoRA policy's frozen base (it comes from model.path) and a weight tied
    to one that is there."""
    own = policy.state_dict()
    if checkpoint.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        reader = FileSystemReader(str(checkpoint))
        stored = reader.read_metadata().state_dict_metadata
        names = {k[len(STATE) + 1 + len(PREFIX):]: getattr(v, "size", None) for k, v in stored.items()
                 if k.startswith(f"{STATE}.{PREFIX}")}
    else:
        if STATE not in meta:
            raise ValueError(f"{checkpoint} has no {STATE!r}: not a Lightning checkpoint of a run")
        reader = None
        names = {k[len(PREFIX):]: v.shape for k, v in meta[STATE].items() if k.startswith(PREFIX)}
    check_names(policy, own, names, checkpoint)
    if reader is not None:
        from torch.distributed.checkpoint import load

        # into the policy's own tensors, in place, and none of the optimizer's state
        load({STATE: {PREFIX + name: own[name] for name in names}}, storage_reader=reader, no_dist=True)
    else:
        policy.load_state_dict({name: meta[STATE][PREFIX + name] for name in names}, strict=False)
    return len(names)


def check_names(policy: nn.Module, own: dict[str, Tensor], names: dict, checkpoint: Path) -> None:
    if not names:
        raise ValueError(f"{checkpoint} holds no policy weights (no {PREFIX}* entry)")
    unknown = sorted(set(names) - set(own))
    if unknown:
        raise ValueError(f"{checkpoint} holds {unknown[0]} (and {len(unknown) - 1} more) that the policy of the run's "
                         f"config lacks: the config is not the one this checkpoint was trained with")
    for name, shape in names.items():
        if shape is not None and tuple(shape) != tuple(own[name].shape):
            raise ValueError(f"{checkpoint}: {name} is {list(shape)} there and {list(own[name].shape)} in the policy "
                             f"of the run's config: the config is not the one this checkpoint was trained with")
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad} if is_lora(policy) else set()
    loaded = {own[n].data_ptr() for n in names}
    missing = sorted(n for n in set(own) - set(names) if n not in frozen and own[n].data_ptr() not in loaded)
    if missing:
        raise ValueError(f"{checkpoint} lacks {missing[0]} (and {len(missing) - 1} more weights of the run's policy): "
                         f"the config is not the one this checkpoint was trained with")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge: bool = False, config: str | Path | None = None,
                      tokenizer: str | None = None) -> Path:
    """Write ``checkpoint``'s policy to ``out`` as a Hugging Face directory with its
    tokenizer and a model card: the model, a LoRA policy's adapter, or with ``merge`` the
    adapters merged into a plain model. Returns ``out``."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)
    cfg, facts, source = run_config(checkpoint, meta, None if config is None else Path(config))
    tok = run_tokenizer(cfg, tokenizer, source)
    policy = build_run_policy(cfg, tok, source)
    if merge and not is_lora(policy):
        raise ValueError(f"--merge: the run's policy has no LoRA adapters (model.lora.r is 0 in the config from "
                         f"{source}); export it without --merge")
    load_policy_weights(policy, checkpoint, meta)
    head = reward_head(cfg, policy, checkpoint, meta)
    del meta  # the checkpoint's other tensors (the optimizer's state) are not needed past here
    policy.eval()
    if head is not None:  # signal=reward_model: the decoder and its scalar head, as the run's own save writes them
        from lightning_unified.models.scalar_head import as_sequence_classifier

        out.mkdir(parents=True, exist_ok=True)
        as_sequence_classifier(policy, head, tok.pad_token_id).save_pretrained(str(out))
        tok.save_pretrained(str(out))
        write_model_card(out, facts, reward_model=True)
        return out
    if merge:
        policy = policy.merge_and_unload()
    save_policy(policy, tok, str(out))
    write_model_card(out, facts, adapter=is_lora(policy))
    return out


def reward_head(cfg: DictConfig, policy: nn.Module, checkpoint: Path, meta: dict) -> nn.Module | None:
    """A reward model's (signal=reward_model) scalar head, loaded from the checkpoint's
    ``objective.*`` weights; None for any other method. Without it the export would be the
    causal LM's untrained output head, not the model the run trained."""
    from lightning_unified.objectives import objective_for

    signal = cfg.get("signal")
    objective = objective_for(instantiate(signal, _convert_="all"), policy) if signal is not None else None
    if objective is None:
        return None
    if checkpoint.is_dir() or STATE not in meta:
        raise ValueError(f"{checkpoint}: a reward model's (signal=reward_model) checkpoint is a single .ckpt file "
                         f"(its runs are not sharded)")
    own = objective.state_dict()
    stored = {k[len(OBJECTIVE):]: v for k, v in meta[STATE].items() if k.startswith(OBJECTIVE)}
    if set(stored) != set(own):
        raise ValueError(f"{checkpoint}: the reward model's head holds {sorted(stored)} there and {sorted(own)} in "
                         f"the run's config: the config is not the one this checkpoint was trained with")
    objective.load_state_dict(stored)
    return objective.head
