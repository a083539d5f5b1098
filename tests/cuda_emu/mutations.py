"""Shows that the emulator catches the defects it exists for: each mutation below breaks one
line of a kernel in a copy of csrc/, build.sh builds the copy, and the mutation counts as caught
when check.py's MUTATION cases fail on it (an EMU FAILURE, or numbers that differ from the
reference). ``python mutations.py [name ...]`` runs them all (or the named ones) and prints how
each was caught; tests/test_cuda_emulated.py runs every one under pytest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under csrc/
    old: str   # must occur exactly once
    new: str


FWD = "cuda/attention_fwd.cuh"
BWD = "cuda/attention_bwd.cuh"
SCORES = "cuda/scores.cu"
TILES = "cuda/tiles.cuh"  # the fragment loaders of every mma kernel
MUTATIONS = [
    Mutation("missing_cp_async_wait", FWD,
             "    ptx::cp_async_wait<0>();  // this thread's copies of tile it have landed\n", ""),
    Mutation("missing_syncthreads_before_q_ldmatrix", FWD,
             "  __syncthreads();          // ... for every thread's copies\n", ""),
    Mutation("missing_syncwarp_before_stage_reads", FWD,
             "  __syncwarp();  // the stage is complete before any lane reads another lane's part\n", ""),
    Mutation("wrong_lane_mapping_p_fragment", FWD,
             "pa[mi][1] = ptx::pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);",
             "pa[mi][1] = ptx::pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);"),
    Mutation("wrong_lane_mapping_k_ldmatrix", TILES,
             "(n0 + (lane & 7) + ((lane >> 4) << 3)) * kLd + k0 + (((lane >> 3) & 1) << 3)",
             "(n0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * kLd + k0 + ((lane >> 4) << 3)"),
    Mutation("causal_horizon_off_by_one", FWD,
             "if (causal_tile && j > horizon(mi, hf))", "if (causal_tile && j >= horizon(mi, hf))"),
    Mutation("causal_block_skip_off_by_one", FWD,
             "k_end = min(k_end, last_query + 1 + offset);", "k_end = min(k_end, last_query + offset);"),
    Mutation("packed_decode_row_to_head", FWD,
             "const int hq = kDecode ? r / p.Lq : 0", "const int hq = kDecode ? r / p.Lq / 2 : 0"),
    Mutation("idle_warp_test_skips_real_rows", FWD,
             "const bool warp_has_rows = i0 + wrow < n_rows;", "const bool warp_has_rows = i0 + wrow + 32 < n_rows;"),
    Mutation("decode_skips_the_wrong_tile", FWD,
             "next_live = __syncthreads_or(tile_is_live(it + 1));", "next_live = __syncthreads_or(tile_is_live(it + 2));"),
    Mutation("missing_syncwarp_before_ldmatrix", SCORES,
             "      __syncwarp();  // the warp's rows are complete\n", ""),
    Mutation("missing_syncwarp_before_row_gather", SCORES,
             "      __syncwarp();  // every lane's ldmatrix of the previous item's rows is done\n", ""),
    Mutation("wrong_lane_mapping_a_fragment", TILES,
             "(m0 + (lane & 15)) * kLd + k0 + ((lane >> 4) << 3)", "(m0 + (lane & 15)) * kLd + k0 + ((lane & 1) << 3)"),
    Mutation("bwd_missing_barrier_before_dv", BWD,
             "      __syncthreads();  // P and dS are complete\n", ""),
    Mutation("bwd_wrong_lane_mapping_p_transpose", TILES,
             "(k0 + (lane & 7) + ((lane >> 4) << 3)) * kLd + m0 + (((lane >> 3) & 1) << 3)",
             "(k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * kLd + m0 + ((lane >> 4) << 3)"),
    Mutation("bwd_causal_skip_off_by_one", BWD,
             "const int m_begin = kCausal ? max(0, j0 - offset) / kBlockM : 0;",
             "const int m_begin = kCausal ? max(0, j0 - offset + 1) / kBlockM : 0;"),
    Mutation("bwd_dq_slice_of_another_split", BWD,
             "float* dq_slice = p.dq_accum + (int64_t(split) * p.B * p.Hq + bh) * p.Lq * kD;",
             "float* dq_slice = p.dq_accum + (int64_t(split / 2) * p.B * p.Hq + bh) * p.Lq * kD;"),
    Mutation("bwd_wrong_lane_mapping_stmatrix", TILES,
             "((lane & 15) * kLd + ((lane >> 4) << 3))", "((lane & 7) * kLd + ((lane >> 3) << 3))"),
    Mutation("bwd_wrong_lane_mapping_p_store", TILES,
             "(m0 + g + 8 * (i & 1)) * kLd + n0 + 8 * (i >> 1)", "(m0 + g + 8 * (i >> 1)) * kLd + n0 + 8 * (i & 1)"),
    Mutation("prefetch_into_the_buffer_being_read", FWD,
             "sK + ((it + 1) & 1) * kBlockK * kLd", "sK + (it & 1) * kBlockK * kLd"),
]


def mutate(m: Mutation, dst: str) -> None:
    """A copy of csrc/ at dst with mutation m applied."""
    shutil.copytree(os.path.join(REPO, "csrc"), dst)
    path = os.path.join(dst, m.file)
    with open(path) as f:
        text = f.read()
    assert text.count(m.old) == 1, f"{m.name}: the line to mutate occurs {text.count(m.old)} times in {m.file}"
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def run(m: Mutation) -> tuple[bool, str]:
    """(caught, how): builds the mutated kernels and runs check.py's MUTATION cases on them."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "csrc"), os.path.join(tmp, "emu")
        mutate(m, src)
        build = subprocess.run(["bash", os.path.join(HERE, "build.sh")], env={**os.environ, "CSRC": src, "OUT": out},
                               capture_output=True, text=True)
        if build.returncode != 0:
            return False, f"the mutated sources did not build:\n{build.stderr[-2000:]}"
        res = subprocess.run([sys.executable, os.path.join(HERE, "check.py"), "mutation"],
                             env={**os.environ, "OUT": out}, capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    if res.returncode == 0:
        return False, "every case passed"
    for line in text.splitlines():
        if line.startswith("EMU FAILURE") or line.startswith("FAIL "):
            return True, line
    return True, f"check.py exited with {res.returncode}"


if __name__ == "__main__":
    names = sys.argv[1:]
    todo = [m for m in MUTATIONS if not names or m.name in names]
    results = [(m.name, *run(m)) for m in todo]
    for name, caught, how in results:
        print(f"{'caught ' if caught else 'MISSED '} {name}: {how}")
    sys.exit(0 if all(c for _, c, _ in results) else 1)
