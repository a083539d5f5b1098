#!/bin/bash
# Builds a host (CPU) emulation of the CUDA attention, score and soft-mask kernels into $OUT (default
# /tmp/atp_cuda_emu): copies csrc/, rewrites the few CUDA-only constructs (dynamic shared
# memory declarations, <<<>>> launches, cudaFuncSetAttribute, the device queries) into calls of
# shim/emu_runtime.h, replaces csrc/cuda/ptx.cuh (every inline-PTX line) by shim/ptx.cuh, and
# compiles emu_api.cpp and emu_soft_mask.cpp with g++. Then
#   python tests/cuda_emu/check.py [quick|all]
# runs the real kernel code, one std::thread per CUDA thread, against atp_ops.reference.
# It checks indexing, masking, barriers, fragment layouts, cp.async groups, shared-memory races and
# bounds; not speed, not the hardware.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/atp_cuda_emu}"
CSRC="${CSRC:-$REPO/csrc}"  # the kernel sources (mutations.py points this at a mutated copy)
# The toolkit's include dir (cuda_fp16.h, cuda_bf16.h, cuda_runtime.h); nvcc may be a wrapper,
# so ask it where the toolkit is, as setup.py does.
TOP="$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)"
CUDA_INC="${CUDA_INC:-${TOP:-/usr/local/cuda}/include}"
rm -rf "$OUT/src" && mkdir -p "$OUT/src" && cp -r "$CSRC/." "$OUT/src/"
cp "$HERE/shim/ptx.cuh" "$OUT/src/cuda/ptx.cuh"
cd "$OUT/src/cuda"
for f in *.cuh scores.cu soft_mask.cu; do
  perl -0pi -e 's/extern __shared__ __align__\(128\) unsigned char smem\[\];/unsigned char* smem = emu::smem();/g;
                s/extern __shared__ float smem_f\[\];/float* smem_f = reinterpret_cast<float*>(emu::smem());/g;
                s/cudaFuncSetAttribute\(/emu::func_set_attribute(/g;
                s/cudaDeviceGetAttribute\(/emu::device_attribute(/g;
                s/cudaGetDevice\(/emu::get_device(/g;
                s/([\w:<>, &]+?)<<<(.*?)>>>\((\w+)\)/emu::launch($1, $2, $3)/g' "$f"
done
g++ -std=c++20 -O2 -fPIC -shared -I"$HERE/shim" -I"$OUT/src" -I"$CUDA_INC" "$HERE/emu_api.cpp" \
    "$HERE/emu_soft_mask.cpp" -o "$OUT/libemu.so" -lpthread
echo "built $OUT/libemu.so"
