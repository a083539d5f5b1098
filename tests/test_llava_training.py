"""ATP-LLaVA training on a stock transformers LLaVA (atp_llava): equivalence with the stock model,
gradients of the budget losses, training dynamics, checkpointing, DDP, save/load, the entry point.

All on a tiny random LLaVA with the real 24 x 24 = 576-token image layout (tiny_llava), CPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from atp_llava import (ATPConfig, VisionLayout, apply_atp, check_transformers_version, load_atp,  # noqa: E402
                       read_atp_config, save_atp, spatial_score)
from atp_llava.tools.data import RecordsDataset, SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402

N_GRID = 576
KEEP_ALL = (-5.0, -5.0)  # theta below every score: log-sigmoid((s + 5) * 10) == 0 in float32


def make_batch(lens, padding_sides, images_per_sample=None, seed=0, answer_len=4):
    """Padded batch of prompts with the image span at a different offset in every sample.

    lens: real length of every sample; padding_sides: "left"/"right" per sample (a mixed batch
    is what a left-padding collator sees after shuffling, and exercises both).
    """
    g = torch.Generator().manual_seed(seed)
    b, length = len(lens), max(lens)
    images_per_sample = images_per_sample or [1] * b
    ids = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, (n, side, k) in enumerate(zip(lens, padding_sides, images_per_sample)):
        seq = torch.randint(3, 100, (n,), generator=g)
        start = 2 + i  # a different image offset per sample
        for j in range(k):
            s = start + j * (N_GRID + 3)
            seq[s:s + N_GRID] = TINY_IMAGE_TOKEN
        assert s + N_GRID < n - answer_len - 2
        lab = torch.full((n,), -100, dtype=torch.long)
        lab[n - answer_len:] = seq[n - answer_len:]
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, sl], mask[i, sl], labels[i, sl] = seq, 1, lab
    pixels = torch.randn(sum(images_per_sample), 3, 48, 48, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


@pytest.fixture(scope="module")
def batch3():
    return make_batch([600, 590, 596], ["right", "left", "right"])


def atp_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("atp.")}


def train_atp(model, batch, steps=2, lr=1e-2):
    """`steps` AdamW steps of the ATP parameters alone on `batch`: moves them away from their
    initialisation."""
    opt = torch.optim.AdamW(atp_params(model).values(), lr=lr)
    for _ in range(steps):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


# ----------------------------------------------------------------------------------------------
# building blocks


def test_transformers_version_in_supported_range():
    import transformers

    assert check_transformers_version() == transformers.__version__
    assert check_transformers_version("5.24.0") == "5.24.0" and check_transformers_version("5.30.1")
    for bad in ("4.46.0", "5.23.2", "6.0.0"):
        with pytest.raises(RuntimeError, match="supports transformers"):
            check_transformers_version(bad)


def test_spatial_score_eq5():
    s = spatial_score((24, 24), lambda_sample=3.0).view(24, 24)
    assert s.shape == (24, 24) and float(s.min()) == 0.0 and float(s.max()) <= 1.0
    # stride 2 samples the cell origins (offset 0): score 1 - 3/4 at least.
    assert float(s[0, 2]) >= 0.25 and float(s[1, 0]) == 0.0
    only2 = spatial_score((24, 24), 3.0, strides=(2,)).view(24, 24)
    assert int((only2 > 0).sum()) == 144 and torch.allclose(only2[::2, ::2], torch.tensor(0.25))
    # a token in several grids keeps its highest score (stride 4 -> 1 - 3/16)
    both = spatial_score((24, 24), 3.0, strides=(2, 4)).view(24, 24)
    assert float(both[1, 1]) == pytest.approx(1 - 3 / 16) and float(both[0, 0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="outside"):
        spatial_score((24, 24), 3.0, strides=(1,))


def test_layout_from_input_ids_several_images_and_padding():
    batch = make_batch([1200, 640], ["left", "right"], images_per_sample=[2, 1])
    lay = VisionLayout.from_batch(batch["input_ids"], TINY_IMAGE_TOKEN, N_GRID, batch["attention_mask"],
                                  batch["labels"])
    assert lay.num_images == 3 and lay.images_per_sample.tolist() == [2, 1]
    assert lay.image_sample.tolist() == [0, 0, 1] and lay.image_slot.tolist() == [0, 1, 0]
    assert lay.image_pos[0, 0] == 2 and lay.image_pos[1, 0] == 2 + N_GRID + 3  # sample 0: longest, unpadded
    assert lay.image_pos[2, 0] == 3
    assert torch.isinf(lay.pad_bias[1, 640:]).all() and (lay.pad_bias[1, :640] == 0).all()
    # S_cross rows: real, non-image, non-answer tokens after the image
    rows = lay.text_rows[2]
    assert not rows[:3 + N_GRID].any() and not rows[640 - 4:].any() and rows[3 + N_GRID:640 - 4].all()
    assert lay.text_rows[0, 2 + N_GRID:2 + N_GRID + 3].all()  # text between the two images
    assert not lay.text_rows[0, lay.image_pos[1]].any()
    bad = batch["input_ids"].clone()
    bad[1, 3] = 5  # an image missing one token
    with pytest.raises(ValueError, match="whole number of images"):
        VisionLayout.from_batch(bad, TINY_IMAGE_TOKEN, N_GRID, batch["attention_mask"])


# ----------------------------------------------------------------------------------------------
# equivalence with the stock model


@pytest.mark.parametrize("decoder,stock_impl", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_keep_all_matches_stock_logits(batch3, decoder, stock_impl):
    stock = tiny_llava(4, decoder=decoder, attn_implementation=stock_impl)
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_tokens=144, theta_override=KEEP_ALL))
    assert model.config.text_config._attn_implementation == "atp"
    assert model.config.vision_config._attn_implementation == stock_impl  # the vision tower stays stock
    valid = batch3["attention_mask"].bool()
    with torch.no_grad():
        ref = stock(**batch3).logits
        for mode in ("train", "eval"):
            getattr(model, mode)()
            out = model(**batch3)
            err = (out.logits - ref)[valid].abs().max().item()
            assert err < 1e-4, f"{mode}: logits differ from stock {stock_impl} by {err}"
            assert torch.equal(out.atp_stats["tokens"], torch.full((3, 3), float(N_GRID)))
            assert torch.equal(out.atp_stats["n_bar"], torch.full((3,), float(N_GRID)))
            assert torch.equal(out.atp_stats["flops"], out.atp_stats["flops_full"])
    # the same path with learned (initial) thresholds really masks: logits move
    pruned = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), init_threshold=0.5)).train()
    with torch.no_grad():
        moved = (pruned(**batch3).logits - ref)[valid].abs().max().item()
    assert moved > 1e-3


def test_rope_2d_rotates_vision_tokens_by_row_and_column(batch3):
    from atp_llava import positions_3d, rope_2d_cos_sin

    stock = tiny_llava(4)
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), theta_override=KEEP_ALL, rope_2d=True))
    lay = VisionLayout.from_batch(batch3["input_ids"], TINY_IMAGE_TOKEN, N_GRID, batch3["attention_mask"])
    pos = torch.arange(600)[None]
    pos3 = positions_3d(pos, lay)
    for i in range(3):
        b, p = int(lay.image_sample[i]), lay.image_pos[i]
        p0 = int(p[0])
        n = torch.arange(N_GRID)
        assert torch.equal(pos3[:, b, p], torch.stack([torch.full((N_GRID,), p0), p0 + n // 24, p0 + n % 24]))
        text = torch.ones(600, dtype=torch.bool)
        text[p] = False
        assert (pos3[:, b, text] == pos[0, text]).all()  # text: (p, p, p), never re-indexed
    # (p, p, p) is exactly 1D RoPE
    rotary = stock.model.language_model.rotary_emb
    cos1, sin1 = rotary(torch.zeros(1, 600, 64), pos)
    cos3, sin3 = rope_2d_cos_sin(pos[None].expand(3, 1, 600), rotary.inv_freq, rotary.attention_scaling,
                                 (2, 3, 3), torch.float32)
    assert torch.allclose(cos1, cos3) and torch.allclose(sin1, sin3)
    valid = batch3["attention_mask"].bool()
    with torch.no_grad():
        diff = (model(**batch3).logits - stock(**batch3).logits).abs().amax(-1)
    for b in range(3):
        first = int(lay.image_pos[b, 0])
        assert diff[b, :first][valid[b, :first]].max() < 1e-5  # before the image: unchanged
        assert diff[b, first + 1:][valid[b, first + 1:]].max() > 1e-3  # from the image on: 2D positions
    trained = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), rope_2d=True)).train()
    out = trained(**batch3)
    out.loss.backward()
    assert torch.isfinite(out.loss) and trained.atp.mlps["1"].head_r.bias.grad.abs() > 0


# ----------------------------------------------------------------------------------------------
# gradients


def test_budget_losses_reach_every_threshold_mlp_and_lm_stays_frozen(batch3):
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=100)).train()
    out = model(**batch3)
    params = atp_params(model)
    assert len(params) == 3 * 6  # 3 MLPs x (proj, head_r, head_s) x (weight, bias)
    for term in ("loss_atp", "loss_target"):
        grads = torch.autograd.grad(out.atp_losses[term], list(params.values()), retain_graph=True,
                                    allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            assert g is not None and g.abs().sum() > 0, f"{term}: no gradient on {name}"
    # L_ntp alone reaches the thresholds too, through atp_attention's key_bias gradient
    cfg = model.atp.config
    loss_ntp = out.loss - cfg.lambda_atp * out.atp_losses["loss_atp"] - cfg.lambda_target * out.atp_losses["loss_target"]
    g_ntp = torch.autograd.grad(loss_ntp, [params["atp.mlps.1.head_r.bias"]], retain_graph=True)[0]
    assert g_ntp.abs() > 0
    expected = (out.atp_stats["loss_ntp"] + 0.05 * out.atp_stats["loss_atp"] + 0.2 * out.atp_stats["loss_target"])
    assert torch.allclose(out.loss.detach(), expected)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("atp."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, f"frozen LM parameter {name} got a gradient"


def test_l_atp_and_n_bar_follow_the_paper(batch3):
    model = apply_atp(tiny_llava(6), ATPConfig(layers=(1, 3, 4), init_threshold=0.3, target_tokens=200,
                                               target_loss="l1")).train()
    out = model(**batch3)
    st = out.atp_stats
    kept = st["tokens"]  # (B, K) soft tokens after each ATP layer
    assert (kept[:, 1:] <= kept[:, :-1] + 1e-3).all(), "cumulative masks: a token pruned early stays pruned"
    per_layer = torch.stack([torch.full((3,), 576.0), kept[:, 0], kept[:, 0], kept[:, 1], kept[:, 2], kept[:, 2]], 1)
    assert torch.allclose(st["tokens_per_layer"], per_layer)
    assert torch.allclose(st["n_bar"], per_layer.mean(1))
    assert torch.allclose(st["loss_atp"], (kept / 576 * torch.tensor([1.0, 3.0, 4.0])).sum(1).mean())
    assert torch.allclose(st["loss_target"], (per_layer.mean() - 200.0).abs())
    # Eq. 15 summed over the layers with the tokens each saw; KV cache 2 * L * Hkv * D * 4 bytes
    seen = torch.tensor([600.0, 590.0, 596.0])[:, None] - 576 + per_layer.double()
    flops = lambda n: 4 * n * 64 ** 2 + 2 * n ** 2 * 64 + 2 * n * 64 * 128  # noqa: E731
    assert torch.allclose(st["flops"], flops(seen).sum(1))
    assert torch.allclose(st["flops_full"], flops(torch.tensor([600.0, 590.0, 596.0]).double()) * 6)
    assert torch.allclose(st["kv_cache_bytes"], seen.sum(1) * 2 * 2 * 16 * 4)
    assert (st["flops"] < st["flops_full"]).all()


def test_score_grad_trains_the_score_layers_queries_and_keys_and_nothing_else_changes(batch3):
    """ATPConfig.score_grad: the same forward and an extra gradient exactly where the scores come
    from. Score layers 0, 1, 2 (ATP layers 1, 2, 3): their queries and keys, what feeds them,
    and the threshold MLP of ATP layer 1, whose mask shapes what layer 2's scores read. Nothing
    after them: the last layer, the lm head, layer 2's values, output and MLP, the thresholds of
    ATP layers 2 and 3 (the MLPs see the scores detached either way)."""
    def run(score_grad):
        torch.manual_seed(0)
        model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=150, train_lm=True,
                                                   score_grad=score_grad)).train()
        out = model(**batch3, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = run(False)
    loss1, g1 = run(True)
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    same = [n for n in g0 if n.startswith(("atp.mlps.2.", "atp.mlps.3.", "lm_head.", "model.language_model.layers.3.",
                                           "model.language_model.norm."))]
    same += [f"model.language_model.layers.2.{m}.weight" for m in ("self_attn.v_proj", "self_attn.o_proj",
                                                                   "mlp.down_proj")]
    assert len(same) > 20
    for n in same:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")
    changed = [f"model.language_model.layers.{layer}.self_attn.{proj}.weight" for layer in (0, 1, 2)
               for proj in ("q_proj", "k_proj")] + ["atp.mlps.1.head_r.weight"]
    for n in changed:
        assert not torch.allclose(g1[n], g0[n], rtol=1e-3, atol=1e-6), f"{n}: no gradient from the scores"


@pytest.mark.parametrize("train_lm,score_grad", [(False, False), (True, False), (True, True)])
def test_gradient_checkpointing_gives_the_same_gradients(batch3, train_lm, score_grad, monkeypatch):
    import atp_llava.core.attention

    calls = []
    attention = atp_llava.core.attention.atp_ops.atp_attention

    def counting_attention(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    monkeypatch.setattr(atp_llava.core.attention.atp_ops, "atp_attention", counting_attention)

    def run(ckpt):
        model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=100, train_lm=train_lm,
                                                   score_grad=score_grad))
        if ckpt:
            model.activation_checkpointing_enable()  # transformers' default: non-reentrant
        model.train()
        calls.clear()
        out = model(**batch3, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss0, g0 = run(False)
    assert len(calls) == 4
    loss1, g1 = run(True)
    assert len(calls) == 8, "the backward pass did not replay the checkpointed layers"
    assert torch.allclose(loss0, loss1, atol=1e-6)
    assert g0.keys() == g1.keys() and any(k.startswith("atp.") for k in g0)
    assert any(k.startswith("model.language_model.") for k in g0) == train_lm
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-4, atol=1e-6), k
    reentrant = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), train_lm=train_lm))
    reentrant.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="reentrant"):
        reentrant.train()(**batch3, use_cache=False)


# ----------------------------------------------------------------------------------------------
# training dynamics


@pytest.mark.parametrize("init_threshold,target", [(0.05, 300.0), (0.95, 450.0)])
def test_30_steps_move_n_bar_toward_target(init_threshold, target):
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=target,
                                               init_threshold=init_threshold, lambda_atp=0.0)).train()
    data = SyntheticDataset(12, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=1)
    opt = torch.optim.AdamW(atp_params(model).values(), lr=1e-2)
    n_bars = []
    for step in range(30):
        batch = collate([data[(2 * step + j) % len(data)] for j in range(2)])
        out = model(**batch, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        n_bars.append(float(out.atp_stats["n_bar_batch"]))
    start, end = n_bars[0], sum(n_bars[-3:]) / 3
    print(f"N_bar {start:.1f} -> {end:.1f}, target {target}")
    assert abs(end - target) < abs(start - target) - 50, (start, end, target)
    assert (end - start) * (target - start) > 0, "N_bar moved away from the target"


def test_fixed_ratio_mode_masks_exact_top_k(batch3):
    keep = (300, 150, 40)
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), mode="fixed", fixed_keep=keep, train_lm=True))
    assert not atp_params(model)
    model.train()
    out = model(**batch3)
    assert torch.equal(out.atp_stats["tokens"], torch.tensor([keep] * 3, dtype=torch.float32))
    assert "theta_r" not in out.atp_stats
    assert torch.allclose(out.loss.detach(), out.atp_stats["loss_ntp"])  # no budget terms to learn
    out.loss.backward()
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    # the same scores decide: fixed mode keeps the top-k of the redundant score among kept tokens
    ranked = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    kept = torch.tensor([True, True, True, False, True])
    from atp_llava.core.step import top_k
    keep = top_k(ranked[None], kept[None], 2)
    assert keep[0].tolist() == [False, True, True, False, False]


def test_eval_uses_hard_masks(batch3):
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), init_threshold=0.5)).eval()
    with torch.no_grad():
        st = model(**batch3).atp_stats
    assert st["hard"] and torch.equal(st["tokens"], st["tokens"].round()) and (st["tokens"] < 576).all()


# ----------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(tmp_path, batch3):
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=200, mlp_width=32)).train()
    train_atp(model, batch3)
    path = tmp_path / "atp.safetensors"
    save_atp(model, path)
    assert read_atp_config(path) == model.atp.config
    fresh = load_atp(tiny_llava(4), path)  # stock model + config and weights from the file
    for (n, p), (n2, p2) in zip(model.atp.state_dict().items(), fresh.atp.state_dict().items()):
        assert n == n2 and torch.equal(p, p2)
    other = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), target_tokens=200, mlp_width=32))
    model.eval(), fresh.eval(), other.eval()
    with torch.no_grad():
        a, b, c = model(**batch3), fresh(**batch3), other(**batch3)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.atp_stats["tokens"], b.atp_stats["tokens"])
    assert not torch.equal(a.atp_stats["theta_r"], c.atp_stats["theta_r"])  # weights, not init, decide
    with pytest.raises(ValueError, match="atp_llava weights"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        read_atp_config(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------------------------
# DDP


def _ddp_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=100)).train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(atp_params(model).values(), lr=1e-2)
    data = SyntheticDataset(8, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=10 + rank)  # rank-local data
    for step in range(2):
        out = ddp(**collate([data[step]]), use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.save({"state": {k: v.detach() for k, v in model.atp.state_dict().items()},
                "n_bar": float(out.atp_stats["n_bar_batch"])}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_keep_atp_parameters_in_sync(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    init = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=100)).atp.state_dict()
    assert r0["n_bar"] != r1["n_bar"], "ranks saw the same data: the sync check would be vacuous"
    for k in init:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs across ranks"
    assert any(not torch.equal(r0["state"][k], init[k]) for k in init), "the ATP parameters did not train"


@contextlib.contextmanager
def one_process_group(tmp_path):
    """A gloo process group of this process alone (world size 1), for the wrappers' own code."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def text_only_batch(b=2, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_fsdp2_sharded_layers_and_atp_unit_train_like_the_unsharded_model(tmp_path, batch3):
    """fully_shard on every decoder layer, on model.atp and on the root: every ATP layer runs
    (the state reaches them through an opaque handle FSDP2 does not copy), the threshold MLPs
    run as model.atp's forward (their parameters gathered), and two AdamW steps give the
    unsharded model's parameters to float32 rounding (one rank: the shards are whole). Then
    generate() and eval with real pruning under FSDP2, save_atp from the shards, load_atp into a
    plain model: identical tokens and logits."""
    from torch.distributed.fsdp import fully_shard

    cfg = ATPConfig(layers=(1, 2, 3), target_tokens=100)
    ref = apply_atp(tiny_llava(4, seed=0), cfg).train()
    model = copy.deepcopy(ref)
    batches = [batch3, make_batch([600, 595], ["left", "right"], seed=1)]
    opt_ref = torch.optim.AdamW(atp_params(ref).values(), lr=1e-2)
    for b in batches:
        opt_ref.zero_grad()
        ref(**b, use_cache=False).loss.backward()
        opt_ref.step()
    with one_process_group(tmp_path):
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model.atp)
        fully_shard(model)
        opt = torch.optim.AdamW(atp_params(model).values(), lr=1e-2)
        for b in batches:
            opt.zero_grad()
            out = model(**b, use_cache=False)
            out.loss.backward()
            opt.step()
        assert out.atp_stats["theta_r"].shape == (2, 3)  # every ATP layer ran
        got = {n: p.full_tensor().detach() for n, p in atp_params(model).items()}
        model.eval()
        prompts = {k: v for k, v in make_batch([600, 590], ["left", "left"], seed=2).items() if k != "labels"}
        with torch.no_grad():
            gen_sharded = model.generate(**prompts, max_new_tokens=3, do_sample=False)  # gathers the root
            sharded = model(**batch3)  # real pruning, under FSDP2
        save_atp(model, tmp_path / "fsdp2.safetensors")
    for n, p in atp_params(ref).items():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    # saved from the shards, loaded into a plain model: the same weights and logits
    fresh = load_atp(tiny_llava(4, seed=0), tmp_path / "fsdp2.safetensors").eval()
    for n, p in atp_params(fresh).items():
        assert torch.equal(p, got[n]), n
    with torch.no_grad():
        plain = fresh(**batch3)
        gen_plain = fresh.generate(**prompts, max_new_tokens=3, do_sample=False)
    assert torch.equal(plain.logits, sharded.logits)
    assert torch.equal(gen_plain, gen_sharded)
    assert torch.equal(plain.atp_stats["tokens"], sharded.atp_stats["tokens"])


