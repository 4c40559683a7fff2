// Matmuls that read GGUF-quantized weights in place: the weight is dequantized in registers, a group
// of 32 (or 16) values at a time, and never exists in fp32 in memory.
//
// Two layouts (made by kernels/cpu/quant.py, one per family of GGUF types):
//   q4: qs uint8 [N, K/2]: group g of a row is bytes [16g, 16g+16), low nibble = element 32g+j,
//       high nibble = element 32g+16+j; scales f32 [N, K/32]; offsets f32 [N, K/32] or empty;
//       codebook f32 [16] or empty. value = scale * q + offset (Q4_1, Q4_K), or with a codebook
//       value = scale * codebook[q] (Q4_0: q - 8; MXFP4: the E2M1 values).
//   q8: qs int8 [N, K]; scales f32 [N, K/G] (G = 16 or 32); offsets f32 [N, K/G] or empty.
//       value = scale * q (+ offset) (Q8_0, Q6_K, and any q4 weight widened to this layout).
// Both the matmuls and `dequantize_*` form each value exactly as the `gguf` package does (its scale * q
// is exact in fp32 for every type but Q6_K, whose one product rounds alike; an offset is added after,
// or fused where scale * q is exact, which rounds the same), so a matmul is dequantize-then-matmul with
// fp32 FMA accumulation, in its own summation order.
// x is fp32 [M, K]; rows of x go in tiles of up to 8 past each weight row, dequantized once per tile.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINERVA_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MINERVA_AVX2 1
#endif

namespace {

constexpr int kTile = 8;  // rows of x per pass over a weight row

struct Q4 {
  const uint8_t* qs; const float* scales; const float* offsets; const float* codebook; int64_t K;
};
struct Q8 {
  const int8_t* qs; const float* scales; const float* offsets; int64_t K; int64_t G;
};

#ifdef MINERVA_AVX512
// 16 values of a weight row: codes (as fp32, or looked up in the codebook) times scale, plus offset.
inline __m512 q4_values(__m512i codes, const Q4& w, __m512 table, __m512 scale, __m512 offset) {
  const __m512 q = w.codebook ? _mm512_permutexvar_ps(codes, table) : _mm512_cvtepi32_ps(codes);
  return w.offsets ? _mm512_fmadd_ps(q, scale, offset) : _mm512_mul_ps(q, scale);
}

template <int T>
void q4_row(const Q4& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  const int64_t K = w.K, groups = K / 32;
  const uint8_t* qs = w.qs + n * (K / 2);
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  __m512 lo_acc[T], hi_acc[T];
  for (int t = 0; t < T; ++t) lo_acc[t] = hi_acc[t] = _mm512_setzero_ps();
  const __m512 table = w.codebook ? _mm512_loadu_ps(w.codebook) : _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * g)));
    const __m512 scale = _mm512_set1_ps(sc[g]);
    const __m512 offset = off ? _mm512_set1_ps(off[g]) : scale;
    const __m512 lo = q4_values(_mm512_and_si512(codes, mask), w, table, scale, offset);
    const __m512 hi = q4_values(_mm512_srli_epi32(codes, 4), w, table, scale, offset);
    for (int t = 0; t < T; ++t) {
      const float* xr = x + t * K + 32 * g;
      lo_acc[t] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), lo_acc[t]);
      hi_acc[t] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), hi_acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc[t], hi_acc[t]));
}

// 16 codes of chunk `c` (group c >> shift: its scale, then offset) into the accumulators `acc` of T activation rows.
template <int T>
inline void q8_chunk(const Q8& w, const int8_t* qs, const float* sc, const float* off, const float* x, int64_t c,
                     int shift, __m512 (&acc)[T]) {
  const int64_t g = c >> shift;
  const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * c))));
  // Q6_K's scale * q may round: it is rounded alone, then the offset added (never fused).
  __m512 v = _mm512_mul_ps(q, _mm512_set1_ps(sc[g]));
  if (off) v = _mm512_add_ps(v, _mm512_set1_ps(off[g]));
  for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + t * w.K + 16 * c), acc[t]);
}

