// Sparse attention on the CPU, reading K and V in place: a flash-attention loop over each query block's key ranges.
//
// For one (batch, head, query block) the kernel walks the block's key ranges (ascending, disjoint) in chunks of at
// most kv_chunk keys (from Python: 1024, 256 in the 16-bit entry); a chunk may join pieces of several ranges, side by
// side in one score buffer.
// Per chunk: the scores Q_blk K_piece^T of every piece (one small GEMM each, K read in place from its transposed
// copy), the band or stripe rule applied to the pieces it cuts, an online-softmax update of the block's running max,
// sum and output, and P_piece V_piece added into the output (one GEMM each, V read in place). No key or value is
// ever gathered.
//
// The GEMMs are oneDNN's batch-reduce micro-kernels (`at::native::cpublas::brgemm`, JIT-compiled for the machine's
// ISA) where torch has them, else the BLAS `sgemm_` torch links. Row maxima, exponentials and conversions run in
// at::vec's Vectorized for the instruction set the file is compiled for (-O3 -march=native). Two entries: float32
// (`sparse_attention`), and bfloat16 / float16 with VNNI-packed K and V for CPUs that multiply those natively
// (`sparse_attention_16bit`: AMX tiles or AVX512-BF16 through oneDNN's 16-bit micro-kernels; softmax in float32).
//
// Rules (token i = query, j = key; a = position on the axis [a0, a1); text tokens outside it see and are seen by all):
//   0 none:   the ranges are exact (blocks mode);
//   1 band:   axis pairs with |a_i - a_j| <= radius;
//   2 stripe: axis pairs with a_j < radius.

// at::vec's Vectorized (the exponential and conversions torch's own CPU attention uses) for the instruction set this
// file is compiled for (-march), in a namespace of its own so that its inline functions never merge with libtorch's.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY sparsediff_cpu
#include <torch/extension.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(char* transa, char* transb, int* m, int* n, int* k, float* alpha, const float* a, int* lda,
                       const float* b, int* ldb, float* beta, float* c, int* ldc);

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C (M x N, row-major, ld_c) (+)= A (M x K, ld_a) B (K x N, ld_b), all row-major float.
inline void gemm(bool use_brgemm, int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, bool add,
                 const float* A, const float* B, float* C) {
  if (use_brgemm) {
    at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, add, A, B, C, false);
    return;
  }
  // row-major C = A B is column-major C^T = B^T A^T: Fortran's sgemm with the operands swapped
  char n = 'N';
  int m_ = (int)N, n_ = (int)M, k_ = (int)K, lda = (int)ld_b, ldb = (int)ld_a, ldc = (int)ld_c;
  float one = 1.f, beta = add ? 1.f : 0.f;
  sgemm_(&n, &n, &m_, &n_, &k_, &one, B, &lda, A, &ldb, &beta, C, &ldc);
}

// exp(x) for x <= 0 in float32 (relative error ~2e-7); 0 below -87 (where exp underflows), so masked scores
// (-inf) give exactly 0. Written branch-free so that the loops calling it vectorise.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f);
  const float n = std::floor(t * 1.44269504088896341f + 0.5f);
  const float r = t - n * 0.693145751953125f - n * 1.42860682030941723e-6f;  // ln 2 split in two for precision
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.f ? 0.f : p * two_n;
}

struct Piece {
  int64_t j0, j1, col;  // keys [j0, j1) sit at columns [col, col + j1 - j0) of the score tile
  int64_t wcol = 0;     // 16-bit entry: the piece's weights start at this column of the weight tile (padded pairs)
};

using fVec = at::vec::Vectorized<float>;

inline float vec_max(const float* x, int64_t n) {
  constexpr int64_t L = fVec::size();
  fVec m(NEG_INF);
  int64_t c = 0;
  for (; c + L <= n; c += L) m = at::vec::maximum(m, fVec::loadu(x + c));
  float r = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, m);
  for (; c < n; ++c) r = std::max(r, x[c]);
  return r;
}

// The softmax shifts a row's exponentials by its running maximum as it stands, and moves the shift only when scores
// exceed it by more than this (the 16-bit entry then exponentiates the chunk again, float32 rescales what it already
// wrote): e^8 ~ 3e3 keeps the weights, their sums and the output far inside float32 and bfloat16 range. It saves the
// separate pass for each chunk's maximum (a quarter of the 16-bit entry's dense time on an Intel Xeon with AMX) and
// most rescales of the output.
constexpr float LAZY_SHIFT = 8.f;

