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
 * Codes are unpacked once per byte run and shared by every query row (the query heads of a KV head
 * and the step's tokens). Scales and zero points arrive as stored: float32, float16 or bfloat16
 * (`meta` 0, 1, 2). One thread. With AVX2 and runs of 8 channels or tokens that share a scale (the
 * usual shapes: group and P multiples of 8), an explicitly vectorized path keeps the accumulators
 * of three query rows in registers; otherwise plain loops the compiler vectorizes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float meta_at(const void *m, int kind, int64_t i) {
    if (kind == 0) return ((const float *)m)[i];
    uint16_t h = ((const uint16_t *)m)[i];
    if (kind == 2) { /* bfloat16: the top half of a float32 */
        uint32_t x = (uint32_t)h << 16;
        float f;
        memcpy(&f, &x, sizeof f);
        return f;
    }
    /* float16 */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, x;
    if (exp == 0) {
        if (man == 0) x = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do { ++e; man <<= 1; } while (!(man & 0x400u));
            x = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) x = sign | 0x7f800000u | (man << 13);
    else x = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

#ifdef __AVX2__
/* acc[r][t] += sum_d w[r][d] * code(channel d, token t) for `rows` rows of stride `stride` and
 * `vecs` * 8 tokens; codes (P, N) channel-major from `c` (the tile's first token). */
static inline __attribute__((always_inline)) void key_tile(float *acc, const float *w, const uint8_t *c, int64_t stride,
                                                           int64_t D, int64_t P, int64_t N, int bits, unsigned mask,
                                                           const int rows, const int vecs) {
    const __m256i lowbits = _mm256_set1_epi32((int)mask);
    __m256 a[3][4];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) a[r][v] = _mm256_loadu_ps(acc + r * stride + 8 * v);
    for (int64_t d = 0; d < D; ++d) {
        const __m128i shift = _mm_cvtsi32_si128(bits * (int)(d / P));
        const uint8_t *row = c + (d % P) * N;
        __m256 wq[3];
        for (int r = 0; r < rows; ++r) wq[r] = _mm256_set1_ps(w[r * D + d]);
        for (int v = 0; v < vecs; ++v) {
            const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * v)));
            const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(x, shift), lowbits));
            for (int r = 0; r < rows; ++r) a[r][v] = _mm256_fmadd_ps(wq[r], code, a[r][v]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) _mm256_storeu_ps(acc + r * stride + 8 * v, a[r][v]);
}

/* out[r][d] += sum_n w[r][n] s[n][d / group] code(token n, channel d) for `rows` rows of stride `stride`
 * (weights) and `ostride` (out), channels d0 .. d0 + 8 * vecs; codes (N, P) token-major. Scales as float32. */
static inline __attribute__((always_inline)) void value_tile(float *out, const float *w, const uint8_t *codes,
                                                             const float *scale, int64_t d0, int64_t stride,
                                                             int64_t ostride, int64_t N, int64_t P, int64_t E,
                                                             int64_t group, int bits, unsigned mask, const int rows,
                                                             const int vecs) {
    const __m256i lowbits = _mm256_set1_epi32((int)mask);
    __m256 a[3][4];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) a[r][v] = _mm256_setzero_ps();
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *row = codes + n * P;
        for (int v = 0; v < vecs; ++v) {
            const int64_t d = d0 + 8 * v;
            const __m128i shift = _mm_cvtsi32_si128(bits * (int)(d / P));
            const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + d % P)));
            const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(x, shift), lowbits));
            const float sc = scale[n * E + d / group];
            for (int r = 0; r < rows; ++r) a[r][v] = _mm256_fmadd_ps(_mm256_set1_ps(w[r * stride + n] * sc), code, a[r][v]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) _mm256_storeu_ps(out + r * ostride + d0 + 8 * v, a[r][v]);
}
#endif

