/* loralab: native decode of blockwise 4-bit weights -- an optional fast path, built by native.py.
 * The pure-torch code in quant.py is the reference; this file must give bit-identical values.
 *
 *   w[i]      = code[q_i] * absmax[i / block]                        one fp32 multiply
 *               (for a bf16 output that fp32 product is rounded once, to nearest even, as torch does)
 *   absmax[j] = nested_code[a_j] * nested_absmax[j / nested_block] + offset   (double quant)
 *
 * q_i is the high nibble of byte i/2 for even i, the low nibble for odd i (bitsandbytes' order).
 * Compiled with -ffp-contract=off: a fused multiply-add would round once where torch rounds twice.
 * x86-64 CPUs with AVX2 decode 16 values per step (two 8-entry permutes + a blend on bit 3 stand in
 * for the 16-entry table lookup); everything else takes the scalar loop.
 */
#include <stdint.h>
#include <string.h>

/* fp32 -> bf16, round to nearest even (products here are finite: no NaN case needed) */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Block b's scale: fp32 as stored, or decoded from its 8-bit code (double quant). */
static inline float block_scale(const float *absmax, const uint8_t *absmax_q, const float *nested_code,
                                const float *nested_absmax, float offset, int64_t nested_block, int64_t b) {
    if (absmax_q == 0) return absmax[b];
    const float scaled = nested_code[absmax_q[b]] * nested_absmax[b / nested_block];
    return scaled + offset;
}
#define SCALE_ARGS const float *absmax, const uint8_t *absmax_q, const float *nested_code, \
                   const float *nested_absmax, float offset, int64_t nested_block
#define SCALE(b) block_scale(absmax, absmax_q, nested_code, nested_absmax, offset, nested_block, b)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORALAB_X86 1

__attribute__((target("avx2"))) static __m256 lookup16(__m256 t0, __m256 t1, __m256i q) {
    /* vpermps reads the low 3 bits of q; bit 3, shifted into the sign, picks t0 (code 0-7) or t1 (8-15) */
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, q), _mm256_permutevar8x32_ps(t1, q),
                            _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
}

__attribute__((target("avx2"))) static __m256i bf16_bits(__m256 f) { /* 8 lanes: bf16 in the low 16 bits */
    __m256i u = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
}

__attribute__((target("avx2"))) static void blocks_avx2(const uint8_t *packed, const float *code, SCALE_ARGS,
                                                         int64_t first, int64_t last, int64_t block, int bf16,
                                                         void *out) {
    const __m256 t0 = _mm256_loadu_ps(code), t1 = _mm256_loadu_ps(code + 8);
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t b = first; b < last; ++b) {
        const __m256 s = _mm256_set1_ps(SCALE(b));
        const uint8_t *p = packed + b * (block / 2);
        for (int64_t j = 0; j < block / 2; j += 8) { /* 8 bytes -> 16 values */
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + j)));
            __m256 hi = _mm256_mul_ps(lookup16(t0, t1, _mm256_srli_epi32(v, 4)), s);
            __m256 lo = _mm256_mul_ps(lookup16(t0, t1, _mm256_and_si256(v, low4)), s);
            __m256 a = _mm256_unpacklo_ps(hi, lo), c = _mm256_unpackhi_ps(hi, lo); /* interleave hi, lo */
            __m256 first8 = _mm256_permute2f128_ps(a, c, 0x20), second8 = _mm256_permute2f128_ps(a, c, 0x31);
            int64_t at = b * block + 2 * j;
            if (bf16) { /* pack 2 x 8 lanes to 16 uint16; packus interleaves 128-bit lanes, permute undoes it */
                __m256i packed16 = _mm256_packus_epi32(bf16_bits(first8), bf16_bits(second8));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm256_permute4x64_epi64(packed16, 0xD8));
            } else {
                _mm256_storeu_ps((float *)out + at, first8);
                _mm256_storeu_ps((float *)out + at + 8, second8);
            }
        }
    }
}
#endif

/* Values [first_block * block, min(last_block * block, n)) of a tensor of n values into out: fp32, or bf16
 * when bf16 != 0. absmax_q == NULL: `absmax` holds fp32 block scales; else `absmax_q` holds their 8-bit codes
 * (double quant). simd == 0 forces the scalar loop (tests compare both loops on one machine). */
void loralab_dequantize_4bit(const uint8_t *packed, const float *code, SCALE_ARGS, int64_t first_block,
                             int64_t last_block, int64_t block, int64_t n, int simd, int bf16, void *out) {
    const int64_t whole = n / block < last_block ? n / block : last_block; /* blocks before a partial one */
    int64_t b = first_block;
#ifdef LORALAB_X86
    if (simd && block % 16 == 0 && whole > b && __builtin_cpu_supports("avx2")) {
        blocks_avx2(packed, code, absmax, absmax_q, nested_code, nested_absmax, offset, nested_block, b, whole,
                    block, bf16, out);
        b = whole;
    }
#endif
    for (; b < last_block; ++b) {
        const float s = SCALE(b);
        const int64_t end = (b + 1) * block < n ? (b + 1) * block : n;
        for (int64_t i = b * block; i < end; ++i) {
            const uint8_t byte = packed[i / 2];
            const float w = code[i % 2 ? byte & 15 : byte >> 4] * s;
            if (bf16)
                ((uint16_t *)out)[i] = to_bf16(w);
            else
                ((float *)out)[i] = w;
        }
    }
}

/* Which decode loop this machine runs: 2 = AVX2, 1 = scalar. */
int loralab_dequantize_kind(void) {
#ifdef LORALAB_X86
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 1;
}
