"""An offline teacher: a dataset's top-k teacher log-probs, written once, read by distillation.

A cache is a directory:

- ``manifest.json``: what made it (the teacher, k, temperature, the tokenizer's
  fingerprint) and what it covers (the dataset's fingerprint, its example count, the shard
  size). A run refuses a cache whose tokenizer, dataset, teacher, k or temperature differ
  from its own, naming the field.
- ``shard-00000.pt`` ...: ``shard_size`` consecutive examples each: ``ids`` [T, K] int32 and
  ``logp`` [T, K] float32 (the teacher's top-k ids and log-probs at every response token),
  ``tail`` [T] (the teacher's mass outside the top-k), and ``offsets`` [n + 1], where example
  i of the shard owns tokens ``offsets[i]:offsets[i + 1]``. Each shard is written to a
  temporary file and moved into place, so a shard that exists is whole: an interrupted
  writer resumes from the first missing shard.

Examples are identified by their index in the data module's training examples
(``batch.EXAMPLE_INDEX``), and each cached example's length is checked against the batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CacheMismatch(ValueError):
    """A teacher cache made for another tokenizer, dataset, teacher or setting."""


def tokenizer_fingerprint(tokenizer) -> dict:
    """The vocabulary a cache's token ids mean: its size and a hash of token -> id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(vocab), "sha256": digest}


