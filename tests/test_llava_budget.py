"""The token budget as a promise (ATPConfig.budget_control, logit_bound) and the random baseline
(mode="random"): the budget weight that grows until N_bar meets the target where a fixed-weight
penalty settles off it, the same weight on every process, saved and resumed with the weights;
thresholds that come back from their limit; the paper's Eq. 14 as an option. CPU, tiny LLaVA."""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from atp_llava import ATPConfig, apply_atp, load_atp, save_atp  # noqa: E402
from atp_llava.core.losses import adapt_budget_weight, budget_error, target_loss  # noqa: E402
from atp_llava.core.modules import ThresholdMLP, bounded_logit  # noqa: E402
from atp_llava.core.optim import param_groups  # noqa: E402
from atp_llava.core.spatial import spatial_score  # noqa: E402
from atp_llava.core.step import KEEP_REDUNDANT, KEEP_SPATIAL  # noqa: E402
from atp_llava.tools.data import SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402

from test_llava_adaptive import batch2, stock  # noqa: E402,F401 (the fixtures: a tiny LLaVA, a 2-sample batch)
from test_llava_training import N_GRID  # noqa: E402


def _data(n, seed):
    return SyntheticDataset(n, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=seed)


def _train(model, steps, resist=0.0, seed=0, batch=4, opt=None, data=None):
    """``steps`` AdamW steps (default learning rates) on SyntheticDataset batches. ``resist``: a
    term ``-resist * N * log(N_bar)`` added to the loss, which plays the next-token loss of an LM
    that needs its tokens: a pull towards keeping them that weakens as more are kept, through the
    same straight-through masks. Returns the optimizer."""
    data = data or _data(64, seed)
    opt = opt or torch.optim.AdamW(param_groups(model), weight_decay=0.0)
    model.train()
    for step in range(steps):
        out = model(**collate([data[(batch * step + j) % len(data)] for j in range(batch)]), use_cache=False)
        loss = out.loss
        if resist:
            loss = loss - resist * N_GRID * torch.log(out.atp_losses["n_bar_batch"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def _without_image(ex):
    """A SyntheticDataset example with its image tokens and pixels removed (its text kept)."""
    ids = [t for t in ex["input_ids"] if t != TINY_IMAGE_TOKEN]
    return {"input_ids": ids, "labels": ex["labels"][-len(ids):], "pixel_values": ex["pixel_values"][:0]}


def _eval_stats(model):
    model.eval()
    with torch.no_grad():
        held_out = collate([_data(16, 1)[i] for i in range(16)])
        return model(**held_out, use_cache=False).atp_stats


# ----------------------------------------------------------------------------------------------
# the bound on the thresholds' logits


def test_bounded_logit_clamps_and_passes_only_inward_gradients_past_the_bound():
    x = torch.tensor([-9.0, -6.0, 0.5, 6.0, 9.0], requires_grad=True)
    y = bounded_logit(x, 6.0)
    assert y.tolist() == [-6.0, -6.0, 0.5, 6.0, 6.0]
    # descent moves x by -grad. Past a bound (-9, 9) only the inward part of the upstream gradient
    # passes, plus (|x| - 6) sign(x), the gradient of (|x| - 6)^2 / 2, which points inside too.
    for upstream, passed in ((1.0, [-3.0, 1.0, 1.0, 1.0, 4.0]), (-1.0, [-4.0, -1.0, -1.0, -1.0, 3.0])):
        (g,) = torch.autograd.grad(y, x, torch.full_like(x, upstream), retain_graph=True)
        assert g.tolist() == passed
    assert bounded_logit(x, None) is x


@pytest.mark.parametrize("bound", [6.0, None], ids=["bounded", "paper"])
def test_a_threshold_driven_to_its_limit_comes_back(bound):
    """A loss that asks for a higher theta for 300 Adam steps drives it to its limit; then a loss
    that asks for a lower one brings it back within 25 steps when the logit is bounded. With the
    paper's plain sigmoid the drive ends at exactly 1.0 in float32, no gradient reaches the MLP,
    and theta never moves again."""
    torch.manual_seed(0)
    mlp = ThresholdMLP(64, 16, 0.5, logit_bound=bound)
    s_self, s_cross, kept = torch.randn(4, 64), torch.rand(4, 64), torch.ones(4, 64, dtype=torch.bool)
    opt = torch.optim.Adam(mlp.parameters(), lr=0.01)

    def steps(n, sign):
        for _ in range(n):
            theta_r, _ = mlp(s_self, s_cross, kept)
            opt.zero_grad()
            (sign * theta_r.sum()).backward()
            opt.step()

    steps(300, -1.0)  # up
    with torch.no_grad():
        at_limit = mlp(s_self, s_cross, kept)[0]
    if bound:  # at the limit sigmoid(6), give or take the optimizer's last steps
        assert torch.all((at_limit - torch.sigmoid(torch.tensor(6.0))).abs() < 5e-3), at_limit
    else:
        assert torch.all(at_limit == 1.0)
    steps(25, 1.0)  # down
    with torch.no_grad():
        theta = mlp(s_self, s_cross, kept)[0]
    if bound:
        assert float(theta.max()) < 0.9, theta
    else:
        assert torch.equal(theta, at_limit) and float(mlp.head_r.bias.grad.abs()) == 0.0


def test_thresholds_at_their_limit_in_a_model_come_back_to_the_budget(stock):
    """A target below the least reachable N_bar drives every threshold to its upper limit (each
    image keeps the min_keep floor alone); once the target is 300 again, the default training
    brings the eval N_bar back to it."""
    with pytest.warns(UserWarning, match="below the least N_bar"):
        model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=100))
    _train(model, 60)
    st = _eval_stats(model)
    assert torch.all(st["tokens_hard"] == 1.0)  # the floor
    assert float(st["theta_r"][:, 0].min()) > 0.99 and float(st["theta_s"][:, 0].min()) > 0.99  # at the limit
    model.atp.config.target_tokens = 300.0
    _train(model, 60, seed=1)
    st = _eval_stats(model)
    assert abs(float(st["n_bar_batch"]) - 300.0) <= 0.05 * 300.0, float(st["n_bar_batch"])


