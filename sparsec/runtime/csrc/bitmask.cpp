// Bitmask-compressed linear layer on CPU: y[b, o] = scale[o] * sum_c W[o, c] x[b, c] + bias[o].
//
// Built and loaded by sparsec/runtime/bitmask_cpu.py, which documents the API and builds the masks;
// registered as torch.ops.sparsec_bitmask.*. The weight is stored as
//   vals  [out, nnz]        each row's kept values in column order: float32, bfloat16 or float16, or
//                           int8 with scales [out];
//   masks [out, ceil(K/16)] uint16 words (int16 tensors), bit j of word w set = column 16 w + j kept.
// Every row keeps nnz values (an N:M pattern keeps K*N/M), so rows start at o * nnz. This is the N:M
// layer's own storage plus one bit per weight: 2.1 bytes per weight at 2:4 float32, 0.6 with int8.
//
// AVX-512: one 16-column word is one vexpandps (the kept values land in the lanes of their columns,
// zeros elsewhere; for 2:4, two fixed permutes, see `place`) and one FMA per batch row against x's
// 16 columns, so a 2:4 row costs the loads of half its weights. The zeros multiply x like a dense layer's pruned weights do: an inf / nan in x
// reaches every row, as in the torch runtime's F.linear. Batch rows go in tiles of NB sharing each
// expanded word; output rows in blocks of kRowBlock, whose weights stay in cache across the tiles.
// 16-bit layers (bfloat16 / float16 values and x) compute in float32 like torch's CPU GEMMs do: x
// converted once per call, each word's values as they are placed, y rounded once at the end; they read
// 1.1 bytes per weight at 2:4 (1.8x fewer than the dense 16-bit weight).
// Other CPUs: a scalar loop over the set bits (kept weights only; a row gives nan where x is not
// finite in a column it does not keep, as the zeros there would). `densify` writes the dense weight
// (a memory-speed pass, ~20x faster than torch's scatter from nibble metadata) for batches large
// enough that a dense GEMM's blocking beats the kernel.
//
// Kernels carry target attributes and are picked at run time (__builtin_cpu_supports), so the library
// is built without -march=native and runs on any x86-64 (only the scalar kernel elsewhere).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SPARSEC_X86 1
#endif

