// Condensed constant fan-in linear layer on CPU: y[b, o] = sum_j values[o, j] * x[b, idx[o, j]] + bias[o].
//
// Built and loaded by sparsec/runtime/condensed_cpu.py, which documents the API, builds the weight
// layouts and picks the operator; registered as torch.ops.sparsec_condensed.* (~2 us per call with the output allocation).
// Timings below: 3072->768 at 90 % sparsity (k = 307) on the 2-core AMD EPYC (Zen 5) dev machine.
//
// linear_seg: "seg" layout, AVX-512 only, for small batches. Output rows in blocks of 16, one zmm lane
//   per row; columns cut into segments of 32. For block blk and segment s the 16 rows' kept weights in
//   the segment are stacked into counts[blk][s] steps (the fullest row's count; the others are padded).
//   A step is 16 float32 weights and 16 uint8 column offsets within the segment (bit 7 = padding).
//   With x[32s .. 32s+32) held in two registers a step is one vpermt2ps table lookup and one FMA:
//   ~2 cycles for 16 multiply-adds, where one 16-lane vgatherdps alone took 13-20 cycles in a
//   micro-benchmark here. Padding doubles the steps at 90 % sparsity (1.65x at 80 %, 2.5x at 95 %).
//
// linear_rows: row-major values [out, k] and indices [out, k] (uint16 when K <= 65536, else int32).
//   Batches from kTransposeFromBatch on (with AVX2 or AVX-512; Python sends AVX-512 batches here once
//   seg's padded work costs more): x is transposed once to xT[K][Bp], so each kept weight is one
//   broadcast times contiguous runs of batch columns - no gathers, no padding. Smaller batches, and
//   every batch without AVX2: scalar loads, which beat AVX2 gathers on Zen 5 (batch 1: 38 vs 48 us).
//
// Kernels carry target attributes and are picked at run time (__builtin_cpu_supports), so the library
// is built without -march=native and runs on any x86-64 (only the scalar kernels elsewhere).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define SPARSEC_X86 1
#endif

namespace {

constexpr int64_t kLanes = 16;              // seg: output rows per block (one zmm of float32)
constexpr int64_t kSegment = 32;            // seg: columns per vpermt2ps table (two zmm)
constexpr int64_t kTransposeFromBatch = 4;  // rows: scalar below, transposed x from here (measured)

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if SPARSEC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

const Isa kBestIsa = detect_isa();
Isa g_isa = kBestIsa;  // lowered by set_isa() so tests can run every path on one machine

// Splits [0, n) over torch's intra-op threads. A second thread pays from ~32k multiply-adds each
// (batch 1: 2 threads run the layer in 18 us instead of 30 us), so the grain stays small.
template <typename F>
void parallel_chunks(int64_t n, int64_t macs_per_item, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, macs_per_item));
  at::parallel_for(0, n, grain, f);
}

// Shared argument checks; returns the output [..., out] and sets B (rows of x) and x2 (contiguous x).
at::Tensor start(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t out, at::Tensor& x2,
                 int64_t& B, const float*& bias_ptr, at::Tensor& bias_keep) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1, "x must be a float32 CPU tensor");
  x2 = x.is_contiguous() ? x : x.contiguous();
  B = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) B *= x.size(d);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == out, "bias must be float32 [out]");
    bias_keep = bias->contiguous();
    bias_ptr = bias_keep.data_ptr<float>();
  }
  return at::empty(shape, x.options());
}

// =========================================================================================== seg layout
#if SPARSEC_X86
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

struct SegArgs {
  const float* x;         // [B][K]
  const float* vals;      // [steps][16]
  const uint8_t* idx;     // [steps][16]
  const uint8_t* counts;  // [nblk][nseg]
  const int64_t* starts;  // [nblk + 1] first step of each block
  const float* bias;      // [out] or nullptr
  float* y;               // [B][out]
  int64_t B, K, nseg, out;
};

