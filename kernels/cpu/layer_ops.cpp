// The small per-layer ops of a CPU decode step, each one call instead of a dozen torch ops: at one
// stream a step is ~60 ops per layer, and their dispatch cost rivals the matmuls'. All fp32.
//   rms_norm:        out = w * s / sqrt(mean(s^2) + eps) with s = x (+ residual); returns (out, s).
//   rope_write_kv:   NeoX rotary on q and k (rotary_dim = 2 * len(inv_freq); cos/sin scaled by
//                    mscale), rotated k and v scattered into the paged caches by slot (< 0: skip).
//   paged_attention: causal attention of each sequence's new queries over its paged keys (GQA),
//                    read in place from the cache blocks: no gather, no padding. With AVX-512 and
//                    head_dim 64 or 128, flash-style (online softmax over 64-key blocks), so a prompt
//                    chunk at long context costs its FLOPs, not copies of the context.
//   silu_and_mul:    silu(gate) * up on a [T, 2I] tensor laid out [gate | up].
// Numerics: fp32 throughout like kernels/reference.py, summed in a different order.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float* y, float a, const float* x, int64_t n) {  // y += a * x
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
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
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &k_cache, &v_cache}) check_fp32(*t, "q, k, v and the caches");
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
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> cs(2 * half);
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
        float* kd = kc + (sl[t] * KVH + h) * D;
        float* vd = vc + (sl[t] * KVH + h) * D;
        rotate(kp + t * k.stride(0) + h * k.stride(1), kd);
        const float* vs = vp + t * v.stride(0) + h * v.stride(1);
        for (int64_t i = 0; i < D; ++i) vd[i] = vs[i];
      }
    }
  });
  return out;
}

at::Tensor paged_attention_generic(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache}) check_fp32(*t, "q and the caches");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous q and caches");
  const int64_t H = q.size(1), D = q.size(2), bs = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t B = seq_lens.size(0), group = H / KVH;
  at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
  const int64_t *tab = tables.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>(), *qsl = starts.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  at::Tensor out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
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
        const float* key = kp + (slot * KVH + kvh) * D;
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
        const float* value = vp + (slot * KVH + kvh) * D;
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
constexpr int64_t TILE_ROWS = 64;  // (query, head) rows per task: their outputs stay in L1
constexpr int64_t TRANSPOSE_ROWS = 6;  // from this many rows a transposed key tile pays for itself
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