namespace {

// What every mask word is known to hold (Python checks; the kernels are templated on it):
constexpr int kAny = 0;        // any number of kept columns
constexpr int kEight = 8;      // exactly 8 (2:4, 4:8 with K a multiple of 16)
constexpr int kTwoOfFour = 24; // exactly 2 in each group of 4 columns (2:4 with K a multiple of 16)

constexpr int64_t kRowBlock = 16;    // output rows whose weights are reused across the batch tiles
constexpr int64_t kChunkWords = 32;  // 512 columns: a batch tile's x chunk stays in L1 across the row block

bool detect_avx512() {
#if SPARSEC_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const bool kHasAvx512 = detect_avx512();
bool g_avx512 = kHasAvx512;  // cleared by set_isa("scalar") so tests can run both kernels on one machine

struct Args {
  const float* x;         // [B][K]
  const void* vals;       // [out][nnz] float32, int8, bfloat16 or float16
  const uint16_t* masks;  // [out][W]
  const float* scales;    // [out] or nullptr
  const float* bias;      // [out] or nullptr
  float* y;               // [B][out]
  int64_t B, K, W, nnz, out;
  int64_t form;           // kAny, kEight or kTwoOfFour (checked in Python)
};

inline float finish(const Args& a, int64_t o, float sum) {
  if (a.scales) sum *= a.scales[o];
  return a.bias ? sum + a.bias[o] : sum;
}

// =========================================================================================== scalar

// The loop visits kept weights only. The pruned zeros still count where x is not finite: 0 * inf and
// 0 * nan are nan in F.linear and in the AVX-512 kernel, so a row that does not keep such a column
// gives nan (it returned the kept weights' finite sum, so the result depended on the CPU).
template <typename V>
void rows_scalar(const Args& a, int64_t o0, int64_t o1) {
  std::vector<int64_t> nonfinite;  // x's non-finite columns in this batch row (almost always none)
  for (int64_t b = 0; b < a.B; ++b) {
    const float* xr = a.x + b * a.K;
    nonfinite.clear();
    for (int64_t c = 0; c < a.K; ++c)
      if (!std::isfinite(xr[c])) nonfinite.push_back(c);
    for (int64_t o = o0; o < o1; ++o) {
      const V* v = static_cast<const V*>(a.vals) + o * a.nnz;
      const uint16_t* mk = a.masks + o * a.W;
      float sum = 0.f;
      for (int64_t w = 0; w < a.W; ++w) {
        for (uint32_t m = mk[w]; m; m &= m - 1) sum += static_cast<float>(*v++) * xr[16 * w + __builtin_ctz(m)];
      }
      for (const int64_t c : nonfinite)
        if (!((mk[c / 16] >> (c % 16)) & 1u)) sum = std::numeric_limits<float>::quiet_NaN();
      a.y[b * a.out + o] = finish(a, o, sum);
    }
  }
}

template <typename V>
void densify_scalar(const Args& a, float* dense, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const V* v = static_cast<const V*>(a.vals) + o * a.nnz;
    const uint16_t* mk = a.masks + o * a.W;
    float* row = dense + o * a.K;
    const float scale = a.scales ? a.scales[o] : 1.f;
    std::fill(row, row + a.K, 0.f);
    for (int64_t w = 0; w < a.W; ++w)
      for (uint32_t m = mk[w]; m; m &= m - 1) row[16 * w + __builtin_ctz(m)] = static_cast<float>(*v++) * scale;
  }
}

// =========================================================================================== AVX-512
#if SPARSEC_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,popcnt")))

// The word's kept values in the lanes of their columns (zeros elsewhere); advances v past them.
// F = kEight / kTwoOfFour: every word keeps exactly 8 values, so the load is a fixed-size one and no
// popcount sits between a word and the next word's values.
// kAny / kEight place them with vexpandps: register form (the memory form is microcoded on Zen 4 / 5:
// 2.2 ms against 0.9 ms for a 2:4 4096 x 4096 layer at batch 1 here), which still takes ~3.5 cycles a
// word on Zen 4. kTwoOfFour places them with two fixed permutes instead: lane j of group g (columns
// 4g .. 4g + 3) takes value 2g where j is the first kept column of its group, value 2g + 1 where it is
// the second (a stand-alone loop on one core: 1.4 against 1.7 ns a word; rows_avx512 says where each
// form runs).
template <int F>
AVX512_TARGET inline __m512 place(__mmask16 m, __m512 packed) {
  if constexpr (F == kTwoOfFour) {
    const __m512i first_value = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i second_value = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
    const uint32_t bits = m;
    // a kept column with another kept column below it in its group is its group's second
    const uint32_t below = ((bits << 1) & 0xEEEE) | ((bits << 2) & 0xCCCC) | ((bits << 3) & 0x8888);
    const __m512 first = _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(bits & ~below), first_value, packed);
    return _mm512_mask_permutexvar_ps(first, static_cast<__mmask16>(bits & below), second_value, packed);
  } else {
    return _mm512_maskz_expand_ps(m, packed);
  }
}

template <int F>
AVX512_TARGET inline __m512 expand(__mmask16 m, const float*& v) {
  const unsigned n = F != kAny ? 8 : _mm_popcnt_u32(m);
  const __m512 packed = F != kAny ? _mm512_castps256_ps512(_mm256_loadu_ps(v))
                                  : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), v);
  v += n;
  return place<F>(m, packed);
}

template <int F>
AVX512_TARGET inline __m512 expand(__mmask16 m, const int8_t*& v) {
  const unsigned n = F != kAny ? 8 : _mm_popcnt_u32(m);
  // Reads the word's n bytes only (never past the row's end).
  const __m128i bytes = F != kAny ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v))
                                  : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << n) - 1), v);
  v += n;
  return place<F>(m, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
}

// 16-bit values: the word's (up to 16) values widened to float32 in order, then placed like float32's.
template <int F>
AVX512_TARGET inline __m256i load_halves(const uint16_t*& v, __mmask16 m) {
  const unsigned n = F != kAny ? 8 : _mm_popcnt_u32(m);
  // Reads the word's n values only (never past the row's end).
  const __m256i halves = F != kAny ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)))
                                   : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), v);
  v += n;
  return halves;
}

template <int F>
AVX512_TARGET inline __m512 expand(__mmask16 m, const c10::BFloat16*& v) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
  const __m256i halves = load_halves<F>(bits, m);
  v = reinterpret_cast<const c10::BFloat16*>(bits);
  // a bfloat16 is the high half of the float32 with the same value
  return place<F>(m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16)));
}

