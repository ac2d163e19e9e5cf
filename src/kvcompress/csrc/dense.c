/* One decode step of attention over full-precision keys and values, for layers whose slots are all
 * float32 (eviction methods: the window is the whole layer).
 *
 * Logits, the mask of the layer's slots, softmax and the value mix in one call per layer, the attention
 * weights written out only when a scorer observes them (H2O, TOVA, SnapKV's window): the weights a
 * scorer reads are those of the step's own pass, never a second one. Evicted-but-held slots are masked
 * here instead of building a (rows, slots) boolean mask for sdpa. One thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "softmax.h"

/* q (BH, G, D): the G query rows that read one KV head; keys and values (S, D) per (row, head),
 * `stride` elements apart; allow (BH, S) uint8 or NULL (every slot real; the last slot, the query's own
 * token, is always allowed); scaling: the softmax scale. Writes out (BH, G, D) and, unless NULL,
 * probs (BH, G, S). */
int dense_attend(const float *restrict q, const float *restrict keys, const float *restrict values, int64_t stride,
                 const uint8_t *allow, float scaling, float *restrict out, float *probs, int64_t BH, int64_t G,
                 int64_t D, int64_t S) {
    float *logits = malloc(sizeof(float) * G * S);
    if (!logits) return 1;
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D, *kb = keys + bh * stride, *vb = values + bh * stride;
        float *ob = out + bh * G * D;
#ifdef __AVX2__
        if (D % 8 == 0 && G == 3) { /* the usual GQA decode shape: each key read once for the three rows */
            for (int64_t s = 0; s < S; ++s) {
                const float *k = kb + s * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 8) {
                    const __m256 x = _mm256_loadu_ps(k + d);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + d), x, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + D + d), x, a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 2 * D + d), x, a2);
                }
                logits[s] = hsum8(a0);
                logits[S + s] = hsum8(a1);
                logits[2 * S + s] = hsum8(a2);
            }
        } else
#endif
        for (int64_t s = 0; s < S; ++s)
            for (int64_t j = 0; j < G; ++j) logits[j * S + s] = dot(qb + j * D, kb + s * D, D);
        for (int64_t j = 0; j < G; ++j) softmax_row(logits + j * S, S, scaling, allow ? allow + bh * S : NULL);
        if (probs) memcpy(probs + bh * G * S, logits, sizeof(float) * G * S);
        memset(ob, 0, sizeof(float) * G * D);
#ifdef __AVX2__
        if (D % 32 == 0 && G == 3) { /* 32 channels at a time: three rows' accumulators stay in registers */
            for (int64_t d0 = 0; d0 < D; d0 += 32) {
                __m256 a[3][4];
                for (int r = 0; r < 3; ++r)
                    for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
                for (int64_t s = 0; s < S; ++s) {
                    const float *v = vb + s * D + d0;
                    const __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8), x2 = _mm256_loadu_ps(v + 16),
                                 x3 = _mm256_loadu_ps(v + 24);
                    for (int r = 0; r < 3; ++r) {
                        const __m256 w = _mm256_broadcast_ss(logits + r * S + s);
                        a[r][0] = _mm256_fmadd_ps(w, x0, a[r][0]);
                        a[r][1] = _mm256_fmadd_ps(w, x1, a[r][1]);
                        a[r][2] = _mm256_fmadd_ps(w, x2, a[r][2]);
                        a[r][3] = _mm256_fmadd_ps(w, x3, a[r][3]);
                    }
                }
                for (int r = 0; r < 3; ++r)
                    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(ob + r * D + d0 + 8 * v, a[r][v]);
            }
            continue;
        }
#endif
        for (int64_t j = 0; j < G; ++j) {
            float *restrict o = ob + j * D;
            const float *restrict p = logits + j * S;
            for (int64_t s = 0; s < S; ++s) {
                const float w = p[s];
                if (w == 0.f) continue; /* a masked slot */
                const float *restrict v = vb + s * D;
                for (int64_t d = 0; d < D; ++d) o[d] += w * v[d];
            }
        }
    }
    free(logits);
    return 0;
}
