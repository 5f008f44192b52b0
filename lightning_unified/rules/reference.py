"""The rules of the KL penalty's reference: which estimator a reference with its own
tokenizer allows, and where each engine finds the model."""

from __future__ import annotations

from lightning_unified.rules import rule


@rule("reference-across-tokenizers-is-k1", "reference", "reference.tokenizer", "reference.estimator")
def reference_across_tokenizers_is_k1(reference) -> str | None:
    """Across tokenizers only the sum over a reply is exact: the k1 estimator."""
    if reference.tokenizer == "auto" and reference.estimator != "k1":
        return (f"reference.estimator={reference.estimator} compares the policy and the reference token by token, "
                f"which a reference with its own tokenizer (reference.tokenizer=auto) does not allow; "
                f"reference.estimator=k1 sums the log-ratio over the reply, which spans give exactly")
    return None


@rule("reference-across-tokenizers-needs-path", "reference", "reference.tokenizer", "reference.path")
def reference_across_tokenizers_needs_path(reference) -> str | None:
    """A reference with its own tokenizer reads that tokenizer from its directory."""
    if reference.tokenizer == "auto" and not reference.path:
        return ("reference.tokenizer=auto encodes each reply with the reference's own tokenizer: set "
                "reference.path=DIR (its directory; with reference.engine=server, a local directory holding the "
                "served model's tokenizer)")
    return None


@rule("reference-unencodable-across-tokenizers", "reference", "reference.unencodable_logp", "reference.tokenizer")
def reference_unencodable_across_tokenizers(reference) -> str | None:
    """unencodable_logp is a log-prob (<= 0), for a reference with its own tokenizer."""
    value = reference.unencodable_logp
    if value is not None and (reference.tokenizer != "auto" or value > 0):
        return (f"reference.unencodable_logp={value} is the log-prob (<= 0) a reference with its own tokenizer "
                f"(reference.tokenizer=auto) gives a token it cannot encode")
    return None


@rule("reference-vllm-needs-path", "reference", "reference.engine", "reference.path")
def reference_vllm_needs_path(reference) -> str | None:
    """A vLLM engine loads the reference from its directory (the starting policy has none)."""
    if reference.engine == "vllm" and not reference.path:
        return ("reference.engine=vllm loads the reference from a local Hugging Face directory: set reference.path "
                "(the starting policy's directory, for a KL to where training began)")
    return None
