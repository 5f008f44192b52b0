"""Score policies on held-out questions and test whether a trained one beats where it started.

    python scripts/evaluate.py data/smollm2/test.jsonl data/smollm2/model outputs/run/policy \
        --max-new-tokens 16 --reward numeric_answer --engine vllm

Each policy (a Hugging Face directory with its tokenizer: the model a run starts from, or the
``policy`` directory a run saves) answers every prompt of the file greedily, as validation
does, and each answer is scored by the reward. It prints each policy's accuracy, then for
every policy after the first the questions only it gets right, those only the first gets
right, and McNemar's exact p-value: whether the gain is more than held-out noise.
``--out FILE.jsonl`` keeps every answer and score, one line per question.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REWARDS = ("exact_match", "numeric_answer")


def parse_columns(pairs: list[str]) -> dict[str, str]:
    columns = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise SystemExit(f"--columns takes NAME=COLUMN pairs (prompt=question), got {pair!r}")
        columns[name] = column
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="held-out prompts with a reference column (JSONL, JSON, CSV, Parquet)")
    parser.add_argument("models", type=Path, nargs="+", help="policy directories; the first is the baseline")
    parser.add_argument("--max-new-tokens", type=int, required=True,
                        help="the longest answer, in tokens (the run's task.max_response_tokens)")
    parser.add_argument("--reward", choices=REWARDS, default="exact_match",
                        help="how an answer is scored against the reference")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="the engine that generates")
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM's KV cache (null: 1 GiB on a CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--columns", nargs="*", default=[], metavar="NAME=COLUMN",
                        help="the file's column names, as task.columns (prompt=question reference=answer)")
    parser.add_argument("--out", type=Path, default=None, help="every answer and its score, one JSON line per question")
    args = parser.parse_args()
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    columns = parse_columns(args.columns)
    twice = sorted({str(m) for m in args.models if args.models.count(m) > 1})
    if twice:
        raise SystemExit(f"each policy once: {twice} named more than once")
    # imported once the arguments are good: a mistyped command fails in a second, not after torch loads
    from lightning_unified.evaluation import greedy_answers, paired_comparison
    from lightning_unified.rewards import text

    reward = getattr(text, args.reward)
    options = {"kv_cache_gib": args.kv_cache_gib} if args.engine == "vllm" else None
    results = {}
    for model in args.models:
        answers = greedy_answers(model, args.data, {args.reward: reward},
                                 max_new_tokens=args.max_new_tokens, engine=args.engine, engine_options=options,
                                 batch_size=args.batch_size, columns=columns, progress=True)
        results[model] = answers
        scores = answers.scores[args.reward]
        # NaN: an answer the reward could not score (it raised on it), left out and said
        scored = [score for score in scores if score == score]
        unscored = f" ({len(scores) - len(scored)} the reward could not score, left out)" if len(scored) < len(scores) else ""
        mean = sum(scored) / len(scored) if scored else float("nan")
        print(f"{model}: {args.reward} = {mean:.4f} on {len(scored)} questions{unscored}", flush=True)
    first = args.models[0]
    for model in args.models[1:]:
        pairs = [(a, b) for a, b in zip(results[first].scores[args.reward], results[model].scores[args.reward])
                 if a == a and b == b]  # the questions both answers were scored on
        left_out = len(results[first].scores[args.reward]) - len(pairs)
        paired = paired_comparison([a for a, _ in pairs], [b for _, b in pairs])
        print(f"{model} against {first}: right only after {paired.only_second}, right only before "
              f"{paired.only_first}, both {paired.both}, neither {paired.neither}; exact McNemar "
              f"p = {paired.p_value:.2g}" + (f" ({left_out} questions left out: a score is missing)" if left_out else ""))
    if args.out is not None:
        with args.out.open("w") as f:
            for i in range(len(results[first].completions)):
                f.write(json.dumps({str(m): {"answer": r.completions[i], args.reward: r.scores[args.reward][i]}
                                    for m, r in results.items()}) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    from lightning_unified.errors import report_named_errors

    with report_named_errors():  # a data or model error: its one message, no traceback
        sys.exit(main())
