// dynexec::skinny_linear(x, weight, bias): F.linear for a few rows of x (a decoding step's
// tokens), fp32, AVX2 + FMA. Built and loaded by skinny.py; the reasons and measurements are
// in its docstring.
//
// The weight ([N, K], row-major) is streamed from memory exactly once: for each block of 4
// weight rows, every group of up to 3 rows of x is multiplied while the block sits in L1, and
// the next block is prefetched meanwhile, its rows spread over the groups so that memory stays
// busy while the later groups compute (prefetching it all during the first group measured
// 25% slower at 4-5 rows). 12 accumulators (3 x 4) stay in registers; each 8-wide load of a
// weight row feeds one FMA per row of x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int kBlock = 4;  // weight rows per block

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// y[m, j] = x[m, :] . w[j, :] for MB rows of x and nb (<= kBlock) rows of w; prefetches rows
// first, first + stride, ... (< next_nb) of `next`, the next block.
template <int MB>
void block(const float* x, const float* w, int64_t K, float* y, int64_t N, int nb,
           const float* next, int next_nb, int first, int stride) {
  __m256 acc[MB][kBlock];
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < kBlock; j++) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 15) == 0)  // one 64-byte line per row every other step
      for (int j = first; j < next_nb; j += stride) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + k), _MM_HINT_T0);
    __m256 wv[kBlock];
    for (int j = 0; j < kBlock; j++) wv[j] = _mm256_loadu_ps(w + (j < nb ? j : 0) * K + k);
    for (int m = 0; m < MB; m++) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int j = 0; j < kBlock; j++) acc[m][j] = _mm256_fmadd_ps(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < nb; j++) {
      float s = hsum(acc[m][j]);
      for (int64_t t = k; t < K; t++) s += x[m * K + t] * w[j * K + t];
      y[m * N + j] = s;
    }
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "dynexec::skinny_linear takes fp32 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "dynexec::skinny_linear: the weight must be a contiguous [out, in] matrix");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.size(-1) == K, "dynexec::skinny_linear: x has ", x.size(-1), " features, the weight ", K);
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N, "dynexec::skinny_linear: the bias must be fp32 with ", N, " entries");
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  const float* xp = rows.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; blk++) {
      const int64_t n = blk * kBlock;
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, N - n));
      const float* w = wp + n * K;
      const float* next = w + kBlock * K;
      const int next_nb = blk + 1 < b1 ? static_cast<int>(std::min<int64_t>(kBlock, N - n - kBlock)) : 0;  // b1: this thread's end
      const int groups = static_cast<int>((M + 2) / 3);
      int64_t m = 0;
      int g = 0;
      for (; m + 3 <= M; m += 3, g++) block<3>(xp + m * K, w, K, yp + m * N + n, N, nb, next, next_nb, g, groups);
      if (M - m == 2) block<2>(xp + m * K, w, K, yp + m * N + n, N, nb, next, next_nb, g, groups);
      if (M - m == 1) block<1>(xp + m * K, w, K, yp + m * N + n, N, nb, next, next_nb, g, groups);
      if (b != nullptr)
        for (int64_t r = 0; r < M; r++)
          for (int j = 0; j < nb; j++) yp[r * N + n + j] += b[n + j];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dynexec, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