template <int T>
void q8_row(const Q8& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  const int64_t K = w.K, groups = K / w.G, chunks = K / 16;
  const int shift = w.G == 32 ? 1 : 0;  // chunks per group: 2 or 1 (G is 32 or 16, checked at the entry)
  const int8_t* qs = w.qs + n * K;
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  __m512 even[T], odd[T];  // even and odd chunks: two chains; named, not acc[c & 1] (a runtime index kept them in memory)
  for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 1 < chunks; c += 2) {
    q8_chunk<T>(w, qs, sc, off, x, c, shift, even);
    q8_chunk<T>(w, qs, sc, off, x, c + 1, shift, odd);
  }
  if (c < chunks) q8_chunk<T>(w, qs, sc, off, x, c, shift, even);
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = _mm512_reduce_add_ps(_mm512_add_ps(even[t], odd[t]));
}
#elif defined(MINERVA_AVX2)
// The same kernels 8 lanes wide (AVX2 + FMA): values formed as above, so only the summation order differs.
inline float sum8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// 8 values of a weight row from 8 codes (0-15): a 16-entry codebook is two 8-lane lookups picked by bit 3.
inline __m256 q4_values(__m256i codes, const Q4& w, __m256 low_table, __m256 high_table, __m256 scale, __m256 offset) {
  __m256 q;
  if (w.codebook)
    q = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_table, codes), _mm256_permutevar8x32_ps(high_table, codes),
                         _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
  else
    q = _mm256_cvtepi32_ps(codes);
  return w.offsets ? _mm256_fmadd_ps(q, scale, offset) : _mm256_mul_ps(q, scale);
}

// Accumulators per row of x: two (independent FMA chains) where registers allow, one for wide tiles.
template <int T>
constexpr int kChains = T <= 4 ? 2 : 1;

template <int T>
void q4_row(const Q4& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  constexpr int A = kChains<T>;
  const int64_t K = w.K, groups = K / 32;
  const uint8_t* qs = w.qs + n * (K / 2);
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  __m256 acc[A][T];
  for (int a = 0; a < A; ++a)
    for (int t = 0; t < T; ++t) acc[a][t] = _mm256_setzero_ps();
  const __m256 low_table = w.codebook ? _mm256_loadu_ps(w.codebook) : _mm256_setzero_ps();
  const __m256 high_table = w.codebook ? _mm256_loadu_ps(w.codebook + 8) : _mm256_setzero_ps();
  const __m128i mask = _mm_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * g));
    const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    const __m256 scale = _mm256_set1_ps(sc[g]);
    const __m256 offset = off ? _mm256_set1_ps(off[g]) : scale;
    const __m256 v[4] = {q4_values(_mm256_cvtepu8_epi32(lo), w, low_table, high_table, scale, offset),
                         q4_values(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), w, low_table, high_table, scale, offset),
                         q4_values(_mm256_cvtepu8_epi32(hi), w, low_table, high_table, scale, offset),
                         q4_values(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), w, low_table, high_table, scale, offset)};
    for (int t = 0; t < T; ++t) {
      const float* xr = x + t * K + 32 * g;
      for (int c = 0; c < 4; ++c) acc[c & (A - 1)][t] = _mm256_fmadd_ps(v[c], _mm256_loadu_ps(xr + 8 * c), acc[c & (A - 1)][t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = sum8(A == 2 ? _mm256_add_ps(acc[0][t], acc[A - 1][t]) : acc[0][t]);
}

template <int T>
void q8_row(const Q8& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  constexpr int A = kChains<T>;
  const int64_t K = w.K, groups = K / w.G, per_group = w.G / 8;
  const int8_t* qs = w.qs + n * K;
  const float* sc = w.scales + n * groups;
  const float* off = w.offsets ? w.offsets + n * groups : nullptr;
  __m256 acc[A][T];
  for (int a = 0; a < A; ++a)
    for (int t = 0; t < T; ++t) acc[a][t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 scale = _mm256_set1_ps(sc[g]);
    const __m256 offset = off ? _mm256_set1_ps(off[g]) : scale;
    for (int64_t c = g * per_group; c < (g + 1) * per_group; c += 2)  // chunk pairs: accumulators indexed statically
      for (int pair = 0; pair < 2; ++pair) {
        const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8 * (c + pair)));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
        __m256 v = _mm256_mul_ps(q, scale);  // rounded alone, then the offset added (never fused), as above
        if (off) v = _mm256_add_ps(v, offset);
        for (int t = 0; t < T; ++t)
          acc[pair & (A - 1)][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + t * K + 8 * (c + pair)), acc[pair & (A - 1)][t]);
      }
  }
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = sum8(A == 2 ? _mm256_add_ps(acc[0][t], acc[A - 1][t]) : acc[0][t]);
}
#else
template <int T>
void q4_row(const Q4& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  const int64_t K = w.K, groups = K / 32;
  const uint8_t* qs = w.qs + n * (K / 2);
  float total[T] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const float s = w.scales[n * groups + g], b = w.offsets ? w.offsets[n * groups + g] : 0.f;
    float v[32];
    for (int j = 0; j < 32; ++j) {
      const uint8_t byte = qs[16 * g + (j & 15)];
      const int code = j < 16 ? byte & 15 : byte >> 4;
      const float q = s * (w.codebook ? w.codebook[code] : float(code));
      v[j] = w.offsets ? q + b : q;
    }
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 32; ++j) total[t] += v[j] * x[t * K + 32 * g + j];
  }
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = total[t];
}

