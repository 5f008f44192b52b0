"""What each token is pushed towards: ``signal`` (an indicator or reward, a teacher's
distribution, or a preference between two responses)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

from lightning_unified.registry import ADVANTAGES, DIVERGENCES, WEIGHTINGS
from lightning_unified.rules import enforce
from lightning_unified.specs.checks import one_of
from lightning_unified.specs.model import ModelRef
from lightning_unified.specs.reference import TOKENIZER_MODES
from lightning_unified.specs.rewards import Reward, as_rewards
from lightning_unified.specs.teacher import (
    SELF_TEACHER_UPDATES,
    TEACHER_ENGINES,
    TEACHER_KINDS,
    CachedTeacher,
    SelfTeacher,
    SeveralTeachers,
    TeacherEntry,
    TeacherSource,
    as_teachers,
    resolve_teacher,
)
from lightning_unified.typecheck import check_fields, check_value

TOPK_TAILS = ("bucket", "renormalize")
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


@dataclass
class Sparse:
    """Each token is pushed by an indicator or a reward: SFT on data, RL on samples.

    On off-policy data without ``reward_data`` this is SFT (every data token has reward 1)
    or DFT (``weighting="dft"``). On sampled responses the rewards go through the
    ``advantage`` estimator. With ``reward_data`` the dataset's responses are weighted by
    their reward (reward-weighted SFT): the data's ``reward`` column when it has one, else
    the reward functions on the data's responses.
    """

    # the loss normaliser the method is defined with (module.aggregation=null)
    aggregation: ClassVar[str] = "token_mean"
    kind: ClassVar[str] = "sparse"
    rewards: list[Reward] = field(default_factory=list)
    advantage: str = "grpo"
    weighting: str = "indicator"
    reward_data: bool = False
    # added to a standard deviation before dividing by it (grpo, grpo_batch_std)
    std_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_fields(self, "signal")
        self.rewards = as_rewards(self.rewards)
        ADVANTAGES[self.advantage]  # a registered name (lightning_unified.registry)
        if not (isinstance(self.std_eps, (int, float)) and self.std_eps >= 0):
            raise ValueError(f"signal.std_eps must be a number >= 0, got {self.std_eps!r}")
        WEIGHTINGS[self.weighting]


@dataclass(init=False)
class Dense:
    """Each token is pushed towards a frozen teacher's whole distribution.

    ``divergence``: ``forward_kl`` (KL(teacher || student), mode covering), ``reverse_kl``
    (exact over the vocabulary, mode seeking), ``jsd`` with ``beta`` (GKD's generalised JSD:
    0 is forward KL, 1 reverse KL), or ``sampled_reverse_kl`` (the teacher's log-prob of each
    sampled token as its reward). ``top_k`` > 0 gives forward KL from the teacher's top-k
    only (what an API teacher or an offline cache provides), with the rest of its mass as
    one ``bucket`` or dropped and the top-k ``renormalize``d.

    :attr:`teacher` is one of the six kinds of :mod:`lightning_unified.specs.teacher`. It is
    given as one (``Dense(teacher=ServerTeacher(url))``), or by the keys users type (the
    ``teacher`` config group and ``signal.*``): ``teacher`` a directory or ``self``, with
    ``engine``, ``url``, ``server``, ``vllm`` and ``teacher_options``; ``cache``; ``teachers``
    {name: a teacher or its keys}; ``self_teacher``, ``self_teacher_decay`` and
    ``self_teacher_every``. The keys are read once, here (``teacher`` may also be a teacher
    of :data:`~lightning_unified.specs.teacher.TEACHER_KINDS` itself).
    """

    # the loss normaliser the method is defined with (module.aggregation=null)
    aggregation: ClassVar[str] = "token_mean"
    kind: ClassVar[str] = "dense"
    teacher: TeacherSource | None
    divergence: str
    # jsd's (and uld_hybrid's) interpolation: 0 is forward KL, 1 is reverse KL
    beta: float
    # divides the teacher's logits
    temperature: float
    top_k: int
    topk_tail: str
    # the teacher's prompt, when it should see more than the student: a template over the
    # example's columns, ``{prompt}`` and ``{reference}`` (see data/chat.py:contextual_prompt)
    teacher_context: str | None
    # the teacher's tokenizer (TOKENIZER_MODES): the policy's (same: checked), or its own
    # (auto: each reply re-encoded and aligned span by span; the divergences with an
    # ``across`` form in the registry: sampled_reverse_kl, uld, uld_hybrid)
    teacher_tokenizer: str
    # auto: the log-prob a teacher token standing for characters the teacher cannot encode
    # gets (its unknown token); null refuses such a reply, naming the characters
    unencodable_logp: float | None
    # uld_hybrid: the weight of the part on tokens both vocabularies share (the rest gets
    # 1 - it); null is GOLD's adaptive weight, the shared share of the teacher's vocabulary
    hybrid_matched_weight: float | None
    # auto: processes that align each batch's replies with the teacher's tokens, off the
    # training thread (0: the training thread; null: a share of the machine's cores)
    alignment_workers: int | None

    def __init__(self, teacher: str | None = None, divergence: str = "forward_kl", beta: float = 0.5,
                 temperature: float = 1.0, top_k: int = 0, topk_tail: str = "bucket",
                 teacher_context: str | None = None, teacher_tokenizer: str = "same",
                 unencodable_logp: float | None = None, hybrid_matched_weight: float | None = None,
                 alignment_workers: int | None = None, *,
                 engine: str = "hf", url: str | None = None, server: dict | None = None, vllm: dict | None = None,
                 teacher_options: dict | None = None, cache: str | None = None, teachers: dict | None = None,
                 self_teacher: str = "live", self_teacher_decay: float = 0.99, self_teacher_every: int = 50):
        given = dict(locals())
        hints = typing.get_type_hints(Dense.__init__)
        for name, value in given.items():
            if name in hints and not isinstance(value, TEACHER_KINDS):
                check_value(f"signal.{name}", value, hints[name])
        self.divergence, self.beta, self.temperature, self.top_k = divergence, beta, temperature, top_k
        self.topk_tail, self.teacher_context, self.teacher_tokenizer = topk_tail, teacher_context, teacher_tokenizer
        self.unencodable_logp, self.hybrid_matched_weight = unencodable_logp, hybrid_matched_weight
        self.alignment_workers = alignment_workers
        # the settings of one value each
        one_of("teacher", "engine", engine, TEACHER_ENGINES)
        DIVERGENCES[divergence]  # a registered name (lightning_unified.registry)
        one_of("signal", "teacher_tokenizer", teacher_tokenizer, TOKENIZER_MODES)
        one_of("signal", "self_teacher", self_teacher, SELF_TEACHER_UPDATES)
        one_of("signal", "topk_tail", topk_tail, TOPK_TAILS)
        if hybrid_matched_weight is not None and not 0 <= hybrid_matched_weight <= 1:
            raise ValueError(f"signal.hybrid_matched_weight must be in [0, 1] (or null: GOLD's adaptive weight), got "
                             f"{hybrid_matched_weight}")
        if not 0 <= self_teacher_decay < 1:
            raise ValueError(f"signal.self_teacher_decay must be in [0, 1), got {self_teacher_decay}")
        if self_teacher_every < 1:
            raise ValueError(f"signal.self_teacher_every must be >= 1 optimizer step, got {self_teacher_every}")
        if not 0 <= beta <= 1:
            raise ValueError(f"signal.beta must be in [0, 1], got {beta}")
        if temperature <= 0:
            raise ValueError(f"signal.temperature must be > 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"signal.top_k must be >= 0, got {top_k}")
        if alignment_workers is not None and alignment_workers < 0:
            raise ValueError(f"signal.alignment_workers must be >= 0 or null, got {alignment_workers}")
        ModelRef.of(None, teacher_options, "signal.teacher_options")  # known loading keys only
        # the teacher, chosen once from its keys; the rules relate the keys and the divergence
        if isinstance(teacher, TEACHER_KINDS):
            beside = {name: value for name, value in given.items() if name in _TEACHER_KEYS
                      and value != _TEACHER_KEYS[name]}
            if beside:
                raise ValueError(f"signal.teacher is given whole ({type(teacher).__name__}); the teacher keys "
                                 f"{sorted(beside)} would be ignored beside it: put them in the teacher, or give the "
                                 f"teacher by its keys")
            self.teacher, keys = teacher, _keys_of(teacher)
        else:
            keys = SimpleNamespace(teacher=teacher, engine=engine, url=url, server=server, vllm=vllm,
                                   teacher_options=teacher_options, cache=cache, teachers=as_teachers(teachers),
                                   self_teacher=self_teacher, self_teacher_decay=self_teacher_decay,
                                   self_teacher_every=self_teacher_every)
            self.teacher = resolve_teacher(keys)
        enforce("dense", self, keys)

    @property
    def teachers(self) -> dict[str, TeacherEntry]:
        """The teachers that are models, by name: a single one under ``teacher``; several
        under theirs; none for a self-teacher or a cache."""
        if isinstance(self.teacher, SeveralTeachers):
            return self.teacher.teachers
        if self.teacher is None or isinstance(self.teacher, (SelfTeacher, CachedTeacher)):
            return {}
        return {"teacher": self.teacher}

    @property
    def is_self(self) -> bool:
        """Self-distillation: the policy itself, under no_grad, is the teacher."""
        return isinstance(self.teacher, SelfTeacher)

    @property
    def cached(self) -> bool:
        """An offline teacher (``signal.cache``): no model scores the batch."""
        return isinstance(self.teacher, CachedTeacher)

    @property
    def served(self) -> bool:
        """Some teacher answers with log-probs (a vLLM engine or a server), not hidden states."""
        return self.teacher is not None and self.teacher.served

    @property
    def routed(self) -> bool:
        """Teachers given by name (``signal.teachers``, even one), each example scored by
        the one its data names."""
        return isinstance(self.teacher, SeveralTeachers)

    @property
    def across_tokenizers(self) -> bool:
        """The teacher has its own tokenizer (``teacher_tokenizer=auto``)."""
        return self.teacher_tokenizer == "auto"

    @property
    def teacher_gives(self) -> str:
        """What the teacher stage asks of the teacher: ``top_k`` (its top-k: ``signal.top_k``
        or an offline cache), or what the divergence needs (``distribution``, ``token_logp``);
        across tokenizers, its log-prob of each span (``spans``) or its top-k after each
        span's prefix (``span_top_k``)."""
        if self.across_tokenizers:
            # the teacher's scores in its own tokens, summed or merged span by span
            return "spans" if DIVERGENCES[self.divergence].needs == "token_logp" else "span_top_k"
        if self.top_k or self.cached:
            return "top_k"
        return DIVERGENCES[self.divergence].needs


