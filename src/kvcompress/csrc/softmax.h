/* What the attention kernels share: a vectorized e^x, dot products, logits and value mixing over
 * float32 keys and values (a layer's window, or all its slots), and the softmax of one row of logits
 * with the step's mask. Static inline: each kernel source includes it. */
#ifndef KVCOMPRESS_SOFTMAX_H
#define KVCOMPRESS_SOFTMAX_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
/* e^x of 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative
 * error under 2e-7), times 2^n through the exponent bits; 0 below -87 (so for -inf). */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts (Cody-Waite) */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

#ifdef __AVX512F__
/* exp8's method on 16 floats; 2^n through scalef. */
static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 seen = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_min_ps(x, _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_mov_ps(seen, _mm512_scalef_ps(p, n));
}
#endif

#ifdef __AVX2__
static inline float hsum8(__m256 x) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)));
}
#endif

static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    float sum = 0.f;
    int64_t d = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    sum = hsum8(acc);
#endif
    for (; d < n; ++d) sum += a[d] * b[d];
    return sum;
}

/* logits[j * ld + s] = q_j . k_s for G rows and n slots of keys (n, D). */
static inline void logits_of(const float *restrict qb, const float *restrict kb, float *restrict logits, int64_t ld,
                      int64_t G, int64_t D, int64_t n) {
#ifdef __AVX2__
    if (D % 8 == 0 && G == 3) { /* the usual GQA decode shape: each key read once for the three rows */
        for (int64_t s = 0; s < n; ++s) {
            const float *k = kb + s * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
            for (int64_t d = 0; d < D; d += 8) {
                const __m256 x = _mm256_loadu_ps(k + d);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + d), x, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + D + d), x, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 2 * D + d), x, a2);
            }
            logits[s] = hsum8(a0);
            logits[ld + s] = hsum8(a1);
            logits[2 * ld + s] = hsum8(a2);
        }
        return;
    }
#endif
    for (int64_t s = 0; s < n; ++s)
        for (int64_t j = 0; j < G; ++j) logits[j * ld + s] = dot(qb + j * D, kb + s * D, D);
}

/* out (G, D) += sum_s w[j * ld + s] v_s over n slots of values (n, D). */
static inline void mix_into(const float *restrict w, int64_t ld, const float *restrict vb, float *restrict ob, int64_t G,
                     int64_t D, int64_t n) {
#ifdef __AVX2__
    if (D % 32 == 0 && G == 3) { /* 32 channels at a time: three rows' accumulators stay in registers */
        for (int64_t d0 = 0; d0 < D; d0 += 32) {
            __m256 a[3][4];
            for (int r = 0; r < 3; ++r)
                for (int v = 0; v < 4; ++v) a[r][v] = _mm256_loadu_ps(ob + r * D + d0 + 8 * v);
            for (int64_t s = 0; s < n; ++s) {
                const float *v = vb + s * D + d0;
                const __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8), x2 = _mm256_loadu_ps(v + 16),
                             x3 = _mm256_loadu_ps(v + 24);
                for (int r = 0; r < 3; ++r) {
                    const __m256 p = _mm256_broadcast_ss(w + r * ld + s);
                    a[r][0] = _mm256_fmadd_ps(p, x0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(p, x1, a[r][1]);
                    a[r][2] = _mm256_fmadd_ps(p, x2, a[r][2]);
                    a[r][3] = _mm256_fmadd_ps(p, x3, a[r][3]);
                }
            }
            for (int r = 0; r < 3; ++r)
                for (int v = 0; v < 4; ++v) _mm256_storeu_ps(ob + r * D + d0 + 8 * v, a[r][v]);
        }
        return;
    }
#endif
    for (int64_t j = 0; j < G; ++j) {
        float *restrict o = ob + j * D;
        for (int64_t s = 0; s < n; ++s) {
            const float p = w[j * ld + s];
            if (p == 0.f) continue; /* a masked slot */
            const float *restrict v = vb + s * D;
            for (int64_t d = 0; d < D; ++d) o[d] += p * v[d];
        }
    }
}

/* The largest of n floats. */
static inline float row_max(const float *restrict x, int64_t n) {
    float top = -INFINITY;
    int64_t s = 0;
#ifdef __AVX512F__
    __m512 hi = _mm512_set1_ps(-INFINITY);
    for (; s + 16 <= n; s += 16) hi = _mm512_max_ps(hi, _mm512_loadu_ps(x + s));
    top = _mm512_reduce_max_ps(hi);
#elif defined(__AVX2__)
    __m256 hi = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= n; s += 8) hi = _mm256_max_ps(hi, _mm256_loadu_ps(x + s));
    float lanes[8];
    _mm256_storeu_ps(lanes, hi);
    for (int k = 0; k < 8; ++k) top = lanes[k] > top ? lanes[k] : top;
#endif
    for (; s < n; ++s) top = x[s] > top ? x[s] : top;
    return top;
}

