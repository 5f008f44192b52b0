"""A failing row is data, not a crash: a real environment whose ``reset`` and ``step`` raise
on some prompts, a real reward function that raises on some replies, and a real teacher with
its own tokenizer that cannot encode some replies. Each run finishes; the counts it logs are
the failures counted independently; and its gradient is that of the same run with those
rows removed before the loss. Past ``module.max_failure_fraction`` the run stops, naming
the cause, on every rank alike."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_unified import batch as fields
from lightning_unified.data.alignment import AlignmentError
from lightning_unified.failures import FailedRows, TooManyFailedRows
from lightning_unified.losses import advantages as adv
from lightning_unified.models.loading import build_policy
from lightning_unified.module import UnifiedModule
from lightning_unified.registry import ADVANTAGES, register_advantage
from lightning_unified.specs import Dense, Environment as EnvironmentSpec, OnPolicy, Reward, Sampling, Sparse
from lightning_unified.stages import Stage
from lightning_unified.stages.advantages import AdvantagesStage, estimate_advantages
from lightning_unified.tasks.addition import addition_tokenizer, checkpoint_path, digit_match
from lightning_unified.tasks.multiply import MultiplyDataModule, MultiplyEnvironment
from lightning_unified.teachers.tokenizers import TokenizerBridge
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule
from tests.test_runs import read_metrics


class Recorder(Stage):
    """Keeps every batch as the loss will read it (placed last)."""

    name = "recorder"

    def __init__(self):
        super().__init__()
        self.batches = []

    def run(self, trainer, host, batch, batch_idx):
        self.batches.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})


class DropFailed(Stage):
    """The batch without its failed rows, just before the loss: the run they are checked against."""

    name = "drop_failed"

    def run(self, trainer, host, batch, batch_idx):
        failed = batch.pop(fields.FAILED)
        keep = (~failed).nonzero().squeeze(-1)
        n = failed.shape[0]
        for name, value in list(batch.items()):
            if name in fields.BATCH_WIDE_FIELDS:
                continue
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                batch[name] = value[keep]
            elif isinstance(value, list) and len(value) == n:
                batch[name] = [value[i] for i in keep.tolist()]
        batch[fields.GROUP_SIZE] = 1  # the advantages are taken; the rows left no longer make whole groups


class FirstGradient(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()}


def fit(make_module, steps: int, tmp_path: Path, drop: bool, data):
    """``steps`` steps of ``make_module(stages)``: the recorded batches, the first step's
    gradient and the logged metrics."""
    L.seed_everything(0)
    recorder = Recorder()
    module = make_module([recorder, *([DropFailed()] if drop else [])])
    gradient = FirstGradient()
    logger = L.pytorch.loggers.CSVLogger(tmp_path / ("dropped" if drop else "failed"))
    quiet_trainer(max_steps=steps, limit_val_batches=0, logger=logger, log_every_n_steps=1,
                  callbacks=[gradient]).fit(module, datamodule=data)
    return recorder.batches, gradient.grads, read_metrics(Path(logger.log_dir) / "metrics.csv")


def logged(rows: list[dict], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def assert_same_gradient(got: dict, expected: dict) -> None:
    assert max(g.abs().max() for g in expected.values()) > 1e-4, "the step has a gradient"
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# --- rewards --------------------------------------------------------------------------------------


def digits_without_sevens(completions, references, **_):
    """digit_match, from a grader that cannot read a 7 (it raises on any batch holding one)."""
    if any("7" in c for c in completions):
        raise ValueError("the grader cannot read a 7")
    return digit_match(completions, references)


def reward_run(stages, **module_options):
    data = tiny_datamodule(batch_size=4)
    return UnifiedModule(build_policy(data.tokenizer, config=TINY, seed=0), data.tokenizer,
                         OnPolicy(sampling=Sampling(num_generations=4, max_new_tokens=4)),
                         Sparse(rewards=[Reward(digits_without_sevens)], advantage="grpo"), stages=stages,
                         max_new_tokens=4, optimizer=functools.partial(torch.optim.SGD, lr=0.0),
                         samples_every_n_steps=None, **module_options)


def test_a_reward_that_raises_on_some_rows_leaves_them_out_and_counts_them(tmp_path: Path) -> None:
    data = tiny_datamodule(batch_size=4)
    batches, grads, metrics = fit(reward_run, 3, tmp_path, drop=False, data=data)
    sevens = [sum("7" in c for c in b[fields.COMPLETIONS]) for b in batches]
    assert 0 < sevens[0] < 16, f"the test needs some replies with a 7 and some without: {sevens}"
    assert logged(metrics, "rewards/failures") == sevens
    for batch in batches:
        failed = torch.tensor(["7" in c for c in batch[fields.COMPLETIONS]])
        assert torch.equal(batch[fields.FAILED], failed)
        assert not fields.loss_mask(batch)[failed].any() and not batch[fields.ADVANTAGES][failed].any()
        # each group's advantages are GRPO's over its rows without a 7
        rewards = batch[fields.REWARDS]
        for group in range(4):
            rows = [r for r in range(group * 4, group * 4 + 4) if not failed[r]]
            if len(rows) >= 2:
                torch.testing.assert_close(batch[fields.ADVANTAGES][rows, 0],
                                           adv.grpo_advantages(rewards[rows], group_size=len(rows)))
    _, dropped, _ = fit(reward_run, 1, tmp_path, drop=True, data=data)
    assert_same_gradient(grads, dropped)


def test_past_max_failure_fraction_the_run_stops_naming_the_cause(tmp_path: Path) -> None:
    data = tiny_datamodule(batch_size=4)
    module = reward_run([], max_failure_fraction=0.05, failure_window=20)
    with pytest.raises(TooManyFailedRows, match=r"of the last \d+ rewards rows failed \(rewards/failures; \d+ since "
                                                r"the start\), more than module.max_failure_fraction=0.05 of "
                                                r"module.failure_window=20 rows: .*reward function.*The first "
                                                r"failure: reward digits_without_sevens on row \d+: ValueError: the grader cannot read a 7"):
        quiet_trainer(max_steps=3, limit_val_batches=0).fit(module, datamodule=data)


def test_failures_in_steps_larger_than_the_window_are_seen() -> None:
    """Many ranks make a step of more rows than the window: half of 4,096 rows failing every
    step stops the run at the first step (the window used to keep the step's last 1,000 rows,
    all of them successes, and never stopped); a tenth spread over steps of 300 rows does not."""
    from lightning_unified.failures import FailedRows, RowFailure

    def failing(count: int) -> list:
        return [RowFailure(row, "reward on a row", "") for row in range(count)]

    with pytest.raises(TooManyFailedRows, match=r"2048 of the last 4096 rewards rows failed"):
        FailedRows(max_fraction=0.1, window=1000).record("rewards", 4096, failing(2048))
    steady = FailedRows(max_fraction=0.1, window=1000)
    for _ in range(20):
        steady.record("rewards", 300, failing(27))  # 9%: flaky, never past 10% of a window's rows
    assert sum(rows for rows, _ in steady.recent["rewards"]) >= 1000
    with pytest.raises(TooManyFailedRows):
        for _ in range(20):
            steady.record("rewards", 300, failing(45))  # 15%: broken


def test_every_rank_takes_the_same_decision(tmp_path: Path) -> None:
    """Two processes: every failure is on rank 0, yet both stop at the same step (the counts
    are summed over ranks before the window is judged)."""
    results = tmp_path / "results"
    results.mkdir()
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"), str(results)), nprocs=2, join=True)
    outcomes = {p.name: p.read_text() for p in results.iterdir()}
    assert outcomes == {"0": "stopped at step 1: 8 of the last 32", "1": "stopped at step 1: 8 of the last 32"}


def _two_ranks(rank: int, store: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    failures = FailedRows(max_fraction=0.15, window=40)  # stops past 6 of the last 40
    try:
        for step in range(3):
            failed = [(row, f"row {row} failed") for row in range(4)] if rank == 0 else []
            failures.record("rewards", 8, failed)
        outcome = "never stopped"
    except TooManyFailedRows as error:
        outcome = f"stopped at step {step}: {str(error).split(' rewards rows')[0]}"
    Path(results, str(rank)).write_text(outcome)
    torch.distributed.destroy_process_group()


# --- environments -------------------------------------------------------------------------------

class FlakyEnvironment(MultiplyEnvironment):
    """The tool task's environment behind a service that fails: ``reset`` on products with
    a 7 in their factors, ``step`` on answers holding a 9. ``log``: a file each failure is
    written to, counted by the test on its own."""

    def __init__(self, log: str):
        super().__init__()
        self.log = log

    def reset(self, row):
        if "7" in row["prompt"][0]["content"]:
            self._note("reset")
            raise ConnectionError("the environment's service is down")
        return super().reset(row)

    def step(self, message):
        if "9" in message["content"]:
            self._note("step")
            raise TimeoutError("the grader timed out")
        return super().step(message)

    def _note(self, method: str) -> None:
        with open(self.log, "a") as f:
            f.write(method + "\n")


def test_an_environment_that_raises_fails_its_episodes_and_the_run_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "raised.txt"
    data = MultiplyDataModule(num_train=8, num_val=4, batch_size=4, shuffle=False)

    def episodes_run(stages):
        source = OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=24),
                          environment=EnvironmentSpec(cls=FlakyEnvironment, options={"log": str(log)}, max_turns=3,
                                                      max_tokens=64))
        return UnifiedModule(checkpoint_path("multiply_start"), data.tokenizer, source, Sparse(advantage="rloo"),
                             stages=stages, optimizer=functools.partial(torch.optim.SGD, lr=0.0),
                             samples_every_n_steps=None)

    batches, grads, metrics = fit(episodes_run, 2, tmp_path, drop=False, data=data)
    raised = log.read_text().splitlines()
    assert "reset" in raised and "step" in raised, f"the test needs both kinds of failure: {raised}"
    failed_episodes = [len({e for e, f in zip(b[fields.EPISODE], b[fields.FAILED].tolist()) if f}) for b in batches]
    assert sum(logged(metrics, "environment/failures")) == len(raised) == sum(failed_episodes)
    for batch in batches:
        failed = batch[fields.FAILED]
        # an episode fails as a whole: no reward, no advantage, nothing in the loss
        assert not fields.loss_mask(batch)[failed].any() and not batch[fields.ADVANTAGES][failed].any()
        assert not batch[fields.ENVIRONMENT_REWARDS][failed].any()
    log.unlink()
    _, dropped, _ = fit(episodes_run, 1, tmp_path, drop=True, data=data)
    assert_same_gradient(grads, dropped)


# --- a teacher with its own tokenizer -----------------------------------------------------------

def pairs_without_sevens():
    """A real fast tokenizer that reads digits two at a time and has no 7 at all: a reply
    with a 7 (or anything but digits, + and =) cannot be encoded."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    digits = [str(d) for d in range(10) if d != 7]
    words = [a + b for a in digits for b in digits] + digits + ["+", "="]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d\d|."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


