"""Does ATP learn adaptive budgets? A synthetic two-kind task on the tiny LLaVA, on the CPU.

The task (``ColourTask``): every image is a background of one of four colours with one small
object (2 x 2 vision tokens, 4 x 4 px) of another colour at a random place. Two kinds of
question share that image distribution:

  coarse  "what colour is the background?"  any vision token answers it
  fine    "what colour is the object?"       only the 4 object tokens (of 144) answer it

Per seed, the tiny LLaVA (tiny.py: 4 decoder layers, d 64; 24 px images, so 12 x 12 = 144
vision tokens to fit the CPU budget; --grid 24 gives LLaVA-1.5's 576) is first
trained unpruned on the task (warm-up: LM and projector, vision tower frozen). Then every arm
starts from those weights and trains the same number of steps with the LM trainable
(``train_lm``; the fixed-ratio arms have no other parameters):

  unpruned   no pruning
  adaptive   ATP with this package's defaults (ATPConfig and the default learning rate), ATP
             layers 1, 2, 3, target N_bar 60 (of 144; at least 36.75 is reachable)
  raw_inputs, soft_budget, l1_target, no_floor
             adaptive with one option set back to the paper's choice (mlp_inputs="raw",
             budget="soft", target_loss="l1", min_keep=0): the ablations
  fixed      top-k by S_red at the same layers (paper Table 2) keeping, per layer, the adaptive
             arm's mean hard token count at eval
  fastv      FastV before layer 1, keeping what gives the adaptive arm's eval N_bar

and is evaluated on held-out examples of each kind in ``model.eval()`` (hard masks, real
pruning). Reported per arm and kind: accuracy of the answer token, hard tokens per ATP layer
(mean, std, min, max), theta_r / theta_s (mean, std, min, max, samples at exactly 0 or 1),
N_bar; per arm the training curves. The four targets of the method are checked on the
adaptive arm: eval N_bar within 5% of the target, no saturated threshold, fine instances keep
more tokens than coarse ones at the ATP layers, adaptive accuracy >= fixed accuracy.

    python bench/adaptivity.py                     # 3 seeds, ~10 min on 2 free cores; JSON + PNGs to bench/results/
    python bench/adaptivity.py --quick --no-json   # a smoke run (CI)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import atp_ops  # noqa: E402
from atp_llava import ATPConfig, apply_atp  # noqa: E402
from atp_llava.data import collate  # noqa: E402
from atp_llava.layout import IGNORE_INDEX  # noqa: E402
from atp_llava.optim import param_groups  # noqa: E402
from atp_llava.tiny import tiny_llava  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KINDS = ("coarse", "fine")
ABLATIONS = {  # arm -> the ATPConfig field set back to the paper's choice
    "raw_inputs": {"mlp_inputs": "raw"},
    "soft_budget": {"budget": "soft"},
    "l1_target": {"target_loss": "l1"},
    "no_floor": {"min_keep": 0},
}


class ColourTask(torch.utils.data.Dataset):
    """``n`` examples, half coarse and half fine (alternating), deterministic in (seed, index).

    Token ids (tiny vocabulary of 128): 1 bos, 2 eos, 3 "USER:", 4 "ASSISTANT:", 10 + kind the
    question, 20 + colour the answer, ``image_token_id`` the 576 vision tokens.
    """

    PALETTE = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5], [1.2, 1.2, -1.0]])
    def __init__(self, n: int, seed: int, image_token_id: int, grid: int = 12, obj: int = 2, patch: int = 2,
                 noise: float = 0.3):
        self.n, self.seed, self.image_token_id = n, seed, image_token_id
        self.grid, self.obj, self.patch, self.noise = grid, obj, patch, noise

    def __len__(self) -> int:
        return self.n

    def example(self, i: int) -> Dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        kind = i % 2
        bg = int(torch.randint(0, 4, (1,), generator=g))
        obj = (bg + 1 + int(torch.randint(0, 3, (1,), generator=g))) % 4
        r, c = (int(x) for x in torch.randint(0, self.grid - self.obj + 1, (2,), generator=g))
        size = self.grid * self.patch
        pixels = self.PALETTE[bg][:, None, None].expand(3, size, size).clone()
        p, o = self.patch, self.obj
        pixels[:, r * p:(r + o) * p, c * p:(c + o) * p] = self.PALETTE[obj][:, None, None]
        pixels += self.noise * torch.randn(3, size, size, generator=g)
        answer = bg if kind == 0 else obj
        ids = [1, 3] + [self.image_token_id] * (self.grid * self.grid) + [10 + kind, 4]
        target = [20 + answer, 2]
        return {"pixel_values": pixels[None], "input_ids": ids + target,
                "labels": [IGNORE_INDEX] * len(ids) + target, "kind": kind}

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.example(i)


def task(n: int, seed: int, model, args) -> ColourTask:
    return ColourTask(n, seed, model.config.image_token_id, grid=args.grid, obj=args.object)


def batches(dataset: ColourTask, batch_size: int, seed: int, shuffle: bool = True):
    """Endless shuffled batches (training) or one pass in order (shuffle=False)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=g).tolist() if shuffle else list(range(len(dataset)))
        for s in range(0, len(order) - (batch_size - 1 if shuffle else 0), batch_size):
            items = [dataset[j] for j in order[s:s + batch_size]]
            batch = collate(items, pad_token_id=0)
            batch["kind"] = torch.tensor([it["kind"] for it in items])
            yield batch
        if not shuffle:
            return


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "kind"}