// NB batch rows share every step's weight and index loads; R rotating accumulators per batch row keep
// R*NB >= 4 FMA chains in flight (FMA latency 4 cycles).
template <int NB, int R>
AVX512_TARGET void seg_block(const SegArgs& a, int64_t blk, int64_t b0) {
  const uint8_t* counts = a.counts + blk * a.nseg;
  const float* w = a.vals + a.starts[blk] * kLanes;
  const uint8_t* ix = a.idx + a.starts[blk] * kLanes;
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NB; ++n) acc[r][n] = _mm512_setzero_ps();
  for (int64_t s = 0; s < a.nseg; ++s) {
    int steps = counts[s];
    if (steps == 0) continue;
    // The last segment may run past K: masked loads neither fault nor read beyond the row.
    const int64_t c0 = s * kSegment, left = a.K - c0;
    const __mmask16 mlo = left >= 16 ? 0xFFFF : __mmask16((1u << left) - 1);
    const __mmask16 mhi = left >= 32 ? 0xFFFF : left <= 16 ? 0 : __mmask16((1u << (left - 16)) - 1);
    __m512 lo[NB], hi[NB];
    for (int n = 0; n < NB; ++n) {
      const float* xr = a.x + (b0 + n) * a.K + c0;
      lo[n] = _mm512_maskz_loadu_ps(mlo, xr);
      hi[n] = _mm512_maskz_loadu_ps(mhi, xr + 16);
    }
    for (; steps > 0; --steps, w += kLanes, ix += kLanes) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ix));
      // Padding lanes look up 0 instead of x, so an inf / nan in x reaches only rows that keep it.
      const __mmask16 real = static_cast<__mmask16>(~_mm_movepi8_mask(bytes));
      const __m512i iv = _mm512_cvtepu8_epi32(bytes);
      const __m512 wv = _mm512_loadu_ps(w);
      for (int n = 0; n < NB; ++n) {
        const __m512 t = _mm512_fmadd_ps(wv, _mm512_maskz_permutex2var_ps(real, lo[n], iv, hi[n]), acc[0][n]);
        for (int r = 0; r + 1 < R; ++r) acc[r][n] = acc[r + 1][n];
        acc[R - 1][n] = t;
      }
    }
  }
  const int64_t o0 = blk * kLanes;
  const __mmask16 mout = a.out - o0 >= kLanes ? 0xFFFF : __mmask16((1u << (a.out - o0)) - 1);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(mout, a.bias + o0) : _mm512_setzero_ps();
  for (int n = 0; n < NB; ++n) {
    __m512 sum = bias;
    for (int r = 0; r < R; ++r) sum = _mm512_add_ps(sum, acc[r][n]);
    _mm512_mask_storeu_ps(a.y + (b0 + n) * a.out + o0, mout, sum);
  }
}

AVX512_TARGET void seg_blocks(const SegArgs& a, int64_t blk_begin, int64_t blk_end) {
  for (int64_t blk = blk_begin; blk < blk_end; ++blk)
    for (int64_t b = 0; b < a.B; b += 8) switch (std::min<int64_t>(8, a.B - b)) {
        case 8: seg_block<8, 1>(a, blk, b); break;
        case 7: seg_block<7, 1>(a, blk, b); break;
        case 6: seg_block<6, 1>(a, blk, b); break;
        case 5: seg_block<5, 1>(a, blk, b); break;
        case 4: seg_block<4, 2>(a, blk, b); break;
        case 3: seg_block<3, 2>(a, blk, b); break;
        case 2: seg_block<2, 2>(a, blk, b); break;
        default: seg_block<1, 4>(a, blk, b);
      }
}
#endif  // SPARSEC_X86