@pytest.fixture(scope="module")
def sevenless_teacher(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("sevenless_teacher")
    tokenizer = pairs_without_sevens()
    build_policy(tokenizer, config=TINY, seed=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_replies_the_teacher_cannot_encode_are_left_out_and_counted(sevenless_teacher, tmp_path: Path) -> None:
    data = tiny_datamodule(batch_size=4)
    student = addition_tokenizer()
    encodable = set("012345689+=")  # what the teacher can read

    def distill_run(stages):
        return UnifiedModule(build_policy(data.tokenizer, config=TINY, seed=0), data.tokenizer,
                             OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=4)),
                             Dense(teacher=sevenless_teacher, divergence="sampled_reverse_kl", teacher_tokenizer="auto"),
                             stages=stages, max_new_tokens=4, optimizer=functools.partial(torch.optim.SGD, lr=0.0),
                             samples_every_n_steps=None)

    batches, grads, metrics = fit(distill_run, 2, tmp_path, drop=False, data=data)
    counts = []
    for batch in batches:
        texts = [student.decode([t for t in ids[mask.bool()].tolist() if t != student.eos_token_id])
                 for ids, mask in zip(batch[fields.RESPONSE_IDS], batch[fields.RESPONSE_MASK])]
        # the teacher reads its own special tokens' text as those tokens, and the rest character by character
        readable = [functools.reduce(lambda t, special: t.replace(special, ""), ("<pad>", "<eos>", "<unk>"), text)
                    for text in texts]
        failed = torch.tensor([not set(text) <= encodable for text in readable])
        assert torch.equal(batch[fields.FAILED], failed), texts
        assert not fields.loss_mask(batch)[failed].any() and (batch[fields.SPAN_ID][failed] == -1).all()
        counts.append(int(failed.sum()))
    assert 0 < counts[0] < 8, f"the test needs some replies the teacher cannot encode and some it can: {counts}"
    assert logged(metrics, "teacher/unencodable") == counts
    _, dropped, _ = fit(distill_run, 1, tmp_path, drop=True, data=data)
    assert_same_gradient(grads, dropped)