# ----------------------------------------------------------------------------------------------
# the budget as a constraint


def test_budget_weight_grows_while_the_violation_stalls_and_relaxes_within_tolerance():
    w, v = torch.tensor(0.2), torch.tensor(float("inf"))
    step = lambda err: adapt_budget_weight(w, v, err, 0.2, 2.0, 0.02)  # noqa: E731
    step(0.5)  # the first window: nothing to compare with
    assert (float(w), float(v)) == (pytest.approx(0.2), 0.5)
    step(0.3)  # fell by more than a quarter: the weight does its job, kept
    assert float(w) == pytest.approx(0.2)
    step(0.28)  # stalled: doubled; from above or from below alike (|e|)
    step(0.27)
    assert float(w) == pytest.approx(0.8)
    step(0.01)  # within the tolerance: relaxed by a quarter of a growth step, never below lambda_target
    assert float(w) == pytest.approx(0.8 / 2 ** 0.25)
    for _ in range(10):
        step(0.0)
    assert float(w) == pytest.approx(0.2)
    for _ in range(30):
        step(1.0)
    assert float(w) == pytest.approx(0.2 * 1e4)  # capped
    sums = torch.tensor([2 * 150.0, 2 * 100.0, 2.0, 1.0])  # N_bar 150 against 100 on 2 samples
    assert float(budget_error(sums)) == pytest.approx(0.5)
    assert float(budget_error(torch.zeros(4))) == 0.0