// x[c] = exp(x[c] * scale - shift) in place (masked scores, -inf, give 0); returns the sum. `shift` is the row's
// running maximum as it stands (a lazy shift, see `LAZY_SHIFT`): where a score exceeds it by more than that, the
// shift rises to the maximum of the scores not yet exponentiated and the ones already are rescaled (rare). torch's
// vectorised exponential (`exp_u20`, relative error ~3e-7): at S = 8192 on an Intel Xeon, dense float32 attention
// through this kernel 10-18% faster than with this file's own polynomial (kept for the tails), and 7-8% more
// without a separate pass for each chunk's maximum.
inline float exp_sum_lazy(float* x, int64_t n, float scale, float& shift) {
  constexpr int64_t L = fVec::size();
  const fVec vs(scale), limit(LAZY_SHIFT);
  fVec vsh(-shift), sum(0.f);
  float tail = 0.f;
  auto raise = [&](int64_t c) {  // scores from c on outgrew the shift: move it, rescale [0, c) and the sum so far
    const float top = vec_max(x + c, n - c) * scale, ratio = std::exp(shift - top);
    for (int64_t d = 0; d < c; ++d) x[d] *= ratio;
    sum = sum * fVec(ratio);
    tail *= ratio;
    shift = top;
    vsh = fVec(-shift);
  };
  int64_t c = 0;
  for (; c + L <= n; c += L) {
    fVec y = at::vec::fmadd(fVec::loadu(x + c), vs, vsh);
    if ((y > limit).zero_mask() != (1 << L) - 1) {
      raise(c);
      y = at::vec::fmadd(fVec::loadu(x + c), vs, vsh);
    }
    const fVec e = y.exp_u20();
    sum = sum + e;
    e.store(x + c);
  }
  for (; c < n; ++c) {
    if (x[c] * scale - shift > LAZY_SHIFT) raise(c);
    x[c] = exp_nonpositive(x[c] * scale - shift);
    tail += x[c];
  }
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, sum) + tail;
}

// dst[c] = exp(x[c] * scale - shift) rounded to T (masked scores, -inf, give 0); returns the sum of the float
// exponentials and raises `seen` to the largest x. One pass: torch's fast exponential (`fexp_u20`, relative error
// ~1e-4, far below the 16-bit rounding of the weights that follows; 25% faster than `exp_u20`), the sum, the maximum
// and the conversion. x * scale - shift may exceed 0 by up to `LAZY_SHIFT` (see `run`).
template <typename T>
inline float exp_store(const float* x, T* dst, int64_t n, float scale, float shift, float& seen) {
  constexpr int64_t L = fVec::size();
  const fVec vs(scale), vsh(-shift);
  fVec sum(0.f), top(NEG_INF);
  int64_t c = 0;
  for (; c + 2 * L <= n; c += 2 * L) {
    const fVec xa = fVec::loadu(x + c), xb = fVec::loadu(x + c + L);
    top = at::vec::maximum(top, at::vec::maximum(xa, xb));
    const fVec a = at::vec::fmadd(xa, vs, vsh).fexp_u20();
    const fVec b = at::vec::fmadd(xb, vs, vsh).fexp_u20();
    sum = sum + a + b;
    at::vec::convert_from_float<T>(a, b).store(dst + c);
  }
  float s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, sum);
  seen = std::max(seen, at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return at::vec::maximum(a, b); }, top));
  for (; c < n; ++c) {
    const float e = exp_nonpositive(x[c] * scale - shift);
    s += e;
    dst[c] = T(e);
    seen = std::max(seen, x[c]);
  }
  return s;
}


struct Rule {
  int64_t kind, radius, a0, a1;
  // keys of [j0, j1) that axis query i may not see, as one or two spans (set to -inf in the score row)
  inline void mask_row(float* row, int64_t i, const Piece& p) const {
    if (kind == 0 || i < a0 || i >= a1) return;  // text queries see every key
    const int64_t lo = std::max(p.j0, a0), hi = std::min(p.j1, a1);  // the piece's axis keys
    if (lo >= hi) return;
    auto fill = [&](int64_t s, int64_t e) {
      for (int64_t j = std::max(s, lo); j < std::min(e, hi); ++j) row[p.col + j - p.j0] = NEG_INF;
    };
    if (kind == 1) {
      fill(lo, i - radius);       // keys before the band
      fill(i + radius + 1, hi);   // keys after it
    } else {
      fill(a0 + radius, hi);      // axis keys past the stripe
    }
  }
  // whether every pair of queries [i0, i1) x keys [j0, j1) is allowed (then no row needs masking)
  inline bool all_allowed(int64_t i0, int64_t i1, const Piece& p) const {
    if (kind == 0) return true;
    const int64_t qi0 = std::max(i0, a0), qi1 = std::min(i1, a1), kj0 = std::max(p.j0, a0), kj1 = std::min(p.j1, a1);
    if (qi0 >= qi1 || kj0 >= kj1) return true;
    if (kind == 1) return std::max(qi1 - 1 - kj0, kj1 - 1 - qi0) <= radius;
    return kj1 - 1 - a0 < radius;
  }
};

