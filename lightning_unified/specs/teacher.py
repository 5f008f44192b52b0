"""A dense signal's teacher: exactly one of six kinds, each with only its own fields.

===================  ==========================================================  ================================
kind                 what scores the batch                                       the keys that choose it
===================  ==========================================================  ================================
:class:`HFTeacher`   a Hugging Face model in each training process               ``teacher.path=DIR``
:class:`VLLMTeacher` a frozen vLLM engine in each training process               ``teacher.engine=vllm``
:class:`ServerTeacher` an OpenAI-compatible server (vLLM's)                      ``teacher.engine=server teacher.url=URL``
:class:`SelfTeacher` the policy itself, with privileged context                  ``signal.teacher=self``
:class:`CachedTeacher` an offline top-k written by ``scripts/cache_teacher.py``  ``signal.cache=DIR``
:class:`SeveralTeachers` one of the above per example, by the data's name        ``signal.teachers={name: {...}}``
===================  ==========================================================  ================================

The keys stay the ones users type (the ``teacher`` config group and ``signal.*``); a
:class:`~lightning_unified.specs.signal.Dense` turns them into one of these once
(:func:`resolve_teacher`), and nothing downstream reads the keys again. The rules that relate
these keys to each other and to the divergence are in :mod:`lightning_unified.rules.teacher`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar, Union

from lightning_unified.rules import enforce
from lightning_unified.specs.checks import one_of
from lightning_unified.specs.model import ModelRef

SELF_TEACHER = "self"
# where a teacher runs: in the training process as a Hugging Face model, as a frozen vLLM
# engine, or behind an OpenAI-compatible server
TEACHER_ENGINES = ("hf", "vllm", "server")
# which weights a self-teacher scores with (lightning_unified/models/snapshot.py)
SELF_TEACHER_UPDATES = ("live", "frozen", "ema", "refresh")
# the keys of one teacher, as the teacher group and each entry of signal.teachers give them
ENTRY_KEYS = ("path", "engine", "url", "server", "vllm", "options")


@dataclass
class HFTeacher:
    """A Hugging Face causal LM in each training process: its hidden states and head, so
    every divergence (the whole distribution)."""

    model: ModelRef
    engine: ClassVar[str] = "hf"
    served: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _checked_entry(self, path=self.model.path)

    def describe(self) -> str:
        return str(self.model.path)


@dataclass
class VLLMTeacher:
    """A frozen vLLM engine in each training process, loaded from ``model.path``; ``vllm``:
    :class:`~lightning_unified.teachers.vllm.InProcessTeacher`'s options. Answers with
    log-probs (its top-k, each token's)."""

    model: ModelRef
    vllm: dict = field(default_factory=dict)
    engine: ClassVar[str] = "vllm"
    served: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _checked_entry(self, path=self.model.path)

    def describe(self) -> str:
        return f"{self.model.path} (vllm)"


@dataclass
class ServerTeacher:
    """An OpenAI-compatible server at ``url``; ``server``:
    :class:`~lightning_unified.teachers.server.ServedTeacher`'s options. ``tokenizer``: a
    local directory holding the served model's tokenizer, with its loading options (a
    teacher with its own tokenizer needs it; ``teacher.path``)."""

    url: str
    server: dict = field(default_factory=dict)
    tokenizer: ModelRef = field(default_factory=ModelRef)
    engine: ClassVar[str] = "server"
    served: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, str):  # a directory given alone
            self.tokenizer = ModelRef(self.tokenizer)
        _checked_entry(self, path=self.tokenizer.path, url=self.url)

    def describe(self) -> str:
        return f"server {self.url}"


# one teacher of a run or of signal.teachers
TeacherEntry = Union[HFTeacher, VLLMTeacher, ServerTeacher]


@dataclass
class SelfTeacher:
    """The policy itself, under no_grad, after a prompt with privileged context
    (``signal.teacher_context``). ``weights``: the policy's own (``live``), the starting
    policy's (``frozen``), an average keeping ``decay`` of the old each step (``ema``) or
    the policy's copied every ``every`` optimizer steps (``refresh``). ``scored_by``: the
    policy's forward (``hf``) or the run's vLLM rollout engine (``vllm``)."""

    weights: str = "live"
    decay: float = 0.99
    every: int = 50
    scored_by: str = "hf"
    engine: ClassVar[str] = "self"

    def __post_init__(self) -> None:
        one_of("signal", "self_teacher", self.weights, SELF_TEACHER_UPDATES)
        one_of("teacher", "engine", self.scored_by, ("hf", "vllm"))
        if not 0 <= self.decay < 1:
            raise ValueError(f"signal.self_teacher_decay must be in [0, 1), got {self.decay}")
        if self.every < 1:
            raise ValueError(f"signal.self_teacher_every must be >= 1 optimizer step, got {self.every}")

    @property
    def served(self) -> bool:
        return self.scored_by == "vllm"

    def describe(self) -> str:
        return "self" + (" (scored by the rollout engine)" if self.served else "")


