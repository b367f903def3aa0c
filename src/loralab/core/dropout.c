/* LoRA dropout masks without storing them: element i is kept iff its 16 random bits are >= drop
 * (drop = round(p * 65536)), the bits being lane i % 4 (low lane first) of the 64-bit word i / 4 of
 * the SplitMix64 stream seeded with `seed`:
 *
 *     word(w) = mix(seed + (w + 1) * 0x9E3779B97F4A7C15)
 *     mix(z): z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9;  z = (z ^ z >> 27) * 0x94D049BB133111EB;  z ^ z >> 31
 *
 * Any element's bits are computable on their own (counter-based), so backward rebuilds the mask from
 * the seed instead of saving it, and a range of elements can be done by any thread. The kept value is
 * x * 1.0f and the dropped one x * 0.0f, as torch's `x * keep` gives (lora_fused.py's fallback).
 */
#include <stdint.h>

#define GAMMA 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * MIX1;
    z = (z ^ (z >> 27)) * MIX2;
    return z ^ (z >> 31);
}

static inline uint64_t word(uint64_t seed, int64_t w) { return mix64(seed + (uint64_t)(w + 1) * GAMMA); }

/* mode 0: out[i] = x[i] * keep(i);  mode 1: out[i] += x[i] * keep(i);  mode 2: out[i] = keep(i) */
static inline void apply(const float *x, float *out, int64_t i, float keep, int mode) {
    if (mode == 0) out[i] = x[i] * keep;
    else if (mode == 1) out[i] += x[i] * keep;
    else out[i] = keep;
}

static void masked_scalar(const float *x, float *out, int64_t first, int64_t last, uint64_t seed, uint32_t drop,
                          int mode) {
    uint64_t r = 0;
    for (int64_t i = first; i < last; i++) {
        if (i == first || (i & 3) == 0) r = word(seed, i >> 2); /* one word per 4 elements */
        apply(x, out, i, (float)(((r >> (16 * (i & 3))) & 0xFFFF) >= drop), mode);
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORALAB_X86 1

/* a * b mod 2^64 per 64-bit lane (AVX2 has no 64-bit multiply): lo*lo + ((hi(a)*lo(b) + lo(a)*hi(b)) << 32) */
__attribute__((target("avx2"))) static inline __m256i mul64(__m256i a, __m256i b, __m256i b_hi) {
    __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b), _mm256_mul_epu32(a, b_hi));
    return _mm256_add_epi64(_mm256_mul_epu32(a, b), _mm256_slli_epi64(cross, 32));
}

/* Whole words [w0, w1): 4 words = 16 elements per step, their 16-bit lanes already in element order. */
__attribute__((target("avx2"))) static void masked_avx2(const float *x, float *out, int64_t w0, int64_t w1,
                                                        uint64_t seed, uint32_t drop, int mode) {
    const __m256i m1 = _mm256_set1_epi64x((long long)MIX1), m1_hi = _mm256_set1_epi64x((long long)(MIX1 >> 32));
    const __m256i m2 = _mm256_set1_epi64x((long long)MIX2), m2_hi = _mm256_set1_epi64x((long long)(MIX2 >> 32));
    const __m256i step = _mm256_set1_epi64x((long long)(4 * GAMMA));
    const __m256i signs = _mm256_set1_epi16((short)0x8000);
    /* u >= drop  <=>  (u ^ 0x8000 as int16) > drop - 1 - 32768   (drop in 1..65535) */
    const __m256i bound = _mm256_set1_epi16((short)((int)drop - 1 - 32768));
    const __m256 one = _mm256_set1_ps(1.0f);
    uint64_t z0 = seed + (uint64_t)(w0 + 1) * GAMMA;
    __m256i z = _mm256_setr_epi64x((long long)z0, (long long)(z0 + GAMMA), (long long)(z0 + 2 * GAMMA),
                                   (long long)(z0 + 3 * GAMMA));
    for (int64_t w = w0; w + 4 <= w1; w += 4, z = _mm256_add_epi64(z, step)) {
        __m256i r = _mm256_xor_si256(z, _mm256_srli_epi64(z, 30));
        r = mul64(r, m1, m1_hi);
        r = _mm256_xor_si256(r, _mm256_srli_epi64(r, 27));
        r = mul64(r, m2, m2_hi);
        r = _mm256_xor_si256(r, _mm256_srli_epi64(r, 31));
        __m256i keep16 = _mm256_cmpgt_epi16(_mm256_xor_si256(r, signs), bound);
        for (int half = 0; half < 2; half++) {
            __m128i k = half ? _mm256_extracti128_si256(keep16, 1) : _mm256_castsi256_si128(keep16);
            __m256 keep = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cvtepi16_epi32(k)), one);
            int64_t i = w * 4 + half * 8;
            if (mode == 2) {
                _mm256_storeu_ps(out + i, keep);
            } else {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), keep);
                if (mode == 1) v = _mm256_add_ps(_mm256_loadu_ps(out + i), v);
                _mm256_storeu_ps(out + i, v);
            }
        }
    }
}
#endif

static void masked(const float *x, float *out, int64_t first, int64_t last, uint64_t seed, uint32_t drop, int mode) {
#ifdef LORALAB_X86
    int64_t w0 = (first + 3) >> 2, w1 = w0 + ((last >> 2) - w0) / 4 * 4; /* whole groups of 4 words */
    if (w1 > w0 && __builtin_cpu_supports("avx2")) {
        masked_scalar(x, out, first, w0 * 4, seed, drop, mode);
        masked_avx2(x, out, w0, w1, seed, drop, mode);
        masked_scalar(x, out, w1 * 4, last, seed, drop, mode);
        return;
    }
#endif
    masked_scalar(x, out, first, last, seed, drop, mode);
}

/* Elements [first, last) of a flat fp32 tensor; any range can go to any thread. */
void loralab_dropout_mul(const float *x, float *out, int64_t first, int64_t last, uint64_t seed, uint32_t drop) {
    masked(x, out, first, last, seed, drop, 0);
}

void loralab_dropout_addmul(const float *x, float *out, int64_t first, int64_t last, uint64_t seed, uint32_t drop) {
    masked(x, out, first, last, seed, drop, 1);
}

void loralab_dropout_keep(float *out, int64_t first, int64_t last, uint64_t seed, uint32_t drop) {
    masked(0, out, first, last, seed, drop, 2);
}
