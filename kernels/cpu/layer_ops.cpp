// The small per-layer ops of a CPU decode step, each one call instead of a dozen torch ops: at one
// stream a step is ~60 ops per layer, and their dispatch cost rivals the matmuls'. Activations are fp32;
// the paged KV cache is fp32, fp16 or bf16 (both caches alike), converted to fp32 in registers when read.
//   rms_norm:        out = w * s / sqrt(mean(s^2) + eps) with s = x (+ residual); returns (out, s).
//   rope_write_kv:   NeoX rotary on q and k (rotary_dim = 2 * len(inv_freq); cos/sin scaled by
//                    mscale), rotated k and v scattered into the paged caches by slot (< 0: skip).
//   paged_attention: causal attention of each sequence's new queries over its paged keys (GQA),
//                    read in place from the cache blocks: no gather, no padding. With AVX-512 and
//                    head_dim 64 or 128, flash-style (online softmax over 64-key blocks), so a prompt
//                    chunk at long context costs its FLOPs, not copies of the context.
//   silu_and_mul:    silu(gate) * up on a [T, 2I] tensor laid out [gate | up].
// Numerics: fp32 arithmetic like kernels/reference.py, summed in a different order; keys and values are rounded
// to the cache's dtype when written (round to nearest even, as torch's `.to`), exactly as the reference stores them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
// 16 cache elements as fp32 lanes: fp16 by the hardware conversion, bf16 by a 16-bit shift (exact).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

template <typename T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename T>
void axpy(float* y, float a, const T* x, int64_t n) {  // y += a * x
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, load16(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * static_cast<float>(x[i]);
}

// Calls fn with a null pointer of the caches' element type (fp32, fp16 or bf16).
template <typename Fn>
auto with_cache_type(const at::Tensor& k_cache, const at::Tensor& v_cache, Fn&& fn) {
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "the K and V caches must share a dtype");
  switch (k_cache.scalar_type()) {
    case at::kFloat: return fn(static_cast<const float*>(nullptr));
    case at::kHalf: return fn(static_cast<const c10::Half*>(nullptr));
    case at::kBFloat16: return fn(static_cast<const c10::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, "KV caches must be fp32, fp16 or bf16, got ", k_cache.scalar_type());
  }
}

void check_fp32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be fp32");
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                            const std::optional<at::Tensor>& residual) {
  check_fp32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous(), "x must be [T, H] with unit stride");
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({T, H}, x.options());
  at::Tensor sum = at::empty({residual ? T : 0, H}, x.options());  // empty without a residual
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = x.data_ptr<float>() + t * x.stride(0);
      float* s = residual ? sum.data_ptr<float>() + t * H : const_cast<float*>(xr);
      if (residual) {
        const float* r = residual->data_ptr<float>() + t * residual->stride(0);
        for (int64_t i = 0; i < H; ++i) s[i] = xr[i] + r[i];
      }
      const float inv = 1.f / std::sqrt(dot(s, s, H) / float(H) + float(eps));
      float* o = out.data_ptr<float>() + t * H;
      for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (s[i] * inv);
    }
  });
  return {out, sum};
}