@dataclass
class CachedTeacher:
    """An offline teacher: the top-k ``scripts/cache_teacher.py`` wrote to ``directory`` for
    the dataset's responses. ``made_by``: the teacher it names (``teacher.path``), checked
    against the cache's own record."""

    directory: str
    made_by: str | None = None
    engine: ClassVar[str] = "cache"
    served: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("signal.cache: give the directory scripts/cache_teacher.py wrote")

    def describe(self) -> str:
        return f"cache {self.directory}"


@dataclass
class SeveralTeachers:
    """Several teachers by name; each example is scored by the one its data names."""

    teachers: dict[str, TeacherEntry]
    engine: ClassVar[str] = "several"

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ValueError("signal.teachers names no teacher: give at least one, {name: {path: DIR}, ...}")
        self.teachers = as_teachers(self.teachers)

    @property
    def served(self) -> bool:
        return any(t.served for t in self.teachers.values())

    def describe(self) -> str:
        return ", ".join(f"{name}={t.describe()}" for name, t in self.teachers.items())


TeacherSource = Union[HFTeacher, VLLMTeacher, ServerTeacher, SelfTeacher, CachedTeacher, SeveralTeachers]
TEACHER_KINDS = (HFTeacher, VLLMTeacher, ServerTeacher, SelfTeacher, CachedTeacher, SeveralTeachers)


def _checked_entry(teacher, path: str | None, url: str | None = None, owner: str = "teacher") -> None:
    """The teacher rules on a teacher given whole, as on one given by its keys."""
    enforce("teacher", SimpleNamespace(path=path, engine=teacher.engine, url=url), owner=owner)


def teacher_entry(path: str | None = None, engine: str = "hf", url: str | None = None, server: dict | None = None,
                  vllm: dict | None = None, options: dict | None = None, *, owner: str = "teacher") -> TeacherEntry:
    """One teacher from its keys (``owner``: where they were given, for errors)."""
    one_of(owner, "engine", engine, TEACHER_ENGINES)
    model = ModelRef.of(path, options, f"{owner} load options")
    enforce("teacher", SimpleNamespace(path=path, engine=engine, url=url), owner=owner)
    if engine == "server":
        return ServerTeacher(url, dict(server or {}), tokenizer=model)
    if engine == "vllm":
        return VLLMTeacher(model, dict(vllm or {}))
    return HFTeacher(model)


def as_teachers(teachers) -> dict[str, TeacherEntry]:
    """``signal.teachers`` as {name: teacher}; each entry a teacher or its keys as a mapping."""
    out = {}
    for name, spec in dict(teachers or {}).items():
        owner = f"signal.teachers.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"signal.teachers: each teacher's name must be a non-empty string, got {name!r}")
        if isinstance(spec, (HFTeacher, VLLMTeacher, ServerTeacher)):
            out[name] = spec
            continue
        if not (isinstance(spec, dict) or hasattr(spec, "items")):
            raise TypeError(f"{owner} must be a teacher's fields ({list(ENTRY_KEYS)}), got {type(spec).__name__}: "
                            f"{spec!r}")
        spec = dict(spec.items())
        unknown = sorted(set(spec) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"{owner} has unknown key(s) {unknown}; a teacher has {list(ENTRY_KEYS)}")
        if spec.get("path") == SELF_TEACHER:
            raise ValueError(f"{owner}.path=self: self-distillation has one teacher, the policy itself "
                             f"(signal.teacher=self without signal.teachers)")
        out[name] = teacher_entry(**{k: dict(v) if k in ("server", "vllm", "options") and v is not None else v
                                     for k, v in spec.items()}, owner=owner)
    return out


def resolve_teacher(keys: SimpleNamespace) -> TeacherSource | None:
    """The teacher the keys choose (None: they choose none, which a rule refuses). Keys that
    exclude each other are the rules' to name; here the first that applies wins, in the
    table's order: several, self, cache, server, vllm, a model in process."""
    if keys.teachers:
        return SeveralTeachers(keys.teachers)
    if keys.teacher == SELF_TEACHER:
        return SelfTeacher(keys.self_teacher, keys.self_teacher_decay, keys.self_teacher_every,
                           scored_by="vllm" if keys.engine == "vllm" else "hf")
    if keys.cache is not None:
        return CachedTeacher(keys.cache, made_by=keys.teacher)
    if keys.teacher is None and keys.engine != "server":
        return None
    return teacher_entry(keys.teacher, keys.engine, keys.url, keys.server, keys.vllm, keys.teacher_options,
                         owner="teacher")