def test_a_batch_without_images_runs_every_threshold_mlp(tmp_path, batch3):
    """DDP without find_unused_parameters needs a gradient for every parameter in every step:
    a text-only batch runs each ATP layer's MLP on a zero input with weight 0 in the loss, inside
    model.atp's forward (no parameter is read outside a forward)."""
    from torch.nn.parallel import DistributedDataParallel

    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=100)).train()
    reads = []
    handle = model.atp.register_forward_pre_hook(lambda m, a: reads.append(a[0]))
    with one_process_group(tmp_path):
        ddp = DistributedDataParallel(model)
        for b in (text_only_batch(), batch3, text_only_batch(seed=1)):  # a missing gradient fails the next step
            model.zero_grad()
            out = ddp(**b, use_cache=False)
            out.loss.backward()
            assert all(p.grad is not None for p in atp_params(model).values())
    handle.remove()
    assert reads == [1, 2, 3] * 3
    assert all(torch.count_nonzero(p.grad) == 0 for p in atp_params(model).values())  # the last: text only


def test_atp_stats_and_losses_are_output_fields_that_survive_ddp(tmp_path, batch3):
    """DDP with find_unused_parameters rebuilds the ModelOutput from its fields (torch pytree):
    atp_stats and atp_losses must be fields, not attributes set on the output."""
    import dataclasses

    from torch.nn.parallel import DistributedDataParallel

    # the fixed-weight budget: the two forwards compared see the same weight
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=100,
                                                       budget_control="penalty")).train()
    plain = model(**batch3, use_cache=False)
    names = {f.name for f in dataclasses.fields(plain)}
    assert {"atp_stats", "atp_losses"} <= names and "atp_stats" in plain.keys()
    with one_process_group(tmp_path):
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        out = ddp(**batch3, use_cache=False)
        assert type(out) is type(plain)
        assert out.atp_stats is not None and out.atp_losses is not None, "the rebuilt output lost the ATP fields"
        assert torch.equal(out.atp_stats["tokens"], plain.atp_stats["tokens"])
        assert torch.equal(out.loss, plain.loss) and out.atp_losses["loss_atp"].requires_grad
        out.loss.backward()  # through DDP's rebuilt output


