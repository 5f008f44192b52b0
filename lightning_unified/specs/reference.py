"""A KL penalty to a frozen reference: ``reference``."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_unified.rules import enforce
from lightning_unified.specs.checks import one_of
from lightning_unified.specs.model import ModelRef
from lightning_unified.specs.teacher import TEACHER_ENGINES, TeacherEntry, teacher_entry
from lightning_unified.typecheck import check_fields

KL_ESTIMATORS = ("k3", "k1")
# whether a teacher (or reference) shares the policy's tokenizer (same), or has its own and
# is aligned with it span by span (auto; lightning_unified/teachers/tokenizers.py)
TOKENIZER_MODES = ("same", "auto")


@dataclass
class Reference:
    """A KL penalty that keeps the policy near a frozen reference.

    The reference scores each batch's responses once. ``estimator="k3"`` adds
    ``kl_coef * k3`` as a loss term (:func:`lightning_unified.losses.weight_builders.k3_reference_penalty`);
    ``"k1"`` subtracts ``kl_coef * sum_t (log pi - log pi_ref)`` from each sampled
    response's reward before its advantage (:func:`lightning_unified.losses.advantages.kl_penalized_rewards`),
    with the sampler's log-probs as log pi. ``path`` is a local Hugging Face directory;
    null takes the starting policy (with LoRA: the same base model, adapters switched
    off, never a second copy). ``engine`` says where the reference runs: in each training
    process (``hf``), in a frozen vLLM engine (``vllm``) or behind a server (``server``).
    """

    kl_coef: float = 0.05
    estimator: str = "k3"
    path: str | None = None
    # keyword arguments of load_causal_lm for ``path``: dtype, attn_implementation, trust_remote_code
    options: dict = field(default_factory=dict)
    # where the reference runs (TEACHER_ENGINES): a Hugging Face model in each training
    # process (hf), a frozen vLLM engine loaded from ``path`` (vllm, with InProcessTeacher's
    # options in ``vllm``) or an OpenAI-compatible server at ``url`` (server, with
    # ServedTeacher's options in ``server``). Every estimator reads only the reference's
    # log-prob of each response token, which a served model returns
    engine: str = "hf"
    url: str | None = None
    server: dict = field(default_factory=dict)
    vllm: dict = field(default_factory=dict)
    # the reference's tokenizer (TOKENIZER_MODES): the policy's (same), or its own (auto:
    # each reply re-encoded, and the k1 penalty's sum taken span by span, which is exact)
    tokenizer: str = "same"
    # auto: the log-prob a reference token standing for characters it cannot encode gets;
    # null refuses such a reply, naming the characters
    unencodable_logp: float | None = None
    # auto: processes that align each batch's replies with the reference's tokens, off the
    # training thread (0: the training thread; null: a share of the machine's cores)
    alignment_workers: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "reference")
        self.model = ModelRef.of(self.path, self.options, "reference.options")
        one_of("reference", "estimator", self.estimator, KL_ESTIMATORS)
        one_of("reference", "tokenizer", self.tokenizer, TOKENIZER_MODES)
        one_of("reference", "engine", self.engine, TEACHER_ENGINES)
        if self.kl_coef < 0:
            raise ValueError(f"reference.kl_coef must be >= 0, got {self.kl_coef}")
        if self.alignment_workers is not None and self.alignment_workers < 0:
            raise ValueError(f"reference.alignment_workers must be >= 0 or null, got {self.alignment_workers}")
        enforce("reference", self)
        # a served reference, checked as any teacher entry is (a server needs its url)
        self.where = self.served_entry() if self.served else None

    @property
    def served(self) -> bool:
        """The reference answers with log-probs (a vLLM engine or a server), not hidden states."""
        return self.engine != "hf"

    def served_entry(self) -> TeacherEntry:
        """Where a served reference runs, in the form the served engines take."""
        return teacher_entry(self.path, self.engine, self.url, self.server, self.vllm, self.options, owner="reference")

    def describe(self) -> str:
        """The reference as a run's start line names it."""
        return self.where.describe() if self.where is not None else (self.path or "the starting policy")