// x [..., K] float32; vals [steps, 16] float32; idx [steps, 16] uint8; counts [nblk, nseg] uint8;
// starts [nblk + 1] int64; bias [out] float32 or None. Returns [..., out].
at::Tensor linear_seg(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& counts,
                      const at::Tensor& starts, const std::optional<at::Tensor>& bias, int64_t out) {
  TORCH_CHECK(kBestIsa == kAvx512, "the seg layout needs AVX-512");
  TORCH_CHECK(vals.scalar_type() == at::kFloat && idx.scalar_type() == at::kByte && counts.scalar_type() == at::kByte &&
              starts.scalar_type() == at::kLong, "bad seg layout dtypes");
  TORCH_CHECK(vals.is_contiguous() && idx.is_contiguous() && counts.is_contiguous() && starts.is_contiguous(),
              "layout must be contiguous");
  TORCH_CHECK(counts.dim() == 2 && starts.numel() == counts.size(0) + 1 && counts.size(0) == (out + kLanes - 1) / kLanes &&
              vals.dim() == 2 && vals.size(1) == kLanes && idx.sizes() == vals.sizes() &&
              starts.data_ptr<int64_t>()[counts.size(0)] == vals.size(0), "bad seg layout");
  at::Tensor x2, bias_keep;
  int64_t B;
  const float* bias_ptr;
  at::Tensor y = start(x, bias, out, x2, B, bias_ptr, bias_keep);
  const int64_t K = x.size(-1), nblk = counts.size(0), nseg = counts.size(1);
  TORCH_CHECK((nseg - 1) * kSegment < std::max<int64_t>(K, 1), "the seg layout reaches past x's features");
  if (B == 0 || out == 0) return y;
#if SPARSEC_X86
  const SegArgs a{x2.data_ptr<float>(), vals.data_ptr<float>(), idx.data_ptr<uint8_t>(), counts.data_ptr<uint8_t>(),
                  starts.data_ptr<int64_t>(), bias_ptr, y.data_ptr<float>(), B, K, nseg, out};
  parallel_chunks(nblk, B * vals.size(0) * kLanes / nblk, [&](int64_t b, int64_t e) { seg_blocks(a, b, e); });
#endif
  return y;
}

// =========================================================================================== rows layout

template <typename Idx>
struct RowArgs {
  const float* x;     // scalar: x[B][K]; transposed: xT[K][Bp]
  const float* vals;  // [out][k]
  const Idx* idx;     // [out][k]
  const float* bias;  // [out] or nullptr
  float* y;           // [B][out]
  int64_t B, K, Bp, k, out;
  float bias_at(int64_t o) const { return bias ? bias[o] : 0.f; }
};

// Four partial sums: a single float chain would wait 4 cycles per multiply-add.
template <typename Idx>
void gather_scalar(const RowArgs<Idx>& a, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const float* v = a.vals + o * a.k;
    const Idx* ix = a.idx + o * a.k;
    for (int64_t b = 0; b < a.B; ++b) {
      const float* xb = a.x + b * a.K;
      float s[4] = {};
      int64_t j = 0;
      for (; j + 4 <= a.k; j += 4)
        for (int u = 0; u < 4; ++u) s[u] += v[j + u] * xb[ix[j + u]];
      for (; j < a.k; ++j) s[0] += v[j] * xb[ix[j]];
      a.y[b * a.out + o] = (s[0] + s[1]) + (s[2] + s[3]) + a.bias_at(o);
    }
  }
}

#if SPARSEC_X86
#define AVX2_TARGET __attribute__((target("avx2,fma")))

// RR rows x C vectors of 8 batch columns: per kept weight, one index load and one broadcast feed C
// FMAs with contiguous loads (RR*C = 8 accumulators; AVX2 has 16 registers).
template <typename Idx, int RR, int C>
AVX2_TARGET void transposed_tile_avx2(const RowArgs<Idx>& a, int64_t o0, int64_t b0) {
  __m256 acc[RR][C];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t j = 0; j < a.k; ++j)
    for (int r = 0; r < RR; ++r) {
      const __m256 w = _mm256_broadcast_ss(a.vals + (o0 + r) * a.k + j);
      const float* xr = a.x + int64_t(a.idx[(o0 + r) * a.k + j]) * a.Bp + b0;
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * c), acc[r][c]);
    }
  alignas(32) float col[8 * C];
  for (int r = 0; r < RR; ++r) {
    for (int c = 0; c < C; ++c) _mm256_store_ps(col + 8 * c, acc[r][c]);
    for (int64_t n = 0; n < 8 * C && b0 + n < a.B; ++n) a.y[(b0 + n) * a.out + o0 + r] = col[n] + a.bias_at(o0 + r);
  }
}