template <int F>
AVX512_TARGET inline __m512 expand(__mmask16 m, const c10::Half*& v) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(v);
  const __m256i halves = load_halves<F>(bits, m);
  v = reinterpret_cast<const c10::Half*>(bits);
  return place<F>(m, _mm512_cvtph_ps(halves));
}

// Output row o against NB batch rows (x: the first of them) over mask words [w0, w1): adds into
// acc[NB][16], advancing v past the words' values. R rotating accumulators per batch row keep
// R * NB >= 4 FMA chains in flight (FMA latency 4 cycles).
template <typename V, int F, int NB, int R>
AVX512_TARGET void chunk(const Args& a, const V*& v, const uint16_t* mk, const float* x, int64_t w0, int64_t w1,
                         float* acc_out) {
  __m512 acc[R][NB];
  for (int n = 0; n < NB; ++n) acc[0][n] = _mm512_load_ps(acc_out + 16 * n);
  for (int r = 1; r < R; ++r)
    for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_setzero_ps();
  const int64_t full = std::min(w1, a.K / 16);  // words whose 16 columns all exist
  int64_t w = w0;
  for (; w + R <= full; w += R) {
    for (int r = 0; r < R; ++r) {
      const __m512 wv = expand<F>(static_cast<__mmask16>(mk[w + r]), v);
      for (int n = 0; n < NB; ++n)
        acc[r][n] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + n * a.K + 16 * (w + r)), acc[r][n]);
    }
  }
  for (; w < w1; ++w) {  // the last words, the one past K's last multiple of 16 included
    const int64_t left = a.K - 16 * w;
    const __mmask16 valid = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __m512 wv = expand<kAny>(static_cast<__mmask16>(mk[w]), v);
    for (int n = 0; n < NB; ++n)
      acc[0][n] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(valid, x + n * a.K + 16 * w), acc[0][n]);
  }
  for (int n = 0; n < NB; ++n) {
    __m512 sum = acc[0][n];
    for (int r = 1; r < R; ++r) sum = _mm512_add_ps(sum, acc[r][n]);
    _mm512_store_ps(acc_out + 16 * n, sum);
  }
}

// Output rows [ob, oe) (at most kRowBlock) against batch rows b0 .. b0 + NB. Columns go in chunks of
// kChunkWords words, each chunk of the NB x rows (NB * 2 KB) serving every output row of the block
// from L1: without the chunks, each output row streamed its NB whole x rows from L2 (batch 16 at
// 4096 x 4096: 5.5 ms against 1.6 ms for the condensed kernel).
template <typename V, int F, int NB, int R>
AVX512_TARGET void block_tile(const Args& a, int64_t ob, int64_t oe, int64_t b0) {
  alignas(64) float acc[kRowBlock][NB][16];
  const V* v[kRowBlock];
  for (int64_t o = ob; o < oe; ++o) {
    v[o - ob] = static_cast<const V*>(a.vals) + o * a.nnz;
    for (int n = 0; n < NB; ++n) _mm512_store_ps(acc[o - ob][n], _mm512_setzero_ps());
  }
  const float* x = a.x + b0 * a.K;
  for (int64_t w0 = 0; w0 < a.W; w0 += kChunkWords) {
    const int64_t w1 = std::min(a.W, w0 + kChunkWords);
    for (int64_t o = ob; o < oe; ++o) chunk<V, F, NB, R>(a, v[o - ob], a.masks + o * a.W, x, w0, w1, acc[o - ob][0]);
  }
  for (int64_t o = ob; o < oe; ++o)
    for (int n = 0; n < NB; ++n)
      a.y[(b0 + n) * a.out + o] = finish(a, o, _mm512_reduce_add_ps(_mm512_load_ps(acc[o - ob][n])));
}

// The dense rows [o0, o1) the weight stands for (int8 scaled), for F.linear at many batch rows.
template <typename V, int F>
AVX512_TARGET void densify_avx512(const Args& a, float* dense, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const V* v = static_cast<const V*>(a.vals) + o * a.nnz;
    const uint16_t* mk = a.masks + o * a.W;
    float* row = dense + o * a.K;
    const __m512 scale = _mm512_set1_ps(a.scales ? a.scales[o] : 1.f);
    const int64_t full = a.K / 16;
    for (int64_t w = 0; w < full; ++w)
      _mm512_storeu_ps(row + 16 * w, _mm512_mul_ps(expand<F>(static_cast<__mmask16>(mk[w]), v), scale));
    if (full < a.W) {
      const __mmask16 valid = static_cast<__mmask16>((1u << (a.K - 16 * full)) - 1);
      _mm512_mask_storeu_ps(row + 16 * full, valid, _mm512_mul_ps(expand<kAny>(static_cast<__mmask16>(mk[full]), v), scale));
    }
  }
}

