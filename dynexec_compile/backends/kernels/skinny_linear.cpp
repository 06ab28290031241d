// dynexec::skinny_linear(x, weight, bias): F.linear for a few rows of x (a decoding step's
// tokens), AVX2 + FMA: fp32, bf16, or an int8 weight-only quantized weight. Built and loaded
// by skinny.py; the reasons and measurements are in its docstring.
//
// The weight ([N, K], row-major) is streamed from memory exactly once: for each block of 4
// weight rows, every group of up to 3 rows of x is multiplied while the block sits in L1, and
// the next block is prefetched meanwhile, its rows spread over the groups so that memory stays
// busy while the later groups compute (prefetching it all during the first group measured
// 25% slower at 4-5 rows). 12 accumulators (3 x 4) stay in registers; each 8-wide load of a
// weight row feeds one FMA per row of x. The 3 rows of x are loaded first and the weight rows
// one at a time, so accumulators, x and one weight vector fill the 16 AVX2 registers exactly:
// loading the 4 weight vectors first needs 17, and the accumulator the compiler then kept on
// the stack made every iteration wait on memory (1.3-1.6x slower at 4-16 rows, session 13).
//
// bf16 and int8 weights stay narrow in memory (a half and a quarter of the bytes to stream)
// and are widened to fp32 in registers; with more than one group of rows a bf16 block is
// widened once into an fp32 buffer that every group reads. x is widened once per call; sums and the
// bias are fp32, and a bf16 output is rounded once (to nearest even), as PyTorch's own bf16
// linear on the CPU accumulates in fp32 and rounds the result. An int8 weight is multiplied
// as its integer values (x @ weight.to(x.dtype).T): the per-row scales of weight-only
// quantization are the caller's, as in torchao's linear, which scales the product after.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

