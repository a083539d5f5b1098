"""Command line: the efficiency report of one ATP-LLaVA call (paper Table 6 columns, Eq. 15-16,
DESIGN §3.7) on synthetic prompts. The report itself is ``atp_llava.core.efficiency.ATPReport``, which
``model.atp_report`` holds after every forward and every ``generate()``.

    python -m atp_llava.report --tiny --theta 0.5 0.5 --new-tokens 8
    python -m atp_llava.report --model DIR --atp atp.safetensors --batch 4 --json report.json
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch

from .core.efficiency import ATPReport

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .tools.cli import add_model_args

    p = argparse.ArgumentParser(prog="python -m atp_llava.report", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=2, help="synthetic prompts in the batch (left padded)")
    p.add_argument("--new-tokens", type=int, default=0, help="generate this many tokens (0: one forward)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ATPReport:
    """Command line entry point: one call of the model on synthetic prompts; prints and returns
    its report."""
    from .tools.cli import check_model_args, model_from_args, synthetic_prompts

    parser = _parser()
    args = parser.parse_args(argv)
    check_model_args(args, parser)
    model = model_from_args(args)
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
