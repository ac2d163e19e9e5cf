/* One decode step of attention over full-precision float32 keys and values: a layer whose slots are
 * all float32 (eviction methods: the window is the layer), or a ragged store (AdaKV: each head its own
 * number of slots) followed by the window.
 *
 * Logits, the mask of the layer's slots, softmax and the value mix in one call per layer, the attention
 * each slot received added up only when a scorer observes it (H2O, TOVA, SnapKV's window): the weights a
 * scorer reads are those of the step's own pass, never a second one. Evicted-but-held slots are masked
 * here instead of building a (rows, slots) boolean mask for sdpa, and ragged heads are read where they
 * are held, never copied into a padded view. One thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "softmax.h"

/* q (BH, G, D): the G query rows that read one KV head. Slots [stored part | window]:
 * - the stored part (AdaKV's ragged heads), L slots per (row, head), of which head i holds lengths[i]
 *   at keys[i], values[i] ((lengths[i], D) each; the rest of the L are padding, never read); L = 0 and
 *   NULL arrays when there is none;
 * - the window: W slots (W, D) per (row, head) at wk, wv + i * wstride.
 * allow (BH, L + W) uint8 or NULL (every slot real; the last slot, the query's own token, is always
 * allowed); scaling: the softmax scale. Writes out (BH, G, D) and, unless observed is NULL, adds to
 * observed[bh * ostride + s] the attention slot s received (observe_into: the mean over the G rows). */
int dense_attend(const float *restrict q, const float *const *keys, const float *const *values, const int64_t *lengths,
                 int64_t L, const float *wk, const float *wv, int64_t wstride, int64_t W, const uint8_t *allow,
                 float scaling, float *restrict out, float *observed, int64_t ostride, int64_t BH, int64_t G,
                 int64_t D) {
    const int64_t S = L + W;
    float *logits = malloc(sizeof(float) * G * S + S);
    if (!logits) return 1;
    uint8_t *mask = (uint8_t *)(logits + G * S);
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        float *ob = out + bh * G * D;
        const int64_t n = L ? lengths[bh] : 0, T = n + W; /* the head's slots without padding (head_mask) */
        const uint8_t *a = head_mask(allow ? allow + bh * S : NULL, n, L, W, mask);
        if (n) logits_of(qb, keys[bh], logits, T, G, D, n);
        if (W) logits_of(qb, wk + bh * wstride, logits + n, T, G, D, W);
        for (int64_t j = 0; j < G; ++j) softmax_row(logits + j * T, T, scaling, a);
        if (observed) observe_head(logits, G, n, L, W, a, observed + bh * ostride);
        memset(ob, 0, sizeof(float) * G * D);
        if (n) mix_into(logits, T, values[bh], ob, G, D, n);
        if (W) mix_into(logits + n, T, wv + bh * wstride, ob, G, D, W);
    }
    free(logits);
    return 0;
}

/* One chunk of a prompt's observed queries (H2O's prompt, SnapKV's window), in place over the chunk's
 * logits, already scaled: e (BH, G, c, n), the G query rows of each KV head for c queries that are the
 * last c of n slots (query i sees slots up to n - c + i, its own token). Each row: masked where
 * allow (BH, c, n) uint8 is 0 (NULL: causal only), softmax, the slots after the query's own token set
 * to 0 (so a matrix product with the values gives the output); then observed[bh * ostride + s] +=
 * weigh[bh * c + i] * row[s]. Each row is read three times (maximum, exponent, normalize and observe)
 * while it sits in the cache, instead of once per torch operation from memory. */
void observe_rows(float *restrict e, const uint8_t *allow, const float *restrict weigh, float *restrict observed,
                  int64_t ostride, int64_t BH, int64_t G, int64_t c, int64_t n) {
    for (int64_t bh = 0; bh < BH; ++bh) {
        float *restrict o = observed + bh * ostride;
        for (int64_t g = 0; g < G; ++g)
            for (int64_t i = 0; i < c; ++i) {
                float *restrict x = e + ((bh * G + g) * c + i) * n;
                const int64_t len = n - c + i + 1;
                if (allow) {
                    const uint8_t *a = allow + (bh * c + i) * n;
                    for (int64_t s = 0; s < len - 1; ++s)
                        if (!a[s]) x[s] = -INFINITY; /* the query's own token is always seen */
                }
                memset(x + len, 0, sizeof(float) * (n - len));
                const float inv = 1.f / row_exp(x, len, row_max(x, len));
                row_scale_add(x, o, len, inv, weigh[bh * c + i]);
            }
    }
}

/* One decode step over float32 slots held in pages of P slots (kvcompress.paged): each (row, head) bh reads
 * npages[bh] pages, page j's keys and values the (P, D) blocks at kp[bh * J + j] and vp[bh * J + j], the
 * last page holding fill[bh] slots; its slot s = j * P + t (T = (npages[bh] - 1) * P + fill[bh] of them).
 * Rows may differ in length and pages (varlen). allow (BH, astride) uint8 or NULL (every slot real; the
 * last slot, the query's own token, is always allowed). Writes out (BH, G, D) and, unless observed is NULL,
 * adds to observed[bh * ostride + s] the attention slot s received (the mean over the G rows). */
int paged_attend(const float *restrict q, const float *const *kp, const float *const *vp, int64_t J,
                 const int64_t *npages, const int64_t *fill, int64_t P, const uint8_t *allow, int64_t astride,
                 float scaling, float *restrict out, float *observed, int64_t ostride, int64_t BH, int64_t G,
                 int64_t D) {
    float *logits = malloc(sizeof(float) * G * J * P + 1);
    if (!logits) return 1;
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        float *ob = out + bh * G * D;
        const float *const *kb = kp + bh * J, *const *vb = vp + bh * J;
        const int64_t pages = npages[bh], T = pages ? (pages - 1) * P + fill[bh] : 0;
        const uint8_t *a = allow ? allow + bh * astride : NULL;
        memset(ob, 0, sizeof(float) * G * D);
        if (!T) continue;
        for (int64_t j = 0; j < pages; ++j) logits_of(qb, kb[j], logits + j * P, T, G, D, j + 1 < pages ? P : fill[bh]);
        for (int64_t g = 0; g < G; ++g) softmax_row(logits + g * T, T, scaling, a);
        if (observed) observe_into(logits, T, G, T, observe_weight(a, T, G), observed + bh * ostride);
        for (int64_t j = 0; j < pages; ++j) mix_into(logits + j * P, T, vb[j], ob, G, D, j + 1 < pages ? P : fill[bh]);
    }
    free(logits);
    return 0;
}
