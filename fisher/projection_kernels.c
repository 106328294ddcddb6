/* The column walk of a sparse projection (fisher/projection.py, ProjectionStack), in C.
 *
 * by_columns adds P[:, columns] @ x to acc for one band of rows of P, stored column-compressed
 * (indptr, rows, signs; values +-scale). It computes every element with the operations, in the
 * order, of the Numba kernel `by_columns` in fisher/projection.py (and so of SciPy's csc_matvecs
 * into zeros followed by acc += result): sums = +0.0, then for each column j, for each of its
 * non-zeros in storage order, sums[r] += value * x[j] (a float32 product, then a float32 sum), then
 * acc += sums. Compiled without fused multiply-adds (-ffp-contract=off) and without fast-math, its
 * results are bitwise the Numba kernel's; it is faster because a column's B values are read from a
 * gathered tile (below) and `restrict` spares the per-non-zero alias checks
 * (tests/fisher/test_projection.py).
 *
 * x is given as one or two blocks of images (x0: n0 images, x1: n1 images), each element
 * (image k, column j) at x[k * sk + j * sj], so a block can be read as fisher_scores yields it
 * (images x features) or transposed. acc has nrows rows of B = n0 + n1 contiguous floats,
 * acc_stride floats apart; sums is scratch of nrows * B floats.
 */
#include <stdint.h>
#include <string.h>

#define XT_FLOATS 8192              /* gathered values of a tile of columns (32 KB): XT_FLOATS / B columns */

/* The walk, in tiles of columns. A block read as fisher_scores yields it (images x features) holds a
 * column's B values in B cache lines, one float of each. A tile whose columns have 4 non-zeros each on
 * average first gathers its columns' values side by side (xt, in L1): 2.3x faster on the MNIST
 * PixelCNN's blocks (about 13 non-zeros per column and band) than gathering column by column, which a
 * sparser tile still does, only for the columns it uses (tmp, in registers): the paper-size Pyramid's
 * blocks (about 2 per column and band) took 1.2x as long gathered. A transposed block (one block, its
 * columns contiguous) is read in place. */
#define COLUMN(B, j, xj)                                                                            \
    for (int32_t p = indptr[j], p1 = indptr[(j) + 1]; p < p1; p++) {                                \
        const float value = (float)signs[p] * scale;                                                \
        float *restrict s = sums + (int64_t)rows[p] * (B);                                          \
        for (int64_t k = 0; k < (B); k++) s[k] += value * (xj)[k];                                  \
    }

