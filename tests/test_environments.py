"""Multi-turn episodes against environments, on the built-in tool task's tiny real models
(``multiply_start`` and ``multiply_teacher``, shipped with the package): token exactness,
the split of a template that rewrites history, the loss on the policy's tokens only, tools
that fail, and bad input named."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_unified import batch as fields
from lightning_unified.engines.base import GenerationRequest
from lightning_unified.engines.hf import HFEngine
from lightning_unified.environments import Environment, EnvironmentOutputError, Reset, Step, parse_tool_calls
from lightning_unified.environments.episodes import EpisodeLimits, render_ids, run_episodes
from lightning_unified.environments.feedback import FeedbackEnvironment
from lightning_unified.environments.tools import ToolCall, run_tool_call
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import Environment as EnvironmentSpec
from lightning_unified.specs import Importance, OnPolicy, Sampling, Sparse
from lightning_unified.stages import Stage
from lightning_unified.tasks.addition import checkpoint_path
from lightning_unified.tasks.multiply import MultiplyDataModule, MultiplyEnvironment, multiply, tool_chat_tokenizer
from tests.lightning_helpers import quiet_trainer
from tests.test_runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LIMITS = EpisodeLimits(max_turns=3, max_tokens=64, tool_timeout=5.0)


class RecordingEngine(HFEngine):
    """The real hf engine, keeping what it generated for each row of each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def generate(self, policy, prompt_ids, prompt_mask, request):
        rollout = super().generate(policy, prompt_ids, prompt_mask, request)
        self.calls.append([row[mask.bool()].tolist() for row, mask in zip(rollout.response_ids, rollout.response_mask)])
        return rollout


@pytest.fixture(scope="module")
def teacher():
    return AutoModelForCausalLM.from_pretrained(checkpoint_path("multiply_teacher")).eval()


@pytest.fixture(scope="module")
def data():
    return MultiplyDataModule(num_train=16, num_val=8)


def rows_of(data, n=8):
    return [{"prompt": p["prompt"], "reference": p["reference"], "index": i} for i, p in enumerate(data.val_problems[:n])]


def request(tokenizer, greedy=True, seed=0, max_new_tokens=16):
    return GenerationRequest(max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_token_id,),
                             pad_token_id=tokenizer.pad_token_id, greedy=greedy, seed=seed)


def run(engine, model, tokenizer, rows, factory, limits=LIMITS, greedy=True, group=1):
    return run_episodes(engine, model, tokenizer, rows, factory, request(tokenizer, greedy), limits,
                        torch.device("cpu"), group=group)


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_a_trajectory_is_the_generated_tokens_and_the_templates_environment_turns(teacher, data, greedy) -> None:
    """Row by row: the loss-mask tokens are exactly what the engine generated, turn after
    turn; the rest are the template's rendering of each environment turn after the prefix;
    behaviour log-probs cover exactly the policy's tokens. Greedy, the policy writes what
    the tokenizer would write, and the whole row is the template's render of the final
    conversation (this template only appends)."""
    tokenizer, engine = data.tokenizer, RecordingEngine()
    episodes = run(engine, teacher, tokenizer, rows_of(data), MultiplyEnvironment, greedy=greedy, group=2)
    assert sum(e.counts["tool_calls"] for e in episodes) >= len(episodes) // 2  # the tool is used
    active = list(range(len(episodes)))
    generated = {i: [] for i in active}
    for call in engine.calls:  # each call's rows are the episodes still running, in order
        for i, ids in zip(active, call):
            generated[i].append(ids)
        active = [i for i in active if sum(len(g) for g in generated[i]) and not _ended_by(episodes[i], generated[i])]
    for i, episode in enumerate(episodes):
        row = episode.segments[0]
        assert len(episode.segments) == 1
        mask = torch.tensor(row.loss_mask)
        policy_tokens = [t for t, m in zip(row.response, row.loss_mask) if m]
        expected_policy = [t for turn in generated[i] for t in turn][:len(policy_tokens)]
        assert policy_tokens == expected_policy
        logp = torch.tensor(row.logp)
        if not greedy:
            assert (logp[mask.bool()] < 0).all() and (logp[~mask.bool()] == 0).all()
        # the environment's tokens are the template's rendering after each reply, through the next generation prompt
        conversation = [m for m in episode.messages]
        assistant_at = [k for k, m in enumerate(conversation) if m["role"] == "assistant"]
        expected_env = []
        for turn, k in enumerate(assistant_at[:-1]):
            nxt = assistant_at[turn + 1]
            before = render_ids(tokenizer, conversation[:k + 1], episode.schemas, False)
            after = render_ids(tokenizer, conversation[:nxt], episode.schemas, True)
            expected_env += after[len(before):]
        assert [t for t, m in zip(row.response, row.loss_mask) if not m] == expected_env
        if greedy:
            assert row.prompt + row.response == render_ids(tokenizer, episode.messages, episode.schemas, False)


