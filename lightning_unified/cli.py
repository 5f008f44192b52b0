"""Train from one YAML file with Lightning's own ``LightningCLI``, without Hydra.

    python -m lightning_unified.cli fit --config examples/lightning_cli/sft.yaml

jsonargparse reads the type hints of what the file configures, so every value is checked
against them before anything loads (``--help`` lists them; ``--print_config`` writes a whole
file to start from):

- ``model``: :class:`~lightning_unified.module.UnifiedModule`'s arguments. ``data_source``
  and ``signal`` are the specs themselves (:mod:`lightning_unified.specs`), each a
  ``class_path`` with its ``init_args``; ``optimizer`` a class (``torch.optim.AdamW``) and
  ``scheduler`` one of :class:`~lightning_unified.schedule.TransformersSchedule` (the run's
  steps when its length is left out).
- ``data``: any ``LightningDataModule`` by ``class_path``; the module takes its tokenizer.
- ``policy``: the model to train (:class:`Policy`: a directory, or a fresh model from a
  transformers config), built with that tokenizer.
- ``trainer``: Lightning's ``Trainer``. ``max_steps`` > 0 is the run's length whatever the
  epochs, as with ``scripts/train.py``; the progress bar counts steps.
"""

from __future__ import annotations

import dataclasses
import typing

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_unified import specs
from lightning_unified.callbacks.progress_bar import step_progress_bar
from lightning_unified.config import quiet_console
from lightning_unified.errors import report_named_errors
from lightning_unified.module import UnifiedModule
from lightning_unified.schedule import epochs_for


@dataclasses.dataclass
class Policy:
    """The policy to train, as ``conf/model/*.yaml`` gives it: ``path`` (a Hugging Face
    directory) or, when it is null, a fresh model from ``config`` (``model_type`` and its
    fields) initialised from ``seed``; the rest as
    :func:`~lightning_unified.models.build_policy` takes them (its ``tokenizer`` is the
    datamodule's)."""

    path: str | None = None
    config: dict | None = None
    seed: int = 0
    dtype: str | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora: dict | None = None
    gradient_checkpointing: bool = False


def build_policy_for(policy: Policy, data: LightningDataModule):
    """``policy`` built with ``data``'s tokenizer (the link into ``model.policy``)."""
    from lightning_unified.models import build_policy

    return build_policy(data.tokenizer, **dataclasses.asdict(policy))


def concrete_init_hints(*classes: type) -> None:
    """Each dataclass among ``classes`` whose ``__init__`` is its own (``init=False``) gets that
    ``__init__``'s annotations resolved in place. jsonargparse types a dataclass's arguments
    by the class's field annotations where they are postponed strings; ``Dense`` takes the keys
    users type (``teacher`` a directory, ``engine``, ``url``, ...) and keeps the teacher they
    resolve to in its fields, so its fields' types would refuse a directory."""
    for cls in classes:
        params = getattr(cls, "__dataclass_params__", None)
        if params is not None and not params.init:
            cls.__init__.__annotations__ = typing.get_type_hints(cls.__init__)


concrete_init_hints(*(getattr(specs, name) for name in specs.__all__ if isinstance(getattr(specs, name), type)))


class UnifiedCLI(LightningCLI):
    """``LightningCLI`` for :class:`UnifiedModule` and any datamodule with a ``tokenizer``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(UnifiedModule, LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Policy, "policy")
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")
        parser.link_arguments(("policy", "data"), "model.policy", compute_fn=build_policy_for, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        # trainer.max_steps > 0 overrides the epochs: the data loops as often as the steps take
        trainer.max_epochs = epochs_for(trainer.max_steps, trainer.max_epochs)

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        others = [*given, *(self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys),
                  *(self.trainer_defaults.get("callbacks") or [])]
        return super().instantiate_trainer(callbacks=[*given, *step_progress_bar(config, others)], **kwargs)


def main(args: list[str] | None = None) -> UnifiedCLI:
    quiet_console()
    with report_named_errors():  # a config or data error: its one message, no traceback
        return UnifiedCLI(args=args)


if __name__ == "__main__":
    main()
