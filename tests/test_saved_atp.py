"""ATP files saved by earlier code load with identical logits (DESIGN §10).

tests/data/saved_atp_format2.safetensors was written by save_atp as of 2706ada^ (the last commit
that wrote format "atp_llava/2"), saved_atp_format4.safetensors by save_atp as of 05a8ac9 (format
"atp_llava/4", before the package layout change); saved_atp_logits.safetensors holds the batch
and what 05a8ac9's load_atp made of each file on a fresh seeded tiny LLaVA: the eval-mode logits
(hard masks, real pruning) and the tokens kept per ATP layer. tests/data/make_saved_atp.py wrote
them, and its docstring says how.
"""
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from atp_llava import ATPConfig, apply_atp, load_atp, read_atp_config  # noqa: E402
from atp_llava.tools.tiny import tiny_llava  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
IMAGE_SIZE = 16  # as make_saved_atp.py built the model


@pytest.fixture(scope="module")
def saved():
    return load_file(os.path.join(DATA, "saved_atp_logits.safetensors"))


def _batch(saved):
    return {k: saved[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@pytest.mark.parametrize("fmt", ["2", "4"])
def test_a_saved_file_loads_with_identical_logits(saved, fmt):
    path = os.path.join(DATA, f"saved_atp_format{fmt}.safetensors")
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == f"atp_llava/{fmt}"
    model = load_atp(tiny_llava(4, image_size=IMAGE_SIZE), path).eval()
    with torch.no_grad():
        out = model(**_batch(saved))
    assert torch.equal(out.atp_stats["tokens"], saved[f"tokens_format{fmt}"])
    assert torch.equal(out.logits, saved[f"logits_format{fmt}"])


def test_the_saved_logits_depend_on_the_file(saved):
    """The same config with its initial ATP weights prunes differently: the comparison above
    holds only where the file's weights are the ones loaded."""
    config = read_atp_config(os.path.join(DATA, "saved_atp_format4.safetensors"))
    model = apply_atp(tiny_llava(4, image_size=IMAGE_SIZE), config).eval()
    assert isinstance(model.atp.config, ATPConfig)
    with torch.no_grad():
        out = model(**_batch(saved))
    assert not torch.equal(out.atp_stats["tokens"], saved["tokens_format4"])
    assert not torch.equal(out.logits, saved["logits_format4"])
