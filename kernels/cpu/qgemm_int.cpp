// Quantized matmuls with 16-bit integer activations and integer dot products, in the spirit of
// llama.cpp's (which rounds x to 8 bits): each row of x is rounded to int16 per block of 32 (scale =
// max|x| / 32767, round half to even), and a weight group's products are summed exactly in int32 by
// `vpdpwssd` (AVX512-VNNI; `vpmaddwd` + add without it); the group's sum is then scaled by weight scale
// * x scale in fp32 (plus weight offset * x scale * the block's code sum for Q4_1 / Q4_K). Weights are
// read in the layouts of qgemm.cpp (kernels/cpu/quant.py), their codes used exactly.
// Why 16 bits: rounding x to 8 bits moved SmolLM2's top-1 token at 4% of 2,000 positions; 16 bits
// keep x within 2^-16 of its block's largest value (tests/test_smollm2.py bounds the effect), and the
// kernels stay bound by memory, not by the wider arithmetic.
//
// Built where the compiler targets AVX512BW (the build is -march=native); elsewhere `has_int_dot()` is
// false and kernels/cpu/select.py keeps the fp32 kernels of qgemm.cpp.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINERVA_INT_DOT 1
#endif

namespace {

#ifdef MINERVA_INT_DOT

constexpr int kTile = 4;  // rows of x per pass over a weight row
// Bytes of codes requested ahead of the one being read (software prefetch): one core's hardware
// prefetchers alone stream ~9.6 GB/s of weights from DRAM here, ~15 GB/s with this (2048 and 4096
// measured alike, 512 and 1024 less); the scales and offsets are requested ahead alike.
constexpr int64_t kPrefetch = 2048;

// acc + the pairwise products of 16-bit a and b, summed per 32-bit lane.
inline __m512i dot16(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

// One row of x rounded for a weight layout. A "chunk" is 64 bytes of weight codes: q4, 4 groups of 32
// (xq holds each chunk's 4 x 16 low-nibble values, then its 4 x 16 high-nibble ones: 128 values); q8,
// 64 values in order. `lane_scale` has 32 floats per chunk: the x scale of the block each int32 lane
// of the chunk's two dot products sums over. `group_sum` is x scale * code sum per weight group
// (the offset term's factor).
struct XQ {
  const int16_t* q; const float* lane_scale; const float* group_sum;
};

// Scratch for M rows: codes [M, chunks * chunk_values], lane scales [M, chunks * 32], group sums [M, groups].
struct XQBuffer {
  at::Tensor codes, lane_scales, group_sums;
  int64_t chunks, groups, chunk_values;
  XQBuffer(int64_t M, int64_t chunks_, int64_t groups_, int64_t chunk_values_, const at::Tensor& x)
      : codes(at::zeros({M, chunks_ * chunk_values_}, x.options().dtype(at::kShort))),
        lane_scales(at::zeros({M, chunks_ * 32}, x.options())), group_sums(at::empty({M, groups_}, x.options())),
        chunks(chunks_), groups(groups_), chunk_values(chunk_values_) {}
  int16_t* codes_of(int64_t m) const { return codes.data_ptr<int16_t>() + m * chunks * chunk_values; }
  float* lanes_of(int64_t m) const { return lane_scales.data_ptr<float>() + m * chunks * 32; }
  float* sums_of(int64_t m) const { return group_sums.data_ptr<float>() + m * groups; }
  XQ row(int64_t m) const { return {codes_of(m), lanes_of(m), sums_of(m)}; }
};

inline __mmask64 byte_mask(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }
inline __mmask16 float_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// x rounded to int16 per block of 32 into `q` (in order), with each block's scale.
void round_blocks(const float* x, int64_t K, int16_t* q, float* block_scale) {
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / 32767.f, inv = d != 0.f ? 1.f / d : 0.f;
    block_scale[b] = d;
    const __m512 s = _mm512_set1_ps(inv);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, s))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b + 16), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, s))));
  }
}