def summary(values: torch.Tensor) -> Dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min()),
            "max": float(v.max())}


def train_steps(model, data, steps: int, lr_atp: float, lr_lm: float, progress, label: str) -> List[Dict[str, float]]:
    """``steps`` AdamW steps on ``data``; returns one log row per step."""
    model.train()
    opt = torch.optim.AdamW(param_groups(model, lr_atp=lr_atp, lr_lm=lr_lm) if hasattr(model, "atp") else
                            [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr_lm}],
                            weight_decay=0.0)
    rows = []
    for step in range(steps):
        batch = next(data)
        out = model(**model_inputs(batch), use_cache=False)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        st = getattr(out, "atp_stats", None)
        row = {"step": step + 1, "loss": float(out.loss.detach())}
        if st is not None:
            row.update(loss_ntp=float(st["loss_ntp"]), n_bar=float(st["n_bar_batch"]),
                       n_bar_hard=float(st["n_bar_hard"]), n_bar_soft=float(st["n_bar_soft"]))
            for k, layer in enumerate(st["layers"]):
                row[f"tokens_hard_l{layer}"] = float(st["tokens_hard"][:, k].mean())
                if "theta_r" in st:
                    row[f"theta_r_l{layer}"] = float(st["theta_r"][:, k].mean())
                    row[f"theta_s_l{layer}"] = float(st["theta_s"][:, k].mean())
        rows.append(row)
        progress.update(1)
        progress.set_postfix_str(f"{label} loss {row['loss']:.3f}" + (f" N_bar {row['n_bar_hard']:.1f}"
                                                                        if "n_bar_hard" in row else ""))
    return rows


@torch.no_grad()
def evaluate(model, dataset: ColourTask, batch_size: int) -> Dict[str, Any]:
    """Accuracy of the answer token, hard tokens per ATP layer and thresholds, per kind."""
    model.eval()
    correct, kinds, tokens, theta_r, theta_s, n_bar = [], [], [], [], [], []
    for batch in batches(dataset, batch_size, 0, shuffle=False):
        out = model(**model_inputs(batch), use_cache=False)
        labels = batch["labels"]
        answer_pos = (labels != IGNORE_INDEX).float().argmax(1)  # the first answer token
        pred = out.logits[torch.arange(labels.shape[0]), answer_pos - 1].argmax(-1)
        correct.append(pred == labels[torch.arange(labels.shape[0]), answer_pos])
        kinds.append(batch["kind"])
        st = getattr(out, "atp_stats", None)
        if st is not None:
            tokens.append(st["tokens_hard"])
            n_bar.append(st["n_bar"])
            if "theta_r" in st:
                theta_r.append(st["theta_r"])
                theta_s.append(st["theta_s"])
    correct, kinds = torch.cat(correct), torch.cat(kinds)
    res: Dict[str, Any] = {"accuracy": float(correct.float().mean())}
    layers = getattr(getattr(model, "atp", None), "config", None)
    layers = layers.layers if layers is not None else ()
    tokens = torch.cat(tokens) if tokens else None
    if tokens is not None:
        res["n_bar"] = float(torch.cat(n_bar).mean())
    for kind_id, kind in enumerate(KINDS):
        sel = kinds == kind_id
        r: Dict[str, Any] = {"accuracy": float(correct[sel].float().mean()), "n": int(sel.sum())}
        if tokens is not None:
            r["tokens"] = {str(layer): summary(tokens[sel, k]) for k, layer in enumerate(layers)}
            r["n_bar"] = float(torch.cat(n_bar)[sel].mean())
        if theta_r:
            tr, ts = torch.cat(theta_r)[sel], torch.cat(theta_s)[sel]
            r["theta_r"] = {str(layer): summary(tr[:, k]) for k, layer in enumerate(layers)}
            r["theta_s"] = {str(layer): summary(ts[:, k]) for k, layer in enumerate(layers)}
        res[kind] = r
    if theta_r:
        th = torch.cat([torch.cat(theta_r), torch.cat(theta_s)], 1)
        res["saturated_samples"] = int(((th == 0) | (th == 1)).any(1).sum())
    if tokens is not None:
        res["tokens"] = {str(layer): summary(tokens[:, k]) for k, layer in enumerate(layers)}
    return res


