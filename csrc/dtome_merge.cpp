// DToMe merge step on the CPU: applies chosen A -> B merges to the batched
// merge state (docs/design.md §2) with size-weighted averaging.
//
// The reference scatter-adds every token into its destination; here each
// output row is *gathered* from its members in a fixed order (destination
// first, then its sources by increasing slot), so the result is deterministic
// and every row is read once and written once. The new order follows the two
// order rules of docs/design.md §1.1 (plan_image): (a) nothing merged -> unchanged;
// (b) unmerged A tokens (by position with CLS, by descending score without),
// then all B tokens.
#include "dymu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace dymu {
namespace {

// Per-image plan: which old slots make up each new slot.
struct MergePlan {
  std::vector<int64_t> home;       // new slot -> old slot standing there
  std::vector<int64_t> src_begin;  // new slot -> first entry in src (CSR)
  std::vector<int64_t> src;        // merged A slots, grouped by destination
  std::vector<int64_t> dest;       // old slot -> new slot (-1 for padding)
  int64_t new_length = 0;
};

// Rule (a) of docs/design.md §1.1: an image that merges nothing keeps its sequence
// unchanged, order included.
MergePlan identity_plan(int64_t L) {
  MergePlan p;
  p.new_length = L;
  p.home.resize(static_cast<size_t>(L));
  for (int64_t k = 0; k < L; ++k) p.home[k] = k;
  p.dest = p.home;
  p.src_begin.assign(static_cast<size_t>(L + 1), 0);
  return p;
}

// Rule (b): the unmerged A tokens (A indices) in their new order — position
// order when score is null (CLS), else best score first; the stable sort keeps
// ties in position order, so the plan is deterministic.
std::vector<int64_t> kept_a_order(int64_t n_a, const bool* mask, const double* score) {
  std::vector<int64_t> kept;
  for (int64_t i = 0; i < n_a; ++i) {
    if (mask[i]) continue;
    TORCH_CHECK(score == nullptr || !std::isnan(score[i]), "merge_tokens_cpu: node_max must not be NaN");
    kept.push_back(i);
  }
  if (score != nullptr)
    std::stable_sort(kept.begin(), kept.end(), [score](int64_t a, int64_t b) { return score[a] > score[b]; });
  return kept;
}

// score: the image's node_max row to order unmerged A tokens by (no CLS), or null.
MergePlan plan_image(int64_t L, const int64_t* node_idx, const bool* mask, const double* score) {
  const int64_t n_a = (L + 1) / 2, n_b = L / 2;
  if (std::none_of(mask, mask + n_a, [](bool m) { return m; })) return identity_plan(L);
  MergePlan p;
  p.dest.assign(static_cast<size_t>(L), -1);
  const std::vector<int64_t> kept = kept_a_order(n_a, mask, score);
  const int64_t n_kept = static_cast<int64_t>(kept.size());
  p.new_length = n_kept + n_b;
  p.home.reserve(static_cast<size_t>(p.new_length));
  for (const int64_t i : kept) {
    p.dest[2 * i] = static_cast<int64_t>(p.home.size());
    p.home.push_back(2 * i);
  }
  std::vector<int64_t> n_src(static_cast<size_t>(n_b), 0);
  for (int64_t i = 0; i < n_a; ++i) {
    if (!mask[i]) continue;
    const int64_t j = node_idx[i];
    TORCH_CHECK(j >= 0 && j < n_b, "merge_tokens_cpu: node_idx ", j, " out of range [0, ", n_b, ")");
    p.dest[2 * i] = n_kept + j;
    ++n_src[j];
  }
  for (int64_t j = 0; j < n_b; ++j) {
    p.dest[2 * j + 1] = n_kept + j;
    p.home.push_back(2 * j + 1);
  }
  p.src_begin.assign(static_cast<size_t>(p.new_length + 1), 0);
  for (int64_t j = 0; j < n_b; ++j) p.src_begin[n_kept + j + 1] = n_src[j];
  for (int64_t k = 0; k < p.new_length; ++k) p.src_begin[k + 1] += p.src_begin[k];
  p.src.resize(static_cast<size_t>(p.src_begin[p.new_length]));
  std::vector<int64_t> fill(p.src_begin.begin(), p.src_begin.end() - 1);
  for (int64_t i = 0; i < n_a; ++i)
    if (mask[i]) p.src[fill[p.dest[2 * i]]++] = 2 * i;
  return p;
}

template <typename scalar_t, typename size_t_, typename index_t>
void merge_kernel(const std::vector<MergePlan>& plans, const scalar_t* x, const size_t_* size, scalar_t* out_x,
                  size_t_* out_size, int64_t B, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, B * N, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(static_cast<size_t>(C));
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / N, k = row % N;
      const MergePlan& p = plans[b];
      scalar_t* o = out_x + row * C;
      if (k >= p.new_length) {
        std::memset(o, 0, sizeof(scalar_t) * C);
        out_size[row] = size_t_(0);
        continue;
      }
      const int64_t home = p.home[k];
      const scalar_t* xh = x + (b * N + home) * C;
      const size_t_ sh = size[b * N + home];
      const int64_t s0 = p.src_begin[k], s1 = p.src_begin[k + 1];
      if (s0 == s1) {  // nothing merged in: move the row bit-exactly
        std::memcpy(o, xh, sizeof(scalar_t) * C);
        out_size[row] = sh;
        continue;
      }
      acc_t total = static_cast<acc_t>(sh);
      for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<acc_t>(xh[c]) * total;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t t = p.src[s];
        const acc_t w = static_cast<acc_t>(size[b * N + t]);
        const scalar_t* xt = x + (b * N + t) * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(xt[c]) * w;
        total += w;
      }
      const acc_t inv = acc_t(1) / total;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c] * inv);
      out_size[row] = static_cast<size_t_>(total);
    }
  });
}

}  // namespace

