"""Efficiency report of an ATP-LLaVA call (paper Table 6 columns, Eq. 15-16, DESIGN §3.7).

After every forward (and every ``generate()``), ``model.atp_report`` holds an ``ATPReport``: per
sample and per decoder layer the tokens seen, FLOPs by Eq. 15, KV-cache bytes, and the reduction
against the unpruned model. With hard masks (``model.eval()``) the counts are the tokens the
layers really ran on; in training they are the counts the budget losses see (equal to the hard
ones with the default ``budget="hard"``, the soft expected counts with ``budget="soft"``).

    python -m atp_llava.report --tiny --theta 0.5 0.5 --new-tokens 8
    python -m atp_llava.report --model DIR --atp atp.safetensors --batch 4 --json report.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["ATPReport", "main"]


@dataclass(frozen=True)
class ATPReport:
    """Per-sample efficiency of one call (B samples, ``num_layers`` decoder layers); float64.

    atp_layers: the ATP layer indexes.
    n_bar: (B,) vision tokens per image averaged over all decoder layers (Table 6 "Token").
    vision_tokens: (B, num_layers) vision tokens per image each decoder layer saw.
    tokens_seen: (B, num_layers) tokens (text and vision) each decoder layer saw.
    flops_per_layer, flops, flops_full: Eq. 15 per layer, summed, and summed without pruning
        (``flops_full - flops`` is Eq. 16).
    kv_cache_bytes_per_layer, kv_cache_bytes, kv_cache_bytes_full: the KV cache after the
        prompt (2 * tokens * Hkv * D * bytes per layer), per layer, summed, unpruned.
    generated: tokens generated after the prompt (generate()); ``kv_cache_bytes_final`` and
        ``kv_cache_bytes_final_full``: the cache at the end, which holds all but the last of them
        in every layer (the last token is returned, never fed back).
    """

    atp_layers: Tuple[int, ...]
    n_bar: torch.Tensor
    vision_tokens: torch.Tensor
    tokens_seen: torch.Tensor
    flops_per_layer: torch.Tensor
    flops: torch.Tensor
    flops_full: torch.Tensor
    kv_cache_bytes_per_layer: torch.Tensor
    kv_cache_bytes: torch.Tensor
    kv_cache_bytes_full: torch.Tensor
    generated: int = 0
    kv_cache_bytes_final: Optional[torch.Tensor] = None
    kv_cache_bytes_final_full: Optional[torch.Tensor] = None

    @classmethod
    def from_stats(cls, stats: Dict[str, Any]) -> "ATPReport":
        """From the ``atp_stats`` of one forward."""
        f = lambda k: stats[k].detach().double().cpu()  # noqa: E731
        return cls(atp_layers=tuple(stats["layers"]), n_bar=f("n_bar"), vision_tokens=f("tokens_per_layer"),
                   tokens_seen=f("tokens_seen"), flops_per_layer=f("flops_per_layer"), flops=f("flops"),
                   flops_full=f("flops_full"), kv_cache_bytes_per_layer=f("kv_cache_bytes_per_layer"),
                   kv_cache_bytes=f("kv_cache_bytes"), kv_cache_bytes_full=f("kv_cache_bytes_full"),
                   kv_cache_bytes_final=f("kv_cache_bytes"), kv_cache_bytes_final_full=f("kv_cache_bytes_full"))

    def with_generated(self, generated: int, kv_bytes_per_token_layer: int) -> "ATPReport":
        """The report of a generate() call that returned ``generated`` new tokens: all but the last
        went into every layer's cache, ``kv_bytes_per_token_layer`` (= 2 * Hkv * D * bytes) each."""
        extra = float(max(generated - 1, 0) * self.tokens_seen.shape[1] * kv_bytes_per_token_layer)
        return replace(self, generated=int(generated), kv_cache_bytes_final=self.kv_cache_bytes + extra,
                       kv_cache_bytes_final_full=self.kv_cache_bytes_full + extra)

    @property
    def flops_reduction(self) -> torch.Tensor:
        """(B,) 1 - FLOPs / unpruned FLOPs (Table 6 "Δ" of TFLOPs)."""
        return 1.0 - self.flops / self.flops_full

    @property
    def kv_cache_reduction(self) -> torch.Tensor:
        """(B,) 1 - KV bytes / unpruned KV bytes after the prompt (Table 6 "Δ" of the cache)."""
        return 1.0 - self.kv_cache_bytes / self.kv_cache_bytes_full

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"atp_layers": list(self.atp_layers), "generated": self.generated}
        for name in ("n_bar", "vision_tokens", "tokens_seen", "flops_per_layer", "flops", "flops_full",
                     "kv_cache_bytes_per_layer", "kv_cache_bytes", "kv_cache_bytes_full", "kv_cache_bytes_final",
                     "kv_cache_bytes_final_full"):
            out[name] = getattr(self, name).tolist()
        out["flops_reduction"] = self.flops_reduction.tolist()
        out["kv_cache_reduction"] = self.kv_cache_reduction.tolist()
        return out

    def format(self) -> str:
        """Table 6 columns per sample, then the vision tokens each decoder layer saw."""
        lines = [f"ATP layers {list(self.atp_layers)}; generated tokens {self.generated}",
                 f"{'sample':>6} {'Token':>8} {'KV MB':>10} {'Δ':>7} {'TFLOPs':>10} {'Δ':>7}"]
        for b in range(self.n_bar.shape[0]):
            lines.append(f"{b:>6} {self.n_bar[b]:>8.1f} {self.kv_cache_bytes[b] / 2**20:>10.3f} "
                         f"{self.kv_cache_reduction[b]:>7.1%} {self.flops[b] / 1e12:>10.4f} "
                         f"{self.flops_reduction[b]:>7.1%}")
        lines.append("vision tokens per image seen by each decoder layer:")
        for b in range(self.n_bar.shape[0]):
            lines.append(f"{b:>6} " + " ".join(f"{x:.0f}" for x in self.vision_tokens[b].tolist()))
        return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from .cli import add_model_args

    p = argparse.ArgumentParser(prog="python -m atp_llava.report", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=2, help="synthetic prompts in the batch (left padded)")
    p.add_argument("--new-tokens", type=int, default=0, help="generate this many tokens (0: one forward)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ATPReport:
    """Command line entry point: one call of the model on synthetic prompts; prints and returns
    its report."""
    from .cli import check_model_args, load_model, synthetic_prompts

    parser = _parser()
    args = parser.parse_args(argv)
    check_model_args(args, parser)
    model = load_model(args)
    inputs = synthetic_prompts(model, args.batch, args.seed)
    with torch.no_grad():
        if args.new_tokens > 0:
            model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        else:
            model(**inputs)
    report: ATPReport = model.atp_report
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