at::Tensor rope_write_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                         const at::Tensor& inv_freq, double mscale, at::Tensor k_cache, at::Tensor v_cache,
                         const at::Tensor& slot_mapping) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v}) check_fp32(*t, "q, k and v");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must have unit stride");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t T = q.size(0), H = q.size(1), KVH = k.size(1), D = q.size(2), half = inv_freq.size(0);
  at::Tensor out = at::empty({T, H, D}, q.options());
  at::Tensor pos = positions.to(at::kLong).contiguous(), slots = slot_mapping.to(at::kLong).contiguous();
  at::Tensor freqs = inv_freq.to(at::kFloat).contiguous();
  const float* f = freqs.data_ptr<float>();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  with_cache_type(k_cache, v_cache, [&](auto type) {
    using T_ = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
    T_* kc = static_cast<T_*>(k_cache.data_ptr());
    T_* vc = static_cast<T_*>(v_cache.data_ptr());
    at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> cs(2 * half), rotated(D);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < half; ++i) {
          const float angle = float(p[t]) * f[i];
          cs[i] = std::cos(angle) * float(mscale);
          cs[half + i] = std::sin(angle) * float(mscale);
        }
        auto rotate = [&](const float* src, float* dst) {
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = src[i], x2 = src[half + i];
            dst[i] = x1 * cs[i] - x2 * cs[half + i];
            dst[half + i] = x2 * cs[i] + x1 * cs[half + i];
          }
          for (int64_t i = 2 * half; i < D; ++i) dst[i] = src[i];
        };
        for (int64_t h = 0; h < H; ++h)
          rotate(qp + t * q.stride(0) + h * q.stride(1), op + (t * H + h) * D);
        if (sl[t] < 0) continue;
        for (int64_t h = 0; h < KVH; ++h) {
          T_* kd = kc + (sl[t] * KVH + h) * D;
          T_* vd = vc + (sl[t] * KVH + h) * D;
          rotate(kp + t * k.stride(0) + h * k.stride(1), rotated.data());
          const float* vs = vp + t * v.stride(0) + h * v.stride(1);
          for (int64_t i = 0; i < D; ++i) {  // c10's conversions round to nearest even, as torch's `.to`
            kd[i] = T_(rotated[i]);
            vd[i] = T_(vs[i]);
          }
        }
      }
    });
    return 0;
  });
  return out;
}

template <typename T>
at::Tensor paged_attention_generic(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  check_fp32(q, "q");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous q and caches");
  const int64_t H = q.size(1), D = q.size(2), bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t B = seq_lens.size(0), group = H / KVH;
  at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
  const int64_t *tab = tables.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>(), *qsl = starts.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  at::Tensor out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const T* kp = static_cast<const T*>(k_cache.data_ptr());
  const T* vp = static_cast<const T*>(v_cache.data_ptr());
  float* op = out.data_ptr<float>();
  // One task per (sequence, kv head): its query heads share the keys read. Query i of a sequence
  // with q_len new tokens sits at position seq_len - q_len + i and sees keys 0..that position.
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, kvh = task % KVH, n = len[b], q_len = qsl[b + 1] - qsl[b];
      if (n <= 0 || q_len <= 0) continue;
      const int64_t rows = q_len * group;  // (query, head) pairs, each with its own scores
      scores.assign(rows * n, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = tab[b * width + j / bs] * bs + j % bs;
        const T* key = kp + (slot * KVH + kvh) * D;
        for (int64_t i = std::max<int64_t>(0, j - (n - q_len)); i < q_len; ++i)  // queries that see key j
          for (int64_t g = 0; g < group; ++g)
            scores[(i * group + g) * n + j] = dot(qp + ((qsl[b] + i) * H + kvh * group + g) * D, key, D) * float(scale);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t seen = n - q_len + r / group + 1;
        float* s = scores.data() + r * n;
        float top = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t j = 0; j < seen; ++j) top = std::max(top, s[j]);
        for (int64_t j = 0; j < seen; ++j) total += (s[j] = std::exp(s[j] - top));
        for (int64_t j = 0; j < seen; ++j) s[j] /= total;
        for (int64_t j = seen; j < n; ++j) s[j] = 0.f;
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t slot = tab[b * width + j / bs] * bs + j % bs;
        const T* value = vp + (slot * KVH + kvh) * D;
        for (int64_t i = std::max<int64_t>(0, j - (n - q_len)); i < q_len; ++i)
          for (int64_t g = 0; g < group; ++g)
            axpy(op + ((qsl[b] + i) * H + kvh * group + g) * D, scores[(i * group + g) * n + j], value, D);
      }
    }
  });
  return out;
}