template <typename V, int F>
AVX512_TARGET void rows_avx512(const Args& a, int64_t o0, int64_t o1) {
  // Batch tiles of 2+ rows share each placed word among their rows, where vexpandps's one uop did as
  // well as the permutes' two or better (2:4, 4096 x 4096 at batch 16: 3.1 against 3.4 ms in one run,
  // even in another); a lone batch row pays the placing per word and per FMA, where the permutes win
  // (batch 1, 2026-11-23, this 2-core VM, medians of interleaved single calls: 4096 x 4096 float32
  // 0.85 against 0.93 ms, int8 0.73 against 0.85; 14336 x 4096 float32 3.05 against 3.23 ms).
  constexpr int shared = F == kTwoOfFour ? kEight : F;
  // One batch row: output rows one at a time, two streams (values, masks) for the prefetchers instead
  // of a block's 32 (x's K floats stay in L1 without the blocking): 14336 x 4096 float32 3.2 against
  // 4.6 ms, 4096 x 4096 0.93 against 1.17 ms; a small layer in cache (3072 x 768) lost up to 15%.
  const int64_t row_block = a.B == 1 ? 1 : kRowBlock;
  for (int64_t ob = o0; ob < o1; ob += row_block) {
    const int64_t oe = std::min(o1, ob + row_block);
    int64_t b = 0;
    for (; b + 8 <= a.B; b += 8) block_tile<V, shared, 8, 1>(a, ob, oe, b);
    for (; b + 4 <= a.B; b += 4) block_tile<V, shared, 4, 1>(a, ob, oe, b);
    for (; b + 2 <= a.B; b += 2) block_tile<V, shared, 2, 2>(a, ob, oe, b);
    for (; b < a.B; ++b) block_tile<V, F, 1, 4>(a, ob, oe, b);
  }
}
#endif

int64_t checked_form(int64_t form) {
  TORCH_CHECK(form == kAny || form == kEight || form == kTwoOfFour, "form must be ", kAny, ", ", kEight, " or ",
              kTwoOfFour, ", got ", form);
  return form;
}

// Calls f with a null pointer of the C++ type of vals' elements (float32, int8, bfloat16 or float16).
template <typename Fn>
void with_value_type(const at::Tensor& vals, Fn&& f) {
  switch (vals.scalar_type()) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kChar: return f(static_cast<int8_t*>(nullptr));
    case at::kBFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    case at::kHalf: return f(static_cast<c10::Half*>(nullptr));
    default: TORCH_CHECK(false, "vals must be float32, int8, bfloat16 or float16, got ", vals.scalar_type());
  }
}

bool is_float_input(const at::Tensor& t) {
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

// pick(std::integral_constant<int, F>) for the word form F that `form` names: the kernel instance
// templated on it.
template <typename Pick>
auto by_form(int64_t form, Pick pick) {
  return form == kTwoOfFour ? pick(std::integral_constant<int, kTwoOfFour>{})
         : form == kEight   ? pick(std::integral_constant<int, kEight>{})
                            : pick(std::integral_constant<int, kAny>{});
}

template <typename V>
void run(const Args& a) {
  void (*kernel)(const Args&, int64_t, int64_t) = rows_scalar<V>;
#if SPARSEC_X86
  if (g_avx512) kernel = by_form(a.form, [](auto form) { return &rows_avx512<V, decltype(form)::value>; });
#endif
  // A second thread pays from ~32k multiply-adds each, so the grain stays small.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.B * a.K));
  at::parallel_for(0, a.out, grain, [&](int64_t b, int64_t e) { kernel(a, b, e); });
}

// Checks vals (float32 / bfloat16 / float16, or int8 with float32 scales [out]) and masks for a
// reduction of K; returns the float32 scales to use (undefined for float values).
at::Tensor checked_weight(const at::Tensor& vals, const at::Tensor& masks, const std::optional<at::Tensor>& scales,
                          int64_t out, int64_t K) {
  TORCH_CHECK(vals.dim() == 2 && vals.size(0) == out && vals.is_contiguous(), "vals must be contiguous [out, nnz]");
  TORCH_CHECK(masks.scalar_type() == at::kShort && masks.dim() == 2 && masks.size(0) == out &&
                  masks.size(1) == (K + 15) / 16 && masks.is_contiguous(),
              "masks must be contiguous int16 [out, ceil(K / 16)] for K = ", K);
  const bool int8 = vals.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || is_float_input(vals), "vals must be float32, bfloat16, float16 or int8, got ", vals.scalar_type());
  TORCH_CHECK(int8 == (scales.has_value() && scales->defined()), "int8 vals need scales, float vals take none");
  if (!int8) return at::Tensor();
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->numel() == out, "scales must be float32 [out]");
  return scales->contiguous();
}

