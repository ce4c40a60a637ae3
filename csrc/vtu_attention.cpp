// VTU attention on the CPU (docs/design.md §1.3): attention over the virtual full
// sequence of N positions, computed from N_un unique tokens.
//
//   o_p     = sum_s softmax_s((R_p q_m(p)) . (R_s k_m(s)) * scale + causal(p, s)) v_m(s)
//   o_un[u] = mean over {p : m(p) = u} of o_p
//
// FlashAttention-style: a task owns a block of query rows (all the query heads
// that share one key/value head, times a block of positions), gathers and
// rotates them once, then streams over blocks of keys: keys and values are
// gathered through the merge map and rotated at their full positions into a
// small buffer (the expanded sequence never exists in memory), scores come
// from one GEMM per block, softmax is online in fp32 (base 2), and blocks that
// lie entirely above the causal diagonal are never visited.
//
// Numerics: inputs of any float dtype are widened to fp32 on load; all
// arithmetic is fp32. NaN/inf follow the op's contract (ops/vtu.py): only the
// keys a row attends reach it (see attend()). Determinism: every per-position
// output row is written by exactly one task, and the re-merge averages
// positions in position order (segment_mean_cpu), so results do not depend on
// the thread count.
#include "dymu_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace dymu {
namespace {

constexpr int64_t kQueryBlock = 64;  // positions per task (times the heads of one KV group)
constexpr int64_t kKeyBlock = 256;         // keys per streamed block (prefill)
constexpr int64_t kDecodeKeyBlock = 2048;  // decode: few query rows, so long blocks and few GEMM calls
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Compiled for AVX-512, AVX2 and baseline x86-64; the loader picks the best
// the CPU has (GCC function multi-versioning). The loops below are written so
// that GCC vectorises them (tests/test_vtu_cpp.py reads the object file: zmm
// and ymm instructions in the clones). no-trapping-math lets GCC if-convert
// the clamp in exp2_shifted (FP exceptions are never enabled here).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DYMU_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define DYMU_MULTIVERSION
#endif

// x <- 2^(x - m) for x <= m (softmax numerators in base 2); -inf -> exactly 0.
// Range reduction 2^(n+f), |f| <= 1/2, degree-7 Taylor polynomial of 2^f
// (relative error < 1e-8, below fp32 rounding), 2^n built in the exponent bits.
DYMU_MULTIVERSION
void exp2_shifted(float* __restrict x, int64_t n, float m) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float d = x[i] - m;
    const float t = d > -127.0f ? d : -127.0f;  // also maps -inf to -127
    // floor(t + 1/2) by truncating a positive number (no libm call, vectorises).
    const int32_t k = static_cast<int32_t>(t + 127.5f) - 127;
    const float f = t - static_cast<float>(k);
    float p = 1.5252733804059841e-05f;
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.6181291076284772e-03f;
    p = p * f + 5.5504108664821580e-02f;
    p = p * f + 2.4022650695910071e-01f;
    p = p * f + 6.9314718055994531e-01f;
    p = p * f + 1.0f;
    union {
      int32_t i;
      float f;
    } scale;  // 2^k from its exponent bits; k = -127 gives 0.0f
    scale.i = (k + 127) << 23;
    x[i] = p * scale.f;
  }
}

DYMU_MULTIVERSION
float row_max(const float* __restrict x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

DYMU_MULTIVERSION
float row_sum(const float* __restrict x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

DYMU_MULTIVERSION
void scale_row(float* __restrict x, int64_t n, float a) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

DYMU_MULTIVERSION
bool all_finite(const float* __restrict x, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= std::numeric_limits<float>::max());
  return bad == 0;
}

// 1 / (softmax denominator); a query that attends no key has l = 0 and outputs 0.
inline float inv_sum(float l) { return l == 0.f ? 0.f : 1.f / l; }

// A non-finite value of a gathered V row: its block row, dim and value.
struct BadValue {
  int64_t j, d;
  float value;
};

// One row of the RoPE tables at a position: cos/sin of width W = D (HF format)
// or D/2 (one entry per frequency, used for both halves).
struct RopeRow {
  const float* cos;
  const float* sin;
};

// x <- (R_p x) * mult in place, HF rotate_half convention:
//   x[j] = x[j] cos[j] - x[j+h] sin[j],  x[j+h] = x[j+h] cos[j+h] + x[j] sin[j+h].
DYMU_MULTIVERSION
void rotate_inplace(float* __restrict x, const float* __restrict cos, const float* __restrict sin, int64_t D,
                    bool half_table, float mult) {
  const int64_t h = D / 2;
  const float* c2 = half_table ? cos : cos + h;
  const float* s2 = half_table ? sin : sin + h;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) {
    const float x1 = x[j], x2 = x[j + h];
    x[j] = (x1 * cos[j] - x2 * sin[j]) * mult;
    x[j + h] = (x2 * c2[j] + x1 * s2[j]) * mult;
  }
}