# the keys that choose a teacher beside signal.teacher, with their defaults
_TEACHER_KEYS = {"engine": "hf", "url": None, "server": None, "vllm": None, "teacher_options": None, "cache": None,
                 "teachers": None, "self_teacher": "live", "self_teacher_decay": 0.99, "self_teacher_every": 50}


def _keys_of(teacher: TeacherSource) -> SimpleNamespace:
    """The keys a teacher given whole stands for, as the rules read them."""
    path = getattr(getattr(teacher, "model", None) or getattr(teacher, "tokenizer", None), "path", None)
    return SimpleNamespace(
        teacher="self" if isinstance(teacher, SelfTeacher) else path,
        engine=("vllm" if isinstance(teacher, SelfTeacher) and teacher.served else
                teacher.engine if teacher.engine in TEACHER_ENGINES else "hf"),
        url=getattr(teacher, "url", None), cache=getattr(teacher, "directory", None),
        teachers=teacher.teachers if isinstance(teacher, SeveralTeachers) else {},
        self_teacher=teacher.weights if isinstance(teacher, SelfTeacher) else "live")


@dataclass
class Preference:
    """Each example is a chosen and a rejected response to one prompt, pushed apart.

    Pairs come from the data (``chosen`` / ``rejected`` columns, or the built-in task's
    right answer against a corrupted one), or, on sampled responses (online DPO), from the
    ``rewards``: each prompt's best and worst of its ``num_generations`` samples. Every
    token of the chosen response gets the sequence-level weight ``+g``, every token of the
    rejected one ``-g``, with ``g = -dloss/dmargin`` of the ``loss``:

    - ``dpo``: ``-log sigmoid(beta * margin)``, margin = (log pi - log pi_ref) of chosen
      minus that of rejected, summed over tokens; g = beta * sigmoid(-beta * margin).
    - ``ipo``: ``(margin - 1 / (2 beta))^2`` on log-probs averaged over each response's tokens.
    - ``simpo``: ``-log sigmoid(beta * margin - gamma)`` with length-averaged log-probs and no
      reference.

    DPO and IPO need reference log-probs: the starting policy by default, or
    ``reference_path``.
    """

    # the mean over pairs, as DPO, IPO and SimPO are defined (module.aggregation=null)
    aggregation: ClassVar[str] = "pair_mean"
    kind: ClassVar[str] = "preference"
    loss: str = "dpo"
    beta: float = 0.1
    # SimPO's target margin
    gamma: float = 0.5
    # on sampled responses: picks each prompt's chosen (highest total) and rejected (lowest)
    rewards: list[Reward] = field(default_factory=list)
    # a local Hugging Face directory; null takes the starting policy (as reference=... does)
    reference_path: str | None = None
    reference_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, "signal")
        self.rewards = as_rewards(self.rewards)
        one_of("signal", "loss", self.loss, PREFERENCE_LOSSES)
        self.reference_model = ModelRef.of(self.reference_path, self.reference_options, "signal.reference_options")
        if self.beta <= 0:
            raise ValueError(f"signal.beta must be > 0, got {self.beta}")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


