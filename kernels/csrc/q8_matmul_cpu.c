/*
 * y = x @ w.T for an int8 weight with one float32 scale per 32 input columns, for a few rows
 * of float32 activations on CPUs: the LM head of a decode step, which streams its weight once
 * (the embedded model's head, 49152 x 576, is its largest matmul).
 *
 * Layout (made by kernels/q8_matmul.py): output rows in blocks of 16; codes int8
 * [rows / 16, cols, 16] (for each input column, the codes of the block's 16 rows side by
 * side), scales float32 [rows / 16, cols / 32, 16]. So one 16-byte load widens into one
 * vector of 16 rows' weights, multiplied by a broadcast activation: no horizontal sums.
 * Per group of 32 columns the codes are summed against x, then scaled once:
 *   y[n] = sum over groups of scale[n, g] * sum(code[n, k] * x[k])
 *
 * Threads (OpenMP, torch's runtime) split the blocks; up to 4 rows of x share each widening.
 */

#include <stdint.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define Q8_BLOCK 16
#define Q8_GROUP 32
#define Q8_ROWS 4

static inline __attribute__((always_inline)) void q8_block_pass(
    float *y, int64_t y_stride, const float *x, int64_t x_stride, const int8_t *codes, const float *scales,
    int64_t cols, const int m)
{
#ifdef __AVX512F__
    __m512 out[Q8_ROWS];
    for (int r = 0; r < m; ++r)
        out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < cols / Q8_GROUP; ++g) {
        __m512 acc[Q8_ROWS];
        for (int r = 0; r < m; ++r)
            acc[r] = _mm512_setzero_ps();
        for (int64_t k = g * Q8_GROUP; k < (g + 1) * Q8_GROUP; ++k) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + k * Q8_BLOCK))));
            for (int r = 0; r < m; ++r)
                acc[r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * x_stride + k]), acc[r]);
        }
        const __m512 scale = _mm512_loadu_ps(scales + g * Q8_BLOCK);
        for (int r = 0; r < m; ++r)
            out[r] = _mm512_fmadd_ps(scale, acc[r], out[r]);
    }
    for (int r = 0; r < m; ++r)
        _mm512_storeu_ps(y + r * y_stride, out[r]);
#else
    float out[Q8_ROWS][Q8_BLOCK] = {{0}};
    for (int64_t g = 0; g < cols / Q8_GROUP; ++g) {
        float acc[Q8_ROWS][Q8_BLOCK] = {{0}};
        for (int64_t k = g * Q8_GROUP; k < (g + 1) * Q8_GROUP; ++k)
            for (int r = 0; r < m; ++r)
                for (int j = 0; j < Q8_BLOCK; ++j)
                    acc[r][j] += (float)codes[k * Q8_BLOCK + j] * x[r * x_stride + k];
        for (int r = 0; r < m; ++r)
            for (int j = 0; j < Q8_BLOCK; ++j)
                out[r][j] += scales[g * Q8_BLOCK + j] * acc[r][j];
    }
    for (int r = 0; r < m; ++r)
        for (int j = 0; j < Q8_BLOCK; ++j)
            y[r * y_stride + j] = out[r][j];
#endif
}

/* y[num_rows, rows] = x[num_rows, cols] @ w.T, all float32 but the codes. */
void pagedserve_q8_matmul(
    float *y, const float *x, int64_t num_rows, const int8_t *codes, const float *scales, int64_t rows, int64_t cols)
{
#pragma omp parallel for schedule(static)
    for (int64_t block = 0; block < rows / Q8_BLOCK; ++block) {
        const int8_t *block_codes = codes + block * Q8_BLOCK * cols;
        const float *block_scales = scales + block * Q8_BLOCK * (cols / Q8_GROUP);
        for (int64_t r = 0; r < num_rows; r += Q8_ROWS) {
            float *yr = y + r * rows + block * Q8_BLOCK;
            const float *xr = x + r * cols;
            switch (num_rows - r < Q8_ROWS ? num_rows - r : Q8_ROWS) {
            case 1: q8_block_pass(yr, rows, xr, cols, block_codes, block_scales, cols, 1); break;
            case 2: q8_block_pass(yr, rows, xr, cols, block_codes, block_scales, cols, 2); break;
            case 3: q8_block_pass(yr, rows, xr, cols, block_codes, block_scales, cols, 3); break;
            default: q8_block_pass(yr, rows, xr, cols, block_codes, block_scales, cols, 4); break;
            }
        }
    }
}
