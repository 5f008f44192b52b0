"""The rules of a dense signal: which keys choose its teacher, and what that teacher can
give the divergence (its whole distribution, a top-k, one log-prob per token; one
vocabulary or two). ``dense`` rules are handed the signal (its teacher resolved) and the
teacher keys as the config gave them (``keys``: teacher, engine, url, cache, teachers,
self_teacher)."""

from __future__ import annotations

from lightning_unified.registry import DIVERGENCES
from lightning_unified.rules import rule

# what each kind of teacher signal is, in an error
_NEEDS = {"distribution": "whole distribution", "token_logp": "log-prob of each sampled token"}


def from_top_k_names() -> list[str]:
    return [name for name in DIVERGENCES.names if DIVERGENCES[name].from_top_k is not None]


# --- one teacher (the teacher group, an entry of signal.teachers, a served reference) --------


@rule("server-needs-url", "teacher", "teacher.engine", "teacher.url")
def server_needs_url(entry, owner: str) -> str | None:
    """A teacher behind a server is reached at its URL."""
    if entry.engine == "server" and not entry.url:
        return (f"{owner}.engine=server asks an OpenAI-compatible server for its log-probs: set {owner}.url (e.g. "
                f"http://127.0.0.1:8000, where `python -m vllm.entrypoints.openai.api_server --model DIR "
                f"--max-logprobs 64` serves)")
    return None


@rule("model-needs-path", "teacher", "teacher.engine", "teacher.path")
def model_needs_path(entry, owner: str) -> str | None:
    """A teacher in the training process (hf or vllm) loads from a local directory."""
    if entry.engine != "server" and not entry.path:
        return f"{owner}.engine={entry.engine} loads the model from a local Hugging Face directory: set {owner}.path"
    return None


# --- which keys choose the teacher ------------------------------------------------------------


@rule("several-teachers-replace-the-one", "dense", "signal.teachers", "teacher.path", "teacher.url",
      "teacher.engine", "signal.cache")
def several_teachers_replace_the_one(signal, keys) -> str | None:
    """signal.teachers names every teacher: the one teacher's keys stay unset beside it."""
    if not keys.teachers:
        return None
    single = {"teacher.path": keys.teacher, "teacher.url": keys.url, "signal.cache": keys.cache}
    given = [f"{k}={v!r}" for k, v in single.items() if v is not None]
    if keys.engine != "hf":
        given.append(f"teacher.engine={keys.engine}")
    if given:
        return (f"signal.teachers names the teachers ({', '.join(keys.teachers)}); the one teacher's "
                f"{', '.join(given)} cannot be set beside it")
    return None


@rule("several-teachers-score-the-student-prompt", "dense", "signal.teachers", "signal.teacher_context")
def several_teachers_score_the_student_prompt(signal, keys) -> str | None:
    """Privileged context is the self-teacher's; several teachers score the student's prompt."""
    if keys.teachers and signal.teacher_context:
        return ("signal.teacher_context gives the self-teacher privileged context; with signal.teachers each teacher "
                "scores the student's own prompt")
    return None


@rule("cache-and-self-need-no-server", "dense", "teacher.engine", "signal.cache", "signal.teacher")
def cache_and_self_need_no_server(signal, keys) -> str | None:
    """An offline cache needs no engine, and a self-teacher is the policy, never a server."""
    if (keys.engine != "hf" and keys.cache is not None) or (keys.teacher == "self" and keys.engine == "server"):
        return (f"teacher.engine={keys.engine} serves a separate teacher; signal.cache scores without one, and "
                f"signal.teacher=self is scored by the policy (teacher.engine=hf) or by its own rollout engine "
                f"(teacher.engine=vllm)")
    return None


@rule("vllm-self-teacher-is-live", "dense", "signal.teacher", "teacher.engine", "signal.self_teacher")
def vllm_self_teacher_is_live(signal, keys) -> str | None:
    """The rollout engine holds the policy's current weights: only a live self-teacher."""
    if keys.teacher == "self" and keys.engine == "vllm" and keys.self_teacher != "live":
        return (f"signal.teacher=self with teacher.engine=vllm is scored by the rollout engine, which holds the "
                f"policy's current weights; signal.self_teacher={keys.self_teacher} keeps other weights, which only "
                f"teacher.engine=hf scores with")
    return None


@rule("dense-needs-a-teacher", "dense", "teacher.path", "teacher.url", "signal.teacher", "signal.cache",
      "signal.teachers")
def dense_needs_a_teacher(signal, keys) -> str | None:
    """A dense signal pushes towards a teacher, so one of the teacher keys names it."""
    if signal.teacher is None:
        return ("signal=dense needs a teacher: teacher.path=DIR (a local Hugging Face causal LM with the policy's "
                "vocabulary), signal.teacher=self with signal.teacher_context (self-distillation), signal.cache=DIR "
                "(an offline teacher from scripts/cache_teacher.py), or signal.teachers={name: {path: DIR}, ...} "
                "(several teachers, each example naming its own)")
    return None