def _ended_by(episode, turns) -> bool:
    return len(turns) >= episode.counts["turns"]


def _rewrites_history(tokenizer):
    """The tool task's template, except that an earlier assistant turn is rendered only
    as far as its first 6 characters, as a template that drops past reasoning does."""
    rewriting = copy.deepcopy(tokenizer)
    rewriting.chat_template = (
        "{%- if tools %}<system>tools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}<end>{% endif %}"
        "{%- for message in messages %}<{{ message.role }}>"
        "{%- if message.role == 'assistant' and not loop.last %}{{ message.content[:6] }}"
        "{%- else %}{{ message.content }}{% endif %}<end>{% endfor %}"
        "{%- if add_generation_prompt %}<assistant>{% endif %}")
    return rewriting


def test_a_template_that_rewrites_history_splits_the_trajectory(teacher, data) -> None:
    """The policy's tool call is shortened once the tool has answered: the conversation's
    render no longer extends the row, so a second row starts from the template's render of
    the whole conversation; both rows are the episode's and share its reward."""
    tokenizer = _rewrites_history(data.tokenizer)
    episodes = run(HFEngine(), teacher, tokenizer, rows_of(data, 4), MultiplyEnvironment)
    from lightning_unified.environments.episodes import episode_rows

    for episode in episodes:
        assert episode.counts["splits"] == 1 and len(episode.segments) == 2
        first, second = episode.segments
        assert all(first.loss_mask) and first.response[-1] == tokenizer.eos_token_id  # ends after the policy's call
        call_and_tool = episode.messages[:3]
        assert second.prompt == render_ids(tokenizer, call_and_tool, episode.schemas, True)
        assert tokenizer.decode(second.prompt).count("<tool_call>") == 0  # the call as rewritten: 6 characters
        assert second.loss_mask[0] == 1  # the policy's next reply, from the rewritten history
    rows = episode_rows(episodes, tokenizer.pad_token_id, torch.device("cpu"))
    assert rows["episode"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rows["episode_rewards"], torch.tensor([e.reward for e in episodes]))


def test_advantages_are_taken_per_episode_when_one_spans_rows() -> None:
    from lightning_unified.stages.advantages import AdvantagesStage

    stage = AdvantagesStage(Sparse(advantage="grpo"))
    mask = torch.ones(5, 3, dtype=torch.long)
    batch = {fields.REWARDS: torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]), fields.EPISODE: [0, 0, 1, 2, 3],
             fields.GROUP_SIZE: 2, fields.RESPONSE_MASK: mask, fields.LOSS_MASK: mask, fields.SAMPLED: True,
             fields.BEHAVIOUR_LOGP: torch.zeros(5, 3)}
    stage.run(None, None, batch, 0)
    per_row = batch[fields.ADVANTAGES][:, 0]
    # episodes 0 and 1 (rewards 1, 0) are one prompt's group; episodes 2 and 3 (0, 0) the other's
    assert per_row[0] == per_row[1] > 0 and per_row[2] < 0 and per_row[3] == per_row[4] == 0


def boom(a: int, b: int) -> int:
    """A tool that fails.

    Args:
        a: The first factor.
        b: The second factor.
    """
    raise RuntimeError("the service is down")


def _hang(a: int, b: int) -> int:
    """A tool that never answers in time.

    Args:
        a: The first factor.
        b: The second factor.
    """
    time.sleep(60)
    return a * b


class FailingTool(MultiplyEnvironment):
    """The task's environment, whose ``multiply`` raises or hangs."""

    def __init__(self, failure):
        super().__init__()
        self.failure = failure

    def reset(self, row):
        start = super().reset(row)
        tool = functools.wraps(multiply)(functools.partial(self.failure))
        return Reset(start.messages, tools=[tool])