/* q: (BH, G, D); codes: (BH, P, N); scale, minimum: (BH, N / group, D); out: (BH, G, N). */
int kivi_key_logits(const float *restrict q, const uint8_t *restrict codes, const void *scale, const void *minimum,
                    int meta, float *restrict out, int64_t BH, int64_t G, int64_t D, int64_t N, int bits,
                    int64_t group) {
    const int per = 8 / bits;
    const int64_t P = D / per, K = N / group;
    const unsigned mask = (1u << bits) - 1u;
    float *qs = malloc(sizeof(float) * G * D), *acc = malloc(sizeof(float) * G * group);
    float *unpacked = malloc(sizeof(float) * group), *s = malloc(sizeof(float) * D), *z = malloc(sizeof(float) * D);
    if (!qs || !acc || !unpacked || !s || !z) { free(qs); free(acc); free(unpacked); free(s); free(z); return 1; }
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        const uint8_t *cb = codes + bh * P * N;
        float *ob = out + bh * G * N;
        for (int64_t k = 0; k < K; ++k) {
            for (int64_t d = 0; d < D; ++d) {
                s[d] = meta_at(scale, meta, (bh * K + k) * D + d);
                z[d] = meta_at(minimum, meta, (bh * K + k) * D + d);
            }
            for (int64_t j = 0; j < G; ++j) {
                float qz = 0.f;
                for (int64_t d = 0; d < D; ++d) {
                    qs[j * D + d] = qb[j * D + d] * s[d];
                    qz += qb[j * D + d] * z[d];
                }
                for (int64_t t = 0; t < group; ++t) acc[j * group + t] = qz;
            }
#ifdef __AVX2__
            if (group % 8 == 0) {
                for (int64_t t0 = 0; t0 < group; t0 += 32) {
                    const int vecs = (int)((group - t0 < 32 ? group - t0 : 32) / 8);
                    for (int64_t j0 = 0; j0 < G; j0 += 3) {
                        float *a = acc + j0 * group + t0;
                        const float *w = qs + j0 * D;
                        const uint8_t *c = cb + k * group + t0;
                        const int rows = (int)(G - j0 < 3 ? G - j0 : 3);
                        /* constant shapes, so the accumulators stay in registers */
                        if (rows == 3 && vecs == 4) key_tile(a, w, c, group, D, P, N, bits, mask, 3, 4);
                        else if (rows == 3 && vecs == 2) key_tile(a, w, c, group, D, P, N, bits, mask, 3, 2);
                        else if (rows == 1 && vecs == 4) key_tile(a, w, c, group, D, P, N, bits, mask, 1, 4);
                        else key_tile(a, w, c, group, D, P, N, bits, mask, rows, vecs);
                    }
                }
            } else
#endif
            for (int64_t p = 0; p < P; ++p) {
                const uint8_t *row = cb + p * N + k * group;
                for (int i = 0; i < per; ++i) {
                    const int shift = bits * i;
                    for (int64_t t = 0; t < group; ++t) unpacked[t] = (float)((row[t] >> shift) & mask);
                    for (int64_t j = 0; j < G; ++j) {
                        const float w = qs[j * D + i * P + p];
                        float *restrict a = acc + j * group;
                        for (int64_t t = 0; t < group; ++t) a[t] += w * unpacked[t];
                    }
                }
            }
            for (int64_t j = 0; j < G; ++j) memcpy(ob + j * N + k * group, acc + j * group, sizeof(float) * group);
        }
    }
    free(qs); free(acc); free(unpacked); free(s); free(z);
    return 0;
}

