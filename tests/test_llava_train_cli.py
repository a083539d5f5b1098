"""The training CLI end to end (python -m atp_llava.train / atp_llava.train.main) and what it is
built from: default ATP layers, --max-steps across epochs, --save-model round trips, the held-out
evaluation, pre-tokenised records, remove_atp, param_groups.

All on the tiny random LLaVA (tiny_llava, 24 x 24 = 576 image tokens), CPU.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from atp_llava import (DEFAULT_LR_ATP, DEFAULT_LR_LM, ATPConfig, apply_atp, load_atp, param_groups,  # noqa: E402
                       read_atp_config, remove_atp, save_atp)
from atp_llava.tools.data import RecordsDataset, SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, tiny_llava  # noqa: E402
from atp_llava.train import ATP_FILE, build_parser, config_from_args, evaluate, main, train  # noqa: E402

N_GRID = 576
BASE = ["--tiny", "--device", "cpu", "--no-progress", "--batch-size", "2", "--target-tokens", "300"]
TARGET = 300.0  # reachable with the tiny model's default layers (ATPConfig's 144 is not quite)


def run(*argv):
    return main([*BASE, *map(str, argv)])


def synthetic_batch(n=3, seed=5, max_images=1):
    ds = SyntheticDataset(n, TINY_IMAGE_TOKEN, N_GRID, 48, 128, max_images=max_images, seed=seed)
    return collate([ds[i] for i in range(n)], padding_side="right")


def eval_loader(n=4, max_images=1, batch_size=2):
    ds = SyntheticDataset(n, TINY_IMAGE_TOKEN, N_GRID, 48, 128, max_images=max_images, seed=3)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate)


def train_rows(rows):
    return [r for r in rows if r["split"] == "train"]


def eval_rows(rows):
    return [r for r in rows if r["split"] == "eval"]


# ----------------------------------------------------------------------------------------------
# defaults


@pytest.mark.parametrize("tiny_layers", [2, 4])
def test_default_layers_follow_the_model_depth(tiny_layers):
    rows = run("--tiny-layers", tiny_layers, "--synthetic", 2, "--max-steps", 1)
    layers = ATPConfig.default_layers(tiny_layers)
    assert layers == ((1,) if tiny_layers == 2 else (1, 2, 3))
    keys = {k for k in rows[0] if k.startswith("tokens_l")}
    assert keys == {f"tokens_l{l}" for l in layers}


def test_cli_defaults_are_atpconfig_and_optim_defaults():
    args = build_parser().parse_args(["--tiny", "--synthetic", "1"])
    assert args.layers is None
    assert config_from_args(args) == ATPConfig()  # every ATPConfig flag defaults to the dataclass field
    for name in ("mlp_inputs", "budget", "min_keep", "target_loss", "target_delta"):
        assert getattr(args, name) == getattr(ATPConfig(), name), name
    assert (args.lr_atp, args.lr_lm) == (DEFAULT_LR_ATP, DEFAULT_LR_LM)
    args = build_parser().parse_args(["--tiny", "--synthetic", "1", "--mlp-inputs", "raw", "--budget", "soft",
                                      "--min-keep", "0", "--target-loss", "l1", "--target-delta", "3"])
    cfg = config_from_args(args)
    got = (cfg.mlp_inputs, cfg.budget, cfg.min_keep, cfg.target_loss, cfg.target_delta)
    assert got == ("raw", "soft", 0, "l1", 3.0)
    # the paper's fixed-weight penalty and plain sigmoid, the budget weight's settings, random mode
    args = build_parser().parse_args(["--tiny", "--synthetic", "1", "--budget-control", "penalty", "--logit-bound",
                                      "none", "--weight-growth", "3", "--budget-window", "5", "--budget-tolerance", "0.01",
                                      "--init-spatial-threshold", "0.9", "--layers", "1,2", "--mode", "random",
                                      "--fixed-keep", "9,3", "--random-seed", "4", "--train-lm"])
    cfg = config_from_args(args)
    got = (cfg.budget_control, cfg.logit_bound, cfg.weight_growth, cfg.budget_window, cfg.budget_tolerance,
           cfg.init_spatial_threshold, cfg.mode, cfg.fixed_keep, cfg.random_seed)
    assert got == ("penalty", None, 3.0, 5, 0.01, 0.9, "random", (9, 3), 4)
    flag = "--no-score-grad" if ATPConfig().score_grad else "--score-grad"  # the other choice
    args = build_parser().parse_args(["--tiny", "--synthetic", "1", "--train-lm", flag])
    assert config_from_args(args).score_grad is not ATPConfig().score_grad


def test_int_list_is_the_one_parser_of_integer_lists(capsys):
    """cli.int_list reads --layers/--keep of the tools, train.py's --layers/--strides/--fixed-keep and
    lmms-eval's model_args lists; "" means the option is not given."""
    import argparse

    from atp_llava.tools.cli import add_model_args, int_list

    for text, want in [("1,2,3", (1, 2, 3)), ("7", (7,)), (" 4, 14 ,24 ", (4, 14, 24)), ("1,2,", (1, 2)),
                       ("[1,2,3]", (1, 2, 3)), ("1:2:3", (1, 2, 3)), ("1 2 3", (1, 2, 3)), ("-5,0", (-5, 0)),
                       (None, None), ("", None), ("  ", None), (",", None), ("[]", None)]:
        assert int_list(text) == want, text
    for bad in ("a", "1,b", "1.5", "1-2"):
        with pytest.raises(ValueError, match="expected integers like 1,2,3"):
            int_list(bad)
    # "" is the default, in train.py's options and in the tools' (a script's --layers "$EMPTY")
    default = config_from_args(build_parser().parse_args(["--tiny", "--synthetic", "1"]))
    args = build_parser().parse_args(["--tiny", "--synthetic", "1", "--layers", "", "--strides", "",
                                      "--fixed-keep", ""])
    assert config_from_args(args) == default
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--tiny", "--layers", "", "--keep", "9,3"])
    assert args.layers is None and args.keep == (9, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tiny", "--layers", "1,x"])
    assert "--layers: invalid int_list value: '1,x'" in capsys.readouterr().err


def test_load_model_is_the_one_loader(tmp_path, capsys):
    """cli.load_model (train.py, report, visualize, lmms-eval): --tiny's options or a checkpoint, in
    the dtype, with ATP from an ATPConfig or a weights file, on the device, in eval mode; model_atp
    turns the tools' options into its ``atp`` and refuses what cannot mean anything."""
    import argparse

    from atp_llava.tools.cli import add_model_args, check_model_args, load_model, model_atp

    model = load_model(tiny=True, tiny_layers=2, tiny_image_size=24, seed=3, dtype="float64",
                       atp=ATPConfig(init_threshold=0.4), device="cpu")
    stock = tiny_llava(2, seed=3, image_size=24)
    assert not model.training and model.atp.grid == (12, 12) and model.atp.config.layers == (1,)
    assert model.atp.config.init_threshold == 0.4
    assert all(p.dtype == torch.float64 for n, p in model.named_parameters() if not n.startswith("atp."))
    assert all(p.device.type == "cpu" for p in model.parameters())
    state = stock.state_dict()
    assert all(torch.equal(v, state[k].double()) for k, v in model.state_dict().items() if not k.startswith("atp."))
    assert not hasattr(load_model(tiny=True, tiny_layers=2), "atp")  # atp=None: the stock model

    stock.save_pretrained(tmp_path / "llava")
    weights = tmp_path / "atp.safetensors"
    save_atp(apply_atp(tiny_llava(2, seed=3, image_size=24), ATPConfig(layers=(1,), init_threshold=0.3)), weights)
    model = load_model(tmp_path / "llava", dtype=torch.float32, atp=weights, device="cpu")
    assert not model.training and model.atp.config == read_atp_config(weights)
    for bad in ({}, {"checkpoint": tmp_path / "llava", "tiny": True}):
        with pytest.raises(ValueError, match="one of the two"):
            load_model(**bad)

    assert model_atp(tiny=True, atp=weights) == weights
    cfg = model_atp(tiny=True)
    assert (cfg.layers, cfg.init_threshold, cfg.mode) == ((1, 2, 3), 0.5, "adaptive")
    cfg = model_atp(tiny=False, layers=(2,), mode="fastv", keep=(64,), seed=7)
    assert (cfg.layers, cfg.fixed_keep, cfg.random_seed) == ((2,), (64,), 7)
    assert model_atp(tiny=False, theta=(0.5, 0.5)).layers == (4, 14, 24)
    with pytest.raises(ValueError, match="needs --atp FILE"):
        model_atp(tiny=False, layers=(1,))
    with pytest.raises(ValueError, match="untrained ATP modules"):
        model_atp(tiny=True, atp=weights, keep=(3,))
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    with pytest.raises(SystemExit):  # what ATPConfig refuses is a usage error of the tools too
        check_model_args(parser.parse_args(["--tiny", "--mode", "fixed", "--layers", "1,2", "--keep", "9"]), parser)
    assert "fixed_keep must give one kept-token count per ATP layer" in capsys.readouterr().err


def test_help_documents_max_steps_and_epochs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line breaks inside the phrases
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "overrides --epochs" in text and "ignored when --max-steps is given" in text
    for flag in ("--save-model", "--eval-synthetic", "--eval-data", "--eval-every", "--tokenizer", "--mlp-inputs",
                 "--budget", "--min-keep", "--target-loss", "--target-delta"):
        assert flag in text, flag


def test_bad_argument_combinations_are_refused(capsys):
    for argv in (["--synthetic", "2", "--eval-every", "2"], ["--synthetic", "2", "--max-steps", "0"],
                 ["--synthetic", "2", "--mode", "fixed", "--train-lm"],
                 ["--synthetic", "2", "--mode", "fixed", "--layers", "1", "--fixed-keep", "9"]):
        with pytest.raises(SystemExit):
            run(*argv)
    err = capsys.readouterr().err
    assert "--eval-every needs an eval set" in err and "needs --layers" in err and "add --train-lm" in err
    for argv in (["--synthetic", "2", "--grad-accum", "2"], ["--synthetic", "2", "--fsdp"],
                 ["--synthetic", "2", "--fsdp", "--nproc", "2", "--engine", "trainer"]):
        with pytest.raises(SystemExit):
            run(*argv)
    err = capsys.readouterr().err
    assert "--grad-accum needs --engine trainer" in err and "--fsdp shards over several processes" in err
    assert "--fsdp runs with --engine own" in err


# ----------------------------------------------------------------------------------------------
# steps and epochs


def test_max_steps_runs_as_many_epochs_as_needed():
    rows = run("--synthetic", 2, "--batch-size", 1, "--max-steps", 5)  # 2 batches per epoch
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1, 2]
    rows = run("--synthetic", 2, "--batch-size", 1, "--epochs", 2)  # without --max-steps: epochs x batches
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]