template <typename scalar_t>
inline void load_row(const scalar_t* __restrict x, int64_t D, float* __restrict out) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    std::memcpy(out, x, sizeof(float) * D);
  } else {
    for (int64_t j = 0; j < D; ++j) out[j] = static_cast<float>(x[j]);
  }
}

// out = (R_p x) * mult for a row of any float dtype.
template <typename scalar_t>
inline void rotate_row(const scalar_t* __restrict x, RopeRow r, int64_t D, bool half_table, float mult,
                       float* __restrict out) {
  load_row(x, D, out);
  rotate_inplace(out, r.cos, r.sin, D, half_table, mult);
}

// Strided view of a [B, H, R, D] tensor whose last dim is contiguous.
template <typename scalar_t>
struct Rows {
  const scalar_t* data;
  int64_t sb, sh, sr;
  const scalar_t* row(int64_t b, int64_t h, int64_t r) const { return data + b * sb + h * sh + r * sr; }
};

template <typename scalar_t>
Rows<scalar_t> rows_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Everything a task needs to read keys/values of one sample and KV head.
template <typename scalar_t, typename index_t>
struct KeySource {
  Rows<scalar_t> k, v;
  const index_t* map;  // [N] of this sample
  const float* cos;    // [N, W] of this sample
  const float* sin;
  int64_t W, D;
  bool half_table;
};

// Per-thread scratch, kept across calls: buffers of this size would otherwise
// be fresh mmap'd pages (page faults) on every call, which costs more than a
// decode step's arithmetic.
struct Scratch {
  std::vector<float> q, k, v, s, o, m, l;
  std::vector<BadValue> bad;
  int64_t key_block = kKeyBlock;
  void reserve(int64_t rows, int64_t D, int64_t keys_per_block) {
    key_block = keys_per_block;
    q.resize(rows * D);
    k.resize(key_block * D);
    v.resize(key_block * D);
    s.resize(rows * key_block);
    o.resize(rows * D);
    m.resize(rows);
    l.resize(rows);
  }
};

Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