float code_sum(const int16_t* q, int64_t n) {
  int64_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += q[i];
  return float(s);
}

XQBuffer round_for_q4(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / 32, chunks = (groups + 3) / 4;
  XQBuffer buf(M, chunks, groups, 128, x);
  std::vector<int16_t> natural(K);
  std::vector<float> scale(groups);
  for (int64_t m = 0; m < M; ++m) {
    round_blocks(x.data_ptr<float>() + m * K, K, natural.data(), scale.data());
    int16_t* q = buf.codes_of(m);
    float* lanes = buf.lanes_of(m);
    float* sums = buf.sums_of(m);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = g / 4, slot = g % 4;
      std::copy_n(natural.data() + 32 * g, 16, q + 128 * c + 16 * slot);
      std::copy_n(natural.data() + 32 * g + 16, 16, q + 128 * c + 64 + 16 * slot);
      std::fill_n(lanes + 32 * c + 8 * slot, 8, scale[g]);  // dot a: slots 0, 1; dot b: slots 2, 3
      sums[g] = scale[g] * code_sum(natural.data() + 32 * g, 32);
    }
  }
  return buf;
}

XQBuffer round_for_q8(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / G, chunks = (K + 63) / 64;
  XQBuffer buf(M, chunks, groups, 64, x);
  std::vector<float> scale(K / 32);
  for (int64_t m = 0; m < M; ++m) {
    int16_t* q = buf.codes_of(m);
    float* lanes = buf.lanes_of(m);
    float* sums = buf.sums_of(m);
    round_blocks(x.data_ptr<float>() + m * K, K, q, scale.data());
    for (int64_t lane = 0; lane < K / 2; ++lane) lanes[lane] = scale[lane / 16];  // 16 lanes of 2 per block
    for (int64_t g = 0; g < groups; ++g) sums[g] = scale[g * G / 32] * code_sum(q + g * G, G);
  }
  return buf;
}

// sum over groups of offsets[g] * group_sum[g]: the offset part of a row's dot product.
inline float offset_term(const float* offsets, const float* group_sum, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 m = float_mask(groups - g);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, offsets + g), _mm512_maskz_loadu_ps(m, group_sum + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// acc + a chunk's two integer dot products (lanes a and b), each times its weight scales and x's lane scales.
inline __m512 add_scaled(__m512 acc, __m512i dot_a, __m512i dot_b, __m512 w_scale_a, __m512 w_scale_b,
                         const float* lanes) {
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_a), _mm512_mul_ps(w_scale_a, _mm512_load_ps(lanes)), acc);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_b), _mm512_mul_ps(w_scale_b, _mm512_load_ps(lanes + 16)), acc);
}

// Each x row's dot product with one weight row (its accumulator's lanes, plus the offset part), at out[t * out_stride].
template <int T>
inline void store_rows(const __m512* acc, const float* off, const XQ* x, int64_t groups, float* out, int64_t out_stride) {
  for (int t = 0; t < T; ++t) {
    float total = _mm512_reduce_add_ps(acc[t]);
    if (off) total += offset_term(off, x[t].group_sum, groups);
    out[t * out_stride] = total;
  }
}

inline __m512i widen_low(__m512i bytes) { return _mm512_cvtepi8_epi16(_mm512_castsi512_si256(bytes)); }
inline __m512i widen_high(__m512i bytes) { return _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(bytes, 1)); }

struct Q4 {
  const uint8_t* qs; const float* scales; const float* offsets; int64_t K; bool codebook; __m512i table;
};

