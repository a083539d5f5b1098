"""What a training run reports: the row of one optimizer step (``step_record``), the held-out
eval pass and its record (``evaluate``, ``format_eval``), and the writer of a run's rows (JSON
lines, CSV). ``python -m atp_llava.train`` (``atp_llava.train``) logs through these."""
from __future__ import annotations

import csv
import json
from typing import Any, Dict, List, Mapping, Sequence, Union

import torch
from torch import nn

from ..core.layout import IGNORE_INDEX
from ..patch import get_atp_controller


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _mean_rows(x: torch.Tensor, rows: torch.Tensor) -> float:
    return float(x[rows].float().mean()) if bool(rows.any()) else 0.0


def step_record(step: int, epoch: int, out, lrs: Union[Mapping[str, float], Sequence[float]],
                seconds: float) -> Dict[str, Any]:
    """One log row: losses, N_bar, and per-ATP-layer batch means (over samples with an image) of
    the tokens the budget losses saw (``tokens_l{layer}``), the soft and hard counts
    (``tokens_soft_l{layer}``, ``tokens_hard_l{layer}``) and the thresholds. ``lrs``: the
    learning rate of each parameter group, by name (``lr_atp``, ``lr_lm``) or by position (``lr0``),
    and in mode "adaptive" the budget weight the step's loss used (``budget_weight``)."""
    st = out.atp_stats
    rec: Dict[str, Any] = {"split": "train", "step": step, "epoch": epoch, "loss": float(out.loss.detach()),
                           "loss_ntp": float(st["loss_ntp"]), "loss_atp": float(st["loss_atp"]),
                           "loss_target": float(st["loss_target"]), "n_bar": float(st["n_bar_batch"])}
    if "n_bar_hard" in st:
        rec["n_bar_hard"] = float(st["n_bar_hard"])
    if "theta_r" in st:  # adaptive: L_target's weight this step used (ATPConfig.budget_control)
        rec["budget_weight"] = float(st["budget_weight"])
    rec["flops_ratio"] = float(st["flops"].sum() / st["flops_full"].sum())
    rec["kv_ratio"] = float(st["kv_cache_bytes"].sum() / st["kv_cache_bytes_full"].sum())
    rec["seconds"] = seconds
    has_image = st["images_per_sample"] > 0
    for k, layer in enumerate(st["layers"]):
        for key in ("tokens", "tokens_soft", "tokens_hard", "theta_r", "theta_s"):
            if st.get(key) is not None:
                rec[f"{key}_l{layer}"] = _mean_rows(st[key][:, k], has_image)
    named = ((f"lr_{n}", lr) for n, lr in lrs.items()) if isinstance(lrs, Mapping) else \
        ((f"lr{i}", lr) for i, lr in enumerate(lrs))
    rec.update(named)
    return rec


