"""Policies, teachers and reference models: any Hugging Face causal LM, from a local
directory (or a hub id where a hub is reachable) or built from a config; their tokenizer;
and the checks that a model, its tokenizer and a teacher belong together. The forward pass
every stage shares is :mod:`lightning_unified.models.forward`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)


from lightning_unified.models.loss_head import install_loss_head
from lightning_unified.specs.model import ModelRef
from lightning_unified.models.precision import MASTER_DTYPE

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)} or null, got {dtype!r}")
    return DTYPES[dtype]


def _looks_local(path: str | Path) -> bool:
    text = str(path)
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """``from_pretrained`` on a local directory, or on a hub id (``org/name``) where a hub
    is reachable. ``trust_remote_code`` stays off unless asked for: a checkpoint's own
    Python code runs only with the user's consent."""
    if _looks_local(path):
        path = check_model_directory(path, weights=True)
    kwargs = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise FileNotFoundError(
            f"could not load a causal LM from {str(path)!r}: not a local checkpoint directory, and the hub "
            f"({error.__class__.__name__}) did not give one"
        ) from error
    check_causal(model, str(path))
    return model


def load_model(ref: ModelRef) -> PreTrainedModel:
    """The causal LM a :class:`~lightning_unified.specs.ModelRef` names, loaded with its
    options: how the policy, a teacher and a reference are all loaded."""
    return load_causal_lm(ref.path, **ref.options)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_directory(path: str | Path, *, weights: bool = False, tokenizer: bool = False) -> Path:
    """``path`` as a local Hugging Face directory, or an error that says what is wrong with
    it: missing, a file, no config.json (a model's), no weights, no tokenizer files (a
    tokenizer's, which needs no config.json)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a model directory, as save_pretrained writes it, was expected)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; give the model's directory (the one save_pretrained wrote)")
    if not tokenizer and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face model directory "
                                f"(it holds {found or 'nothing'})")
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{path} has a config.json but no weights (one of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())[:8]
        raise FileNotFoundError(f"{path} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}; it holds "
                                f"{found or 'nothing'}): save the tokenizer there too (tokenizer.save_pretrained), "
                                f"or set task.tokenizer")
    return path


@torch.no_grad()
def check_causal(model: nn.Module, name: str) -> None:
    """Refuse a model whose outputs see later tokens (an encoder such as BERT loaded as a
    language-model head): trained as a policy it would learn from the future. Changing the
    last of four tokens must leave the first three positions' logits as they were."""
    vocab = model.get_output_embeddings().weight.shape[0]
    first, second = (torch.tensor([[1, 2, 3, last]]) % vocab for last in (4, 5))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        a, b = (model(input_ids=ids.to(device)).logits[0, :3].float() for ids in (first, second))
    finally:
        model.train(was_training)
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):  # a causal model computes those positions identically
        raise ValueError(f"{name}: {type(model).__name__} is not a causal decoder (its output at a position changes "
                         f"when a later token does); only causal language models train as policy, teacher or "
                         f"reference")


def has_tokenizer(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_dir() and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, *, pad_token: str | None = None, trust_remote_code: bool = False
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory, ready for batches: prompts are left-padded, and
    a tokenizer without a pad token gets ``pad_token`` (default: its EOS), said in the log."""
    if _looks_local(path):
        path = check_model_directory(path, tokenizer=True)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if pad_token is not None and pad_token != tokenizer.pad_token:
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(f"pad_token {pad_token!r} is not a token of the tokenizer at {path}")
        tokenizer.pad_token = pad_token
        log.info("tokenizer %s: pad token set to %r (configured)", path, pad_token)
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer at {path} has neither a pad token nor an EOS token; set task.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
        log.warning("tokenizer %s has no pad token: using its EOS token %r for padding (padding is masked out "
                    "of every loss; set task.pad_token to choose another)", path, tokenizer.eos_token)
    return tokenizer


def build_policy(
    tokenizer: PreTrainedTokenizerBase,
    path: str | None = None,
    config: dict | None = None,
    seed: int = 0,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    lora: dict | None = None,
    gradient_checkpointing: bool = False,
) -> PreTrainedModel | nn.Module:
    """The policy to train: from ``path`` when given, else a fresh model built from
    ``config`` (``model_type`` plus its fields; vocabulary and special ids come from the
    tokenizer), initialised from ``seed``. ``dtype`` is its weights' (and so the optimizer
    state's) dtype; None is float32 whatever the checkpoint's, the trainer's precision
    (``bf16-mixed``) making the compute bf16: bf16 weights lose updates below about 1/256 of a
    weight (:mod:`lightning_unified.models.precision`). ``lora`` (r, alpha, dropout, target_modules)
    wraps it in peft adapters, so only those train; ``r: 0`` leaves it off.
    ``gradient_checkpointing``: keep only each decoder layer's input through the forward
    and recompute the rest in the backward (one more forward's time, a fraction of the
    activations' memory: with LoRA too, the backward runs through every layer)."""
    dtype = dtype or MASTER_DTYPE  # master weights: never the checkpoint's bf16 by default
    if path is not None:
        model = load_model(ModelRef(path, dtype, attn_implementation, trust_remote_code))
        check_tokenizer_matches(model, tokenizer, str(path))
    elif config is not None:
        config = dict(config)
        model_type = config.pop("model_type", "llama")
        hf_config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **config,
        )
        if attn_implementation is not None:
            hf_config._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=_dtype(dtype))
    else:
        raise ValueError("model: give either path (a local Hugging Face directory) or config")
    check_vocabulary(model, tokenizer, "model")
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")
        # non-reentrant: recomputes under FSDP2 and with frozen inputs (LoRA) alike
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora and lora.get("r"):
        from lightning_unified.models.lora import add_lora

        model = add_lora(model, **lora)
    return model


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return f"the tokenizer {name}" if name else f"the task's own tokenizer ({len(tokenizer)} tokens)"