def test_the_constraint_meets_the_target_where_the_penalty_settles_off_it(stock):
    """A pull towards keeping tokens (``_train``'s ``resist``: what the next-token loss of an LM that
    needs its tokens does) holds the paper's fixed-weight penalty more than 20% above the target,
    on the tokens the spatial branch keeps; the default budget weight grows until the eval N_bar
    is within 5% of it."""
    target = 250.0
    penalty = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=target,
                                                        budget_control="penalty"))
    _train(penalty, 150, resist=0.11)
    st = _eval_stats(penalty)
    assert float(st["n_bar_batch"]) > 1.2 * target, float(st["n_bar_batch"])
    assert float(penalty.atp.budget_weight) == pytest.approx(penalty.atp.config.lambda_target)
    # stalled on a plateau: at some ATP layer the spatial branch alone keeps at least 3/4 of the
    # tokens and every sample's theta_s lies between the same two adjacent S_spatial levels,
    # where moving it changes no hard count
    levels = sorted(set(spatial_score((24, 24), 3.0).tolist()))
    plateaus = []
    for k, codes in enumerate(st["keep_codes"]):
        spatial_only = float((codes == KEEP_SPATIAL).sum()) / float((codes > 0).sum())
        ts = st["theta_s"][:, k]
        below = [l for l in levels if l < float(ts.min())]
        above = [l for l in levels if l > float(ts.max())]
        if spatial_only >= 0.75 and below and above and levels.index(above[0]) == levels.index(below[-1]) + 1:
            plateaus.append(k)
    assert plateaus, "the penalty did not stall on a spatial plateau"

    default = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=target))
    _train(default, 150, resist=0.11)
    st = _eval_stats(default)
    assert abs(float(st["n_bar_batch"]) - target) <= 0.05 * target, float(st["n_bar_batch"])
    assert float(default.atp.budget_weight) > 2 * default.atp.config.lambda_target
    th = torch.cat([st["theta_r"], st["theta_s"]], 1)
    assert ((th > 0) & (th < 1)).all()


def test_the_penalty_option_is_the_papers_eq14(stock, batch2):
    """budget_control="penalty" with the L1 target loss: loss = L_ntp + lambda_ATP L_ATP +
    lambda_target |N_bar - N_target| exactly, at every step (the weight never moves)."""
    cfg = ATPConfig(layers=(1, 2, 3), target_tokens=200, budget_control="penalty", target_loss="l1")
    model = apply_atp(copy.deepcopy(stock), cfg)
    _train(model, 3)
    out = model.train()(**batch2)
    st = out.atp_stats
    eq14 = st["loss_ntp"] + cfg.lambda_atp * st["loss_atp"] + cfg.lambda_target * (st["n_bar_batch"] - 200).abs()
    assert float(out.loss.detach()) == pytest.approx(float(eq14), rel=1e-6)
    assert float(st["budget_weight"]) == float(model.atp.budget_weight) == pytest.approx(cfg.lambda_target)
    assert st["budget_error"] is None
    assert float(st["loss_target"]) == pytest.approx(float(target_loss(st["n_bar_batch"], 200.0, "l1")))