@pytest.mark.parametrize("failure", [boom, _hang], ids=["raises", "hangs"])
def test_a_tool_that_raises_or_hangs_answers_the_policy_and_the_episode_goes_on(teacher, data, failure) -> None:
    limits = EpisodeLimits(max_turns=3, max_tokens=100, tool_timeout=0.5)  # room for the error message
    run_tool_call(ToolCall("multiply", {"a": 1, "b": 2}), {"multiply": multiply}, 60.0)  # the tools' process is up
    started = time.perf_counter()
    episodes = run(HFEngine(), teacher, data.tokenizer, rows_of(data, 2), functools.partial(FailingTool, failure),
                   limits=limits)
    assert time.perf_counter() - started < 30  # the hung calls (60 s each) were stopped, not waited for
    for episode in episodes:
        tool_turns = [m for m in episode.messages if m["role"] == "tool"]
        assert tool_turns and episode.counts["tool_errors"] == len(tool_turns)
        expected = "raised RuntimeError: the service is down" if failure is boom else "took longer than 0.5 s"
        assert expected in tool_turns[0]["content"] and tool_turns[0]["content"].startswith("error: ")
        timeouts = sum("took longer than" in m["content"] for m in tool_turns)
        assert episode.counts["tool_timeouts"] == timeouts and (timeouts >= 1) == (failure is _hang)
        assert episode.counts["turns"] >= 2  # the policy read the error and went on


def spin(a: int, b: int) -> int:
    """A tool that never returns and keeps its core busy.

    Args:
        a: The first factor.
        b: The second factor.
    """
    while True:
        a += b


def _tool_processes() -> set[int]:
    """This process's live descendants, less multiprocessing's own servers (the forkserver
    that forks the tools' processes, and its resource tracker, which stay), and its live
    Process objects: every process a tool could have left behind."""
    import multiprocessing

    psutil = pytest.importorskip("psutil")
    infrastructure = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")
    children = {p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE and not any(s in " ".join(p.cmdline()) for s in infrastructure)}
    return children | {p.pid for p in multiprocessing.active_children()}


def test_four_hung_tools_leave_no_thread_or_process_behind() -> None:
    """Each spinning tool is stopped at its timeout, with its process: afterwards the process
    has the threads and children it had before (a thread that ran the tool would spin on,
    taking the trainer's Python time)."""
    from lightning_unified.environments.tool_worker import close_tool_processes

    assert run_tool_call(ToolCall("multiply", {"a": 6, "b": 7}), {"multiply": multiply}, timeout=60.0).content == "42"
    close_tool_processes()  # the warm-up started the forkserver: from here, nothing of the tools may stay
    threads, children = set(threading.enumerate()), _tool_processes()
    assert not children
    for _ in range(4):
        result = run_tool_call(ToolCall("spin", {"a": 1, "b": 2}), {"spin": spin}, timeout=0.5)
        assert result.timed_out and result.error and result.content == "error: tool 'spin' took longer than 0.5 s"
    assert set(threading.enumerate()) == threads
    assert _tool_processes() == children


class Counter:
    """A tool's object with state: a method changes it, as an environment's method would."""

    def __init__(self):
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Add, counting the calls.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls += 1
        return a + b


def test_a_method_tool_keeps_its_objects_state_across_calls_in_its_process() -> None:
    counter = Counter()
    for expected in (1, 2):
        assert run_tool_call(ToolCall("add", {"a": 1, "b": 2}), {"add": counter.add}, timeout=60.0).content == "3"
        assert counter.calls == expected


class LocalTool(MultiplyEnvironment):
    def reset(self, row):
        def local(a: int, b: int) -> int:
            """Multiply, from inside a function.

            Args:
                a: The first factor.
                b: The second factor.
            """
            return a * b

        return Reset(super().reset(row).messages, tools=[local])


def test_a_tool_that_cannot_reach_the_tools_process_is_named(teacher, data) -> None:
    with pytest.raises(EnvironmentOutputError, match=r"LocalTool.reset: tool 'local' cannot be sent to the process "
                                                     r"tools run in \(.*local.*\); a tool is a function defined at "
                                                     r"the top of a module"):
        run(HFEngine(), teacher, data.tokenizer, rows_of(data, 1), LocalTool)