def test_step_log_has_soft_and_hard_counts(tmp_path):
    rows = run("--synthetic", 2, "--max-steps", 1, "--log-csv", tmp_path / "log.csv")
    rec = rows[0]
    header = (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    assert "lr_atp" in rec and rec["lr_atp"] == DEFAULT_LR_ATP
    for layer in (1, 2, 3):
        assert f"tokens_l{layer}" in rec and f"tokens_l{layer}" in header
    assert rec["budget_weight"] == pytest.approx(ATPConfig().lambda_target) and "budget_weight" in header
    # Keys the ATP step hands over when it has them (atp_stats tokens_soft / tokens_hard / n_bar_hard).
    model = apply_atp(tiny_llava(4), ATPConfig(target_tokens=TARGET)).train()
    stats = model(**synthetic_batch(2), use_cache=False).atp_stats
    for key, name in (("tokens_soft", "tokens_soft_l1"), ("tokens_hard", "tokens_hard_l1"),
                      ("n_bar_hard", "n_bar_hard")):
        assert (key in stats) == (name in rec), key


# ----------------------------------------------------------------------------------------------
# --save-model


@pytest.mark.parametrize("train_lm", [False, True])
def test_save_model_round_trip_gives_identical_logits(tmp_path, train_lm):
    from transformers import LlavaForConditionalGeneration

    out = tmp_path / "model"
    argv = [*BASE, "--synthetic", "4", "--max-steps", "2", "--lr-atp", "1e-2", "--lr-lm", "1e-3",
            "--save-model", str(out)] + (["--train-lm"] if train_lm else [])
    args = build_parser().parse_args(argv)
    _, model = train(args, return_model=True)
    assert (out / ATP_FILE).exists() and read_atp_config(out / ATP_FILE).train_lm == train_lm
    assert "atp" not in (out / "config.json").read_text()
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.config.text_config._attn_implementation == "sdpa"
    # The stock LM as saved: trained with --train-lm, untouched without.
    fresh = tiny_llava(4, seed=0).state_dict()
    lm_changed = any(not torch.equal(v, fresh[k]) for k, v in reloaded.state_dict().items())
    assert lm_changed == train_lm
    load_atp(reloaded, out / ATP_FILE)
    batch = synthetic_batch(3)
    with torch.no_grad():
        want = model.eval()(**batch, use_cache=False)
        got = reloaded.eval()(**batch, use_cache=False)
    assert torch.equal(want.logits, got.logits)
    assert torch.equal(want.atp_stats["tokens"], got.atp_stats["tokens"])


# ----------------------------------------------------------------------------------------------
# evaluation


def test_eval_records_and_summary(tmp_path, capsys):
    rows = run("--synthetic", 4, "--max-steps", 3, "--eval-synthetic", 5, "--eval-every", 2,
               "--log-json", tmp_path / "log.jsonl")
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == rows
    evals = eval_rows(rows)
    assert [r["step"] for r in evals] == [2, 3]  # every 2 steps, and at the end
    assert [r["step"] for r in train_rows(rows)] == [1, 2, 3]
    rec = evals[-1]
    assert rec["samples"] == 5 and rec["images"] == 5 and 0.0 <= rec["accuracy"] <= 1.0
    assert rec["hard"] and rec["pruned"] and rec["target_tokens"] == TARGET
    assert rec["n_bar_minus_target"] == pytest.approx(rec["n_bar"] - rec["target_tokens"])
    for layer in (1, 2, 3):
        for stat in ("mean", "std", "min", "max"):
            assert f"tokens_l{layer}_{stat}" in rec
        for key in ("theta_r", "theta_s"):
            assert rec[f"{key}_l{layer}_min"] <= rec[f"{key}_l{layer}_mean"] <= rec[f"{key}_l{layer}_max"]
        assert 0 <= rec[f"tokens_l{layer}_min"] <= rec[f"tokens_l{layer}_mean"] <= rec[f"tokens_l{layer}_max"] <= N_GRID
    out = capsys.readouterr().out
    assert "eval @ step 3: accuracy" in out and "layer 1: tokens" in out


def test_evaluate_exact_match_accuracy():
    """Labels set to the model's own greedy predictions score 1; one wrong answer token costs
    that sample (exact match), not the others."""
    model = apply_atp(tiny_llava(4), ATPConfig(target_tokens=TARGET, init_threshold=0.5)).train()
    batch = synthetic_batch(4, max_images=2)
    with torch.no_grad():
        pred = model.eval()(**batch, use_cache=False).logits.argmax(-1)
    labels = batch["labels"].clone()
    answer = labels[:, 1:] != -100
    labels[:, 1:][answer] = pred[:, :-1][answer]
    ok = {**batch, "labels": labels}
    model.train()
    rec = evaluate(model, [ok])
    assert model.training  # the mode is restored
    assert (rec["samples"], rec["correct"], rec["accuracy"], rec["token_accuracy"]) == (4, 4, 1.0, 1.0)
    wrong = labels.clone()
    pos = int(answer[2].nonzero()[0]) + 1
    wrong[2, pos] = (wrong[2, pos] + 1) % 64 + 3
    rec = evaluate(model, [{**batch, "labels": wrong}])
    assert (rec["correct"], rec["accuracy"]) == (3, 0.75)
    assert rec["token_accuracy"] == pytest.approx(1 - 1 / int(answer.sum()))


def test_evaluate_counts_hard_tokens_per_image():
    """Mode fixed keeps exactly fixed_keep tokens of every image: the per-image statistics and
    N_bar are known (several images per prompt included)."""
    keep = (100, 50, 20)
    model = apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), mode="fixed", fixed_keep=keep))
    loader = eval_loader(5, max_images=2)
    rec = evaluate(model, loader)
    assert rec["images"] == sum(len(ex["pixel_values"]) for ex in loader.dataset) > rec["samples"] == 5
    for layer, k in zip((1, 2, 3), keep):
        assert (rec[f"tokens_l{layer}_mean"], rec[f"tokens_l{layer}_std"], rec[f"tokens_l{layer}_min"],
                rec[f"tokens_l{layer}_max"]) == (k, 0.0, k, k)
    assert rec["n_bar"] == pytest.approx((N_GRID + sum(keep)) / 4) and rec["n_bar_std"] == pytest.approx(0.0)
    assert "theta_r_l1_mean" not in rec and rec["flops_ratio"] < 1.0


