// Sparse attention on the CPU, reading K and V in place: a flash-attention loop over each query block's key ranges.
//
// For one (batch, head, query block) the kernel walks the block's key ranges (ascending, disjoint) in chunks of at
// most kv_chunk keys (1024 from Python); a chunk may join pieces of several ranges, side by side in one score buffer.
// Per chunk: the scores Q_blk K_piece^T of every piece (one small GEMM each, K read in place from its transposed
// copy), the band or stripe rule applied to the pieces it cuts, an online-softmax update of the block's running max,
// sum and output, and P_piece V_piece added into the output (one GEMM each, V read in place). No key or value is
// ever gathered.
//
// The GEMMs are oneDNN's batch-reduce micro-kernels (`at::native::cpublas::brgemm`, JIT-compiled for the machine's
// ISA) where torch has them, else the BLAS `sgemm_` torch links. The exponentials run in a polynomial this file
// vectorises (plain loops; -O3 -march=native -fno-trapping-math).
//
// Rules (token i = query, j = key; a = position on the axis [a0, a1); text tokens outside it see and are seen by all):
//   0 none:   the ranges are exact (blocks mode);
//   1 band:   axis pairs with |a_i - a_j| <= radius;
//   2 stripe: axis pairs with a_j < radius.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

inline float row_max(const float* x, int64_t n) {
  float lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = NEG_INF;
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    for (int l = 0; l < 16; ++l) lanes[l] = std::max(lanes[l], x[c + l]);
  float m = NEG_INF;
  for (int l = 0; l < 16; ++l) m = std::max(m, lanes[l]);
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x[c] = exp(x[c] * scale - shift) in place; returns the sum. Two loops: the map vectorises as it stands (with
// -fno-trapping-math), the sum through explicit lanes (float addition is not reassociated otherwise).
inline float exp_sum(float* __restrict x, int64_t n, float scale, float shift) {
  for (int64_t c = 0; c < n; ++c) x[c] = exp_nonpositive(x[c] * scale - shift);
  float lanes[16] = {0.f};
  int64_t c = 0;
  for (; c + 16 <= n; c += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += x[c + l];
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  for (; c < n; ++c) s += x[c];
  return s;
}

struct Piece {
  int64_t j0, j1, col;  // keys [j0, j1) sit at columns [col, col + j1 - j0) of the score tile
};

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
  TORCH_CHECK(ranges.scalar_type() == at::kInt && counts.scalar_type() == at::kInt && heads.scalar_type() == at::kLong,
              "sparse_attention: int32 tables, int64 heads");
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), S = v.size(2), G = heads.numel();
  const int64_t Gr = ranges.size(0), nqb = ranges.size(1), max_r = ranges.size(2), q0 = S - Sq;
  TORCH_CHECK(kv_chunk > 0 && qblock > 0, "sparse_attention: kv_chunk and qblock must be positive");
  const int64_t ldk = kt.size(3);  // K^T's row stride: S, or more (a padded buffer; the columns past S are not read)
  TORCH_CHECK(kt.size(1) == H && kt.size(2) == D && ldk >= S && v.size(1) == H && out.sizes() == q.sizes() &&
              nqb == (S + qblock - 1) / qblock && (Gr == 1 || Gr == G), "sparse_attention: shapes");
  const int64_t* hp = heads.data_ptr<int64_t>();
  for (int64_t g = 0; g < G; ++g) TORCH_CHECK(hp[g] >= 0 && hp[g] < H, "sparse_attention: head index out of range");
  const float* qp = q.data_ptr<float>();
  const float* kp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int32_t* rp = ranges.data_ptr<int32_t>();
  const int32_t* cp = counts.data_ptr<int32_t>();
  const Rule rule{rule_kind, radius, a0, a1};
  const float sc = (float)scale;
  const int64_t first_block = q0 / qblock;

  at::parallel_for(0, B * G * (nqb - first_block), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(qblock * kv_chunk), acc(qblock * D), run_max(qblock), run_sum(qblock);
    std::vector<Piece> pieces;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bg = item / (nqb - first_block), blk = first_block + item % (nqb - first_block);
      const int64_t g = bg % G, gr = Gr == 1 ? 0 : g, bh = (bg / G) * H + hp[g];
      const int64_t t0 = std::max(blk * qblock, q0), t1 = std::min((blk + 1) * qblock, S), M = t1 - t0;
      const float* qb = qp + (bh * Sq + t0 - q0) * D;
      const float* kb = kp + bh * D * ldk;
      const float* vb = vp + bh * S * D;
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
        for (int64_t r = 0; r < M; ++r) {
          float* row = scores.data() + r * kv_chunk;
          const float m_new = std::max(run_max[r], row_max(row, filled) * sc);
          if (m_new == NEG_INF) {  // nothing allowed yet in this row: no weight
            std::fill(row, row + filled, 0.f);
            continue;
          }
          const float alpha = run_max[r] == NEG_INF ? 0.f : std::exp(run_max[r] - m_new);
          run_sum[r] = run_sum[r] * alpha + exp_sum(row, filled, sc, m_new);
          run_max[r] = m_new;
          if (alpha != 1.f)
            for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= alpha;
        }
        for (const Piece& p : pieces)
          gemm(use_brgemm, M, D, p.j1 - p.j0, kv_chunk, D, D, true, scores.data() + p.col, vb + p.j0 * D, acc.data());
        pieces.clear();
        filled = 0;
      };
      const int32_t* rr = rp + (gr * nqb + blk) * max_r * 2;
      const int32_t nr = cp[gr * nqb + blk];
      for (int32_t i = 0; i < nr; ++i) {
        for (int64_t j = rr[2 * i], e = rr[2 * i + 1]; j < e;) {
          const int64_t take = std::min(e - j, kv_chunk - filled);
          gemm(use_brgemm, M, take, D, D, ldk, kv_chunk, false, qb, kb + j, scores.data() + filled);
          pieces.push_back({j, j + take, filled});
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
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_attention", &sparse_attention, "Sparse attention over per-query-block key ranges (CPU, float32)");
}