def vocabulary_difference(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> str | None:
    """None when the two tokenizers map every token to the same id; else what differs:
    the sizes, or the first id whose token differs."""
    if len(a) != len(b):
        return f"sizes differ: {len(a)} tokens against {len(b)}"
    by_id_a = {i: t for t, i in a.get_vocab().items()}
    by_id_b = {i: t for t, i in b.get_vocab().items()}
    for i in sorted(set(by_id_a) | set(by_id_b)):
        if by_id_a.get(i) != by_id_b.get(i):
            return f"token {i} differs: {by_id_a.get(i)!r} against {by_id_b.get(i)!r}"
    return None


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str) -> None:
    """A model and the tokenizer that feeds it must belong together. When the model's
    directory has its own tokenizer, the two vocabularies must be the same; a task that
    brings a tokenizer of its own (the built-in one) cannot feed another model's ids."""
    if has_tokenizer(path):
        own = AutoTokenizer.from_pretrained(path)
        difference = vocabulary_difference(tokenizer, own)
        if difference:
            raise ValueError(
                f"{_tokenizer_name(tokenizer)} does not belong to the model at {path}, whose own "
                f"tokenizer maps tokens differently ({difference}). Use the model's tokenizer (task=files takes "
                f"it from model.path), or a model trained with this tokenizer"
            )
        return
    rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    # checkpoints pad their vocabulary to a multiple of 64 or 128; more than that means another tokenizer
    if rows is not None and rows - len(tokenizer) >= 256:
        raise ValueError(
            f"the model at {path} has a vocabulary of {rows} tokens but {_tokenizer_name(tokenizer)} has "
            f"{len(tokenizer)}: they do not belong together"
        )


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{what}: {type(model).__name__} has no output embeddings (lm_head); a causal LM is needed")
    if head.weight.shape[0] < len(tokenizer):
        raise ValueError(
            f"{what} has a vocabulary of {head.weight.shape[0]} tokens but the tokenizer has {len(tokenizer)}"
        )
    if getattr(model.config, "final_logit_softcapping", None):
        raise NotImplementedError(
            f"{what} soft-caps its logits (final_logit_softcapping); the chunked loss computes the "
            f"logits as a linear map of the hidden states and does not train such heads"
        )


# a teacher with another tokenizer is aligned span by span instead (teachers/tokenizers.py)
_ACROSS_HINT = ("; to distil from it anyway, set signal.teacher_tokenizer=auto (each reply re-encoded with the "
                "teacher's tokenizer and compared span by span: signal.divergence=sampled_reverse_kl, uld or "
                "uld_hybrid)")


def check_same_vocabulary(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, other: nn.Module,
                          other_path: str | None, what: str) -> None:
    """A teacher or reference compares distributions with the policy token by token, so
    both must share one vocabulary: the same head size, and, where the other model's
    directory has a tokenizer, the same token for every id. The error says which differs."""
    check_vocabulary_of(policy, tokenizer, other.get_output_embeddings().weight.shape[0], other_path, what)


def check_vocabulary_of(policy: nn.Module, tokenizer: PreTrainedTokenizerBase, other_rows: int,
                        other_path: str | None, what: str) -> None:
    """:func:`check_same_vocabulary` for a model known by its head size ``other_rows`` (its
    config's ``vocab_size``) and its directory, without loading it."""
    policy_rows = policy.get_output_embeddings().weight.shape[0]
    if other_rows != policy_rows:
        raise ValueError(
            f"{what} has a vocabulary of {other_rows} tokens and the policy {policy_rows}; a dense signal "
            f"compares distributions over one shared vocabulary (sizes differ){_ACROSS_HINT if 'teacher' in what else ''}"
        )
    if has_tokenizer(other_path):
        difference = vocabulary_difference(tokenizer, AutoTokenizer.from_pretrained(other_path))
        if difference:
            raise ValueError(f"{what} uses another tokenizer than the policy: {difference}"
                             f"{_ACROSS_HINT if 'teacher' in what else ''}")


def trainable_policy(policy, tokenizer):
    """(policy, tokenizer) ready to train: loaded when given as paths (the policy in float32), their vocabularies
    checked against each other, the policy in train mode with the loss head installed (the
    loss runs inside the head's forward, which FSDP2 needs)."""
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    # a path loads as float32 master weights, as build_policy's default
    model = load_causal_lm(policy, dtype=MASTER_DTYPE) if isinstance(policy, str) else policy
    if not isinstance(model, nn.Module):
        raise TypeError(f"policy must be a Hugging Face causal LM or a path to one, got {type(policy).__name__}")
    check_vocabulary(model, tokenizer, "policy")
    model.train()  # from_pretrained returns eval mode; Lightning toggles it from here on
    install_loss_head(model)
    return model, tokenizer
