"""Every batch field, its shape and who adds it: the one place that documents the batch.

A batch is a plain dict. The DataLoader yields the prompt (and, for off-policy data, the
response); the module's stages (:mod:`lightning_unified.stages`) add the rest before
``training_step``, which reads what is present. B is rows (prompts x generations once sampled), P prompt tokens (left-padded),
R response tokens (right-padded, ending in EOS), H_t the teacher's width, K the top-k.

A row is a trajectory: its prompt, then its response, which may hold several assistant
turns with user turns or tool output between them. Two masks say what is what:
``response_mask`` marks the response's real tokens (what every forward attends to, a
contiguous run from position 0), ``loss_mask`` the ones the loss trains on (the
assistant's). A single-turn response is one assistant span: its two masks are equal.
What reads which: every forward (the policy's, a teacher's, the reference's, a ratio's, a
margin's), packing's layout, a served teacher's rows, the offline cache's rows and the
decoded completions read ``response_mask``; the loss's token scale and normaliser, the
step's token counts, advantages on tokens, importance ratios and their diagnostics, the
KL-to-reference metric and a preference pair's summed log-probs read ``loss_mask``, through
:func:`loss_mask`, which is 0 on a row marked ``failed``.
"""

# --- from the DataLoader -------------------------------------------------------------
PROMPT_IDS = "prompt_ids"  # [B, P] long, left-padded
PROMPT_MASK = "prompt_mask"  # [B, P] long, 1 on real prompt tokens
RESPONSE_IDS = "response_ids"  # [B, R] long, right-padded; off-policy data, or sampled
RESPONSE_MASK = "response_mask"  # [B, R] long, 1 on the response's real tokens (EOS included): attended, contiguous
LOSS_MASK = "loss_mask"  # [B, R] long, 1 on the response tokens in the loss (assistant turns), within response_mask
REFERENCES = "references"  # list[str | None] of length B: the reference answer, for rewards
PROMPTS = "prompts"  # list[str | list[dict]] of length B: each prompt as the data gave it (text or chat messages)
TEACHER_PROMPTS = "teacher_prompts"  # list[str | None] of length B: the data's teacher_prompt column, for signal.teacher_context
TEACHER_NAMES = "teacher_names"  # list[str] of length B: the teacher each row's data names (signal.teachers)
EXAMPLE_INDEX = "example_index"  # [B] long: each row's index in the data module's training examples (a teacher cache's key)
PREFERENCE = "preference"  # [B] float: +1 on a chosen response, -1 on a rejected one, 0 on others (preference pairs)
PAIR_MARGIN = "pair_margin"  # [B] float: the data's margin column, the reward gap its pair must reach (on both rows)

# --- sample stage (on-policy batches) ----------------------------------------------
BEHAVIOUR_LOGP = "behaviour_logp"  # [B, R] float, log mu(y_t) of the distribution sampled from, on the loss tokens
GROUP_SIZE = "group_size"  # int, consecutive rows that share one prompt (2 for preference pairs from data)
POLICY_VERSION = "policy_version"  # list[int] of length B: the optimizer step whose weights sampled each row (its first token)
TOKEN_VERSION = "token_version"  # [B, R] long: the step whose weights sampled each response token (servers updated in flight)
SAMPLED = "sampled"  # bool: the sampler wrote this batch's responses (a mixed source keeps the data's in some batches)
# multi-turn episodes (data_source.environment): rows of one episode are consecutive, G episodes per prompt
EPISODE = "episode"  # list[int] of length B: each row's episode (several rows when a template rewrote history)
ENVIRONMENT_REWARDS = "environment_rewards"  # [B] float, the row's episode's reward (the sum of its steps' rewards)

# --- any stage where a row can fail (sample's episodes, rewards, teacher and reference across tokenizers)
FAILED = "failed"  # [B] bool: the row failed (its environment raised, a reward function or a teacher could not handle it): no gradient, counted (lightning_unified/failures.py)

# --- teacher stage (dense signal) ---------------------------------------------------
TEACHER = "teacher"  # TeacherLogits: hidden [B, R, H_t] + the teacher's head, never [B, R, V]; RoutedTeacherLogits with several
TEACHER_INDEX = "teacher_index"  # [B] long, each row's teacher as its position in signal.teachers (several teachers)
TEACHER_TOPK_IDS = "teacher_topk_ids"  # [B, R, K] long, the teacher's top-k tokens
TEACHER_TOPK_LOGP = "teacher_topk_logp"  # [B, R, K] float, their log-probs
TEACHER_TOKEN_LOGP = "teacher_token_logp"  # [B, R] float, log pi_T(y_t) of the batch's tokens
# a teacher with another tokenizer (signal.teacher_tokenizer=auto, teachers/tokenizers.py): S spans per row,
# each a run of student tokens and a run of the teacher's covering the same characters
SPAN_ID = "span_id"  # [B, R] long, each student token's span in its row, -1 outside every span
SPAN_END = "span_end"  # [B, R] float, 1 on each span's last student token
TEACHER_SPAN_LOGP = "teacher_span_logp"  # [B, S] float, the teacher's log-prob of each span (the sum over its tokens)
TEACHER_SPAN_TOPK_IDS = "teacher_span_topk_ids"  # [B, R, K] long, on span ends: the teacher's top-k after the span's prefix, as student ids (-1: no twin)
TEACHER_SPAN_TOPK_LOGP = "teacher_span_topk_logp"  # [B, R, K] float, their log-probs plus the prefix's (-1e4: no entry)
VOCABULARY_MATCH = "vocabulary_match"  # VocabularyMatch: the tokens both vocabularies share (signal.divergence=uld_hybrid)
# refreshed before every update, from the policy as it is then (TeacherStage.on_update)
SPAN_LOG_RATIO = "span_log_ratio"  # [B, R] float, on each token its span's log pi_T(span) - log pi_theta(span)
SPAN_SHARE = "span_share"  # [B, R] float, 1 / its span's student tokens
SPAN_PREFIX_LOGP = "span_prefix_logp"  # [B, R] float, on span ends: log pi_theta of the span's earlier tokens
SPAN_PREFIX_GRAD = "span_prefix_grad"  # [B, R] float, on a span's earlier tokens: d(span's objective) / d(log-prob of its prefix)