def test_bad_tool_calls_come_back_to_the_policy_as_messages() -> None:
    tools = {"multiply": multiply}
    cases = {
        '<tool_call>{"name": "divide", "arguments": {"a": 1, "b": 2}}</tool_call>': "unknown tool 'divide'",
        '<tool_call>{"name": "multiply", "arguments": {"a": 1,, "b": 2}}</tool_call>': "not valid JSON",
        '<tool_call>{"name": "multiply", "arguments": [1, 2]}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 1"}</tool_call>': "are not valid JSON",
        '<tool_call>{"name": "multiply", "arguments": {"a": 1}}</tool_call>': "raised TypeError",
        '<tool_call>["multiply"]</tool_call>': 'a tool call is a JSON object {"name"',
        '<tool_call>{"name": "multiply", "arguments": {"a": 1, "b": 2}}': "not closed",
    }
    for text, expected in cases.items():
        (call,) = parse_tool_calls(text)
        result = run_tool_call(call, tools, timeout=1.0)
        assert result.error and result.content.startswith("error: ") and expected in result.content, text
    (call,) = parse_tool_calls('<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 6, \\"b\\": 7}"}</tool_call>')
    assert run_tool_call(call, tools, timeout=1.0).content == "42"
    assert parse_tool_calls("56088") == []
    assert run_tool_call(ToolCall("multiply", {"a": 3, "b": 4}), tools, timeout=1.0).content == "12"


def test_a_tokenizer_that_knows_its_format_is_parsed_with_it(teacher, data) -> None:
    """With a ``response_template``, transformers' parser reads the calls (here a format of
    its own, ``[CALL]...[/CALL]``), not the Hermes default; a bad call still comes back."""
    tokenizer = copy.deepcopy(data.tokenizer)
    tokenizer.response_template = {
        "defaults": {"role": "assistant"}, "start_anchor": "<assistant>",
        "fields": {"tool_calls": {"open": "[CALL]", "close": "[/CALL]", "repeats": True, "content": "json",
                                  "transform": {"type": "function", "function": "{content}"}},
                   "content": {"close": "<end>", "content": "text"}}}
    prefix = tokenizer("<user>6*7<end><assistant>", add_special_tokens=False).input_ids
    (call,) = parse_tool_calls("", tokenizer, raw='[CALL]{"name": "multiply", "arguments": {"a": 6, "b": 7}}[/CALL]<end>',
                               prefix=prefix)
    assert (call.name, call.arguments, call.error) == ("multiply", {"a": 6, "b": 7}, None)
    hermes = '<tool_call>{"name": "multiply", "arguments": {"a": 6, "b": 7}}</tool_call>'
    assert parse_tool_calls(hermes, tokenizer, raw=hermes + "<end>", prefix=prefix) == []
    (bad,) = parse_tool_calls("", tokenizer, raw='[CALL]{"name": "multiply",, }[/CALL]<end>', prefix=prefix)
    assert bad.error.startswith("the reply could not be parsed: json parser could not parse region as JSON")
    # the tool task's teacher writes Hermes calls, so under this tokenizer its turns are answers
    (episode,) = run(HFEngine(), teacher, tokenizer, rows_of(data, 1), MultiplyEnvironment)
    assert episode.counts["tool_calls"] == 0 and episode.counts["ended_by_environment"] == 1