def warm_up(seed: int, args, progress) -> torch.nn.Module:
    """The tiny LLaVA trained unpruned on the task (LM and projector; vision tower frozen)."""
    model = tiny_llava(4, seed=seed, image_size=2 * args.grid)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
    data = batches(task(100_000, seed, model, args), args.batch_size, seed)
    train_steps(model, data, args.warmup_steps, 0.0, args.lr_warmup, progress, f"seed {seed} warm-up")
    return model


def run_arm(base, name: str, config: Optional[ATPConfig], seed: int, args, eval_set, progress) -> Dict[str, Any]:
    model = copy.deepcopy(base)
    if config is not None:
        apply_atp(model, config)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith("model.vision_tower."))
    data = batches(task(100_000, seed + 7919, model, args), args.batch_size, seed + 1)
    t0 = time.perf_counter()
    curve = train_steps(model, data, args.arm_steps, args.lr_atp, args.lr_lm, progress, f"seed {seed} {name}")
    result = {"arm": name, "seed": seed, "train_seconds": time.perf_counter() - t0,
              "config": None if config is None else model.atp.config.to_dict(), "curve": curve}
    result["eval"] = evaluate(model, eval_set, args.eval_batch)
    return result


def adaptive_config(args, **changes) -> ATPConfig:
    return ATPConfig(layers=tuple(args.layers), target_tokens=args.target, train_lm=True, **changes)


