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
 * of three query rows in registers; with AVX-512 and runs of 16 (group and P multiples of 16), the
 * same tiles 16 lanes wide; otherwise plain loops the compiler vectorizes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "softmax.h"
#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
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

/* n scales or zero points from element i0 on, as float32 into dst (F16C converts float16 8 at a time). */
static void meta_run(float *restrict dst, const void *m, int kind, int64_t i0, int64_t n) {
    int64_t i = 0;
    if (kind == 0) {
        memcpy(dst, (const float *)m + i0, sizeof(float) * n);
        return;
    }
    const uint16_t *h = (const uint16_t *)m + i0;
    if (kind == 2) {
        for (; i < n; ++i) {
            const uint32_t x = (uint32_t)h[i] << 16;
            memcpy(dst + i, &x, sizeof x);
        }
        return;
    }
#ifdef __F16C__
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < n; ++i) dst[i] = meta_at(m, kind, i0 + i);
}

#ifdef __AVX2__
/* acc[r][t] += sum_d w[r][d] * code(channel d, token t) for `rows` query rows (w's rows D apart, acc's
 * `stride` apart) and 8 * `vecs` tokens; codes (P, N) channel-major from `c` (the tile's first token).
 * Each byte is loaded and widened once; its 8 / bits slots (channels p, P + p, ...) are unpacked from it
 * with constant shifts. Constant `bits`, `rows`, `vecs`: the accumulators stay in registers. */
static inline __attribute__((always_inline)) void key_tile(float *acc, const float *w, const uint8_t *c, int64_t stride,
                                                           int64_t D, int64_t P, int64_t N, const int bits,
                                                           const int rows, const int vecs) {
    const int per = 8 / bits;
    const __m256i lowbits = _mm256_set1_epi32((1 << bits) - 1);
    __m256 a[3][2];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) a[r][v] = _mm256_loadu_ps(acc + r * stride + 8 * v);
    for (int64_t p = 0; p < P; ++p) {
        const uint8_t *row = c + p * N;
        __m256i x[2];
        for (int v = 0; v < vecs; ++v) x[v] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8 * v)));
        for (int i = 0; i < per; ++i) {
            const float *wd = w + i * P + p;
            for (int v = 0; v < vecs; ++v) {
                const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x[v], bits * i), lowbits));
                for (int r = 0; r < rows; ++r) a[r][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(wd + r * D), code, a[r][v]);
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) _mm256_storeu_ps(acc + r * stride + 8 * v, a[r][v]);
}

/* out[r][i P + p0 + 0..7] += sum_n ws[e_i][r][n] code(token n, channel i P + p0 + 0..7) for `rows` rows,
 * N tokens and every slot i: the 8 bytes p0 .. p0 + 7 of each token are loaded and widened once, their slots
 * unpacked with constant shifts. ws (E, G, ld): the weights times each token's scale of value group e
 * (channels e * group ..), from query row j0 on; e_i = (i P + p0) / group (group % 8 == 0: one group per 8
 * channels). Codes (N, P) token-major. */
static inline __attribute__((always_inline)) void value_tile(float *out, const float *ws, const uint8_t *codes,
                                                             int64_t p0, int64_t D, int64_t N, int64_t ld, int64_t P,
                                                             int64_t G, int64_t group, const int bits, const int rows) {
    const int per = 8 / bits;
    const __m256i lowbits = _mm256_set1_epi32((1 << bits) - 1);
    const float *wr[4][3];
    __m256 a[3][4];
    for (int i = 0; i < per; ++i)
        for (int r = 0; r < rows; ++r) {
            wr[i][r] = ws + (((i * P + p0) / group) * G + r) * ld;
            a[r][i] = _mm256_loadu_ps(out + r * D + i * P + p0);
        }
    for (int64_t n = 0; n < N; ++n) {
        const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + n * P + p0)));
        for (int i = 0; i < per; ++i) {
            const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(x, bits * i), lowbits));
            for (int r = 0; r < rows; ++r) a[r][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(wr[i][r] + n), code, a[r][i]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < per; ++i) _mm256_storeu_ps(out + r * D + i * P + p0, a[r][i]);
}

