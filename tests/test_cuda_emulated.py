"""The CUDA kernels' own code (csrc/cuda) run on the CPU by tests/cuda_emu: one host thread per
CUDA thread, barriers and shuffles emulated, WMMA fragments emulated, dynamic shared memory
poisoned with NaN. Every case compares with atp_ops.reference (and autograd through it).

This checks the kernels' indexing, masking, tiling, split-K combination, reductions and barrier
placement on machines without a GPU; it says nothing about the hardware (speed, memory model,
the real tensor-core layouts). It needs g++ and the CUDA toolkit's headers (nvcc on PATH).
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


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        pytest.skip("the CUDA emulator needs g++ and the CUDA toolkit headers (nvcc on PATH)")
    out = tmp_path_factory.mktemp("cuda_emu")
    build = subprocess.run(["bash", os.path.join(HERE, "cuda_emu", "build.sh")], env={**os.environ, "OUT": str(out)},
                           capture_output=True, text=True)
    assert build.returncode == 0, f"tests/cuda_emu/build.sh failed:\n{build.stdout}\n{build.stderr}"
    check.load(out)


@pytest.mark.parametrize("case", check.ALL, ids=check.case_id)
def test_cuda_kernel_code_matches_reference_on_the_emulator(emulator, case, capsys):
    ok = case()
    assert ok, capsys.readouterr().out