def run_seed(seed: int, args, progress) -> List[Dict[str, Any]]:
    torch.manual_seed(seed)
    base = warm_up(seed, args, progress)
    eval_set = task(args.eval_size, seed + 104_729, base, args)
    arms = [run_arm(base, "unpruned", None, seed, args, eval_set, progress)]
    adaptive = run_arm(base, "adaptive", adaptive_config(args), seed, args, eval_set, progress)
    arms.append(adaptive)
    for name in args.ablations:
        arms.append(run_arm(base, name, adaptive_config(args, **ABLATIONS[name]), seed, args, eval_set, progress))
    ev = adaptive["eval"]
    keep = tuple(max(1, int(round(ev["tokens"][str(layer)]["mean"]))) for layer in args.layers)
    arms.append(run_arm(base, "fixed", ATPConfig(layers=tuple(args.layers), mode="fixed", fixed_keep=keep,
                                                 train_lm=True, target_tokens=args.target),
                        seed, args, eval_set, progress))
    vc, depth = base.config.vision_config, base.config.text_config.num_hidden_layers
    fastv_keep = ATPConfig.matched_fastv_keep(ev["n_bar"], args.layers[0], depth, (vc.image_size // vc.patch_size) ** 2)
    arms.append(run_arm(base, "fastv", ATPConfig(layers=(args.layers[0],), mode="fastv", fixed_keep=(max(1, fastv_keep),),
                                                 train_lm=True, target_tokens=args.target),
                        seed, args, eval_set, progress))
    return arms


def targets(arms: List[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """The four targets of the method, per seed and over all seeds, on the adaptive arm."""
    per_seed = []
    for seed in sorted({a["seed"] for a in arms}):
        by = {a["arm"]: a["eval"] for a in arms if a["seed"] == seed}
        ad, fx = by["adaptive"], by["fixed"]
        layers = list(ad["tokens"])
        per_seed.append({
            "seed": seed,
            "n_bar_within_5pct": abs(ad["n_bar"] - target) <= 0.05 * target,
            "n_bar_eval": ad["n_bar"],
            "no_saturated_threshold": ad["saturated_samples"] == 0,
            "fine_keeps_more": all(ad["fine"]["tokens"][l]["mean"] > ad["coarse"]["tokens"][l]["mean"] for l in layers),
            "fine_minus_coarse_tokens": {l: ad["fine"]["tokens"][l]["mean"] - ad["coarse"]["tokens"][l]["mean"]
                                         for l in layers},
            "adaptive_geq_fixed": ad["accuracy"] >= fx["accuracy"],
            "accuracy_adaptive": ad["accuracy"], "accuracy_fixed": fx["accuracy"],
        })
    keys = ("n_bar_within_5pct", "no_saturated_threshold", "fine_keeps_more", "adaptive_geq_fixed")
    return {"per_seed": per_seed, "all_seeds": {k: all(s[k] for s in per_seed) for k in keys}}


def aggregate(arms: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Mean over seeds of each arm's accuracy (all, coarse, fine) and eval N_bar."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(a["arm"] for a in arms):
        evs = [a["eval"] for a in arms if a["arm"] == name]
        row = {"accuracy": statistics.mean(e["accuracy"] for e in evs)}
        for kind in KINDS:
            row[f"accuracy_{kind}"] = statistics.mean(e[kind]["accuracy"] for e in evs)
        if "n_bar" in evs[0]:
            row["n_bar"] = statistics.mean(e["n_bar"] for e in evs)
            for layer in evs[0]["tokens"]:
                for kind in KINDS:
                    row[f"tokens_l{layer}_{kind}"] = statistics.mean(e[kind]["tokens"][layer]["mean"] for e in evs)
        out[name] = row
    return out


def plot(arms: List[Dict[str, Any]], target: float, stem: str) -> List[str]:
    """tokens kept per ATP layer by kind (eval, adaptive arms and fixed) and training curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or .[bench])")
        return []
    paths = []
    pruned = [n for n in dict.fromkeys(a["arm"] for a in arms) if n not in ("unpruned", "fastv")]
    fig, axes = plt.subplots(1, len(pruned), figsize=(3.2 * len(pruned), 3.2), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], pruned):
        evs = [a["eval"] for a in arms if a["arm"] == name]
        layers = list(evs[0]["tokens"])
        for j, kind in enumerate(KINDS):
            means = [statistics.mean(e[kind]["tokens"][l]["mean"] for e in evs) for l in layers]
            stds = [statistics.mean(e[kind]["tokens"][l]["std"] for e in evs) for l in layers]
            ax.bar([i + 0.4 * j for i in range(len(layers))], means, 0.4, yerr=stds, label=kind, capsize=2)
        ax.set_xticks([i + 0.2 for i in range(len(layers))], [f"L{l}" for l in layers])
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("vision tokens kept (eval, hard)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{stem}_tokens.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(a["arm"] for a in arms):
        runs = [a for a in arms if a["arm"] == name]
        curve = runs[0]["curve"]
        steps = [r["step"] for r in curve]
        ax1.plot(steps, [r.get("loss_ntp", r["loss"]) for r in curve], label=name, lw=1)
        if "n_bar_hard" in curve[0] and name not in ("fixed", "fastv"):
            ax2.plot(steps, [r["n_bar_hard"] for r in curve], label=f"{name} hard", lw=1)
            ax2.plot(steps, [r["n_bar_soft"] for r in curve], ls=":", lw=1, label=f"{name} soft")
    ax2.axhline(target, color="k", lw=0.8, ls="--", label="target")
    ax1.set_xlabel("step (seed %d)" % arms[0]["seed"])
    ax1.set_ylabel("next-token loss")
    ax1.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("N_bar (training batch)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(f"{stem}_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--grid", type=int, default=12, help="vision-token grid side (tiny LLaVA at 2 px patches)")
    p.add_argument("--object", type=int, default=2, help="object side in vision tokens")
    p.add_argument("--target", type=float, default=60.0, help="N_bar target (tokens per decoder layer)")
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--arm-steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-size", type=int, default=256, help="held-out examples, half of each kind")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--lr-warmup", type=float, default=1e-3)
    p.add_argument("--lr-lm", type=float, default=2e-4)
    p.add_argument("--lr-atp", type=float, default=None, help="default: atp_llava.optim.DEFAULT_LR_ATP")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few steps, no ablations")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.lr_atp is None:
        from atp_llava.optim import DEFAULT_LR_ATP

        args.lr_atp = DEFAULT_LR_ATP
    if args.quick:
        args.seeds, args.warmup_steps, args.arm_steps, args.eval_size, args.ablations = [0], 4, 3, 16, []
        args.batch_size = 4
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    arms_per_seed = 4 + len(args.ablations)
    total = len(args.seeds) * (args.warmup_steps + arms_per_seed * args.arm_steps)
    progress = tqdm(total=total, unit="step", desc="adaptivity", disable=args.no_progress)
    t0 = time.perf_counter()
    arms: List[Dict[str, Any]] = []
    for seed in args.seeds:
        arms += run_seed(seed, args, progress)
    progress.close()
    report = {
        "bench": "adaptivity",
        "command": "python bench/adaptivity.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "atp_ops": atp_ops.__version__,
                     "transformers": __import__("transformers").__version__},
        "args": vars(args), "seconds": time.perf_counter() - t0,
        "summary": aggregate(arms), "targets": targets(arms, args.target), "arms": arms,
    }
    print(json.dumps({"summary": report["summary"], "targets": report["targets"]["all_seeds"],
                      "seconds": round(report["seconds"], 1)}, indent=1))
    if not args.no_json:
        os.makedirs(RESULTS, exist_ok=True)
        stem = os.path.join(RESULTS, "adaptivity_cpu_" + datetime.datetime.now(datetime.timezone.utc)
                            .strftime("%Y%m%dT%H%M%SZ"))
        report["plots"] = [os.path.relpath(p, RESULTS) for p in plot(arms, args.target, stem)]
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", stem + ".json", *report["plots"])
    return report


if __name__ == "__main__":
    main()
