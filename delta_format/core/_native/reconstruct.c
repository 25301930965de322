/* A bf16 parameter from its base and one delta, a row at a time (SPEC §9, §9.1), and the same
 * rounding for rows formed elsewhere. */
#include "seeded.h"

/* out = acc rounded to bfloat16 with dither d (SPEC §9.1): a (the value away from zero) iff
 * d < acc's low 16 bits, i.e. iff low + 0xFFFF - d carries into the top half, t's pattern.
 * Returns nonzero where an element is an edge (t = bfloat16's largest magnitude, an infinity or a
 * NaN), which the caller rounds with the torch path instead. */
VECTOR_CLONES
static uint32_t cast_row(const float *restrict acc, uint16_t *restrict out, const uint16_t *restrict dither,
                         int64_t cols) {
    uint32_t edge = 0;
    for (int64_t c = 0; c < cols; c++) {
        uint32_t u;
        memcpy(&u, acc + c, 4);
        edge |= (uint32_t)(((u >> 16) & 0x7FFFu) >= 0x7F7Fu);
        out[c] = (uint16_t)((u - (uint32_t)dither[c] + 0xFFFFu) >> 16);
    }
    return edge;
}

/* signs[c] = +1 or -1 for the cols sign bits from bit `bit` of `bits` (SPEC §5.3's order): a
 * 32-byte copy of a table row per whole byte. Kept apart from the arithmetic, which then runs
 * over contiguous floats and vectorises (a table row per byte inside it does not). */
static void expand_signs(float *restrict signs, const uint8_t *restrict bits, int64_t bit, int64_t cols) {
    int64_t c = 0;
    for (; c < cols && (bit & 7); c++, bit++) signs[c] = SIGNS[bits[bit >> 3]][bit & 7];
    const uint8_t *restrict bytes = bits + (bit >> 3);
    const int64_t whole = (cols - c) >> 3;
    for (int64_t j = 0; j < whole; j++) memcpy(signs + c + 8 * j, SIGNS[bytes[j]], sizeof(SIGNS[0]));
    c += whole * 8;
    bit += whole * 8;
    for (; c < cols; c++, bit++) signs[c] = SIGNS[bits[bit >> 3]][bit & 7];
}

/* acc += s * signs: the sign delta's row (the product is exact: signs are +-1). */
VECTOR_CLONES
static void sign_row(float *restrict acc, const float *restrict signs, int64_t cols, float s) {
    for (int64_t c = 0; c < cols; c++) acc[c] += signs[c] * s;
}

/* out = round(bf16 base + s * signs) in one loop: a sign row on a bfloat16 base, the common case;
 * the same arithmetic as base_row + sign_row + cast_row, without the float32 row in between. */
VECTOR_CLONES
static uint32_t sign_cast_row(const uint16_t *restrict base, const float *restrict signs, float s,
                              const uint16_t *restrict dither, uint16_t *restrict out, int64_t cols) {
    uint32_t edge = 0;
    for (int64_t c = 0; c < cols; c++) {
        float f = bf16_value(base[c]) + signs[c] * s;
        uint32_t u;
        memcpy(&u, &f, 4);
        edge |= (uint32_t)(((u >> 16) & 0x7FFFu) >= 0x7F7Fu);
        out[c] = (uint16_t)((u - (uint32_t)dither[c] + 0xFFFFu) >> 16);
    }
    return edge;
}

VECTOR_CLONES
static void base_row(float *restrict acc, const uint16_t *restrict base, int64_t cols) {
    for (int64_t c = 0; c < cols; c++) acc[c] = bf16_value(base[c]);
}

/* ---- cast_window_bf16 ------------------------------------------------------------------------ */

typedef struct {
    const float *acc;
    uint16_t *out;
    const uint16_t *table;
    const int64_t *offsets;
    int64_t cols;
} cast_args;

static void cast_rows(void *p, int64_t first, int64_t last, int64_t *edges) {
    const cast_args *a = (const cast_args *)p;
    for (int64_t r = first; r < last; r++)
        if (cast_row(a->acc + r * a->cols, a->out + r * a->cols, a->table + a->offsets[r], a->cols)) {
            *edges += 1;
            return;
        }
}

