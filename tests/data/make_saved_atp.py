"""How tests/data/saved_atp_* were written, for tests/test_saved_atp.py. Run once, with old code:

    git archive 2706ada^ python | tar -x -C /tmp/fmt2     # the last commit that wrote format 2
    git archive 05a8ac9 python | tar -x -C /tmp/base      # the commit before the package layout change
    PYTHONPATH=/tmp/fmt2/python python tests/data/make_saved_atp.py save2 tests/data
    PYTHONPATH=/tmp/base/python python tests/data/make_saved_atp.py save4 tests/data
    PYTHONPATH=/tmp/base/python python tests/data/make_saved_atp.py logits tests/data

save2 / save4: a seeded tiny LLaVA, ATP applied, the ATP parameters moved off their initial
values (so that the file, not the initialisation, decides the thresholds), written by that
commit's save_atp (format "atp_llava/2", format "atp_llava/4"). logits: the base commit loads
each file onto a fresh seeded tiny LLaVA and writes the eval-mode logits (hard masks, real
pruning) of a seeded batch, the batch itself and the kept-token counts.

Only ``tiny_llava``, ``family_batch``, ``ATPConfig``, ``apply_atp``, ``save_atp`` and
``load_atp`` are used, by their top-level or ``tiny`` module names, which both commits have.
"""
import os
import sys

import torch

IMAGE_SIZE = 16  # 8 x 8 image tokens: a small file
CONFIG = dict(layers=(1, 2, 3), target_tokens=40, mlp_width=16, init_threshold=0.4)


def _stock():
    from atp_llava.tiny import tiny_llava

    return tiny_llava(4, image_size=IMAGE_SIZE)


def _save(out: str, name: str) -> None:
    from atp_llava import ATPConfig, apply_atp, save_atp

    model = apply_atp(_stock(), ATPConfig(**CONFIG))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.atp.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    save_atp(model, os.path.join(out, name))


def _logits(out: str) -> None:
    from safetensors.torch import save_file

    from atp_llava import load_atp
    from atp_llava.tiny import family_batch

    batch = family_batch(_stock(), [[None], [None]], seed=0, text=(5, 9))
    batch.pop("labels")
    tensors = {k: v.contiguous() for k, v in batch.items()}
    for fmt in ("2", "4"):
        model = load_atp(_stock(), os.path.join(out, f"saved_atp_format{fmt}.safetensors")).eval()
        with torch.no_grad():
            res = model(**batch)
        tensors[f"logits_format{fmt}"] = res.logits.contiguous()
        tensors[f"tokens_format{fmt}"] = res.atp_stats["tokens"].contiguous()
    save_file(tensors, os.path.join(out, "saved_atp_logits.safetensors"))


if __name__ == "__main__":
    step, out = sys.argv[1], sys.argv[2]
    if step == "save2":
        _save(out, "saved_atp_format2.safetensors")
    elif step == "save4":
        _save(out, "saved_atp_format4.safetensors")
    elif step == "logits":
        _logits(out)
    else:
        raise SystemExit(f"unknown step {step!r}: save2, save4 or logits")
