"""The CUDA kernels' own code (csrc/cuda) run on the CPU by tests/cuda_emu: one fiber per CUDA
thread, barriers and warp collectives emulated, mma.sync / ldmatrix with the PTX ISA's per-lane
fragment layouts, cp.async landing only at its wait, a shared-memory race detector, bounds checks,
dynamic shared memory poisoned with NaN. Every case compares with atp_ops.reference (and autograd
through it), over the shapes of tests/test_cuda_attention.py; and each mutation of
tests/cuda_emu/mutations.py (a missing wait or barrier, a wrong lane mapping, an off-by-one causal
horizon) must make the cases fail.

This checks the kernels' indexing, masking, tiling, fragment layouts, split-K combination,
reductions, barrier placement and races between blocks on machines without a GPU; it says
nothing about speed or about the hardware beyond what the PTX ISA specifies. It needs g++ and the
CUDA toolkit's headers (nvcc on PATH).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_emu"))

import check  # noqa: E402
import mutations  # noqa: E402


def _toolchain():
    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++ and the CUDA toolkit headers (nvcc on PATH)")


class Emulator:
    """``check.py serve`` in a child process: the cases run there, so that one whose kernel trips
    the emulator (an EMU FAILURE aborts the process) fails alone with the emulator's message,
    and the next case starts a new child."""

    def __init__(self, out):
        self.env = {**os.environ, "OUT": str(out)}
        self.stderr_path = os.path.join(str(out), "serve.stderr")
        self.proc = None

    def _start(self):
        self.stderr = open(self.stderr_path, "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cuda_emu", "check.py"), "serve"],
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)

    def run(self, request):
        """(passed, output) of one request: an ALL index, or "abort"."""
        if self.proc is None:
            self._start()
        self.proc.stdin.write(f"{request}\n")
        self.proc.stdin.flush()
        lines = []
        for line in self.proc.stdout:
            if line.startswith(f"RESULT {request} "):
                return line.split()[2] == "1", "".join(lines)
            lines.append(line)
        code = self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()[-4000:]
        self.stderr.close()
        self.proc = None
        return False, "".join(lines) + f"the emulator process ended (exit code {code}):\n{err}"

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.stderr.close()
            self.proc = None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    _toolchain()
    out = tmp_path_factory.mktemp("cuda_emu")
    build = subprocess.run(["bash", os.path.join(HERE, "cuda_emu", "build.sh")], env={**os.environ, "OUT": str(out)},
                           capture_output=True, text=True)
    assert build.returncode == 0, f"tests/cuda_emu/build.sh failed:\n{build.stdout}\n{build.stderr}"
    check.load(out)
    emu = Emulator(out)
    yield emu
    emu.close()


@pytest.mark.parametrize("index", range(len(check.ALL)), ids=[check.case_id(c) for c in check.ALL])
def test_cuda_kernel_code_matches_reference_on_the_emulator(emulator, index):
    ok, output = emulator.run(index)
    assert ok, output


def test_an_aborted_emulator_fails_one_case_and_the_next_runs(emulator):
    ok, output = emulator.run("abort")
    assert not ok and "aborting on request" in output and "exit code" in output
    ok, output = emulator.run(0)
    assert ok, output


@pytest.mark.parametrize("mutation", mutations.MUTATIONS, ids=lambda m: m.name)
def test_the_emulator_catches_a_broken_kernel(mutation):
    _toolchain()
    caught, how = mutations.run(mutation)
    assert caught, f"{mutation.name} went unnoticed: {how}"


def test_backward_split_policy(emulator):
    """launch.h's bwd_num_splits, as the host sizes dq_accum: one split per (batch, head) when
    those fill the SMs, more when few heads would leave SMs idle, and the slices' memory capped."""
    def splits(heads, key_blocks, slice_bytes, sms=132):
        return check.lib.emu_bwd_num_splits(check.L(heads), check.L(key_blocks), check.L(slice_bytes), check.L(sms))

    mb = 1 << 20
    assert splits(264, 23, 100 * mb) == 1      # two full waves already
    assert splits(8, 23, 4 * mb) > 1           # 8 heads on 132 SMs: the key blocks are shared out
    s = splits(8, 23, 4 * mb)
    assert s * 8 <= 2 * 132 and s <= 23        # no more blocks than key blocks, ~ the SMs
    assert splits(8, 23, 200 * mb) == 1        # two slices would exceed 256 MB
    assert splits(1, 1, mb) == 1 and splits(4, 0, mb) == 1