template <int T>
void q4_row(const Q4& w, int64_t n, const XQ* x, float* out, int64_t out_stride) {
  const int64_t row_bytes = w.K / 2, groups = w.K / 32, chunks = (groups + 3) / 4;
  const uint8_t* qs = w.qs + n * row_bytes;
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  const __m512i nibble = _mm512_set1_epi8(15);
  const __m512i spread_a = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i spread_b = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(qs + 64 * c + kPrefetch), _MM_HINT_T0);
    if (c % 4 == 0) {  // a cache line of scales (and offsets) serves 4 chunks
      _mm_prefetch(reinterpret_cast<const char*>(sc + 4 * c) + kPrefetch / 2, _MM_HINT_T0);
      if (off) _mm_prefetch(reinterpret_cast<const char*>(off + 4 * c) + kPrefetch / 2, _MM_HINT_T0);
    }
    const int64_t left = groups - 4 * c;
    const __m512i codes = _mm512_maskz_loadu_epi8(byte_mask(16 * left), qs + 64 * c);
    __m512i lo = _mm512_and_si512(codes, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), nibble);
    if (w.codebook) {
      lo = _mm512_shuffle_epi8(w.table, lo);
      hi = _mm512_shuffle_epi8(w.table, hi);
    }
    const __m512i lo_a = widen_low(lo), lo_b = widen_high(lo), hi_a = widen_low(hi), hi_b = widen_high(hi);
    const __m512 w4 = _mm512_maskz_loadu_ps(float_mask(std::min<int64_t>(left, 4)), sc + 4 * c);
    const __m512 w_scale_a = _mm512_permutexvar_ps(spread_a, w4), w_scale_b = _mm512_permutexvar_ps(spread_b, w4);
    for (int t = 0; t < T; ++t) {
      const int16_t* xq = x[t].q + 128 * c;
      const __m512i dot_a = dot16(dot16(_mm512_setzero_si512(), lo_a, _mm512_load_si512(xq)), hi_a, _mm512_load_si512(xq + 64));
      const __m512i dot_b = dot16(dot16(_mm512_setzero_si512(), lo_b, _mm512_load_si512(xq + 32)), hi_b, _mm512_load_si512(xq + 96));
      acc[t] = add_scaled(acc[t], dot_a, dot_b, w_scale_a, w_scale_b, x[t].lane_scale + 32 * c);
    }
  }
  store_rows<T>(acc, off, x, groups, out + n, out_stride);
}

struct Q8 {
  const int8_t* qs; const float* scales; const float* offsets; int64_t K; int64_t G;
};

template <int T>
void q8_row(const Q8& w, int64_t n, const XQ* x, float* out, int64_t out_stride) {
  const int64_t K = w.K, groups = K / w.G, chunks = (K + 63) / 64, per_chunk = 64 / w.G;
  const int8_t* qs = w.qs + n * K;
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  // Lanes of dot a cover the chunk's first 32 codes: one group of 32, or two of 16.
  const __m512i spread_a = w.G == 32 ? _mm512_setzero_si512() : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i spread_b = w.G == 32 ? _mm512_set1_epi32(1) : _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(qs + 64 * c + kPrefetch), _MM_HINT_T0);
    if (c % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(sc + per_chunk * c) + kPrefetch / 4, _MM_HINT_T0);
    const int64_t left = K - 64 * c;
    const __m512i codes = _mm512_maskz_loadu_epi8(byte_mask(left), qs + 64 * c);
    const __m512i a = widen_low(codes), b = widen_high(codes);
    const int64_t scales_left = std::min<int64_t>(per_chunk, (left + w.G - 1) / w.G);
    const __m512 w_chunk = _mm512_maskz_loadu_ps(float_mask(scales_left), sc + per_chunk * c);
    const __m512 w_scale_a = _mm512_permutexvar_ps(spread_a, w_chunk), w_scale_b = _mm512_permutexvar_ps(spread_b, w_chunk);
    for (int t = 0; t < T; ++t) {
      const int16_t* xq = x[t].q + 64 * c;
      const __m512i dot_a = dot16(_mm512_setzero_si512(), a, _mm512_load_si512(xq));
      const __m512i dot_b = dot16(_mm512_setzero_si512(), b, _mm512_load_si512(xq + 32));
      acc[t] = add_scaled(acc[t], dot_a, dot_b, w_scale_a, w_scale_b, x[t].lane_scale + 32 * c);
    }
  }
  store_rows<T>(acc, off, x, groups, out + n, out_stride);
}