template <typename Idx>
AVX2_TARGET void transposed_avx2(const RowArgs<Idx>& a, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end;) {
    const bool four = o + 4 <= o_end;
    for (int64_t b0 = 0; b0 < a.Bp; b0 += 16)  // Bp is a multiple of 16
      four ? transposed_tile_avx2<Idx, 4, 2>(a, o, b0) : transposed_tile_avx2<Idx, 1, 2>(a, o, b0);
    o += four ? 4 : 1;
  }
}

// As transposed_tile_avx2 with zmm: C vectors of 16 batch columns, 4*C <= 16 accumulators.
template <typename Idx, int RR, int C>
AVX512_TARGET void transposed_tile_avx512(const RowArgs<Idx>& a, int64_t o0, int64_t b0) {
  __m512 acc[RR][C];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < a.k; ++j)
    for (int r = 0; r < RR; ++r) {
      const __m512 w = _mm512_set1_ps(a.vals[(o0 + r) * a.k + j]);
      const float* xr = a.x + int64_t(a.idx[(o0 + r) * a.k + j]) * a.Bp + b0;
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * c), acc[r][c]);
    }
  alignas(64) float col[16 * C];
  for (int r = 0; r < RR; ++r) {
    for (int c = 0; c < C; ++c) _mm512_store_ps(col + 16 * c, acc[r][c]);
    for (int64_t n = 0; n < 16 * C && b0 + n < a.B; ++n) a.y[(b0 + n) * a.out + o0 + r] = col[n] + a.bias_at(o0 + r);
  }
}

template <typename Idx, int RR>
AVX512_TARGET void transposed_rows_avx512(const RowArgs<Idx>& a, int64_t o0) {
  for (int64_t b0 = 0; b0 < a.Bp; b0 += 64) switch (std::min<int64_t>(4, (a.Bp - b0) / 16)) {
      case 4: transposed_tile_avx512<Idx, RR, 4>(a, o0, b0); break;
      case 3: transposed_tile_avx512<Idx, RR, 3>(a, o0, b0); break;
      case 2: transposed_tile_avx512<Idx, RR, 2>(a, o0, b0); break;
      default: transposed_tile_avx512<Idx, RR, 1>(a, o0, b0);
    }
}

template <typename Idx>
AVX512_TARGET void transposed_avx512(const RowArgs<Idx>& a, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + 4 <= o_end; o += 4) transposed_rows_avx512<Idx, 4>(a, o);
  for (; o < o_end; ++o) transposed_rows_avx512<Idx, 1>(a, o);
}

// dst[c][b] = src[b][c] for an 8x8 tile (rows past `rows` read as 0): three shuffle stages.
AVX2_TARGET void transpose8x8(const float* src, int64_t ld_src, int64_t rows, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(src + i * ld_src) : _mm256_setzero_ps();
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// xT[K][Bp] from x[B][K], batch columns B..Bp zero. 8x8 register tiles: a strided scalar copy cost
// 200 us at batch 64 (3072 features), more than the product itself.
at::Tensor transpose_padded(const float* x, int64_t B, int64_t K, int64_t Bp, const at::TensorOptions& opts) {
  at::Tensor xt = at::empty({K, Bp}, opts);
  float* dst = xt.data_ptr<float>();
  at::parallel_for(0, (K + 7) / 8, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = 8 * t;
      for (int64_t b0 = 0; b0 < Bp; b0 += 8) {
        if (c0 + 8 <= K) {
          transpose8x8(x + b0 * K + c0, K, B - b0, dst + c0 * Bp + b0, Bp);
        } else {
          for (int64_t c = c0; c < K; ++c)
            for (int64_t b = b0; b < b0 + 8; ++b) dst[c * Bp + b] = b < B ? x[b * K + c] : 0.f;
        }
      }
    }
  });
  return xt;
}
#endif  // SPARSEC_X86