#if defined(__AVX512F__)
// exp of 16 lanes (Cephes' single-precision polynomial, ~1 ulp); lanes below -88 come out ~0.
__m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  for (float c : {1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f})
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(c));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}

constexpr int64_t KEYS = 16;  // keys per score vector
constexpr int64_t BLOCK_KEYS = 64;  // keys per online-softmax update: a row's max, sum and rescale once per 64 keys
constexpr int64_t TILE_ROWS = 128;  // (query, head) rows per task: an 8-token chunk of SmolLM2 takes all 3 kv heads
constexpr int64_t TRANSPOSE_ROWS = 6;  // from this many rows per kv head a transposed key tile pays for itself
constexpr int64_t MIN_SPLIT_KEYS = 512;  // keys one task takes at least when a sequence's keys are split
alignas(64) const float kZeroKey[128] = {};  // stands in for the keys past a partial tile's end

// Kt[d * KEYS + k] = keys[k][d] for d < 16 * DC: 16 x 16 transposes in registers.
template <int64_t DC>
inline void transpose_keys(const float* const* keys, float* Kt) {
  for (int64_t c = 0; c < DC; ++c) {
    __m512 r[16], t[16];
    for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(keys[k] + 16 * c);
    for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: t[i] = a0 b0 a1 b1, t[i + 1] = a2 b2 a3 b3
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + j], lane L: column 4L + j of rows i .. i + 3
      r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {  // gather lane L of r[j], r[4 + j], r[8 + j], r[12 + j]: column 4L + j
      const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
      const __m512 e = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), f = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
      float* column = Kt + (16 * c + j) * KEYS;
      _mm512_store_ps(column, _mm512_shuffle_f32x4(a, e, 0x88));
      _mm512_store_ps(column + 4 * KEYS, _mm512_shuffle_f32x4(b, f, 0x88));
      _mm512_store_ps(column + 8 * KEYS, _mm512_shuffle_f32x4(a, e, 0xDD));
      _mm512_store_ps(column + 12 * KEYS, _mm512_shuffle_f32x4(b, f, 0xDD));
    }
  }
}

// Scores of NR query rows (Q, stride D) against a transposed tile of 16 keys, into S (stride BLOCK_KEYS).
template <int64_t DC, int NR>
inline void tile_scores(const float* Q, const float* Kt, float* S) {
  constexpr int64_t D = 16 * DC;
  __m512 a[2 * NR];
  for (auto& x : a) x = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 2) {
    const __m512 k0 = _mm512_load_ps(Kt + d * KEYS), k1 = _mm512_load_ps(Kt + (d + 1) * KEYS);
    for (int i = 0; i < NR; ++i) {
      a[2 * i] = _mm512_fmadd_ps(_mm512_set1_ps(Q[i * D + d]), k0, a[2 * i]);
      a[2 * i + 1] = _mm512_fmadd_ps(_mm512_set1_ps(Q[i * D + d + 1]), k1, a[2 * i + 1]);
    }
  }
  for (int i = 0; i < NR; ++i) _mm512_store_ps(S + i * BLOCK_KEYS, _mm512_add_ps(a[2 * i], a[2 * i + 1]));
}

