"""Environments: multi-turn episodes in which the policy calls tools and hears feedback.

- :mod:`~lightning_unified.environments.base`: the interface (``reset`` a data row to the
  first messages and tools, ``step`` on each policy turn to messages, a reward and ``done``)
  and the checks on what an environment returns;
- :mod:`~lightning_unified.environments.tools`: tools as plain Python functions, their
  schemas, the calls parsed from the policy's text, and calls run with a time limit;
- :mod:`~lightning_unified.environments.episodes`: the episode loop through a rollout engine,
  token-exact, and the rows it gives the batch;
- :mod:`~lightning_unified.environments.sampling`: a training batch's episodes;
- :mod:`~lightning_unified.environments.feedback`: the built-in feedback environment
  (another attempt after a wrong answer). The tool task's environment is in
  :mod:`lightning_unified.tasks.multiply`.
"""

from lightning_unified.environments.base import Environment, EnvironmentOutputError, Reset, Step
from lightning_unified.environments.tools import ToolCall, parse_tool_calls, tool_schemas

__all__ = ["Environment", "EnvironmentOutputError", "Reset", "Step", "ToolCall", "parse_tool_calls", "tool_schemas"]
