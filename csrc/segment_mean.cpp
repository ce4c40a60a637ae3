// Segment mean on the CPU: the re-merge step of VTU (full positions -> unique
// tokens) and the CPU fallback the reference's scatter_add replaces.
#include "dymu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

namespace dymu {
namespace {

template <typename scalar_t, typename index_t>
void segment_mean_kernel(const scalar_t* src, const index_t* index, scalar_t* out, int64_t B, int64_t G,
                         int64_t N, int64_t F, int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  // One task per (image, group) row block: tasks write disjoint outputs, and
  // each sums its rows in position order, so results do not depend on threads.
  at::parallel_for(0, B * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(S * F));
    std::vector<int64_t> count(static_cast<size_t>(S));
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(count.begin(), count.end(), 0);
      const scalar_t* rows = src + bg * N * F;
      const index_t* idx = index + b * N;
      for (int64_t p = 0; p < N; ++p) {
        const int64_t s = static_cast<int64_t>(idx[p]);
        if (s < 0) continue;
        ++count[s];
        acc_t* dst = acc.data() + s * F;
        const scalar_t* row = rows + p * F;
        for (int64_t f = 0; f < F; ++f) dst[f] += static_cast<acc_t>(row[f]);
      }
      scalar_t* o = out + bg * S * F;
      for (int64_t s = 0; s < S; ++s) {
        const acc_t inv = count[s] > 0 ? acc_t(1) / static_cast<acc_t>(count[s]) : acc_t(0);
        for (int64_t f = 0; f < F; ++f) o[s * F + f] = static_cast<scalar_t>(acc[s * F + f] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor segment_mean_cpu(const at::Tensor& src, const at::Tensor& index, int64_t num_segments) {
  TORCH_CHECK(src.device().is_cpu() && index.device().is_cpu(), "segment_mean_cpu: src and index must be CPU tensors");
  TORCH_CHECK(src.dim() == 4, "segment_mean_cpu: src must be [B, G, N, F], got ", src.sizes());
  TORCH_CHECK(index.dim() == 2, "segment_mean_cpu: index must be [B, N], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "segment_mean_cpu: index must be int32 or int64, got ", index.scalar_type());
  const int64_t B = src.size(0), G = src.size(1), N = src.size(2), F = src.size(3);
  TORCH_CHECK(index.size(0) == B && index.size(1) == N, "segment_mean_cpu: index must be [", B, ", ", N,
              "], got ", index.sizes());
  TORCH_CHECK(num_segments >= 0, "segment_mean_cpu: num_segments must be >= 0, got ", num_segments);
  if (index.numel() > 0) {
    const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < num_segments, "segment_mean_cpu: index values must lie in [-1, ", num_segments,
                "), got [", lo, ", ", hi, "]");
  }
  auto src_c = src.contiguous();
  auto index_c = index.contiguous();
  auto out = at::empty({B, G, num_segments, F}, src.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "segment_mean_cpu", [&] {
    if (index_c.scalar_type() == at::kInt) {
      segment_mean_kernel<scalar_t, int32_t>(src_c.data_ptr<scalar_t>(), index_c.data_ptr<int32_t>(),
                                             out.data_ptr<scalar_t>(), B, G, N, F, num_segments);
    } else {
      segment_mean_kernel<scalar_t, int64_t>(src_c.data_ptr<scalar_t>(), index_c.data_ptr<int64_t>(),
                                             out.data_ptr<scalar_t>(), B, G, N, F, num_segments);
    }
  });
  return out;
}

}  // namespace dymu
