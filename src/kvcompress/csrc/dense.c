/* One decode step of attention over full-precision float32 keys and values, held in pages (a layer of an
 * eviction method: kvcompress.paged; or ragged heads, each in its own pages: AdaKV, retrieval budgets)
 * and a window of recent tokens, either of them possibly absent.
 *
 * Logits, the mask of the layer's slots, softmax and the value mix in one call per layer, the attention
 * each slot received added up only when a scorer observes it (H2O, TOVA, SnapKV's window): the weights a
 * scorer reads are those of the step's own pass, never a second one. Evicted-but-held slots are masked
 * here instead of building a (rows, slots) boolean mask for sdpa, and pages are read where they are held
 * through the page tables, never copied into a padded view. One thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "softmax.h"

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

/* One decode step over float32 slots: a stored part held in pages of P slots, then a window.
 * - Stored part: each (row, head) bh reads npages[bh] pages, page j's keys and values the (P, D) blocks at
 *   kp[bh * J + j] and vp[bh * J + j], the last page holding fill[bh] slots: its n = (npages[bh] - 1) * P +
 *   fill[bh] slots are the first of the layer's L stored slots (a shorter head's padding, n .. L - 1, is
 *   never read: ragged heads). Rows may differ in length and pages (varlen). J = 0 and NULL arrays: none.
 * - Window: W slots (W, D) per (row, head) at wk, wv + bh * wstride (W = 0: none).
 * allow (BH, astride) uint8 over the L + W slots, or NULL (every slot real; the last slot, the query's own
 * token, is always allowed). Writes out (BH, G, D) (zeros for a (row, head) of no slot) and, unless
 * observed is NULL, adds to observed[bh * ostride + s] the attention slot s received (the mean over the G
 * rows). */
int paged_attend(const float *restrict q, const float *const *kp, const float *const *vp, int64_t J,
                 const int64_t *npages, const int64_t *fill, int64_t P, int64_t L, const float *wk, const float *wv,
                 int64_t wstride, int64_t W, const uint8_t *allow, int64_t astride, float scaling,
                 float *restrict out, float *observed, int64_t ostride, int64_t BH, int64_t G, int64_t D) {
    const int64_t most = (J * P > L ? J * P : L) + W; /* the most slots a head reads */
    float *logits = malloc(sizeof(float) * G * most + L + W + 1);
    if (!logits) return 1;
    uint8_t *mask = (uint8_t *)(logits + G * most);
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        float *ob = out + bh * G * D;
        const float *const *kb = kp + bh * J, *const *vb = vp + bh * J;
        const int64_t pages = J ? npages[bh] : 0, n = pages ? (pages - 1) * P + fill[bh] : 0, T = n + W;
        const uint8_t *a = head_mask(allow ? allow + bh * astride : NULL, n, L, W, mask);
        memset(ob, 0, sizeof(float) * G * D);
        if (!T) continue;
        for (int64_t j = 0; j < pages; ++j) logits_of(qb, kb[j], logits + j * P, T, G, D, j + 1 < pages ? P : fill[bh]);
        if (W) logits_of(qb, wk + bh * wstride, logits + n, T, G, D, W);
        for (int64_t g = 0; g < G; ++g) softmax_row(logits + g * T, T, scaling, a);
        if (observed) observe_head(logits, G, n, L, W, a, observed + bh * ostride);
        for (int64_t j = 0; j < pages; ++j) mix_into(logits + j * P, T, vb[j], ob, G, D, j + 1 < pages ? P : fill[bh]);
        if (W) mix_into(logits + n, T, wv + bh * wstride, ob, G, D, W);
    }
    free(logits);
    return 0;
}