namespace {

constexpr int kBlock = 4;  // weight rows per block

// The four sums of a[0..3]'s lanes, in that order.
inline __m128 hsum4(const __m256 a[4]) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // 8 bf16 -> 8 fp32: the bits, shifted to the top half
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline __m256 load8(const int8_t* p) {  // 8 int8 -> 8 fp32, exactly
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Where a block prefetches the next block from: rows first, first + stride, ... (< rows) of
// `next`, one 64-byte line of each per line of the next block's rows that k has passed.
struct Prefetch {
  const char* next;
  int64_t row_bytes;
  int elem_bytes, first, stride, rows;
};

// y[m][j] = x[m, :] . w[j, :] for MB rows of x (fp32) and nb (<= kBlock) rows of w.
template <int MB, typename W>
void block(const float* x, const W* w, int64_t K, float y[][kBlock], int nb, const Prefetch& p) {
  __m256 acc[MB][kBlock];
  for (int m = 0; m < MB; m++)
    for (int j = 0; j < kBlock; j++) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if (k * p.elem_bytes % 64 == 0)
      for (int j = p.first; j < p.rows; j += p.stride) _mm_prefetch(p.next + j * p.row_bytes + k * p.elem_bytes, _MM_HINT_T0);
    __m256 xv[MB];
    for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int j = 0; j < kBlock; j++) {
      const __m256 wv = load8(w + (j < nb ? j : 0) * K + k);
      for (int m = 0; m < MB; m++) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  for (int m = 0; m < MB; m++) {
    float s[kBlock];
    _mm_storeu_ps(s, hsum4(acc[m]));
    for (int j = 0; j < nb; j++) {
      for (int64_t t = k; t < K; t++) s[j] += x[m * K + t] * static_cast<float>(w[j * K + t]);
      y[m][j] = s[j];
    }
  }
}

// All groups of up to 3 rows of x against one block of weight rows w.
template <typename W>
void groups(const float* x, const W* w, int64_t M, int64_t K, float y[][kBlock], int nb, Prefetch p) {
  p.stride = static_cast<int>((M + 2) / 3);
  for (int64_t m = 0; m < M; m += 3, p.first++) {
    const int rows = static_cast<int>(std::min<int64_t>(3, M - m));
    if (rows == 3) block<3>(x + m * K, w, K, y + m, nb, p);
    if (rows == 2) block<2>(x + m * K, w, K, y + m, nb, p);
    if (rows == 1) block<1>(x + m * K, w, K, y + m, nb, p);
  }
}

// y = x w^T (+ b): weights W (fp32, bf16, int8), outputs and bias T (fp32, bf16), x widened to fp32.
template <typename W, typename T>
void skinny(const float* xp, const W* wp, const T* b, T* yp, int64_t M, int64_t K, int64_t N) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    // bf16 weights with more than one group of rows: each block is widened once into this buffer,
    // so that every group multiplies fp32 rows instead of widening the block again. int8 blocks
    // are widened by each group: the buffer measured 1.2-1.4x slower for them at 4-8 rows.
    std::vector<float> wide(std::is_same_v<W, c10::BFloat16> && M > 3 ? kBlock * K : 0);
    std::vector<float> y(M * kBlock);
    for (int64_t blk = b0; blk < b1; blk++) {
      const int64_t n = blk * kBlock;
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, N - n));
      const W* w = wp + n * K;
      const int next_nb = blk + 1 < b1 ? static_cast<int>(std::min<int64_t>(kBlock, N - n - kBlock)) : 0;  // b1: this thread's end
      const Prefetch p{reinterpret_cast<const char*>(w + kBlock * K), K * static_cast<int64_t>(sizeof(W)),
                       static_cast<int>(sizeof(W)), 0, 1, next_nb};
      auto out = reinterpret_cast<float(*)[kBlock]>(y.data());
      if (wide.empty()) {
        groups(xp, w, M, K, out, nb, p);
      } else {
        for (int j = 0; j < nb; j++) {
          int64_t k = 0;
          for (; k + 8 <= K; k += 8) _mm256_storeu_ps(wide.data() + j * K + k, load8(w + j * K + k));
          for (; k < K; k++) wide[j * K + k] = static_cast<float>(w[j * K + k]);
        }
        groups(xp, static_cast<const float*>(wide.data()), M, K, out, nb, p);
      }
      for (int64_t r = 0; r < M; r++)
        for (int j = 0; j < nb; j++)
          yp[r * N + n + j] = static_cast<T>(b == nullptr ? out[r][j] : out[r][j] + static_cast<float>(b[n + j]));
    }
  });
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const auto wtype = weight.scalar_type(), dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && (wtype == dtype || wtype == at::kChar),
              "dynexec::skinny_linear takes fp32 or bf16 x with a weight of x's dtype or int8 (x @ weight.to(x.dtype).T, "
              "unscaled), got ", dtype, " and ", wtype);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "dynexec::skinny_linear: the weight must be a contiguous [out, in] matrix");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.size(-1) == K, "dynexec::skinny_linear: x has ", x.size(-1), " features, the weight ", K);
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == N, "dynexec::skinny_linear: the bias must be ", dtype,
                " with ", N, " entries");
    bias_c = bias->contiguous();
  }
  const at::Tensor rows = x.reshape({-1, K}).to(at::kFloat).contiguous();  // bf16: widened once, [M, K]
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  const float* xp = rows.data_ptr<float>();
  const int64_t M = rows.size(0);
  auto run = [&](auto* w, auto* y) {
    using T = std::remove_pointer_t<decltype(y)>;
    skinny(xp, w, bias_c.defined() ? bias_c.data_ptr<T>() : static_cast<T*>(nullptr), y, M, K, N);
  };
  using B = c10::BFloat16;
  if (wtype == at::kChar && dtype == at::kFloat) run(weight.data_ptr<int8_t>(), out.data_ptr<float>());
  else if (wtype == at::kChar) run(weight.data_ptr<int8_t>(), out.data_ptr<B>());
  else if (dtype == at::kFloat) run(weight.data_ptr<float>(), out.data_ptr<float>());
  else run(weight.data_ptr<B>(), out.data_ptr<B>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dynexec, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(dynexec, CPU, m) {
  m.impl("skinny_linear", &skinny_linear);
}