# ----------------------------------------------------------------------------------------------
# records


def _records(tmp_path, n=3, text=False):
    records = []
    for i in range(n):
        torch.save(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(i)), tmp_path / f"img{i}.pt")
        if text:
            records.append({"image": f"img{i}.pt", "prompt": "what is this", "answer": "a cat" if i % 2 else "a dog"})
        else:
            records.append({"image": f"img{i}.pt", "prompt_ids": [1, 5, TINY_IMAGE_TOKEN, 6, 7],
                            "answer_ids": [70 + i % 2, 2]})
    path = tmp_path / ("text.jsonl" if text else "ids.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pretokenised_records_train_on_tiny(tmp_path):
    path = _records(tmp_path)
    ds = RecordsDataset(path, None, TINY_IMAGE_TOKEN, N_GRID, 48, vocab_size=128)
    ex = ds[0]
    assert ex["input_ids"] == [1, 5] + [TINY_IMAGE_TOKEN] * N_GRID + [6, 7, 70, 2]
    assert [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100] == [70, 2]
    rows = run("--data", path, "--eval-data", path, "--max-steps", 2)
    assert [r["step"] for r in train_rows(rows)] == [1, 2] and eval_rows(rows)[0]["samples"] == 3


def test_records_errors_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer PATH"):
        run("--data", _records(tmp_path, text=True), "--max-steps", 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "img0.pt", "prompt_ids": [1, TINY_IMAGE_TOKEN], "answer_ids": [500]}]))
    with pytest.raises(ValueError, match="vocabulary has 128"):
        RecordsDataset(bad, None, TINY_IMAGE_TOKEN, N_GRID, 48, vocab_size=128)[0]
    bad.write_text(json.dumps([{"image": "img0.pt", "prompt_ids": [1, 2], "answer_ids": [3]}]))
    with pytest.raises(ValueError, match="once per image"):
        RecordsDataset(bad, None, TINY_IMAGE_TOKEN, N_GRID, 48)[0]