// x [..., K] float32, bfloat16 or float16; vals [out, nnz] float32 / bfloat16 / float16, or int8 with
// scales [out] float32; masks [out, ceil(K/16)] int16 holding popcount nnz per row (Python builds and
// checks them); bias [out] (a float dtype) or None; form: what every word of masks holds, kAny / kEight /
// kTwoOfFour (Python checks). Computes in float32; returns [..., out] in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& masks,
                  const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias, int64_t out,
                  int64_t form) {
  TORCH_CHECK(is_float_input(x) && x.device().is_cpu() && x.dim() >= 1,
              "x must be a float32, bfloat16 or float16 CPU tensor");
  const int64_t K = x.size(-1), W = (K + 15) / 16;
  const at::Tensor scales_keep = checked_weight(vals, masks, scales, out, K);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();  // no copy for a contiguous float32 x
  at::Tensor bias_keep;
  int64_t B = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) B *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options().dtype(at::kFloat));
  Args a{x32.data_ptr<float>(), vals.data_ptr(), reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>()),
         scales_keep.defined() ? scales_keep.data_ptr<float>() : nullptr, nullptr, y.data_ptr<float>(),
         B, K, W, vals.size(1), out, checked_form(form)};
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(is_float_input(*bias) && bias->numel() == out, "bias must be [out] float32, bfloat16 or float16");
    bias_keep = bias->to(at::kFloat).contiguous();
    a.bias = bias_keep.data_ptr<float>();
  }
  if (B > 0 && out > 0) with_value_type(vals, [&](auto* tag) { run<std::remove_pointer_t<decltype(tag)>>(a); });
  return y.to(x.scalar_type());
}

// The dense float32 weight [out, K] that vals / masks (/ scales) stand for.
at::Tensor densify(const at::Tensor& vals, const at::Tensor& masks, const std::optional<at::Tensor>& scales, int64_t K,
                   int64_t form) {
  const int64_t out = vals.size(0), W = (K + 15) / 16;
  const at::Tensor scales_keep = checked_weight(vals, masks, scales, out, K);
  at::Tensor dense = at::empty({out, K}, vals.options().dtype(at::kFloat));
  Args a{nullptr, vals.data_ptr(), reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>()),
         scales_keep.defined() ? scales_keep.data_ptr<float>() : nullptr, nullptr, nullptr,
         0, K, W, vals.size(1), out, checked_form(form)};
  float* d = dense.data_ptr<float>();
  with_value_type(vals, [&](auto* tag) {
    using V = std::remove_pointer_t<decltype(tag)>;
    void (*kernel)(const Args&, float*, int64_t, int64_t) = densify_scalar<V>;
#if SPARSEC_X86
    if (g_avx512) kernel = by_form(a.form, [](auto form) { return &densify_avx512<V, decltype(form)::value>; });
#endif
    at::parallel_for(0, out, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)),
                     [&](int64_t b, int64_t e) { kernel(a, d, b, e); });
  });
  return dense;
}

std::string isa() { return g_avx512 ? "avx512" : "scalar"; }

// Uses a kernel no better than the CPU has ("best" = the CPU's); returns the one in use.
std::string set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx512" || name == "scalar" || name == "best", "unknown isa ", name,
              " (accepted: avx512, scalar, best)");
  g_avx512 = name != "scalar" && kHasAvx512;
  return isa();
}

}  // namespace

// Registered for the CPU dispatch key, so that Python can give it a shape-only version for
// torch.compile / torch.export (bitmask_cpu._register_fake).
TORCH_LIBRARY(sparsec_bitmask, m) {
  m.def("linear(Tensor x, Tensor vals, Tensor masks, Tensor? scales, Tensor? bias, int out, int form) -> Tensor");
  m.def("densify(Tensor vals, Tensor masks, Tensor? scales, int K, int form) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(sparsec_bitmask, CPU, m) {
  m.impl("linear", &linear);
  m.impl("densify", &densify);
}
