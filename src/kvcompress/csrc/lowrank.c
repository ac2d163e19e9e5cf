/* Attention logits over lowrank's stored keys without writing the keys out: for each stored token,
 * its group's keys are rebuilt from the latent (mean + basis x latent) into a scratch row that stays
 * in the L1 cache, rotated to the token's position and multiplied with the query rows. The torch path
 * writes every rebuilt key, then reads it back to rotate it and again to multiply it: three passes
 * over (N, D) floats per head and step where this reads N latents of r floats. One thread.
 *
 * The rebuild is r multiply-adds per key dimension, so this is bound by arithmetic, not memory: on
 * SmolLM2 (E = 192 dims per layer, r = 48 by default, 96 at ratio=0.5), about one 16-wide
 * multiply-add per cycle.
 *
 * Rotation is the half-split RoPE of Llama-style models: for d < D/2,
 *   rot[d] = k[d] cos[d] - k[d + D/2] sin[d],  rot[d + D/2] = k[d + D/2] cos[d + D/2] + k[d] sin[d + D/2].
 */
#include <stdint.h>
#include <stdlib.h>

#ifdef __AVX512F__
#include <immintrin.h>

/* k[0 .. 16 NV) = mean + sum_i c[i] ut[i * E + ...]: NV independent accumulators (a constant at each
 * call, so they stay in registers), enough of them that the multiply-adds do not wait on each other. */
static inline void rebuild_part(const int NV, const float *restrict c, int64_t r, const float *restrict ut, int64_t E,
                                const float *restrict mean, float *restrict k) {
    __m512 acc[12];
    for (int v = 0; v < NV; ++v) acc[v] = _mm512_loadu_ps(mean + 16 * v);
    for (int64_t i = 0; i < r; ++i) {
        const __m512 ci = _mm512_set1_ps(c[i]);
        const float *u = ut + i * E;
        for (int v = 0; v < NV; ++v) acc[v] = _mm512_fmadd_ps(ci, _mm512_loadu_ps(u + 16 * v), acc[v]);
    }
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(k + 16 * v, acc[v]);
}

/* rebuild_part for two tokens at once: each basis vector is loaded once for both. */
static inline void rebuild_pair(const int NV, const float *restrict c, const float *restrict c2, int64_t r,
                                const float *restrict ut, int64_t E, const float *restrict mean, float *restrict k,
                                float *restrict k2) {
    __m512 acc[12], acc2[12];
    for (int v = 0; v < NV; ++v) acc[v] = acc2[v] = _mm512_loadu_ps(mean + 16 * v);
    for (int64_t i = 0; i < r; ++i) {
        const __m512 ci = _mm512_set1_ps(c[i]), ci2 = _mm512_set1_ps(c2[i]);
        const float *u = ut + i * E;
        for (int v = 0; v < NV; ++v) {
            const __m512 x = _mm512_loadu_ps(u + 16 * v);
            acc[v] = _mm512_fmadd_ps(ci, x, acc[v]);
            acc2[v] = _mm512_fmadd_ps(ci2, x, acc2[v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        _mm512_storeu_ps(k + 16 * v, acc[v]);
        _mm512_storeu_ps(k2 + 16 * v, acc2[v]);
    }
}

/* The R logits of one head's rebuilt key k (D floats, D / 2 a multiple of 16) at the tables' row. */
static inline void head_logits(const float *restrict k, const float *restrict cs, const float *restrict sn,
                               const float *restrict q, int64_t R, int64_t D, float *restrict out, int64_t N) {
    const int64_t half = D / 2;
    for (int64_t j0 = 0; j0 < R; j0 += 4) {
        const int64_t rows = R - j0 < 4 ? R - j0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t d = 0; d < half; d += 16) {
            const __m512 lo = _mm512_loadu_ps(k + d), hi = _mm512_loadu_ps(k + half + d);
            const __m512 rlo = _mm512_fnmadd_ps(hi, _mm512_loadu_ps(sn + d), _mm512_mul_ps(lo, _mm512_loadu_ps(cs + d)));
            const __m512 rhi = _mm512_fmadd_ps(lo, _mm512_loadu_ps(sn + half + d), _mm512_mul_ps(hi, _mm512_loadu_ps(cs + half + d)));
            for (int64_t j = 0; j < rows; ++j) {
                const float *qj = q + (j0 + j) * D;
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qj + d), rlo, acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qj + half + d), rhi, acc[j]);
            }
        }
        for (int64_t j = 0; j < rows; ++j) out[(j0 + j) * N] = _mm512_reduce_add_ps(acc[j]);
    }
}
#endif