PyObject *cast_window_bf16(PyObject *self, PyObject *args) {
    unsigned long long acc, out, table, offsets;
    long long rows, cols;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKKLLi", &acc, &out, &table, &offsets, &rows, &cols, &threads)) return NULL;
    cast_args a = {(const float *)(uintptr_t)acc, (uint16_t *)(uintptr_t)out, (const uint16_t *)(uintptr_t)table,
                   (const int64_t *)(uintptr_t)offsets, cols};
    int64_t edges;
    Py_BEGIN_ALLOW_THREADS
    edges = split_rows(cast_rows, &a, rows, cols, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(edges);
}

/* ---- reconstruct_bf16: a whole parameter in one pass ----------------------------------------- */

typedef struct {
    uint16_t *out;
    int64_t cols, known; /* rows [known, rows) are not in the base: they start from zero (SPEC §9.2) */
    const void *base;
    int base_f32; /* else bfloat16 */
    const uint16_t *table;
    const int64_t *offsets;
    const uint8_t *bits; /* sign part (NULL: none) */
    const float *row_scale;
    float scale;
    const int64_t *positions; /* sparse part (NULL: none): ascending flat positions */
    int64_t kept;
    const stream_t *stream; /* or a seeded sparse part (NULL: none): positions drawn as the rows are made */
    const int64_t *checkpoints;
    int64_t chunk;
    const void *values;
    int values_f32; /* else bfloat16 */
    float value_scale, alpha;
} fused_args;

static inline float kept_value(const fused_args *a, int64_t k) {
    float v = a->values_f32 ? ((const float *)a->values)[k] : bf16_value(((const uint16_t *)a->values)[k]);
    if (a->value_scale != 1.0f) v *= a->value_scale;
    if (a->alpha != 1.0f) v *= a->alpha;
    return v;
}

static void fused_rows(void *p, int64_t first, int64_t last, int64_t *edges) {
    const fused_args *a = (const fused_args *)p;
    const int64_t cols = a->cols;
    float *acc = (float *)malloc((size_t)(cols > 0 ? cols : 1) * 2 * sizeof(float));
    if (!acc) {
        *edges += last - first; /* no memory for a row: the caller takes the torch path */
        return;
    }
    float *signs = acc + (cols > 0 ? cols : 1); /* a sign row's +-1 values, beside the sums */
    int64_t next = 0; /* the first kept position at or after this slice's first element */
    if (a->positions) {
        int64_t lo = 0, hi = a->kept, begin = first * cols;
        while (lo < hi) {
            int64_t mid = (lo + hi) >> 1;
            if (a->positions[mid] < begin)
                lo = mid + 1;
            else
                hi = mid;
        }
        next = lo;
    }
    int64_t at = 0; /* seeded: the position of counter `next` */
    if (a->stream && a->kept) {
        /* the last chunk whose walk starts before this slice, then counter by counter to it */
        int64_t lo = 0, hi = (a->kept + a->chunk - 1) / a->chunk - 1, begin = first * cols;
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) >> 1;
            if (a->checkpoints[mid] < begin)
                lo = mid;
            else
                hi = mid - 1;
        }
        next = lo * a->chunk;
        at = a->checkpoints[lo] + gap_at(a->stream, (uint64_t)next) + 1;
        while (at < begin && next + 1 < a->kept) at += gap_at(a->stream, (uint64_t)++next) + 1;
        if (at < begin) next = a->kept; /* every kept position lies before this slice */
    }
    for (int64_t r = first; r < last; r++) {
        const float s = a->row_scale ? a->row_scale[r] : a->scale;
        if (a->bits) expand_signs(signs, a->bits, r * cols, cols);
        if (a->bits && !a->base_f32 && r < a->known) { /* a sign delta is the only part */
            if (sign_cast_row((const uint16_t *)a->base + r * cols, signs, s, a->table + a->offsets[r],
                              a->out + r * cols, cols)) {
                *edges += 1;
                break;
            }
            continue;
        }
        if (r < a->known && a->base_f32) {
            memcpy(acc, (const float *)a->base + r * cols, (size_t)cols * sizeof(float));
        } else if (r < a->known) {
            base_row(acc, (const uint16_t *)a->base + r * cols, cols);
        } else {
            memset(acc, 0, (size_t)cols * sizeof(float));
        }
        if (a->bits) sign_row(acc, signs, cols, s);
        if (a->positions) {
            const int64_t begin = r * cols, end = begin + cols;
            for (; next < a->kept && a->positions[next] < end; next++) {
                if (a->positions[next] < begin) { /* not ascending: the caller checked, but never write outside */
                    *edges += last - r;
                    free(acc);
                    return;
                }
                acc[a->positions[next] - begin] += kept_value(a, next);
            }
        }
        if (a->stream) {
            const int64_t begin = r * cols, end = begin + cols;
            for (; next < a->kept && at < end; next++) {
                acc[at - begin] += kept_value(a, next);
                if (next + 1 < a->kept) at += gap_at(a->stream, (uint64_t)(next + 1)) + 1;
            }
        }
        if (cast_row(acc, a->out + r * cols, a->table + a->offsets[r], cols)) {
            *edges += 1;
            break;
        }
    }
    free(acc);
}

PyObject *reconstruct_bf16(PyObject *self, PyObject *args) {
    fused_args a;
    unsigned long long out, base, table, offsets, bits, row_scale, positions, values;
    unsigned long long key, ascending, above, inside, exact_below, checkpoints;
    long long rows, cols, known, kept, n, chunk;
    int base_f32, values_f32, seeded, threads;
    float scale, value_scale, alpha;
    if (!PyArg_ParseTuple(args, "KLLLKiKKKKfKLKiffi" STREAM_FORMAT "KLi", &out, &rows, &cols, &known, &base, &base_f32,
                          &table, &offsets, &bits, &row_scale, &scale, &positions, &kept, &values, &values_f32,
                          &value_scale, &alpha, &seeded, &key, &ascending, &n, &above, &inside, &exact_below,
                          &checkpoints, &chunk, &threads))
        return NULL;
    stream_t g;
    parse_stream(&g, key, ascending, n, above, inside, exact_below);
    a.out = (uint16_t *)(uintptr_t)out;
    a.cols = cols;
    a.known = known;
    a.base = (const void *)(uintptr_t)base;
    a.base_f32 = base_f32;
    a.table = (const uint16_t *)(uintptr_t)table;
    a.offsets = (const int64_t *)(uintptr_t)offsets;
    a.bits = (const uint8_t *)(uintptr_t)bits;
    a.row_scale = (const float *)(uintptr_t)row_scale;
    a.scale = scale;
    a.positions = (const int64_t *)(uintptr_t)positions;
    a.kept = kept;
    a.stream = seeded ? &g : NULL;
    a.checkpoints = (const int64_t *)(uintptr_t)checkpoints;
    a.chunk = chunk;
    a.values = (const void *)(uintptr_t)values;
    a.values_f32 = values_f32;
    a.value_scale = value_scale;
    a.alpha = alpha;
    int64_t edges;
    Py_BEGIN_ALLOW_THREADS
    edges = split_rows(fused_rows, &a, rows, cols, threads);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(edges);
}