# ----------------------------------------------------------------------------------------------
# data and the entry point


def test_records_dataset_with_a_tokenizer(tmp_path):
    np = pytest.importorskip("numpy")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "dog"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    np.save(tmp_path / "a.npy", (np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    torch.save(torch.rand(3, 64, 64), tmp_path / "b.pt")
    records = [{"image": "a.npy", "prompt": "what is this", "answer": "a cat"},
               {"image": ["a.npy", "b.pt"], "prompt": "what is this", "answer": "a dog"}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = RecordsDataset(tmp_path / "data.json", tokenizer, TINY_IMAGE_TOKEN, N_GRID, 48)
    ex0, ex1 = ds[0], ds[1]
    assert ex0["pixel_values"].shape == (1, 3, 48, 48) and ex1["pixel_values"].shape == (2, 3, 48, 48)
    assert ex0["input_ids"][:2] == [1, 4] and ex0["input_ids"].count(TINY_IMAGE_TOKEN) == N_GRID
    assert ex1["input_ids"].count(TINY_IMAGE_TOKEN) == 2 * N_GRID
    answer = [t for t, l in zip(ex0["input_ids"], ex0["labels"]) if l != -100]
    assert answer == [9, 10, 2]  # "a cat" </s>
    batch = collate([ex0, ex1], padding_side="left")
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3))).train()
    out = model(**batch)
    assert out.atp_stats["images_per_sample"].tolist() == [1, 2] and torch.isfinite(out.loss)


