"""The ATP step (atp_llava.core.step, DESIGN §3.2-3.4) called on a state built here: a one-sample
VisionLayout of one 2 x 3 image, a hand-made capture of the score layer, the ATP modules, and no
model and no hooks.

The capture is built so that the scores are known. Head dim 4, one head, scale 1; every query
and key lies along the first axis: key n is c_n e_0, so a row of queries q_m e_0 has logits
q_m c_n. The image rows have q = 1: S_self (Eq. 3, the raw logits averaged over the image rows)
is c. The text rows after the image have q = 1, 1, -1: S_cross (Eq. 4) mixes two rows that
favour a high c and one (the last, FastV's only row) that favours a low c. The text rows
before the image have q = -4: had they been rows of S_self, its order would flip. CPU only.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import atp_ops  # noqa: E402
from atp_llava.core.config import ATPConfig  # noqa: E402
from atp_llava.core.layout import VisionLayout  # noqa: E402
from atp_llava.core.modules import ATPModules  # noqa: E402
from atp_llava.core.state import ATPState  # noqa: E402
from atp_llava.core.step import KEEP_REDUNDANT, KEEP_SPATIAL, atp_step  # noqa: E402

IMG = 7
INPUT_IDS = torch.tensor([[1, 2, IMG, IMG, IMG, IMG, IMG, IMG, 3, 4, 5]])  # text 0-1, image 2-7, text 8-10
IMAGE = slice(2, 8)
C = torch.tensor([0.0, 0.0, 0.0, 2.0, 1.0, 3.0, -1.0, 0.5, 0.0, 0.0, 0.0])  # the keys' c; image: 0, 2, 1, 3, -1, .5
Q = torch.tensor([-4.0, -4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0])
SPATIAL = [0.25, 0.0, 0.25, 0.0, 1.0 - 1.0 / 3.0, 0.0]  # Eq. 5 on 2 x 3, strides 2 and 3 (lambda_sample 3)
R, S = KEEP_REDUNDANT, KEEP_SPATIAL


def layout() -> VisionLayout:
    return VisionLayout.from_batch(INPUT_IDS, IMG, (2, 3))


def capture(key_bias=None, q_rows=Q):
    """(q, k, lse, key_bias, scale, causal) of the score layer, as the attention function keeps it."""
    q = torch.zeros(1, 1, 11, 4)
    k = torch.zeros(1, 1, 11, 4)
    q[0, 0, :, 0], k[0, 0, :, 0] = q_rows, C
    logits = (q_rows[:, None] * C[None, :]).masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    if key_bias is not None:
        logits = logits + key_bias[0][None, :]
    return q, k, torch.logsumexp(logits, -1)[None, None], key_bias, 1.0, True


def s_red_by_hand(kept=None, q_rows=Q):
    """Eq. 3-4 and the redundant score from the definitions (one head, rows as above)."""
    kept = torch.ones(6, dtype=torch.bool) if kept is None else kept
    bias = torch.zeros(11)
    bias[IMAGE] = torch.where(kept, 0.0, float("-inf"))
    causal = torch.where(torch.arange(11)[None, :] <= torch.arange(8, 11)[:, None], 0.0, float("-inf"))
    p = torch.softmax(q_rows[8:, None] * C[None, :] + bias + causal, -1)  # rows 8-10
    s_self, s_cross = q_rows[IMAGE][kept].mean() * C[IMAGE], p[:, IMAGE].mean(0)  # the kept image rows

    def norm(s):
        lo, hi = s[kept].min(), s[kept].max()
        return torch.where(kept, (s - lo) / (hi - lo), 0.0)

    return 0.5 * (norm(s_self) + norm(s_cross))


def new_state(lay: VisionLayout, hard: bool, prune: bool = False, straight_through: bool = False) -> ATPState:
    """The state a forward starts with (as ATPController._start_forward builds it) and the score
    layer 0's capture."""
    zeros = lay.image_zeros()
    state = ATPState(layout=lay, hard=hard, prune=prune, current_bias=lay.pad_bias, img_bias=zeros,
                     img_keep=lay.image_valid, img_soft=zeros,
                     img_mask=lay.image_valid.to(zeros.dtype) if straight_through else None, score_layers=(0,))
    state.captures[0] = capture()
    return state


def test_the_hand_made_capture_gives_the_scores_the_tests_assume():
    atp = ATPModules(ATPConfig(layers=(1,), theta_override=(0.5, 0.5)), (2, 3))
    assert torch.allclose(atp.spatial(layout())[0], torch.tensor(SPATIAL))
    # s_red: token 3 (c = 3) highest, token 4 (c = -1) lowest
    assert s_red_by_hand().argsort(descending=True).tolist() == [3, 1, 2, 5, 0, 4]


