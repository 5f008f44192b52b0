"""The stages of a run in their declared order: a user's stage placed before or after a
named one, every stage's reads checked against the data's and earlier stages' writes
before training starts, and the stages' hooks called in that order."""

from __future__ import annotations

from collections.abc import Iterator

from lightning_unified import batch as fields
from lightning_unified.stages.base import Stage
from lightning_unified.stages.host import run_update_hooks


class PipelineError(ValueError):
    """Stages that cannot run in the order given; names the stages and the field."""


class BatchPipeline:
    """``stages`` in order. ``data_fields``: the fields the data gives each batch. ``loss_reads``:
    what ``training_step`` reads, checked after the last stage."""

    def __init__(self, stages: list[Stage], data_fields: set[str], loss_reads: set[str] = frozenset()):
        self.stages = list(stages)
        self.data_fields, self.loss_reads = set(data_fields), set(loss_reads)
        self.check()

    @classmethod
    def assemble(cls, method: list[Stage], added: list[Stage] | None, data_fields: set[str],
                 loss_reads: set[str] = frozenset()) -> BatchPipeline:
        """The method's stages with each of ``added`` placed where it asks (``before`` or
        ``after`` a named stage; at the end, just before the loss, when it names none)."""
        order = list(method)
        for i, stage in enumerate(added or []):
            where = f"module.stages[{i}]"
            if not isinstance(stage, Stage):
                raise TypeError(f"{where} must be a lightning_unified.stages.Stage, got {type(stage).__name__}: "
                                f"{stage!r}")
            names = [s.name for s in order]
            if stage.name in names:
                raise PipelineError(f"{where} ({type(stage).__name__}) is named {stage.name!r}, like a stage already "
                                    f"in the pipeline {names}: give it a name of its own (name=...)")
            anchor = stage.before or stage.after
            if anchor is None:
                order.append(stage)
                continue
            if anchor not in names:
                side = "before" if stage.before else "after"
                raise PipelineError(f"{where} ({type(stage).__name__}) goes {side} {anchor!r}, which this method's "
                                    f"pipeline does not have; its stages are {names}")
            at = names.index(anchor)
            order.insert(at if stage.before else at + 1, stage)
        return cls(order, data_fields, loss_reads)

    def check(self) -> None:
        """Every stage's reads are the data's or an earlier stage's writes; a field that a
        later stage writes names both stages."""
        available = set(self.data_fields)
        for i, stage in enumerate(self.stages):
            for field in sorted(stage.reads() - available):
                later = next((s for s in self.stages[i + 1:] if field in s.writes()), None)
                if later is not None:
                    raise PipelineError(f"stage {stage.name!r} reads {field!r}, which stage {later.name!r} writes after "
                                        f"it: place {stage.name!r} after {later.name!r} (the order is {self.names})")
                raise PipelineError(f"stage {stage.name!r} reads {field!r}, which neither the data nor a stage before "
                                    f"it writes (the order is {self.names}; the data gives {sorted(self.data_fields)})")
            available |= stage.writes()
        missing = sorted(self.loss_reads - available)
        if missing:
            raise PipelineError(f"training_step reads {missing}, which no stage writes (the order is {self.names})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; the stages are {self.names}")

    def each(self, hook: str, *args) -> None:
        """Every stage's ``hook`` (setup, on_fit_start, on_train_start, teardown), in order."""
        for stage in self.stages:
            getattr(stage, hook)(*args)

    def run(self, trainer, host, batch: dict, batch_idx: int) -> None:
        """Every stage's fields, in order; then what the loss reads is there (a loader of
        one's own that gives other fields is named here, before any forward)."""
        for stage in self.stages:
            stage.run(trainer, host, batch, batch_idx)
        fields.require(batch, *sorted(self.loss_reads), who="training_step")

    def on_update(self, trainer, host, batch: dict) -> None:
        """Before every optimizer step, on its rows: each stage's per-update fields, then
        the trainer's callbacks' (:class:`~lightning_unified.stages.host.UpdateHook`)."""
        for stage in self.stages:
            stage.on_update(trainer, host, batch)
        run_update_hooks(trainer, host, batch)

    def after_batch(self, trainer, host, outputs, batch: dict, batch_idx: int) -> None:
        for stage in self.stages:
            stage.after_batch(trainer, host, outputs, batch, batch_idx)

    def state_dict(self) -> dict:
        """{stage name: its state}, for the stages that keep any."""
        return {s.name: state for s in self.stages if (state := s.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for stage in self.stages:
            stage.load_state_dict(state.get(stage.name, {}))
