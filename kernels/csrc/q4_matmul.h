/*
 * y = x @ w.T for a 4-bit weight in torch's own CPU int4 layout (what
 * `torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)` returns), for a few rows of
 * float32 activations: the matmul of a decode step, which streams the weight once.
 *
 * The layout (checked against torch at load by `kernels/fused_decode.py`, which refuses the
 * C path where it differs): output rows in blocks of 64; a block holds, for each input
 * column k, 32 bytes whose low nibbles are the codes of rows 0..31 of the block and whose
 * high nibbles those of rows 32..63. `scales_and_zeros` is bfloat16 [cols / 32, rows, 2]:
 * w[n, k] = (code - 8) * scale + zero per group of 32 columns, as torch's kernel reads it.
 *
 * Per group the codes are summed against x in float32, then scaled once:
 *   y[n] += scale * sum(code * x) + (zero - 8 * scale) * sum(x)
 * so the inner loop is a widening and a multiply-add per code, and each code is widened
 * once for all the rows of x (up to Q4_ROWS per pass).
 */
#ifndef PAGEDSERVE_Q4_MATMUL_H
#define PAGEDSERVE_Q4_MATMUL_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define Q4_BLOCK 64 /* output rows per block of the packed layout */
#define Q4_GROUP 32 /* input columns per scale and zero */
#define Q4_ROWS 4   /* rows of x per pass over a block: their accumulators stay in registers */

/* One block of 64 output rows for `m` (1..Q4_ROWS, a constant after inlining) rows of x:
 * y[r * y_stride + n] for n in the block, r < m. */
static inline __attribute__((always_inline)) void q4_block_pass(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const uint8_t *block,
    const uint32_t *scales_and_zeros, int64_t rows, int64_t cols, const int m)
{
#ifdef __AVX512F__
    __m512 out[Q4_ROWS][4];
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < 4; ++j)
            out[r][j] = _mm512_setzero_ps();
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < cols / Q4_GROUP; ++g) {
        __m512 acc[Q4_ROWS][4];
        float sums[Q4_ROWS];
        for (int r = 0; r < m; ++r) {
            sums[r] = 0.0f;
            for (int j = 0; j < 4; ++j)
                acc[r][j] = _mm512_setzero_ps();
        }
        for (int64_t k = g * Q4_GROUP; k < (g + 1) * Q4_GROUP; ++k) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(block + k * 32));
            const __m256i lo = _mm256_and_si256(bytes, low_nibbles);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles);
            const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
            const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
            const __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
            const __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
            for (int r = 0; r < m; ++r) {
                const float xk = x[r * x_stride + k];
                const __m512 xv = _mm512_set1_ps(xk);
                sums[r] += xk;
                acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
                acc[r][2] = _mm512_fmadd_ps(w2, xv, acc[r][2]);
                acc[r][3] = _mm512_fmadd_ps(w3, xv, acc[r][3]);
            }
        }
        const uint32_t *pairs = scales_and_zeros + g * rows;
        for (int j = 0; j < 4; ++j) {
            const __m512i bits = _mm512_loadu_si512((const void *)(pairs + j * 16));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u)));
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero); /* zero - 8 scale */
            for (int r = 0; r < m; ++r)
                out[r][j] = _mm512_fmadd_ps(scale, acc[r][j], _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r]), out[r][j]));
        }
    }
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < 4; ++j)
            _mm512_storeu_ps(y + r * y_stride + j * 16, out[r][j]);
#else
    float out[Q4_ROWS][Q4_BLOCK] = {{0}};
    for (int64_t g = 0; g < cols / Q4_GROUP; ++g) {
        float acc[Q4_ROWS][Q4_BLOCK] = {{0}};
        float sums[Q4_ROWS] = {0};
        for (int64_t k = g * Q4_GROUP; k < (g + 1) * Q4_GROUP; ++k) {
            const uint8_t *bytes = block + k * 32;
            float w[Q4_BLOCK];
            for (int j = 0; j < 32; ++j) {
                w[j] = (float)(bytes[j] & 0x0F);
                w[j + 32] = (float)(bytes[j] >> 4);
            }
            for (int r = 0; r < m; ++r) {
                const float xk = x[r * x_stride + k];
                sums[r] += xk;
                for (int j = 0; j < Q4_BLOCK; ++j)
                    acc[r][j] += w[j] * xk;
            }
        }
        const uint32_t *pairs = scales_and_zeros + g * rows;
        for (int j = 0; j < Q4_BLOCK; ++j) {
            const float scale = bf16_to_f32((uint16_t)(pairs[j] & 0xFFFFu));
            const float zero = bf16_to_f32((uint16_t)(pairs[j] >> 16));
            for (int r = 0; r < m; ++r)
                out[r][j] += scale * acc[r][j] + (zero - 8.0f * scale) * sums[r];
        }
    }
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < Q4_BLOCK; ++j)
            y[r * y_stride + j] = out[r][j];
#endif
}

#ifdef __AVX512BF16__
#define Q4_HAS_BF16_DOT 1

/* Group i (32 values) of x rounded to bfloat16 for q4_block_pass_bf16: xb[r * cols + k],
 * and the float32 sum of the rounded group, sums[r * cols / 32 + g] (the offset term must
 * use the very values the products use). Groups are independent: threads may split them. */
static inline void q4_round_group(uint16_t *xb, float *sums, const float *x, int64_t i)
{
    float sum = 0.0f;
    for (int64_t k = i * Q4_GROUP; k < (i + 1) * Q4_GROUP; ++k) {
        xb[k] = f32_to_bf16(x[k]);
        sum += bf16_to_f32(xb[k]);
    }
    sums[i] = sum;
}

