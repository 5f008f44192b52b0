"""What a run is made of: the ``data_source`` and ``signal`` specs.

Plain dataclasses, so Hydra instantiates them from ``conf/data_source/*.yaml`` and
``conf/signal/*.yaml`` and Python users construct them directly. A method is one
``data_source`` combined with one ``signal``; the module builds its callback pipeline and
its weights from them (see :mod:`lightning_unified.pipeline` and
:mod:`lightning_unified.weighting`).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_unified.registry import ADVANTAGES, DIVERGENCES, RATIOS, WEIGHTINGS
from lightning_unified.typecheck import check_fields

KL_ESTIMATORS = ("k3", "k1")
BEHAVIOURS = ("tempered", "sampled")
TOPK_TAILS = ("bucket", "renormalize")
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")
SELF_TEACHER = "self"
ENGINES = ("hf", "vllm")
# where a dense signal's teacher runs: in the training process as a Hugging Face model, as
# a frozen vLLM engine, or behind an OpenAI-compatible server
TEACHER_ENGINES = ("hf", "vllm", "server")
# which weights a self-teacher scores with (lightning_unified/models/snapshot.py)
SELF_TEACHER_UPDATES = ("live", "frozen", "ema", "refresh")
# whether a teacher (or reference) shares the policy's tokenizer (same), or has its own and
# is aligned with it span by span (auto; lightning_unified/teachers/tokenizers.py)
TOKENIZER_MODES = ("same", "auto")


LOAD_OPTIONS = ("dtype", "attn_implementation", "trust_remote_code")


def _known_options(owner: str, options: dict) -> None:
    unknown = set(options) - set(LOAD_OPTIONS)
    if unknown:
        raise ValueError(f"{owner} has unknown key(s) {sorted(unknown)}; known: {list(LOAD_OPTIONS)}")


# what each kind of teacher signal is, in an error
_NEEDS = {"distribution": "whole distribution", "token_logp": "log-prob of each sampled token"}


def _one_of(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


@dataclass
class Sampling:
    """How on-policy responses are generated: by which rollout engine (``hf``, the policy's
    own ``generate``; ``vllm``, an engine synced with the policy), with what distribution."""

    # responses per prompt (the group of GRPO / RLOO)
    num_generations: int = 8
    # longest response; None takes the task's (the data module's ``max_new_tokens``)
    max_new_tokens: int | None = None
    # the behaviour log-probs are those of this tempered, truncated distribution
    temperature: float = 1.0
    # nucleus sampling; 1.0 turns it off
    top_p: float = 1.0
    # top-k sampling; 0 turns it off
    top_k: int = 0
    # what behaviour_logp records under top-k / top-p: "tempered", the tempered distribution
    # before truncation (what inference servers report; the ratio to the policy at the
    # sampler's temperature is 1 before any update), or "sampled", the truncated distribution
    # actually sampled from (exact importance weights; the ratio then starts at the kept mass)
    behaviour: str = "tempered"
    # where responses are generated: "hf" (the training model's generate) or "vllm" (a vLLM
    # engine in each training process, synced with the policy's weights)
    engine: str = "hf"
    # the vllm engine's settings: kv_cache_gib, gpu_memory_utilization, dtype, max_model_len,
    # enforce_eager, sleep, sleep_level (see lightning_unified.engines.vllm.VLLMEngine)
    vllm: dict = field(default_factory=dict)
    # sync the engine's weights every this many optimizer steps; > 1 samples from stale
    # weights on purpose (the importance ratio corrects for it)
    sync_every: int = 1
    # 0: sample each batch when it is trained (synchronous). k >= 1: a producer thread
    # samples batch t + k from the weights of step t while the trainer trains on batch t,
    # so every batch is k steps stale (the first k of each epoch less) and the importance
    # ratio corrects for it (lightning_unified.engines.producer)
    max_lag: int = 0
    # the producer thread's torch intra-op threads (null: torch's default); with max_lag,
    # splits a CPU's cores between sampling and training
    producer_threads: int | None = None

    def __post_init__(self) -> None:
        check_fields(self, "data_source.sampling")
        if self.num_generations < 1:
            raise ValueError(f"sampling.num_generations must be >= 1, got {self.num_generations}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        # the command line gives `temperature=2` as an int, which generation's warpers refuse
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _one_of("sampling", "behaviour", self.behaviour, BEHAVIOURS)
        _one_of("sampling", "engine", self.engine, ENGINES)
        if self.sync_every < 1:
            raise ValueError(f"sampling.sync_every must be >= 1, got {self.sync_every}")
        if self.max_lag < 0:
            raise ValueError(f"sampling.max_lag must be >= 0, got {self.max_lag}")
        if self.producer_threads is not None and self.producer_threads < 1:
            raise ValueError(f"sampling.producer_threads must be >= 1 or null, got {self.producer_threads}")
        if self.max_lag and self.sync_every > 1:
            raise ValueError(f"sampling.max_lag={self.max_lag} already samples from weights {self.max_lag} steps old; "
                             f"sampling.sync_every={self.sync_every} would make them older still. Set one of them")
        if self.vllm.get("sleep") and self.vllm.get("sleep_level", 2) == 2 and self.sync_every > 1:
            raise ValueError(f"sampling.vllm.sleep_level=2 discards the engine's weights while it sleeps, so each wake "
                             f"loads the policy's current ones; sampling.sync_every={self.sync_every} keeps older weights "
                             f"on purpose. Set sampling.vllm.sleep_level=1 (the weights wait on the CPU) or "
                             f"sampling.sync_every=1")
        if self.max_lag and self.vllm.get("sleep"):
            raise ValueError(f"sampling.max_lag={self.max_lag} samples during the training step, so the engine "
                             f"cannot sleep then: set sampling.vllm.sleep=false")


@dataclass
class Importance:
    """How the policy is corrected for sampling from mu instead of pi_theta.

    ``none``: the on-policy gradient A * grad log pi (exact when one update follows each
    sampling at temperature 1); ``token``: rho_t = pi_theta(y_t) / mu(y_t); ``truncated``:
    min(rho_t, truncate); ``ppo_clip``: PPO's clipped surrogate with eps_low/eps_high
    (DAPO's clip-higher when eps_high > eps_low); ``sequence_clip``: the same clip on GSPO's
    sequence-level ratio. ``mask_low`` / ``mask_high`` (None: off) drop the tokens whose ratio
    lies outside that band (masked importance sampling, IcePop): the guard against a
    sampler, such as an inference engine, that disagrees with the trainer. ``level``: the
    ratio these act on, each token's own (``token``) or its sequence's geometric mean
    (``sequence``, as GSPO's): sequence-level truncation (TIS) and masking (MIS) keep or cut
    a whole response at once.
    """

    ratio: str = "truncated"
    truncate: float = 2.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    mask_low: float | None = None
    mask_high: float | None = None
    level: str = "token"

    @property
    def masks(self) -> bool:
        return self.mask_low is not None or self.mask_high is not None

    @property
    def sequence_level(self) -> bool:
        """The ratio of each sequence (GSPO's geometric mean), not of each token."""
        return RATIOS[self.ratio].sequence or (self.level == "sequence" and self.ratio != "none")

    def __post_init__(self) -> None:
        check_fields(self, "data_source.importance")
        RATIOS[self.ratio]  # a registered name (lightning_unified.registry)
        _one_of("importance", "level", self.level, ("token", "sequence"))
        if RATIOS[self.ratio].proximal and self.level == "sequence":
            raise ValueError(f"importance.ratio={self.ratio} weighs each token by its own proximal and behaviour "
                             f"ratios; importance.level=sequence is not built for it: use level=token, or "
                             f"ratio=sequence_clip for a sequence-level clip")
        if self.masks and self.ratio == "none":
            raise ValueError("importance.mask_low / mask_high test the importance ratio; importance.ratio=none has none")
        if (self.mask_low is not None and self.mask_low < 0) or (self.mask_high is not None and self.mask_high <= 0):
            raise ValueError(f"importance needs mask_low >= 0 and mask_high > 0, got {self.mask_low}, {self.mask_high}")
        if self.mask_low is not None and self.mask_high is not None and self.mask_low >= self.mask_high:
            raise ValueError(f"importance.mask_low must be below mask_high, got {self.mask_low} >= {self.mask_high}")
        if self.truncate <= 0:
            raise ValueError(f"importance.truncate must be > 0, got {self.truncate}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"importance needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")


@dataclass
class OffPolicy:
    """Responses come from the dataset (or a teacher that wrote it): no sampling, no ratio."""

    samples = False
    updates_per_batch = 1



@dataclass
class Environment:
    """Multi-turn episodes against an environment (lightning_unified/environments): ``cls``
    names the environment class (an import path such as ``mypkg.envs.MyEnv``, or the class or
    any function returning an environment), made fresh for every episode with ``options`` as
    keyword arguments. None: single-turn sampling."""

    cls: Any = None
    options: dict = field(default_factory=dict)
    # policy turns per episode
    max_turns: int = 4
    # tokens per episode after its first prompt, the policy's and the environment's
    max_tokens: int = 256
    # seconds a tool may run before the policy hears that it timed out
    tool_timeout: float = 10.0

    def __post_init__(self) -> None:
        check_fields(self, "data_source.environment")
        if self.max_turns < 1:
            raise ValueError(f"data_source.environment.max_turns must be >= 1, got {self.max_turns}")
        if self.max_tokens < 1:
            raise ValueError(f"data_source.environment.max_tokens must be >= 1, got {self.max_tokens}")
        if not self.tool_timeout > 0:
            raise ValueError(f"data_source.environment.tool_timeout must be > 0, got {self.tool_timeout}")
        if isinstance(self.cls, str):
            self.cls = _import_path(self.cls, "data_source.environment.cls")
        if self.cls is not None and not callable(self.cls):
            raise ValueError(f"data_source.environment.cls must be a class or function that makes an environment, "
                             f"got {self.cls!r}")
        self.options = dict(self.options)

    @property
    def enabled(self) -> bool:
        return self.cls is not None

    def factory(self) -> Callable:
        """Makes one environment (picklable: spawned processes rebuild it)."""
        return functools.partial(self.cls, **self.options)


def _import_path(path: str, key: str):
    module_name, _, name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{key}={path!r} is not an import path (module.Name, e.g. mypkg.envs.MyEnv)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{key}={path!r}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from error
    if not hasattr(module, name):
        raise ValueError(f"{key}={path!r}: module {module_name!r} has no {name!r}")
    return getattr(module, name)

@dataclass
class OnPolicy:
    """Responses are sampled from the policy being trained.

    ``probability`` < 1 mixes: each batch is sampled with that probability and otherwise
    keeps the dataset's responses (GKD's lambda), decided identically on every rank.
    """

    sampling: Sampling = field(default_factory=Sampling)
    importance: Importance = field(default_factory=Importance)
    probability: float = 1.0
    # draws the per-batch on/off-policy choice of a mixed source, with the epoch and the batch
    seed: int = 0
    # optimizer steps per sampled batch: the rollout is split into ``minibatches`` parts and
    # replayed ``updates_per_rollout`` times (PPO's epochs, GRPO's num_iterations, verl's
    # ppo_epochs), so later updates see a policy that has moved from the sampler's
    updates_per_rollout: int = 1
    minibatches: int = 1
    # multi-turn episodes against an environment (cls: None keeps single-turn sampling)
    environment: Environment = field(default_factory=Environment)

    samples = True

    def __post_init__(self) -> None:
        check_fields(self, "data_source")
        if not 0 <= self.probability <= 1:
            raise ValueError(f"data_source.probability must be in [0, 1], got {self.probability}")
        if self.updates_per_rollout < 1:
            raise ValueError(f"data_source.updates_per_rollout must be >= 1, got {self.updates_per_rollout}")
        if self.minibatches < 1:
            raise ValueError(f"data_source.minibatches must be >= 1, got {self.minibatches}")
        if isinstance(self.environment, dict):  # from Python without Hydra
            self.environment = Environment(**self.environment)
        if self.environment.enabled and self.minibatches > 1:
            raise ValueError("data_source.minibatches > 1 splits a rollout by its rows, but an episode may span "
                             "several rows (a template that rewrites history splits it); use minibatches=1 with "
                             "data_source.environment")

    @property
    def updates_per_batch(self) -> int:
        """Optimizer steps each sampled batch makes."""
        return self.updates_per_rollout * self.minibatches


def loss_temperature(data_source: OffPolicy | OnPolicy, temperature: float | None) -> float:
    """The temperature dividing the policy's logits in the loss: ``temperature`` when set,
    else the sampler's. The policy in the loss is the one the sampler drew from unless set
    apart on purpose: a loss at temperature 1 against samples at 0.7 starts every ratio away
    from 1."""
    if temperature is None:
        temperature = data_source.sampling.temperature if data_source.samples else 1.0
    if temperature <= 0:
        raise ValueError(f"module.temperature must be > 0, got {temperature}")
    return temperature


@dataclass
class Reward:
    """A reward function and its weight in the sum.

    ``fn(completions=list[str], references=list[str], completion_ids=[B, R],
    completion_mask=[B, R]) -> [B]`` (take ``**kwargs`` for what you do not use). Hydra
    builds it from ``_target_`` with ``_partial_: true``.
    """

    fn: Callable
    weight: float = 1.0


def as_rewards(rewards) -> list[Reward]:
    """Each entry of ``signal.rewards`` as a :class:`Reward`: a Reward stays as it is, and a
    bare function counts with weight 1 (as TRL's ``reward_funcs=[fn]`` does), Hydra's
    ``{_target_: mypkg.my_reward, _partial_: true}`` included."""
    out = []
    for i, reward in enumerate(rewards or []):
        if isinstance(reward, Reward):
            out.append(reward)
        elif callable(reward):
            out.append(Reward(fn=reward))
        else:
            raise TypeError(f"signal.rewards[{i}] must be a reward function or a Reward (fn and weight), got "
                            f"{type(reward).__name__}: {reward!r}")
    return out


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


@dataclass
class Teacher:
    """One teacher of a dense signal: where it is and where it runs.

    ``engine``: ``hf`` (a Hugging Face model from ``path`` in each training process: the
    whole distribution, every divergence), ``vllm`` (a frozen vLLM engine loaded from
    ``path`` in each training process) or ``server`` (an OpenAI-compatible server at
    ``url``). ``server`` and ``vllm`` hold ServedTeacher's and InProcessTeacher's options;
    ``options`` load_causal_lm's (dtype, attn_implementation, trust_remote_code).
    """

    path: str | None = None
    engine: str = "hf"
    url: str | None = None
    server: dict = field(default_factory=dict)
    vllm: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def served(self) -> bool:
        """The teacher answers with log-probs (a vLLM engine or a server), not hidden states."""
        return self.engine != "hf"

    def describe(self) -> str:
        """The teacher as a run's start line names it."""
        if self.engine == "server":
            return f"server {self.url}"
        return f"{self.path} (vllm)" if self.engine == "vllm" else str(self.path)

    def check(self, owner: str) -> None:
        """``owner`` is where the user set it: ``teacher``, ``signal.teachers.NAME`` or ``reference``."""
        check_fields(self, owner)
        _one_of(owner, "engine", self.engine, TEACHER_ENGINES)
        _known_options(f"{owner} load options", self.options)
        if self.engine == "server" and not self.url:
            raise ValueError(f"{owner}.engine=server asks an OpenAI-compatible server for its log-probs: set "
                             f"{owner}.url (e.g. http://127.0.0.1:8000, where `python -m "
                             f"vllm.entrypoints.openai.api_server --model DIR --max-logprobs 64` serves)")
        if self.engine != "server" and not self.path:
            raise ValueError(f"{owner}.engine={self.engine} loads the model from a local Hugging Face directory: "
                             f"set {owner}.path")


def as_teachers(teachers) -> dict[str, Teacher]:
    """``signal.teachers`` as {name: Teacher}; each entry a Teacher or its fields as a dict."""
    known = list(Teacher.__dataclass_fields__)
    out = {}
    for name, spec in dict(teachers or {}).items():
        owner = f"signal.teachers.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"signal.teachers: each teacher's name must be a non-empty string, got {name!r}")
        if isinstance(spec, Teacher):
            teacher = spec
        elif isinstance(spec, dict) or hasattr(spec, "items"):
            spec = dict(spec.items())
            unknown = sorted(set(spec) - set(known))
            if unknown:
                raise ValueError(f"{owner} has unknown key(s) {unknown}; a teacher has {known}")
            teacher = Teacher(**{k: dict(v) if k in ("server", "vllm", "options") and v is not None else v
                                 for k, v in spec.items()})
        else:
            raise TypeError(f"{owner} must be a teacher's fields ({known}), got {type(spec).__name__}: {spec!r}")
        if teacher.path == SELF_TEACHER:
            raise ValueError(f"{owner}.path=self: self-distillation has one teacher, the policy itself "
                             f"(signal.teacher=self without signal.teachers)")
        teacher.check(owner)
        out[name] = teacher
    return out


@dataclass
class Dense:
    """Each token is pushed towards a frozen teacher's whole distribution.

    ``divergence``: ``forward_kl`` (KL(teacher || student), mode covering), ``reverse_kl``
    (exact over the vocabulary, mode seeking), ``jsd`` with ``beta`` (GKD's generalised JSD:
    0 is forward KL, 1 reverse KL), or ``sampled_reverse_kl`` (the teacher's log-prob of each
    sampled token as its reward). ``top_k`` > 0 gives forward KL from the teacher's top-k
    only (what an API teacher or an offline cache provides), with the rest of its mass as
    one ``bucket`` or dropped and the top-k ``renormalize``d.

    One teacher is ``teacher`` with ``engine`` (and its options); several are ``teachers``
    {name: :class:`Teacher`}, each example scored by the teacher its data names (the
    ``teacher`` column, ``task.columns.teacher``). Either way :attr:`teachers` holds them
    after construction, a single one under the name ``teacher``.
    """

    # the loss normaliser the method is defined with (module.aggregation=null)
    aggregation: ClassVar[str] = "token_mean"
    # a local Hugging Face directory, or ``self``; None only with ``cache`` or a server
    teacher: str | None = None
    divergence: str = "forward_kl"
    beta: float = 0.5
    # divides the teacher's logits
    temperature: float = 1.0
    top_k: int = 0
    topk_tail: str = "bucket"
    # keyword arguments of load_causal_lm for the teacher: dtype, attn_implementation,
    # trust_remote_code (unused by teacher=self, which is the policy as it is)
    teacher_options: dict = field(default_factory=dict)
    # the teacher's prompt, when it should see more than the student: a template over the
    # example's columns, ``{prompt}`` and ``{reference}`` (see data/chat.py:contextual_prompt)
    teacher_context: str | None = None
    # an offline teacher: a directory written by scripts/cache_teacher.py with the teacher's
    # top-k on the dataset's responses; no teacher is loaded (forward KL from the top-k)
    cache: str | None = None
    # where the teacher runs (TEACHER_ENGINES); vllm and server return the teacher's top-k
    # and each token's log-prob, not its whole distribution
    engine: str = "hf"
    # engine=server: the server's root URL, and ServedTeacher's options (model, timeout_s,
    # retries, backoff_s, max_in_flight, rows_per_request)
    url: str | None = None
    server: dict = field(default_factory=dict)
    # engine=vllm: InProcessTeacher's options (kv_cache_gib, gpu_memory_utilization,
    # max_model_len, dtype, max_logprobs)
    vllm: dict = field(default_factory=dict)
    # several teachers, {name: Teacher or its fields}; each example names its own
    teachers: dict | None = field(default_factory=dict)
    # teacher=self: which weights the teacher has (SELF_TEACHER_UPDATES): the policy's own
    # (live), the starting policy's (frozen), an average with ``self_teacher_decay`` of the
    # old one kept each step (ema), or the policy's copied every ``self_teacher_every``
    # optimizer steps and frozen in between (refresh)
    self_teacher: str = "live"
    self_teacher_decay: float = 0.99
    self_teacher_every: int = 50
    # the teacher's tokenizer (TOKENIZER_MODES): the policy's (same: checked), or its own
    # (auto: each reply re-encoded and aligned span by span; the divergences with an
    # ``across`` form in the registry: sampled_reverse_kl, uld, uld_hybrid)
    teacher_tokenizer: str = "same"
    # auto: the log-prob a teacher token standing for characters the teacher cannot encode
    # gets (its unknown token); null refuses such a reply, naming the characters
    unencodable_logp: float | None = None
    # uld_hybrid: the weight of the part on tokens both vocabularies share (the rest gets
    # 1 - it); null is GOLD's adaptive weight, the shared share of the teacher's vocabulary
    hybrid_matched_weight: float | None = None

    @property
    def is_self(self) -> bool:
        """Self-distillation: the policy itself, under no_grad, is the teacher."""
        return self.teacher == SELF_TEACHER

    @property
    def served(self) -> bool:
        """Some teacher answers with log-probs (a vLLM engine or a server), not hidden states."""
        return any(t.served for t in self.teachers.values())

    @property
    def routed(self) -> bool:
        """Teachers given by name (``signal.teachers``, even one), each example scored by
        the one its data names."""
        return self._named


    def __post_init__(self) -> None:
        check_fields(self, "signal")
        _one_of("teacher", "engine", self.engine, TEACHER_ENGINES)
        self.teachers = as_teachers(self.teachers)
        self._named = bool(self.teachers)
        if self.teachers:
            self._check_several()
        elif not self.is_self and self.cache is None and (self.teacher is not None or self.engine == "server"):
            single = Teacher(self.teacher, self.engine, self.url, dict(self.server), dict(self.vllm),
                             dict(self.teacher_options))
            single.check("teacher")
            self.teachers = {"teacher": single}
        if (self.engine != "hf" and self.cache is not None) or (self.is_self and self.engine == "server"):
            raise ValueError(f"teacher.engine={self.engine} serves a separate teacher; signal.cache scores without "
                             f"one, and signal.teacher=self is scored by the policy (teacher.engine=hf) or by its own "
                             f"rollout engine (teacher.engine=vllm)")
        if self.is_self and self.engine == "vllm":
            # the policy's own vLLM sampler scores the context prompt: it holds the weights as
            # of the last sync, so only the live self-teacher is what it scores with
            self._check_served("teacher", self.engine)
            if self.self_teacher != "live":
                raise ValueError(f"signal.teacher=self with teacher.engine=vllm is scored by the rollout engine, which "
                                 f"holds the policy's current weights; signal.self_teacher={self.self_teacher} keeps "
                                 f"other weights, which only teacher.engine=hf scores with")
        if not self.teachers and self.cache is None and not self.is_self:
            raise ValueError(
                "signal=dense needs a teacher: teacher.path=DIR (a local Hugging Face causal LM with the policy's "
                "vocabulary), signal.teacher=self with signal.teacher_context (self-distillation), "
                "signal.cache=DIR (an offline teacher from scripts/cache_teacher.py), or signal.teachers={name: "
                "{path: DIR}, ...} (several teachers, each example naming its own)"
            )
        if self.is_self and not self.teacher_context:
            raise ValueError(
                "signal.teacher=self makes the policy its own teacher; without signal.teacher_context (a template "
                "giving the teacher privileged context, e.g. '{prompt}' with the '{reference}' answer) the two "
                "distributions are the same and there is nothing to learn"
            )
        divergence = DIVERGENCES[self.divergence]  # a registered name (lightning_unified.registry)
        self._check_tokenizer(divergence)
        self._check_self_teacher()
        if self.cache is not None and (divergence.from_top_k is None or self.is_self or self.teacher_context):
            raise ValueError(
                "signal.cache holds the teacher's top-k on the dataset's responses: it gives a divergence that runs "
                f"from a top-k (signal.divergence={'|'.join(self.from_top_k_names())}), from a teacher other than the "
                f"policy, without teacher_context; got divergence={self.divergence!r}, teacher={self.teacher!r}, "
                f"teacher_context={self.teacher_context!r}"
            )
        _known_options("signal.teacher_options", self.teacher_options)
        _one_of("signal", "topk_tail", self.topk_tail, TOPK_TAILS)
        if not 0 <= self.beta <= 1:
            raise ValueError(f"signal.beta must be in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"signal.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"signal.top_k must be >= 0, got {self.top_k}")
        if self.top_k and divergence.from_top_k is None and not self.across_tokenizers:
            raise ValueError(
                f"signal.top_k={self.top_k} gives the teacher's top-k, from which signal.divergence="
                f"{self.divergence!r} cannot run (it needs the teacher's {_NEEDS[divergence.needs]}); the divergences "
                f"that run from a top-k: {self.from_top_k_names()}"
            )
        for name, teacher in self.teachers.items():
            if teacher.served:
                self._check_served("teacher" if name == "teacher" and not self.routed else f"signal.teachers.{name}",
                                   teacher.engine)

    @property
    def across_tokenizers(self) -> bool:
        """The teacher has its own tokenizer (``teacher_tokenizer=auto``)."""
        return self.teacher_tokenizer == "auto"

    def _check_tokenizer(self, divergence) -> None:
        _one_of("signal", "teacher_tokenizer", self.teacher_tokenizer, TOKENIZER_MODES)
        across = [name for name in DIVERGENCES.names if DIVERGENCES[name].across is not None]
        if self.unencodable_logp is not None and (not self.across_tokenizers or self.unencodable_logp > 0):
            raise ValueError(f"signal.unencodable_logp={self.unencodable_logp} is the log-prob (<= 0) a teacher with "
                             f"its own tokenizer (signal.teacher_tokenizer=auto) gives a token it cannot encode")
        if self.hybrid_matched_weight is not None and not 0 <= self.hybrid_matched_weight <= 1:
            raise ValueError(f"signal.hybrid_matched_weight must be in [0, 1] (or null: GOLD's adaptive weight), got "
                             f"{self.hybrid_matched_weight}")
        if not self.across_tokenizers:
            if divergence.only_across:
                raise ValueError(f"signal.divergence={self.divergence} compares distributions over two vocabularies; it "
                                 f"needs a teacher with its own tokenizer (signal.teacher_tokenizer=auto). With one "
                                 f"tokenizer, forward_kl, reverse_kl and jsd compare them exactly")
            return
        if divergence.across is None:
            raise ValueError(f"signal.divergence={self.divergence} compares the two models token by token over one "
                             f"vocabulary, which a teacher with its own tokenizer (signal.teacher_tokenizer=auto) does "
                             f"not share; the divergences that run across tokenizers: {across}")
        if self.cache is not None:
            raise ValueError("signal.cache holds a teacher's top-k over the tokens of the tokenizer it was made with "
                             "(scripts/cache_teacher.py, the student's); a teacher with its own tokenizer "
                             "(signal.teacher_tokenizer=auto) scores each reply in its own tokens: give teacher.path, "
                             "or drop signal.cache")
        if self.is_self:
            raise ValueError("signal.teacher=self is the policy, which shares its tokenizer: "
                             "signal.teacher_tokenizer=same")
        if self.routed:
            raise ValueError("signal.teacher_tokenizer=auto takes one teacher (teacher.path); several teachers "
                             "(signal.teachers) must share the policy's tokenizer")
        teacher = self.teachers.get("teacher")
        if teacher is not None and teacher.engine == "server" and not teacher.path:
            raise ValueError("signal.teacher_tokenizer=auto encodes each reply with the teacher's own tokenizer: with "
                             "teacher.engine=server give teacher.path=DIR, a local directory holding the served "
                             "model's tokenizer")
        if teacher is not None and teacher.served and divergence.needs == "distribution" and not self.top_k:
            raise ValueError(f"teacher.engine={teacher.engine} returns the teacher's top-k, not its whole "
                             f"distribution: signal.divergence={self.divergence} with a served teacher needs "
                             f"signal.top_k=K")

    def _check_self_teacher(self) -> None:
        _one_of("signal", "self_teacher", self.self_teacher, SELF_TEACHER_UPDATES)
        if self.self_teacher != "live" and not self.is_self:
            raise ValueError(f"signal.self_teacher={self.self_teacher} chooses the weights of a self-teacher "
                             f"(signal.teacher=self); this run's teacher is {self.teacher!r}")
        if not 0 <= self.self_teacher_decay < 1:
            raise ValueError(f"signal.self_teacher_decay must be in [0, 1), got {self.self_teacher_decay}")
        if self.self_teacher_every < 1:
            raise ValueError(f"signal.self_teacher_every must be >= 1 optimizer step, got {self.self_teacher_every}")

    def _check_several(self) -> None:
        """``signal.teachers`` replaces the one teacher's settings, which must stay unset."""
        single = {"teacher.path": self.teacher, "teacher.url": self.url, "signal.cache": self.cache}
        given = [f"{k}={v!r}" for k, v in single.items() if v is not None]
        if self.engine != "hf":
            given.append(f"teacher.engine={self.engine}")
        if given:
            raise ValueError(f"signal.teachers names the teachers ({', '.join(self.teachers)}); the one teacher's "
                             f"{', '.join(given)} cannot be set beside it")
        if self.teacher_context:
            raise ValueError("signal.teacher_context gives the self-teacher privileged context; with signal.teachers "
                             "each teacher scores the student's own prompt")

    @staticmethod
    def from_top_k_names() -> list[str]:
        return [name for name in DIVERGENCES.names if DIVERGENCES[name].from_top_k is not None]

    @property
    def teacher_gives(self) -> str:
        """What the teacher stage asks of the teacher: ``top_k`` (its top-k: ``signal.top_k``
        or an offline cache), or what the divergence needs (``distribution``, ``token_logp``);
        across tokenizers, its log-prob of each span (``spans``) or its top-k after each
        span's prefix (``span_top_k``)."""
        if self.across_tokenizers:
            # the teacher's scores in its own tokens, summed or merged span by span
            return "spans" if DIVERGENCES[self.divergence].needs == "token_logp" else "span_top_k"
        if self.top_k or self.cache is not None:
            return "top_k"
        return DIVERGENCES[self.divergence].needs

    def _check_served(self, owner: str, engine: str) -> None:
        where = f"{owner}.engine={engine}"
        if self.teacher_gives == "distribution" and not self.across_tokenizers:
            works = [f"signal.divergence={name} with signal.top_k=K (from the top-k)" for name in self.from_top_k_names()]
            works += [f"signal.divergence={name} (the teacher's log-prob of each sampled token)"
                      for name in DIVERGENCES.names if DIVERGENCES[name].needs == "token_logp"]
            raise ValueError(
                f"{where} returns the teacher's top-k and each sampled token's log-prob, not its whole distribution, "
                f"which signal.divergence={self.divergence!r}"
                f"{' without signal.top_k' if DIVERGENCES[self.divergence].from_top_k else ''} needs. "
                f"Signals that work with it: {', or '.join(works)}"
            )
        if self.temperature != 1.0:
            raise ValueError(f"{where} reports log-probs at temperature 1; signal.temperature={self.temperature} "
                             f"needs the teacher's logits (engine=hf)")


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
        _one_of("signal", "loss", self.loss, PREFERENCE_LOSSES)
        _known_options("signal.reference_options", self.reference_options)
        if self.beta <= 0:
            raise ValueError(f"signal.beta must be > 0, got {self.beta}")

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


@dataclass
class Reference:
    """A KL penalty that keeps the policy near a frozen reference.

    The reference scores each batch's responses once. ``estimator="k3"`` adds
    ``kl_coef * k3`` as a loss term (:func:`lightning_unified.losses.weights.k3_reference_penalty`);
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

    def __post_init__(self) -> None:
        check_fields(self, "reference")
        _known_options("reference.options", self.options)
        _one_of("reference", "estimator", self.estimator, KL_ESTIMATORS)
        _one_of("reference", "tokenizer", self.tokenizer, TOKENIZER_MODES)
        if self.tokenizer == "auto":
            if self.estimator != "k1":
                raise ValueError(f"reference.estimator={self.estimator} compares the policy and the reference token by "
                                 f"token, which a reference with its own tokenizer (reference.tokenizer=auto) does not "
                                 f"allow; reference.estimator=k1 sums the log-ratio over the reply, which spans give "
                                 f"exactly")
            if not self.path:
                raise ValueError("reference.tokenizer=auto encodes each reply with the reference's own tokenizer: set "
                                 "reference.path=DIR (its directory; with reference.engine=server, a local directory "
                                 "holding the served model's tokenizer)")
        if self.unencodable_logp is not None and (self.tokenizer != "auto" or self.unencodable_logp > 0):
            raise ValueError(f"reference.unencodable_logp={self.unencodable_logp} is the log-prob (<= 0) a reference "
                             f"with its own tokenizer (reference.tokenizer=auto) gives a token it cannot encode")
        if self.kl_coef < 0:
            raise ValueError(f"reference.kl_coef must be >= 0, got {self.kl_coef}")
        if self.served:
            if self.engine == "vllm" and not self.path:
                raise ValueError("reference.engine=vllm loads the reference from a local Hugging Face directory: set "
                                 "reference.path (the starting policy's directory, for a KL to where training began)")
            self.as_served().check("reference")

    @property
    def served(self) -> bool:
        """The reference answers with log-probs (a vLLM engine or a server), not hidden states."""
        return self.engine != "hf"

    def as_served(self) -> Teacher:
        """Where the reference runs, in the form the served engines take."""
        return Teacher(path=self.path, engine=self.engine, url=self.url, server=dict(self.server),
                       vllm=dict(self.vllm), options=dict(self.options))