// O[i] = O[i] * correction[i] + sum over k < keys of S[i][k] * values[k], for NR rows (stride D for O,
// BLOCK_KEYS for S): each value vector is loaded once for the NR rows, and NR * DC accumulators keep the
// FMA units busy where one row's DC would wait on each other's latency.
template <int64_t DC, int NR>
inline void weigh_values(float* O, const float* S, const float* correction, const float* const* values, int64_t keys) {
  constexpr int64_t D = 16 * DC;
  __m512 o[NR][DC];
  for (int i = 0; i < NR; ++i)
    for (int64_t c = 0; c < DC; ++c) o[i][c] = _mm512_mul_ps(_mm512_load_ps(O + i * D + 16 * c), _mm512_set1_ps(correction[i]));
  for (int64_t k = 0; k < keys; ++k) {
    __m512 v[DC];
    for (int64_t c = 0; c < DC; ++c) v[c] = _mm512_loadu_ps(values[k] + 16 * c);
    for (int i = 0; i < NR; ++i) {
      const __m512 w = _mm512_set1_ps(S[i * BLOCK_KEYS + k]);
      for (int64_t c = 0; c < DC; ++c) o[i][c] = _mm512_fmadd_ps(w, v[c], o[i][c]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int64_t c = 0; c < DC; ++c) _mm512_store_ps(O + i * D + 16 * c, o[i][c]);
}

// One flash task's share of the work: a tile of one sequence's queries, a run of its kv heads and a range
// of its keys. `part` (when the keys are split across tasks) receives each row's running max, sum and
// unnormalised output instead of the attention output.
struct FlashTask {
  int64_t b, h0, nh;  // sequence; first kv head and how many
  int64_t q0, nq;  // the tile's first query (of the sequence's new ones) and its count
  int64_t k0, k1;  // keys [k0, k1) of the tile's visible ones
  float* part;  // null: write the output; else [rows][D + 2] partials (m, l, O)
};

// Flash attention over the paged cache for head_dim = 16 * DC: keys are read in place, 64 at a time, and
// each (query, head) row keeps a running max, sum and output (online softmax), so a chunk at long context
// reads each key once per tile and never builds a score matrix. A task's kv heads are taken one after
// another within each 64-key block, so where it holds all of them (few rows: decodes) it reads the cache's
// [block_size, kv_heads, head_dim] blocks front to back instead of one head's slice at a time (a third of
// the bytes per pass, but the memory system fetches the neighbouring lines anyway). Few rows per head dot
// each key with a reduction; more rows (a prompt chunk) transpose each 16 keys once in registers and get
// 16 scores per row from D broadcast FMAs.
template <int64_t DC, typename T>
void flash_task(const FlashTask& task, const float* qp, const T* kp, const T* vp, float* op, const int64_t* table,
                int64_t bs, int64_t H, int64_t KVH, int64_t group, int64_t n, int64_t q_len, int64_t q_first,
                float scale) {
  constexpr int64_t D = 16 * DC;
  const int64_t RH = task.nq * group, R = task.nh * RH;  // rows per kv head, rows in all
  alignas(64) float Q[TILE_ROWS * D];
  alignas(64) float O[TILE_ROWS * D];
  alignas(64) float Kt[D * KEYS];
  alignas(64) float S[TILE_ROWS * BLOCK_KEYS];
  float m[TILE_ROWS], l[TILE_ROWS], correction[TILE_ROWS];
  int64_t seen[TILE_ROWS];  // keys of the current block each row sees
  constexpr int PV_ROWS = DC <= 4 ? 4 : 2;
  const float* keys[BLOCK_KEYS];
  const float* values[BLOCK_KEYS];
  // fp16 / bf16 caches: a block's keys and values converted once into fp32 here, read by every row from L1
  constexpr bool convert = !std::is_same_v<T, float>;
  alignas(64) float Kf[convert ? BLOCK_KEYS * D : 1];
  alignas(64) float Vf[convert ? BLOCK_KEYS * D : 1];
  auto query_head = [&](int64_t r) {  // row r: (query of the sequence, query head)
    const int64_t local = r % RH;
    return std::pair<int64_t, int64_t>{task.q0 + local / group, (task.h0 + r / RH) * group + local % group};
  };
  for (int64_t r = 0; r < R; ++r) {
    const auto [qi, h] = query_head(r);
    const float* src = qp + ((q_first + qi) * H + h) * D;
    for (int64_t c = 0; c < DC; ++c) {
      _mm512_store_ps(Q + r * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * c), _mm512_set1_ps(scale)));
      _mm512_store_ps(O + r * D + 16 * c, _mm512_setzero_ps());
    }
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t before = n - q_len + task.q0;  // keys before the tile's first query
  const bool transposed = RH >= TRANSPOSE_ROWS;
  for (int64_t j0 = task.k0; j0 < task.k1; j0 += BLOCK_KEYS) {
    const int64_t jn = std::min(BLOCK_KEYS, task.k1 - j0), tiles = (jn + KEYS - 1) / KEYS;
    for (int64_t hr = 0; hr < task.nh; ++hr) {
      const int64_t kvh = task.h0 + hr, r0 = hr * RH;
      for (int64_t k = 0; k < tiles * KEYS; ++k) {
        if (k >= jn) {
          keys[k] = values[k] = kZeroKey;
          continue;
        }
        const int64_t j = j0 + k, at = ((table[j / bs] * bs + j % bs) * KVH + kvh) * D;
        if constexpr (convert) {
          for (int64_t c = 0; c < DC; ++c) {
            _mm512_store_ps(Kf + k * D + 16 * c, load16(kp + at + 16 * c));
            _mm512_store_ps(Vf + k * D + 16 * c, load16(vp + at + 16 * c));
          }
          keys[k] = Kf + k * D;
          values[k] = Vf + k * D;
        } else {
          keys[k] = kp + at;
          values[k] = vp + at;
        }
      }
      if (transposed) {
        for (int64_t t = 0; t < tiles; ++t) {
          transpose_keys<DC>(keys + t * KEYS, Kt);
          float* St = S + t * KEYS;
          int64_t r = r0;
          for (; r + 4 <= r0 + RH; r += 4) tile_scores<DC, 4>(Q + r * D, Kt, St + r * BLOCK_KEYS);
          switch (r0 + RH - r) {
            case 3: tile_scores<DC, 3>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
            case 2: tile_scores<DC, 2>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
            case 1: tile_scores<DC, 1>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
            default: break;
          }
        }
      } else {
        for (int64_t r = r0; r < r0 + RH; ++r) {
          __m512 q[DC];
          for (int64_t c = 0; c < DC; ++c) q[c] = _mm512_load_ps(Q + r * D + 16 * c);
          for (int64_t k = 0; k < jn; ++k) {
            __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(keys[k]));
            for (int64_t c = 1; c < DC; ++c) a = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(keys[k] + 16 * c), a);
            S[r * BLOCK_KEYS + k] = _mm512_reduce_add_ps(a);
          }
        }
      }
      for (int64_t r = r0; r < r0 + RH; ++r) {
        const int64_t visible = std::min(jn, before + (r - r0) / group + 1 - j0);  // row r sees keys j0 .. j0 + visible - 1
        float* s = S + r * BLOCK_KEYS;
        const int64_t live_tiles = std::max<int64_t>(0, (visible + KEYS - 1) / KEYS);
        for (int64_t t = live_tiles; t < tiles; ++t) _mm512_store_ps(s + t * KEYS, _mm512_setzero_ps());
        seen[r] = std::max<int64_t>(0, visible);
        correction[r] = 1.f;
        if (visible <= 0) continue;
        auto live = [&](int64_t t) {
          const int64_t count = std::min(KEYS, visible - t * KEYS);
          return __mmask16(count >= 16 ? 0xFFFFu : (1u << count) - 1u);
        };
        __m512 top_lanes = _mm512_set1_ps(m[r]);
        for (int64_t t = 0; t < live_tiles; ++t)
          top_lanes = _mm512_mask_max_ps(top_lanes, live(t), top_lanes, _mm512_load_ps(s + t * KEYS));
        const float top = _mm512_reduce_max_ps(top_lanes);
        const __m512 shift = _mm512_set1_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < live_tiles; ++t) {
          const __m512 p = _mm512_maskz_mov_ps(live(t), exp16(_mm512_sub_ps(_mm512_load_ps(s + t * KEYS), shift)));
          _mm512_store_ps(s + t * KEYS, p);
          total = _mm512_add_ps(total, p);
        }
        correction[r] = std::exp(m[r] - top);  // 0 for the first block (m = -inf)
        l[r] = l[r] * correction[r] + _mm512_reduce_add_ps(total);
        m[r] = top;
      }
      // Weighted values, PV_ROWS rows at a time (each value vector loaded once for all of them, and
      // PV_ROWS * DC independent accumulators): past a row's visible keys its weights are 0.
      int64_t r = r0;
      for (; r + PV_ROWS <= r0 + RH; r += PV_ROWS)
        weigh_values<DC, PV_ROWS>(O + r * D, S + r * BLOCK_KEYS, correction + r, values,
                                  *std::max_element(seen + r, seen + r + PV_ROWS));
      for (; r < r0 + RH; ++r) weigh_values<DC, 1>(O + r * D, S + r * BLOCK_KEYS, correction + r, values, seen[r]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (task.part != nullptr) {
      float* dst = task.part + r * (D + 2);
      dst[0] = m[r];
      dst[1] = l[r];
      for (int64_t c = 0; c < DC; ++c) _mm512_storeu_ps(dst + 2 + 16 * c, _mm512_load_ps(O + r * D + 16 * c));
      continue;
    }
    const auto [qi, h] = query_head(r);
    float* dst = op + ((q_first + qi) * H + h) * D;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t c = 0; c < DC; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(O + r * D + 16 * c), inv));
  }
}

