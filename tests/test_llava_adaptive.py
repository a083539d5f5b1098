"""The options that make ATP learn adaptive budgets (ATPConfig.mlp_inputs, budget, min_keep,
target_loss): scale-free MLP inputs, straight-through hard masks whose counts are the inference
counts, the hard floor, the smooth target loss, what moves theta_r and theta_s apart, and a
short training run whose eval (hard) N_bar lands on the target. CPU, tiny random LLaVA."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import atp_ops  # noqa: E402
from atp_llava import ATPConfig, apply_atp, load_atp, read_atp_config, save_atp  # noqa: E402
from atp_llava.core.losses import min_reachable_tokens, target_loss  # noqa: E402
from atp_llava.core.modules import ThresholdMLP  # noqa: E402
from atp_llava.core.optim import DEFAULT_LR_ATP, param_groups  # noqa: E402
from atp_llava.tools.data import SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402

from test_llava_training import N_GRID, make_batch  # noqa: E402


@pytest.fixture(scope="module")
def stock():
    return tiny_llava(4)


@pytest.fixture(scope="module")
def batch2():
    return make_batch([600, 596], ["right", "left"])


# ----------------------------------------------------------------------------------------------
# scale-free MLP inputs


def test_normalized_mlp_inputs_ignore_a_100x_rescaling_of_the_scores():
    torch.manual_seed(0)
    s_self, s_cross = torch.randn(3, 64), torch.rand(3, 64)
    kept = torch.rand(3, 64) > 0.3
    norm = ThresholdMLP(64, 16, 0.3, inputs="normalized")
    raw = ThresholdMLP(64, 16, 0.3, inputs="raw")
    raw.load_state_dict(norm.state_dict())
    for mlp, invariant in ((norm, True), (raw, False)):
        a = torch.stack(mlp(s_self, s_cross, kept))
        b = torch.stack(mlp(100.0 * s_self + 3.0, 100.0 * s_cross, kept))
        assert torch.allclose(a, b, atol=1e-6) == invariant
    # pruned positions do not reach the input, whatever they hold
    x = norm.features(s_self, s_cross, kept)
    y = norm.features(torch.where(kept, s_self, 1e6), s_cross, kept)
    assert torch.equal(x, y) and float(x.min()) >= 0.0 and float(x.max()) == pytest.approx(1.0)


def test_initial_thresholds_sit_at_init_threshold_for_any_input():
    mlp = ThresholdMLP(N_GRID, 256, 0.25)
    for scale in (0.005, 1.0, 100.0):
        s = scale * torch.randn(4, N_GRID)
        tr, ts = mlp(s, s.abs(), torch.ones(4, N_GRID, dtype=torch.bool))
        assert torch.allclose(tr, torch.tensor(0.25), atol=0.02) and torch.allclose(ts, torch.tensor(0.25), atol=0.02)


# ----------------------------------------------------------------------------------------------
# the straight-through estimator


def _mult_attention_ref(q, k, v, m):
    """Attention with a multiplicative key mask, materialised in float64 and defined for any real
    m (the analytic continuation of M_j exp(s_ij) / sum_k M_k exp(s_ik)), so finite differences
    can step across M = 0."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    e = m[:, None, None, :] * torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def test_straight_through_gradient_matches_finite_differences_of_the_soft_relaxation():
    torch.manual_seed(1)
    b, h, l, d, n = 2, 2, 12, 8, 8  # the first n keys are vision tokens
    q, k, v = (torch.randn(b, h, l, d, dtype=torch.float64) for _ in range(3))
    w = torch.randn(b, h, l, d, dtype=torch.float64)
    s_red, s_spatial = torch.rand(b, n, dtype=torch.float64), torch.rand(b, n, dtype=torch.float64)
    theta = torch.tensor([0.5, 0.4], dtype=torch.float64, requires_grad=True)
    t = 10.0

    def soft_mask(th):
        return atp_ops.atp_soft_mask(s_red, s_spatial, th, th + 0.1, t).exp()

    keep = ((s_red > theta[:, None]) | (s_spatial > theta[:, None] + 0.1)).to(torch.float64).detach()
    assert 0 < keep.sum() < keep.numel()  # masked and kept keys both
    soft = soft_mask(theta)
    m_ste = soft + (keep - soft).detach()
    key_mask = torch.cat([m_ste, torch.ones(b, l - n, dtype=torch.float64)], 1)
    out = atp_ops.atp_attention(q, k, v, None, key_mask=key_mask, causal=False)
    assert torch.equal(key_mask.detach()[:, :n], keep)
    (grad,) = torch.autograd.grad((out * w).sum(), theta)

    # d/d theta_b of L(M_hard + (dM_soft / d theta_b) * eps), by central differences
    jac = torch.autograd.functional.jacobian(soft_mask, theta.detach())  # (b, n, b)
    ones = torch.ones(b, l - n, dtype=torch.float64)
    for i in range(b):
        def loss_at(eps):
            m = torch.cat([keep + eps * jac[:, :, i], ones], 1)
            return float((_mult_attention_ref(q, k, v, m) * w).sum())
        eps = 1e-6
        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert grad[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_hard_budget_counts_are_the_inference_counts(stock, batch2):
    cfg = ATPConfig(layers=(1, 2, 3), target_tokens=144, theta_override=(0.55, 0.7))
    model = apply_atp(copy.deepcopy(stock), cfg)
    train = model.train()(**batch2).atp_stats
    assert torch.equal(train["tokens"], train["tokens_hard"])
    assert float(train["tokens_hard"].min()) < N_GRID  # it prunes
    assert (train["tokens_soft"] != train["tokens_hard"]).any()  # and the soft count differs
    evaluated = model.eval()(**batch2).atp_stats  # real pruning
    assert evaluated["pruned"] and torch.equal(evaluated["tokens"], train["tokens"])
    assert float(train["n_bar_hard"]) == pytest.approx(float(evaluated["n_bar_batch"]))
    # the paper's soft budget: the losses see the soft count, the hard one is logged beside it
    soft = apply_atp(copy.deepcopy(stock), ATPConfig(**{**cfg.to_dict(), "budget": "soft"})).train()(**batch2)
    st = soft.atp_stats
    assert torch.allclose(st["tokens"], st["tokens_soft"]) and not torch.equal(st["tokens"], st["tokens_hard"])


@pytest.mark.parametrize("budget", ["hard", "soft"])
def test_both_budget_terms_reach_the_threshold_mlp(stock, batch2, budget):
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=160, budget=budget,
                                                      init_threshold=0.5))
    out = model.train()(**batch2)
    for term in ("loss_atp", "loss_target"):
        grads = torch.autograd.grad(out.atp_losses[term], list(model.atp.parameters()), retain_graph=True,
                                    allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), term
    # the next-token loss reaches them too, through the attention's key_mask (hard) or key_bias (soft)
    ntp = out.loss - model.atp.config.lambda_atp * out.atp_losses["loss_atp"] \
        - model.atp.config.lambda_target * out.atp_losses["loss_target"]
    head = model.atp.mlps["1"].head_r.bias
    (g,) = torch.autograd.grad(ntp, [head])
    assert float(g.abs()) > 0