template <typename Idx>
void run_rows(RowArgs<Idx> a, const at::Tensor& x2) {
  void (*kernel)(const RowArgs<Idx>&, int64_t, int64_t) = gather_scalar<Idx>;
  at::Tensor xt;
#if SPARSEC_X86
  // Scalar loads beat AVX2 gathers on Zen 5 (batch 1: 38 vs 48 us), and without SIMD the transposed
  // loop does not pay, so only AVX2 / AVX-512 switch to it.
  if (g_isa >= kAvx2 && a.B >= kTransposeFromBatch) {
    a.Bp = (a.B + 15) / 16 * 16;
    xt = transpose_padded(a.x, a.B, a.K, a.Bp, x2.options());
    a.x = xt.data_ptr<float>();
    kernel = g_isa == kAvx512 ? transposed_avx512<Idx> : transposed_avx2<Idx>;
  }
#endif
  parallel_chunks(a.out, a.B * a.k, [&](int64_t b, int64_t e) { kernel(a, b, e); });
}

// x [..., K] float32; vals [out, k] float32; idx [out, k] int16 (read as uint16) or int32;
// bias [out] float32 or None. Returns [..., out]. Python has checked that the indices fit x.
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx,
                       const std::optional<at::Tensor>& bias, int64_t out) {
  TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.dim() == 2 && vals.size(0) == out && vals.sizes() == idx.sizes(),
              "bad rows layout");
  TORCH_CHECK(vals.is_contiguous() && idx.is_contiguous(), "layout must be contiguous");
  at::Tensor x2, bias_keep;
  int64_t B;
  const float* bias_ptr;
  at::Tensor y = start(x, bias, out, x2, B, bias_ptr, bias_keep);
  if (B == 0 || out == 0) return y;
  const int64_t K = x.size(-1), k = vals.size(1);
  if (idx.scalar_type() == at::kShort) {
    run_rows(RowArgs<uint16_t>{x2.data_ptr<float>(), vals.data_ptr<float>(),
                               reinterpret_cast<const uint16_t*>(idx.data_ptr<int16_t>()), bias_ptr, y.data_ptr<float>(),
                               B, K, 0, k, out}, x2);
  } else {
    TORCH_CHECK(idx.scalar_type() == at::kInt, "indices must be int16 or int32");
    run_rows(RowArgs<int32_t>{x2.data_ptr<float>(), vals.data_ptr<float>(), idx.data_ptr<int32_t>(), bias_ptr,
                              y.data_ptr<float>(), B, K, 0, k, out}, x2);
  }
  return y;
}

// =========================================================================================== ISA choice

std::string isa_name(Isa isa) { return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "scalar"; }

std::string isa() { return isa_name(g_isa); }

// Uses a kernel family no better than the CPU has ("best" = the CPU's); returns the one in use.
std::string set_isa(const std::string& name) {
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "scalar" || name == "best", "unknown isa ", name);
  const Isa want = name == "best" || name == "avx512" ? kAvx512 : name == "avx2" ? kAvx2 : kScalar;
  g_isa = std::min(want, kBestIsa);
  return isa();
}

}  // namespace

// The kernels are registered for the CPU dispatch key (not as catch-all composites), so that Python
// can give them shape-only Meta versions (condensed_cpu._register_fakes) for torch.compile / export.
TORCH_LIBRARY(sparsec_condensed, m) {
  m.def("linear_seg(Tensor x, Tensor vals, Tensor idx, Tensor counts, Tensor starts, Tensor? bias, int out) -> Tensor");
  m.def("linear_rows(Tensor x, Tensor vals, Tensor idx, Tensor? bias, int out) -> Tensor");
  m.def("isa() -> str", &isa);
  m.def("set_isa(str name) -> str", &set_isa);
}

TORCH_LIBRARY_IMPL(sparsec_condensed, CPU, m) {
  m.impl("linear_seg", &linear_seg);
  m.impl("linear_rows", &linear_rows);
}
