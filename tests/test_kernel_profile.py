"""Static performance targets of the CUDA attention kernels, checked on their compiled SASS
(bench/kernel_profile.py: nvcc -cubin per architecture, cuobjdump -sass). No GPU needed; skips
without nvcc, cuobjdump or nvdisasm. This checks what the compiled code is (registers, spills,
the main loop's instruction mix, occupancy), not how fast it runs.

Targets (FlashAttention-2's forward on sm_90 has 256 HMMA, 80 LDSM, no LDS/STS per warp and
key tile, bench/results/fa2_static_sm90.json):
- the forward kernels the host launches: no spills; a key loop without inner loops, LDS or STS,
  tiles by LDGSTS; on sm_90 >= 128 HMMA and <= 0.35 LDSM per HMMA per warp-iteration; at least
  FlashAttention-2's occupancy on sm_90 and sm_80;
- the backward kernels the host launches: no spills; a query loop without inner loops or LDS,
  whose only shared stores are P and dS (per warp 2 kSM kSN STS.32 on sm_80, a quarter as many
  STSM, stmatrix.x4, on sm_90), with at least FlashAttention-2's occupancy on sm_90 and sm_80;
  on sm_90, <= 0.6 shared-memory instructions (LDSM, LDS, STS, STSM) per HMMA at D = 64 and
  128 (FA2's backward at D = 128: 320 HMMA, 144 LDSM, 32 STS, 0.55).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
kp = pytest.importorskip("kernel_profile")


def _tools():
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    try:
        kp.toolkit_bin("cuobjdump")
        kp.toolkit_bin("nvdisasm")
    except SystemExit:
        pytest.skip("needs cuobjdump and nvdisasm (the toolkit's, or pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")


@pytest.fixture(scope="module")
def rows():
    _tools()
    srcs = [REPO / f"csrc/cuda/attention_{kind}_{dt}_hdim{d}.cu"
            for kind in ("fwd", "bwd") for dt in ("fp16", "bf16") for d in (64, 96, 128)]
    return kp.profile_ours(["sm_80", "sm_90"], srcs)


def _launched(rows, base, arch=None):
    out = [r for r in rows if r["base"] == base and r["launched_on_arch"] and (arch is None or r["arch"] == arch)]
    assert out, f"no {base} kernels found"
    return out


def _name(r):
    return f"{kp.short(r)} on {r['arch']}"


def test_forward_kernels_do_not_spill(rows):
    for r in _launched(rows, "attention_fwd_kernel") + _launched(rows, "attention_fwd_combine_kernel"):
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{_name(r)} spills"


def test_forward_key_loop_is_straight_line_registers_and_cp_async(rows):
    for r in _launched(rows, "attention_fwd_kernel"):
        loop = r["main_loop"]
        assert loop and loop["HMMA"] > 0, f"{_name(r)}: no key loop with HMMA"
        assert loop["inner_loops"] == 0, f"{_name(r)}: the key loop has inner loops"
        assert loop["LDS"] == 0 and loop["STS"] == 0, f"{_name(r)}: LDS/STS in the key loop: {loop}"
        assert loop["LDGSTS"] > 0, f"{_name(r)}: tiles not fetched by cp.async: {loop}"


def test_forward_on_sm90_meets_flash_attention_2s_ratios(rows):
    for r in _launched(rows, "attention_fwd_kernel", "sm_90"):
        loop, packed = r["main_loop"], r["args"][4] == "true"
        if packed and r["args"][1] == "128":
            continue  # decode at D = 128 takes the 32-key tile (0.375 LDSM per HMMA): bound by K/V reads
        assert loop["HMMA"] >= 128, f"{_name(r)}: {loop['HMMA']} HMMA per warp-iteration"
        assert loop["LDSM"] <= 0.35 * loop["HMMA"], f"{_name(r)}: {loop['LDSM']} LDSM for {loop['HMMA']} HMMA"


def _occupancy_at_least_flash_attention_2s(rows, base, kind, label, warps, smem):
    """Each launched `base` kernel has at least the warps per SM of FA2's recorded `kind` kernels
    whose label has `label` (FA2's `warps` per block and `smem` bytes of shared memory)."""
    fa2 = json.loads((REPO / "bench/results/fa2_static_sm90.json").read_text())
    fa2_kernels = [k for k in fa2["kernels"] if k["kind"] == kind and label in k["label"]]
    for arch in ("sm_80", "sm_90"):
        fa2_blocks = min(kp.occupancy(arch, k["registers"], 32 * warps, smem)["blocks_per_sm"] for k in fa2_kernels)
        for r in _launched(rows, base, arch):
            assert r["occupancy"]["warps_per_sm"] >= warps * fa2_blocks, f"{_name(r)}: {r['occupancy']}"


def test_forward_occupancy_at_least_flash_attention_2s(rows):
    # FA2's forward: 4 warps and 255 registers, 64 KB of shared memory (Q, K, V single-buffered)
    _occupancy_at_least_flash_attention_2s(rows, "attention_fwd_kernel", "forward", "128x64", 4, 64 * 1024)


def test_backward_kernels_do_not_spill_and_store_only_p_and_ds(rows):
    for r in _launched(rows, "attention_bwd_kernel"):
        assert r["spill_stores"] == r["spill_loads"] == 0, f"{_name(r)} spills"
        loop = r["main_loop"]
        assert loop and loop["HMMA"] > 0, f"{_name(r)}: no query loop with HMMA"
        assert loop["inner_loops"] == 0 and loop["LDS"] == 0, f"{_name(r)}: {loop}"
        # P and dS, one packed pair per (m tile, n tile, row half) of the warp's S tile each:
        # HMMA per warp-iteration = 5 matmuls x kSM x kSN x D / 16.
        d = int(r["args"][1])
        s_tiles = loop["HMMA"] // 5 // (d // 16)
        stores = (0, s_tiles) if r["arch"] == "sm_90" else (2 * 2 * s_tiles, 0)  # (STS, STSM)
        assert (loop["STS"], loop["STSM"]) == stores, (
            f"{_name(r)}: {loop['STS']} STS, {loop['STSM']} STSM for {s_tiles} S tiles per warp")
        assert loop["LDGSTS"] > 0, f"{_name(r)}: tiles not fetched by cp.async: {loop}"


def test_backward_occupancy_at_least_flash_attention_2s(rows):
    # FA2's hdim-128 backward: 8 warps, Q double-buffered, K, V, dO, P, dS: 144 KB of shared memory
    _occupancy_at_least_flash_attention_2s(rows, "attention_bwd_kernel", "backward", "64x128", 8, 144 * 1024)


def test_backward_on_sm90_meets_flash_attention_2s_ratio(rows):
    for r in _launched(rows, "attention_bwd_kernel", "sm_90"):
        loop = r["main_loop"]
        shared = sum(loop[c] for c in kp.SHARED)
        assert shared <= 0.6 * loop["HMMA"], f"{_name(r)}: {shared} shared-memory instructions: {loop}"
