"""ATP-LLaVA inference with real pruning (atp_llava, model.eval()): pruned tokens leave the
sequence and the KV cache, per sample, in a ragged batch; generate(); the efficiency report;
the FastV and fixed-ratio baselines.

Tiny random LLaVA (tiny_llava) in float64, so that the pruning decisions of two paths that
compute the same thing in a different order cannot differ by rounding.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

from atp_llava import ATPConfig, apply_atp, get_atp_controller  # noqa: E402
from atp_llava.core import flash  # noqa: E402
from atp_llava.core.efficiency import layer_flops  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, tiny_llava  # noqa: E402

from test_llava_training import KEEP_ALL, N_GRID, make_batch  # noqa: E402

THETA = (0.5, 0.5)  # prunes a different number of tokens in every sample of the batches below
NEW = 20


def f64(batch):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def stock():
    return tiny_llava(4).double().eval()


@pytest.fixture(scope="module")
def mixed():
    """Mixed left/right padding with labels: the training-style batch."""
    return f64(make_batch([600, 590, 596], ["right", "left", "right"]))


@pytest.fixture(scope="module")
def prompts():
    """Left-padded prompts (no answers) for generate()."""
    b = f64(make_batch([600, 590, 596], ["left", "left", "left"], seed=1))
    b.pop("labels")
    return b


def atp(stock, **kw):
    kw.setdefault("layers", (1, 2, 3))
    kw.setdefault("theta_override", THETA)
    return apply_atp(copy.deepcopy(stock), ATPConfig(**kw)).eval()


def survivors(batch, stats):
    """(B, L) bool: text tokens and the vision tokens kept through every ATP layer."""
    keep = batch["attention_mask"].bool() & (batch["input_ids"] != TINY_IMAGE_TOKEN)
    last = stats["keep_codes"][-1] > 0
    for i, b in enumerate(stats["image_sample"].tolist()):
        pos = (batch["input_ids"][b] == TINY_IMAGE_TOKEN).nonzero().squeeze(1)
        slot = int((stats["image_sample"][:i] == b).sum())
        keep[b, pos[slot * N_GRID:(slot + 1) * N_GRID]] = last[i]
    return keep


def layer_lengths(model):
    """Record the sequence length every decoder layer runs on."""
    seen = []
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].shape[1])))
    return seen


# ----------------------------------------------------------------------------------------------
# the pruned forward


def pruned_and_masked(model, batch):
    """The eval forward of `batch` with real pruning, then on the training path (hard masks, every
    token kept in place): both outputs, after checking that each took its path and that both kept
    the same token counts."""
    with torch.no_grad():
        pruned = model(**batch)
        model.atp.config.prune_in_eval = False
        masked = model(**batch)
    assert pruned.atp_stats["pruned"] and not masked.atp_stats["pruned"]
    assert torch.equal(pruned.atp_stats["tokens"], masked.atp_stats["tokens"])
    return pruned, masked


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["adaptive", "fixed", "fastv"])
def test_training_path_with_hard_masks_equals_real_pruning(mixed, decoder, mode):
    kw = {"adaptive": {}, "fixed": {"fixed_keep": (300, 200, 90)},
          "fastv": {"layers": (2,), "fixed_keep": (150,)}}[mode]
    model = atp(tiny_llava(4, decoder=decoder).double(), mode=mode, **kw)
    lengths = layer_lengths(model)
    pruned, masked = pruned_and_masked(model, mixed)
    for a, b in zip(pruned.atp_stats["keep_codes"], masked.atp_stats["keep_codes"]):
        assert torch.equal(a, b)
    keep = survivors(mixed, pruned.atp_stats)
    assert pruned.logits.shape == masked.logits.shape
    err = (pruned.logits - masked.logits)[keep].abs().max().item()
    assert err < 1e-10, err
    # the later layers really ran on fewer tokens: the longest sample's text plus its kept tokens
    first = model.atp.config.layers[0]
    n_text = (mixed["attention_mask"].bool() & (mixed["input_ids"] != TINY_IMAGE_TOKEN)).sum(1)
    for layer, length in lengths[:4]:
        if layer < first:
            assert length == mixed["input_ids"].shape[1]
        else:
            k = max(i for i, l in enumerate(model.atp.config.layers) if l <= layer)
            assert length == int((n_text + pruned.atp_stats["tokens"][:, k]).max())
    if mode != "adaptive":
        assert torch.equal(pruned.atp_stats["tokens"][:, -1], torch.full((3,), float(kw["fixed_keep"][-1])))


def test_ragged_batch_equals_each_sample_alone(stock):
    batch = f64(make_batch([600, 590, 596], ["right", "right", "right"], seed=2))
    model = atp(stock)
    with torch.no_grad():
        out = model(**batch)
        tokens = out.atp_stats["tokens"]
        assert len({tuple(t) for t in tokens.tolist()}) == 3, "the samples should keep different counts"
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            alone = model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n],
                          pixel_values=batch["pixel_values"][i:i + 1])
            assert torch.equal(alone.atp_stats["tokens"][0], tokens[i])
            keep = survivors({"input_ids": batch["input_ids"][i:i + 1, :n],
                              "attention_mask": batch["attention_mask"][i:i + 1, :n]}, alone.atp_stats)[0]
            err = (alone.logits[0] - out.logits[i, :n])[keep].abs().max().item()
            assert err < 1e-10, (i, err)


def test_ragged_generate_equals_each_sample_alone(stock, prompts):
    model = atp(stock)
    with torch.no_grad():
        g = model.generate(**prompts, max_new_tokens=8, do_sample=False)
        for i in range(3):
            v = prompts["attention_mask"][i].bool()
            gi = model.generate(input_ids=prompts["input_ids"][i:i + 1, v], pixel_values=prompts["pixel_values"][i:i + 1],
                                max_new_tokens=8, do_sample=False)
            assert torch.equal(g[i, -8:], gi[0, -8:])


# ----------------------------------------------------------------------------------------------
# generate() and the pruned KV cache


def test_kv_cache_holds_only_what_each_layer_saw(stock, prompts):
    model = atp(stock)
    with torch.no_grad():
        out = model(**prompts, use_cache=True)
    cache = out.cache
    st = out.atp_stats
    n_text = (prompts["attention_mask"].bool() & (prompts["input_ids"] != TINY_IMAGE_TOKEN)).sum(1)
    state = get_atp_controller(model)._caches[cache]
    for j, layer in enumerate(cache.layers):
        if j < 1:
            assert layer.keys.shape[2] == prompts["input_ids"].shape[1]
            continue
        valid = torch.isfinite(state.bias[j]).sum(1)  # per sample: text + kept vision tokens
        assert torch.equal(valid, n_text + st["tokens"][:, j - 1].long())
        assert layer.keys.shape[2] == int(valid.max())  # padded to the longest sample, no more
    # the report's KV bytes are the entries the cache really holds for each sample
    per_entry = 2 * 2 * 16 * 8  # K and V, 2 KV heads, head dim 16, float64
    real = prompts["attention_mask"].sum(1)
    counted = real * per_entry + sum(torch.isfinite(state.bias[j]).sum(1) * per_entry for j in range(1, 4))
    assert torch.equal(model.atp_report.kv_cache_bytes, counted.double())


@pytest.mark.parametrize("rope_2d", [False, True])
def test_generate_with_pruned_cache_equals_recomputing_the_prefix(stock, prompts, rope_2d):
    model = atp(stock, rope_2d=rope_2d)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        cached = model.generate(**prompts, **kw)
        assert model.atp_report.generated == NEW
        recomputed = model.generate(**prompts, use_cache=False, **kw)
        model.atp.config.prune_in_eval = False  # the training path, tokens masked in place
        masked = model.generate(**prompts, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.sequences, masked.sequences)
    for a, b, c in zip(cached.logits, recomputed.logits, masked.logits):
        assert (a - b).abs().max() < 1e-10 and (a - c).abs().max() < 1e-10


def test_sampling_with_pruned_cache_equals_recomputing_the_prefix(stock, prompts):
    model = atp(stock)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=0, temperature=1.5)
    with torch.no_grad():
        torch.manual_seed(7)
        cached = model.generate(**prompts, **kw)
        torch.manual_seed(7)
        recomputed = model.generate(**prompts, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, -NEW:].flatten().tolist())) > 10


@pytest.mark.parametrize("do_sample", [False, True])
def test_keep_all_generate_equals_stock(stock, prompts, do_sample):
    model = atp(stock, theta_override=KEEP_ALL)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=do_sample)
    with torch.no_grad():
        torch.manual_seed(3)
        ref = stock.generate(**prompts, **kw)
        torch.manual_seed(3)
        out = model.generate(**prompts, **kw)
    assert torch.equal(ref, out)
    assert torch.equal(model.atp_report.n_bar, torch.full((3,), float(N_GRID), dtype=torch.float64))


def test_streaming_output_unchanged(stock, prompts):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).clone())

        def end(self):
            self.ended = True

    model = atp(stock)
    one = {k: v[1:2] for k, v in prompts.items()}
    v = one["attention_mask"][0].bool()
    one = {"input_ids": one["input_ids"][:, v], "pixel_values": one["pixel_values"]}
    streamer = Collect()
    with torch.no_grad():
        out = model.generate(**one, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, streamer=streamer)
        plain = model.generate(**one, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert streamer.ended and torch.equal(out, plain)
    assert torch.equal(torch.cat(streamer.chunks), out[0])  # the prompt first, then one token a step


def test_decoding_refuses_what_it_cannot_follow(stock, prompts, mixed):
    model = atp(stock)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="num_beams"):
            model.generate(**prompts, max_new_tokens=2, num_beams=2)
        model.atp.config.prune_in_eval = False
        out = model(**prompts, use_cache=True)
        nxt = torch.full((3, 1), 5)
        mask = torch.cat([prompts["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
        with pytest.raises(NotImplementedError, match="not filled by a pruned prefill"):
            model(input_ids=nxt, attention_mask=mask, cache=out.cache)
        model.atp.config.prune_in_eval = True
        out = model(**prompts, use_cache=True)
        with pytest.raises(RuntimeError, match="3 samples against a cache pruned for 3|samples against"):
            model(input_ids=nxt[:2], attention_mask=mask[:2], cache=out.cache)
        with pytest.raises(NotImplementedError, match="image tokens after the prefill"):
            model(input_ids=torch.full((3, 1), TINY_IMAGE_TOKEN), attention_mask=mask, cache=out.cache)
        from transformers import StaticCache

        static = StaticCache(config=model.config.text_config, max_cache_len=700)
        with pytest.raises(TypeError, match="DynamicCache"):
            model(**prompts, cache=static)


# ----------------------------------------------------------------------------------------------
# flash-attn as the decode kernel (flash.py)


def fake_flash_attn(calls):
    """A stand-in ``flash_attn`` module: its ``flash_attn_with_kvcache`` computes in plain PyTorch
    what flash-attn documents for a dense cache. q (B, Lq, Hq, D), caches (B, L, Hkv, D); row b
    attends to the slots [cache_leftpad[b], cache_seqlens[b]), causal aligned to the last one.
    It records each call's cache_leftpad."""

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                return_softmax_lse=False):
        assert k is None and v is None and block_table is None and cache_batch_idx is None
        assert cache_leftpad.dtype == cache_seqlens.dtype == torch.int32
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        calls.append(cache_leftpad.clone())
        b, lq, hq, _ = q.shape
        out = torch.empty_like(q)
        for i in range(b):
            lo, hi = int(cache_leftpad[i]), int(cache_seqlens[i])
            ki = k_cache[i, lo:hi].transpose(0, 1).repeat_interleave(hq // k_cache.shape[2], 0)
            vi = v_cache[i, lo:hi].transpose(0, 1).repeat_interleave(hq // v_cache.shape[2], 0)
            s = q[i].transpose(0, 1) @ ki.transpose(1, 2) * softmax_scale
            if causal:
                seen = torch.arange(hi - lo)[None, :] <= torch.arange(lq)[:, None] + (hi - lo - lq)
                s = s.masked_fill(~seen, float("-inf"))
            out[i] = (s.softmax(-1) @ vi).transpose(0, 1)
        return out

    module = types.ModuleType("flash_attn")
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


@pytest.fixture
def flash_stand_in(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    # the stand-in runs where the tests run: on the CPU in float64
    monkeypatch.setattr(flash, "unusable", lambda device, dtype, head_dim: None)
    return calls


@pytest.mark.parametrize("padding", ["left", "right"])
def test_flash_decode_equals_atp_attention_decode(stock, flash_stand_in, padding):
    batch = prompts_with(padding)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    with torch.no_grad():
        on = atp(stock, flash_decode=True).generate(**batch, **kw)
        calls = list(flash_stand_in)
        off = atp(stock, flash_decode=False).generate(**batch, **kw)
    assert len(flash_stand_in) == len(calls)  # flash_decode=False never calls it
    assert torch.equal(on.sequences, off.sequences)
    for a, b in zip(on.logits, off.logits):
        assert (a - b).abs().max() < 1e-10
    # Every decoding step (none of the prefill) in every layer; with right padding the prompt's
    # layer (before the first ATP layer) has valid slots that are not one run at the end: it
    # stays on atp_attention, the pruned layers (padding dropped) run on flash-attn.
    layers = 4 if padding == "left" else 3
    assert len(calls) == (NEW - 1) * layers
    starts = {tuple(c.tolist()) for c in calls[:layers]}
    assert len(starts) == layers  # each layer's rows start where that layer's pruning left them


def test_flash_decode_gives_way_to_atp_attention_for_a_masked_new_token(stock, prompts, flash_stand_in):
    """A decoding step whose new token is masked in one sample leaves a hole in the pruned
    layers' caches, which cache_leftpad cannot express: that cache decodes on atp_attention from
    then on, with the same logits as a model that never used flash-attn."""
    on, off = atp(stock, flash_decode=True), atp(stock, flash_decode=False)
    nxt = torch.full((3, 1), 5)
    mask = prompts["attention_mask"]
    logits = []
    with torch.no_grad():
        for model in (on, off):
            cache = model(**prompts, use_cache=True).cache
            steps = []
            for new in ([1, 1, 1], [0, 1, 1], [1, 1, 1]):  # step 2: sample 0's token is masked
                m = torch.cat([mask, torch.tensor(new)[:, None]], 1)
                steps.append(model(input_ids=nxt, attention_mask=m, cache=cache).logits[:, -1])
                mask = m
            mask = prompts["attention_mask"]
            logits.append(steps)
            if model is on:
                assert get_atp_controller(on)._caches[cache].flash is None
    assert len(flash_stand_in) == 4  # step 1 only, every layer
    for a, b in zip(*logits):
        assert (a - b).abs().max() < 1e-10


def prompts_with(padding):
    b = f64(make_batch([600, 590, 596], [padding] * 3, seed=1))
    b.pop("labels")
    return b


def test_flash_decode_is_chosen_only_where_it_applies(stock, prompts, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    with torch.no_grad():
        atp(stock).generate(**prompts, max_new_tokens=3)  # auto: the CPU float64 model keeps atp_attention
        assert calls == []
        with pytest.raises(RuntimeError, match="flash_decode=True, but flash-attn runs on CUDA"):
            atp(stock, flash_decode=True).generate(**prompts, max_new_tokens=3)
        monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
        with pytest.raises(RuntimeError, match="flash-attn 2.6 or newer is not installed"):
            atp(stock, flash_decode=True).generate(**prompts, max_new_tokens=3)
    assert flash.unusable(torch.device("cuda"), torch.bfloat16, 128) is None
    assert "float16/bfloat16" in flash.unusable(torch.device("cuda"), torch.float32, 128)
    assert "head dims" in flash.unusable(torch.device("cuda"), torch.float16, 320)


def test_flash_leftpad_accepts_only_one_run_of_valid_slots_at_the_end():
    inf = float("-inf")
    assert flash.leftpad(torch.tensor([[inf, inf, 0.0, 0.0], [0.0] * 4])).tolist() == [2, 0]
    assert flash.leftpad(torch.tensor([[inf, 0.0, inf, 0.0]])) is None  # a hole
    assert flash.leftpad(torch.tensor([[0.0, 0.0, inf, inf]])) is None  # right padding
    assert flash.leftpad(torch.tensor([[inf, -0.5, 0.0, 0.0]])) is None  # a soft mask is not a pad


# ----------------------------------------------------------------------------------------------
# baselines and the report


def test_fastv_keeps_the_image_tokens_the_last_token_attends_to_most(stock, prompts):
    keep, layer = 100, 2
    model = atp(stock, layers=(layer,), mode="fastv", fixed_keep=(keep,))
    eager = copy.deepcopy(stock)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        codes = model(**prompts).atp_stats["keep_codes"][0]
        for b in range(3):
            v = prompts["attention_mask"][b].bool()
            ids = prompts["input_ids"][b:b + 1, v]
            ref = eager(input_ids=ids, pixel_values=prompts["pixel_values"][b:b + 1], output_attentions=True)
            # FastV's score: the last token's attention to each image token at decoder layer
            # ``layer - 1``, averaged over heads (materialised here by the stock eager model)
            score = ref.attentions[layer - 1][0].mean(0)[-1, (ids[0] == TINY_IMAGE_TOKEN).nonzero().squeeze(1)]
            kept = codes[b] > 0
            assert int(kept.sum()) == keep
            # top-k up to float32 rounding of the op's output: every kept token scores at least
            # as high as every dropped one
            assert score[kept].min() >= score[~kept].max() - 1e-7
    assert ATPConfig.matched_fastv_keep(144.0, 2, 32, 576) == int(round((144 * 32 - 2 * 576) / 30))
    with pytest.raises(ValueError, match="cannot be reached"):
        ATPConfig.matched_fastv_keep(10.0, 16, 32, 576)
    with pytest.raises(ValueError, match="one layer"):
        ATPConfig(layers=(1, 2), mode="fastv", fixed_keep=(10, 5))


def test_report_flops_and_kv_bytes_equal_hand_computed_values(stock):
    keep = (300, 100)
    model = atp(stock, layers=(1, 3), mode="fixed", fixed_keep=keep)
    n_text, lead = 24, 4
    ids = torch.randint(3, 100, (1, n_text + N_GRID), generator=torch.Generator().manual_seed(0))
    ids[0, lead:lead + N_GRID] = TINY_IMAGE_TOKEN
    pixels = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        gen = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, return_dict_in_generate=True)
    rep = model.atp_report
    d, m, hkv, hd, el = 64, 128, 2, 16, 8  # tiny_llava: hidden, ffn, KV heads, head dim; float64
    seen = [n_text + N_GRID, n_text + 300, n_text + 300, n_text + 100]
    flops = [4 * l * d * d + 2 * l * l * d + 2 * l * d * m for l in seen]
    full = 4 * (4 * (n_text + N_GRID) * d * d + 2 * (n_text + N_GRID) ** 2 * d + 2 * (n_text + N_GRID) * d * m)
    assert rep.tokens_seen[0].tolist() == seen
    assert rep.flops_per_layer[0].tolist() == flops
    assert rep.flops[0].item() == sum(flops) and rep.flops_full[0].item() == full
    assert rep.flops_full[0].item() - rep.flops[0].item() == sum(  # Eq. 16
        (j1 - j0) * (flops[0] - flops[j0]) for j0, j1 in ((1, 3), (3, 4)))
    kv = [2 * l * hkv * hd * el for l in seen]
    assert rep.kv_cache_bytes_per_layer[0].tolist() == kv
    assert rep.kv_cache_bytes[0].item() == sum(kv)
    assert rep.kv_cache_bytes_final[0].item() == sum(kv) + 4 * 4 * 2 * hkv * hd * el  # the last token is not cached
    cache = gen.past_key_values
    held = sum((layer.keys.numel() + layer.values.numel()) * el for layer in cache.layers)
    assert rep.kv_cache_bytes_final[0].item() == held  # what the cache really holds
    assert rep.generated == 5
    assert rep.n_bar[0].item() == (576 + 300 + 300 + 100) / 4
    assert abs(rep.flops_reduction[0].item() - (1 - sum(flops) / full)) < 1e-15
    assert layer_flops(torch.tensor([seen[1]]), d, m).item() == flops[1]
    assert "Token" in rep.format() and json.loads(json.dumps(rep.to_dict()))["generated"] == 5


def test_report_cli(tmp_path):
    from atp_llava.report import main

    rep = main(["--tiny", "--theta", "0.5", "0.5", "--batch", "2", "--new-tokens", "3",
                "--json", str(tmp_path / "r.json")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["generated"] == 3 and len(data["n_bar"]) == 2 and data["n_bar"] == rep.n_bar.tolist()
    assert all(0 < r < 1 for r in data["flops_reduction"])
    run = subprocess.run([sys.executable, "-m", "atp_llava.report", "--tiny", "--mode", "fastv", "--layers", "2",
                          "--keep", "64"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "TFLOPs" in run.stdout
