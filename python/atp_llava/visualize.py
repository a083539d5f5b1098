"""Paper Fig. 4: which vision tokens every ATP layer keeps, drawn on the image grid, as a PNG.

    python -m atp_llava.visualize --tiny --out atp_tiny.png
    python -m atp_llava.visualize --model llava-1.5-7b-hf/ --atp atp.safetensors \\
        --image cat.npy --prompt "What is the cat doing?" --out cat_atp.png

One panel per ATP layer (``config.layers``, left to right), separated by a grey gutter. Every
vision token of the H x W grid is a ``cell`` x ``cell`` square of the image; its colour says what
the hard mask of that layer (``model.eval()``, ``ATPConfig.hard_in_eval``) did with it:

    white                       pruned at this layer or before (code 0)
    image, orange border        kept by redundancy only: S_red > theta_r   (KEEP_REDUNDANT)
    image, blue border          kept by spatial sampling only: S_spatial > theta_s   (KEEP_SPATIAL)
    image, magenta border       kept by both

(modes "fixed", "fastv" and "random" mark the tokens they keep KEEP_REDUNDANT: orange.) The colours are
``PALETTE[code]``. Cells smaller than 3 pixels have no room for a border and are filled with the
legend colour instead.

No imaging library is needed: PNGs are written (and read back) by a small encoder on zlib and
struct. Pillow is needed only for an ``--image`` in a format other than ``.pt`` / ``.npy``.
"""
from __future__ import annotations

import argparse
import os
import struct
import zlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .core.step import KEEP_REDUNDANT, KEEP_SPATIAL
from .patch import get_atp_controller
from .tools.data import CLIP_MEAN, CLIP_STD, _preprocess, encode_prompt, load_image

__all__ = ["write_png", "read_png", "render_pruning", "denormalize", "pruning_codes", "visualize_pruning",
           "build_parser", "main", "PALETTE", "GUTTER", "GUTTER_COLOUR", "NEUTRAL_COLOUR"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# RGB of each keep code (index = KEEP_REDUNDANT | KEEP_SPATIAL bits; 0 = pruned).
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (255, 255, 255),  # 0: pruned
    (255, 128, 0),    # KEEP_REDUNDANT: orange
    (0, 96, 255),     # KEEP_SPATIAL: blue
    (200, 0, 200),    # both: magenta
)
assert KEEP_REDUNDANT == 1 and KEEP_SPATIAL == 2  # PALETTE is indexed by these bits
GUTTER = 4                        # pixels between two panels
GUTTER_COLOUR = (96, 96, 96)
NEUTRAL_COLOUR = (160, 160, 160)  # cell interior when no image is given


# ----------------------------------------------------------------------------------------------
# PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _rgb_tensor(rgb, name: str) -> torch.Tensor:
    """(H, W, 3) uint8 CPU tensor from a tensor or array of that shape and dtype."""
    t = torch.as_tensor(rgb)
    if t.dim() != 3 or t.shape[-1] != 3 or t.dtype != torch.uint8 or t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty (H, W, 3) uint8 image, got shape {tuple(t.shape)} "
                         f"and dtype {t.dtype}")
    return t.detach().cpu()


def write_png(path: Union[str, os.PathLike], rgb) -> None:
    """Write ``rgb`` (H, W, 3) uint8 (tensor or array) to ``path`` as an 8-bit RGB PNG
    (one IDAT chunk, filter type 0 on every row)."""
    t = _rgb_tensor(rgb, "write_png")
    h, w, _ = t.shape
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), t.reshape(h, w * 3)], dim=1)
    raw = bytes(rows.untyped_storage())  # rows: a fresh contiguous tensor, its storage is exactly its data
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bit, colour type 2 (RGB), no interlace
    with open(path, "wb") as f:
        f.write(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6))
                + _chunk(b"IEND", b""))


def read_png(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Read a PNG as ``write_png`` writes it (8-bit RGB, not interlaced, filter type 0 on every
    row; several IDAT chunks are fine) -> (H, W, 3) uint8 tensor. Chunk CRCs are checked."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"read_png: {path} is not a PNG file")
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if len(body) != length or crc != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"read_png: {path}: chunk {kind!r} is truncated or fails its CRC")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError(f"read_png: {path} has no IHDR or no IDAT chunk")
    w, h, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (8, 2, 0):
        raise ValueError(f"read_png: {path}: only 8-bit RGB non-interlaced PNGs are read, got bit depth {depth}, "
                         f"colour type {colour}, interlace {interlace}")
    raw = zlib.decompress(b"".join(idat))
    if len(raw) != h * (1 + 3 * w):
        raise ValueError(f"read_png: {path}: image data has {len(raw)} bytes, expected {h * (1 + 3 * w)}")
    rows = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(h, 1 + 3 * w)
    if bool(rows[:, 0].any()):
        raise ValueError(f"read_png: {path}: rows use PNG filter types {sorted(set(rows[:, 0].tolist()))}; "
                         "only filter type 0 (None) is read")
    return rows[:, 1:].reshape(h, w, 3).clone()


