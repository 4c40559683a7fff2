// Matmuls of many activation rows (batched decode, speculative verification, prefill chunks) against
// GGUF-quantized weights, without an fp32 copy of the weights: each block of 32 weight rows is
// dequantized once per call into a small per-thread bf16 panel (32 x K, L1/L2-resident) and every row of
// x passes over it on AMX-BF16 tiles. The row kernels of qgemm.cpp dequantize a weight row once per 8
// rows of x and multiply in fp32 vectors; here the dequantization is paid once for all M rows and the
// multiply runs on the tile unit (16x16x32 per instruction), so batches of 16..512 rows cost little
// more than the one pass over the quantized bytes.
//
// Layouts are qgemm.cpp's (see there). Numerics: every weight value is formed exactly as qgemm.cpp forms
// it (fp32), then rounded to bf16 (nearest even), x likewise; products are exact in fp32 and summed in
// fp32 by the tile unit. With `terms` 1 the result is torch's matmul of the bf16-rounded x and weight to
// fp32 summation order; with `terms` 3 each operand is also carried as a second bf16 of its rounding
// residue (see Slabs), which brings the products to ~2^-16 relative error, near fp32.
//
// Tile roles (C = W x^T, computed transposed): A = 16 weight rows x 32 k (bf16, row-major panel),
// B = 16 k-pairs x 16 rows of x (x^T in pairs, "VNNI"), C = 16 weight rows x 16 x rows (fp32), written
// transposed into out[M, N]. Without AMX at build time or permission at run time (Linux arch_prctl),
// `tiles_available()` is false and the plan (kernels/cpu/select.py) never picks these kernels.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MINERVA_AMX 1
#endif

namespace {

#ifdef MINERVA_AMX
constexpr int kRows = 32;  // weight rows per panel (two A tiles) and x rows per pass (two B tiles)

struct Q4 {
  const uint8_t* qs; const float* scales; const float* offsets; const float* codebook; int64_t N, K;
};
struct Q8 {
  const int8_t* qs; const float* scales; const float* offsets; int64_t N, K, G;
};

bool amx_permitted() {
  // Linux hands out the tile state only on request, once per process (all threads).
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

inline __m512i pack_bf16(__m512 low, __m512 high) {  // 32 values in order, rounded to nearest even
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

inline __m512 widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }

// With `terms` 3 every value v is split in two bf16, hi = bf16(v) and lo = bf16(v - hi) (the subtraction
// is exact), and the dot product runs over three slabs per 32 values: w_hi x_hi + w_lo x_hi + w_hi x_lo,
// relative error ~2^-16 per product instead of bf16's ~2^-8 (near fp32, at three times the tile work).
// `Slabs` says where each part goes: weights (hi, lo, hi), x (hi, hi, lo).
struct Slabs {
  int terms;
  bool weight;
  template <typename Put>
  inline void write(int64_t group, __m512 a, __m512 b, Put put) const {
    const __m512i hi = pack_bf16(a, b);
    if (terms == 1) return put(group, hi);
    const __m512i lo = pack_bf16(_mm512_sub_ps(a, widen(_mm512_castsi512_si256(hi))),
                                 _mm512_sub_ps(b, widen(_mm512_extracti64x4_epi64(hi, 1))));
    put(3 * group, hi);
    put(3 * group + 1, weight ? lo : hi);
    put(3 * group + 2, weight ? hi : lo);
  }
};

// The panel holds weight rows n0..n0+31 (zero past N) as slabs of [32 rows][32 bf16] (K/32 slabs, or
// 3K/32 with terms 3): each A tile (16 rows x 32 k) is 1 KiB contiguous, so tile loads never stride
// across cache sets.
inline uint16_t* panel_at(uint16_t* panel, int r, int64_t slab) { return panel + (slab * kRows + r) * 32; }

void dequantize_panel(const Q4& w, int64_t n0, int terms, uint16_t* panel) {
  const int64_t K = w.K, groups = K / 32;
  const __m512 table = w.codebook ? _mm512_loadu_ps(w.codebook) : _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi32(15);
  const Slabs slabs{terms, true};
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = n0 + r;
    const auto put = [&](int64_t slab, __m512i v) { _mm512_storeu_si512(panel_at(panel, r, slab), v); };
    if (n >= w.N) {
      for (int64_t slab = 0; slab < groups * terms; ++slab) put(slab, _mm512_setzero_si512());
      continue;
    }
    const uint8_t* qs = w.qs + n * (K / 2);
    const float* sc = w.scales + n * groups;
    const float* off = w.offsets ? w.offsets + n * groups : nullptr;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * g)));
      const __m512i lo = _mm512_and_si512(codes, mask), hi = _mm512_srli_epi32(codes, 4);
      const __m512 scale = _mm512_set1_ps(sc[g]);
      __m512 a = w.codebook ? _mm512_permutexvar_ps(lo, table) : _mm512_cvtepi32_ps(lo);
      __m512 b = w.codebook ? _mm512_permutexvar_ps(hi, table) : _mm512_cvtepi32_ps(hi);
      a = _mm512_mul_ps(a, scale), b = _mm512_mul_ps(b, scale);
      if (off) {
        const __m512 offset = _mm512_set1_ps(off[g]);
        a = _mm512_add_ps(a, offset), b = _mm512_add_ps(b, offset);
      }
      slabs.write(g, a, b, put);
    }
  }
}

