// C++ entry points of dymu_kernels._C. Python wrappers in dymu_kernels/ops
// validate arguments with user-facing messages; the checks here are a second
// line of defence for direct callers.
#pragma once

// ATen only: torch/extension.h (pybind11, the whole C++ API) triples the
// compile time of every file that includes it; bindings.cpp alone needs it.
#include <ATen/ATen.h>

namespace dymu {

// Mean of the rows of src [B, G, N, F] that share a segment of index [B, N]
// (int32/int64, -1 = skip) -> [B, G, num_segments, F] in src's dtype.
// Accumulates in fp32 (fp64 for double) in position order: deterministic.
// Segments no row maps to are zero.
at::Tensor segment_mean_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_segments);

// Apply chosen A -> B merges (DToMe / ToMe) to a merge state: x [B, N, C],
// size [B, N], lengths [B], pos_map [B, N0], node_idx and merge_mask
// [B, ceil(N/2)] as produced by matching + selection, node_max [B, ceil(N/2)]
// (float scores; they order the unmerged A tokens when cls_token is false).
// Returns the new (x, size, lengths, pos_map) with capacity N, in the order of
// docs/design.md §1.1: an image merging nothing is unchanged; else unmerged A tokens
// (position order with CLS, descending score without; ties by position), then
// all B tokens. Size-weighted average in fp32 (fp64 for double), gathered per
// destination in a fixed order.
std::vector<at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& size,
                                            const at::Tensor& lengths, const at::Tensor& pos_map,
                                            const at::Tensor& node_idx, const at::Tensor& merge_mask,
                                            const at::Tensor& node_max, bool cls_token);

// VTU attention (prefill): q [B, H, N_un, D] pre-RoPE, k/v [B, H_kv, N_un, D],
// merge_map [B, N] (int32/int64, -1 = padding), cos/sin float32 [B, N, W]
// with W = D (HF tables) or D/2 (half tables). Attention over the N full
// positions with RoPE at each position, re-merged per unique token (mean in
// position order) -> [B, H, N_un, D] in q's dtype. fp32 arithmetic.
at::Tensor vtu_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& merge_map, const at::Tensor& cos, const at::Tensor& sin,
                                double scale, bool causal);

// VTU decode: q [B, H, T, D] pre-RoPE queries of the T newest positions
// (the last T of merge_map), k/v the per-unique-token cache. -> [B, H, T, D].
at::Tensor vtu_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& merge_map, const at::Tensor& cos,
                                       const at::Tensor& sin, double scale);

}  // namespace dymu
