"""Convert any checkpoint of a run into a Hugging Face directory (with its tokenizer and a
model card) that ``AutoModelForCausalLM.from_pretrained`` loads.

    python scripts/export.py outputs/run/checkpoints/last.ckpt outputs/run/hf
    python scripts/export.py outputs/run/checkpoints/last.ckpt outputs/run/hf --merge   # LoRA merged

CKPT: a one-process or DDP ``.ckpt`` file, or an FSDP2 distributed checkpoint (a directory
of shards; ``last.ckpt`` links to the latest), read in one process. The policy is rebuilt
from the config the checkpoint keeps, else ``<run dir>/.hydra/config.yaml``, else
``--config``; its tokenizer from ``--tokenizer``, else the run's task. A LoRA policy is
written as its adapter (peft loads it onto the base model) or, with ``--merge``, merged.
The logic is :mod:`lightning_unified.export`.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt file, or an FSDP2 checkpoint's directory")
    parser.add_argument("out", help="the Hugging Face directory to write")
    parser.add_argument("--merge", action="store_true", help="LoRA: merge the adapters into a plain model")
    parser.add_argument("--config", help="the run's composed config (default: the checkpoint's own, else "
                                         "<run dir>/.hydra/config.yaml)")
    parser.add_argument("--tokenizer", help="the tokenizer's directory (default: the run's task's)")
    args = parser.parse_args(argv)

    from lightning_unified.errors import HINT, named_error
    from lightning_unified.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, config=args.config,
                                tokenizer=args.tokenizer)
    except Exception as error:
        # a problem the package names: one line, no traceback; anything else (a bug, a
        # library's own failure) keeps its traceback, as does every error with HYDRA_FULL_ERROR=1
        if named_error(error) is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"export: {error}\n{HINT}")
    print(f"wrote {out} (Hugging Face format)")


if __name__ == "__main__":
    main()
