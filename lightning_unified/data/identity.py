"""What a run trained on, kept in its checkpoints, so that a resumed run refuses data that
has changed since: a resumed run continues the data loader's place in the training set
(which examples it has seen this epoch, in which order), and in another set that place
names other examples, or ones that no longer exist."""

from __future__ import annotations

import hashlib
import json

from lightning_unified.data.files import DataError


def data_identity(examples: list[dict], source: str) -> dict:
    """{source, examples, digest} of the training examples (their token ids, in order)."""
    digest = hashlib.sha256()
    for example in examples:
        row = [example.get(k) for k in ("prompt_ids", "response_ids", "loss_mask", "chosen_ids", "rejected_ids",
                                         "prompt", "response", "rejected")]
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return {"source": source, "examples": len(examples), "digest": digest.hexdigest()[:16]}


def check_same_data(saved: dict | None, current: dict) -> None:
    """Refuse to resume on training data other than the checkpoint's, naming both. A
    checkpoint written before this was kept (``saved`` None) is not checked."""
    if not saved or "examples" not in saved:
        return
    advice = ("resume with the data the run started with, or start a new run from its policy "
              "(model.path=<run dir>/policy)")
    if saved["examples"] != current["examples"]:
        raise DataError(f"resume: the checkpoint was trained on {saved['examples']} examples of {saved['source']}, "
                        f"but {current['source']} now holds {current['examples']}: its place in the data would name "
                        f"examples that are not there; {advice}")
    if saved.get("digest") != current["digest"]:
        raise DataError(f"resume: {current['source']} holds {current['examples']} examples, as the checkpoint's "
                        f"{saved['source']} did, but not the same ones (their tokens differ); {advice}")