class _WordTokenizer:
    """encode() as a word-level tokenizer, recording the texts it was given."""

    def __init__(self, bos_token_id=1):
        self.bos_token_id, self.eos_token_id, self.vocab, self.texts = bos_token_id, 2, {}, []

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        self.texts.append(text)
        return [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]

    def words(self, ids):
        names = {i: w for w, i in self.vocab.items()}
        return [names.get(i, {1: "<s>", 99: "I"}.get(i)) for i in ids]


def test_encode_prompt_places_images_as_training_and_the_tools_expect(tmp_path):
    """data.encode_prompt, the one prompt encoding (RecordsDataset, visualize, the lmms-eval plugin):
    bos, the template's text around the prompt, n_grid image tokens per image at the prompt's own
    <image> placeholders, the rest at the template's {image}."""
    from atp_llava.tools.data import LLAVA_TEMPLATE, encode_prompt

    def enc(prompt, images, template=LLAVA_TEMPLATE, bos=1):
        tok = _WordTokenizer(bos)
        return tok.words(encode_prompt(tok, prompt, images, 99, 2, template)), tok.texts

    img = ["I", "I"]
    assert enc("what is this", 1) == (["<s>", "USER:"] + img + ["what", "is", "this", "ASSISTANT:"],
                                      ["USER: ", "\nwhat is this ASSISTANT:"])
    assert enc("what is this", 2)[1] == ["USER: ", "\n", "\nwhat is this ASSISTANT:"]  # newline-separated
    assert enc("what is <image> and this", 2)[0] == ["<s>", "USER:"] + img + ["what", "is"] + img + \
        ["and", "this", "ASSISTANT:"]
    # every image placed by the prompt: the template's {image} and its newline go
    assert enc("look <image> here", 1) == (["<s>", "USER:", "look"] + img + ["here", "ASSISTANT:"],
                                           ["USER: look ", " here ASSISTANT:"])
    assert enc("hi", 0) == (["<s>", "USER:", "hi", "ASSISTANT:"], ["USER: hi ASSISTANT:"])
    assert enc("say {image}", 1)[0] == ["<s>", "USER:"] + img + ["say", "{image}", "ASSISTANT:"]
    assert enc("q", 1, template="{prompt} {image}", bos=None) == (["q"] + img, ["q "])
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        enc("<image> and <image>", 1)

    # RecordsDataset's text records are encode_prompt's ids, then the answer and eos
    torch.save(torch.rand(3, 48, 48), tmp_path / "a.pt")
    tok = _WordTokenizer()
    ex = RecordsDataset([{"image": str(tmp_path / "a.pt"), "prompt": "what is <image> this", "answer": "cat"}],
                        tok, 99, 2, 48)[0]
    prompt = encode_prompt(tok, "what is <image> this", 1, 99, 2)
    assert ex["input_ids"] == prompt + [tok.vocab["cat"], 2]
    assert tok.words(prompt) == ["<s>", "USER:", "what", "is"] + img + ["this", "ASSISTANT:"]