/* The tiles with constant bits and rows (and vecs), dispatched once per tile. */
#define KEY_TILE(B, R, V) key_tile(a, w, c, group, D, P, N, B, R, V)
static void key_tile_any(float *a, const float *w, const uint8_t *c, int64_t group, int64_t D, int64_t P, int64_t N,
                         int bits, int rows, int vecs) {
#define KEY_ROWS(B)                                                                                                    \
    if (vecs == 2) { if (rows == 3) KEY_TILE(B, 3, 2); else if (rows == 2) KEY_TILE(B, 2, 2); else KEY_TILE(B, 1, 2); } \
    else { if (rows == 3) KEY_TILE(B, 3, 1); else if (rows == 2) KEY_TILE(B, 2, 1); else KEY_TILE(B, 1, 1); }
    if (bits == 2) { KEY_ROWS(2) } else if (bits == 4) { KEY_ROWS(4) } else { KEY_ROWS(8) }
#undef KEY_ROWS
}
#undef KEY_TILE

static void value_tile_any(float *o, const float *ws, const uint8_t *cb, int64_t p0, int64_t D, int64_t N, int64_t ld,
                           int64_t P, int64_t G, int64_t group, int bits, int rows) {
#define VALUE_ROWS(B)                                                                                                  \
    if (rows == 3) value_tile(o, ws, cb, p0, D, N, ld, P, G, group, B, 3);                                             \
    else if (rows == 2) value_tile(o, ws, cb, p0, D, N, ld, P, G, group, B, 2);                                        \
    else value_tile(o, ws, cb, p0, D, N, ld, P, G, group, B, 1);
    if (bits == 2) { VALUE_ROWS(2) } else if (bits == 4) { VALUE_ROWS(4) } else { VALUE_ROWS(8) }
#undef VALUE_ROWS
}

#endif

#ifdef __AVX512F__
/* key_tile and value_tile 16 lanes wide: vecs of 16 tokens (keys), runs of 16 channels (values, group % 16
 * == 0 and P % 16 == 0, so that a run shares a slot and a scale). Half the instructions per code of the AVX2
 * tiles. */
static inline __attribute__((always_inline)) void key_tile16(float *acc, const float *w, const uint8_t *c,
                                                             int64_t stride, int64_t D, int64_t P, int64_t N,
                                                             const int bits, const int rows, const int vecs) {
    const int per = 8 / bits;
    const __m512i lowbits = _mm512_set1_epi32((1 << bits) - 1);
    __m512 a[3][2];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) a[r][v] = _mm512_loadu_ps(acc + r * stride + 16 * v);
    for (int64_t p = 0; p < P; ++p) {
        const uint8_t *row = c + p * N;
        __m512i x[2];
        for (int v = 0; v < vecs; ++v) x[v] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + 16 * v)));
        for (int i = 0; i < per; ++i) {
            const float *wd = w + i * P + p;
            for (int v = 0; v < vecs; ++v) {
                const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x[v], bits * i), lowbits));
                for (int r = 0; r < rows; ++r) a[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(wd[r * D]), code, a[r][v]);
            }
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vecs; ++v) _mm512_storeu_ps(acc + r * stride + 16 * v, a[r][v]);
}

static inline __attribute__((always_inline)) void value_tile16(float *out, const float *ws, const uint8_t *codes,
                                                               int64_t p0, int64_t D, int64_t N, int64_t ld, int64_t P,
                                                               int64_t G, int64_t group, const int bits, const int rows) {
    const int per = 8 / bits;
    const __m512i lowbits = _mm512_set1_epi32((1 << bits) - 1);
    const float *wr[4][3];
    __m512 a[3][4];
    for (int i = 0; i < per; ++i)
        for (int r = 0; r < rows; ++r) {
            wr[i][r] = ws + (((i * P + p0) / group) * G + r) * ld;
            a[r][i] = _mm512_loadu_ps(out + r * D + i * P + p0);
        }
    for (int64_t n = 0; n < N; ++n) {
        const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + n * P + p0)));
        for (int i = 0; i < per; ++i) {
            const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, bits * i), lowbits));
            for (int r = 0; r < rows; ++r) a[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(wr[i][r][n]), code, a[r][i]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int i = 0; i < per; ++i) _mm512_storeu_ps(out + r * D + i * P + p0, a[r][i]);
}

#define KEY_TILE16(B, R, V) key_tile16(a, w, c, group, D, P, N, B, R, V)
static void key_tile16_any(float *a, const float *w, const uint8_t *c, int64_t group, int64_t D, int64_t P, int64_t N,
                           int bits, int rows, int vecs) {
#define KEY_ROWS16(B)                                                                                                  \
    if (vecs == 2) { if (rows == 3) KEY_TILE16(B, 3, 2); else if (rows == 2) KEY_TILE16(B, 2, 2); else KEY_TILE16(B, 1, 2); } \
    else { if (rows == 3) KEY_TILE16(B, 3, 1); else if (rows == 2) KEY_TILE16(B, 2, 1); else KEY_TILE16(B, 1, 1); }
    if (bits == 2) { KEY_ROWS16(2) } else if (bits == 4) { KEY_ROWS16(4) } else { KEY_ROWS16(8) }
#undef KEY_ROWS16
}
#undef KEY_TILE16