// Where the GEMMs read K and V, per input type T. float: K^T (B, H, D, ldk) and V (B, H, S, D) as they are, float32
// GEMMs (`gemm`). 16-bit (bfloat16, float16; Python uses it where the CPU multiplies them natively: AMX, AVX512-BF16):
// both VNNI-packed once per call, the layout oneDNN's 16-bit micro-kernels read B in (pairs of rows interleaved):
// K^T as (B, H, D / 2, ldk, 2), element (d, j) at (d / 2) 2 ldk + 2 j + d % 2, so the scores of keys [j0, j1) are one
// GEMM from column j0; V as (B, H, S2 / 2, D, 2) (S2: S rounded up to even, the pad row zero), element (j, d) at
// (j / 2) 2 D + 2 d + j % 2, so P V of keys [j0, j1) reads V from the even key at or below j0, with the keys' weights
// widened by a zero column on each side where a pair is half outside [j0, j1). Scores, the softmax and the output
// stay float32; the weights are rounded to T for their GEMM (as torch's 16-bit SDPA on the CPU does).
template <typename T>
void run(const T* qp, const T* kp, const T* vp, float* op, const int64_t* hp, const int32_t* rp, const int32_t* cp,
         int64_t B, int64_t H, int64_t Sq, int64_t S, int64_t D, int64_t G, int64_t Gr, int64_t nqb, int64_t max_r,
         int64_t ldk, int64_t qblock, float sc, const Rule& rule, int64_t kv_chunk, bool use_brgemm) {
  constexpr bool packed = !std::is_same_v<T, float>;
  const int64_t q0 = S - Sq, first_block = q0 / qblock, v_rows = packed ? S + S % 2 : S;

  at::parallel_for(0, B * G * (nqb - first_block), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(qblock * kv_chunk), acc(qblock * D), run_max(qblock), run_sum(qblock);
    std::vector<T> weights(packed ? qblock * (kv_chunk + 2) : 0);  // the chunk's weights in T, 16-bit only
    std::vector<Piece> pieces;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / (nqb - first_block), blk = first_block + item % (nqb - first_block);
      const int64_t g = bg % G, gr = Gr == 1 ? 0 : g, bh = (bg / G) * H + hp[g];
      const int64_t t0 = std::max(blk * qblock, q0), t1 = std::min((blk + 1) * qblock, S), M = t1 - t0;
      const T* qb = qp + (bh * Sq + t0 - q0) * D;
      const T* kb = kp + bh * D * ldk;  // D x ldk elements either way (packed: D / 2 rows of 2 ldk)
      const T* vb = vp + bh * v_rows * D;
      std::fill(acc.begin(), acc.begin() + M * D, 0.f);
      std::fill(run_max.begin(), run_max.begin() + M, NEG_INF);
      std::fill(run_sum.begin(), run_sum.begin() + M, 0.f);
      pieces.clear();
      int64_t filled = 0;
      auto flush = [&]() {
        if (filled == 0) return;
        for (const Piece& p : pieces)
          if (!rule.all_allowed(t0, t1, p))
            for (int64_t r = 0; r < M; ++r) rule.mask_row(scores.data() + r * kv_chunk, t0 + r, p);
        if constexpr (!packed) {
          for (int64_t r = 0; r < M; ++r) {
            float* row = scores.data() + r * kv_chunk;
            float shift = run_max[r];
            if (shift == NEG_INF) {  // the row's first allowed scores set its shift
              shift = vec_max(row, filled) * sc;
              if (shift == NEG_INF) {  // nothing allowed yet in this row: no weight
                std::fill(row, row + filled, 0.f);
                continue;
              }
            }
            const float sum = exp_sum_lazy(row, filled, sc, shift);
            const float alpha = run_max[r] == NEG_INF ? 0.f : std::exp(run_max[r] - shift);  // 1 unless it moved
            run_sum[r] = run_sum[r] * alpha + sum;
            run_max[r] = shift;
            if (alpha != 1.f)
              for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
          }
          for (const Piece& p : pieces)
            gemm(use_brgemm, M, D, p.j1 - p.j0, kv_chunk, D, D, true, scores.data() + p.col, vb + p.j0 * D, acc.data());
        } else {
          // each piece's weights from the even key at or below j0 to an even width: zero where a pair is half outside
          int64_t ldw = 0;
          for (Piece& p : pieces) {
            p.wcol = ldw;
            ldw += (p.j1 - (p.j0 & ~int64_t(1)) + 1) & ~int64_t(1);
          }
          if ((int64_t)weights.size() < M * ldw) weights.resize(M * ldw);
          for (int64_t r = 0; r < M; ++r) {
            const float* row = scores.data() + r * kv_chunk;
            T* wrow = weights.data() + r * ldw;
            float shift = run_max[r];
            if (shift == NEG_INF) {  // the row's first allowed scores set its shift
              shift = vec_max(row, filled) * sc;
              if (shift == NEG_INF) {  // nothing allowed yet in this row: no weight
                std::fill(wrow, wrow + ldw, T(0.f));
                continue;
              }
            }
            auto weigh = [&](float by, float& seen) {
              float sum = 0.f;
              for (const Piece& p : pieces) {
                T* w = wrow + p.wcol;
                const int64_t lead = p.j0 % 2, n = p.j1 - p.j0;
                if (lead) w[0] = T(0.f);
                if ((lead + n) % 2) w[lead + n] = T(0.f);
                sum += exp_store(row + p.col, w + lead, n, sc, by, seen);
              }
              return sum;
            };
            float seen = NEG_INF;
            float sum = weigh(shift, seen);
            if (seen * sc > shift + LAZY_SHIFT) {  // the chunk outgrew the shift: again, shifted by its maximum
              shift = seen * sc;
              sum = weigh(shift, seen);
            }
            const float alpha = run_max[r] == NEG_INF ? 0.f : std::exp(run_max[r] - shift);  // 1 unless it moved
            run_sum[r] = run_sum[r] * alpha + sum;
            run_max[r] = shift;
            if (alpha != 1.f)
              for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
          }
          for (const Piece& p : pieces) {
            const int64_t j = p.j0 & ~int64_t(1), w = (p.j1 - j + 1) & ~int64_t(1);
            at::native::cpublas::brgemm(M, D, w, ldw, D, D, true, weights.data() + p.wcol, vb + j * D, acc.data(),
                                        true);
          }
        }
        pieces.clear();
        filled = 0;
      };
      const int32_t* rr = rp + (gr * nqb + blk) * max_r * 2;
      const int32_t nr = cp[gr * nqb + blk];
      for (int32_t i = 0; i < nr; ++i) {
        for (int64_t j = rr[2 * i], e = rr[2 * i + 1]; j < e;) {
          const int64_t take = std::min(e - j, kv_chunk - filled);
          if constexpr (!packed)
            gemm(use_brgemm, M, take, D, D, ldk, kv_chunk, false, qb, kb + j, scores.data() + filled);
          else
            at::native::cpublas::brgemm(M, take, D, D, ldk, kv_chunk, false, qb, kb + 2 * j, scores.data() + filled,
                                        true);
          pieces.push_back({j, j + take, filled, 0});
          filled += take;
          j += take;
          if (filled == kv_chunk) flush();
        }
      }
      flush();
      float* ob = op + (bh * Sq + t0 - q0) * D;
      for (int64_t r = 0; r < M; ++r) {
        const float inv = run_sum[r] > 0.f ? 1.f / run_sum[r] : 0.f;
        for (int64_t d = 0; d < D; ++d) ob[r * D + d] = acc[r * D + d] * inv;
      }
    }
    if constexpr (packed) at::native::cpublas::brgemm_release(true);  // the thread's AMX tile state, if any
  });
}