def test_the_datas_own_response_the_teacher_cannot_encode_is_a_data_error() -> None:
    """Off-policy data is not a flaky row: it is refused, naming the example."""
    student, teacher = addition_tokenizer(), pairs_without_sevens()
    reply = student("17", add_special_tokens=False).input_ids + [student.eos_token_id]
    batch = {fields.PROMPT_IDS: torch.zeros(2, 1, dtype=torch.long), fields.PROMPT_MASK: torch.ones(2, 1, dtype=torch.long),
             fields.RESPONSE_IDS: torch.tensor([reply, student("12", add_special_tokens=False).input_ids + [1]]),
             fields.RESPONSE_MASK: torch.ones(2, 3, dtype=torch.long), fields.PROMPTS: ["07+10=", "03+09="],
             fields.EXAMPLE_INDEX: torch.tensor([41, 42])}
    with pytest.raises(AlignmentError, match=r"row 0 \(the data's example 41\): the teacher's tokenizer .* cannot "
                                             r"encode .*'7'\]\); set signal.unencodable_logp"):
        TokenizerBridge(student, teacher).rows(batch, "cpu")
    batch[fields.SAMPLED] = True  # the same reply, sampled: a failed row, the other scored
    rows = TokenizerBridge(student, teacher).rows(batch, "cpu")
    assert [f.row for f in rows.failed] == [0] and rows.alignments[0].spans == [] and rows.alignments[1].spans