static void value_tile16_any(float *o, const float *ws, const uint8_t *cb, int64_t p0, int64_t D, int64_t N, int64_t ld,
                             int64_t P, int64_t G, int64_t group, int bits, int rows) {
#define VALUE_ROWS16(B)                                                                                                \
    if (rows == 3) value_tile16(o, ws, cb, p0, D, N, ld, P, G, group, B, 3);                                           \
    else if (rows == 2) value_tile16(o, ws, cb, p0, D, N, ld, P, G, group, B, 2);                                      \
    else value_tile16(o, ws, cb, p0, D, N, ld, P, G, group, B, 1);
    if (bits == 2) { VALUE_ROWS16(2) } else if (bits == 4) { VALUE_ROWS16(4) } else { VALUE_ROWS16(8) }
#undef VALUE_ROWS16
}
#endif

/* Scratch of key_logits_one: qs (G * D), acc (G * group), unpacked (group), s and z (D each). */
static size_t key_scratch(int64_t G, int64_t D, int64_t group) { return (size_t)(G * D + G * group + group + 2 * D); }

/* One (row, head): q (G, D); codes (P, N); scale and minimum from element `meta0` on, (N / group, D);
 * out (G, N) with row stride `ldo`. */
static void key_logits_one(const float *restrict qb, const uint8_t *restrict cb, const void *scale, const void *minimum,
                           int meta, int64_t meta0, float *restrict ob, int64_t ldo, int64_t G, int64_t D, int64_t N,
                           int bits, int64_t group, float *scratch) {
    const int per = 8 / bits;
    const int64_t P = D / per, K = N / group;
    const unsigned mask = (1u << bits) - 1u;
    float *qs = scratch, *acc = qs + G * D, *unpacked = acc + G * group, *s = unpacked + group, *z = s + D;
    for (int64_t k = 0; k < K; ++k) {
        meta_run(s, scale, meta, meta0 + k * D, D);
        meta_run(z, minimum, meta, meta0 + k * D, D);
        for (int64_t j = 0; j < G; ++j) {
            float qz = 0.f;
            for (int64_t d = 0; d < D; ++d) {
                qs[j * D + d] = qb[j * D + d] * s[d];
                qz += qb[j * D + d] * z[d];
            }
            for (int64_t t = 0; t < group; ++t) acc[j * group + t] = qz;
        }
#ifdef __AVX512F__
        if (group % 16 == 0) {
            for (int64_t t0 = 0; t0 < group; t0 += 32) {
                const int vecs = group - t0 >= 32 ? 2 : 1;
                for (int64_t j0 = 0; j0 < G; j0 += 3)
                    key_tile16_any(acc + j0 * group + t0, qs + j0 * D, cb + k * group + t0, group, D, P, N, bits,
                                   (int)(G - j0 < 3 ? G - j0 : 3), vecs);
            }
        } else
#endif
#ifdef __AVX2__
        if (group % 8 == 0) {
            for (int64_t t0 = 0; t0 < group; t0 += 16) {
                const int vecs = group - t0 >= 16 ? 2 : 1;
                for (int64_t j0 = 0; j0 < G; j0 += 3)
                    key_tile_any(acc + j0 * group + t0, qs + j0 * D, cb + k * group + t0, group, D, P, N, bits,
                                 (int)(G - j0 < 3 ? G - j0 : 3), vecs);
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
        for (int64_t j = 0; j < G; ++j) memcpy(ob + j * ldo + k * group, acc + j * group, sizeof(float) * group);
    }
}

/* q: (BH, G, D); codes: (BH, P, N); scale, minimum: (BH, N / group, D); out: (BH, G, N). */
int kivi_key_logits(const float *restrict q, const uint8_t *restrict codes, const void *scale, const void *minimum,
                    int meta, float *restrict out, int64_t BH, int64_t G, int64_t D, int64_t N, int bits,
                    int64_t group) {
    const int64_t P = D * bits / 8;
    float *scratch = malloc(sizeof(float) * key_scratch(G, D, group));
    if (!scratch) return 1;
    for (int64_t bh = 0; bh < BH; ++bh)
        key_logits_one(q + bh * G * D, codes + bh * P * N, scale, minimum, meta, bh * (N / group) * D, out + bh * G * N, N,
                       G, D, N, bits, group, scratch);
    free(scratch);
    return 0;
}

/* The weights of G rows (row stride ldw) over n slots times each slot's scale of each value group e,
 * ws[e][r][s] = w[r][s] st[e][s], and the zero points' share of the mix, zacc[r][e] = w[r] . zt[e]
 * (scales st and zero points zt (E, n), as float32). */
static void scale_weights(const float *restrict w, int64_t ldw, const float *restrict st, const float *restrict zt,
                          float *restrict ws, float *restrict zacc, int64_t G, int64_t E, int64_t n) {
    for (int64_t e = 0; e < E; ++e)
        for (int64_t r = 0; r < G; ++r) {
            const float *restrict wr = w + r * ldw, *restrict se = st + e * n;
            float *restrict wse = ws + (e * G + r) * n;
            for (int64_t s = 0; s < n; ++s) wse[s] = wr[s] * se[s];
            zacc[r * E + e] = dot(wr, zt + e * n, n);
        }
}

/* Scratch of value_mix_one: zacc (G * E), unpacked (D), s and z (E each), scales and zero points as
 * stored and transposed (N * E each), weights times scales (E * G * N). */
static size_t value_scratch(int64_t G, int64_t D, int64_t N, int64_t group) {
    const int64_t E = D / group;
    return (size_t)(G * E + D + 2 * E + 4 * N * E + G * N * E);
}

/* One (row, head): w (G, N) with row stride `ldw`; codes (N, P); scale and minimum from element `meta0`
 * on, (N, D / group); out (G, D), overwritten. */
static void value_mix_one(const float *restrict wb, int64_t ldw, const uint8_t *restrict cb, const void *scale,
                          const void *minimum, int meta, int64_t meta0, float *restrict ob, int64_t G, int64_t D,
                          int64_t N, int bits, int64_t group, float *scratch) {
    const int per = 8 / bits;
    const int64_t P = D / per, E = D / group;
    const unsigned mask = (1u << bits) - 1u;
    float *zacc = scratch, *unpacked = zacc + G * E, *s = unpacked + D, *z = s + E;
    memset(ob, 0, sizeof(float) * G * D);
    memset(zacc, 0, sizeof(float) * G * E);
#ifdef __AVX2__
    if (group % 8 == 0 && P % 8 == 0) { /* runs of 8 channels share a slot and a scale */
        float *sfull = z + E, *zfull = sfull + N * E, *st = zfull + N * E, *zt = st + N * E, *ws = zt + N * E;
        meta_run(sfull, scale, meta, meta0, N * E);
        meta_run(zfull, minimum, meta, meta0, N * E);
        for (int64_t n = 0; n < N; ++n)
            for (int64_t e = 0; e < E; ++e) {
                st[e * N + n] = sfull[n * E + e];
                zt[e * N + n] = zfull[n * E + e];
            }
        scale_weights(wb, ldw, st, zt, ws, zacc, G, E, N);
#ifdef __AVX512F__
        if (group % 16 == 0 && P % 16 == 0) {
            for (int64_t p0 = 0; p0 < P; p0 += 16)
                for (int64_t j0 = 0; j0 < G; j0 += 3)
                    value_tile16_any(ob + j0 * D, ws + j0 * N, cb, p0, D, N, N, P, G, group, bits,
                                     (int)(G - j0 < 3 ? G - j0 : 3));
        } else
#endif
        for (int64_t p0 = 0; p0 < P; p0 += 8)
            for (int64_t j0 = 0; j0 < G; j0 += 3)
                value_tile_any(ob + j0 * D, ws + j0 * N, cb, p0, D, N, N, P, G, group, bits, (int)(G - j0 < 3 ? G - j0 : 3));
    } else
#endif
    for (int64_t n = 0; n < N; ++n) {
        int any = 0;
        for (int64_t j = 0; j < G; ++j) any |= wb[j * ldw + n] != 0.f;
        if (!any) continue; /* a masked slot */
        const uint8_t *row = cb + n * P;
        for (int i = 0; i < per; ++i) {
            const int shift = bits * i;
            float *restrict u = unpacked + i * P;
            for (int64_t p = 0; p < P; ++p) u[p] = (float)((row[p] >> shift) & mask);
        }
        for (int64_t e = 0; e < E; ++e) {
            s[e] = meta_at(scale, meta, meta0 + n * E + e);
            z[e] = meta_at(minimum, meta, meta0 + n * E + e);
        }
        for (int64_t j = 0; j < G; ++j) {
            const float wj = wb[j * ldw + n];
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

/* w: (BH, G, N); codes: (BH, N, P); scale, minimum: (BH, N, D / group); out: (BH, G, D). */
int kivi_value_mix(const float *restrict w, const uint8_t *restrict codes, const void *scale, const void *minimum,
                   int meta, float *restrict out, int64_t BH, int64_t G, int64_t D, int64_t N, int bits,
                   int64_t group) {
    const int64_t P = D * bits / 8;
    float *scratch = malloc(sizeof(float) * value_scratch(G, D, N, group));
    if (!scratch) return 1;
    for (int64_t bh = 0; bh < BH; ++bh)
        value_mix_one(w + bh * G * N, N, codes + bh * N * P, scale, minimum, meta, bh * N * (D / group), out + bh * G * D,
                      G, D, N, bits, group, scratch);
    free(scratch);
    return 0;
}

/* Where the parts of one (row, head)'s share of a KIVI page sit (kvcompress.methods.kivi.PageLayout), in
 * bytes from the start of its key block (key codes (P, group) channel-major, key scales and zero points
 * (D)) or of its value block (value codes (group, P), value scales and zero points (D / group, group):
 * value group-major, so a page's run of one group's scales is contiguous). */
enum { KEY_CODES, VALUE_CODES, KEY_SCALE, KEY_MIN, VALUE_SCALE, VALUE_MIN };

/* Scratch of value_mix_pages over up to n slots: scales and zero points (E * n each), weights times scales
 * (E * G * n), zero-point sums (G * E), unpacked codes (D). */
static size_t value_pages_scratch(int64_t G, int64_t D, int64_t n, int64_t group) {
    const int64_t E = D / group;
    return (size_t)(2 * E * n + E * G * n + G * E + D);
}

/* One (row, head)'s values over its pages: out (G, D) = sum over its n = pages * group slots of w[j][s] v[s],
 * w (G, n) with row stride ldw, page j's value block at held[j], its parts at held[j] + at[...]. The scales of all pages are read into
 * scratch first, so the weights are scaled in one pass over n slots and the tiles of each page only unpack
 * and accumulate (value_mix_one's scheme, its per-call setup paid once per head, not once per page). */
static void value_mix_pages(const float *restrict w, int64_t ldw, const uint8_t *const *held, const int64_t *at,
                            int64_t pages, int meta, float *restrict out, int64_t G, int64_t D, int bits, int64_t group,
                            float *scratch) {
    const int per = 8 / bits;
    const int64_t P = D / per, E = D / group, n = pages * group;
    const unsigned mask = (1u << bits) - 1u;
    float *st = scratch, *zt = st + E * n, *ws = zt + E * n, *zacc = ws + E * G * n, *unpacked = zacc + G * E;
    for (int64_t j = 0; j < pages; ++j)
        for (int64_t e = 0; e < E; ++e) {
            meta_run(st + e * n + j * group, held[j] + at[VALUE_SCALE], meta, e * group, group);
            meta_run(zt + e * n + j * group, held[j] + at[VALUE_MIN], meta, e * group, group);
        }
    scale_weights(w, ldw, st, zt, ws, zacc, G, E, n);
    memset(out, 0, sizeof(float) * G * D);
#ifdef __AVX512F__
    if (group % 16 == 0 && P % 16 == 0) {
        for (int64_t j = 0; j < pages; ++j)
            for (int64_t p0 = 0; p0 < P; p0 += 16)
                for (int64_t r0 = 0; r0 < G; r0 += 3)
                    value_tile16_any(out + r0 * D, ws + r0 * n + j * group, held[j] + at[VALUE_CODES], p0, D, group, n, P,
                                     G, group, bits, (int)(G - r0 < 3 ? G - r0 : 3));
    } else
#endif
#ifdef __AVX2__
    if (group % 8 == 0 && P % 8 == 0) {
        for (int64_t j = 0; j < pages; ++j)
            for (int64_t p0 = 0; p0 < P; p0 += 8)
                for (int64_t r0 = 0; r0 < G; r0 += 3)
                    value_tile_any(out + r0 * D, ws + r0 * n + j * group, held[j] + at[VALUE_CODES], p0, D, group, n, P, G,
                                   group, bits, (int)(G - r0 < 3 ? G - r0 : 3));
    } else
#endif
    for (int64_t s = 0; s < n; ++s) {
        const uint8_t *row = held[s / group] + at[VALUE_CODES] + (s % group) * P;
        for (int i = 0; i < per; ++i)
            for (int64_t p = 0; p < P; ++p) unpacked[i * P + p] = (float)((row[p] >> (bits * i)) & mask);
        for (int64_t r = 0; r < G; ++r)
            for (int64_t d = 0; d < D; ++d) out[r * D + d] += ws[((d / group) * G + r) * n + s] * unpacked[d];
    }
    for (int64_t r = 0; r < G; ++r)
        for (int64_t d = 0; d < D; ++d) out[r * D + d] += zacc[r * E + d / group];
}

/* One decode step of attention over [KIVI pages | full-precision window], for every (row, head) bh:
 * q (BH, G, D) float32, the G query rows that read one KV head. Head bh holds npages[bh] pages of `group`
 * slots, page j's key block at kpages[bh * J + j] and value block at vpages[bh * J + j], their parts at the
 * byte offsets `at` (the enum above): its
 * n = npages[bh] * group slots are its own of the layer's L stored slots (a shorter head's others are
 * padding, left out: ragged heads, as AdaKV keeps them). Window keys and values (W, D) float32 per
 * (row, head), `wstride` elements apart; allow (BH, L + W) uint8, or NULL when every slot is real;
 * scaling, the softmax scale. The first m stored slots of a head with sk[bh] non-NULL are sinks held
 * exactly: their logits come from the keys sk[bh] (m, D), and their values are the codes' plus se[bh]
 * (m, D). Writes out (BH, G, D) and, unless NULL, adds to observed[bh * ostride + s] the attention slot
 * s received (the mean over the G rows). Logits, softmax and both mixes in one call, each page read where
 * it is held, so the (G, n + W) weights of a head never leave this function's scratch. */
int kivi_attend_pages(const float *restrict q, const uint8_t *const *kpages, const uint8_t *const *vpages, int64_t J,
                      const int64_t *npages,
                      const int64_t *at, int64_t L, int meta, const float *restrict wk, const float *restrict wv,
                      int64_t wstride, int64_t W, const float *const *sk, const float *const *se, int64_t m,
                      const uint8_t *allow, float scaling, float *restrict out, float *observed, int64_t ostride,
                      int64_t BH, int64_t G, int64_t D, int bits, int64_t group) {
    const int64_t S = L + W;
    const size_t ks = key_scratch(G, D, group), vs = value_pages_scratch(G, D, L, group);
    const size_t scratch = (ks > vs ? ks : vs);
    float *logits = malloc(sizeof(float) * (G * S + scratch) + S); /* then S mask bytes */
    if (!logits) return 1;
    float *work = logits + G * S;
    uint8_t *mask = (uint8_t *)(work + scratch);
    for (int64_t bh = 0; bh < BH; ++bh) {
        const float *qb = q + bh * G * D;
        float *ob = out + bh * G * D;
        const uint8_t *const *keys = kpages + bh * J, *const *values = vpages + bh * J;
        const int64_t n = npages[bh] * group, T = n + W;
        const uint8_t *a = head_mask(allow ? allow + bh * S : NULL, n, L, W, mask);
        const float *sinks = sk ? sk[bh] : NULL, *errors = se ? se[bh] : NULL;
        const int64_t exact = sinks ? (m > n ? n : m) : 0;
        for (int64_t j = 0; j < npages[bh]; ++j)
            key_logits_one(qb, keys[j] + at[KEY_CODES], keys[j] + at[KEY_SCALE], keys[j] + at[KEY_MIN], meta, 0,
                           logits + j * group, T, G, D, group, bits, group, work);
        if (exact) logits_of(qb, sinks, logits, T, G, D, exact); /* the sinks' exact logits replace their codes' */
        if (W) logits_of(qb, wk + bh * wstride, logits + n, T, G, D, W);
        for (int64_t j = 0; j < G; ++j) softmax_row(logits + j * T, T, scaling, a);
        if (observed) observe_head(logits, G, n, L, W, a, observed + bh * ostride);
        if (n) value_mix_pages(logits, T, values, at, npages[bh], meta, ob, G, D, bits, group, work);
        else memset(ob, 0, sizeof(float) * G * D);
        if (exact) mix_into(logits, T, errors, ob, G, D, exact); /* and their values what the codes miss */
        if (W) mix_into(logits + n, T, wv + bh * wstride, ob, G, D, W);
    }
    free(logits);
    return 0;
}
