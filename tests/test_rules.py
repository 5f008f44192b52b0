"""Every rule of :mod:`lightning_unified.rules` is broken once, through the path a run takes
(building a spec, the method, the config check, the trainer's setup), and names itself;
``docs/rules.md`` holds the table the code registers."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_unified.config_checks import check_config
from lightning_unified.environments.feedback import FeedbackEnvironment
from lightning_unified.pipeline import check_method
from lightning_unified.rewards import exact_match
from lightning_unified.rules import RULES, RuleError, enforce, table
from lightning_unified.specs import (
    Dense,
    Environment,
    Importance,
    OffPolicy,
    OnPolicy,
    Preference,
    Reference,
    Reward,
    RewardPairs,
    Sampling,
    Sparse,
    Validation,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rules.md"
REWARD = Reward(functools.partial(exact_match))
EPISODES = Environment(cls=FeedbackEnvironment)


def sampled(**kwargs) -> OnPolicy:
    return OnPolicy(sampling=Sampling(num_generations=2), **kwargs)


def trainer_rule(**trainer_settings):
    def broken() -> None:
        from types import SimpleNamespace

        module = SimpleNamespace(data_source=trainer_settings.pop("data_source"), signal=trainer_settings.pop("signal"),
                                 validation=trainer_settings.pop("validation", None))
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, **trainer_settings)
        enforce("trainer", trainer, module)

    return broken


def config_rule() -> None:
    from omegaconf import OmegaConf

    check_config(OmegaConf.create({"data_source": {"_target_": "lightning_unified.specs.OffPolicy",
                                                   "sampling": {"max_lag": 1}}}))


# one way to break each rule, as a user would: the settings it relates, set against each other
BROKEN = {
    "lag-or-sync-every": lambda: Sampling(max_lag=1, sync_every=2),
    "lag-keeps-the-engine-awake": lambda: Sampling(max_lag=1, vllm={"sleep": True}),
    "sleep-level-2-syncs-every-wake": lambda: Sampling(engine="vllm", vllm={"sleep": True}, sync_every=2),
    "vllm-reports-raw-or-sampled": lambda: Sampling(engine="vllm", top_k=5, temperature=0.7),
    "served-engine-needs-servers": lambda: Sampling(engine="server"),
    "proximal-ratio-per-token": lambda: Importance(ratio="decoupled_ppo_clip", level="sequence"),
    "mask-needs-a-ratio": lambda: Importance(ratio="none", mask_high=2.0),
    "mask-band-in-order": lambda: Importance(mask_low=2.0, mask_high=1.0),
    "episodes-in-whole-rollouts": lambda: OnPolicy(environment=EPISODES, minibatches=2),
    "server-needs-url": lambda: Dense(engine="server"),
    "model-needs-path": lambda: Dense(teachers={"math": {"engine": "vllm"}}),
    "several-teachers-replace-the-one": lambda: Dense(teacher="/a", teachers={"math": {"path": "/m"}}),
    "several-teachers-score-the-student-prompt": lambda: Dense(teachers={"math": {"path": "/m"}},
                                                               teacher_context="{prompt}"),
    "cache-and-self-need-no-server": lambda: Dense(cache="/c", engine="vllm", teacher="/t"),
    "vllm-self-teacher-is-live": lambda: Dense(teacher="self", engine="vllm", teacher_context="{prompt}",
                                               divergence="sampled_reverse_kl", self_teacher="ema"),
    "dense-needs-a-teacher": lambda: Dense(),
    "self-teacher-needs-context": lambda: Dense(teacher="self"),
    "self-teacher-weights-need-self": lambda: Dense(teacher="/t", self_teacher="frozen"),
    "unencodable-logp-across-tokenizers": lambda: Dense(teacher="/t", unencodable_logp=-10.0),
    "two-vocabulary-divergence-needs-two": lambda: Dense(teacher="/t", divergence="uld"),
    "divergence-across-tokenizers": lambda: Dense(teacher="/t", teacher_tokenizer="auto", divergence="forward_kl"),
    "across-tokenizers-no-cache": lambda: Dense(cache="/c", teacher_tokenizer="auto", divergence="uld"),
    "across-tokenizers-not-self": lambda: Dense(teacher="self", teacher_context="{prompt}", teacher_tokenizer="auto",
                                                divergence="uld"),
    "across-tokenizers-one-teacher": lambda: Dense(teachers={"m": {"path": "/m"}}, teacher_tokenizer="auto",
                                                   divergence="uld"),
    "across-tokenizers-server-tokenizer": lambda: Dense(engine="server", url="http://127.0.0.1:1",
                                                        teacher_tokenizer="auto", divergence="sampled_reverse_kl"),
    "across-tokenizers-served-top-k": lambda: Dense(teacher="/t", engine="server", url="http://127.0.0.1:1",
                                                    teacher_tokenizer="auto", divergence="uld"),
    "cache-gives-top-k": lambda: Dense(cache="/c", divergence="reverse_kl"),
    "top-k-needs-a-top-k-divergence": lambda: Dense(teacher="/t", divergence="reverse_kl", top_k=4),
    "served-teacher-gives-log-probs": lambda: Dense(engine="server", url="http://127.0.0.1:1"),
    "served-teacher-at-temperature-1": lambda: Dense(engine="server", url="http://127.0.0.1:1", top_k=4,
                                                     temperature=2.0),
    "reference-across-tokenizers-is-k1": lambda: Reference(tokenizer="auto", path="/r"),
    "reference-across-tokenizers-needs-path": lambda: Reference(tokenizer="auto", estimator="k1"),
    "reference-unencodable-across-tokenizers": lambda: Reference(unencodable_logp=-5.0),
    "reference-vllm-needs-path": lambda: Reference(engine="vllm"),
    "off-policy-samples-nothing": config_rule,
    "k1-is-in-the-reward": lambda: check_method(OffPolicy(), Sparse(), Reference(estimator="k1")),
    "cache-scores-the-data": lambda: check_method(sampled(), Dense(cache="/c")),
    "episodes-without-pairs": lambda: check_method(sampled(environment=EPISODES), Preference(rewards=[REWARD])),
    "episodes-rewarded-by-the-environment": lambda: check_method(sampled(environment=EPISODES),
                                                                 Sparse(rewards=[REWARD])),
    "episodes-without-k1": lambda: check_method(sampled(environment=EPISODES), Sparse(), Reference(estimator="k1")),
    "sampling-needs-rewards": lambda: check_method(sampled(), Sparse()),
    "vllm-self-teacher-needs-vllm-sampling": lambda: check_method(
        sampled(), Dense(teacher="self", engine="vllm", teacher_context="{prompt}", divergence="sampled_reverse_kl")),
    "grouped-advantage-needs-a-group": lambda: check_method(OnPolicy(sampling=Sampling(num_generations=1)),
                                                            Sparse(rewards=[REWARD])),
    "online-dpo-needs-a-pair": lambda: check_method(OnPolicy(sampling=Sampling(num_generations=1)),
                                                    Preference(rewards=[REWARD])),
    "replay-needs-a-ratio": lambda: check_method(sampled(importance=Importance(ratio="none"), updates_per_rollout=2),
                                                 Sparse(rewards=[REWARD])),
    "lag-uncorrected": lambda: check_method(OnPolicy(sampling=Sampling(num_generations=2, max_lag=1),
                                                     importance=Importance(ratio="none")), Sparse(rewards=[REWARD])),
    "lag-needs-a-distribution-teacher": lambda: check_method(OnPolicy(sampling=Sampling(max_lag=1)),
                                                             Dense(teacher="/t", divergence="sampled_reverse_kl")),
    "served-reference-at-temperature-1": lambda: check_method(sampled(), Sparse(rewards=[REWARD]),
                                                              Reference(engine="server", url="http://127.0.0.1:1"),
                                                              temperature=0.7),
    "replay-without-accumulation": trainer_rule(accumulate_grad_batches=2, data_source=OnPolicy(updates_per_rollout=2),
                                                signal=Sparse(rewards=[REWARD])),
    "reward-model-trains-on-pairs": lambda: check_method(sampled(), RewardPairs()),
    "reward-model-validates-pairs": trainer_rule(data_source=OffPolicy(), signal=RewardPairs(),
                                                 validation=Validation(num_samples=4)),
    "reward-model-unsharded": trainer_rule(strategy=ModelParallelStrategy(), data_source=OffPolicy(),
                                           signal=RewardPairs()),
    "self-teacher-copy-unsharded": trainer_rule(strategy=ModelParallelStrategy(), data_source=OffPolicy(), signal=Dense(
        teacher="self", teacher_context="{prompt}", self_teacher="ema")),
}


def test_every_rule_is_broken_here() -> None:
    assert set(BROKEN) == set(RULES), (sorted(set(RULES) - set(BROKEN)), sorted(set(BROKEN) - set(RULES)))


@pytest.mark.parametrize("name", [n for n in RULES if RULES[n].severity == "error"])
def test_a_broken_rule_stops_the_run_with_its_message(name: str) -> None:
    with pytest.raises(RuleError) as raised:
        BROKEN[name]()
    assert raised.value.rule == name, f"{name} was broken, but {raised.value.rule} stopped the run: {raised.value}"
    # the message names the settings it relates, two at least, in the words users type
    named = [s for s in RULES[name].settings if _named(s, str(raised.value))]
    assert len(named) >= 2 or len(RULES[name].settings) == len(named), (RULES[name].settings, raised.value)


def _named(setting: str, message: str) -> bool:
    """The message names ``setting`` itself, its last part or the group it belongs to."""
    parts = setting.split(".")
    return any(form in message for form in (setting, parts[-1], ".".join(parts[:-1]) or setting))


@pytest.mark.parametrize("name", [n for n in RULES if RULES[n].severity == "warning"])
def test_a_rule_that_warns_says_so_once_and_the_run_goes_on(name: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="lightning_unified.rules"):
        BROKEN[name]()
    said = [r.getMessage() for r in caplog.records if r.name == "lightning_unified.rules"]
    assert len(said) == 1, said
    assert all(_named(s, said[0]) for s in RULES[name].settings), (RULES[name].settings, said[0])


def test_settings_that_agree_break_no_rule() -> None:
    check_method(sampled(), Sparse(rewards=[REWARD]))
    check_method(OffPolicy(), Dense(teacher="/t", top_k=4))
    check_method(sampled(), Dense(teacher="self", teacher_context="{prompt}"), Reference())


def test_the_docs_hold_the_rules_table() -> None:
    text = DOCS.read_text()
    written = text[text.index("| rule |"):]  # the page ends with the table
    assert written == table(), "docs/rules.md is behind the code: python -m lightning_unified.rules prints the table"