def test_what_moves_theta_r_and_theta_s_apart():
    """The budget terms push both thresholds up, each through the tokens its branch keeps
    (M = max of the two sigmoids: a token's gradient goes to the branch that wins it); only a
    task loss that needs the tokens of one branch pulls that branch's threshold down."""
    n = 10
    s_red = torch.tensor([[0.9] * 5 + [0.0] * 5])     # tokens 0-4: the redundant branch wins
    s_spatial = torch.tensor([[0.0] * 5 + [0.9] * 5])  # tokens 5-9: the spatial branch wins
    tr = torch.tensor([0.5], requires_grad=True)
    ts = torch.tensor([0.5], requires_grad=True)
    m = atp_ops.atp_soft_mask(s_red, s_spatial, tr, ts, 10.0).exp()
    budget = m.sum()
    g_r, g_s = torch.autograd.grad(budget, [tr, ts], retain_graph=True)
    assert float(g_r) < 0 and float(g_s) < 0                  # both go up under the budget
    assert float(g_r) == pytest.approx(float(g_s), rel=1e-5)  # symmetric here: 5 tokens each
    task = -m[0, :5].sum()  # a loss that needs the redundant branch's tokens
    t_r, t_s = torch.autograd.grad(task, [tr, ts])
    assert float(t_r) > 0 and float(t_s) == 0.0               # only theta_r is pulled down
    assert n == s_red.shape[1]


# ----------------------------------------------------------------------------------------------
# the hard floor, the target loss, the reachable budget


@pytest.mark.parametrize("min_keep", [0, 1, 5])
def test_hard_floor_keeps_min_keep_tokens_when_theta_is_above_every_score(stock, batch2, min_keep):
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), theta_override=(1.0, 1.0),
                                                      min_keep=min_keep)).eval()
    st = model(**batch2).atp_stats
    assert torch.equal(st["tokens"], torch.full_like(st["tokens"], float(min_keep)))
    if min_keep:
        codes = st["keep_codes"][-1]
        assert ((codes > 0).sum(-1) == min_keep).all() and ((codes & 2) == 0).all()  # the floor is by S_red


def test_huber_target_loss_is_l1_away_from_the_target_and_smooth_at_it():
    x = torch.tensor([100.0, 146.0, 200.0], requires_grad=True)
    loss = sum(target_loss(xi, 144.0, "huber", 8.0) for xi in x)
    (g,) = torch.autograd.grad(loss, x)
    assert g.tolist() == pytest.approx([-1.0, 2.0 / 8.0, 1.0])
    assert float(target_loss(torch.tensor(200.0), 144.0, "huber", 8.0)) == pytest.approx(56.0 - 4.0)
    assert float(target_loss(torch.tensor(100.0), 144.0, "l1")) == 44.0