def test_tokenizer_flag_with_tiny(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "dog"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tmp_path / "tok")
    rows = run("--data", _records(tmp_path, text=True), "--tokenizer", tmp_path / "tok", "--max-steps", 1,
               "--save-model", tmp_path / "model")
    assert rows[0]["step"] == 1
    assert (tmp_path / "model" / "tokenizer.json").exists()  # saved beside the model


# ----------------------------------------------------------------------------------------------
# remove_atp


@pytest.mark.parametrize("stock_impl", ["sdpa", "eager"])
def test_remove_atp_restores_the_stock_model(stock_impl):
    stock = tiny_llava(4, attn_implementation=stock_impl).eval()
    stock.model.vision_tower.requires_grad_(False)  # a flag apply_atp(train_lm=True) would change
    model = copy.deepcopy(stock)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = synthetic_batch(2)
    apply_atp(model, ATPConfig(target_tokens=TARGET, train_lm=True, init_threshold=0.5))
    model.train()(**batch, use_cache=False).loss.backward()
    with torch.no_grad():
        model.eval()(**batch, use_cache=False)
    assert hasattr(model, "atp_report")
    model.zero_grad(set_to_none=True)
    assert remove_atp(model) is model
    assert not hasattr(model, "atp") and not hasattr(model, "atp_report") and not hasattr(model, "_atp_controller")
    assert "generate" not in vars(model) and not any(k.startswith("atp.") for k in model.state_dict())
    assert model.config.text_config._attn_implementation == stock_impl
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        for mode in (False, True):
            assert torch.equal(model.train(mode)(**batch).logits, stock.train(mode)(**batch).logits)
    # No hook left behind (after a forward of both: transformers adds output-capturing hooks on the first)
    for m, s in zip(model.modules(), stock.modules()):
        assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == (len(s._forward_pre_hooks), len(s._forward_hooks))
    prompt = {k: v[:1, :-3] for k, v in batch.items() if k != "pixel_values"}
    prompt["pixel_values"] = batch["pixel_values"][:1]
    prompt.pop("labels")
    gen = dict(max_new_tokens=3, do_sample=False)
    assert torch.equal(model.eval().generate(**prompt, **gen), stock.eval().generate(**prompt, **gen))
    # and it can become ATP-LLaVA again, with another config
    apply_atp(model, ATPConfig(layers=(2,), mode="fixed", fixed_keep=(10,)))
    stats = model.eval()(**batch, use_cache=False).atp_stats
    assert stats["layers"] == (2,) and torch.equal(stats["tokens"], torch.full((2, 1), 10.0))
    with pytest.raises(ValueError, match="no ATP modules"):
        remove_atp(stock)


