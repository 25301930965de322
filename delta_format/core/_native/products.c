/* On-the-fly products: x @ delta.T for a few tokens, from the stored form. */
#include "native.h"

/* Eight float lanes as one value (GCC/Clang vector extension): the sums below stay in vector
 * registers, which arrays of eight floats did not (the compiler added them one lane at a time). */
typedef float v8 __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* v8 never crosses a call: load8 is always inlined */
#endif

static inline __attribute__((always_inline)) v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* Inputs come transposed and padded: xt[c * lanes + t] is token t's column c (zero for t >= the
 * token count), lanes a multiple of 8, so every inner loop runs over 8 contiguous floats and
 * vectorises. Outputs are y[t * rows + r] (float32). */

typedef struct {
    const float *xt, *table, *total;
    int64_t lanes, rows, cols, groups;
    const uint8_t *bits;
    const float *row_scale;
    float scale;
    float *y;
} sign_product_args;

/* table[(g * 16 + n) * lanes + t] = sum of x[4g + k][t] over the bits k set in nibble n: one add
 * per entry (n without its lowest bit, plus that bit's column); total[t] = sum of x[c][t]. */
VECTOR_CLONES
static void nibble_table(float *restrict table, float *restrict total, const float *restrict xt, int64_t groups,
                         int64_t lanes) {
    for (int64_t t = 0; t < lanes; t++) total[t] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float *restrict tab = table + g * 16 * lanes;
        for (int64_t t = 0; t < lanes; t++) tab[t] = 0.0f;
        for (int n = 1; n < 16; n++) {
            const float *restrict prev = tab + (int64_t)(n & (n - 1)) * lanes;
            const float *restrict col = xt + (4 * g + __builtin_ctz((unsigned)n)) * lanes;
            float *restrict entry = tab + (int64_t)n * lanes;
            for (int64_t t = 0; t < lanes; t++) entry[t] = prev[t] + col[t];
        }
        for (int64_t t = 0; t < lanes; t++) total[t] += tab[15 * lanes + t];
    }
}

/* y[t][r] = s_r * (2 * sum over the set bits of x - sum of x): x . (2 * bit - 1), one table entry
 * of partial sums per four bits (the LUT-GEMM idea: no +-1 matrix, no multiply per weight). A
 * table of 16 entries per four columns stays in the core's cache (2816 columns, 8 tokens: 360 KB),
 * where one of 256 entries per byte (2.9 MB) did not: 1024 x 2816, 8 tokens, 0.91 against 1.45 ms.
 * Eight lanes at a time, four independent sums so that the adds do not wait on each other. */
VECTOR_CLONES
static void sign_product_rows(void *p, int64_t first, int64_t last, int64_t *unused) {
    const sign_product_args *a = (const sign_product_args *)p;
    const int64_t lanes = a->lanes, bytes_per_row = a->cols / 8, step = 16 * lanes;
    (void)unused;
    for (int64_t r = first; r < last; r++) {
        const uint8_t *restrict bytes = a->bits + r * bytes_per_row;
        const float s = a->row_scale ? a->row_scale[r] : a->scale;
        for (int64_t q = 0; q < lanes; q += 8) {
            v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            const float *restrict tab = a->table + q;
            int64_t j = 0;
            for (; j + 2 <= bytes_per_row; j += 2, tab += 4 * step) {
                const unsigned b0 = bytes[j], b1 = bytes[j + 1];
                s0 += load8(tab + (b0 & 15) * lanes);
                s1 += load8(tab + step + (b0 >> 4) * lanes);
                s2 += load8(tab + 2 * step + (b1 & 15) * lanes);
                s3 += load8(tab + 3 * step + (b1 >> 4) * lanes);
            }
            for (; j < bytes_per_row; j++, tab += 2 * step) {
                const unsigned b0 = bytes[j];
                s0 += load8(tab + (b0 & 15) * lanes);
                s1 += load8(tab + step + (b0 >> 4) * lanes);
            }
            const v8 sum = (s0 + s1) + (s2 + s3);
            for (int t = 0; t < 8; t++) a->y[(q + t) * a->rows + r] = s * (2.0f * sum[t] - a->total[q + t]);
        }
    }
}