def test_unreachable_target_warns(stock):
    floor = min_reachable_tokens((1, 2, 3), 4, N_GRID, 1)
    assert floor == pytest.approx((N_GRID + 3) / 4)
    with pytest.warns(UserWarning, match="below the least N_bar"):
        apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=144))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=160))


def test_default_layers_follow_the_depth(stock):
    model = apply_atp(copy.deepcopy(stock), ATPConfig(target_tokens=300))
    assert model.atp.config.layers == (1, 2, 3) == ATPConfig.default_layers(4)
    assert ATPConfig.default_layers(32) == (4, 14, 24)


def test_older_files_load_with_the_choices_of_their_time(stock, batch2, tmp_path):
    from safetensors.torch import load_file, save_file

    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=300))
    path = tmp_path / "atp.safetensors"
    save_atp(model, path)
    assert read_atp_config(path) == model.atp.config
    # format 1: the paper's choices
    old = {k: v for k, v in model.atp.config.to_dict().items()
           if k not in ("mlp_inputs", "budget", "min_keep", "target_loss", "target_delta", "budget_control",
                        "weight_growth", "budget_window", "budget_tolerance", "logit_bound", "init_spatial_threshold",
                        "random_seed")}
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("budget_")}
    legacy = tmp_path / "v1.safetensors"
    save_file(state, str(legacy), metadata={"atp_config": json.dumps(old), "format": "atp_llava/1"})
    cfg = read_atp_config(legacy)
    assert (cfg.mlp_inputs, cfg.budget, cfg.min_keep, cfg.target_loss) == ("raw", "soft", 0, "l1")
    assert (cfg.budget_control, cfg.logit_bound) == ("penalty", None)
    assert load_atp(copy.deepcopy(stock), legacy).atp.config == cfg
    # format 2: a fixed budget weight, unbounded logits, normalised inputs divided by the cell count,
    # which its weights were trained on: loaded, the thresholds are the ones it computed
    v2 = dict(old, mlp_inputs="normalized", budget="hard", min_keep=1, target_loss="huber", target_delta=8.0)
    scaled = dict(state)
    for layer, mlp in model.atp.mlps.items():
        key, n = f"mlps.{layer}.proj.weight", mlp.n_cells
        scaled[key] = torch.cat([state[key][:, :2 * n] * n, state[key][:, 2 * n:]], 1)  # what it held for x / n
    save_file(scaled, str(tmp_path / "v2.safetensors"), metadata={"atp_config": json.dumps(v2), "format": "atp_llava/2"})
    loaded = load_atp(copy.deepcopy(stock), tmp_path / "v2.safetensors")
    assert (loaded.atp.config.budget_control, loaded.atp.config.logit_bound) == ("penalty", None)
    assert float(loaded.atp.budget_weight) == pytest.approx(loaded.atp.config.lambda_target)
    with torch.no_grad():
        a, b = model.eval()(**batch2).atp_stats, loaded.eval()(**batch2).atp_stats
    torch.testing.assert_close(a["theta_r"], b["theta_r"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["theta_s"], b["theta_s"], rtol=1e-5, atol=1e-6)
    # format 3: today's fields and budget state, inputs still divided by the cell count
    scaled.update(budget_weight=torch.tensor(7.0), budget_violation=torch.tensor(3.0))
    save_file(scaled, str(tmp_path / "v3.safetensors"),
              metadata={"atp_config": model.atp.config.to_json(), "format": "atp_llava/3"})
    loaded = load_atp(copy.deepcopy(stock), tmp_path / "v3.safetensors")
    assert loaded.atp.config == model.atp.config
    assert (float(loaded.atp.budget_weight), float(loaded.atp.budget_violation)) == (7.0, 3.0)
    with torch.no_grad():
        c = loaded.eval()(**batch2).atp_stats
    torch.testing.assert_close(a["theta_r"], c["theta_r"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["theta_s"], c["theta_s"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# a short training run with the defaults


def test_default_training_lands_the_eval_hard_budget_on_the_target():
    """Frozen random tiny LLaVA, the default ATPConfig and learning rate: after a short run the
    hard N_bar at eval (real pruning) is within 10% of the target."""
    torch.manual_seed(0)
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(target_tokens=250.0))
    data = SyntheticDataset(64, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(param_groups(model, lr_atp=DEFAULT_LR_ATP))
    model.train()
    steps = 0
    while steps < 50:
        for batch in loader:
            out = model(**batch, use_cache=False)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            steps += 1
            if steps == 50:
                break
    model.eval()
    with torch.no_grad():
        held_out = collate([SyntheticDataset(16, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=1)[i]
                            for i in range(16)])
        st = model(**held_out, use_cache=False).atp_stats
    assert st["pruned"]
    n_bar = float(st["n_bar_batch"])
    assert abs(n_bar - 250.0) <= 25.0, n_bar
    th = torch.cat([st["theta_r"], st["theta_s"]], 1)
    assert ((th > 0) & (th < 1)).all()