void check_tables(const torch::Tensor& heads, const torch::Tensor& ranges, const torch::Tensor& counts, int64_t H,
                  int64_t S, int64_t qblock, int64_t kv_chunk) {
  TORCH_CHECK(ranges.scalar_type() == at::kInt && counts.scalar_type() == at::kInt && heads.scalar_type() == at::kLong,
              "sparse_attention: int32 tables, int64 heads");
  TORCH_CHECK(kv_chunk > 0 && qblock > 0, "sparse_attention: kv_chunk and qblock must be positive");
  TORCH_CHECK(ranges.size(1) == (S + qblock - 1) / qblock && (ranges.size(0) == 1 || ranges.size(0) == heads.numel()),
              "sparse_attention: table shapes");
  const int64_t* hp = heads.data_ptr<int64_t>();
  for (int64_t g = 0; g < heads.numel(); ++g)
    TORCH_CHECK(hp[g] >= 0 && hp[g] < H, "sparse_attention: head index out of range");
}

}  // namespace

// q (B, H, Sq, D): the last Sq of S tokens' queries; kt (B, H, D, ldk >= S): keys transposed, in the first S
// columns of a buffer whose rows may be longer (a stride that nearby lengths share); v (B, H, S, D); out
// (B, H, Sq, D), written for the heads in `heads` only; all float32 contiguous. heads (G,) int64: the group's heads
// (a layer's groups share q, kt, v and out: nothing is sliced or scattered). ranges (G', nqb, max_r, 2) int32 and
// counts (G', nqb) int32: query block b (tokens [b * qblock, (b + 1) * qblock)) attends keys in
// ranges[g', b, :counts[g', b]] (G' = 1: shared by the group). A query with no allowed key gets zeros.
void sparse_attention(const torch::Tensor& q, const torch::Tensor& kt, const torch::Tensor& v, torch::Tensor& out,
                      const torch::Tensor& heads, const torch::Tensor& ranges, const torch::Tensor& counts,
                      int64_t qblock, double scale, int64_t rule_kind, int64_t radius, int64_t a0, int64_t a1,
                      int64_t kv_chunk, bool use_brgemm) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && kt.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
              out.scalar_type() == at::kFloat, "sparse_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && kt.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "sparse_attention: contiguous tensors");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), S = v.size(2);
  const int64_t ldk = kt.size(3);  // K^T's row stride: S, or more (a padded buffer; the columns past S are not read)
  TORCH_CHECK(kt.size(1) == H && kt.size(2) == D && ldk >= S && v.size(1) == H && out.sizes() == q.sizes() && Sq <= S,
              "sparse_attention: shapes");
  check_tables(heads, ranges, counts, H, S, qblock, kv_chunk);
  run<float>(q.data_ptr<float>(), kt.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
             heads.data_ptr<int64_t>(), ranges.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), B, H, Sq, S, D,
             heads.numel(), ranges.size(0), ranges.size(1), ranges.size(2), ldk, qblock, (float)scale,
             Rule{rule_kind, radius, a0, a1}, kv_chunk, use_brgemm);
}

