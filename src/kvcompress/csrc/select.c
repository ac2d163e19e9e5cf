/* The decode step of eviction one token at a time (H2O, TOVA: block = 1): in every (row, head) that holds
 * one valid slot more than its budget, drop the valid slot with the lowest score outside the protected
 * ones (the first `sink` valid slots and the newest recent[i]), the newest of equal ones: what ranking
 * the slots and keeping the best `budget` would keep, in one scan instead of a dozen tensor operations
 * per layer and step. The plain-PyTorch reference is kvcompress.methods.budgets.lowest_slot.
 */
#include <math.h>
#include <stdint.h>

/* scores, valid, keep: (BH, S); budget, recent: (BH,). keep starts as a copy of valid.
 * Returns the number of slots dropped, or -1 (nothing written) when some head holds more than one
 * slot over its budget: the caller then ranks. */
int drop_lowest(const float *scores, const uint8_t *valid, uint8_t *keep, const int64_t *budget,
                const int64_t *recent, int64_t sink, int64_t BH, int64_t S) {
    for (int64_t i = 0; i < BH; ++i) {
        int64_t count = 0;
        for (int64_t s = 0; s < S; ++s) count += valid[i * S + s] != 0;
        if (count - budget[i] > 1) return -1;
    }
    int dropped = 0;
    for (int64_t i = 0; i < BH; ++i) {
        const uint8_t *v = valid + i * S;
        const float *score = scores + i * S;
        int64_t count = 0;
        for (int64_t s = 0; s < S; ++s) count += v[s] != 0;
        if (count <= budget[i]) continue;
        const int64_t last = count - recent[i]; /* ages [sink, last) may go */
        float lowest = INFINITY;
        int64_t at = -1;
        for (int64_t s = 0, age = 0; s < S; ++s) {
            if (!v[s]) continue;
            if (age >= sink && age < last && score[s] <= lowest) {
                lowest = score[s];
                at = s;
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
