"""ATP-LLaVA on Hugging Face Trainer (atp_llava.trainer), on CPU with gloo: the budget loss under
gradient accumulation and several processes, the ATP/LM learning rates, the logged statistics.

The runs themselves are tests/trainer_worker.py, launched as a user would: ``python`` for one
process, ``torchrun --standalone --nproc-per-node 2`` for DDP.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from atp_llava import ATPConfig, apply_atp  # noqa: E402
from atp_llava.core.losses import SAMPLES_IN_BATCH, target_loss  # noqa: E402
from atp_llava.tools.tiny import tiny_llava  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer_worker.py")
TARGET = 200  # trainer_worker.CONFIG's target_tokens

# (processes, per-device batch, gradient accumulation): 8 examples per optimizer step each
RUNS = {"1 process x accumulation 4": (1, 2, 4), "2 processes x accumulation 2": (2, 2, 2),
        "1 process, whole batch": (1, 8, 1)}


def _run(tmp_path, name, nproc, batch, accum, plain, extra=()):
    out = tmp_path / f"{name.replace(' ', '_').replace(',', '')}.pt"
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = launcher + [WORKER, str(out), "--batch", str(batch), "--accum", str(accum)] + (["--plain"] if plain else []) + list(extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


def _assert_same_sum(actual, expected, msg):
    """Equal up to float32 summation order: 1e-5 relative per element, and an absolute 1e-6 of the
    tensor's largest magnitude (an element that is a small difference of large terms carries the
    rounding of those terms, not of itself)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()), msg=msg)


@pytest.mark.parametrize("plain", [False, True], ids=["ATPTrainer", "Trainer+ATPCallback"])
def test_accumulation_and_processes_give_the_whole_batchs_gradients(tmp_path, plain):
    """One SGD step on the same 8 examples: 1 process x accumulation 4, 2 DDP processes x
    accumulation 2 and 1 process on the whole batch give the same ATP gradients, loss and logged
    statistics (float32, `_assert_same_sum`: the runs sum the same terms in another order).

    ATPTrainer: examples 2 and 3 have no image, so one rank's first micro-batch is text-only (it
    still runs every threshold MLP: DDP runs without find_unused_parameters) and the budget term
    is weighted per sample with an image. Plain Trainer: uniform examples (one image, two label
    tokens each), where its per-label-token weighting is the same. The budget is far from reached
    (every N_bar > target), the regime where L_target's per-forward N_bar adds up exactly."""
    runs = {name: _run(tmp_path, name, *spec, plain=plain) for name, spec in RUNS.items()}
    acc4, ddp, whole = runs.values()
    # the micro-batches: the same four in both accumulated runs, one text-only without --plain
    assert sum(ddp["n_bars"], []) == [acc4["n_bars"][0][i] for i in (0, 2, 1, 3)]
    image_nbars = [v for v in acc4["n_bars"][0] if v > 0]
    assert len(image_nbars) == (4 if plain else 3) and min(image_nbars) > TARGET
    assert len(whole["n_bars"][0]) == 1
    for name, run in runs.items():
        torch.testing.assert_close(run["log_history"][0]["loss"], whole["log_history"][0]["loss"], rtol=1e-5,
                                   atol=0, msg=f"{name}: Trainer's loss")
        assert set(run["grads"]) == set(whole["grads"]) and len(whole["grads"]) == 18
        for n, g in whole["grads"].items():
            assert torch.count_nonzero(g) > 0, n
            _assert_same_sum(run["grads"][n], g, f"{name}: grad of {n}")
            _assert_same_sum(run["params"][n], whole["params"][n], n)
        logs = run["log_history"][0]
        # ATPCallback: sample-weighted means over the step's forwards (2 samples with an image each)
        assert logs["atp/n_bar"] == pytest.approx(sum(image_nbars) / len(image_nbars), rel=1e-6)
        for key in ("atp/n_bar_hard", "atp/loss_atp", "atp/loss_target", "atp/tokens_l1", "atp/tokens_l3",
                    "atp/theta_r_l2", "atp/theta_s_l3"):
            assert logs[key] == pytest.approx(whole["log_history"][0][key], rel=1e-5), f"{name}: {key}"
        # the budget's error: one per optimizer step, the whole batch's, the same on every rank
        for w, v in run["weights"]:
            assert (w, v) == (pytest.approx(whole["weights"][0][0]), pytest.approx(whole["weights"][0][1], rel=1e-5))
        assert 0 < whole["weights"][0][1] < float("inf")
        assert logs["atp/budget_weight"] == pytest.approx(whole["weights"][0][0])  # as it stands at the log
        cfg = ATPConfig()  # the worker's target loss (default kind and delta)
        linear = target_loss(torch.tensor(logs["atp/n_bar"]), TARGET, cfg.target_loss, cfg.target_delta)
        assert logs["atp/loss_target"] == pytest.approx(float(linear), rel=1e-5)  # past delta: linear in N_bar