@dataclass
class RewardPairs:
    """A reward model: a scalar head on the causal LM, trained on preference pairs so that
    each pair's chosen response scores above its rejected one (Bradley-Terry,
    :func:`lightning_unified.losses.bradley_terry.bradley_terry_loss`).

    Unlike the other signals it pushes no token's log-prob: the trained output is one number
    per sequence, read at its last token, and nothing is sampled from it. It is the second
    kind of objective beside the one equation (:mod:`lightning_unified.objectives`); the run
    writes an ``AutoModelForSequenceClassification`` directory that
    :class:`lightning_unified.rewards.RewardModel` loads. Pairs come from the data (``chosen``
    / ``rejected`` columns, an optional ``margin`` column; the built-in task with
    ``task.pairs=true``), held-out pairs from the validation data (``task.val_pairs=true``).
    """

    # the mean over pairs, as TRL's RewardTrainer (module.aggregation=null)
    aggregation: ClassVar[str] = "pair_mean"
    kind: ClassVar[str] = "reward_model"
    # TRL's center_rewards_coefficient: adds c * (r_chosen + r_rejected)^2 per pair, which
    # pulls the scores towards mean zero (Bradley-Terry alone leaves their offset free); 0.01
    # is the paper's advice; null: off
    center_rewards_coefficient: float | None = None

    def __post_init__(self) -> None:
        check_fields(self, "signal")
        c = self.center_rewards_coefficient
        if c is not None and not (isinstance(c, (int, float)) and c >= 0):
            raise ValueError(f"signal.center_rewards_coefficient must be a number >= 0 or null, got {c!r}")