/* k (E) = mean + sum_i c[i] ut[i * E + ...], and k2 from c2 when c2 is not NULL. */
static void rebuild(const float *restrict c, const float *restrict c2, int64_t r, const float *restrict ut, int64_t E,
                    const float *restrict mean, float *restrict k, float *restrict k2) {
    int64_t e = 0;
#ifdef __AVX512F__
    if (E % 16 == 0) {
        if (c2)
            for (; e + 192 <= E; e += 192) rebuild_pair(12, c, c2, r, ut + e, E, mean + e, k + e, k2 + e);
        for (; e + 64 <= E; e += 64) rebuild_part(4, c, r, ut + e, E, mean + e, k + e);
        for (; e + 16 <= E; e += 16) rebuild_part(1, c, r, ut + e, E, mean + e, k + e);
        if (c2) /* what the pairs did not cover */
            for (int64_t f = E - E % 192; f < E; f += 16) rebuild_part(1, c2, r, ut + f, E, mean + f, k2 + f);
        if (e == E) return;
    }
#endif
    for (int64_t d = e; d < E; ++d) k[d] = mean[d];
    for (int64_t i = 0; i < r; ++i)
        for (int64_t d = e; d < E; ++d) k[d] += c[i] * ut[i * E + d];
    if (c2) rebuild(c2, NULL, r, ut, E, mean, k2, NULL);
}

/* The R logits of one head's rebuilt key kh (D floats) at position p. */
static void key_logits(const float *restrict kh, int64_t p, const float *restrict cs, const float *restrict sn,
                       const float *restrict qh, float *restrict o, int64_t R, int64_t N, int64_t D) {
    const int64_t half = D / 2;
    const float *cp = cs + p * D, *sp = sn + p * D;
#ifdef __AVX512F__
    if (half % 16 == 0) {
        head_logits(kh, cp, sp, qh, R, D, o, N);
        return;
    }
#endif
    for (int64_t row = 0; row < R; ++row) {
        float sum = 0.f;
        for (int64_t d = 0; d < half; ++d)
            sum += qh[row * D + d] * (kh[d] * cp[d] - kh[d + half] * sp[d]) +
                   qh[row * D + half + d] * (kh[d + half] * cp[d + half] + kh[d] * sp[d + half]);
        o[row * N] = sum;
    }
}

static inline int64_t clamp(int64_t p, int64_t P) { return p < 0 ? 0 : (p >= P ? P - 1 : p); }

/* q (B, H, R, D): R query rows per KV head. Latents: row b, group g, token s at z + b * zb + g * zg + s * zs
 * (r floats). ut (G, r, E), the groups' bases transposed (E = D H / G: a group's heads side by side);
 * mean (G, E). pos: the int32 position of row b, head h, token s at pos[(b * H + h) * ps + s] (ps >= N: a view of
 * a buffer with room for more), clamped to the tables' P rows; cs, sn (P, D) rotary
 * tables. Writes out (B, H, R, N). Tokens go in pairs, which share each load of the basis. Returns 1
 * when it cannot allocate its scratch rows. */
int lowrank_logits(const float *restrict q, const float *restrict z, int64_t zb, int64_t zg, int64_t zs,
                   const float *restrict ut, const float *restrict mean, const int32_t *restrict pos, int64_t ps,
                   const float *restrict cs, const float *restrict sn, int64_t P, float *restrict out, int64_t B,
                   int64_t H, int64_t G, int64_t R, int64_t N, int64_t r, int64_t D) {
    const int64_t per_group = H / G, E = per_group * D;
    float *k = malloc(sizeof(float) * 2 * E);
    if (!k) return 1;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < G; ++g) {
            const float *ug = ut + g * r * E, *mg = mean + g * E;
            const int64_t bh = b * H + g * per_group; /* the group's first head */
            const int32_t *pg = pos + bh * ps;
            const float *qg = q + bh * R * D;
            float *og = out + bh * R * N;
            for (int64_t s = 0; s < N; s += 2) {
                const int pair = s + 1 < N;
                const float *c = z + b * zb + g * zg + s * zs;
                rebuild(c, pair ? c + zs : NULL, r, ug, E, mg, k, k + E);
                for (int64_t t = 0; t <= pair; ++t)
                    for (int64_t j = 0; j < per_group; ++j) /* heads of a group may hold other positions */
                        key_logits(k + t * E + j * D, clamp(pg[j * ps + s + t], P), cs, sn, qg + j * R * D,
                                   og + j * R * N + s + t, R, N, D);
            }
        }
    free(k);
    return 0;
}
