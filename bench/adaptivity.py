"""Does ATP hold its budget and spend it where each instance needs it? Synthetic tasks on the tiny
LLaVA, on the CPU.

Two tasks, each example with a *need*: how many image regions its answer depends on.

``count`` (the default): a background of one of four colours with 1 to 6 objects of an asked
    colour and 0 to 2 distractors of the other colours (each object 2 x 2 vision tokens, apart
    from the others); the question names a colour, the answer is how many objects have it. The
    need is that number: 4 to 24 relevant tokens of 144, varying from image to image, and the
    answer is read from the vision tokens in the decoder layers after the first ATP layer, so
    dropping them costs accuracy (fixed top-k and random selection at the target budget lose
    to the unpruned model).
``colour``: one object on a background; "coarse" questions ask for the background (need 0: any
    token answers), "fine" ones for the object (need 1: 4 of 144 tokens).

Per seed, the tiny LLaVA (tiny.py: 4 decoder layers, d 64; 24 px images: 12 x 12 = 144 vision
tokens) is trained unpruned on the task (warm-up: LM and projector, vision tower frozen). Then
every arm starts from those weights and trains the same number of steps with the LM trainable
(``--frozen-lm``: the ATP modules alone):

  unpruned   no pruning
  adaptive   ATP with this package's defaults (ATPConfig, the default learning rate)
  penalty, unbounded, raw_inputs, soft_budget, l1_target, no_floor
             adaptive with one option set back to the paper's choice (``ABLATIONS``);
             paper_budget: both budget options (penalty, unbounded) at once
  redundancy_first
             adaptive with the spatial thresholds starting at 0.9 (the spatial branch keeps its
             sparsest levels at first; the redundancy branch holds the budget from the start)
  sparse_spatial
             the spatial thresholds starting at 0.5, between the stride-2 and stride-3 levels
             (0.25 and 0.67 at lambda_sample 3): the spatial branch starts with strides 3 and up
             (36 of 144 tokens) instead of every stride (64)
  wide_spacing
             lambda_sample 8: stride 2 leaves the levels (its score would be -1), the others
             spread out (0.11, 0.50, 0.68, 0.78, ...); at the initial 0.1 the spatial branch
             keeps strides 3 and up (36 tokens)
  temperature_5, temperature_20
             the masks' temperature T (default 10) halved and doubled
  score_grad the masks' gradient reaches the score layers' queries and keys through the scores
             (ATPConfig.score_grad): the LM can learn to mark the tokens the answer needs
  fixed      top-k by S_red at the same layers (paper Table 2), at the adaptive arm's mean
             hard count per layer at eval
  random     the same counts, tokens drawn uniformly (mode "random")
  fastv      FastV before the first ATP layer, keeping what gives the adaptive arm's eval N_bar

Per seed, ``score_recall`` first measures where the scores can work: with the warmed-up LM, the
share of the relevant tokens among the top 24 by S_red and by FastV's attention for an ATP layer
at each depth. Each arm is evaluated on held-out examples in ``model.eval()`` (hard masks, real
pruning):
accuracy overall and by need; per ATP layer the hard tokens kept (mean, std, by need), their
Spearman correlation with the need, how many were kept by the redundancy branch alone, the
spatial branch alone and both, and the recall of the relevant tokens; the thresholds (samples
at exactly 0 or 1); N_bar; the training curves (hard N_bar and the budget weight). The targets,
per seed, on the adaptive arm: eval N_bar within 5% of the target; no saturated threshold;
tokens kept rise with need (Spearman > 0.3 at the first ATP layer); accuracy at least that of
fixed, random and FastV.

    python bench/adaptivity.py                      # count, 3 seeds, ~46 min on one core; JSON + PNGs
    python bench/adaptivity.py --task colour        # the two-kind task
    python bench/adaptivity.py --task colour --grid 24 --target 160 --arm-steps 400 --frozen-lm --seeds 0 \
        --ablations penalty paper_budget            # a 24 x 24 grid, the LM frozen
    python bench/adaptivity.py --quick --no-json    # a smoke run (CI)
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
from atp_llava.core.layout import IGNORE_INDEX  # noqa: E402
from atp_llava.core.optim import param_groups  # noqa: E402
from atp_llava.core.step import KEEP_REDUNDANT, KEEP_SPATIAL  # noqa: E402
from atp_llava.tools.data import collate  # noqa: E402
from atp_llava.tools.tiny import tiny_llava  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ABLATIONS = {  # arm -> the ATPConfig fields changed: back to the paper's choice, or another option
    "penalty": {"budget_control": "penalty"},
    "paper_budget": {"budget_control": "penalty", "logit_bound": None},
    "unbounded": {"logit_bound": None},
    "redundancy_first": {"init_spatial_threshold": 0.9},
    "sparse_spatial": {"init_spatial_threshold": 0.5},
    "wide_spacing": {"lambda_sample": 8.0},
    "temperature_5": {"temperature": 5.0},
    "temperature_20": {"temperature": 20.0},
    "raw_inputs": {"mlp_inputs": "raw"},
    "soft_budget": {"budget": "soft"},
    "l1_target": {"target_loss": "l1"},
    "no_floor": {"min_keep": 0},
    "score_grad": {"score_grad": True},
}
PALETTE = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5], [1.2, 1.2, -1.0]])
# Token ids (tiny vocabulary of 128): 1 bos, 2 eos, 3 "USER:", 4 "ASSISTANT:", 10 + q the question,
# 20 + a the answer, image_token_id the vision tokens.


class _Task(torch.utils.data.Dataset):
    """``n`` examples deterministic in (seed, index): {pixel_values, input_ids, labels, need,
    relevant (the grid's relevant tokens, bool (H * W,))}."""

    def __init__(self, n: int, seed: int, image_token_id: int, grid: int = 12, obj: int = 2, patch: int = 2,
                 noise: float = 0.3):
        self.n, self.seed, self.image_token_id = n, seed, image_token_id
        self.grid, self.obj, self.patch, self.noise = grid, obj, patch, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.example(torch.Generator().manual_seed(self.seed * 1_000_003 + i), i)

    def _image(self, g, background: int, objects: Sequence[int], relevant: int):
        """Pixels with ``objects`` (their colours) at random places at least one token apart, and
        the (H * W,) mask of the first ``relevant`` ones' tokens."""
        size, p, o = self.grid * self.patch, self.patch, self.obj
        pixels = PALETTE[background][:, None, None].expand(3, size, size).clone()
        mask = torch.zeros(self.grid, self.grid, dtype=torch.bool)
        placed: List[tuple] = []
        while len(placed) < len(objects):
            r, c = (int(x) for x in torch.randint(0, self.grid - o + 1, (2,), generator=g))
            if all(abs(r - r2) > o or abs(c - c2) > o for r2, c2 in placed):
                placed.append((r, c))
        for j, ((r, c), colour) in enumerate(zip(placed, objects)):
            pixels[:, r * p:(r + o) * p, c * p:(c + o) * p] = PALETTE[colour][:, None, None]
            if j < relevant:
                mask[r:r + o, c:c + o] = True
        pixels += self.noise * torch.randn(3, size, size, generator=g)
        return pixels, mask.reshape(-1)

    def _record(self, pixels, question: int, answer: int, need: int, relevant) -> Dict[str, Any]:
        ids = [1, 3] + [self.image_token_id] * (self.grid * self.grid) + [10 + question, 4]
        target = [20 + answer, 2]
        return {"pixel_values": pixels[None], "input_ids": ids + target,
                "labels": [IGNORE_INDEX] * len(ids) + target, "need": need, "relevant": relevant}


class CountTask(_Task):
    """How many objects of the asked colour? 1 to ``max_count`` of them, 0 to 2 distractors."""

    max_count = 6

    def example(self, g, i):
        k = 1 + int(torch.randint(0, self.max_count, (1,), generator=g))
        distractors = int(torch.randint(0, 3, (1,), generator=g))
        background = int(torch.randint(0, 4, (1,), generator=g))
        others = [c for c in range(4) if c != background]
        asked = others[int(torch.randint(0, 3, (1,), generator=g))]
        rest = [c for c in others if c != asked]
        colours = [asked] * k + [rest[int(torch.randint(0, 2, (1,), generator=g))] for _ in range(distractors)]
        pixels, relevant = self._image(g, background, colours, k)
        return self._record(pixels, asked, k, k, relevant)


class ColourTask(_Task):
    """Alternating coarse (the background's colour, need 0) and fine (the object's, need 1)."""

    def example(self, g, i):
        fine = i % 2
        background = int(torch.randint(0, 4, (1,), generator=g))
        colour = (background + 1 + int(torch.randint(0, 3, (1,), generator=g))) % 4
        pixels, relevant = self._image(g, background, [colour], 1)
        return self._record(pixels, fine, colour if fine else background, fine,
                            relevant if fine else torch.ones_like(relevant))


TASKS = {"count": CountTask, "colour": ColourTask}
# per task: ATP layers (both: ATPConfig.default_layers(4), the package default), target N_bar,
# warm-up steps, arm steps (the defaults of the command line)
TASK_DEFAULTS = {"count": ((1, 2, 3), 84.0, 3000, 200), "colour": ((1, 2, 3), 60.0, 500, 80)}


def task(n: int, seed: int, model, args) -> _Task:
    return TASKS[args.task](n, seed, model.config.image_token_id, grid=args.grid)


def batches(dataset: _Task, batch_size: int, seed: int, shuffle: bool = True):
    """Endless shuffled batches (training) or one pass in order (shuffle=False)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=g).tolist() if shuffle else list(range(len(dataset)))
        for s in range(0, len(order) - (batch_size - 1 if shuffle else 0), batch_size):
            items = [dataset[j] for j in order[s:s + batch_size]]
            batch = collate([{k: v for k, v in it.items() if k not in ("need", "relevant")} for it in items],
                            pad_token_id=0)
            batch["need"] = torch.tensor([it["need"] for it in items])
            batch["relevant"] = torch.stack([it["relevant"] for it in items])
            yield batch
        if not shuffle:
            return


def model_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in ("need", "relevant")}


def summary(values: torch.Tensor) -> Dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "min": float(v.min()),
            "max": float(v.max())}


def spearman(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """Spearman's rank correlation (ties get their average rank); None where either is constant."""
    def ranks(v):
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in v.unique():  # average rank of ties
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if float(rx.std()) == 0.0 or float(ry.std()) == 0.0:
        return None
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def train_steps(model, data, steps: int, lr_atp: float, lr_lm: float, progress, label: str) -> List[Dict[str, float]]:
    """``steps`` AdamW steps on ``data``; returns one log row per step."""
    if steps == 0:
        return []
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
            if "theta_r" in st:
                row["budget_weight"] = float(st["budget_weight"])
        rows.append({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
        progress.update(1)
        progress.set_postfix_str(f"{label} loss {row['loss']:.3f}" + (f" N_bar {row['n_bar_hard']:.1f}"
                                                                        if "n_bar_hard" in row else ""))
    return rows


@torch.no_grad()
def evaluate(model, dataset: _Task, batch_size: int) -> Dict[str, Any]:
    """Accuracy of the answer token, overall and by need; per ATP layer the hard tokens, their
    correlation with the need, the branches that kept them and the relevant tokens kept."""
    model.eval()
    correct, needs, relevant, tokens, codes, theta_r, theta_s, n_bar = [], [], [], [], [], [], [], []
    for batch in batches(dataset, batch_size, 0, shuffle=False):
        out = model(**model_inputs(batch), use_cache=False)
        labels = batch["labels"]
        rows = torch.arange(labels.shape[0])
        answer_pos = (labels != IGNORE_INDEX).float().argmax(1)  # the first answer token
        correct.append(out.logits[rows, answer_pos - 1].argmax(-1) == labels[rows, answer_pos])
        needs.append(batch["need"])
        relevant.append(batch["relevant"])
        st = getattr(out, "atp_stats", None)
        if st is not None:
            tokens.append(st["tokens_hard"])
            codes.append(torch.stack(st["keep_codes"], 1))  # (B, K, N): one image per sample
            n_bar.append(st["n_bar"])
            if "theta_r" in st:
                theta_r.append(st["theta_r"])
                theta_s.append(st["theta_s"])
    correct, needs, relevant = torch.cat(correct), torch.cat(needs), torch.cat(relevant)
    res: Dict[str, Any] = {"accuracy": float(correct.float().mean()), "n": len(correct)}
    res["by_need"] = {int(v): {"accuracy": float(correct[needs == v].float().mean()), "n": int((needs == v).sum())}
                      for v in needs.unique()}
    if not tokens:
        return res
    layers = model.atp.config.layers
    tokens, codes, n_bar = torch.cat(tokens), torch.cat(codes), torch.cat(n_bar)
    res["n_bar"] = float(n_bar.mean())
    res["layers"] = {}
    for k, layer in enumerate(layers):
        c = codes[:, k]
        kept = c > 0
        rel = relevant.sum(1).clamp_min(1)
        res["layers"][str(layer)] = {
            "tokens": summary(tokens[:, k]),
            "spearman_tokens_need": spearman(tokens[:, k], needs),
            "tokens_by_need": {int(v): float(tokens[needs == v, k].mean()) for v in needs.unique()},
            "redundancy_only": float((c == KEEP_REDUNDANT).sum(1).float().mean()),
            "spatial_only": float((c == KEEP_SPATIAL).sum(1).float().mean()),
            "both": float((c == KEEP_REDUNDANT | KEEP_SPATIAL).sum(1).float().mean()),
            "relevant_recall": float(((kept & relevant).sum(1) / rel).mean()),
        }
    if theta_r:
        tr, ts = torch.cat(theta_r), torch.cat(theta_s)
        for k, layer in enumerate(layers):
            res["layers"][str(layer)]["theta_r"] = summary(tr[:, k])
            res["layers"][str(layer)]["theta_s"] = summary(ts[:, k])
        th = torch.cat([tr, ts], 1)
        res["saturated_samples"] = int(((th == 0) | (th == 1)).any(1).sum())
    return res


def warm_up(seed: int, args, progress) -> torch.nn.Module:
    """The tiny LLaVA trained unpruned on the task (LM and projector; vision tower frozen)."""
    model = tiny_llava(4, seed=seed, image_size=2 * args.grid)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.vision_tower."))
    data = batches(task(1_000_000, seed, model, args), args.batch_size, seed)
    train_steps(model, data, args.warmup_steps, 0.0, args.lr_warmup, progress, f"seed {seed} warm-up")
    return model


def run_arm(base, name: str, config: Optional[ATPConfig], seed: int, args, eval_set, progress) -> Dict[str, Any]:
    """Train one arm from the warmed-up weights and evaluate it. With ``--frozen-lm`` the LM
    stays as warmed up: the unpruned and the fixed-count arms have nothing to train."""
    model = copy.deepcopy(base)
    # Every arm of a seed starts from the same random state: the threshold MLPs' initialisation
    # does not depend on the arms run before, and an ablation differs from the adaptive arm by
    # its option alone.
    torch.manual_seed(seed)
    if config is not None:
        apply_atp(model, config)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(not args.frozen_lm and not n.startswith("model.vision_tower."))
    data = batches(task(1_000_000, seed + 7919, model, args), args.batch_size, seed + 1)
    t0 = time.perf_counter()
    steps = args.arm_steps if any(p.requires_grad for p in model.parameters()) else 0
    progress.update(args.arm_steps - steps)
    curve = train_steps(model, data, steps, args.lr_atp, args.lr_lm, progress, f"seed {seed} {name}")
    result = {"arm": name, "seed": seed, "train_seconds": time.perf_counter() - t0,
              "config": None if config is None else model.atp.config.to_dict(), "curve": curve}
    result["eval"] = evaluate(model, eval_set, args.eval_batch)
    return result


def adaptive_config(args, **changes) -> ATPConfig:
    return ATPConfig(layers=tuple(args.layers), target_tokens=args.target, train_lm=not args.frozen_lm, **changes)


def score_recall(base, eval_set, args, keep: int = 24) -> Dict[str, Dict[str, float]]:
    """How well each decoder layer's scores find the relevant tokens, with the warmed-up LM: the
    share of the relevant tokens among the top ``keep`` by S_red (fixed mode) and by the last
    instruction token's attention (FastV) when an ATP layer at ``l`` prunes, for every possible
    ``l``, and what a uniform draw keeps. Decides where the first ATP layer can work."""
    n = args.grid * args.grid
    out = {}
    for layer in range(1, base.config.text_config.num_hidden_layers):
        row = {"random": keep / n}
        for mode, name in (("fixed", "s_red"), ("fastv", "fastv")):
            model = apply_atp(copy.deepcopy(base), ATPConfig(layers=(layer,), mode=mode, fixed_keep=(keep,),
                                                            train_lm=True, target_tokens=args.target))
            row[name] = evaluate(model, eval_set, args.eval_batch)["layers"][str(layer)]["relevant_recall"]
        out[str(layer)] = row
    return out


def run_seed(seed: int, args, progress) -> List[Dict[str, Any]]:
    torch.manual_seed(seed)
    base = warm_up(seed, args, progress)
    eval_set = task(args.eval_size, seed + 104_729, base, args)
    arms = [run_arm(base, "unpruned", None, seed, args, eval_set, progress)]
    arms[0]["score_recall"] = score_recall(base, eval_set, args)
    adaptive = run_arm(base, "adaptive", adaptive_config(args), seed, args, eval_set, progress)
    arms.append(adaptive)
    for name in args.ablations:
        arms.append(run_arm(base, name, adaptive_config(args, **ABLATIONS[name]), seed, args, eval_set, progress))
    layers = adaptive["eval"]["layers"]
    keep = tuple(max(1, int(round(layers[str(layer)]["tokens"]["mean"]))) for layer in args.layers)
    for mode in ("fixed", "random"):
        arms.append(run_arm(base, mode, ATPConfig(layers=tuple(args.layers), mode=mode, fixed_keep=keep,
                                                  train_lm=not args.frozen_lm, target_tokens=args.target,
                                                  random_seed=seed),
                            seed, args, eval_set, progress))
    vc, depth = base.config.vision_config, base.config.text_config.num_hidden_layers
    fastv_keep = ATPConfig.matched_fastv_keep(adaptive["eval"]["n_bar"], args.layers[0], depth,
                                              (vc.image_size // vc.patch_size) ** 2)
    fastv = ATPConfig(layers=(args.layers[0],), mode="fastv", fixed_keep=(max(1, fastv_keep),),
                      train_lm=not args.frozen_lm, target_tokens=args.target)
    arms.append(run_arm(base, "fastv", fastv,
                        seed, args, eval_set, progress))
    return arms


def targets(arms: List[Dict[str, Any]], target: float) -> Dict[str, Any]:
    """The targets of the method, per seed and over all seeds, on the adaptive arm."""
    per_seed = []
    for seed in sorted({a["seed"] for a in arms}):
        by = {a["arm"]: a["eval"] for a in arms if a["seed"] == seed}
        ad = by["adaptive"]
        first = next(iter(ad["layers"].values()))
        rho = first["spearman_tokens_need"]
        per_seed.append({
            "seed": seed,
            "n_bar_eval": ad["n_bar"],
            "n_bar_within_5pct": abs(ad["n_bar"] - target) <= 0.05 * target,
            "saturated_samples": ad["saturated_samples"],
            "no_saturated_threshold": ad["saturated_samples"] == 0,
            "spearman_first_layer": rho,
            "tokens_rise_with_need": rho is not None and rho > 0.3,
            "accuracy": {arm: by[arm]["accuracy"] for arm in ("adaptive", "fixed", "random", "fastv", "unpruned")},
            "adaptive_geq_baselines": all(ad["accuracy"] >= by[arm]["accuracy"]
                                          for arm in ("fixed", "random", "fastv")),
        })
    keys = ("n_bar_within_5pct", "no_saturated_threshold", "tokens_rise_with_need", "adaptive_geq_baselines")
    return {"per_seed": per_seed, "all_seeds": {k: all(s[k] for s in per_seed) for k in keys}}


def _spread(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values)}


def aggregate(arms: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per arm, over seeds (mean, std, min, max): accuracy, eval N_bar and per ATP layer the
    tokens, their correlation with need, the branches' shares and the relevant tokens kept."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(a["arm"] for a in arms):
        evs = [a["eval"] for a in arms if a["arm"] == name]
        row: Dict[str, Any] = {"accuracy": _spread([e["accuracy"] for e in evs])}
        needs = sorted(evs[0]["by_need"])
        row["accuracy_by_need"] = {v: statistics.mean(e["by_need"][v]["accuracy"] for e in evs) for v in needs}
        if "n_bar" in evs[0]:
            row["n_bar"] = _spread([e["n_bar"] for e in evs])
            row["layers"] = {}
            for layer in evs[0]["layers"]:
                ls = [e["layers"][layer] for e in evs]
                rhos = [x["spearman_tokens_need"] for x in ls if x["spearman_tokens_need"] is not None]
                row["layers"][layer] = {
                    "tokens": _spread([x["tokens"]["mean"] for x in ls]),
                    "spearman_tokens_need": _spread(rhos) if rhos else None,
                    **{key: statistics.mean(x[key] for x in ls)
                       for key in ("redundancy_only", "spatial_only", "both", "relevant_recall")},
                }
        out[name] = row
    return out


def plot(arms: List[Dict[str, Any]], target: float, stem: str) -> List[str]:
    """Tokens kept per ATP layer against the need (eval; adaptive and its ablations) and the
    training curves (hard N_bar and the budget weight of the seed's adaptive arms)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or .[bench])")
        return []
    paths = []
    names = [n for n in dict.fromkeys(a["arm"] for a in arms) if n not in ("unpruned", "fastv")]
    layers = list(next(a for a in arms if a["arm"] == "adaptive")["eval"]["layers"])
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), sharey=True, squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name in names:
            evs = [a["eval"] for a in arms if a["arm"] == name]
            needs = sorted(evs[0]["layers"][layer]["tokens_by_need"])
            means = [statistics.mean(e["layers"][layer]["tokens_by_need"][v] for e in evs) for v in needs]
            ax.plot(needs, means, marker="o", lw=1.6 if name == "adaptive" else 0.8, label=name)
        ax.set_title(f"tokens kept after ATP layer {layer}", fontsize=9)
        ax.set_xlabel("need (relevant objects)")
    axes[0][0].set_ylabel("vision tokens kept (eval, hard, mean over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{stem}_need.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    seed = arms[0]["seed"]
    for a in arms:
        baseline = a["arm"] in ("fixed", "random", "fastv")
        if a["seed"] != seed or not a["curve"] or "n_bar_hard" not in a["curve"][0] or baseline:
            continue
        steps = [r["step"] for r in a["curve"]]
        ax1.plot(steps, [r["n_bar_hard"] for r in a["curve"]], lw=1, label=a["arm"])
        ax2.plot(steps, [r["budget_weight"] for r in a["curve"]], lw=1, label=a["arm"])
    ax1.axhline(target, color="k", lw=0.8, ls="--", label="target")
    ax1.set_xlabel(f"step (seed {seed})")
    ax1.set_ylabel("hard N_bar (training batch)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("budget weight")
    ax2.set_yscale("log")
    ax1.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(f"{stem}_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="count", choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="ATP layers (default: 1 2 3, ATPConfig.default_layers(4))")
    p.add_argument("--grid", type=int, default=12, help="vision-token grid side (tiny LLaVA at 2 px patches)")
    p.add_argument("--target", type=float, default=None, help="N_bar target (count: 84; colour: 60)")
    p.add_argument("--warmup-steps", type=int, default=None, help="count: 3000; colour: 500")
    p.add_argument("--arm-steps", type=int, default=None, help="count: 200; colour: 80")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-size", type=int, default=512, help="held-out examples")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--lr-warmup", type=float, default=1e-3)
    p.add_argument("--lr-lm", type=float, default=2e-4)
    p.add_argument("--lr-atp", type=float, default=None, help="default: atp_llava.core.optim.DEFAULT_LR_ATP")
    p.add_argument("--frozen-lm", action="store_true",
                   help="train the ATP modules alone (ATPConfig.train_lm False, the package default): the "
                        "unpruned, fixed, random and FastV arms are evaluated as warmed up")
    p.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, a few steps, no ablations")
    p.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    layers, target, warmup, arm_steps = TASK_DEFAULTS[args.task]
    args.layers = args.layers or list(layers)
    args.target = args.target if args.target is not None else target
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else warmup
    args.arm_steps = args.arm_steps if args.arm_steps is not None else arm_steps
    if args.lr_atp is None:
        from atp_llava.core.optim import DEFAULT_LR_ATP

        args.lr_atp = DEFAULT_LR_ATP
    if args.quick:
        args.seeds, args.warmup_steps, args.arm_steps, args.eval_size, args.ablations = [0], 4, 3, 16, []
        args.batch_size = 4
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm.auto import tqdm

    arms_per_seed = 5 + len(args.ablations)
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
    print(json.dumps({"summary": {k: {"accuracy": v["accuracy"]["mean"], **({"n_bar": v["n_bar"]["mean"]}
                                                                          if "n_bar" in v else {})}
                                  for k, v in report["summary"].items()},
                      "targets": report["targets"]["all_seeds"], "seconds": round(report["seconds"], 1)}, indent=1))
    if not args.no_json:
        os.makedirs(RESULTS, exist_ok=True)
        stem = os.path.join(RESULTS, f"adaptivity_{args.task}_cpu_" + datetime.datetime.now(datetime.timezone.utc)
                            .strftime("%Y%m%dT%H%M%SZ"))
        report["plots"] = [os.path.relpath(p, RESULTS) for p in plot(arms, args.target, stem)]
        with open(stem + ".json", "w") as f:
            json.dump(report, f, separators=(",", ":"))  # compact: every arm's per-step curve
        print("wrote", stem + ".json", *report["plots"])
    return report


if __name__ == "__main__":
    main()