def test_budget_weight_is_saved_loaded_and_resumed(stock, tmp_path):
    """The weight and the last window's error are state of the training: save_atp writes them,
    load_atp restores them, and training resumed from the file continues as the uninterrupted
    run does."""
    cfg = ATPConfig(layers=(1, 2, 3), target_tokens=200, budget_window=1)
    model = apply_atp(copy.deepcopy(stock), cfg)
    opt = _train(model, 4, resist=0.3)  # a pull that holds N_bar far above 200: the weight grows
    weight, violation = float(model.atp.budget_weight), float(model.atp.budget_violation)
    assert weight > cfg.lambda_target and 0 < violation < float("inf")
    save_atp(model, tmp_path / "atp.safetensors")
    resumed = load_atp(copy.deepcopy(stock), tmp_path / "atp.safetensors")
    assert (float(resumed.atp.budget_weight), float(resumed.atp.budget_violation)) == (weight, violation)
    opt2 = torch.optim.AdamW(param_groups(resumed), weight_decay=0.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: the live state is shared otherwise
    data = _data(64, 0)
    more = [data[16 + j] for j in range(8)]  # the batches after _train's first 4 steps
    _train(model, 2, resist=0.3, opt=opt, data=more)
    _train(resumed, 2, resist=0.3, opt=opt2, data=more)
    assert float(resumed.atp.budget_weight) == pytest.approx(float(model.atp.budget_weight), rel=1e-6)
    assert float(resumed.atp.budget_violation) == pytest.approx(float(model.atp.budget_violation), rel=1e-5)
    # bfloat16 models keep float32 budget state: it sums small steps over a whole run
    half = copy.deepcopy(model).to(torch.bfloat16).atp
    assert half.budget_weight.dtype == half.budget_violation.dtype == torch.float32


def test_the_weight_steps_once_per_accumulated_batch(stock, batch2):
    """Forwards that are parts of one optimizer step's batch (budget_share, from Trainer's
    num_items_in_batch) use the same weight, and the step's error is the whole batch's N_bar's:
    what one forward on the whole batch gives."""
    cfg = ATPConfig(layers=(1, 2, 3), target_tokens=200, init_threshold=0.5, budget_window=1)
    base = apply_atp(copy.deepcopy(stock), cfg).train()
    whole, halves = copy.deepcopy(base), copy.deepcopy(base)  # the same threshold MLPs
    out = whole(**batch2)
    labels = int((batch2["labels"][:, 1:] != -100).sum())
    weights, errors = [], []
    for i in (0, 1):
        part = {k: v[i:i + 1] for k, v in batch2.items()}
        part_out = halves(**part, num_items_in_batch=torch.tensor(labels))
        weights.append(float(part_out.atp_stats["budget_weight"]))
        errors.append(part_out.atp_stats["budget_error"])
    assert weights == [pytest.approx(cfg.lambda_target)] * 2 and errors[0] is None
    assert float(errors[1]) == pytest.approx(float(out.atp_stats["budget_error"]), rel=1e-5)
    assert float(halves.atp.budget_violation) == pytest.approx(float(whole.atp.budget_violation), rel=1e-5)
    assert float(halves.atp.budget_violation) == pytest.approx(abs(float(errors[1])), rel=1e-5)


def test_eval_and_no_grad_forwards_leave_the_weight_alone(stock, batch2):
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=200))
    with torch.no_grad():
        model.train()(**batch2)
        model.eval()(**batch2)
    assert float(model.atp.budget_weight) == pytest.approx(0.2)