template <typename W>
void run(void (*const* rows)(const W&, int64_t, const XQ*, float*, int64_t), const W& w, int64_t N,
         const XQBuffer& xq, int64_t M, float* out) {
  // As qgemm.cpp: weight rows split across threads, every tile of x rows passed over each weight row.
  std::vector<XQ> x(M);
  for (int64_t m = 0; m < M; ++m) x[m] = xq.row(m);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; m += kTile)
        rows[std::min<int64_t>(kTile, M - m) - 1](w, n, x.data() + m, out + m * N, N);
  });
}

const float* optional_data(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

at::Tensor q4_linear_int(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets,
                         const at::Tensor& codebook) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(K % 32 == 0 && scales.size(1) == K / 32, "q4 weight needs K % 32 == 0 and K/32 scales");
  alignas(64) int8_t table[64] = {};
  if (codebook.numel()) {
    TORCH_CHECK(codebook.numel() == 16, "a q4 codebook has 16 values");
    for (int i = 0; i < 16; ++i) {
      const float v = codebook.data_ptr<float>()[i];
      TORCH_CHECK(v == std::nearbyint(v) && std::fabs(v) <= 127, "integer dot products need an integer codebook");
      for (int lane = 0; lane < 4; ++lane) table[16 * lane + i] = int8_t(v);
    }
  }
  Q4 w{qs.data_ptr<uint8_t>(), scales.data_ptr<float>(), optional_data(offsets), K, codebook.numel() > 0,
       _mm512_load_si512(table)};
  const XQBuffer xq = round_for_q4(x);
  using Fn = void (*)(const Q4&, int64_t, const XQ*, float*, int64_t);
  static const Fn rows[kTile] = {q4_row<1>, q4_row<2>, q4_row<3>, q4_row<4>};
  at::Tensor out = at::empty({M, N}, x.options());
  run<Q4>(rows, w, N, xq, M, out.data_ptr<float>());
  return out;
}

at::Tensor q8_linear_int(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets) {
  const int64_t N = qs.size(0), K = qs.size(1), M = x.size(0);
  check_x(x, K);
  const int64_t G = K / scales.size(1);
  TORCH_CHECK((G == 16 || G == 32) && scales.size(1) * G == K && K % 32 == 0,
              "q8 weight needs groups of 16 or 32 and K % 32 == 0");
  Q8 w{qs.data_ptr<int8_t>(), scales.data_ptr<float>(), optional_data(offsets), K, G};
  const XQBuffer xq = round_for_q8(x, G);
  using Fn = void (*)(const Q8&, int64_t, const XQ*, float*, int64_t);
  static const Fn rows[kTile] = {q8_row<1>, q8_row<2>, q8_row<3>, q8_row<4>};
  at::Tensor out = at::empty({M, N}, x.options());
  run<Q8>(rows, w, N, xq, M, out.data_ptr<float>());
  return out;
}

#else

at::Tensor q4_linear_int(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "integer dot-product kernels need AVX512BW");
}
at::Tensor q8_linear_int(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  TORCH_CHECK(false, "integer dot-product kernels need AVX512BW");
}

#endif

bool has_int_dot() {
#ifdef MINERVA_INT_DOT
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minerva_cpu, m) {
  m.def("q4_linear_int(Tensor x, Tensor qs, Tensor scales, Tensor offsets, Tensor codebook) -> Tensor", q4_linear_int);
  m.def("q8_linear_int(Tensor x, Tensor qs, Tensor scales, Tensor offsets) -> Tensor", q8_linear_int);
  m.def("has_int_dot() -> bool", has_int_dot);
}
