// One (dtype, head dim) of the attention forward, in its own file so ninja builds them in parallel.
#include "cuda/attention_fwd.cuh"
#include "cuda/launch.h"

namespace atp::cuda {

template <>
void attention_fwd_run<AttnDtype::kFloat16, 96>(const AttentionFwdParams& p, cudaStream_t stream) {
  run_attention_fwd<__half, 96>(p, stream);
}

}  // namespace atp::cuda