template <int T>
void q8_row(const Q8& w, int64_t n, const float* x, float* out, int64_t out_stride) {
  const int64_t K = w.K, groups = K / w.G;
  float total[T] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int64_t g = n * groups + k / w.G;
    const float q = w.scales[g] * float(w.qs[n * K + k]);
    const float v = w.offsets ? q + w.offsets[g] : q;
    for (int t = 0; t < T; ++t) total[t] += v * x[t * K + k];
  }
  for (int t = 0; t < T; ++t) out[t * out_stride + n] = total[t];
}
#endif

template <typename W>
void run(void (*const* rows)(const W&, int64_t, const float*, float*, int64_t), const W& w, int64_t N,
         const float* x, int64_t M, float* out) {
  // Weight rows split across threads; each thread passes every x tile over its rows (a row's bytes
  // stay in L1 while the tiles pass over it).
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < M; m += kTile)
        rows[std::min<int64_t>(kTile, M - m) - 1](w, n, x + m * w.K, out + m * N, N);
  });
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " columns, the weight ", K);
}

const float* optional_data(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets,
                     const at::Tensor& codebook) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(K % 32 == 0 && scales.size(1) == K / 32, "q4 weight needs K % 32 == 0 and K/32 scales");
  Q4 w{qs.data_ptr<uint8_t>(), scales.data_ptr<float>(), optional_data(offsets), optional_data(codebook), K};
  using Fn = void (*)(const Q4&, int64_t, const float*, float*, int64_t);
  static const Fn rows[kTile] = {q4_row<1>, q4_row<2>, q4_row<3>, q4_row<4>, q4_row<5>, q4_row<6>, q4_row<7>, q4_row<8>};
  at::Tensor out = at::empty({M, N}, x.options());
  run<Q4>(rows, w, N, x.data_ptr<float>(), M, out.data_ptr<float>());
  return out;
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets) {
  const int64_t N = qs.size(0), K = qs.size(1), M = x.size(0);
  check_x(x, K);
  const int64_t G = K / scales.size(1);
  TORCH_CHECK((G == 16 || G == 32) && scales.size(1) * G == K, "q8 weight needs groups of 16 or 32");
  Q8 w{qs.data_ptr<int8_t>(), scales.data_ptr<float>(), optional_data(offsets), K, G};
  using Fn = void (*)(const Q8&, int64_t, const float*, float*, int64_t);
  static const Fn rows[kTile] = {q8_row<1>, q8_row<2>, q8_row<3>, q8_row<4>, q8_row<5>, q8_row<6>, q8_row<7>, q8_row<8>};
  at::Tensor out = at::empty({M, N}, x.options());
  run<Q8>(rows, w, N, x.data_ptr<float>(), M, out.data_ptr<float>());
  return out;
}