def times(a: int, b: int) -> int:
    """Multiply.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


class Times(MultiplyEnvironment):
    def reset(self, row):
        return Reset(super().reset(row).messages, tools=[times])


def test_an_unknown_tool_in_an_episode_is_told_to_the_policy(teacher, data) -> None:
    """The environment offers ``times``; the policy calls ``multiply`` and hears the names."""
    (episode,) = run(HFEngine(), teacher, data.tokenizer, rows_of(data, 1), Times)
    tool_turn = next(m for m in episode.messages if m["role"] == "tool")
    assert tool_turn["content"] == "error: unknown tool 'multiply'; the tools are ['times']"


class Wrong(Environment):
    def __init__(self, mistake):
        self.mistake = mistake

    def reset(self, row):
        if self.mistake == "reset_type":
            return {"messages": []}
        if self.mistake == "content_type":
            return [{"role": "user", "content": 123}]
        return Reset([{"role": "user", "content": row["prompt"][0]["content"]}], tools=[multiply])

    def step(self, message):
        if self.mistake == "info_name":
            return Step(reward=1.0, done=True, info={"turns": 2})
        return {"reward": 1.0} if self.mistake == "step_type" else Step(reward="1", done=True)


@pytest.mark.parametrize("mistake, expected", [
    ("reset_type", r"test_environments.Wrong.reset returned dict; expected .*Reset"),
    ("content_type", r"Wrong.reset: message 0 \(user\) has content of type int"),
    ("step_type", r"test_environments.Wrong.step returned dict; expected .*Step"),
    ("reward_type", r"Wrong.step returned reward '1'; a reward is a finite float"),
    ("info_name", r"Wrong.step returned info named \['turns'\], which the episode logs itself"),
])
def test_an_environment_returning_the_wrong_types_is_named(teacher, data, mistake, expected) -> None:
    with pytest.raises(EnvironmentOutputError, match=expected):
        run(HFEngine(), teacher, data.tokenizer, rows_of(data, 1), functools.partial(Wrong, mistake))


def test_an_episode_over_its_token_budget_is_ended_and_counted(teacher, data) -> None:
    """Room for the tool call (15 tokens) but not for the tool's answer after it."""
    episodes = run(HFEngine(), teacher, data.tokenizer, rows_of(data, 4), MultiplyEnvironment,
                   limits=EpisodeLimits(max_turns=3, max_tokens=20, tool_timeout=5.0))
    for episode in episodes:
        assert episode.counts["over_budget"] == 1 and episode.reward == 0.0
        assert len(episode.segments[0].response) <= 20 and all(episode.segments[0].loss_mask)


class ThreeTurns(Environment):
    """Three policy turns: the first two hear "again", each reply's reward is its length."""

    def reset(self, row):
        self.turn = 0
        return Reset(list(row["prompt"]))

    def step(self, message):
        self.turn += 1
        return Step([{"role": "user", "content": "again"}] if self.turn < 3 else [],
                    reward=len(message["content"]) / 10, done=self.turn == 3)


class Recorder(Stage):
    """Keeps the batch as the loss will read it."""

    name = "recorder"

    def reads(self):
        return set()

    def writes(self):
        return set()

    def run(self, trainer, pl_module, batch, batch_idx):
        self.batch = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Gradients(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters()}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_gradient_on_a_three_turn_trajectory_is_autograd_of_the_closed_form(packing: bool, tmp_path: Path) -> None:
    """RL with the token ratio over episodes of three policy turns: the step's gradient is
    autograd of -(1/N) sum over the policy's tokens of A * pi / mu, padded or packed; the
    environment's tokens (the "again" turns) would change it."""
    torch.manual_seed(0)
    data = MultiplyDataModule(num_train=8, num_val=8, batch_size=2, shuffle=False)
    start = checkpoint_path("multiply_start")
    recorder, gradients = Recorder(), Gradients()
    data_source = OnPolicy(sampling=Sampling(num_generations=4, max_new_tokens=6), importance=Importance(ratio="token"),
                           environment=EnvironmentSpec(cls=ThreeTurns, max_turns=3, max_tokens=40))
    module = UnifiedModule(AutoModelForCausalLM.from_pretrained(start), data.tokenizer, data_source,
                           Sparse(advantage="grpo"), stages=[recorder],
                           optimizer=functools.partial(torch.optim.SGD, lr=0.0), samples_every_n_steps=None,
                           packing=packing)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0, callbacks=[gradients])
    trainer.fit(module, datamodule=data)
    batch = recorder.batch
    assert batch[fields.EPISODE] == list(range(8))
    env_tokens = batch[fields.RESPONSE_MASK] - batch[fields.LOSS_MASK]
    assert (env_tokens.sum(-1) > 0).all()  # every row holds the environment's turns
    assert batch[fields.ADVANTAGES].abs().sum() > 0

    def objective(model, mask):
        total, count = 0.0, mask.sum()
        for row in range(batch[fields.PROMPT_IDS].shape[0]):
            prompt = batch[fields.PROMPT_IDS][row][batch[fields.PROMPT_MASK][row].bool()]
            n = int(batch[fields.RESPONSE_MASK][row].sum())
            response = batch[fields.RESPONSE_IDS][row][:n]
            ids = torch.cat([prompt, response])[None]
            logits = model(ids).logits[0, prompt.numel() - 1:ids.shape[1] - 1].double()
            logp = torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]
            ratio = torch.exp(logp - batch[fields.BEHAVIOUR_LOGP][row][:n].double())
            total = total + (mask[row][:n] * batch[fields.ADVANTAGES][row][:n].double() * ratio).sum()
        return -total / count

    def gradient(mask):
        model = AutoModelForCausalLM.from_pretrained(start).double()
        objective(model, mask).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    expected = gradient(batch[fields.LOSS_MASK].double())
    for name, grad in gradients.grads.items():
        torch.testing.assert_close(grad.double(), expected[name], rtol=1e-4, atol=1e-6, msg=name)
    everything = gradient(batch[fields.RESPONSE_MASK].double())
    assert any((everything[n] - expected[n]).abs().max() > 1e-4 for n in expected)