def _spread(values: torch.Tensor, prefix: str, rec: Dict[str, Any], std: bool = True) -> None:
    """rec[prefix_mean/_std/_min/_max] of a 1D tensor (population std; all 0 when empty)."""
    v = values.double()
    empty = v.numel() == 0
    rec[f"{prefix}_mean"] = 0.0 if empty else float(v.mean())
    if std:
        rec[f"{prefix}_std"] = 0.0 if empty else float(v.std(correction=0))
    rec[f"{prefix}_min"] = 0.0 if empty else float(v.min())
    rec[f"{prefix}_max"] = 0.0 if empty else float(v.max())


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Dict[str, Any]:
    """A held-out pass of an ATP model in ``model.eval()`` (hard masks and real pruning unless its
    ATPConfig says otherwise); the model's train/eval mode is restored afterwards.

    ``loader`` yields ``collate`` batches with labels (-100 off the answer). Teacher-forced: the
    greedy argmax of the logits at each answer position is compared with the label there.

    Returns a flat dict::

        split "eval"; samples (with an answer); correct; accuracy: samples whose every answer
        token is predicted (exact match); token_accuracy; loss: L_ntp per answer token;
        images; n_bar / n_bar_std / n_bar_min / n_bar_max over samples with an image, target_tokens,
        n_bar_minus_target; for each ATP layer l: tokens_l{l}_mean/_std/_min/_max over images
        (the hard counts in eval; population std), theta_r_l{l}_mean/_min/_max and theta_s_...
        over samples with an image (adaptive mode); flops_ratio, kv_ratio against the unpruned
        model; hard, pruned (what the eval forward did).
    """
    inner = _unwrap(model)
    cfg = get_atp_controller(inner).config
    param = next(inner.parameters())
    was_training = inner.training
    inner.eval()
    samples = correct = tok_total = tok_correct = images = 0
    loss_sum = 0.0
    flops = [0.0, 0.0]
    kv = [0.0, 0.0]
    tokens: List[torch.Tensor] = []
    n_bars: List[torch.Tensor] = []
    thetas: Dict[str, List[torch.Tensor]] = {"theta_r": [], "theta_s": []}
    hard = pruned = False
    try:
        for batch in loader:
            batch = {k: v.to(param.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
            out = inner(**batch, use_cache=False)
            st = out.atp_stats
            labels = batch["labels"][:, 1:]
            answer = labels != IGNORE_INDEX
            hit = (out.logits[:, :-1].argmax(-1) == labels) & answer
            has_answer = answer.any(1)
            samples += int(has_answer.sum())
            correct += int(((hit | ~answer).all(1) & has_answer).sum())
            n_tok = int(answer.sum())
            tok_total += n_tok
            tok_correct += int(hit.sum())
            if n_tok:
                loss_sum += float(st["loss_ntp"]) * n_tok
            has_image = st["images_per_sample"] > 0
            images += int(st["images_per_sample"].sum())
            codes = st.get("keep_codes")
            if codes:  # hard masks: the count of every image
                tokens.append(torch.stack([(c != 0).sum(-1) for c in codes], 1).double().cpu())
            else:  # per sample (the mean over its images)
                tokens.append(st.get("tokens_hard", st["tokens"])[has_image].double().cpu())
            n_bars.append(st["n_bar"][has_image].double().cpu())
            for key in thetas:
                if st.get(key) is not None:
                    thetas[key].append(st[key][has_image].double().cpu())
            flops[0] += float(st["flops"].sum())
            flops[1] += float(st["flops_full"].sum())
            kv[0] += float(st["kv_cache_bytes"].sum())
            kv[1] += float(st["kv_cache_bytes_full"].sum())
            hard, pruned = bool(st["hard"]), bool(st["pruned"])
    finally:
        inner.train(was_training)
    if not n_bars:
        raise ValueError("evaluate: the loader yielded no batch")
    layers = tuple(cfg.layers)
    rec: Dict[str, Any] = {"split": "eval", "samples": samples, "correct": correct,
                           "accuracy": correct / samples if samples else 0.0,
                           "token_accuracy": tok_correct / tok_total if tok_total else 0.0,
                           "loss": loss_sum / tok_total if tok_total else 0.0, "images": images}
    spread: Dict[str, Any] = {}
    _spread(torch.cat(n_bars), "n_bar", spread)
    rec["n_bar"] = spread.pop("n_bar_mean")
    rec.update(spread)
    rec["target_tokens"] = float(cfg.target_tokens)
    rec["n_bar_minus_target"] = rec["n_bar"] - rec["target_tokens"]
    per_layer = torch.cat(tokens)
    for k, layer in enumerate(layers):
        _spread(per_layer[:, k], f"tokens_l{layer}", rec)
    for key, parts in thetas.items():
        if parts:
            values = torch.cat(parts)
            for k, layer in enumerate(layers):
                _spread(values[:, k], f"{key}_l{layer}", rec, std=False)
    rec["flops_ratio"] = flops[0] / flops[1] if flops[1] else 1.0
    rec["kv_ratio"] = kv[0] / kv[1] if kv[1] else 1.0
    rec["hard"], rec["pruned"] = hard, pruned
    return rec


def format_eval(rec: Dict[str, Any]) -> str:
    """A readable summary of an ``evaluate`` record."""
    head = [f"eval{'' if 'step' not in rec else ' @ step ' + str(rec['step'])}:",
            f"accuracy {rec['accuracy']:.4f} ({rec['correct']}/{rec['samples']}),",
            f"token accuracy {rec['token_accuracy']:.4f}, loss {rec['loss']:.4f},",
            f"N_bar {rec['n_bar']:.1f} (target {rec['target_tokens']:g}),",
            f"FLOPs x{rec['flops_ratio']:.3f}, KV x{rec['kv_ratio']:.3f}"]
    lines = [" ".join(head)]
    layers = sorted(int(k[len("tokens_l"):-len("_mean")]) for k in rec
                    if k.startswith("tokens_l") and k.endswith("_mean"))
    for layer in layers:
        t = f"tokens_l{layer}"
        line = (f"  layer {layer}: tokens {rec[t + '_mean']:.1f} +- {rec[t + '_std']:.1f} "
                f"[{rec[t + '_min']:.0f}, {rec[t + '_max']:.0f}]")
        for key in ("theta_r", "theta_s"):
            name = f"{key}_l{layer}"
            if name + "_mean" in rec:
                line += (f", {key} {rec[name + '_mean']:.3f} "
                         f"[{rec[name + '_min']:.3f}, {rec[name + '_max']:.3f}]")
        lines.append(line)
    return "\n".join(lines)


class _Log:
    """The log rows of a run: kept, and written as JSON lines / CSV (rank 0's files)."""

    def __init__(self, json_f, csv_f):
        self.rows: List[Dict[str, Any]] = []
        self.json_f, self.csv_f, self.csv_w = json_f, csv_f, None
        self.progress = None

    def step(self, rec: Dict[str, Any]) -> None:
        self._json(rec)
        if self.csv_f:
            if self.csv_w is None:
                self.csv_w = csv.DictWriter(self.csv_f, fieldnames=list(rec))
                self.csv_w.writeheader()
            self.csv_w.writerow(rec)
            self.csv_f.flush()

    def eval(self, rec: Dict[str, Any]) -> None:
        self._json(rec)
        (self.progress.write if self.progress is not None else print)(format_eval(rec))

    def _json(self, rec: Dict[str, Any]) -> None:
        self.rows.append(rec)
        if self.json_f:
            self.json_f.write(json.dumps(rec) + "\n")
            self.json_f.flush()

    def close(self) -> None:
        for f in (self.json_f, self.csv_f):
            if f:
                f.close()
        if self.progress is not None:
            self.progress.close()
