"""The ``hf`` rollout engine samples from the run's settings alone, whatever the checkpoint's
``generation_config`` says."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import lightning as L
import torch

from lightning_unified import batch as fields
from lightning_unified.models.loading import build_policy
from lightning_unified.models.loss_head import response_logprobs
from lightning_unified.module import UnifiedModule
from lightning_unified.specs import OnPolicy, Reward, Sampling, Sparse
from lightning_unified.tasks.addition import digit_match
from lightning_unified.validation import greedy_answers
from tests.lightning_helpers import TINY, quiet_trainer, tiny_datamodule
from tests.test_async_rollouts import RecordRows

# what a checkpoint's generation_config may say that changes the distribution generate
# draws from: penalties and bans applied to the scores even when greedy, warpers, and
# settings with no neutral value but unset (suppress_tokens), which generate fills from
# the model's own config whatever config it is given
CHECKPOINT_GENERATION = dict(repetition_penalty=1.5, no_repeat_ngram_size=1, do_sample=True, temperature=0.5,
                             top_k=3)


def checkpoint_with_generation_config(directory: Path) -> str:
    """A tiny Llama saved with save_pretrained, its generation_config saying
    :data:`CHECKPOINT_GENERATION` and suppressing one digit."""
    data = tiny_datamodule()
    model = build_policy(data.tokenizer, config=TINY, seed=0)
    model.generation_config.update(**CHECKPOINT_GENERATION,
                                   suppress_tokens=[data.tokenizer.convert_tokens_to_ids("7")])
    model.save_pretrained(directory)
    data.tokenizer.save_pretrained(directory)
    return str(directory)


def module_from(path: str, source: OnPolicy, stages=()) -> UnifiedModule:
    return UnifiedModule(path, tiny_datamodule().tokenizer, source, Sparse(rewards=[Reward(digit_match)]),
                         stages=list(stages), max_new_tokens=8)


def test_behaviour_logp_are_the_trainers_whatever_the_checkpoint_says(tmp_path: Path, caplog) -> None:
    """At lag 0 the engine generates with the training model, loaded with its checkpoint's
    generation_config: the log-probs it records are still those a full forward of the same
    weights gives the sampled tokens at the run's temperature (to 1e-5 in float32), and the
    run says once which checkpoint settings it ignored."""
    path = checkpoint_with_generation_config(tmp_path / "model")
    record = RecordRows()
    source = OnPolicy(sampling=Sampling(num_generations=4, max_new_tokens=8, temperature=0.8))
    module = module_from(path, source, [record])
    assert module.policy.generation_config.repetition_penalty == 1.5, "the checkpoint's config is loaded"
    start = copy.deepcopy(module.policy)
    L.seed_everything(0, verbose=False)
    with caplog.at_level(logging.WARNING, logger="lightning_unified.engines.plain_generation"):
        quiet_trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=tiny_datamodule())
    rows = record.batches[0]
    mask = rows[fields.RESPONSE_MASK].bool()
    expected = response_logprobs(start, rows[fields.PROMPT_IDS], rows[fields.PROMPT_MASK], rows[fields.RESPONSE_IDS],
                                 rows[fields.RESPONSE_MASK], temperature=0.8)
    torch.testing.assert_close(rows[fields.BEHAVIOUR_LOGP][mask], expected[mask], rtol=0, atol=1e-5)
    said = [r.getMessage() for r in caplog.records if "generation_config" in r.getMessage()]
    assert len(said) == 1, said  # two batches sampled, one line
    for setting in ("repetition_penalty=1.5", "no_repeat_ngram_size=1", "suppress_tokens=", "top_k=3",
                    "temperature=0.5", "data_source.sampling"):
        assert setting in said[0]


def plain_argmax(policy, prompt_ids, prompt_mask, max_new_tokens: int, stops: list[int]) -> list[list[int]]:
    """Each row's greedy answer by full forwards of the unpadded prompt, one token at a time."""
    answers = []
    with torch.no_grad():
        for ids, mask in zip(prompt_ids, prompt_mask):
            sequence, answer = ids[mask.bool()].tolist(), []
            for _ in range(max_new_tokens):
                token = int(policy(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
                sequence.append(token)
                answer.append(token)
                if token in stops:
                    break
            answers.append(answer)
    return answers


def test_greedy_validation_is_the_plain_models_argmax(tmp_path: Path) -> None:
    """Validation's greedy answers are the argmax of the model's own distribution at every
    step, not of the scores after the checkpoint's repetition penalty and bans."""
    module = module_from(checkpoint_with_generation_config(tmp_path / "model"),
                         OnPolicy(sampling=Sampling(num_generations=2, max_new_tokens=8)))
    batch = next(iter(tiny_datamodule(batch_size=8).val_dataloader()))
    ids, mask = batch[fields.PROMPT_IDS], batch[fields.PROMPT_MASK]
    answers = greedy_answers(module, ids, mask)
    module.policy.eval()
    expected = plain_argmax(module.policy, ids, mask, 8, module.stop_token_ids)
    assert answers == module.tokenizer.batch_decode(expected, skip_special_tokens=True)