std::vector<at::Tensor> merge_tokens_cpu(const at::Tensor& x, const at::Tensor& size,
                                            const at::Tensor& lengths, const at::Tensor& pos_map,
                                            const at::Tensor& node_idx, const at::Tensor& merge_mask,
                                            const at::Tensor& node_max, bool cls_token) {
  for (const auto* t : {&x, &size, &lengths, &pos_map, &node_idx, &merge_mask, &node_max})
    TORCH_CHECK(t->device().is_cpu(), "merge_tokens_cpu: all inputs must be CPU tensors");
  TORCH_CHECK(x.dim() == 3, "merge_tokens_cpu: x must be [B, N, C], got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), n_a = (N + 1) / 2;
  TORCH_CHECK(size.dim() == 2 && size.size(0) == B && size.size(1) == N, "merge_tokens_cpu: size must be [B, N]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "merge_tokens_cpu: lengths must be [B]");
  TORCH_CHECK(pos_map.dim() == 2 && pos_map.size(0) == B, "merge_tokens_cpu: pos_map must be [B, N0]");
  TORCH_CHECK(node_idx.dim() == 2 && node_idx.size(0) == B && node_idx.size(1) == n_a,
              "merge_tokens_cpu: node_idx must be [B, ceil(N/2)]");
  TORCH_CHECK(merge_mask.sizes() == node_idx.sizes() && merge_mask.scalar_type() == at::kBool,
              "merge_tokens_cpu: merge_mask must be a bool tensor shaped like node_idx");
  TORCH_CHECK(node_max.sizes() == node_idx.sizes() && node_max.is_floating_point(),
              "merge_tokens_cpu: node_max must be a float tensor shaped like node_idx");

  auto x_c = x.contiguous();
  auto size_c = size.contiguous();
  auto len64 = lengths.to(at::kLong).contiguous();
  auto idx64 = node_idx.to(at::kLong).contiguous();
  auto mask_c = merge_mask.contiguous();
  // float -> double is exact, so the order of the scores is kept.
  auto score64 = node_max.to(at::kDouble).contiguous();
  const int64_t* len_p = len64.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len_p[b] >= 0 && len_p[b] <= N, "merge_tokens_cpu: lengths[", b, "]=", len_p[b], " outside [0, ", N, "]");

  std::vector<MergePlan> plans(static_cast<size_t>(B));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      plans[b] = plan_image(len_p[b], idx64.data_ptr<int64_t>() + b * n_a, mask_c.data_ptr<bool>() + b * n_a,
                            cls_token ? nullptr : score64.data_ptr<double>() + b * n_a);
  });

  auto out_x = at::empty_like(x_c);
  auto out_size = at::empty_like(size_c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge_tokens_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, size_c.scalar_type(), "merge_tokens_cpu_size", [&] {
      merge_kernel<x_t, scalar_t, int64_t>(plans, x_c.data_ptr<x_t>(), size_c.data_ptr<scalar_t>(),
                                           out_x.data_ptr<x_t>(), out_size.data_ptr<scalar_t>(), B, N, C);
    });
  });

  auto new_lengths = at::empty_like(len64);
  auto new_pos = at::empty_like(pos_map, pos_map.options().dtype(at::kLong));
  auto pos64 = pos_map.to(at::kLong).contiguous();
  const int64_t N0 = pos_map.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const MergePlan& p = plans[b];
    new_lengths.data_ptr<int64_t>()[b] = p.new_length;
    const int64_t* in = pos64.data_ptr<int64_t>() + b * N0;
    int64_t* outp = new_pos.data_ptr<int64_t>() + b * N0;
    for (int64_t i = 0; i < N0; ++i) {
      const int64_t s = in[i];
      TORCH_CHECK(s >= -1 && s < len_p[b], "merge_tokens_cpu: pos_map[", b, ", ", i, "]=", s,
                  " does not point at a valid slot");
      outp[i] = s < 0 ? -1 : p.dest[s];
    }
  }
  return {out_x, out_size, new_lengths.to(lengths.scalar_type()), new_pos.to(pos_map.scalar_type())};
}

}  // namespace dymu
