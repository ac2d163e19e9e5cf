/* The decode step of eviction one token at a time (H2O, TOVA: block = 1; StreamingLLM): in every (row, head)
 * that holds one valid slot more than its budget, drop the valid slot with the lowest score outside the
 * protected ones (the first `sink` valid slots and the newest recent[i]), the newest of equal ones: what
 * ranking the slots and keeping the best `budget` would keep, in one scan instead of a dozen tensor
 * operations per layer and step. Without scores, the oldest slot outside the protected ones goes (what
 * StreamingLLM's age rule drops). The plain-PyTorch references are
 * kvcompress.methods.budgets.lowest_slot and StreamingLLM's age rule.
 */
#include <math.h>
#include <stdint.h>

/* valid: (BH, S) rows `stride` apart (a view of a buffer with spare capacity); keep: (BH, S) contiguous,
 * starting as a copy of valid. scores: (BH, S), or NULL: the oldest slot outside the protected ones goes.
 * budget, recent: (BH,), or NULL for `budget_all`, `recent_all` in every head. Returns the number of
 * slots dropped, or -1 (nothing written) when some head holds more than one slot over its budget: the
 * caller then ranks. */
static int64_t count_valid(const uint8_t *v, int64_t S) {
    int64_t count = 0;
    for (int64_t s = 0; s < S; ++s) count += v[s] != 0;
    return count;
}

int drop_lowest(const float *scores, const uint8_t *valid, int64_t stride, uint8_t *keep, const int64_t *budget,
                int64_t budget_all, const int64_t *recent, int64_t recent_all, int64_t sink, int64_t BH, int64_t S) {
    for (int64_t i = 0; i < BH; ++i)
        if (count_valid(valid + i * stride, S) - (budget ? budget[i] : budget_all) > 1) return -1;
    int dropped = 0;
    for (int64_t i = 0; i < BH; ++i) {
        const uint8_t *v = valid + i * stride;
        const int64_t count = count_valid(v, S);
        if (count <= (budget ? budget[i] : budget_all)) continue;
        const int64_t last = count - (recent ? recent[i] : recent_all); /* ages [sink, last) may go */
        float lowest = INFINITY;
        int64_t at = -1;
        for (int64_t s = 0, age = 0; s < S; ++s) {
            if (!v[s]) continue;
            if (age >= last) break;
            const float score = scores ? scores[i * S + s] : 0.0f;
            if (age >= sink && score <= lowest) {
                lowest = score;
                at = s;
                if (!scores) break; /* no scores: the oldest that may go */
            }
            ++age;
        }
        if (at >= 0 && lowest < INFINITY) {
            keep[i * S + at] = 0;
            ++dropped;
        }
    }
    return dropped;
}