@rule("self-teacher-needs-context", "dense", "signal.teacher", "signal.teacher_context")
def self_teacher_needs_context(signal, keys) -> str | None:
    """A self-teacher without privileged context is the student: nothing to learn."""
    if signal.is_self and not signal.teacher_context:
        return ("signal.teacher=self makes the policy its own teacher; without signal.teacher_context (a template "
                "giving the teacher privileged context, e.g. '{prompt}' with the '{reference}' answer) the two "
                "distributions are the same and there is nothing to learn")
    return None


@rule("self-teacher-weights-need-self", "dense", "signal.self_teacher", "signal.teacher")
def self_teacher_weights_need_self(signal, keys) -> str | None:
    """signal.self_teacher chooses a self-teacher's weights; other teachers have their own."""
    if keys.self_teacher != "live" and not signal.is_self:
        return (f"signal.self_teacher={keys.self_teacher} chooses the weights of a self-teacher "
                f"(signal.teacher=self); this run's teacher is {keys.teacher!r}")
    return None


# --- one vocabulary or two -------------------------------------------------------------------


@rule("unencodable-logp-across-tokenizers", "dense", "signal.unencodable_logp", "signal.teacher_tokenizer")
def unencodable_logp_across_tokenizers(signal, keys) -> str | None:
    """unencodable_logp is a log-prob (<= 0), for a teacher with its own tokenizer."""
    value = signal.unencodable_logp
    if value is not None and (not signal.across_tokenizers or value > 0):
        return (f"signal.unencodable_logp={value} is the log-prob (<= 0) a teacher with its own tokenizer "
                f"(signal.teacher_tokenizer=auto) gives a token it cannot encode")
    return None


@rule("two-vocabulary-divergence-needs-two", "dense", "signal.divergence", "signal.teacher_tokenizer")
def two_vocabulary_divergence_needs_two(signal, keys) -> str | None:
    """ULD compares two vocabularies; with one, forward_kl, reverse_kl and jsd are exact."""
    if not signal.across_tokenizers and DIVERGENCES[signal.divergence].only_across:
        return (f"signal.divergence={signal.divergence} compares distributions over two vocabularies; it needs a "
                f"teacher with its own tokenizer (signal.teacher_tokenizer=auto). With one tokenizer, forward_kl, "
                f"reverse_kl and jsd compare them exactly")
    return None


@rule("divergence-across-tokenizers", "dense", "signal.divergence", "signal.teacher_tokenizer")
def divergence_across_tokenizers(signal, keys) -> str | None:
    """Across tokenizers, only a divergence with a span form runs."""
    if signal.across_tokenizers and DIVERGENCES[signal.divergence].across is None:
        across = [name for name in DIVERGENCES.names if DIVERGENCES[name].across is not None]
        return (f"signal.divergence={signal.divergence} compares the two models token by token over one vocabulary, "
                f"which a teacher with its own tokenizer (signal.teacher_tokenizer=auto) does not share; the "
                f"divergences that run across tokenizers: {across}")
    return None


@rule("across-tokenizers-no-cache", "dense", "signal.teacher_tokenizer", "signal.cache")
def across_tokenizers_no_cache(signal, keys) -> str | None:
    """A cache holds the student's tokens; a teacher with its own tokenizer scores its own."""
    if signal.across_tokenizers and keys.cache is not None:
        return ("signal.cache holds a teacher's top-k over the tokens of the tokenizer it was made with "
                "(scripts/cache_teacher.py, the student's); a teacher with its own tokenizer "
                "(signal.teacher_tokenizer=auto) scores each reply in its own tokens: give teacher.path, or drop "
                "signal.cache")
    return None


@rule("across-tokenizers-not-self", "dense", "signal.teacher_tokenizer", "signal.teacher")
def across_tokenizers_not_self(signal, keys) -> str | None:
    """The policy shares its own tokenizer."""
    if signal.across_tokenizers and keys.teacher == "self":
        return "signal.teacher=self is the policy, which shares its tokenizer: signal.teacher_tokenizer=same"
    return None


@rule("across-tokenizers-one-teacher", "dense", "signal.teacher_tokenizer", "signal.teachers")
def across_tokenizers_one_teacher(signal, keys) -> str | None:
    """A teacher with its own tokenizer is one teacher."""
    if signal.across_tokenizers and keys.teachers:
        return ("signal.teacher_tokenizer=auto takes one teacher (teacher.path); several teachers (signal.teachers) "
                "must share the policy's tokenizer")
    return None


