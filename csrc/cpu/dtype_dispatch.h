// Maps a validated kernel dtype (float32 / bfloat16 / float16) to the element type the CPU
// kernels are instantiated with: fn receives a value of that type as a tag. Shared by every
// CPU kernel file; `op` names the op in the error for any other dtype.
#pragma once

#include <torch/extension.h>

namespace lmfuse {
namespace cpu {

template <typename Fn>
void dispatch_dtype(at::ScalarType dt, const char* op, Fn&& fn) {
  switch (dt) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kHalf: fn(at::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dt);
  }
}

}  // namespace cpu
}  // namespace lmfuse
