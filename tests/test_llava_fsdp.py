"""ATP-LLaVA under FSDP2 on two gloo ranks (CPU), launched with torchrun: training with one rank's
batch text-only, eval with real pruning, generate(), save_atp from the shards; against one
process running the same batches (tests/fsdp_worker.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import fsdp_worker as worker  # noqa: E402
from atp_llava import ATPConfig, apply_atp, load_atp  # noqa: E402
from atp_llava.core.losses import adapt_budget_weight, budget_error  # noqa: E402
from atp_llava.tools.tiny import tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker.__file__,
           str(out)]
    proc = subprocess.run(cmd, cwd=out, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # a rank that hangs in a collective ends here
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def reference():
    """One process, the same steps: the mean of the two ranks' losses (FSDP2 averages the
    ranks' gradients), AdamW with the worker's settings; the budget state steps once per step
    on both ranks' counts, as the ranks' all-reduce makes it."""
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(**worker.CONFIG)).train()
    opt = torch.optim.AdamW(worker.atp_params(model).values(), lr=worker.LR)
    cfg = model.atp.config
    losses, weights = [], []
    for step in range(worker.STEPS):
        opt.zero_grad()
        state = model.atp.budget_weight.clone(), model.atp.budget_violation.clone()
        outs = []
        for r in range(2):  # both with the step's budget state, as the two ranks' forwards run
            model.atp.budget_weight.copy_(state[0])
            model.atp.budget_violation.copy_(state[1])
            outs.append(model(**worker.rank_batch(step, r), use_cache=False))
        ((outs[0].loss + outs[1].loss) / 2).backward()
        opt.step()
        losses.append([float(o.loss.detach()) for o in outs])
        # the ranks step the budget once, on their all-reduced counts
        sums = sum(torch.stack([o.atp_stats["n_bar_batch"] * n, o.atp_stats["n_target"] * n, n])
                   for o in outs for n in [(o.atp_stats["images_per_sample"] > 0).sum().float()])
        weight, violation = state
        adapt_budget_weight(weight, violation, float(budget_error(sums).abs()), cfg.lambda_target, cfg.weight_growth,
                            cfg.budget_tolerance)
        model.atp.budget_weight.copy_(weight)
        model.atp.budget_violation.copy_(violation)
        weights.append((float(weight), float(violation)))
    return model.eval(), losses, weights


def test_fsdp2_two_ranks_train_like_one_process(fsdp_run, reference):
    """Two AdamW steps, rank 1's first batch without an image (no hang: its backward runs
    through the same layers), match the one-process run: losses and ATP parameters to 1e-5
    relative (float32; the sums run in another order)."""
    _, ranks = fsdp_run
    ref, ref_losses, ref_weights = reference
    fresh = apply_atp(tiny_llava(4, seed=0), ATPConfig(**worker.CONFIG)).atp
    init = {k: p.detach() for k, p in fresh.named_parameters()}
    for r, run in enumerate(ranks):
        assert run["ran"] == [3, 3], "an ATP layer did not run"
        assert run["losses"] == pytest.approx([l[r] for l in ref_losses], rel=1e-5)
        for n, p in worker.atp_params(ref).items():
            torch.testing.assert_close(run["params"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.equal(ranks[0]["params"]["atp." + k], v) for k, v in init.items()), "nothing trained"
    for n in ranks[0]["params"]:
        assert torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]), n
    # the budget weight and error: the same on both ranks, the one-process values; the error
    # stalled far above the target, so the weight doubled at the second step
    assert ranks[0]["weights"] == ranks[1]["weights"]
    for (w, v), (ref_w, ref_v) in zip(ranks[0]["weights"], ref_weights):
        assert (w, v) == (pytest.approx(ref_w, rel=1e-6), pytest.approx(ref_v, rel=1e-5))
    assert ranks[0]["weights"][1][0] == pytest.approx(2 * ATPConfig().lambda_target)


def test_fsdp2_eval_generate_and_save_match_an_unsharded_model(fsdp_run, reference):
    """Eval with real pruning and generate() under FSDP2 on each rank's prompts; the file
    save_atp wrote from the shards loads into an unsharded model that gives the same logits,
    token counts and generated tokens exactly, and the one-process model (trained on its own)
    the same tokens and logits to 1e-4."""
    out, ranks = fsdp_run
    ref, _, _ = reference
    fresh = load_atp(tiny_llava(4, seed=0), out / "atp.safetensors").eval()
    for n, p in worker.atp_params(fresh).items():
        assert torch.equal(p, ranks[0]["params"][n]), n
    for r, run in enumerate(ranks):
        assert run["pruned"] and run["tokens"][:, -1].max() < 400, run["tokens"]  # real pruning
        prompts = worker.eval_prompts(r)
        with torch.no_grad():
            plain = fresh(**prompts)
            gen = fresh.generate(**prompts, max_new_tokens=3, do_sample=False)
            other = ref(**prompts)
        assert torch.equal(plain.logits, run["logits"]) and torch.equal(plain.atp_stats["tokens"], run["tokens"])
        assert torch.equal(gen, run["generated"])
        assert torch.equal(other.atp_stats["tokens"], run["tokens"])
        torch.testing.assert_close(other.logits, run["logits"], rtol=1e-4, atol=1e-4)


def test_shard_fsdp2_finds_the_decoder_layers_through_the_adapter(tmp_path, monkeypatch):
    """shard_fsdp2 shards the layers the model's adapter names (ModelAdapter.language_model()),
    then model.atp and the root; a model without ATP is refused. One gloo process."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from atp_llava import get_atp_controller, shard_fsdp2

    with pytest.raises(TypeError, match="expected an ATP model"):
        shard_fsdp2(tiny_llava(2))
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(layers=(1, 2, 3)))
    layers = model.model.language_model.layers
    adapter = get_atp_controller(model).adapter
    # an adapter whose decoder holds the first two layers only: the other two stay unsharded
    decoder = torch.nn.Module()
    decoder.layers = torch.nn.ModuleList(list(layers)[:2])
    monkeypatch.setattr(adapter, "language_model", lambda: decoder)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert shard_fsdp2(model) is model
        assert [isinstance(layer, FSDPModule) for layer in layers] == [True, True, False, False]
        assert isinstance(model.atp, FSDPModule) and isinstance(model, FSDPModule)
    finally:
        dist.destroy_process_group()
