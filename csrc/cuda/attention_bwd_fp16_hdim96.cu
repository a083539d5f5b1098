// One (dtype, head dim) of the attention backward, in its own file so ninja builds them in parallel.
#include "cuda/attention_bwd.cuh"
#include "cuda/launch.h"

namespace atp::cuda {

template <>
void attention_bwd_run<AttnDtype::kFloat16, 96>(const AttentionBwdParams& p, cudaStream_t stream) {
  run_attention_bwd<__half, 96>(p, stream);
}

}  // namespace atp::cuda