@pytest.mark.parametrize("thetas,keep,codes", [
    ((0.4, 0.5), [0, 1, 0, 1, 1, 0], [0, R, 0, R, S, 0]),          # s_red > 0.4: 1, 3; spatial > 0.5: 4
    ((0.1, 0.2), [1, 1, 1, 1, 1, 1], [R | S, R, R | S, R, S, R]),  # every token, for one reason or both
    ((0.99, 0.9), [0, 0, 0, 1, 0, 0], [0, 0, 0, R, 0, 0]),         # the floor alone: min_keep=1, the best s_red
])
def test_hard_step_keeps_the_tokens_over_the_thresholds_and_says_why(thetas, keep, codes):
    lay = layout()
    cfg = ATPConfig(layers=(1,), theta_override=thetas)
    state = new_state(lay, hard=True)
    hidden = torch.randn(1, 11, 8)
    out = atp_step(state, 1, hidden, ATPModules(cfg, (2, 3)), cfg)
    assert out is hidden and state.view is None  # masked in place, nothing gathered
    assert 0 not in state.captures  # the capture is used once
    assert state.img_keep[0].int().tolist() == keep
    assert [c.tolist() for c in state.keep_codes] == [[codes]]
    assert state.keep_codes[0].dtype == torch.uint8
    n = float(sum(keep))
    assert [float(c) for c in state.kept] == [n] and [float(c) for c in state.kept_hard] == [n]
    assert [float(t) for t in state.theta_r] == [pytest.approx(thetas[0])]
    assert [float(t) for t in state.theta_s] == [pytest.approx(thetas[1])]
    bias = torch.zeros(11)
    bias[IMAGE] = torch.where(torch.tensor(keep, dtype=torch.bool), 0.0, float("-inf"))
    assert torch.equal(state.current_bias[0], bias) and state.current_mask is None
    # the soft relaxation of the same thresholds, for the soft counts (Eq. 9-11)
    soft = atp_ops.atp_soft_mask(s_red_by_hand()[None], torch.tensor([SPATIAL]), torch.tensor([thetas[0]]),
                                 torch.tensor([thetas[1]]), cfg.temperature)
    assert float(state.kept_soft[0][0]) == pytest.approx(float(soft.exp().sum()), rel=1e-4)


def test_tokens_pruned_before_stay_pruned_and_their_rows_leave_s_self():
    lay = layout()
    # s_red > 0.99: none; spatial > 0.5: token 4 alone, which is gone: the floor keeps one
    cfg = ATPConfig(layers=(1,), theta_override=(0.99, 0.5))
    state = new_state(lay, hard=True)
    before = torch.tensor([True, True, True, False, False, True])  # an earlier ATP layer pruned 3 and 4
    state.img_keep = before[None]
    state.img_bias = torch.where(before, 0.0, float("-inf"))[None]
    state.current_bias = lay.scatter(state.img_bias, lay.pad_bias)
    q_rows = Q.clone()
    q_rows[5:7] = -10.0  # the pruned tokens' rows: in S_self's rows they would flip its order
    state.captures[0] = capture(state.current_bias, q_rows)
    atp_step(state, 1, torch.randn(1, 11, 8), ATPModules(cfg, (2, 3)), cfg)
    assert int(s_red_by_hand(before, q_rows).argmax()) == 1
    assert state.img_keep[0].int().tolist() == [0, 1, 0, 0, 0, 0]
    assert state.keep_codes[0][0].tolist() == [0, R, 0, 0, 0, 0]


def test_a_second_atp_layer_builds_on_the_first():
    lay = layout()
    cfg = ATPConfig(layers=(1, 2), theta_override=(0.4, 0.5))
    atp = ATPModules(cfg, (2, 3))
    state = new_state(lay, hard=True)
    atp_step(state, 1, torch.randn(1, 11, 8), atp, cfg)
    first = state.img_keep[0].clone()
    state.captures[1] = capture(state.current_bias)  # layer 1 ran with the first mask
    atp_step(state, 2, torch.randn(1, 11, 8), atp, cfg)
    assert first.int().tolist() == [0, 1, 0, 1, 1, 0] and state.img_keep[0].int().tolist() == [0, 1, 0, 1, 1, 0]
    assert [c[0].tolist() for c in state.keep_codes] == [[0, R, 0, R, S, 0]] * 2
    assert [float(c) for c in state.kept_hard] == [3.0, 3.0] and len(state.theta_r) == 2
    # the soft counts multiply the layers' soft masks (log masks add up), each on its own scores
    thetas = torch.tensor([0.4]), torch.tensor([0.5])
    log_m = sum(atp_ops.atp_soft_mask(s_red_by_hand(kept)[None], torch.tensor([SPATIAL]), *thetas, cfg.temperature)
                for kept in (torch.ones(6, dtype=torch.bool), first))
    assert float(state.kept_soft[1][0]) == pytest.approx(float(log_m.exp().sum()), rel=1e-4)


