// Kernel launchers of the CUDA ops. Declared with plain types only, so the .cu files that define
// them never include torch headers (nvcc compiles them in seconds, not minutes).
#pragma once
#include <cuda_runtime.h>

#include "soft_mask.h"

namespace atp::cuda {

// dtype: 0 = float32, 1 = float64.
void soft_mask_fwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream);
void soft_mask_bwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream);

}  // namespace atp::cuda