def _weights_run(rank, world_size, port, out_dir):
    """4 DDP steps (gloo) on rank-local batches of 2; at the third step rank 1's batch has no
    image. Saves the budget weight and error after each step. With world_size 1: the same steps
    on the union of the ranks' batches. The target is out of reach (every image at the floor
    keeps more than 100 per layer on average): the error stalls and the weight doubles."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    if world_size > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=100, init_threshold=0.9,
                                                       budget_window=1)).train()
    runner = DistributedDataParallel(model) if world_size > 1 else model
    opt = torch.optim.AdamW(param_groups(model), weight_decay=0.0)
    data = _data(16, 20)

    def batch(r, step):
        items = [data[4 * step + 2 * r + j] for j in range(2)]
        return [_without_image(ex) for ex in items] if (step == 2 and r == 1) else items

    weights = []
    for step in range(4):
        items = batch(rank, step) if world_size > 1 else batch(0, step) + batch(1, step)
        out = runner(**collate(items), use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        weights.append((float(model.atp.budget_weight), float(model.atp.budget_violation)))
    torch.save(weights, os.path.join(out_dir, f"w{world_size}_{rank}.pt"))
    if world_size > 1:
        dist.destroy_process_group()


def test_the_weight_is_the_same_on_two_gloo_ranks(tmp_path):
    """Two DDP processes with different batches (rank 1's last one text-only) hold the same budget
    weight after every step: the one process that trains on both ranks' batches at once holds."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    mp.spawn(_weights_run, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    _weights_run(0, 1, port, str(tmp_path))
    r0, r1, single = (torch.load(tmp_path / name) for name in ("w2_0.pt", "w2_1.pt", "w1_0.pt"))
    assert r0 == r1, (r0, r1)
    assert [w for w, _ in r0] == pytest.approx([w for w, _ in single], rel=1e-6)
    assert [v for _, v in r0] == pytest.approx([v for _, v in single], rel=1e-5)
    assert r0[0][0] < r0[-1][0]  # the error stalled: the weight grew


# ----------------------------------------------------------------------------------------------
# mode "random"


def test_random_mode_keeps_fixeds_counts_drawn_per_sample_and_by_seed(stock, batch2):
    keep = (300, 150, 40)
    cfg = ATPConfig(layers=(1, 2, 3), mode="random", fixed_keep=keep, train_lm=True, random_seed=5)
    twice = copy.deepcopy(batch2)
    twice = {k: torch.cat([v, v]) if k != "pixel_values" else torch.cat([v, v]) for k, v in twice.items()}
    runs = []
    for seed in (5, 5, 6):
        model = apply_atp(copy.deepcopy(stock), ATPConfig(**{**cfg.to_dict(), "random_seed": seed})).eval()
        with torch.no_grad():
            runs.append(model(**twice))
    st = runs[0].atp_stats
    assert torch.equal(st["tokens"], torch.tensor([keep] * 4, dtype=torch.float32))  # fixed's counts
    codes = [c.bool() for c in st["keep_codes"]]
    assert not torch.equal(codes[0][0], codes[0][2])  # the same sample twice: two draws
    for a, b in zip(codes, [c.bool() for c in runs[1].atp_stats["keep_codes"]]):
        assert torch.equal(a, b)  # the same seed: the same tokens
    assert not torch.equal(codes[0], runs[2].atp_stats["keep_codes"][0].bool())  # another seed
    assert all(torch.equal(c.unique(), torch.tensor([0, KEEP_REDUNDANT], dtype=torch.uint8))
               for c in st["keep_codes"])
    # nested: a token kept after layer 3 was kept after layers 1 and 2
    assert not (codes[2] & ~codes[1]).any() and not (codes[1] & ~codes[0]).any()


def test_random_mode_never_keeps_a_padding_slot_or_a_structural_token():
    """Ragged images (Qwen2-VL: 24 and 16 tokens, padded to 24 per image slot): the draws keep
    min(k, the image's tokens) of each image's own tokens, never a slot past its count, and the
    pruned forward keeps every text and vision_start / vision_end token."""
    from atp_llava.tools.tiny import QWEN_END, QWEN_START, family_batch, tiny_qwen2_vl

    model = tiny_qwen2_vl(4)
    batch = family_batch(model, [[(1, 8, 12)], [(1, 8, 8)]], seed=0)
    apply_atp(model, ATPConfig(layers=(1, 2, 3), mode="random", fixed_keep=(20, 10, 5), train_lm=True)).eval()
    with torch.no_grad():
        out = model(**batch)
    st = out.atp_stats
    assert st["tokens"].tolist() == [[20.0, 10.0, 5.0], [16.0, 10.0, 5.0]]
    for codes in st["keep_codes"]:
        assert not codes[1, 16:].any()  # the second image's padding slots
    assert st["pruned"]
    # every other real token (text, vision_start / vision_end) stays: layer 3's cache holds each
    # sample's real tokens less its pruned vision tokens
    with torch.no_grad():
        out = model(**batch, use_cache=True)
    bias = model._atp_controller._caches[out.past_key_values].bias[3]
    real = batch["attention_mask"].sum(1)
    assert torch.isfinite(bias).sum(1).tolist() == [int(real[0]) - 24 + 5, int(real[1]) - 16 + 5]
    assert int(((batch["input_ids"] == QWEN_START) | (batch["input_ids"] == QWEN_END)).sum()) == 4


def test_random_mode_trains_the_lm(stock, batch2):
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), mode="random", fixed_keep=(100, 50, 20),
                                                      train_lm=True)).train()
    out = model(**batch2)
    assert torch.allclose(out.loss.detach(), out.atp_stats["loss_ntp"])
    out.loss.backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