# ----------------------------------------------------------------------------------------------
# param_groups


def test_param_groups():
    frozen = apply_atp(tiny_llava(4), ATPConfig(target_tokens=TARGET))
    groups = param_groups(frozen, lr_atp=1e-2, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["atp"] and groups[0]["lr"] == 1e-2 and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in frozen.atp.parameters()}
    full = apply_atp(tiny_llava(4), ATPConfig(target_tokens=TARGET, train_lm=True))
    atp, lm = param_groups(full)
    assert (atp["name"], atp["lr"], lm["name"], lm["lr"]) == ("atp", DEFAULT_LR_ATP, "lm", DEFAULT_LR_LM)
    trainable = {id(p) for p in full.parameters() if p.requires_grad}
    assert {id(p) for g in (atp, lm) for p in g["params"]} == trainable
    assert not {id(p) for p in full.model.vision_tower.parameters()} & trainable
    torch.optim.AdamW(param_groups(full))
    with pytest.raises(ValueError, match="no parameter of the model requires a gradient.*train_lm=True"):
        param_groups(apply_atp(tiny_llava(4), ATPConfig(layers=(1,), mode="fixed", fixed_keep=(5,))))


# ----------------------------------------------------------------------------------------------
# DDP through the entry point


def test_ddp_spawn_with_eval_and_save_model(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "atp_llava.train", *BASE, "--synthetic", "2", "--batch-size", "1", "--max-steps", "2",
           "--nproc", "2", "--eval-synthetic", "2", "--eval-every", "1", "--log-json", str(tmp_path / "log.jsonl"),
           "--save-model", str(tmp_path / "m")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_rows(rows)] == [1, 2] and [r["step"] for r in eval_rows(rows)] == [1, 2]
    assert "eval @ step 1" in res.stdout and "eval @ step 2" in res.stdout
    assert (tmp_path / "m" / ATP_FILE).exists() and (tmp_path / "m" / "model.safetensors").exists()



