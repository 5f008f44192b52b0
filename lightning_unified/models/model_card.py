"""The README.md written beside an exported policy: a Hugging Face model card whose front
matter the Hub reads (library, pipeline, tags, base model), and whose body says how the
weights were made (the method, the run's composed config) and how well they did (the
latest validation figures, with the step they were measured at), so a directory copied
away from its run still says what it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class CardFacts:
    """What a model card states. ``method``: the one line a run logs at start
    (``method: data_source=... signal=... | ...``); ``choices``: the config groups the run
    picked (data_source, signal, experiment, task, model, trainer) where Hydra recorded them;
    ``config``: the composed config as YAML; ``validation``: {metric: value} measured at
    ``validation_step`` (None: never validated)."""

    step: int
    method: str | None = None
    choices: dict[str, str] = field(default_factory=dict)
    config: str | None = None
    validation: dict[str, float] = field(default_factory=dict)
    validation_step: int | None = None
    base_model: str | None = None


def front_matter(facts: CardFacts, adapter: bool, reward_model: bool = False) -> dict:
    """The card's metadata, in the fields the Hub's model cards define."""
    tags = ["lightning_unified"]
    tags += [facts.choices[k] for k in ("data_source", "signal", "experiment") if facts.choices.get(k)]
    meta = {"library_name": "peft" if adapter else "transformers",
            "pipeline_tag": "text-classification" if reward_model else "text-generation", "tags": tags}
    if facts.base_model:
        meta["base_model"] = facts.base_model
    return meta


def model_card(facts: CardFacts, adapter: bool = False, reward_model: bool = False) -> str:
    """The card's text: front matter, then the method, the figures, how to load it, the config.
    ``reward_model``: the directory is a reward model (signal=reward_model), an
    ``AutoModelForSequenceClassification``, not a causal LM."""
    meta = yaml.safe_dump(front_matter(facts, adapter, reward_model), sort_keys=False).strip()
    title = "Reward model" if reward_model else "Policy"
    lines = ["---", meta, "---", "", f"# {title} at optimizer step {facts.step}", "",
             "Trained with lightning_unified (SFT, distillation, RL and on-policy distillation as one "
             "weighted loss, in PyTorch Lightning).", "", "## Method", ""]
    source, signal = facts.choices.get("data_source"), facts.choices.get("signal")
    if source and signal:
        lines.append(f"- data_source=`{source}` x signal=`{signal}`")
    if facts.choices:  # Hydra recorded the groups the run picked
        lines.append(f"- preset: `experiment={facts.choices['experiment']}`" if facts.choices.get("experiment")
                     else "- preset: none (composed from the config groups alone)")
    if facts.method:
        lines.append(f"- {facts.method}")
    lines += ["", "## Validation", ""]
    if facts.validation:
        lines += [f"Measured at optimizer step {facts.validation_step}.", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{name}` | {value:.4f} |" for name, value in sorted(facts.validation.items())]
    else:
        lines.append("Not validated before this export.")
    lines += ["", "## Load", "", "```python"]
    if reward_model:  # one score per sequence; lightning_unified.rewards.RewardModel(DIR) scores completions with it
        lines += ["from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  "model = AutoModelForSequenceClassification.from_pretrained(DIR)",
                  "tokenizer = AutoTokenizer.from_pretrained(DIR)"]
    elif adapter:
        lines += ["from peft import AutoPeftModelForCausalLM", "", "model = AutoPeftModelForCausalLM.from_pretrained(DIR)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained(DIR)", "tokenizer = AutoTokenizer.from_pretrained(DIR)"]
    lines.append("```")
    if facts.config:
        lines += ["", "## Config", "", "The run's composed config:", "", "```yaml", facts.config.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, facts: CardFacts, adapter: bool = False, reward_model: bool = False
                     ) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(model_card(facts, adapter, reward_model), encoding="utf-8")
    return path
