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