/* x[s] = e^(x[s] - top) over n floats (0 for -inf); returns their sum. */
static inline float row_exp(float *restrict x, int64_t n, float top) {
    float sum = 0.f;
    int64_t s = 0;
#ifdef __AVX512F__
    const __m512 m = _mm512_set1_ps(top);
    __m512 acc = _mm512_setzero_ps();
    for (; s + 16 <= n; s += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + s), m));
        _mm512_storeu_ps(x + s, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    const __m256 m = _mm256_set1_ps(top);
    __m256 acc = _mm256_setzero_ps();
    for (; s + 8 <= n; s += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + s), m));
        _mm256_storeu_ps(x + s, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; s < n; ++s) {
        x[s] = expf(x[s] - top);
        sum += x[s];
    }
    return sum;
}

/* x[s] *= inv over n floats and, unless o is NULL, o[s] += w * x[s]. */
static inline void row_scale_add(float *restrict x, float *restrict o, int64_t n, float inv, float w) {
    int64_t s = 0;
#ifdef __AVX512F__
    const __m512 iv = _mm512_set1_ps(inv), wv = _mm512_set1_ps(w);
    for (; s + 16 <= n; s += 16) {
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(x + s), iv);
        _mm512_storeu_ps(x + s, p);
        if (o) _mm512_storeu_ps(o + s, _mm512_fmadd_ps(wv, p, _mm512_loadu_ps(o + s)));
    }
#elif defined(__AVX2__)
    const __m256 iv = _mm256_set1_ps(inv), wv = _mm256_set1_ps(w);
    for (; s + 8 <= n; s += 8) {
        const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + s), iv);
        _mm256_storeu_ps(x + s, p);
        if (o) _mm256_storeu_ps(o + s, _mm256_fmadd_ps(wv, p, _mm256_loadu_ps(o + s)));
    }
#endif
    for (; s < n; ++s) {
        x[s] *= inv;
        if (o) o[s] += w * x[s];
    }
}

/* The weight of one query's softmax rows in the attention its slots received: 1 / G for the mean over its
 * G rows, or 0 when allow (its n slots, or NULL) marks the query's own token, the last slot, as padding. */
static inline float observe_weight(const uint8_t *allow, int64_t n, int64_t G) {
    return (allow && !allow[n - 1]) ? 0.f : 1.f / (float)G;
}

/* The attention n slots received from G softmax rows (row stride ld), added to o:
 * o[s] += w * sum_j x[j * ld + s], w from observe_weight. */
static inline void observe_into(const float *restrict x, int64_t ld, int64_t G, int64_t n, float w, float *restrict o) {
    for (int64_t j = 0; j < G; ++j)
        for (int64_t s = 0; s < n; ++s) o[s] += w * x[j * ld + s];
}

/* A ragged head's slots are its own n of the layer's L stored slots, then the W window slots: T = n + W,
 * the padding of a shorter head (n .. L - 1) left out of its logits, softmax, observation and mix. Its
 * mask over those T slots: allow's (L + W, or NULL) first n and last W, in scratch when there is padding. */
static inline const uint8_t *head_mask(const uint8_t *allow, int64_t n, int64_t L, int64_t W, uint8_t *scratch) {
    if (!allow || n == L) return allow;
    memcpy(scratch, allow, n);
    memcpy(scratch + n, allow + L, W);
    return scratch;
}

/* The attention a ragged head's T = n + W slots received from its G softmax rows x (row stride T, mask a
 * from head_mask), added to its L + W slots of observation o: the stored ones at 0, the window at L (the
 * padding between keeps what it holds, as it received nothing). */
static inline void observe_head(const float *x, int64_t G, int64_t n, int64_t L, int64_t W, const uint8_t *a,
                                float *o) {
    const float w = observe_weight(a, n + W, G);
    if (n) observe_into(x, n + W, G, n, w, o);
    if (W) observe_into(x + n, n + W, G, W, w, o + L);
}

/* A row of n logits in place: scaled, masked slots (allow[i] == 0, never the last: the query's own
 * token) to -inf, then softmax. */
static inline void softmax_row(float *restrict x, int64_t n, float scaling, const uint8_t *allow) {
    float top = -INFINITY;
    int64_t i = 0;
#ifdef __AVX2__
    if (!allow) { /* every slot real: scale and take the maximum 8 at a time */
        const __m256 sc = _mm256_set1_ps(scaling);
        __m256 hi = _mm256_set1_ps(-INFINITY);
        for (; i + 8 <= n; i += 8) {
            const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + i), sc);
            _mm256_storeu_ps(x + i, y);
            hi = _mm256_max_ps(hi, y);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, hi);
        for (int k = 0; k < 8; ++k) top = lanes[k] > top ? lanes[k] : top;
    }
#endif
    for (; i < n; ++i) {
        x[i] = (allow && !allow[i] && i != n - 1) ? -INFINITY : x[i] * scaling;
        top = x[i] > top ? x[i] : top;
    }
    row_scale_add(x, NULL, n, 1.f / row_exp(x, n, top), 0.f);
}

#endif