@rule("across-tokenizers-server-tokenizer", "dense", "signal.teacher_tokenizer", "teacher.engine", "teacher.path")
def across_tokenizers_server_tokenizer(signal, keys) -> str | None:
    """A served teacher with its own tokenizer needs that tokenizer locally."""
    if signal.across_tokenizers and keys.engine == "server" and not keys.teacher and not keys.teachers:
        return ("signal.teacher_tokenizer=auto encodes each reply with the teacher's own tokenizer: with "
                "teacher.engine=server give teacher.path=DIR, a local directory holding the served model's tokenizer")
    return None


@rule("across-tokenizers-served-top-k", "dense", "signal.teacher_tokenizer", "teacher.engine", "signal.divergence",
      "signal.top_k")
def across_tokenizers_served_top_k(signal, keys) -> str | None:
    """A served teacher gives a top-k, never its whole distribution."""
    teacher = signal.teachers.get("teacher")
    if (signal.across_tokenizers and teacher is not None and teacher.served
            and DIVERGENCES[signal.divergence].needs == "distribution" and not signal.top_k):
        return (f"teacher.engine={teacher.engine} returns the teacher's top-k, not its whole distribution: "
                f"signal.divergence={signal.divergence} with a served teacher needs signal.top_k=K")
    return None


# --- what the teacher can give the divergence ----------------------------------------------


@rule("cache-gives-top-k", "dense", "signal.cache", "signal.divergence", "signal.teacher", "signal.teacher_context")
def cache_gives_top_k(signal, keys) -> str | None:
    """A cache holds another teacher's top-k on the data's own prompts."""
    if keys.cache is not None and (DIVERGENCES[signal.divergence].from_top_k is None or keys.teacher == "self"
                                   or signal.teacher_context):
        return (f"signal.cache holds the teacher's top-k on the dataset's responses: it gives a divergence that runs "
                f"from a top-k (signal.divergence={'|'.join(from_top_k_names())}), from a teacher other than the "
                f"policy, without teacher_context; got divergence={signal.divergence!r}, teacher={keys.teacher!r}, "
                f"teacher_context={signal.teacher_context!r}")
    return None


@rule("top-k-needs-a-top-k-divergence", "dense", "signal.top_k", "signal.divergence")
def top_k_needs_a_top_k_divergence(signal, keys) -> str | None:
    """A top-k signal feeds only the divergences that run from a top-k."""
    divergence = DIVERGENCES[signal.divergence]
    if signal.top_k and divergence.from_top_k is None and not signal.across_tokenizers:
        return (f"signal.top_k={signal.top_k} gives the teacher's top-k, from which signal.divergence="
                f"{signal.divergence!r} cannot run (it needs the teacher's {_NEEDS[divergence.needs]}); the "
                f"divergences that run from a top-k: {from_top_k_names()}")
    return None


def _served(signal) -> list[tuple[str, str]]:
    """(where, engine) of each teacher that answers with log-probs, as the user named it."""
    if signal.is_self:
        return [("teacher", "vllm")] if signal.teacher.served else []
    return [("teacher" if name == "teacher" and not signal.routed else f"signal.teachers.{name}", t.engine)
            for name, t in signal.teachers.items() if t.served]


@rule("served-teacher-gives-log-probs", "dense", "teacher.engine", "signal.divergence", "signal.top_k")
def served_teacher_gives_log_probs(signal, keys) -> str | None:
    """A served teacher returns its top-k and each sampled token's log-prob, not its whole distribution."""
    if signal.teacher_gives != "distribution" or signal.across_tokenizers:
        return None
    for owner, engine in _served(signal):
        works = [f"signal.divergence={name} with signal.top_k=K (from the top-k)" for name in from_top_k_names()]
        works += [f"signal.divergence={name} (the teacher's log-prob of each sampled token)"
                  for name in DIVERGENCES.names if DIVERGENCES[name].needs == "token_logp"]
        return (f"{owner}.engine={engine} returns the teacher's top-k and each sampled token's log-prob, not its "
                f"whole distribution, which signal.divergence={signal.divergence!r}"
                f"{' without signal.top_k' if DIVERGENCES[signal.divergence].from_top_k else ''} needs. "
                f"Signals that work with it: {', or '.join(works)}")
    return None


@rule("served-teacher-at-temperature-1", "dense", "teacher.engine", "signal.temperature")
def served_teacher_at_temperature_1(signal, keys) -> str | None:
    """A served teacher's log-probs are at temperature 1."""
    for owner, engine in _served(signal):
        if signal.temperature != 1.0:
            return (f"{owner}.engine={engine} reports log-probs at temperature 1; signal.temperature="
                    f"{signal.temperature} needs the teacher's logits (engine=hf)")
    return None