def test_atp_trainer_optimizer_has_the_atp_and_lm_learning_rates(tmp_path):
    from transformers import TrainingArguments

    from atp_llava.trainer import ATPTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=2e-5, report_to=[],
                             weight_decay=0.01, optim="adamw_torch")
    for train_lm, names in ((False, ["atp"]), (True, ["atp", "lm"])):
        model = apply_atp(tiny_llava(2, seed=0), ATPConfig(layers=(1,), target_tokens=400, train_lm=train_lm))
        opt = ATPTrainer(model=model, args=args, lr_atp=1e-4).create_optimizer()
        assert isinstance(opt, torch.optim.AdamW)
        assert [g["name"] for g in opt.param_groups] == names
        assert [g["lr"] for g in opt.param_groups] == [1e-4, 2e-5][:len(names)]
        assert all(g["weight_decay"] == 0.01 for g in opt.param_groups)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
        assert len(trainable) == 6 or train_lm


def test_atp_trainer_refuses_a_model_without_atp(tmp_path):
    from transformers import TrainingArguments

    from atp_llava.trainer import ATPTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="apply_atp"):
        ATPTrainer(model=tiny_llava(2, seed=0), args=args)


def test_budget_share_needs_num_items_in_batch():
    from test_llava_training import make_batch

    # the fixed-weight budget: the forwards compared see the same weight
    model = apply_atp(tiny_llava(2, seed=0), ATPConfig(layers=(1,), target_tokens=400, budget_control="penalty")).train()
    batch = make_batch([600, 596], ["right", "left"])
    with pytest.raises(ValueError, match=SAMPLES_IN_BATCH):
        model(**batch, **{SAMPLES_IN_BATCH: torch.tensor(4)})
    whole = model(**batch)
    # half of an accumulated batch of 4 samples with images and 2 x the label tokens
    labels = (batch["labels"][:, 1:] != -100).sum()
    half = model(**batch, num_items_in_batch=2 * labels, **{SAMPLES_IN_BATCH: torch.tensor(4)})
    budget = whole.loss - whole.atp_stats["loss_ntp"]
    assert float(half.atp_stats["budget_share"]) == 0.5
    torch.testing.assert_close(half.loss, (whole.atp_stats["loss_ntp"] + budget) / 2, rtol=1e-5, atol=1e-6)
    by_tokens = model(**batch, num_items_in_batch=4 * labels)  # plain Trainer: label tokens
    torch.testing.assert_close(by_tokens.loss, (whole.atp_stats["loss_ntp"] + budget) / 4, rtol=1e-5, atol=1e-6)


def test_deepspeed_zero3_two_ranks_match_the_whole_batch(tmp_path, monkeypatch):
    """ATPTrainer on DeepSpeed ZeRO-3 (atp_llava's zero3.json, every parameter partitioned), 2
    gloo ranks x accumulation 2 with a text-only micro-batch on one rank: the ATP parameters
    after the SGD step equal the whole-batch run's (1e-5 relative); an eval forward with real
    pruning runs under ZeRO-3 on both ranks; save_atp gathers the partitions and the file loads
    into an unsharded model that gives the same eval logits."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))  # for the ranks
    whole = _run(tmp_path, "whole", 1, 8, 1, plain=False)
    zero3 = _run(tmp_path, "zero3", 2, 2, 2, plain=False, extra=["--deepspeed"])
    assert zero3["zero_stage"] == 3 and zero3["released"]
    held, total = zero3["partition"]
    assert held * 2 <= total + 18, "each rank holds about half of every ATP parameter"
    assert sum(zero3["n_bars"], [])[2] == 0.0  # rank 1's first micro-batch had no image
    for w, v in zero3["weights"]:  # one budget step, on every rank, from the whole batch's error
        assert (w, v) == (pytest.approx(whole["weights"][0][0]), pytest.approx(whole["weights"][0][1], rel=1e-5))
    torch.testing.assert_close(zero3["log_history"][0]["loss"], whole["log_history"][0]["loss"], rtol=1e-5, atol=0)
    for n, p in whole["params"].items():
        _assert_same_sum(zero3["params"][n], p, n)
    import trainer_worker

    from atp_llava import load_atp
    from atp_llava.tools.data import collate

    fresh = load_atp(tiny_llava(4, seed=0), tmp_path / "zero3_atp.safetensors").eval()
    for n, p in fresh.named_parameters():
        if n.startswith("atp."):
            assert torch.equal(p, zero3["params"][n]), n
    with torch.no_grad():
        out = fresh(**collate([trainer_worker.EVAL(2)[i] for i in range(2)]))
    assert torch.equal(out.atp_stats["tokens"], zero3["eval_tokens"]) and zero3["eval_tokens"].min() < 576
    torch.testing.assert_close(out.logits, zero3["eval_logits"], rtol=1e-5, atol=1e-5)