inline at::Tensor view2d(float* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

// Online-softmax attention of `nq` prepared query rows (scratch.q, already
// rotated and scaled by scale*log2(e)) against the keys at positions
// [0, key_end) of one sample/KV head. qpos[i] is the full position of query
// row i (-1: padding row, skipped). Leaves unnormalised outputs in scratch.o
// and row sums in scratch.l.
//
// Non-finite values (the op's contract, ops/vtu.py): only keys a row attends
// may reach it. A NaN/inf score of an attended key poisons the row (m = l =
// NaN and a NaN row of P, so its output is NaN). V rows go through the GEMM
// with their NaN/inf entries zeroed, since a masked weight of 0 times NaN
// would leak a future key's value into earlier rows of the block; those
// entries are then added to the rows that attend them (IEEE: p * inf).
template <typename scalar_t, typename index_t>
void attend(const KeySource<scalar_t, index_t>& src, int64_t b, int64_t hk, const int64_t* qpos, int64_t nq,
            int64_t key_end, bool causal, Scratch& sc) {
  const int64_t D = src.D;
  std::fill(sc.o.begin(), sc.o.begin() + nq * D, 0.f);
  std::fill(sc.m.begin(), sc.m.begin() + nq, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + nq, 0.f);
  auto Q = view2d(sc.q.data(), nq, D);
  auto O = view2d(sc.o.data(), nq, D);
  for (int64_t s0 = 0; s0 < key_end; s0 += sc.key_block) {
    const int64_t nk = std::min(sc.key_block, key_end - s0);
    // Gather and rotate this block's keys; padding keys become zero rows (masked below).
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t s = s0 + j;
      const int64_t u = static_cast<int64_t>(src.map[s]);
      float* kr = sc.k.data() + j * D;
      float* vr = sc.v.data() + j * D;
      if (u < 0) {
        std::fill(kr, kr + D, 0.f);
        std::fill(vr, vr + D, 0.f);
        continue;
      }
      rotate_row(src.k.row(b, hk, u), RopeRow{src.cos + s * src.W, src.sin + s * src.W}, D, src.half_table, 1.f, kr);
      load_row(src.v.row(b, hk, u), D, vr);
    }
    sc.bad.clear();
    if (!all_finite(sc.v.data(), nk * D)) {
      for (int64_t e = 0; e < nk * D; ++e) {
        if (!std::isfinite(sc.v[e])) {
          sc.bad.push_back({e / D, e % D, sc.v[e]});
          sc.v[e] = 0.f;
        }
      }
    }
    auto S = view2d(sc.s.data(), nq, nk);
    at::cpu::mm_out(S, Q, view2d(sc.k.data(), nk, D).t());
    for (int64_t i = 0; i < nq; ++i) {
      float* srow = sc.s.data() + i * nk;
      const int64_t p = qpos[i];
      if (p < 0 || std::isnan(sc.m[i])) {
        // Padding row (contributes nothing, never read), or poisoned by an
        // earlier block (its output row is NaN already).
        std::fill(srow, srow + nk, 0.f);
        continue;
      }
      // Visible keys of this row: s <= p when causal, and not padding.
      const int64_t visible = causal ? std::min(nk, std::max<int64_t>(p - s0 + 1, 0)) : nk;
      for (int64_t j = visible; j < nk; ++j) srow[j] = kNegInf;
      bool poisoned = false;
      for (int64_t j = 0; j < visible; ++j) {
        if (src.map[s0 + j] < 0)
          srow[j] = kNegInf;
        else if (!std::isfinite(srow[j]))  // -inf too: it would read as "masked"
          poisoned = true;
      }
      if (poisoned) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::fill(srow, srow + nk, nan);
        sc.m[i] = sc.l[i] = nan;
        continue;
      }
      const float m_new = std::max(sc.m[i], row_max(srow, nk));
      if (m_new == kNegInf) {  // nothing visible yet in this row
        std::fill(srow, srow + nk, 0.f);
        continue;
      }
      const float alpha = sc.m[i] == kNegInf ? 0.f : std::exp2(sc.m[i] - m_new);
      exp2_shifted(srow, nk, m_new);
      sc.l[i] = sc.l[i] * alpha + row_sum(srow, nk);
      sc.m[i] = m_new;
      if (alpha != 1.f) scale_row(sc.o.data() + i * D, D, alpha);
    }
    at::cpu::addmm_(O, S, view2d(sc.v.data(), nk, D));
    for (const BadValue& e : sc.bad) {
      const int64_t s = s0 + e.j;
      for (int64_t i = 0; i < nq; ++i)
        if (qpos[i] >= 0 && (!causal || s <= qpos[i])) sc.o[i * D + e.d] += sc.s[i * nk + e.j] * e.value;
    }
  }
}

// Rows of a query block: for each query head of the KV group, for each
// position of the block. Returns the row count and fills qpos / the rows.
template <typename scalar_t, typename index_t>
int64_t gather_queries(const Rows<scalar_t>& q, const KeySource<scalar_t, index_t>& src, int64_t b, int64_t h0,
                       int64_t n_rep, int64_t p0, int64_t p1, float mult, std::vector<int64_t>& qpos, Scratch& sc) {
  const int64_t D = src.D, np = p1 - p0;
  for (int64_t r = 0; r < n_rep; ++r) {
    for (int64_t i = 0; i < np; ++i) {
      const int64_t row = r * np + i, p = p0 + i;
      const int64_t u = static_cast<int64_t>(src.map[p]);
      float* out = sc.q.data() + row * D;
      qpos[row] = u < 0 ? -1 : p;
      if (u < 0) {
        std::fill(out, out + D, 0.f);
        continue;
      }
      rotate_row(q.row(b, h0 + r, u), RopeRow{src.cos + p * src.W, src.sin + p * src.W}, D, src.half_table, mult, out);
    }
  }
  return n_rep * np;
}