# ----------------------------------------------------------------------------------------------
# torchrun: FSDP2 and Hugging Face Trainer through the entry point


def _torchrun(tmp_path, *argv):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "atp_llava.train", *BASE, *map(str, argv), "--log-json", str(tmp_path / "log.jsonl")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return res, [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_torchrun_fsdp2_trains_evaluates_and_saves(tmp_path):
    """torchrun --nproc-per-node 2 -m atp_llava.train --fsdp: FSDP2 training, the held-out eval
    with real pruning on the sharded model, --save-model from the shards: the saved model loads
    unsharded and gives the logged eval."""
    res, rows = _torchrun(tmp_path, "--synthetic", "8", "--max-steps", "2", "--fsdp", "--eval-synthetic", "2",
                          "--eval-every", "1", "--init-threshold", "0.5", "--save-model", tmp_path / "m")
    assert [r["step"] for r in train_rows(rows)] == [1, 2] and [r["step"] for r in eval_rows(rows)] == [1, 2]
    assert all("theta_r_l1" in r and r["loss"] > 0 for r in train_rows(rows))
    last = eval_rows(rows)[-1]
    assert last["n_bar"] < 500  # the eval pruned
    from transformers import LlavaForConditionalGeneration

    model = load_atp(LlavaForConditionalGeneration.from_pretrained(tmp_path / "m"), tmp_path / "m" / ATP_FILE)
    args = build_parser().parse_args([*BASE, "--synthetic", "8", "--eval-synthetic", "2"])
    from atp_llava.tools.train_loops import _dataset, _loader

    loader = _loader(_dataset(args, model, None, N_GRID, "eval"), 2, 0, "right")
    again = evaluate(model, loader)
    assert again["n_bar"] == last["n_bar"] and again["loss"] == pytest.approx(last["loss"], rel=1e-6)


def test_torchrun_trainer_engine_with_accumulation(tmp_path):
    """--engine trainer under torchrun (Trainer's DDP on gloo) with --grad-accum 2: one row per
    optimizer step with Trainer's loss and ATPCallback's statistics, the learning rates of both
    parameter groups, the eval at the end; the saved ATP weights load."""
    res, rows = _torchrun(tmp_path, "--synthetic", "8", "--max-steps", "2", "--engine", "trainer", "--grad-accum",
                          "2", "--train-lm", "--lr-atp", "1e-3", "--lr-lm", "1e-5", "--eval-synthetic", "2",
                          "--save-atp", tmp_path / "atp.safetensors")
    train_r = train_rows(rows)
    assert [r["step"] for r in train_r] == [1, 2] and [r["step"] for r in eval_rows(rows)] == [2]
    for r in train_r:
        assert (r["lr_atp"], r["lr_lm"]) == (1e-3, 1e-5)
        for key in ("loss", "n_bar", "n_bar_hard", "loss_atp", "loss_target", "tokens_l1", "theta_r_l1",
                    "theta_s_l1"):
            assert key in r, key
    assert train_r[0]["theta_r_l1"] != train_r[1]["theta_r_l1"]  # the step moved the thresholds
    assert read_atp_config(tmp_path / "atp.safetensors").train_lm