// Flash attention over the paged cache for head_dim = 16 * DC: one task is (sequence, kv head, a tile
// of queries); keys are read in place, 64 at a time, and each (query, head) row keeps a running max,
// sum and output (online softmax), so a chunk at long context reads each key once per kv head and
// never builds a score matrix. Few rows (decode) dot each key with a reduction; more rows (a prompt
// chunk) transpose each 16 keys once in registers and get 16 scores per row from D broadcast FMAs.
template <int64_t DC>
void flash_task(const float* qp, const float* kp, const float* vp, float* op, const int64_t* table, int64_t bs,
                int64_t H, int64_t KVH, int64_t kvh, int64_t group, int64_t n, int64_t q_len, int64_t q_first,
                int64_t q0, int64_t nq, float scale) {
  constexpr int64_t D = 16 * DC;
  const int64_t R = nq * group;
  alignas(64) float Q[TILE_ROWS * D];
  alignas(64) float O[TILE_ROWS * D];
  alignas(64) float Kt[D * KEYS];
  alignas(64) float S[TILE_ROWS * BLOCK_KEYS];
  float m[TILE_ROWS], l[TILE_ROWS];
  const float* keys[BLOCK_KEYS];
  const float* values[BLOCK_KEYS];
  for (int64_t r = 0; r < R; ++r) {
    const float* src = qp + ((q_first + q0 + r / group) * H + kvh * group + r % group) * D;
    for (int64_t c = 0; c < DC; ++c) {
      _mm512_store_ps(Q + r * D + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(src + 16 * c), _mm512_set1_ps(scale)));
      _mm512_store_ps(O + r * D + 16 * c, _mm512_setzero_ps());
    }
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t before = n - q_len + q0;  // keys before the tile's first query
  const int64_t end = before + nq;  // keys the tile's last query sees
  const bool transposed = R >= TRANSPOSE_ROWS;
  for (int64_t j0 = 0; j0 < end; j0 += BLOCK_KEYS) {
    const int64_t jn = std::min(BLOCK_KEYS, end - j0), tiles = (jn + KEYS - 1) / KEYS;
    for (int64_t k = 0; k < tiles * KEYS; ++k) {
      const int64_t j = j0 + k, slot = k < jn ? table[j / bs] * bs + j % bs : 0;
      keys[k] = k < jn ? kp + (slot * KVH + kvh) * D : kZeroKey;
      values[k] = k < jn ? vp + (slot * KVH + kvh) * D : kZeroKey;
    }
    if (transposed) {
      for (int64_t t = 0; t < tiles; ++t) {
        transpose_keys<DC>(keys + t * KEYS, Kt);
        float* St = S + t * KEYS;
        int64_t r = 0;
        for (; r + 4 <= R; r += 4) tile_scores<DC, 4>(Q + r * D, Kt, St + r * BLOCK_KEYS);
        switch (R - r) {
          case 3: tile_scores<DC, 3>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
          case 2: tile_scores<DC, 2>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
          case 1: tile_scores<DC, 1>(Q + r * D, Kt, St + r * BLOCK_KEYS); break;
          default: break;
        }
      }
    } else {
      for (int64_t r = 0; r < R; ++r) {
        __m512 q[DC];
        for (int64_t c = 0; c < DC; ++c) q[c] = _mm512_load_ps(Q + r * D + 16 * c);
        for (int64_t k = 0; k < jn; ++k) {
          __m512 a = _mm512_mul_ps(q[0], _mm512_loadu_ps(keys[k]));
          for (int64_t c = 1; c < DC; ++c) a = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(keys[k] + 16 * c), a);
          S[r * BLOCK_KEYS + k] = _mm512_reduce_add_ps(a);
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t visible = std::min(jn, before + r / group + 1 - j0);  // row r sees keys j0 .. j0 + visible - 1
      if (visible <= 0) continue;
      float* s = S + r * BLOCK_KEYS;
      const int64_t live_tiles = (visible + KEYS - 1) / KEYS;
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
      const float correction = std::exp(m[r] - top);  // 0 for the first block (m = -inf)
      l[r] = l[r] * correction + _mm512_reduce_add_ps(total);
      m[r] = top;
      __m512 o[DC];
      for (int64_t c = 0; c < DC; ++c) o[c] = _mm512_mul_ps(_mm512_load_ps(O + r * D + 16 * c), _mm512_set1_ps(correction));
      for (int64_t k = 0; k < visible; ++k) {
        const __m512 wk = _mm512_set1_ps(s[k]);
        for (int64_t c = 0; c < DC; ++c) o[c] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(values[k] + 16 * c), o[c]);
      }
      for (int64_t c = 0; c < DC; ++c) _mm512_store_ps(O + r * D + 16 * c, o[c]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    float* dst = op + ((q_first + q0 + r / group) * H + kvh * group + r % group) * D;
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    for (int64_t c = 0; c < DC; ++c) _mm512_storeu_ps(dst + 16 * c, _mm512_mul_ps(_mm512_load_ps(O + r * D + 16 * c), inv));
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
#if defined(__AVX512F__)
  const int64_t D = q.size(2), group = q.size(1) / k_cache.size(2);
  if ((D == 64 || D == 128) && group <= TILE_ROWS && q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
      v_cache.scalar_type() == at::kFloat && q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous()) {
    const int64_t H = q.size(1), bs = k_cache.size(1), KVH = k_cache.size(2), B = seq_lens.size(0);
    at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
    at::Tensor starts = query_start_loc.to(at::kLong).contiguous();
    const int64_t *tab = tables.data_ptr<int64_t>(), *len = lens.data_ptr<int64_t>(), *qsl = starts.data_ptr<int64_t>();
    const int64_t width = tables.size(1), tile = TILE_ROWS / group;
    std::vector<std::array<int64_t, 3>> tasks;  // (sequence, kv head, first query of the tile)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t q0 = 0; q0 < qsl[b + 1] - qsl[b] && len[b] > 0; q0 += tile)
        for (int64_t kvh = 0; kvh < KVH; ++kvh) tasks.push_back({b, kvh, q0});
    at::Tensor out = at::empty_like(q);
    const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const auto [b, kvh, q0] = tasks[t];
        const int64_t q_len = qsl[b + 1] - qsl[b], nq = std::min(tile, q_len - q0);
        (D == 64 ? flash_task<4> : flash_task<8>)(qp, kp, vp, op, tab + b * width, bs, H, KVH, kvh, group, len[b],
                                                  q_len, qsl[b], q0, nq, float(scale));
      }
    });
    return out;
  }
#endif
  return paged_attention_generic(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale);
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