void dequantize_panel(const Q8& w, int64_t n0, int terms, uint16_t* panel) {
  const int64_t K = w.K, groups = K / w.G;
  const Slabs slabs{terms, true};
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = n0 + r;
    const auto put = [&](int64_t slab, __m512i v) { _mm512_storeu_si512(panel_at(panel, r, slab), v); };
    if (n >= w.N) {
      for (int64_t slab = 0; slab < K / 32 * terms; ++slab) put(slab, _mm512_setzero_si512());
      continue;
    }
    const int8_t* qs = w.qs + n * K;
    const float* sc = w.scales + n * groups;
    const float* off = w.offsets ? w.offsets + n * groups : nullptr;
    __m512 v[2];
    for (int64_t c = 0; c < K / 16; ++c) {  // 16 values at a time, each in one group
      const int64_t g = c * 16 / w.G;
      const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * c))));
      v[c & 1] = _mm512_mul_ps(q, _mm512_set1_ps(sc[g]));
      if (off) v[c & 1] = _mm512_add_ps(v[c & 1], _mm512_set1_ps(off[g]));
      if (c & 1) slabs.write(c / 2, v[0], v[1], put);
    }
  }
}

// x [M, K] fp32 -> x^T in bf16 pairs, blocked by 16 rows of x: int32 [Mp/16, slabs * 16, 16] (Mp = M rounded
// up to 32, padding zero), so each B tile (16 k-pairs x 16 rows) is 1 KiB contiguous.
at::Tensor pairs_transposed(const at::Tensor& x, int64_t Mp, int terms) {
  const int64_t M = x.size(0), K = x.size(1), rows = K / 2 * terms;
  at::Tensor xt = at::zeros({Mp / 16, rows, 16}, x.options().dtype(at::kInt));
  const float* src = x.data_ptr<float>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(xt.data_ptr<int32_t>());
  const Slabs slabs{terms, false};
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t pairs[16];
    for (int64_t m = begin; m < end; ++m) {
      const auto put = [&](int64_t slab, __m512i v) {
        _mm512_store_si512(pairs, v);
        for (int j = 0; j < 16; ++j) dst[((m / 16) * rows + slab * 16 + j) * 16 + m % 16] = pairs[j];
      };
      for (int64_t k = 0; k < K; k += 32) slabs.write(k / 32, _mm512_loadu_ps(src + m * K + k), _mm512_loadu_ps(src + m * K + k + 16), put);
    }
  });
  return xt;
}