struct Problem {
  int64_t B, H, Hkv, n_rep, U, N, D, W;
  float scale;
  bool half_table;
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& merge_map, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t q_rows, const char* fn) {
  for (const auto* t : {&q, &k, &v, &merge_map, &cos, &sin})
    TORCH_CHECK(t->device().is_cpu(), fn, ": all inputs must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, fn, ": q, k, v must be 4-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), fn,
              ": q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), fn, ": k and v must have the same shape");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(2) == q_rows, fn, ": q/k shapes disagree");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, fn, ": KV heads must divide query heads");
  TORCH_CHECK(q.size(3) % 2 == 0, fn, ": head dim must be even");
  TORCH_CHECK(merge_map.dim() == 2 && merge_map.size(0) == q.size(0), fn, ": merge_map must be [B, N]");
  TORCH_CHECK(merge_map.scalar_type() == at::kInt || merge_map.scalar_type() == at::kLong, fn,
              ": merge_map must be int32 or int64");
  const int64_t B = q.size(0), N = merge_map.size(1), D = q.size(3);
  for (const auto* t : {&cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 3 && t->size(0) == B && t->size(1) == N, fn,
                ": cos/sin must be float32 [B, N, W]");
    TORCH_CHECK(t->size(2) == D || t->size(2) == D / 2, fn, ": cos/sin width must be D or D/2");
  }
  TORCH_CHECK(cos.size(2) == sin.size(2), fn, ": cos and sin widths differ");
  if (merge_map.numel() > 0) {
    const int64_t lo = merge_map.min().item<int64_t>(), hi = merge_map.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < k.size(2), fn, ": merge_map values must lie in [-1, ", k.size(2), "), got [", lo,
                ", ", hi, "]");
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename scalar_t, typename index_t>
KeySource<scalar_t, index_t> key_source(const at::Tensor& k, const at::Tensor& v, const at::Tensor& map,
                                        const at::Tensor& cos, const at::Tensor& sin, const Problem& pb,
                                        int64_t b) {
  return {rows_of<scalar_t>(k),
          rows_of<scalar_t>(v),
          map.data_ptr<index_t>() + b * pb.N,
          cos.data_ptr<float>() + b * pb.N * pb.W,
          sin.data_ptr<float>() + b * pb.N * pb.W,
          pb.W,
          pb.D,
          pb.half_table};
}

template <typename scalar_t, typename index_t>
void prefill_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& map,
                    const at::Tensor& cos, const at::Tensor& sin, const Problem& pb, bool causal,
                    float* o_full) {
  const int64_t n_blocks = (pb.N + kQueryBlock - 1) / kQueryBlock;
  const auto qrows = rows_of<scalar_t>(q);
  // Tasks: (sample, KV head, query block); later blocks see more keys, so a
  // grain of 1 lets the scheduler balance them.
  at::parallel_for(0, pb.B * pb.Hkv * n_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch& sc = thread_scratch();
    sc.reserve(pb.n_rep * kQueryBlock, pb.D, kKeyBlock);
    std::vector<int64_t> qpos(pb.n_rep * kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task % n_blocks, hk = (task / n_blocks) % pb.Hkv, b = task / (n_blocks * pb.Hkv);
      const int64_t p0 = blk * kQueryBlock, p1 = std::min(pb.N, p0 + kQueryBlock);
      const auto src = key_source<scalar_t, index_t>(k, v, map, cos, sin, pb, b);
      const int64_t h0 = hk * pb.n_rep;
      const int64_t nq = gather_queries(qrows, src, b, h0, pb.n_rep, p0, p1, pb.scale * kLog2e, qpos, sc);
      attend(src, b, hk, qpos.data(), nq, causal ? p1 : pb.N, causal, sc);
      const int64_t np = p1 - p0;
      for (int64_t row = 0; row < nq; ++row) {
        const int64_t h = h0 + row / np, p = p0 + row % np;
        float* dst = o_full + ((b * pb.H + h) * pb.N + p) * pb.D;
        if (qpos[row] < 0) {
          std::fill(dst, dst + pb.D, 0.f);
          continue;
        }
        const float* src_row = sc.o.data() + row * pb.D;
        const float inv = inv_sum(sc.l[row]);
        for (int64_t j = 0; j < pb.D; ++j) dst[j] = src_row[j] * inv;
      }
    }
  });
}

