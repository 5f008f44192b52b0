"""A model you can load at every checkpoint, not only at the end: every ``every`` optimizer
steps the policy is written in Hugging Face format to ``<directory>/step_<N>`` with a
model card (the method, the composed config, the latest validation figures), so a run that
dies at hour 30 leaves a model that ``from_pretrained`` loads. What the card states goes
into every checkpoint too, the composed config with it, so ``scripts/export.py`` can
rebuild the policy and its card from a checkpoint copied away from its run."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import lightning as L
from typing_extensions import override

from lightning_unified.models.lora import is_lora
from lightning_unified.models.model_card import CardFacts, write_model_card

# where a checkpoint keeps what its model card states (the composed config as YAML, the
# method, the validation figures): scripts/export.py rebuilds the policy and the card from it
CARD_KEY = "model_card"
# a directory being written: renamed to its name once whole, so a kill never leaves half a model
PARTIAL = ".partial"
MERGED = "_merged"


class PolicyExport(L.Callback):
    """``directory``: where the step exports go (``<run dir>/exports``); ``every``: optimizer
    steps between exports (None: none, only what :meth:`write` is asked for); ``keep``: the
    newest exports kept (None: all; an older one is deleted once a newer one is whole);
    ``merged``: with LoRA, also ``step_<N>_merged``, a plain model with the adapters merged
    in. ``config``, ``choices``, ``base_model``, ``method``: what the model card states (the
    composed config as YAML, the config groups picked, model.path, the method's one line).

    Every rank calls the writes: a sharded (FSDP2) policy is gathered first, a collective;
    global rank 0 alone writes the files."""

    def __init__(self, directory: str | Path, every: int | None = None, keep: int | None = 1, merged: bool = False,
                 config: str | None = None, choices: dict[str, str] | None = None, base_model: str | None = None,
                 method: str | None = None):
        for name, value in (("export_every", every), ("export_keep", keep)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or null, got {value!r}")
        self.directory, self.every, self.keep, self.merged = Path(directory), every, keep, merged
        self.config, self.choices, self.base_model, self.method = config, dict(choices or {}), base_model, method
        self.validation: dict[str, float] = {}
        self.validation_step: int | None = None
        self._exported = 0  # global_step // every at the last export (or at the start of fit)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run exports at the next multiple of every, not at its first step
        self._exported = trainer.global_step // self.every if self.every else 0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        # a batch may make several optimizer steps (PPO's epochs x mini-batches), so a
        # multiple of every can be passed over: export when a new one is reached
        step = trainer.global_step
        if not self.every or step // self.every <= self._exported:
            return
        self._exported = step // self.every
        target = self.directory / f"step_{step}"
        self.write(trainer, pl_module, target, target.with_name(target.name + MERGED) if self.merged else None)
        if trainer.is_global_zero:
            self._prune()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if figures:
            self.validation, self.validation_step = figures, trainer.global_step

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CARD_KEY] = asdict(self.facts(trainer.global_step))

    @override
    def state_dict(self) -> dict:
        # a resumed run's first export still states the figures measured before the kill
        return {"validation": dict(self.validation), "validation_step": self.validation_step}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.validation = dict(state_dict.get("validation") or {})
        self.validation_step = state_dict.get("validation_step")

    def facts(self, step: int) -> CardFacts:
        return CardFacts(step=step, method=self.method, choices=self.choices, config=self.config,
                         validation=self.validation, validation_step=self.validation_step, base_model=self.base_model)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, directory: str | Path,
              merged_directory: str | Path | None = None) -> None:
        """The policy (with LoRA: its adapter, plus the merged model in ``merged_directory``
        if given) and tokenizer in ``directory``, with a model card. Written as
        ``<directory>.partial`` and renamed once whole; an earlier ``directory`` is replaced.
        A reward model (an objective of its own, signal=reward_model) is written as one
        classifier, its adapters merged in: no adapter, no second merged directory."""
        directory = Path(directory)
        reward_model = getattr(pl_module, "objective", None) is not None
        adapter = is_lora(pl_module.policy) and not reward_model
        merged = Path(merged_directory) if merged_directory is not None and adapter else None
        partial, merged_partial = (None if d is None else d.with_name(d.name + PARTIAL) for d in (directory, merged))
        writer = trainer.is_global_zero
        if writer:
            for path in (partial, merged_partial):
                if path is not None and path.exists():
                    shutil.rmtree(path)  # a kill's leftover
        pl_module.save_pretrained(str(partial), None if merged is None else str(merged_partial))
        if not writer:
            return
        facts = self.facts(trainer.global_step)
        write_model_card(partial, facts, adapter=adapter, reward_model=reward_model)
        if merged is not None:
            write_model_card(merged_partial, facts)
        for done, final in ((partial, directory), (merged_partial, merged)):
            if done is not None:
                if final.exists():
                    shutil.rmtree(final)
                done.rename(final)

    def _prune(self) -> None:
        """Delete what a killed run left half-written, and all but the ``keep`` newest
        exports (a step's merged model with it)."""
        for leftover in self.directory.glob(f"*{PARTIAL}"):
            shutil.rmtree(leftover)
        if self.keep is None:
            return
        steps = sorted(int(p.name[len("step_"):]) for p in self.directory.glob("step_*")
                       if p.is_dir() and p.name[len("step_"):].isdigit())
        for step in steps[:-self.keep]:
            for path in (self.directory / f"step_{step}", self.directory / f"step_{step}{MERGED}"):
                if path.exists():
                    shutil.rmtree(path)


def policy_export(trainer: L.Trainer) -> PolicyExport | None:
    """The trainer's :class:`PolicyExport`, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, PolicyExport)), None)