#define WALK(B)                                                                                     \
    memset(sums, 0, sizeof(float) * (size_t)nrows * (size_t)(B));                                   \
    const int64_t tile = XT_FLOATS / (B) > 0 ? XT_FLOATS / (B) : 1;                                 \
    if (n1 == 0 && s0k == 1) {                      /* transposed: each column's values contiguous */ \
        for (int64_t j = 0; j < m; j++) {                                                           \
            const float *restrict xj = x0 + j * s0j;                                                \
            COLUMN(B, j, xj)                                                                        \
        }                                                                                           \
    } else {                                                                                        \
        for (int64_t j0 = 0; j0 < m; j0 += tile) {                                                  \
            const int64_t nj = m - j0 < tile ? m - j0 : tile;                                       \
            if ((int64_t)(indptr[j0 + nj] - indptr[j0]) >= 4 * nj) {          /* gather the tile */ \
                for (int64_t k = 0; k < n0; k++)                                                    \
                    for (int64_t jj = 0; jj < nj; jj++) xt[jj * (B) + k] = x0[k * s0k + (j0 + jj) * s0j]; \
                for (int64_t k = 0; k < n1; k++)                                                    \
                    for (int64_t jj = 0; jj < nj; jj++)                                             \
                        xt[jj * (B) + n0 + k] = x1[k * s1k + (j0 + jj) * s1j];                      \
                for (int64_t jj = 0; jj < nj; jj++) {                                               \
                    const float *restrict xj = xt + jj * (B);                                       \
                    COLUMN(B, j0 + jj, xj)                                                          \
                }                                                                                   \
            } else {                                                 /* only the columns it uses */ \
                for (int64_t j = j0; j < j0 + nj; j++) {                                            \
                    if (indptr[j] == indptr[j + 1]) continue;                                       \
                    for (int64_t k = 0; k < n0; k++) tmp[k] = x0[k * s0k + j * s0j];                \
                    for (int64_t k = 0; k < n1; k++) tmp[n0 + k] = x1[k * s1k + j * s1j];           \
                    COLUMN(B, j, tmp)                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }                                                                                               \
    for (int64_t r = 0; r < nrows; r++) {                                                           \
        float *restrict a = acc + r * acc_stride;                                                   \
        const float *restrict s = sums + r * (B);                                                   \
        for (int64_t k = 0; k < (B); k++) a[k] += s[k];                                             \
    }

#define FIXED(B)                                                                                    \
    static void by_columns_##B(const int32_t *restrict indptr, const int32_t *restrict rows,        \
                               const int8_t *restrict signs, const float scale,                     \
                               const float *restrict x0, const int64_t n0, const int64_t s0k,       \
                               const int64_t s0j, const float *restrict x1, const int64_t n1,       \
                               const int64_t s1k, const int64_t s1j, const int64_t m,               \
                               float *restrict acc, const int64_t acc_stride, const int64_t nrows,  \
                               float *restrict sums) {                                              \
        float xt[XT_FLOATS] __attribute__((aligned(64)));                                           \
        float tmp[B] __attribute__((aligned(64)));                                                  \
        WALK(B)                                                                                     \
    }

FIXED(16)
FIXED(32)
FIXED(64)

static void by_columns_any(const int32_t *restrict indptr, const int32_t *restrict rows,
                           const int8_t *restrict signs, const float scale,
                           const float *restrict x0, const int64_t n0, const int64_t s0k,
                           const int64_t s0j, const float *restrict x1, const int64_t n1,
                           const int64_t s1k, const int64_t s1j, const int64_t m,
                           float *restrict acc, const int64_t acc_stride, const int64_t nrows,
                           float *restrict sums) {
    const int64_t b = n0 + n1;
    float xt[XT_FLOATS > b ? XT_FLOATS : b];
    float tmp[b];
    WALK(b)
}

/* The entry point: the B = n0 + n1 of the usual chunk sizes get a loop the compiler unrolls. */
void by_columns(const int32_t *indptr, const int32_t *rows, const int8_t *signs, float scale,
                const float *x0, int64_t n0, int64_t s0k, int64_t s0j,
                const float *x1, int64_t n1, int64_t s1k, int64_t s1j,
                int64_t m, float *acc, int64_t acc_stride, int64_t nrows, float *sums) {
    switch (n0 + n1) {
    case 16: by_columns_16(indptr, rows, signs, scale, x0, n0, s0k, s0j, x1, n1, s1k, s1j, m, acc, acc_stride, nrows, sums); break;
    case 32: by_columns_32(indptr, rows, signs, scale, x0, n0, s0k, s0j, x1, n1, s1k, s1j, m, acc, acc_stride, nrows, sums); break;
    case 64: by_columns_64(indptr, rows, signs, scale, x0, n0, s0k, s0j, x1, n1, s1k, s1j, m, acc, acc_stride, nrows, sums); break;
    default: by_columns_any(indptr, rows, signs, scale, x0, n0, s0k, s0j, x1, n1, s1k, s1j, m, acc, acc_stride, nrows, sums);
    }
}

/* Several walks over the same x (the bands of rows of one or more projections), run side by side on
 * nthreads threads of OpenMP: where the library is built with -fopenmp, the pool torch's own
 * operations run on (the same libgomp), so the walks start on threads that are already awake instead
 * of waiting for cores those threads spin on. Each walk writes only its own acc rows and sums. */
int has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void by_columns_tasks(int64_t ntasks, const int32_t *const *indptr, const int32_t *const *rows,
                      const int8_t *const *signs, const float *scale,
                      const float *x0, int64_t n0, int64_t s0k, int64_t s0j,
                      const float *x1, int64_t n1, int64_t s1k, int64_t s1j, int64_t m,
                      float *const *acc, const int64_t *acc_stride, const int64_t *nrows,
                      float *const *sums, int nthreads) {
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; t++)
        by_columns(indptr[t], rows[t], signs[t], scale[t], x0, n0, s0k, s0j, x1, n1, s1k, s1j, m,
                   acc[t], acc_stride[t], nrows[t], sums[t]);
}

/* dst (cols x rows, rows ldd floats apart) = the transpose of src (rows x cols, rows ld apart), in tiles of
 * TILE x TILE that stay in L1, on nthreads OpenMP threads (by bands of columns); with AVX, each 8 x 8 square
 * of a tile in registers. fisher.scores turns the per-image weight gradients of a layer, computed
 * images-major, into the features-major blocks the column walk above reads in place (a column's values
 * side by side). A copy: bits unchanged. */
#if defined(__AVX__)
#include <immintrin.h>
static inline void square8(const float *restrict s, int64_t ld, float *restrict d, int64_t ldd) {
    const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld), r2 = _mm256_loadu_ps(s + 2 * ld),
                 r3 = _mm256_loadu_ps(s + 3 * ld), r4 = _mm256_loadu_ps(s + 4 * ld), r5 = _mm256_loadu_ps(s + 5 * ld),
                 r6 = _mm256_loadu_ps(s + 6 * ld), r7 = _mm256_loadu_ps(s + 7 * ld);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#define SQUARE 8
#else
#define SQUARE 1
static inline void square8(const float *restrict s, int64_t ld, float *restrict d, int64_t ldd) { *d = *s; }
#endif

#define TILE 64
void transpose(const float *restrict src, int64_t rows, int64_t cols, int64_t ld, float *restrict dst,
               int64_t ldd, int nthreads) {
    (void)nthreads;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t c0 = 0; c0 < cols; c0 += TILE) {
        const int64_t c1 = c0 + TILE < cols ? c0 + TILE : cols;
        for (int64_t r0 = 0; r0 < rows; r0 += TILE) {
            const int64_t r1 = r0 + TILE < rows ? r0 + TILE : rows;
            int64_t c = c0;
            for (; c + SQUARE <= c1; c += SQUARE) {
                int64_t r = r0;
                for (; r + SQUARE <= r1; r += SQUARE) square8(src + r * ld + c, ld, dst + c * ldd + r, ldd);
                for (; r < r1; r++)
                    for (int64_t q = c; q < c + SQUARE; q++) dst[q * ldd + r] = src[r * ld + q];
            }
            for (; c < c1; c++)
                for (int64_t r = r0; r < r1; r++) dst[c * ldd + r] = src[r * ld + c];
        }
    }
}