@pytest.mark.parametrize("nproc", [1, 2])
def test_train_entry_point_end_to_end(tmp_path, nproc):
    """python -m atp_llava.train on the tiny model: logs, progress, saved weights; nproc=2 runs
    DDP (gloo) through the entry point's own spawn."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "atp_llava.train", "--tiny", "--synthetic", "8", "--layers", "1,2,3",
           "--target-tokens", "300", "--batch-size", "2", "--max-steps", "2", "--lr-atp", "1e-2",
           "--padding-side", "left", "--grad-ckpt", "--device", "cpu", "--nproc", str(nproc),
           "--log-json", str(tmp_path / "log.jsonl"), "--log-csv", str(tmp_path / "log.csv"),
           "--save-atp", str(tmp_path / "atp.safetensors")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "atp-llava" in res.stderr  # tqdm progress
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "loss_ntp", "loss_atp", "loss_target", "n_bar", "tokens_l1", "theta_r_l3", "flops_ratio"):
        assert all(key in r for r in rows), key
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert "n_bar" in header and "tokens_l2" in header
    assert read_atp_config(tmp_path / "atp.safetensors").layers == (1, 2, 3)


def test_apply_atp_rejects_bad_configs():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        apply_atp(tiny_llava(4), ATPConfig(layers=(1, 4)))
    with pytest.raises(ValueError, match="l >= 1"):
        ATPConfig(layers=(0, 2))
    with pytest.raises(ValueError, match="fixed_keep"):
        ATPConfig(layers=(1, 2), mode="fixed", train_lm=True)
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2)))
    with pytest.raises(ValueError, match="already"):
        apply_atp(model, ATPConfig(layers=(1, 2)))
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 4, 64))


class OutsideForwardAccess(torch.overrides.TorchFunctionMode):
    """Fails on any torch function that receives one of ``module``'s parameters while the module's
    forward is not running: the rule DeepSpeed ZeRO-3 (parameters gathered only around their
    module's forward) and FSDP2 (units gathered around theirs) impose. Autograd's backward does
    not call torch functions, so it is not seen; the optimizer step runs outside the mode."""

    def __init__(self, module):
        super().__init__()
        self.params = {id(p) for p in module.parameters()}
        self.depth = 0
        self.handles = [module.register_forward_pre_hook(lambda m, a: self._enter()),
                        module.register_forward_hook(lambda m, a, o: self._leave())]

    def _enter(self):
        self.depth += 1

    def _leave(self):
        self.depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(id(x) in self.params for x in flat if isinstance(x, torch.Tensor)):
                raise AssertionError(f"{getattr(func, '__name__', func)} read an ATP parameter outside model.atp's forward")
        return func(*args, **kwargs)

    def remove(self):
        for h in self.handles:
            h.remove()


def test_atp_parameters_are_read_only_inside_their_forward(batch3):
    """Training (image and text-only batches, soft and straight-through budgets), eval with real
    pruning and generate() read model.atp's parameters only inside model.atp's forward."""
    for budget in ("hard", "soft"):
        model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3), target_tokens=200, budget=budget))
        guard = OutsideForwardAccess(model.atp)
        opt = torch.optim.AdamW(atp_params(model).values(), lr=1e-2)
        model.train()
        for b in (batch3, text_only_batch()):
            opt.zero_grad()
            with guard:
                out = model(**b, use_cache=False)
            out.loss.backward()
            opt.step()
        model.eval()
        prompts = {k: v for k, v in make_batch([600, 590], ["left", "left"], seed=2).items() if k != "labels"}
        with guard, torch.no_grad():
            model(**batch3)
            model.generate(**prompts, max_new_tokens=2, do_sample=False)
        # the guard itself: the pattern this rule forbids is caught
        with pytest.raises(AssertionError, match="outside model.atp's forward"), guard:
            sum(p.sum() for p in model.atp.parameters())
        guard.remove()