@pytest.mark.parametrize("mode,keep", [
    ("fixed", [0, 1, 0, 1, 0, 0]),  # the top 2 by s_red
    ("fastv", [1, 0, 0, 0, 1, 0]),  # the top 2 by the last row's S_cross, which favours a low c
])
def test_fixed_count_modes_keep_the_top_k_of_their_ranking(mode, keep):
    cfg = ATPConfig(layers=(1,), mode=mode, fixed_keep=(2,))
    for hard in (True, False):  # the same hard mask in training
        state = new_state(layout(), hard=hard)
        atp_step(state, 1, torch.randn(1, 11, 8), ATPModules(cfg, (2, 3)), cfg)
        assert state.img_keep[0].int().tolist() == keep
        assert [float(c) for c in state.kept] == [2.0] and [float(c) for c in state.kept_soft] == [2.0]
        assert [c.tolist() for c in state.keep_codes] == ([[[R * k for k in keep]]] if hard else [])
        assert not state.theta_r


def test_random_mode_keeps_k_tokens_drawn_by_the_generator():
    cfg = ATPConfig(layers=(1,), mode="random", fixed_keep=(2,))
    keeps = []
    for seed in (0, 0, 1, 2, 3):
        state = new_state(layout(), hard=True)
        atp_step(state, 1, torch.randn(1, 11, 8), ATPModules(cfg, (2, 3)), cfg, torch.Generator().manual_seed(seed))
        keeps.append(state.img_keep[0].int().tolist())
        assert sum(keeps[-1]) == 2
    assert keeps[0] == keeps[1] and len({tuple(k) for k in keeps}) > 1


def test_pruned_step_gathers_the_kept_tokens():
    lay = layout()
    cfg = ATPConfig(layers=(1,), theta_override=(0.4, 0.5))  # keeps image tokens 1, 3, 4: positions 3, 5, 6
    state = new_state(lay, hard=True, prune=True)
    hidden = torch.randn(1, 11, 8)
    out = atp_step(state, 1, hidden, ATPModules(cfg, (2, 3)), cfg)
    kept = [0, 1, 3, 5, 6, 8, 9, 10]
    assert state.view.orig[0].tolist() == kept and bool(state.view.valid.all())
    assert torch.equal(out, hidden[:, kept])
    assert torch.equal(state.current_bias, torch.zeros(1, 8))  # in the new slots


def test_straight_through_mask_is_hard_in_value_and_soft_in_gradient():
    lay = layout()
    cfg = ATPConfig(layers=(1,))  # the threshold MLP, made to output exactly theta_r, theta_s
    atp = ATPModules(cfg, (2, 3))
    mlp = atp.mlps["1"]
    theta_r, theta_s = 0.4, 0.5
    with torch.no_grad():
        for head, theta in ((mlp.head_r, theta_r), (mlp.head_s, theta_s)):
            head.weight.zero_()
            head.bias.fill_(math.log(theta / (1 - theta)))
    state = new_state(lay, hard=False, straight_through=True)
    hidden = torch.randn(1, 11, 8)
    assert atp_step(state, 1, hidden, atp, cfg) is hidden
    keep = [0, 1, 0, 1, 1, 0]  # as the hard step with the same thresholds
    assert state.img_keep[0].int().tolist() == keep and not state.keep_codes
    mask = torch.ones(11)
    mask[IMAGE] = torch.tensor(keep, dtype=torch.float32)
    assert torch.equal(state.current_mask[0].detach(), mask)  # 0/1 in value
    assert torch.equal(state.current_bias, lay.pad_bias)  # the mask goes to key_mask, not key_bias
    assert float(state.kept[0][0].detach()) == 3.0 and float(state.kept_hard[0][0]) == 3.0
    # the gradient is the soft relaxation's (Eq. 9-11), here in the heads' biases
    state.kept[0].sum().backward()
    tr = torch.tensor([theta_r], requires_grad=True)
    ts = torch.tensor([theta_s], requires_grad=True)
    soft = atp_ops.atp_soft_mask(s_red_by_hand()[None], torch.tensor([SPATIAL]), tr, ts, cfg.temperature)
    g_r, g_s = torch.autograd.grad(soft.exp().sum(), (tr, ts))
    assert float(g_r) < 0 and float(g_s) < 0
    assert float(mlp.head_r.bias.grad) == pytest.approx(float(g_r) * theta_r * (1 - theta_r), rel=1e-3)
    assert float(mlp.head_s.bias.grad) == pytest.approx(float(g_s) * theta_s * (1 - theta_s), rel=1e-3)


def test_a_batch_without_images_still_runs_the_threshold_mlp_with_weight_0():
    ids = torch.tensor([[1, 2, 3, 4]])
    lay = VisionLayout.from_batch(ids, IMG, (2, 3))
    cfg = ATPConfig(layers=(1,))
    atp = ATPModules(cfg, (2, 3))
    state = new_state(lay, hard=False)
    state.captures[0] = (None,) * 6  # not read without images
    atp_step(state, 1, torch.randn(1, 4, 8), atp, cfg)
    assert [c.shape for c in state.kept + state.kept_soft + state.kept_hard + state.theta_r] == [(0,)] * 4
    (null,) = state.null_terms
    assert float(null.detach()) == 0.0 and null.requires_grad
    assert torch.equal(state.current_bias, lay.pad_bias) and state.current_bias.requires_grad
    null.backward()
    assert all(p.grad is not None for p in atp.mlps["1"].parameters())