def examples_fingerprint(examples: list[dict]) -> str:
    """A hash of every example's prompt and response ids, in order."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([list(example["prompt_ids"]), list(example["response_ids"])]).encode())
    return digest.hexdigest()


def teacher_id(teacher: str) -> str:
    """A teacher as a cache records it: a local directory as its absolute path, else the name."""
    path = Path(teacher)
    return str(path.resolve()) if path.exists() else str(teacher)


def shard_path(directory: Path, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:05d}.pt"


def _manifest(examples, teacher, tokenizer, top_k, temperature, shard_size, dataset_id) -> dict:
    return {
        "format": FORMAT_VERSION,
        "teacher": teacher_id(teacher),
        "top_k": top_k,
        "temperature": temperature,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dataset": {"id": dataset_id, "num_examples": len(examples), "sha256": examples_fingerprint(examples)},
        "shard_size": shard_size,
    }


def _check_manifest_fields(saved: dict, wanted: dict, where: Path, fields: tuple[str, ...]) -> None:
    for name in fields:
        if saved.get(name) != wanted.get(name):
            raise CacheMismatch(f"{where / MANIFEST}: the cache was made with {name}={saved.get(name)!r}, this run has "
                                f"{name}={wanted.get(name)!r}; write a new cache (scripts/cache_teacher.py) or point "
                                f"signal.cache at the right one")


@torch.no_grad()
def write_teacher_cache(
    examples: list[dict],
    *,
    teacher: str,
    tokenizer,
    out: str | Path,
    top_k: int,
    temperature: float = 1.0,
    shard_size: int = 1024,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str | None = None,
    dataset_id: str = "",
    progress: bool = False,
) -> Path:
    """Score ``examples`` ({prompt_ids, response_ids}) with ``teacher`` and write the cache to
    ``out``; shards already there are kept (a resumed write). Returns ``out``."""
    from lightning_unified.data.collate import pad
    from lightning_unified.losses.objective import topk_logprobs
    from lightning_unified.models.loading import check_vocabulary, load_causal_lm
    from lightning_unified.models.forward import output_head, response_hidden

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(examples, teacher, tokenizer, top_k, temperature, shard_size, dataset_id)
    if (out / MANIFEST).is_file():  # resuming: the same job, or refuse to mix two
        _check_manifest_fields(json.loads((out / MANIFEST).read_text()), manifest, out,
                               ("format", "teacher", "top_k", "temperature", "tokenizer", "dataset", "shard_size"))
    else:
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))

    model = None
    shards = math.ceil(len(examples) / shard_size)
    todo = [s for s in range(shards) if not shard_path(out, s).is_file()]
    iterator = todo
    if progress:
        from tqdm import tqdm

        iterator = tqdm(todo, desc=f"teacher cache -> {out}", unit="shard")
    for shard in iterator:
        if model is None:
            options = {"dtype": dtype} if dtype else {}
            model = load_causal_lm(teacher, **options).to(device).eval().requires_grad_(False)
            check_vocabulary(model, tokenizer, f"teacher {teacher}")
        part = examples[shard * shard_size: (shard + 1) * shard_size]
        ids, logp, lengths = [], [], []
        for start in range(0, len(part), batch_size):
            rows = part[start:start + batch_size]
            prompt_ids, prompt_mask = pad([list(r["prompt_ids"]) for r in rows], tokenizer.pad_token_id, "left")
            response_ids, response_mask = pad([list(r["response_ids"]) for r in rows], tokenizer.pad_token_id, "right")
            hidden = response_hidden(model, prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                                     response_mask.to(device))
            weight, bias = output_head(model)
            top_ids, top_logp = topk_logprobs(hidden, weight, top_k, head_bias=bias, temperature=temperature)
            for i, row in enumerate(rows):
                n = len(row["response_ids"])
                ids.append(top_ids[i, :n].to("cpu", torch.int32))
                logp.append(top_logp[i, :n].float().cpu())
                lengths.append(n)
        logp_all = torch.cat(logp)
        payload = {
            "ids": torch.cat(ids),
            "logp": logp_all,
            "tail": (1.0 - logp_all.exp().sum(-1)).clamp_min(0.0),
            "offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long),
        }
        tmp = shard_path(out, shard).with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, shard_path(out, shard))  # a shard that exists is whole
    return out


class TeacherCache:
    """Reads a cache for a run: checks it against the run's tokenizer, training examples,
    teacher, k and temperature, then hands out the rows of a batch."""

    def __init__(self, directory: str | Path, *, max_shards_in_memory: int = 8):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"signal.cache={directory}: no {MANIFEST} there; write the cache first with "
                                    f"scripts/cache_teacher.py")
        self.manifest = json.loads(path.read_text())
        self._shards: OrderedDict[int, dict] = OrderedDict()
        self._max = max_shards_in_memory

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    def check(self, *, tokenizer, examples: list[dict] | None, teacher: str | None, top_k: int,
              temperature: float) -> None:
        """Refuse a cache made for anything else than this run, naming what differs."""
        wanted = {"format": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
                  "temperature": temperature}
        fields = ("format", "tokenizer", "temperature")
        if teacher is not None:
            wanted["teacher"] = str(teacher)
            fields += ("teacher",)
        _check_manifest_fields(self.manifest, wanted, self.directory, fields)
        if top_k > self.top_k:
            raise CacheMismatch(f"{self.directory / MANIFEST}: the cache holds the teacher's top-{self.top_k}; "
                                f"signal.top_k={top_k} asks for more")
        if examples is not None:
            dataset = self.manifest["dataset"]
            mine = {"num_examples": len(examples), "sha256": examples_fingerprint(examples)}
            if (dataset["num_examples"], dataset["sha256"]) != (mine["num_examples"], mine["sha256"]):
                raise CacheMismatch(
                    f"{self.directory / MANIFEST}: the cache was made for another dataset ({dataset['num_examples']} "
                    f"examples, sha256 {dataset['sha256'][:12]}...; this run's training data has "
                    f"{mine['num_examples']}, sha256 {mine['sha256'][:12]}...)")
        missing = [s for s in range(math.ceil(self.manifest["dataset"]["num_examples"] / self.manifest["shard_size"]))
                   if not shard_path(self.directory, s).is_file()]
        if missing:
            raise CacheMismatch(f"{self.directory}: shard {missing[0]} of the cache is missing (an interrupted write?); "
                                f"run scripts/cache_teacher.py again to finish it")

    def _shard(self, shard: int) -> dict:
        if shard not in self._shards:
            self._shards[shard] = torch.load(shard_path(self.directory, shard), weights_only=True)
            while len(self._shards) > self._max:
                self._shards.popitem(last=False)
        self._shards.move_to_end(shard)
        return self._shards[shard]

    def rows(self, indices: Tensor, response_mask: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
        """([B, R, k] ids, [B, R, k] log-probs) for the examples ``indices`` [B], laid out
        like the batch's right-padded responses; padding gets id 0 and log-prob 0."""
        rows, width = response_mask.shape
        ids = torch.zeros(rows, width, top_k, dtype=torch.long)
        logp = torch.zeros(rows, width, top_k, dtype=torch.float32)
        size = self.manifest["shard_size"]
        lengths = response_mask.sum(-1).tolist()
        for row, index in enumerate(indices.tolist()):
            shard = self._shard(index // size)
            start, stop = shard["offsets"][index % size].item(), shard["offsets"][index % size + 1].item()
            if stop - start != lengths[row]:
                raise CacheMismatch(f"{self.directory}: example {index} has {stop - start} response tokens in the cache "
                                    f"and {lengths[row]} in the batch; the cache was made for other data")
            ids[row, :stop - start] = shard["ids"][start:stop, :top_k].long()
            logp[row, :stop - start] = shard["logp"][start:stop, :top_k]
        return ids.to(response_mask.device), logp.to(response_mask.device)