// out[m, n] = c[n - n0][m - m0] for the valid part of a 16 x 16 fp32 tile.
inline void store_transposed(const float* c, float* out, int64_t N, int64_t M, int64_t n0, int64_t m0) {
  if (n0 >= N) return;
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));
  const __mmask16 valid = N - n0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n0)) - 1);
  for (int j = 0; j < 16 && m0 + j < M; ++j) {
    const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(j)), c, 4);
    _mm512_mask_storeu_ps(out + (m0 + j) * N + n0, valid, v);
  }
}

template <typename W>
at::Tensor tiles_linear(const at::Tensor& x, const W& w, int terms) {
  const int64_t M = x.size(0), N = w.N, Mp = (M + kRows - 1) / kRows * kRows, slabs = w.K / 32 * terms;
  const at::Tensor xt = pairs_transposed(x, Mp, terms);
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(xt.data_ptr<int32_t>());
  at::Tensor out = at::empty({M, N}, x.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<uint16_t> panel(kRows * 32 * slabs);
    alignas(64) float c[4][16 * 16];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kRows;
      dequantize_panel(w, n0, terms, panel.data());
      for (int64_t m0 = 0; m0 < Mp; m0 += kRows) {
        const uint32_t* b0 = pairs + (m0 / 16) * slabs * 256;
        const uint32_t* b1 = b0 + slabs * 256;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t slab = 0; slab < slabs; ++slab) {
          _tile_loadd(4, panel_at(panel.data(), 0, slab), 64);
          _tile_loadd(5, panel_at(panel.data(), 16, slab), 64);
          _tile_loadd(6, b0 + slab * 256, 64);
          _tile_loadd(7, b1 + slab * 256, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
        store_transposed(c[0], o, N, M, n0, m0);
        store_transposed(c[1], o, N, M, n0, m0 + 16);
        store_transposed(c[2], o, N, M, n0 + 16, m0);
        store_transposed(c[3], o, N, M, n0 + 16, m0 + 16);
      }
    }
    _tile_release();
  });
  return out;
}
#endif

bool tiles_available() {
#ifdef MINERVA_AMX
  return amx_permitted();
#else
  return false;
#endif
}

void check(const at::Tensor& x, int64_t K, int64_t terms) {
  TORCH_CHECK(tiles_available(), "AMX-BF16 tiles are not available on this CPU");
  TORCH_CHECK(terms == 1 || terms == 3, "terms must be 1 (bf16) or 3 (split bf16), got ", terms);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(x.size(1) == K && K % 32 == 0, "x has ", x.size(1), " columns, the weight ", K, " (a multiple of 32)");
}

const float* optional_data(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

at::Tensor q4_linear_tiles(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                           const at::Tensor& offsets, const at::Tensor& codebook, int64_t terms) {
  const int64_t N = qs.size(0), K = qs.size(1) * 2;
  check(x, K, terms);
  TORCH_CHECK(scales.size(1) == K / 32, "q4 weight needs K/32 scales");
#ifdef MINERVA_AMX
  return tiles_linear(x, Q4{qs.data_ptr<uint8_t>(), scales.data_ptr<float>(), optional_data(offsets),
                            optional_data(codebook), N, K}, int(terms));
#else
  return at::Tensor();
#endif
}

at::Tensor q8_linear_tiles(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales,
                           const at::Tensor& offsets, int64_t terms) {
  const int64_t N = qs.size(0), K = qs.size(1);
  check(x, K, terms);
  const int64_t G = K / scales.size(1);
  TORCH_CHECK((G == 16 || G == 32) && scales.size(1) * G == K, "q8 weight needs groups of 16 or 32");
#ifdef MINERVA_AMX
  return tiles_linear(x, Q8{qs.data_ptr<int8_t>(), scales.data_ptr<float>(), optional_data(offsets), N, K, G}, int(terms));
#else
  return at::Tensor();
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minerva_cpu, m) {
  m.def("q4_linear_tiles(Tensor x, Tensor qs, Tensor scales, Tensor offsets, Tensor codebook, int terms) -> Tensor", q4_linear_tiles);
  m.def("q8_linear_tiles(Tensor x, Tensor qs, Tensor scales, Tensor offsets, int terms) -> Tensor", q8_linear_tiles);
  m.def("tiles_available() -> bool", tiles_available);
}