# --- advantages over the rows that did not fail ---------------------------------------------------

@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo", "grpo_batch_std", "reinforce"])
def test_a_group_with_failed_rows_gets_the_advantages_of_the_group_without_them(estimator: str) -> None:
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=gen)
    failed = torch.zeros(12, dtype=torch.bool)
    failed[[1, 4, 5, 9, 10, 11]] = True  # groups of 4: one failed row, two, three (one row left)
    rewards[failed] = 0.0  # what a failed row holds
    got = estimate_advantages(rewards, estimator, 4, eps=1e-6, valid=~failed)
    assert not got[failed].any()
    valid = rewards[~failed]
    for group in range(3):
        rows = [r for r in range(group * 4, group * 4 + 4) if not failed[r]]
        kept = rewards[rows]
        if estimator == "reinforce":
            want = kept - valid.mean()
        elif estimator == "grpo_batch_std":
            want = (kept - kept.mean()) / (valid.std() + 1e-6)
        elif len(rows) == 1:
            want = torch.zeros(1)  # a row with no other to compare with carries no signal
        elif estimator == "dr_grpo":
            want = adv.dr_grpo_advantages(kept, group_size=len(rows))
        else:
            want = estimate_advantages(kept, estimator, len(rows), eps=1e-6)
        torch.testing.assert_close(got[rows], want, msg=f"group {group}")


def test_an_estimator_that_cannot_leave_a_row_out_leaves_its_whole_group_out() -> None:
    def centred(rewards, *, group_size, eps):
        return (rewards.reshape(-1, group_size) - rewards.reshape(-1, group_size).mean(-1, keepdim=True)).reshape(-1)

    register_advantage("centred_without_valid")(centred)
    try:
        assert not ADVANTAGES["centred_without_valid"].takes_valid
        mask = torch.ones(6, 2, dtype=torch.long)
        batch = {fields.REWARDS: torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0]), fields.GROUP_SIZE: 2,
                 fields.FAILED: torch.tensor([False, False, True, False, False, False]), fields.RESPONSE_MASK: mask,
                 fields.LOSS_MASK: mask, fields.SAMPLED: True, fields.BEHAVIOUR_LOGP: torch.zeros(6, 2)}
        AdvantagesStage(Sparse(advantage="centred_without_valid")).run(None, None, batch, 0)
        assert batch[fields.FAILED].tolist() == [False, False, True, True, False, False]
        assert batch[fields.ADVANTAGES][:, 0].tolist() == [0.5, -0.5, 0.0, 0.0, 0.25, -0.25]
    finally:
        ADVANTAGES.remove("centred_without_valid")
