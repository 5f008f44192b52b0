"""The built-in feedback environment: a wrong answer hears so and may try again.

For data whose rows have a reference answer (SmolLM2's arithmetic, any question with a
number for an answer): each policy turn is an answer, scored by ``numeric_answer``. A right
answer ends the episode with reward 1; a wrong one gets ``message`` back as a user turn
until ``attempts`` answers have been given, and the episode's reward is the last answer's
correctness. ``info`` reports ``first_attempt`` and ``last_attempt`` (1 when right) and
``attempts``, so a run with one attempt and one with three can be compared on both; an
episode cut before an answer (a reply past its token limit) counts as wrong on both.
"""

from __future__ import annotations

from lightning_unified.environments.base import Environment, Reset, Step
from lightning_unified.rewards.text import numeric_answer


class FeedbackEnvironment(Environment):
    def __init__(self, attempts: int = 3, message: str = "That is wrong. Try again: give only the number."):
        if attempts < 1:
            raise ValueError(f"FeedbackEnvironment: attempts must be >= 1, got {attempts}")
        self.attempts, self.message = attempts, message

    def reset(self, row: dict) -> Reset:
        if row.get("reference") is None:
            raise ValueError(f"FeedbackEnvironment scores answers against the row's reference, and row {row.get('index')} "
                             f"has none (a reference column is needed)")
        prompt = row["prompt"]
        self.reference, self.given, self.first = row["reference"], 0, None
        messages = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": prompt}]
        # an episode cut before its first answer (a reply past max_new_tokens) answered nothing right
        return Reset(messages, info={"first_attempt": 0.0, "last_attempt": 0.0, "attempts": 0.0})

    def step(self, message: dict) -> Step:
        right = float(numeric_answer([message["content"]], [self.reference])[0])
        self.given += 1
        if self.first is None:
            self.first = right
        done = bool(right) or self.given >= self.attempts
        info = {"first_attempt": self.first, "last_attempt": right, "attempts": float(self.given)}
        messages = [] if done else [{"role": "user", "content": self.message}]
        return Step(messages, reward=right if done else 0.0, done=done, info=info)