// The output of rows whose keys were split over `splits` tasks: their partials combined (log-sum-exp).
template <int64_t DC>
void merge_splits(const FlashTask* splits, int64_t count, float* op, int64_t H, int64_t group, int64_t q_first) {
  constexpr int64_t D = 16 * DC;
  const FlashTask& first = splits[0];
  const int64_t RH = first.nq * group;
  for (int64_t r = 0; r < first.nh * RH; ++r) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < count; ++s) top = std::max(top, splits[s].part[r * (D + 2)]);
    float total = 0.f;
    __m512 o[DC];
    for (auto& x : o) x = _mm512_setzero_ps();
    for (int64_t s = 0; s < count; ++s) {
      const float* p = splits[s].part + r * (D + 2);
      if (p[1] == 0.f) continue;  // this split held none of the row's keys
      const float w = std::exp(p[0] - top);
      total += w * p[1];
      for (int64_t c = 0; c < DC; ++c) o[c] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(p + 2 + 16 * c), o[c]);
    }
    const int64_t local = r % RH, qi = first.q0 + local / group, h = (first.h0 + r / RH) * group + local % group;
    float* dst = op + ((q_first + qi) * H + h) * D;
    const __m512 inv = _mm512_set1_ps(1.f / total);
    for (int64_t c = 0; c < DC; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(o[c], inv));
  }
}
#endif

