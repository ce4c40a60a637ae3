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
// [B, ceil(N/2)] as produced by matching + selection, node_max [B, ceil(N/2)]
// (float scores; they order the unmerged A tokens when cls_token is false).
// Returns the new (x, size, lengths, pos_map) with capacity N, in the order of
// docs/design.md §1.1: an image merging nothing is unchanged; else unmerged A tokens
// (position order with CLS, descending score without; ties by position), then
// all B tokens. Size-weighted average in fp32 (fp64 for double), gathered per
// destination in a fixed order.
std::vector<torch::Tensor> merge_tokens_cpu(const torch::Tensor& x, const torch::Tensor& size,
                                            const torch::Tensor& lengths, const torch::Tensor& pos_map,
                                            const torch::Tensor& node_idx, const torch::Tensor& merge_mask,
                                            const torch::Tensor& node_max, bool cls_token);

// VTU attention (prefill): q [B, H, N_un, D] pre-RoPE, k/v [B, H_kv, N_un, D],
// merge_map [B, N] (int32/int64, -1 = padding), cos/sin float32 [B, N, W]
// with W = D (HF tables) or D/2 (half tables). Attention over the N full
// positions with RoPE at each position, re-merged per unique token (mean in
// position order) -> [B, H, N_un, D] in q's dtype. fp32 arithmetic.
torch::Tensor vtu_attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& merge_map, const torch::Tensor& cos, const torch::Tensor& sin,
                                double scale, bool causal);

// VTU decode: q [B, H, T, D] pre-RoPE queries of the T newest positions
// (the last T of merge_map), k/v the per-unique-token cache. -> [B, H, T, D].
torch::Tensor vtu_decode_attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                       const torch::Tensor& merge_map, const torch::Tensor& cos,
                                       const torch::Tensor& sin, double scale);

}  // namespace dymu