/* w: (BH, G, N); codes: (BH, N, P); scale, minimum: (BH, N, D / group); out: (BH, G, D). */
int kivi_value_mix(const float *restrict w, const uint8_t *restrict codes, const void *scale, const void *minimum,
                   int meta, float *restrict out, int64_t BH, int64_t G, int64_t D, int64_t N, int bits,
                   int64_t group) {
    const int per = 8 / bits;
    const int64_t P = D / per, E = D / group;
    const unsigned mask = (1u << bits) - 1u;
    float *zacc = malloc(sizeof(float) * G * E), *unpacked = malloc(sizeof(float) * D);
    float *s = malloc(sizeof(float) * E), *z = malloc(sizeof(float) * E), *sfull = malloc(sizeof(float) * N * E);
    if (!zacc || !unpacked || !s || !z || !sfull) { free(zacc); free(unpacked); free(s); free(z); free(sfull); return 1; }
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *wb = w + bh * G * N;
        const uint8_t *cb = codes + bh * N * P;
        float *ob = out + bh * G * D;
        memset(ob, 0, sizeof(float) * G * D);
        memset(zacc, 0, sizeof(float) * G * E);
#ifdef __AVX2__
        if (group % 8 == 0 && P % 8 == 0) { /* runs of 8 channels share a slot and a scale */
            for (int64_t i = 0; i < N * E; ++i) sfull[i] = meta_at(scale, meta, bh * N * E + i);
            for (int64_t d0 = 0; d0 < D; d0 += 32) {
                const int vecs = (int)((D - d0 < 32 ? D - d0 : 32) / 8);
                for (int64_t j0 = 0; j0 < G; j0 += 3) {
                    const int rows = (int)(G - j0 < 3 ? G - j0 : 3);
                    float *o = ob + j0 * D;
                    const float *wr = wb + j0 * N;
                    /* constant shapes, so the accumulators stay in registers */
                    if (rows == 3 && vecs == 4) value_tile(o, wr, cb, sfull, d0, N, D, N, P, E, group, bits, mask, 3, 4);
                    else if (rows == 3 && vecs == 2) value_tile(o, wr, cb, sfull, d0, N, D, N, P, E, group, bits, mask, 3, 2);
                    else if (rows == 1 && vecs == 4) value_tile(o, wr, cb, sfull, d0, N, D, N, P, E, group, bits, mask, 1, 4);
                    else value_tile(o, wr, cb, sfull, d0, N, D, N, P, E, group, bits, mask, rows, vecs);
                }
            }
            for (int64_t n = 0; n < N; ++n)
                for (int64_t e = 0; e < E; ++e) {
                    const float zn = meta_at(minimum, meta, (bh * N + n) * E + e);
                    for (int64_t j = 0; j < G; ++j) zacc[j * E + e] += wb[j * N + n] * zn;
                }
        } else
#endif
        for (int64_t n = 0; n < N; ++n) {
            int any = 0;
            for (int64_t j = 0; j < G; ++j) any |= wb[j * N + n] != 0.f;
            if (!any) continue; /* a masked slot */
            const uint8_t *row = cb + n * P;
            for (int i = 0; i < per; ++i) {
                const int shift = bits * i;
                float *restrict u = unpacked + i * P;
                for (int64_t p = 0; p < P; ++p) u[p] = (float)((row[p] >> shift) & mask);
            }
            for (int64_t e = 0; e < E; ++e) {
                s[e] = meta_at(scale, meta, (bh * N + n) * E + e);
                z[e] = meta_at(minimum, meta, (bh * N + n) * E + e);
            }
            for (int64_t j = 0; j < G; ++j) {
                const float wj = wb[j * N + n];
                float *restrict a = ob + j * D;
                for (int64_t e = 0; e < E; ++e) {
                    const float ws = wj * s[e];
                    const float *restrict u = unpacked + e * group;
                    float *restrict ae = a + e * group;
                    zacc[j * E + e] += wj * z[e];
                    for (int64_t t = 0; t < group; ++t) ae[t] += ws * u[t];
                }
            }
        }
        for (int64_t j = 0; j < G; ++j)
            for (int64_t d = 0; d < D; ++d) ob[j * D + d] += zacc[j * E + d / group];
    }
    free(zacc); free(unpacked); free(s); free(z); free(sfull);
    return 0;
}
