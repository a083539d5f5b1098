"""Paper Fig. 4 visualisation (atp_llava.visualize): the PNG encoder, the panel renderer and its
legend, the keep codes of a tiny ATP-LLaVA drawn one panel per ATP layer, the command line.

All on CPU with the tiny random LLaVA (tiny_llava, 24 x 24 = 576 vision tokens per image).
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest
import torch

pytest.importorskip("transformers")

from atp_llava import ATPConfig, apply_atp, save_atp  # noqa: E402
from atp_llava.core.step import KEEP_REDUNDANT, KEEP_SPATIAL  # noqa: E402
from atp_llava.tools.data import CLIP_MEAN, CLIP_STD  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402
from atp_llava.visualize import (GUTTER, GUTTER_COLOUR, NEUTRAL_COLOUR, PALETTE, denormalize, main,  # noqa: E402
                                 read_png, render_pruning, visualize_pruning, write_png)

GRID = (24, 24)
N_GRID = 576
WHITE = (255, 255, 255)


def cells(panel: torch.Tensor, grid, cell: int) -> torch.Tensor:
    """(H * cell, W * cell, 3) panel -> (H, W, cell, cell, 3): the pixels of every token's cell."""
    h, w = grid
    return panel.view(h, cell, w, cell, 3).permute(0, 2, 1, 3, 4)


def panels(rendered: torch.Tensor, k: int, grid, cell: int):
    """The k panels of a render_pruning image; asserts its width and its gutters."""
    pw = grid[1] * cell
    assert rendered.shape == (grid[0] * cell, k * pw + (k - 1) * GUTTER, 3)
    out = []
    for i in range(k):
        x0 = i * (pw + GUTTER)
        out.append(rendered[:, x0:x0 + pw])
        if i < k - 1:
            assert (rendered[:, x0 + pw:x0 + pw + GUTTER] == torch.tensor(GUTTER_COLOUR, dtype=torch.uint8)).all()
    return out


def border_colours(c: torch.Tensor) -> torch.Tensor:
    """(..., cell, cell, 3) cells -> (..., 4 * cell - 4, 3): the pixels on each cell's edge."""
    return torch.cat([c[..., 0, :, :], c[..., -1, :, :], c[..., 1:-1, 0, :], c[..., 1:-1, -1, :]], dim=-2)


def assert_legend(panel: torch.Tensor, code: torch.Tensor, grid, cell: int) -> None:
    """Every cell of ``panel`` carries the legend of its code: all white if pruned, else a border
    of PALETTE[code] (and then it is not all white)."""
    c = cells(panel, grid, cell)
    code = code.view(grid).long()
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    white = (c == 255).all(-1).all(-1).all(-1)
    assert torch.equal(white, code == 0)
    edge = border_colours(c)
    assert (edge == palette[code][:, :, None, :]).all()