def test_a_users_environment_class_named_on_the_command_line_runs(tmp_path: Path) -> None:
    (tmp_path / "my_env.py").write_text(textwrap.dedent('''
        from lightning_unified.environments import Environment, Reset, Step

        def multiply(a: int, b: int) -> int:
            """Multiply two integers, as a user's own tool.

            Args:
                a: The first.
                b: The second.
            """
            return a * b

        class Counting(Environment):
            def reset(self, row):
                return Reset(row["prompt"], tools=[multiply])

            def step(self, message):
                return Step(reward=float(len(message["content"]) > 3), done=True, info={"words": 1.0})
    '''))
    out = tmp_path / "run"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "task=multiply", "data_source=on_policy",
                           "data_source.environment.cls=my_env.Counting", "model.path=" + checkpoint_path("multiply_start"),
                           "task.num_train=8", "task.num_val=4", "task.batch_size=2",
                           "data_source.sampling.num_generations=2", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
                           "validate_first=false", "save_policy=null", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_metrics(out / "metrics.csv") if r.get("environment/turns")]
    assert len(rows) == 2 and any(float(r["environment/words"]) == 1.0 for r in rows if r.get("environment/words"))
    assert any(float(r["val/reward"]) >= 0 for r in read_metrics(out / "metrics.csv") if r.get("val/reward"))


def test_environment_settings_that_cannot_work_are_named(tmp_path: Path) -> None:
    from lightning_unified.pipeline import check_method
    from lightning_unified.rewards import exact_match
    from lightning_unified.specs import Preference, Reward

    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        EnvironmentSpec(cls="no_such_module.Env")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        EnvironmentSpec(cls="lightning_unified.tasks.multiply.Nope")
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        EnvironmentSpec(cls=MultiplyEnvironment, max_turns=0)
    with_env = OnPolicy(environment=EnvironmentSpec(cls=MultiplyEnvironment))
    with pytest.raises(ValueError, match="gives each episode its reward"):
        check_method(with_env, Sparse(rewards=[Reward(functools.partial(exact_match))]))
    with pytest.raises(ValueError, match="signal=preference"):
        check_method(with_env, Preference(rewards=[Reward(functools.partial(exact_match))]))
    with pytest.raises(ValueError, match="minibatches > 1"):
        OnPolicy(minibatches=2, environment=EnvironmentSpec(cls=MultiplyEnvironment))


def test_the_feedback_environment_asks_again_after_a_wrong_answer() -> None:
    env = FeedbackEnvironment(attempts=3)
    start = env.reset({"prompt": "What is 2+3?", "reference": "5", "index": 0})
    assert start.messages == [{"role": "user", "content": "What is 2+3?"}]
    assert start.info == {"first_attempt": 0.0, "last_attempt": 0.0, "attempts": 0.0}
    wrong = env.step({"role": "assistant", "content": "6"})
    assert not wrong.done and wrong.reward == 0 and wrong.messages[0]["role"] == "user"
    right = env.step({"role": "assistant", "content": "It is 5."})
    assert right.done and right.reward == 1.0
    assert right.info == {"first_attempt": 0.0, "last_attempt": 1.0, "attempts": 2.0}
    single = FeedbackEnvironment(attempts=1)
    single.reset({"prompt": "What is 2+3?", "reference": "5", "index": 0})
    assert single.step({"role": "assistant", "content": "6"}).done


def test_episodes_sampled_a_batch_ahead_train_with_their_lag(tmp_path: Path) -> None:
    """The producer thread runs whole episodes (tools called in its thread) for the next
    batch while this one trains; the second batch is one step stale and says so."""
    data = MultiplyDataModule(num_train=8, num_val=4, batch_size=2, shuffle=False)
    data_source = OnPolicy(sampling=Sampling(num_generations=2, max_lag=1),
                           environment=EnvironmentSpec(cls=MultiplyEnvironment, max_turns=3, max_tokens=64))
    module = UnifiedModule(checkpoint_path("multiply_start"), data.tokenizer, data_source, Sparse(advantage="grpo"),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), samples_every_n_steps=None)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, logger=logger, log_every_n_steps=1)
    trainer.fit(module, datamodule=data)
    rows = [r for r in read_metrics(Path(logger.log_dir) / "metrics.csv") if r.get("sampling/lag")]
    assert [float(r["sampling/lag"]) for r in rows] == [0.0, 1.0]
    assert all(float(r["environment/tool_calls"]) > 0 for r in rows)