// Exact dequantization: scale * q, then + offset, two roundings as numpy does them (the file is built
// with -ffp-contract=off so the compiler fuses nothing; the matmuls' FMAs are explicit intrinsics).
at::Tensor q4_dequantize(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets,
                         const at::Tensor& codebook) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2, groups = K / 32;
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* off = optional_data(offsets);
  const float* table = optional_data(codebook);
  at::Tensor out = at::empty({N, K}, scales.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < groups; ++g) {
        const float s = sc[n * groups + g], b = off ? off[n * groups + g] : 0.f;
#ifdef MINERVA_AVX512
        const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * (K / 2) + 16 * g)));
        for (int half = 0; half < 2; ++half) {
          const __m512i code = half ? _mm512_srli_epi32(codes, 4) : _mm512_and_si512(codes, _mm512_set1_epi32(15));
          const __m512 value = table ? _mm512_permutexvar_ps(code, _mm512_loadu_ps(table)) : _mm512_cvtepi32_ps(code);
          const __m512 v = _mm512_mul_ps(_mm512_set1_ps(s), value);
          _mm512_storeu_ps(o + n * K + 32 * g + 16 * half, off ? _mm512_add_ps(v, _mm512_set1_ps(b)) : v);
        }
#else
        for (int j = 0; j < 32; ++j) {
          const uint8_t byte = q[n * (K / 2) + 16 * g + (j & 15)];
          const int code = j < 16 ? byte & 15 : byte >> 4;
          const float v = s * (table ? table[code] : float(code));
          o[n * K + 32 * g + j] = off ? v + b : v;
        }
#endif
      }
  });
  return out;
}

at::Tensor q8_dequantize(const at::Tensor& qs, const at::Tensor& scales, const at::Tensor& offsets) {
  const int64_t N = qs.size(0), K = qs.size(1), G = K / scales.size(1), groups = K / G;
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  const float* off = optional_data(offsets);
  at::Tensor out = at::empty({N, K}, scales.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
#ifdef MINERVA_AVX512
      for (int64_t k = 0; k < K; k += 16) {  // 16 values of one group (G is 16 or 32)
        const int64_t g = n * groups + k / G;
        const __m512 value = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * K + k))));
        const __m512 v = _mm512_mul_ps(_mm512_set1_ps(sc[g]), value);
        _mm512_storeu_ps(o + n * K + k, off ? _mm512_add_ps(v, _mm512_set1_ps(off[g])) : v);
      }
#else
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = n * groups + k / G;
        const float v = sc[g] * float(q[n * K + k]);
        o[n * K + k] = off ? v + off[g] : v;
      }
#endif
    }
  });
  return out;
}

bool has_avx512() {
#ifdef MINERVA_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(minerva_cpu, m) {
  m.def("q4_linear(Tensor x, Tensor qs, Tensor scales, Tensor offsets, Tensor codebook) -> Tensor", q4_linear);
  m.def("q8_linear(Tensor x, Tensor qs, Tensor scales, Tensor offsets) -> Tensor", q8_linear);
  m.def("q4_dequantize(Tensor qs, Tensor scales, Tensor offsets, Tensor codebook) -> Tensor", q4_dequantize);
  m.def("q8_dequantize(Tensor qs, Tensor scales, Tensor offsets) -> Tensor", q8_dequantize);
  m.def("has_avx512() -> bool", has_avx512);
}