def make_batch(lens, seed=0):
    """Right-padded batch with one image per sample, the image at a different offset in each."""
    g = torch.Generator().manual_seed(seed)
    b, length = len(lens), max(lens)
    ids = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, n in enumerate(lens):
        seq = torch.randint(3, 100, (n,), generator=g)
        seq[2 + i:2 + i + N_GRID] = TINY_IMAGE_TOKEN
        ids[i, :n], mask[i, :n] = seq, 1
    pixels = torch.randn(b, 3, 48, 48, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture(scope="module")
def atp_model():
    return apply_atp(tiny_llava(4), ATPConfig(layers=(1, 2, 3), init_threshold=0.5))


# ----------------------------------------------------------------------------------------------
# PNG


def test_png_round_trip_and_header(tmp_path):
    rgb = torch.randint(0, 256, (7, 13, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "x.png"
    write_png(path, rgb)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (13, 7)
    assert data[24:29] == bytes([8, 2, 0, 0, 0])  # 8 bit, RGB, deflate, filter method 0, no interlace
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    back = read_png(path)
    assert back.dtype == torch.uint8 and torch.equal(back, rgb)
    # every row is stored with filter type 0
    raw = zlib.decompress(data[41:41 + struct.unpack(">I", data[33:37])[0]])
    assert all(raw[r * (1 + 13 * 3)] == 0 for r in range(7))


def test_png_numpy_input_and_bad_files(tmp_path):
    np = pytest.importorskip("numpy")
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    write_png(tmp_path / "a.png", arr)
    assert read_png(tmp_path / "a.png").tolist() == arr.tolist()
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        write_png(tmp_path / "b.png", torch.zeros(2, 3, 3))
    data = bytearray((tmp_path / "a.png").read_bytes())
    data[20] ^= 1  # IHDR height changed, CRC not
    (tmp_path / "c.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        read_png(tmp_path / "c.png")
    (tmp_path / "d.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        read_png(tmp_path / "d.png")


# ----------------------------------------------------------------------------------------------
# rendering


def hand_codes(grid, k=3):
    """k codes that use every code value, differently in every layer."""
    n = grid[0] * grid[1]
    return [((torch.arange(n) + i) % 4).to(torch.uint8) for i in range(k)]


@pytest.mark.parametrize("cell", [8, 5])
def test_render_pruning_panels_and_legend(cell):
    grid = (3, 4)
    codes = hand_codes(grid)
    # one distinct colour per grid token: the image as the model sees it, token by token
    image = torch.arange(12 * 3, dtype=torch.uint8).view(3, 4, 3) * 7
    rendered = render_pruning(codes, grid, image=image, cell=cell)
    for panel, code in zip(panels(rendered, 3, grid, cell), codes):
        assert_legend(panel, code, grid, cell)
        inner = cells(panel, grid, cell)[:, :, 1:-1, 1:-1]  # inside a 1-pixel border
        kept = code.view(grid) != 0
        assert (inner[kept] == image[kept][:, None, None, :]).all()  # cell (r, c) shows token (r, c)


def test_render_pruning_image_resize_and_neutral():
    grid = (2, 3)
    codes = [torch.tensor([3, 1, 2, 0, 3, 3], dtype=torch.uint8)]
    solid = torch.tensor([10, 20, 30], dtype=torch.uint8).expand(37, 23, 3)
    for image, fill in ((solid, (10, 20, 30)), (None, NEUTRAL_COLOUR)):
        rendered = render_pruning(codes, grid, image=image, cell=16)
        assert rendered.shape == (32, 48, 3)  # one panel, no gutter
        assert_legend(rendered, codes[0], grid, 16)
        c = cells(rendered, grid, 16)
        b = 16 // 8
        assert (c[0, 0, b:-b, b:-b] == torch.tensor(fill, dtype=torch.uint8)).all()
    # cells too small for a border are filled with the legend colour
    small = render_pruning(codes, grid, image=solid, cell=2)
    assert torch.equal(cells(small, grid, 2)[..., 0, 0, :], torch.tensor(PALETTE, dtype=torch.uint8)[codes[0].long()]
                       .view(2, 3, 3))


def test_render_pruning_rejects_bad_codes():
    with pytest.raises(ValueError, match="12 tokens"):
        render_pruning([torch.zeros(11, dtype=torch.uint8)], (3, 4))
    with pytest.raises(ValueError, match="0..3"):
        render_pruning([torch.full((12,), 4, dtype=torch.uint8)], (3, 4))


def test_legend_colours_are_distinct():
    assert PALETTE[0] == WHITE and len(set(PALETTE)) == 4
    assert {KEEP_REDUNDANT, KEEP_SPATIAL, KEEP_REDUNDANT | KEEP_SPATIAL} == {1, 2, 3}
    assert GUTTER_COLOUR not in PALETTE


def test_denormalize_inverts_clip_normalisation():
    img = torch.randint(0, 256, (5, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = img.permute(2, 0, 1).float() / 255
    pv = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.equal(denormalize(pv), img)
    assert torch.equal(denormalize(pv * 0 + 100), torch.full((5, 6, 3), 255, dtype=torch.uint8))  # clamped


# ----------------------------------------------------------------------------------------------
# a model


def test_visualize_pruning_matches_keep_codes(atp_model, tmp_path):
    model = atp_model.train()
    batch = make_batch([600, 596])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    model.train()
    codes = [c[1] for c in out.atp_stats["keep_codes"]]
    assert out.atp_stats["image_sample"].tolist() == [0, 1]
    assert set(torch.cat(codes).tolist()) == {0, 1, 2, 3}  # the config prunes, and keeps for both reasons

    path = tmp_path / "fig4.png"
    rendered = visualize_pruning(model, batch["input_ids"], batch["pixel_values"], path,
                                 attention_mask=batch["attention_mask"], image_index=1, cell=4)
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert torch.equal(read_png(path), rendered)
    ps = panels(rendered, 3, GRID, 4)
    for panel, code in zip(ps, codes):
        white = (cells(panel, GRID, 4) == 255).all(-1).all(-1).all(-1)
        assert int(white.sum()) == int((code == 0).sum())
        assert_legend(panel, code, GRID, 4)
    # pruning is cumulative: a token white in one panel stays white in the next
    for a, b in zip(codes, codes[1:]):
        assert not bool(((a == 0) & (b != 0)).any())
    # the kept cells show image 1, de-normalised: 48 px on 24 x 4 px cells is a 2x upscale, so the
    # 2 x 2 pixels inside a cell's border are the token's 2 x 2 image pixels
    shown = denormalize(batch["pixel_values"][1]).view(24, 2, 24, 2, 3).permute(0, 2, 1, 3, 4)
    kept = codes[0].view(GRID) != 0
    assert torch.equal(cells(ps[0], GRID, 4)[:, :, 1:3, 1:3][kept], shown[kept])
    own = visualize_pruning(model, batch["input_ids"], batch["pixel_values"], tmp_path / "own.png",
                            attention_mask=batch["attention_mask"], image_index=1, cell=4,
                            image=torch.zeros(24, 24, 3, dtype=torch.uint8))
    assert (cells(own[:, :96], GRID, 4)[:, :, 1:3, 1:3][kept] == 0).all()  # a given image is used


def test_visualize_pruning_errors(atp_model, tmp_path):
    batch = make_batch([600])
    args = (batch["input_ids"], batch["pixel_values"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no ATP modules"):
        visualize_pruning(tiny_llava(2), *args)
    with pytest.raises(ValueError, match="image_index 1 is out of range"):
        visualize_pruning(atp_model, *args, image_index=1)
    soft = apply_atp(tiny_llava(2), ATPConfig(layers=(1,), hard_in_eval=False))
    with pytest.raises(ValueError, match="hard_in_eval"):
        visualize_pruning(soft, *args)
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------
# command line


def kept_counts(stdout: str):
    return [int(line.split("kept ")[1].split(" /")[0]) for line in stdout.splitlines() if line.startswith("ATP layer")]


def test_cli_tiny_in_process(tmp_path, capsys):
    out = tmp_path / "tiny.png"
    rendered = main(["--tiny", "--seed", "1", "--cell", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert torch.equal(read_png(out), rendered)
    counts = kept_counts(printed)
    assert len(counts) == 3 and counts[0] < N_GRID
    for panel, n_kept in zip(panels(rendered, 3, GRID, 2), counts):
        white = (cells(panel, GRID, 2) == 255).all(-1).all(-1).all(-1)
        assert N_GRID - int(white.sum()) == n_kept


def test_cli_subprocess(tmp_path):
    out = tmp_path / "sub.png"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "atp_llava.visualize", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_png(out).shape == (24 * 8, 3 * 24 * 8 + 2 * GUTTER, 3)
    assert len(kept_counts(res.stdout)) == 3


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary: "w5" -> 5; bos 1, eos 2."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(4, TINY_VOCAB - 1)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": TINY_IMAGE_TOKEN})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def test_cli_model_dir_atp_file_prompt_and_image(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    model_dir = tmp_path / "llava"
    tiny_llava(4).save_pretrained(model_dir)
    out = tmp_path / "m.png"
    main(["--model", str(model_dir), "--layers", "1,3", "--theta", "0.5", "0.5", "--out", str(out), "--cell", "2",
          "--device", "cpu"])
    assert len(kept_counts(capsys.readouterr().out)) == 2
    panels(read_png(out), 2, GRID, 2)

    # trained weights from a file, with their config (here: layers 2, 3)
    weights = tmp_path / "atp.safetensors"
    save_atp(apply_atp(tiny_llava(4), ATPConfig(layers=(2, 3), init_threshold=0.5)), weights)
    main(["--tiny", "--atp", str(weights), "--out", str(out), "--cell", "2"])
    printed = capsys.readouterr().out
    assert "ATP layers 2, 3" in printed and len(kept_counts(printed)) == 2

    # a tokenizer in the checkpoint: a real prompt and an image file (.npy needs no Pillow)
    tiny_tokenizer().save_pretrained(model_dir)
    image = np.zeros((30, 40, 3), dtype=np.uint8)
    image[:, 20:] = 255
    np.save(tmp_path / "im.npy", image)
    rendered = main(["--model", str(model_dir), "--theta", "0.5", "0.5", "--layers", "1,2,3", "--prompt", "w5 w6 w7",
                     "--image", str(tmp_path / "im.npy"), "--out", str(out), "--cell", "4", "--device", "cpu"])
    first = cells(panels(rendered, 3, GRID, 4)[0], GRID, 4)[:, :11]  # the image's black left half
    kept = ~(first == 255).all(-1).all(-1).all(-1)
    assert kept.any() and (first[:, :, 1:3, 1:3][kept] == 0).all()


def test_pillow_reads_our_png_and_a_pillow_image_drives_the_cli(tmp_path, capsys):
    """Pillow is optional (images other than .pt / .npy); where it is installed, an independent
    decoder reads what write_png wrote, and a palette PNG written by Pillow is a valid --image."""
    image_mod = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    rgb = torch.randint(0, 256, (9, 31, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    write_png(tmp_path / "ours.png", rgb)
    assert np.array_equal(np.asarray(image_mod.open(tmp_path / "ours.png").convert("RGB")), rgb.numpy())

    half = np.zeros((30, 40, 3), dtype=np.uint8)
    half[:, 20:] = 255
    image_mod.fromarray(half).convert("P").save(tmp_path / "im.png")  # palette mode: load_image converts
    out = tmp_path / "p.png"
    rendered = main(["--tiny", "--theta", "0.5", "0.5", "--image", str(tmp_path / "im.png"), "--out", str(out),
                     "--cell", "4"])
    k = len(kept_counts(capsys.readouterr().out))
    first = cells(panels(rendered, k, GRID, 4)[0], GRID, 4)[:, :11]  # the image's black left half
    kept = ~(first == 255).all(-1).all(-1).all(-1)
    assert kept.any() and (first[:, :, 1:3, 1:3][kept] == 0).all()
    assert np.array_equal(np.asarray(image_mod.open(out).convert("RGB")), rendered.numpy())


def test_cli_errors(tmp_path, capsys):
    model_dir = tmp_path / "llava"
    tiny_llava(2).save_pretrained(model_dir)
    out = str(tmp_path / "e.png")
    cases = [
        (["--model", str(model_dir), "--layers", "1", "--out", out], "--atp FILE"),
        (["--model", str(model_dir), "--layers", "1", "--theta", "0.5", "0.5", "--prompt", "hi", "--out", out],
         "tokenizer"),
        (["--tiny", "--prompt", "hi", "--out", out], "tokenizer"),
        (["--tiny", "--atp", "a.safetensors", "--theta", "0.5", "0.5", "--out", out], "--atp"),
    ]
    try:
        import PIL  # noqa: F401
    except ImportError:
        (tmp_path / "cat.png").write_bytes(b"")
        cases.append((["--tiny", "--image", str(tmp_path / "cat.png"), "--out", out], "Pillow"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(out)
