/* Attention over KIVI-quantized keys and values without rebuilding them in full precision.
 *
 * Codes are packed `per = 8 / bits` to a byte in slots: slot i of byte p holds channel i * P + p,
 * P = D / per, so each slot unpacks to a contiguous run of channels.
 *
 * Keys are quantized per channel over groups of `group` tokens: k[n][d] = c * s[n / group][d] + z[n / group][d].
 * They are stored channel-major, codes (P, N) per (row, head), so a group of tokens is contiguous for
 * every byte. Scales fold into the query: q . k[n] = sum_d (q[d] s[d]) c[n][d] + q . z.
 *
 * Values are quantized per token over groups of `group` channels: v[n][d] = c * s[n][d / group] + z[n][d / group].
 * They are stored token-major, codes (N, P). Scales fold into the weights:
 * sum_n w[n] v[n][d] = sum_n (w[n] s[n][e]) c[n][d] + sum_n w[n] z[n][e], e = d / group.
 *
 * Plain C99 loops written for the compiler to vectorize (-O3); one thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* q: (BH, G, D); codes: (BH, P, N); scale, minimum: (BH, N / group, D); out: (BH, G, N). */
int kivi_key_logits(const float *restrict q, const uint8_t *restrict codes, const float *restrict scale,
                    const float *restrict minimum, float *restrict out, int64_t BH, int64_t G, int64_t D,
                    int64_t N, int bits, int64_t group) {
    const int per = 8 / bits;
    const int64_t P = D / per, K = N / group;
    const unsigned mask = (1u << bits) - 1u;
    float *qs = malloc(sizeof(float) * G * D), *acc = malloc(sizeof(float) * G * group);
    if (!qs || !acc) { free(qs); free(acc); return 1; }
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D, *sb = scale + bh * K * D, *zb = minimum + bh * K * D;
        const uint8_t *cb = codes + bh * P * N;
        float *ob = out + bh * G * N;
        for (int64_t k = 0; k < K; ++k) {
            const float *s = sb + k * D, *z = zb + k * D;
            for (int64_t j = 0; j < G; ++j) {
                float qz = 0.f;
                for (int64_t d = 0; d < D; ++d) {
                    qs[j * D + d] = qb[j * D + d] * s[d];
                    qz += qb[j * D + d] * z[d];
                }
                for (int64_t t = 0; t < group; ++t) acc[j * group + t] = qz;
            }
            for (int64_t p = 0; p < P; ++p) {
                const uint8_t *row = cb + p * N + k * group;
                for (int i = 0; i < per; ++i) {
                    const int shift = bits * i;
                    for (int64_t j = 0; j < G; ++j) {
                        const float w = qs[j * D + i * P + p];
                        float *a = acc + j * group;
                        for (int64_t t = 0; t < group; ++t) a[t] += w * (float)((row[t] >> shift) & mask);
                    }
                }
            }
            for (int64_t j = 0; j < G; ++j) memcpy(ob + j * N + k * group, acc + j * group, sizeof(float) * group);
        }
    }
    free(qs);
    free(acc);
    return 0;
}

/* w: (BH, G, N); codes: (BH, N, P); scale, minimum: (BH, N, D / group); out: (BH, G, D). */
int kivi_value_mix(const float *restrict w, const uint8_t *restrict codes, const float *restrict scale,
                   const float *restrict minimum, float *restrict out, int64_t BH, int64_t G, int64_t D,
                   int64_t N, int bits, int64_t group) {
    const int per = 8 / bits;
    const int64_t P = D / per, E = D / group;
    const unsigned mask = (1u << bits) - 1u;
    float *zacc = malloc(sizeof(float) * G * E);
    if (!zacc) return 1;
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *wb = w + bh * G * N, *sb = scale + bh * N * E, *zb = minimum + bh * N * E;
        const uint8_t *cb = codes + bh * N * P;
        float *ob = out + bh * G * D;
        memset(ob, 0, sizeof(float) * G * D);
        memset(zacc, 0, sizeof(float) * G * E);
        for (int64_t n = 0; n < N; ++n) {
            const uint8_t *row = cb + n * P;
            const float *s = sb + n * E, *z = zb + n * E;
            for (int64_t j = 0; j < G; ++j) {
                const float wj = wb[j * N + n];
                if (wj == 0.f) continue; /* masked slot */
                for (int64_t e = 0; e < E; ++e) zacc[j * E + e] += wj * z[e];
                float *a = ob + j * D;
                for (int i = 0; i < per; ++i) {
                    const int shift = bits * i;
                    for (int64_t p0 = 0; p0 < P;) { /* a run of channels sharing one scale */
                        const int64_t d0 = i * P + p0, len_group = group - d0 % group, len_slot = P - p0;
                        const int64_t len = len_group < len_slot ? len_group : len_slot;
                        const float ws = wj * s[d0 / group];
                        float *ai = a + d0;
                        const uint8_t *ri = row + p0;
                        for (int64_t t = 0; t < len; ++t) ai[t] += ws * (float)((ri[t] >> shift) & mask);
                        p0 += len;
                    }
                }
            }
        }
        for (int64_t j = 0; j < G; ++j)
            for (int64_t d = 0; d < D; ++d) ob[j * D + d] += zacc[j * E + d / group];
    }
    free(zacc);
    return 0;
}