// The same for 16-bit q, K and V (bfloat16 or float16, one type), VNNI-packed (see `run`): q (B, H, Sq, D) with D
// even, kp (B, H, D / 2, ldk, 2) with ldk >= S, vp (B, H, S2 / 2, D, 2); out float32 (B, H, Sq, D). Needs oneDNN's
// micro-kernels (no BLAS fallback).
void sparse_attention_16bit(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp,
                            torch::Tensor& out, const torch::Tensor& heads, const torch::Tensor& ranges,
                            const torch::Tensor& counts, int64_t qblock, double scale, int64_t rule_kind,
                            int64_t radius, int64_t a0, int64_t a1, int64_t kv_chunk, int64_t S) {
  const auto t = q.scalar_type();
  TORCH_CHECK((t == at::kBFloat16 || t == at::kHalf) && kp.scalar_type() == t && vp.scalar_type() == t &&
              out.scalar_type() == at::kFloat, "sparse_attention_16bit: 16-bit q, k, v of one type, float32 out");
  TORCH_CHECK(q.is_contiguous() && kp.is_contiguous() && vp.is_contiguous() && out.is_contiguous(),
              "sparse_attention_16bit: contiguous tensors");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), ldk = kp.size(3);
  TORCH_CHECK(D % 2 == 0 && kp.dim() == 5 && kp.size(1) == H && kp.size(2) == D / 2 && kp.size(4) == 2 && ldk >= S &&
              vp.dim() == 5 && vp.size(1) == H && vp.size(2) == (S + 1) / 2 && vp.size(3) == D && vp.size(4) == 2 &&
              out.sizes() == q.sizes() && Sq <= S, "sparse_attention_16bit: shapes");
  check_tables(heads, ranges, counts, H, S, qblock, kv_chunk);
  const Rule rule{rule_kind, radius, a0, a1};
  auto go = [&](auto tag) {
    using T = decltype(tag);
    run<T>(q.data_ptr<T>(), kp.data_ptr<T>(), vp.data_ptr<T>(), out.data_ptr<float>(), heads.data_ptr<int64_t>(),
           ranges.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), B, H, Sq, S, D, heads.numel(), ranges.size(0),
           ranges.size(1), ranges.size(2), ldk, qblock, (float)scale, rule, kv_chunk, true);
  };
  if (t == at::kBFloat16)
    go(at::BFloat16());
  else
    go(at::Half());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_attention", &sparse_attention, "Sparse attention over per-query-block key ranges (CPU, float32)");
  m.def("sparse_attention_16bit", &sparse_attention_16bit,
        "The same for VNNI-packed bfloat16 or float16 operands (oneDNN micro-kernels; float32 out)");
}
