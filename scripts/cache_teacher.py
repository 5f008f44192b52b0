"""Write an offline teacher cache: the teacher's top-k log-probs on a task's training data.

It takes the same config as train.py, so the task (and its tokenization) is exactly the
one a distillation run reads; then that run loads no teacher:

    python scripts/cache_teacher.py experiment=distill +cache.out=teacher_cache +cache.top_k=64
    python scripts/train.py experiment=distill signal.cache=teacher_cache signal.top_k=64

Interrupted, the same command resumes from the first shard not yet written. The cache
records the teacher, k, temperature, the tokenizer and the dataset it was made for, and a
run with any other refuses it.
"""

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from lightning_unified.config import CONFIG_DIR, quiet_console
from lightning_unified.data.teacher_cache import write_teacher_cache
from lightning_unified.errors import report_named_errors

DEFAULTS = {"out": None, "top_k": 64, "shard_size": 1024, "batch_size": 16, "device": "cpu", "dtype": None}


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    with open_dict(cfg):
        cache = {**DEFAULTS, **(cfg.get("cache") or {})}
    if not cache["out"]:
        raise SystemExit("cache_teacher.py needs +cache.out=<directory> (and optionally +cache.top_k, "
                         "+cache.shard_size, +cache.batch_size, +cache.device, +cache.dtype)")
    with report_named_errors():  # a data or teacher error: its one message, no traceback
        datamodule = instantiate(cfg.task)
        if not hasattr(datamodule, "training_examples"):
            raise SystemExit(f"task {cfg.task._target_} has no training_examples(); a cache needs the task's token ids")
        examples = datamodule.training_examples()
        out = write_teacher_cache(
            examples, teacher=cfg.signal.get("teacher") or cfg.teacher.path, tokenizer=datamodule.tokenizer,
            out=Path(cache["out"]).expanduser().resolve(), top_k=int(cache["top_k"]),
            temperature=float(cfg.signal.get("temperature", 1.0)), shard_size=int(cache["shard_size"]),
            batch_size=int(cache["batch_size"]), device=cache["device"], dtype=cache["dtype"],
            dataset_id=str(cfg.task._target_), progress=True,
        )
    print(f"teacher cache: {out} ({len(examples)} examples, top-{cache['top_k']})")


if __name__ == "__main__":
    main()