std::vector<int64_t> flash_head_dims() {  // the head sizes paged_attention runs flash-style here
#if defined(__AVX512F__)
  return {64, 128};
#else
  return {};
#endif
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  return with_cache_type(k_cache, v_cache, [&](auto type) -> at::Tensor {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(type)>>;
#if defined(__AVX512F__)
    const int64_t D = q.size(2), group = q.size(1) / k_cache.size(2);
    if ((D == 64 || D == 128) && group <= TILE_ROWS && q.scalar_type() == at::kFloat && q.is_contiguous() &&
        k_cache.is_contiguous() && v_cache.is_contiguous()) {
      const int64_t H = q.size(1), bs = k_cache.size(1), KVH = k_cache.size(2), B = seq_lens.size(0);
      at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
      at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
      const int64_t *tab = tables.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>(), *qsl = starts.data_ptr<int64_t>();
      const int64_t width = tables.size(1), tile = TILE_ROWS / group;
      // Tasks: each sequence's queries in tiles of up to TILE_ROWS rows; a tile with few rows per kv head
      // takes as many kv heads as fit (all of them for decodes: the cache read front to back). Where that
      // leaves fewer tasks than threads, long contexts split their keys across tasks (flash-decoding),
      // at least MIN_SPLIT_KEYS each, and the splits' partials are merged after.
      const int64_t threads = at::get_num_threads();
      std::vector<FlashTask> tiles;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t q_len = qsl[b + 1] - qsl[b];
        for (int64_t q0 = 0; q0 < q_len && len[b] > 0; q0 += tile) {
          const int64_t nq = std::min(tile, q_len - q0);
          int64_t nh = std::min(KVH, TILE_ROWS / (nq * group));
          while (KVH % nh) --nh;
          for (int64_t h0 = 0; h0 < KVH; h0 += nh) tiles.push_back({b, h0, nh, q0, nq, 0, len[b] - q_len + q0 + nq, nullptr});
        }
      }
      const int64_t want = (threads + int64_t(tiles.size()) - 1) / std::max<int64_t>(1, int64_t(tiles.size()));
      std::vector<FlashTask> tasks;
      std::vector<std::array<int64_t, 2>> merges;  // (first task, count) of each split tile
      std::vector<int64_t> offsets;  // per task: where its partials start, in floats (-1: it writes the output)
      int64_t part_floats = 0;
      for (const FlashTask& t : tiles) {
        const int64_t splits = std::max<int64_t>(1, std::min(want, t.k1 / MIN_SPLIT_KEYS));
        if (splits == 1) {
          tasks.push_back(t);
          offsets.push_back(-1);
          continue;
        }
        const int64_t step = (t.k1 + splits * BLOCK_KEYS - 1) / (splits * BLOCK_KEYS) * BLOCK_KEYS;
        merges.push_back({int64_t(tasks.size()), 0});
        for (int64_t k0 = 0; k0 < t.k1; k0 += step) {
          FlashTask split = t;
          split.k0 = k0;
          split.k1 = std::min(t.k1, k0 + step);
          tasks.push_back(split);
          offsets.push_back(part_floats);
          part_floats += t.nh * t.nq * group * (D + 2);
          ++merges.back()[1];
        }
      }
      std::vector<float> parts(part_floats);
      for (size_t i = 0; i < tasks.size(); ++i)
        if (offsets[i] >= 0) tasks[i].part = parts.data() + offsets[i];
      at::Tensor out = at::empty_like(q);
      const float* qp = q.data_ptr<float>();
      const T *kp = static_cast<const T*>(k_cache.data_ptr()), *vp = static_cast<const T*>(v_cache.data_ptr());
      float* op = out.data_ptr<float>();
      at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const FlashTask& t = tasks[i];
          (D == 64 ? flash_task<4, T> : flash_task<8, T>)(t, qp, kp, vp, op, tab + t.b * width, bs, H, KVH, group,
                                                          len[t.b], qsl[t.b + 1] - qsl[t.b], qsl[t.b], float(scale));
        }
      });
      at::parallel_for(0, int64_t(merges.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const FlashTask* first = tasks.data() + merges[i][0];
          (D == 64 ? merge_splits<4> : merge_splits<8>)(first, merges[i][1], op, H, group, qsl[first->b]);
        }
      });
      return out;
    }
#endif
    return paged_attention_generic<T>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale);
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_fp32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1, "gate_up must be [T, 2I] with unit stride");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({T, I}, gate_up.options());
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gate_up.data_ptr<float>() + t * gate_up.stride(0);
      float* o = out.data_ptr<float>() + t * I;
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * g[I + i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minerva_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor)", rms_norm);
  m.def("rope_write_kv(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor inv_freq, float mscale, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> Tensor", rope_write_kv);
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale) -> Tensor", paged_attention);
  m.def("flash_head_dims() -> int[]", flash_head_dims);
  m.def("silu_and_mul(Tensor gate_up) -> Tensor", silu_and_mul);
}
