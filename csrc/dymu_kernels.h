// C++ entry points of dymu_kernels._C. Python wrappers in dymu_kernels/ops
// validate arguments with user-facing messages; the checks here are a second
// line of defence for direct callers.
#pragma once

#include <torch/extension.h>

namespace dymu {

// Mean of the rows of src [B, G, N, F] that share a segment of index [B, N]
// (int32/int64, -1 = skip) -> [B, G, num_segments, F] in src's dtype.
// Accumulates in fp32 (fp64 for double) in position order: deterministic.
// Segments no row maps to are zero.
torch::Tensor segment_mean_cpu(const torch::Tensor& src, const torch::Tensor& index, int64_t num_segments);

// Apply chosen A -> B merges (DToMe / ToMe) to a merge state: x [B, N, C],
// size [B, N], lengths [B], pos_map [B, N0], node_idx and merge_mask
// [B, ceil(N/2)] as produced by matching + selection. Returns the new
// (x, size, lengths, pos_map) with capacity N. Size-weighted average in fp32
// (fp64 for double), gathered per destination in a fixed order.
std::vector<torch::Tensor> merge_tokens_cpu(const torch::Tensor& x, const torch::Tensor& size,
                                            const torch::Tensor& lengths, const torch::Tensor& pos_map,
                                            const torch::Tensor& node_idx, const torch::Tensor& merge_mask);

}  // namespace dymu