# --- reference stage (a KL penalty to a frozen reference) -----------------------------
REFERENCE_LOGP = "reference_logp"  # [B, R] float, log pi_ref(y_t) of the batch's tokens (0 on padding); with
# reference.tokenizer=auto, each span's log-prob on its last token (0 elsewhere): the sums over a reply are exact
REFERENCE_SPAN_ID = "reference_span_id"  # [B, R] long, reference.tokenizer=auto: each token's span (-1 outside)

# --- rewards and advantages stages (sparse signal) ---------------------------------
REWARDS = "rewards"  # [B] float, the weighted sum of the reward functions (or the data's reward column)
COMPLETIONS = "completions"  # list[str] of length B, the decoded responses the rewards scored
ADVANTAGES = "advantages"  # [B, R] float, the estimator's advantage on every response token

# --- preference stage (preference signal), refreshed before every update ---------------
PREFERENCE_WEIGHT = "preference_weight"  # [B, R] float, the pair's sequence-level weight on each response token
PREFERENCE_LOSS = "preference_loss"  # [B, R] float, the pair's loss shared over its tokens (sums to the pair's loss)

# --- importance stage ------------------------------------------------------------------
LOG_RATIO = "log_ratio"  # [B, R] float, a precomputed sequence-level log pi_theta / mu (GSPO, importance.level=sequence)
PROXIMAL_LOGP = "proximal_logp"  # [B, R] float, log pi_prox(y_t): the trainer's policy at the batch's start (decoupled PPO), on the loss tokens

# The fields a weight builder may take from the batch, each [B, R, ...] like the response.
PER_TOKEN_FIELDS = (
    BEHAVIOUR_LOGP,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGP,
    TEACHER_TOKEN_LOGP,
    SPAN_END,
    TEACHER_SPAN_TOPK_IDS,
    TEACHER_SPAN_TOPK_LOGP,
    SPAN_LOG_RATIO,
    SPAN_SHARE,
    SPAN_PREFIX_LOGP,
    SPAN_PREFIX_GRAD,
    ADVANTAGES,
    LOG_RATIO,
    PROXIMAL_LOGP,
    REFERENCE_LOGP,
    PREFERENCE_WEIGHT,
    PREFERENCE_LOSS,
)

# Fields that hold one value for the whole batch rather than one per row.
BATCH_WIDE_FIELDS = (GROUP_SIZE, SAMPLED, VOCABULARY_MATCH)


def require(batch: dict, *names: str, who: str) -> None:
    """A clear error when a field a step depends on is missing (a stage not configured,
    or a DataLoader that yields something else)."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(
            f"{who} needs batch field(s) {missing}, but the batch only has {sorted(batch)}; "
            f"see lightning_unified/batch.py for who adds each field"
        )


def loss_mask(batch: dict):
    """[B, R] the tokens the loss trains on. The collator and the sampler always add
    ``loss_mask``; a batch built by hand without one is single-turn, where every response
    token is in the loss. A row marked ``failed`` has none: no weight reaches it and no
    normaliser counts its tokens (the one place that keeps failed rows out of the step)."""
    mask = batch.get(LOSS_MASK)
    mask = batch[RESPONSE_MASK] if mask is None else mask
    failed = batch.get(FAILED)
    return mask if failed is None else mask.masked_fill(failed[:, None], 0)


def is_sampled(batch: dict) -> bool:
    """Whether the sampler wrote this batch's responses (``sampled``, which the sample stage
    always sets); a batch built by hand without it is sampled when it has behaviour log-probs."""
    sampled = batch.get(SAMPLED)
    return BEHAVIOUR_LOGP in batch if sampled is None else bool(sampled)


def require_each(batch: dict, needs) -> None:
    """Each ``(field, who)`` of ``needs`` is in the batch: :func:`require` for a list of
    fields that different settings need."""
    for name, who in needs:
        require(batch, name, who=who)


def per_token_fields(batch: dict) -> dict:
    """The per-token fields a weight builder may take; the loss hands each builder those its
    signature names (see :class:`lightning_unified.losses.weight_sum.WeightSum`)."""
    return {name: batch[name] for name in PER_TOKEN_FIELDS if name in batch}