def test_ranks_whose_episodes_take_different_turns_do_not_hang(tmp_path: Path) -> None:
    """Under FSDP2 every forward is collective: rank 0's episodes end at their first answer,
    rank 1's are asked again and take more turns, and rank 0 keeps generating (discarded
    rows) until rank 1 is done: the run finishes."""
    (tmp_path / "uneven_env.py").write_text(textwrap.dedent('''
        import os

        from lightning_unified.environments import Environment, Reset, Step
        from lightning_unified.tasks.multiply import multiply

        class Uneven(Environment):
            def __init__(self, log):
                self.log = log

            def reset(self, row):
                # read in order on two ranks: even rows on rank 0, odd rows on rank 1
                self.answers, self.seen, self.index = (1 if row["index"] % 2 == 0 else 2), 0, row["index"]
                return Reset(row["prompt"], tools=[multiply])

            def step(self, message):
                self.seen += 1
                done = self.seen >= self.answers
                with open(self.log, "a") as f:
                    f.write(f"{os.environ.get('LOCAL_RANK', '0')} {self.index} {self.seen} {int(done)}\\n")
                return Step([] if done else [{"role": "user", "content": "123*456"}], reward=float(self.seen),
                            done=done)
    '''))
    out, log = tmp_path / "run", tmp_path / "answers.txt"
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "task=multiply", "data_source=on_policy",
                           "trainer=fsdp2_cpu", "data_source.environment.cls=uneven_env.Uneven",
                           f"+data_source.environment.options.log={log}", "data_source.environment.max_turns=4",
                           "data_source.environment.max_tokens=100",
                           "model.path=" + checkpoint_path("multiply_teacher"), "task.num_train=8", "task.num_val=4",
                           "task.val_batch_size=2", "task.batch_size=2", "task.shuffle=false",
                           "data_source.sampling.num_generations=2", "data_source.sampling.top_k=1",
                           "trainer.max_steps=1", "trainer.log_every_n_steps=1", "validate_first=false",
                           "save_policy=null", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [line.split() for line in log.read_text().splitlines()]
    ended = {rank: {done for r, _, _, done in steps if r == rank} for rank in ("0", "1")}
    # rank 0's episodes ended at their first answer; rank 1's were asked again and went on
    assert ended == {"0": {"1"}, "1": {"0"} | ended["1"]} and "0" in ended["1"], steps


@pytest.mark.parametrize("signal", [dict(divergence="sampled_reverse_kl"), dict(divergence="forward_kl", top_k=4)],
                         ids=["sampled_token", "top_k"])
