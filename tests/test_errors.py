"""Bad input gets an error that names the argument or field."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lightning_unified.losses import weight_builders
from lightning_unified.losses.aggregation import token_scale
from lightning_unified.losses.objective import TeacherLogits, chunked_weighted_nll
from lightning_unified.losses.token_weights import TokenWeights
from lightning_unified.losses.weight_sum import WeightSum
from tests.conftest import make_problem


def _run(p, weight_fn=weight_builders.indicator, **kw):
    kw.setdefault("targets", p.targets)
    kw.setdefault("scale", token_scale(p.mask, "token_mean"))
    return chunked_weighted_nll(p.hidden, p.head, kw.pop("targets"), kw.pop("scale"), weight_fn, **kw)


def test_target_out_of_vocabulary_is_named() -> None:
    p = make_problem()
    targets = p.targets.clone()
    targets[0, 0] = p.vocab + 3
    with pytest.raises(ValueError, match=f"token id {p.vocab + 3}"):
        _run(p, targets=targets)


def test_ignore_index_inside_the_loss_is_refused() -> None:
    p = make_problem()
    with pytest.raises(ValueError, match="nonzero token_scale"):
        _run(p, scale=torch.ones_like(p.mask))  # padding (-100) is not masked out


def test_shape_mismatches_are_named() -> None:
    p = make_problem()
    with pytest.raises(ValueError, match=r"fields\['advantages'\]"):
        _run(p, weight_builders.advantage_indicator, fields={"advantages": p.advantages[:, :2]})
    with pytest.raises(ValueError, match="head_weight must be"):
        chunked_weighted_nll(p.hidden, p.head.T, p.targets, p.mask, weight_builders.indicator)
    with pytest.raises(ValueError, match="teacher hidden"):
        _run(p, weight_builders.forward_kl, teacher=TeacherLogits(hidden=p.teacher_hidden[:2], head_weight=p.teacher_head))


def test_settings_are_checked() -> None:
    p = make_problem()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        _run(p, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        _run(p, chunk_size=0)
    with pytest.raises(ValueError, match="either logits, or hidden"):
        TeacherLogits()
    with pytest.raises(ValueError, match="beta must lie in"):
        _run(p, partial(weight_builders.jsd, beta=1.5), teacher=TeacherLogits(hidden=p.teacher_hidden, head_weight=p.teacher_head))
    with pytest.raises(ValueError, match="tail must be"):
        topk_logp, topk_ids = torch.log_softmax(p.teacher_logits(), -1).topk(3)
        _run(p, partial(weight_builders.forward_kl_topk, tail="drop"), fields={"teacher_topk_ids": topk_ids, "teacher_topk_logp": topk_logp})


def test_a_weight_with_a_gradient_is_refused() -> None:
    with pytest.raises(ValueError, match="carries a gradient"):
        TokenWeights(coef=torch.ones(3, requires_grad=True))


def test_weight_sum_names_missing_fields() -> None:
    p = make_problem()
    both = WeightSum((weight_builders.advantage_indicator, partial(weight_builders.k3_reference_penalty, kl_coef=0.1)))
    with pytest.raises(KeyError, match="k3_reference_penalty needs fields \\['reference_logp'\\]"):
        _run(p, both, fields={"advantages": p.advantages})