template <typename scalar_t, typename index_t>
void decode_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& map,
                   const at::Tensor& cos, const at::Tensor& sin, const Problem& pb, int64_t T,
                   scalar_t* out) {
  const auto qrows = rows_of<scalar_t>(q);
  // One task per (sample, KV head): the heads that share it are the rows of
  // one block, so every cached key is gathered and rotated once per step.
  at::parallel_for(0, pb.B * pb.Hkv, 1, [&](int64_t begin, int64_t end) {
    Scratch& sc = thread_scratch();
    sc.reserve(pb.n_rep * T, pb.D, std::min(kDecodeKeyBlock, pb.N));
    std::vector<int64_t> qpos(pb.n_rep * T);
    const float mult = pb.scale * kLog2e;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task % pb.Hkv, b = task / pb.Hkv, h0 = hk * pb.n_rep;
      const auto src = key_source<scalar_t, index_t>(k, v, map, cos, sin, pb, b);
      for (int64_t r = 0; r < pb.n_rep; ++r) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = r * T + t, p = pb.N - T + t;
          qpos[row] = p;  // a padding new token still attends the tokens before it
          rotate_row(qrows.row(b, h0 + r, t), RopeRow{src.cos + p * pb.W, src.sin + p * pb.W}, pb.D,
                     pb.half_table, mult, sc.q.data() + row * pb.D);
        }
      }
      attend(src, b, hk, qpos.data(), pb.n_rep * T, pb.N, /*causal=*/true, sc);
      for (int64_t row = 0; row < pb.n_rep * T; ++row) {
        const int64_t h = h0 + row / T, t = row % T;
        scalar_t* dst = out + ((b * pb.H + h) * T + t) * pb.D;
        const float* o = sc.o.data() + row * pb.D;
        const float inv = inv_sum(sc.l[row]);
        for (int64_t j = 0; j < pb.D; ++j) dst[j] = static_cast<scalar_t>(o[j] * inv);
      }
    }
  });
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& merge_map,
                     const at::Tensor& cos, double scale) {
  Problem pb;
  pb.B = q.size(0);
  pb.H = q.size(1);
  pb.Hkv = k.size(1);
  pb.n_rep = pb.H / pb.Hkv;
  pb.U = k.size(2);
  pb.N = merge_map.size(1);
  pb.D = q.size(3);
  pb.W = cos.size(2);
  pb.scale = static_cast<float>(scale);
  pb.half_table = pb.W != pb.D;
  return pb;
}

}  // namespace

at::Tensor vtu_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& merge_map, const at::Tensor& cos, const at::Tensor& sin,
                                double scale, bool causal) {
  check_inputs(q_in, k_in, v_in, merge_map, cos, sin, k_in.size(2), "vtu_attention_cpu");
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto map = merge_map.contiguous();
  const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const Problem pb = make_problem(q, k, map, cos_c, scale);
  auto o_full = at::empty({pb.B, pb.H, pb.N, pb.D}, q.options().dtype(at::kFloat));
  if (o_full.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vtu_attention_cpu", [&] {
      if (map.scalar_type() == at::kInt)
        prefill_kernel<scalar_t, int32_t>(q, k, v, map, cos_c, sin_c, pb, causal, o_full.data_ptr<float>());
      else
        prefill_kernel<scalar_t, int64_t>(q, k, v, map, cos_c, sin_c, pb, causal, o_full.data_ptr<float>());
    });
  }
  // Re-merge in position order (deterministic); unique tokens no position maps to are 0.
  return segment_mean_cpu(o_full, map, pb.U).to(q.scalar_type());
}

at::Tensor vtu_decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                       const at::Tensor& v_in, const at::Tensor& merge_map,
                                       const at::Tensor& cos, const at::Tensor& sin, double scale) {
  const int64_t T = q_in.dim() == 4 ? q_in.size(2) : 0;
  check_inputs(q_in, k_in, v_in, merge_map, cos, sin, T, "vtu_decode_attention_cpu");
  TORCH_CHECK(T <= merge_map.size(1), "vtu_decode_attention_cpu: more new tokens than positions");
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const auto map = merge_map.contiguous();
  const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();
  const Problem pb = make_problem(q, k, map, cos_c, scale);
  auto out = at::empty({pb.B, pb.H, T, pb.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vtu_decode_attention_cpu", [&] {
    if (map.scalar_type() == at::kInt)
      decode_kernel<scalar_t, int32_t>(q, k, v, map, cos_c, sin_c, pb, T, out.data_ptr<scalar_t>());
    else
      decode_kernel<scalar_t, int64_t>(q, k, v, map, cos_c, sin_c, pb, T, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace dymu