def test_on_policy_distillation_scores_the_whole_trajectory_and_trains_the_policys_tokens(signal: dict,
                                                                                          tmp_path: Path) -> None:
    """The teacher reads every token of the episode (the tool's answer included) and its
    scores at the policy's tokens are a plain forward's of the whole row; the objective is
    the mean over the policy's tokens alone."""
    from lightning_unified.specs import Dense

    torch.manual_seed(0)
    data = MultiplyDataModule(num_train=8, num_val=4, batch_size=2, shuffle=False)
    recorder = Recorder()
    source = OnPolicy(sampling=Sampling(num_generations=2), importance=Importance(ratio="none"),
                      environment=EnvironmentSpec(cls=MultiplyEnvironment, max_turns=3, max_tokens=64))
    module = UnifiedModule(checkpoint_path("multiply_start"), data.tokenizer, source,
                           Dense(teacher=checkpoint_path("multiply_teacher"), **signal), stages=[recorder],
                           optimizer=functools.partial(torch.optim.SGD, lr=0.0), samples_every_n_steps=None)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    quiet_trainer(max_steps=1, limit_val_batches=0, logger=logger, log_every_n_steps=1).fit(module, datamodule=data)
    batch = recorder.batch
    mask = batch[fields.LOSS_MASK].bool()
    assert (batch[fields.RESPONSE_MASK].bool() & ~mask).any()  # the tool's turns are in the rows
    student = AutoModelForCausalLM.from_pretrained(checkpoint_path("multiply_start")).eval()
    teacher = AutoModelForCausalLM.from_pretrained(checkpoint_path("multiply_teacher")).eval()

    def logp(model):
        ids = torch.cat([batch[fields.PROMPT_IDS], batch[fields.RESPONSE_IDS]], 1)
        attention = torch.cat([batch[fields.PROMPT_MASK], batch[fields.RESPONSE_MASK]], 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention,
                           position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).logits
        return torch.log_softmax(logits[:, batch[fields.PROMPT_IDS].shape[1] - 1:-1].double(), -1)

    teacher_logp, student_logp = logp(teacher), logp(student)
    targets = batch[fields.RESPONSE_IDS][..., None]
    if signal["divergence"] == "sampled_reverse_kl":
        scored = batch[fields.TEACHER_TOKEN_LOGP]
        torch.testing.assert_close(scored[mask].double(), teacher_logp.gather(-1, targets)[..., 0][mask], atol=1e-4,
                                   rtol=0)
        expected = (student_logp.gather(-1, targets) - teacher_logp.gather(-1, targets))[..., 0][mask].mean()
        everything = (student_logp.gather(-1, targets) - teacher_logp.gather(-1, targets))[..., 0][
            batch[fields.RESPONSE_MASK].bool()].mean()
    else:
        torch.testing.assert_close(batch[fields.TEACHER_TOPK_LOGP][mask].double(),
                                   teacher_logp.topk(4, -1).values[mask], atol=1e-4, rtol=0)
        expected = everything = None
    logged = next(float(r["train/objective"]) for r in read_metrics(Path(logger.log_dir) / "metrics.csv")
                  if r.get("train/objective"))
    if expected is not None:
        assert logged == pytest.approx(expected.item(), rel=1e-3, abs=1e-5)
        assert abs(everything.item() - expected.item()) > 1e-3  # the tool's tokens would change it
    else:
        assert logged > 0  # a forward KL from the teacher's top-k


def test_a_mixed_source_trains_on_demonstrations_and_on_episodes(tmp_path: Path) -> None:
    """GKD's mixture on the tool task: some batches are the written conversations (the tool's
    turns out of the loss), the others the policy's episodes, each distilled from the teacher."""
    from lightning_unified.specs import Dense

    data = MultiplyDataModule(num_train=16, num_val=4, batch_size=2, shuffle=False)
    source = OnPolicy(sampling=Sampling(num_generations=2), probability=0.5, seed=3,
                      environment=EnvironmentSpec(cls=MultiplyEnvironment, max_turns=3, max_tokens=64))
    module = UnifiedModule(checkpoint_path("multiply_start"), data.tokenizer, source,
                           Dense(teacher=checkpoint_path("multiply_teacher"), divergence="jsd"),
                           optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), samples_every_n_steps=None)
    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    quiet_trainer(max_steps=4, limit_val_batches=0, logger=logger, log_every_n_steps=1).fit(module, datamodule=data)
    rows = [r for r in read_metrics(Path(logger.log_dir) / "metrics.csv") if r.get("sampling/on_policy")]
    kinds = {float(r["sampling/on_policy"]) for r in rows}
    assert kinds == {0.0, 1.0}, rows
    assert all(bool(r.get("environment/turns")) == (float(r["sampling/on_policy"]) == 1.0) for r in rows)
    assert all(float(r["train/objective"]) > 0 for r in rows if r.get("train/objective"))


def test_a_tool_whose_schema_cannot_be_written_is_named() -> None:
    from lightning_unified.environments.tools import ToolSchemaError, tool_schemas

    def undocumented(a: int) -> int:
        return a

    def duplicate(a: int, b: int) -> int:
        """Multiply, again.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return a * b

    duplicate.__name__ = "multiply"
    with pytest.raises(ToolSchemaError, match="tool 'undocumented'.*docstring with an Args: section"):
        tool_schemas([undocumented])
    with pytest.raises(ToolSchemaError, match="two tools are named 'multiply'"):
        tool_schemas([multiply, duplicate])
    (schema,) = tool_schemas([multiply])
    assert schema["function"]["name"] == "multiply" and set(schema["function"]["parameters"]["properties"]) == {"a", "b"}