PyObject *sign_product(PyObject *self, PyObject *args) {
    unsigned long long xt, table, total, bits, row_scale, y;
    long long lanes, rows, cols;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLKKfKi", &xt, &table, &total, &lanes, &rows, &cols, &bits, &row_scale, &scale,
                          &y, &threads))
        return NULL;
    sign_product_args a = {(const float *)(uintptr_t)xt, (const float *)(uintptr_t)table,
                           (const float *)(uintptr_t)total, lanes, rows, cols, cols / 4,
                           (const uint8_t *)(uintptr_t)bits, (const float *)(uintptr_t)row_scale, scale,
                           (float *)(uintptr_t)y};
    Py_BEGIN_ALLOW_THREADS
    nibble_table((float *)(uintptr_t)table, (float *)(uintptr_t)total, a.xt, a.groups, lanes);
    split_rows(sign_product_rows, &a, rows, cols * lanes / 8, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

typedef struct {
    const float *xt;
    int64_t lanes, rows, cols, kept;
    const int32_t *pos32;
    const int64_t *pos64;
    const void *values;
    int values_f32;
    float *y;
} sparse_product_args;

static inline int64_t position_at(const sparse_product_args *a, int64_t k) {
    return a->pos32 ? (int64_t)a->pos32[k] : a->pos64[k];
}

/* y[t][r] = sum over the kept (r, c, v) of v * x[c][t]: one 8-lane multiply-add per kept value,
 * walking the ascending positions of rows first .. last - 1 (two sums, alternating, so that the
 * adds do not wait on each other). */
VECTOR_CLONES
static void sparse_product_rows(void *p, int64_t first, int64_t last, int64_t *unused) {
    const sparse_product_args *a = (const sparse_product_args *)p;
    const int64_t lanes = a->lanes, cols = a->cols;
    (void)unused;
    int64_t lo = 0, hi = a->kept; /* the first position in row `first` or later */
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (position_at(a, mid) < first * cols)
            lo = mid + 1;
        else
            hi = mid;
    }
    const int64_t start = lo;
    for (int64_t q = 0; q < lanes; q += 8) {
        int64_t k = start;
        for (int64_t r = first; r < last; r++) {
            const int64_t begin = r * cols, end = begin + cols;
            v8 s0 = {0}, s1 = {0};
            for (int64_t n = 0; k < a->kept; k++, n++) {
                const int64_t at = position_at(a, k);
                if (at >= end) break;
                if (at < begin) continue; /* not ascending: never read outside x (the caller checked) */
                const float v =
                    a->values_f32 ? ((const float *)a->values)[k] : bf16_value(((const uint16_t *)a->values)[k]);
                const v8 term = v * load8(a->xt + (at - begin) * lanes + q);
                if (n & 1)
                    s1 += term;
                else
                    s0 += term;
            }
            const v8 sum = s0 + s1;
            for (int t = 0; t < 8; t++) a->y[(q + t) * a->rows + r] = sum[t];
        }
    }
}

PyObject *sparse_product(PyObject *self, PyObject *args) {
    unsigned long long xt, positions, values, y;
    long long lanes, rows, cols, kept;
    int pos32, values_f32, threads;
    if (!PyArg_ParseTuple(args, "KLLLKiLKiKi", &xt, &lanes, &rows, &cols, &positions, &pos32, &kept, &values,
                          &values_f32, &y, &threads))
        return NULL;
    sparse_product_args a = {(const float *)(uintptr_t)xt, lanes, rows, cols, kept,
                             pos32 ? (const int32_t *)(uintptr_t)positions : NULL,
                             pos32 ? NULL : (const int64_t *)(uintptr_t)positions,
                             (const void *)(uintptr_t)values, values_f32, (float *)(uintptr_t)y};
    Py_BEGIN_ALLOW_THREADS
    split_rows(sparse_product_rows, &a, rows, cols, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