/* Four vectors of 16 rows' (column k, column k + 1) code pairs as bfloat16 `code + 128`
 * (0x4300 | code is exactly 128 + code in bfloat16), in row order 0..63. */
static inline void q4_pair_codes(__m512i w[4], const uint8_t *column_k)
{
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    const __m512i bias = _mm512_set1_epi16(0x4300);
    const __m256i a = _mm256_loadu_si256((const __m256i *)column_k);
    const __m256i b = _mm256_loadu_si256((const __m256i *)(column_k + 32));
    const __m256i halves[2][2] = {
        {_mm256_and_si256(a, low_nibbles), _mm256_and_si256(b, low_nibbles)},
        {_mm256_and_si256(_mm256_srli_epi16(a, 4), low_nibbles), _mm256_and_si256(_mm256_srli_epi16(b, 4), low_nibbles)},
    };
    for (int h = 0; h < 2; ++h) {
        /* unpack interleaves within 128-bit lanes: lo holds rows 0-7 | 16-23, hi 8-15 | 24-31 */
        const __m256i lo = _mm256_unpacklo_epi8(halves[h][0], halves[h][1]);
        const __m256i hi = _mm256_unpackhi_epi8(halves[h][0], halves[h][1]);
        w[2 * h] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x20)), bias);
        w[2 * h + 1] = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_permute2x128_si256(lo, hi, 0x31)), bias);
    }
}

/* q4_block_pass with bfloat16 activations and AVX512-BF16 dot products (two columns per
 * instruction, twice the multiply-adds of float32 FMAs): with codes biased by 128,
 *   y[n] += scale * sum((code + 128) * x) + (zero - 136 * scale) * sum(x). */
static inline __attribute__((always_inline)) void q4_block_pass_bf16(
    float *y, int64_t y_stride, const uint16_t *xb, const float *sums, const uint8_t *block,
    const uint32_t *scales_and_zeros, int64_t rows, int64_t cols, const int m)
{
    __m512 out[Q4_ROWS][4];
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < 4; ++j)
            out[r][j] = _mm512_setzero_ps();
    const int64_t groups = cols / Q4_GROUP;
    for (int64_t g = 0; g < groups; ++g) {
        __m512 acc[Q4_ROWS][4];
        for (int r = 0; r < m; ++r)
            for (int j = 0; j < 4; ++j)
                acc[r][j] = _mm512_setzero_ps();
        for (int64_t k = g * Q4_GROUP; k < (g + 1) * Q4_GROUP; k += 2) {
            __m512i w[4];
            q4_pair_codes(w, block + k * 32);
            for (int r = 0; r < m; ++r) {
                int32_t pair;
                memcpy(&pair, xb + r * cols + k, sizeof pair);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                for (int j = 0; j < 4; ++j)
                    acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)w[j], xv);
            }
        }
        const uint32_t *pairs = scales_and_zeros + g * rows;
        for (int j = 0; j < 4; ++j) {
            const __m512i bits = _mm512_loadu_si512((const void *)(pairs + j * 16));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
            const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000u)));
            const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale, zero);
            for (int r = 0; r < m; ++r)
                out[r][j] = _mm512_fmadd_ps(scale, acc[r][j],
                                            _mm512_fmadd_ps(offset, _mm512_set1_ps(sums[r * groups + g]), out[r][j]));
        }
    }
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < 4; ++j)
            _mm512_storeu_ps(y + r * y_stride + j * 16, out[r][j]);
}
#else
#define Q4_HAS_BF16_DOT 0
#endif

/* Output rows [64 * block, 64 * block + 64) of y[num_rows, rows] = x[num_rows, cols] @ w.T,
 * any number of rows of x (Q4_ROWS per pass; later passes read the block from cache). With
 * `xb` (x rounded by q4_round_group, where Q4_HAS_BF16_DOT) the bfloat16 dot products run. */
static inline void q4_matmul_block(
    float *y, const float *x, const uint16_t *xb, const float *sums, int64_t num_rows, const uint8_t *packed,
    const uint16_t *scales_and_zeros, int64_t rows, int64_t cols, int64_t block)
{
    const uint8_t *weights = packed + block * Q4_BLOCK * (cols / 2);
    const uint32_t *pairs = (const uint32_t *)scales_and_zeros + block * Q4_BLOCK;
    for (int64_t r = 0; r < num_rows; r += Q4_ROWS) {
        float *yr = y + r * rows + block * Q4_BLOCK;
        const int m = num_rows - r < Q4_ROWS ? (int)(num_rows - r) : Q4_ROWS;
#if Q4_HAS_BF16_DOT
        if (xb) {
            const uint16_t *xr = xb + r * cols;
            const float *sr = sums + r * (cols / Q4_GROUP);
            switch (m) {
            case 1: q4_block_pass_bf16(yr, rows, xr, sr, weights, pairs, rows, cols, 1); break;
            case 2: q4_block_pass_bf16(yr, rows, xr, sr, weights, pairs, rows, cols, 2); break;
            case 3: q4_block_pass_bf16(yr, rows, xr, sr, weights, pairs, rows, cols, 3); break;
            default: q4_block_pass_bf16(yr, rows, xr, sr, weights, pairs, rows, cols, 4); break;
            }
            continue;
        }
#endif
        (void)xb, (void)sums;
        const float *xr = x + r * cols;
        switch (m) {
        case 1: q4_block_pass(yr, rows, xr, cols, weights, pairs, rows, cols, 1); break;
        case 2: q4_block_pass(yr, rows, xr, cols, weights, pairs, rows, cols, 2); break;
        case 3: q4_block_pass(yr, rows, xr, cols, weights, pairs, rows, cols, 3); break;
        default: q4_block_pass(yr, rows, xr, cols, weights, pairs, rows, cols, 4); break;
        }
    }
}

#endif