# ----------------------------------------------------------------------------------------------
# Rendering


def denormalize(pixel_values: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Undo the image processor's normalisation: ``pixel_values`` (3, h, w) float ->
    (h, w, 3) uint8, ``round(255 * clamp(x * std + mean, 0, 1))`` per channel."""
    if pixel_values.dim() != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"denormalize: expected pixel values of shape (3, h, w), got {tuple(pixel_values.shape)}")
    x = pixel_values.detach().float().cpu()
    x = x * torch.tensor(std, dtype=torch.float32)[:, None, None] + torch.tensor(mean, dtype=torch.float32)[:, None, None]
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def render_pruning(codes: Sequence[torch.Tensor], grid: Tuple[int, int], image=None,
                   cell: int = 8, gutter: int = GUTTER) -> torch.Tensor:
    """Draw the keep codes of one image, one panel per ATP layer.

    codes: K tensors of shape (N,) (or a (K, N) tensor), N = H * W grid tokens row-major, values
        in {0, KEEP_REDUNDANT, KEEP_SPATIAL, KEEP_REDUNDANT | KEEP_SPATIAL} (``atp_stats
        ["keep_codes"][k][image]``).
    grid: (H, W) of the vision-token grid.
    image: (h, w, 3) uint8 image (tensor or array) shown inside the kept cells, resized to (H * cell, W * cell)
        by area sampling; None = a flat NEUTRAL_COLOUR.
    cell: side of one token's cell in pixels; gutter: pixels of GUTTER_COLOUR between panels.

    Returns (H * cell, K * W * cell + (K - 1) * gutter, 3) uint8. Legend (``PALETTE[code]``):
    pruned cells are white; a kept cell shows the image inside a border of
    max(1, cell // 8) pixels coloured orange (kept by redundancy only), blue (by spatial
    sampling only) or magenta (both). A cell under 3 pixels is filled with its colour instead.
    """
    h, w = (int(s) for s in grid)
    codes = torch.stack([torch.as_tensor(c).detach().cpu().reshape(-1) for c in codes]).long()
    k = codes.shape[0]
    if k == 0 or codes.shape[1] != h * w:
        raise ValueError(f"render_pruning: expected at least one code tensor of {h} x {w} = {h * w} tokens, "
                         f"got shape {tuple(codes.shape)}")
    if bool(((codes < 0) | (codes >= len(PALETTE))).any()):
        raise ValueError(f"render_pruning: keep codes must lie in 0..{len(PALETTE) - 1}, "
                         f"got {sorted(set(codes.unique().tolist()))}")
    if cell < 1 or gutter < 0:
        raise ValueError(f"render_pruning: need cell >= 1 and gutter >= 0, got cell={cell}, gutter={gutter}")
    ph, pw = h * cell, w * cell
    if image is None:
        background = torch.tensor(NEUTRAL_COLOUR, dtype=torch.uint8).expand(ph, pw, 3)
    else:
        img = _rgb_tensor(image, "render_pruning").permute(2, 0, 1)[None].float()
        background = F.interpolate(img, size=(ph, pw), mode="area")[0].round().clamp(0, 255).to(torch.uint8)
        background = background.permute(1, 2, 0)
    # Border pattern of one cell, tiled over the panel.
    b = max(1, cell // 8) if cell >= 3 else cell
    edge = torch.zeros(cell, dtype=torch.bool)
    edge[:b] = True
    edge[cell - b:] = True
    border = (edge[:, None] | edge[None, :]).repeat(h, w)
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    panels = []
    for code in codes:
        code_px = code.view(h, w).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        colour = (border | (code_px == 0))[..., None]
        panels.append(torch.where(colour, palette[code_px], background))
        panels.append(torch.tensor(GUTTER_COLOUR, dtype=torch.uint8).expand(ph, gutter, 3))
    return torch.cat(panels[:-1], dim=1).contiguous()


# ----------------------------------------------------------------------------------------------
# Running a model


def pruning_codes(model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor, *,
                  attention_mask: Optional[torch.Tensor] = None, image_index: int = 0) -> List[torch.Tensor]:
    """Run an ATP-LLaVA ``model`` once (eval mode, no grad; every module's training flag is
    restored afterwards) and return the keep codes of image ``image_index`` of the batch: one
    (N,) uint8 CPU tensor per ATP layer, in ``config.layers`` order.

    input_ids, attention_mask: (B, L); pixel_values: (I, 3, S, S), I images in sample order.
    Raises ValueError if the model has no ATP modules, if its masks are not hard in eval mode
    (``hard_in_eval`` False) or if the batch has no image ``image_index``.
    """
    try:
        ctrl = get_atp_controller(model)
    except ValueError as e:
        raise ValueError(f"visualize: {e}") from None
    if not ctrl.config.hard_in_eval:
        raise ValueError("visualize: the model's ATPConfig has hard_in_eval=False, so eval forwards use soft "
                         "masks and record no keep codes; set hard_in_eval=True to see what is pruned")
    n_images = pixel_values.shape[0]
    if not 0 <= image_index < n_images:
        raise ValueError(f"visualize: image_index {image_index} is out of range for {n_images} images")
    param = next(model.parameters())
    inputs = {"input_ids": input_ids.to(param.device),
              "pixel_values": pixel_values.to(device=param.device, dtype=param.dtype)}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(param.device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for m, training in modes.items():
            m.training = training
    stats = out.atp_stats
    if "keep_codes" not in stats:
        raise ValueError("visualize: the forward recorded no keep codes (does input_ids hold the image tokens?)")
    return [c[image_index].cpu() for c in stats["keep_codes"]]


def visualize_pruning(model: torch.nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                      path: Union[str, os.PathLike], *, attention_mask: Optional[torch.Tensor] = None,
                      image_index: int = 0, image=None, cell: int = 8) -> torch.Tensor:
    """Paper Fig. 4 for one image of a batch: run ``model`` (see ``pruning_codes``), draw the
    tokens each ATP layer keeps (``render_pruning``) and write the PNG to ``path``.

    image: (h, w, 3) uint8 shown in the cells; None = ``denormalize(pixel_values[image_index])``
    with CLIP's mean and std. Returns the rendered (H * cell, K * W * cell + (K - 1) * GUTTER, 3)
    uint8 tensor.
    """
    codes = pruning_codes(model, input_ids, pixel_values, attention_mask=attention_mask, image_index=image_index)
    if image is None:
        image = denormalize(pixel_values[image_index])
    rendered = render_pruning(codes, model.atp.grid, image=image, cell=cell)
    write_png(path, rendered)
    return rendered


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from .tools.cli import add_model_args

    p = argparse.ArgumentParser(prog="python -m atp_llava.visualize", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--image", metavar="FILE", help="image (.pt/.npy; other formats need Pillow); default synthetic")
    p.add_argument("--prompt", default=None, help="--model: instruction text (needs the checkpoint's tokenizer)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG")
    p.add_argument("--cell", type=int, default=8, help="pixels per vision token")
    return p


def _synthetic_picture(size: int, seed: int) -> torch.Tensor:
    """(3, size, size) float in [0, 1]: a colour gradient with a few discs of random colour,
    something with structure to prune."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([x, y, 1 - 0.5 * (x + y)])
    for _ in range(4):
        cy, cx, r = torch.rand(3, generator=g).tolist()
        disc = (y - cy) ** 2 + (x - cx) ** 2 < (0.1 + 0.2 * r) ** 2
        img = torch.where(disc, torch.rand(3, 1, 1, generator=g), img)
    return img


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .tools.cli import check_model_args

    check_model_args(args, parser)
    if args.tiny and args.prompt is not None:
        parser.error("--prompt needs a tokenizer: use --model with a checkpoint that has one")
    if args.cell < 1:
        parser.error(f"--cell must be >= 1, got {args.cell}")


def main(argv: Optional[List[str]] = None) -> torch.Tensor:
    """Command line entry point; returns the rendered image (see ``visualize_pruning``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    picture = None
    if args.image:
        try:
            picture = load_image(args.image)
        except ImportError:
            parser.error(f"--image {args.image}: reading this format needs Pillow (pip install pillow); "
                         ".pt and .npy images need nothing")
    tokenizer = None
    if args.model and (args.image or args.prompt is not None):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as e:
            parser.error(f"--model {args.model}: --image/--prompt need the checkpoint's tokenizer, which could not "
                         f"be loaded ({e}); without both, a synthetic prompt and image are used")
    from .tools.cli import model_from_args, synthetic_prompts

    model = model_from_args(args)
    n_grid, image_token_id = model.atp.n_grid, model.config.image_token_id
    if tokenizer is not None:
        ids = encode_prompt(tokenizer, args.prompt or "Describe the image.", 1, image_token_id, n_grid)
    else:
        ids = synthetic_prompts(model, 1, args.seed)["input_ids"][0].tolist()
    size = model.config.vision_config.image_size
    if picture is None:
        picture = _synthetic_picture(size, args.seed)
    pixel_values = _preprocess(picture, size, CLIP_MEAN, CLIP_STD)[None]
    shown = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    codes = pruning_codes(model, torch.tensor([ids]), pixel_values)
    rendered = render_pruning(codes, model.atp.grid, image=shown, cell=args.cell)
    write_png(args.out, rendered)
    print(f"wrote {args.out}: {len(codes)} panels, ATP layers {', '.join(map(str, model.atp.config.layers))}")
    for layer, code in zip(model.atp.config.layers, codes):
        counts = torch.bincount(code.long(), minlength=len(PALETTE)).tolist()
        print(f"ATP layer {layer}: kept {n_grid - counts[0]} / {n_grid} (redundancy only {counts[KEEP_REDUNDANT]}, "
              f"spatial only {counts[KEEP_SPATIAL]}, both {counts[KEEP_REDUNDANT | KEEP_SPATIAL]})")
    return rendered


if __name__ == "__main__":
    main()
