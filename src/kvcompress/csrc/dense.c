/* One decode step of attention over full-precision float32 keys and values: a layer whose slots are
 * all float32 (eviction methods: the window is the layer), or a ragged store (AdaKV: each head its own
 * number of slots) followed by the window.
 *
 * Logits, the mask of the layer's slots, softmax and the value mix in one call per layer, the attention
 * weights written out only when a scorer observes them (H2O, TOVA, SnapKV's window): the weights a
 * scorer reads are those of the step's own pass, never a second one. Evicted-but-held slots are masked
 * here instead of building a (rows, slots) boolean mask for sdpa, and ragged heads are read where they
 * are held, never copied into a padded view. One thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "softmax.h"

/* logits[j * ld + s] = q_j . k_s for G rows and n slots of keys (n, D). */
static void logits_of(const float *restrict qb, const float *restrict kb, float *restrict logits, int64_t ld,
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
static void mix_into(const float *restrict w, int64_t ld, const float *restrict vb, float *restrict ob, int64_t G,
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

/* q (BH, G, D): the G query rows that read one KV head. Slots [stored part | window]:
 * - the stored part (AdaKV's ragged heads), L slots per (row, head), of which head i holds lengths[i]
 *   at keys[i], values[i] ((lengths[i], D) each; the rest of the L are padding, never read); L = 0 and
 *   NULL arrays when there is none;
 * - the window: W slots (W, D) per (row, head) at wk, wv + i * wstride.
 * allow (BH, L + W) uint8 or NULL (every slot real; the last slot, the query's own token, is always
 * allowed); scaling: the softmax scale. Writes out (BH, G, D) and, unless NULL, probs (BH, G, L + W). */
int dense_attend(const float *restrict q, const float *const *keys, const float *const *values, const int64_t *lengths,
                 int64_t L, const float *wk, const float *wv, int64_t wstride, int64_t W, const uint8_t *allow,
                 float scaling, float *restrict out, float *probs, int64_t BH, int64_t G, int64_t D) {
    const int64_t S = L + W;
    float *logits = malloc(sizeof(float) * G * S);
    if (!logits) return 1;
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        float *ob = out + bh * G * D;
        const int64_t n = L ? lengths[bh] : 0;
        if (n) logits_of(qb, keys[bh], logits, S, G, D, n);
        for (int64_t j = 0; j < G; ++j)
            for (int64_t s = n; s < L; ++s) logits[j * S + s] = -INFINITY; /* padding of a shorter head */
        if (W) logits_of(qb, wk + bh * wstride, logits + L, S, G, D, W);
        for (int64_t j = 0; j < G; ++j) softmax_row(logits + j * S, S, scaling, allow ? allow + bh * S : NULL);
        if (probs) memcpy(probs + bh * G * S, logits, sizeof(float) * G * S);
        memset(ob, 0, sizeof(float) * G * D);
        if (n) mix_into(logits, S, values[bh], ob, G, D, n);
        if (W) mix_into(logits + L, S, wv + bh * wstride, ob, G, D, W);
    }
    free(logits);
    return 0;
}
