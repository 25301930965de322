/* Native loops of a first load: an optional extension, built at install where a C compiler is
 * present. `delta_format.core.native` checks every buffer (dtype, contiguity, length, device)
 * before passing its address here, and falls back to torch ops, with the same bits, where the
 * extension is missing or turned off (DELTA_FORMAT_NATIVE=0).
 *
 * The arithmetic is the spec's: integer-exact, or one IEEE float32 operation per step as torch
 * does it (built without fast-math or contraction), so every result is the torch path's bits
 * (tests/test_native.py compares them):
 *
 *   reconstruct_bf16    SPEC §9: a bfloat16 parameter from its base (bfloat16 or float32) and one
 *                       sign (§5.3) or sparse (§5.2) delta, a row at a time: base row + delta row
 *                       in a float32 row buffer, then rounded as SPEC §9.1 "stochastic-window"
 *                       says. A seeded mask's positions (§6) are drawn as the rows are made.
 *   cast_window_bf16    the same rounding of float32 rows formed elsewhere (other encodings).
 *   seeded_positions    SPEC §6: the kept positions of counters start .. start + count - 1.
 *   seeded_checkpoints  where walks of a seeded stream start, so that threads can each take rows.
 *   all_finite          whether stored floats are all finite.
 *
 * A row that cannot be rounded here (an edge: |sum| at bfloat16's largest value or past it, or
 * not finite) is reported, and the caller makes the parameter with the torch path, which handles
 * edges and reports overflows. Loops release the GIL and may split their rows over threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD (1 << 16)

typedef void (*rows_fn)(void *args, int64_t first, int64_t last, int64_t *result);

typedef struct {
    rows_fn fn;
    void *args;
    int64_t first, last, result;
} slice_t;

static void *run_slice(void *arg) {
    slice_t *s = (slice_t *)arg;
    s->fn(s->args, s->first, s->last, &s->result);
    return NULL;
}

/* fn over rows [0, rows), split into up to `threads` slices; the slices' results are summed. */
static int64_t split_rows(rows_fn fn, void *args, int64_t rows, int64_t cols, int threads) {
    int64_t per = cols > 0 ? (MIN_ELEMENTS_PER_THREAD + cols - 1) / cols : rows;
    if (per < 1) per = 1;
    int64_t most = (rows + per - 1) / per;
    int n = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (most < n) n = (int)(most < 1 ? 1 : most);
    slice_t slices[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        slices[i].fn = fn;
        slices[i].args = args;
        slices[i].first = rows * i / n;
        slices[i].last = rows * (i + 1) / n;
        slices[i].result = 0;
        started[i] = i > 0 && pthread_create(&ids[i], NULL, run_slice, &slices[i]) == 0;
    }
    run_slice(&slices[0]);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            run_slice(&slices[i]); /* no thread to be had: this one does it */
        total += slices[i].result;
    }
    return total + slices[0].result;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build for every x86-64: the loader picks the widest vectors the CPU has */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static float SIGNS[256][8]; /* SIGNS[b][k] = +1 if bit k of b is set, else -1 */

static inline float bf16_value(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

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

static PyObject *cast_window_bf16(PyObject *self, PyObject *args) {
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

/* ---- the seeded mask's generator (SPEC §6) ------------------------------------------------ */

static inline uint32_t mix32(uint32_t x) { /* lowbias32 */
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* gap(u) = #{g : T_g > u} for the thresholds `ascending` (n of them, increasing), counted by
 * bucket u >> 20: `above` the thresholds at or past the bucket's end, `inside` the bucket's single
 * threshold as u ^ 2**31 in an int32 (INT32_MIN where none); u below `exact_below` (where buckets
 * hold several) searches `ascending`. The tables are `seeded_mask._gap_lookup`'s. */
typedef struct {
    uint32_t key;
    const int64_t *ascending;
    int64_t n;
    const int32_t *above, *inside;
    uint64_t exact_below;
} stream_t;

static inline int64_t gap_at(const stream_t *g, uint64_t k) {
    uint32_t u = mix32(mix32((uint32_t)k ^ g->key) ^ (uint32_t)(k >> 32));
    if ((uint64_t)u < g->exact_below) {
        int64_t lo = 0, hi = g->n; /* the first threshold > u */
        while (lo < hi) {
            int64_t mid = (lo + hi) >> 1;
            if (g->ascending[mid] <= (int64_t)u)
                lo = mid + 1;
            else
                hi = mid;
        }
        return g->n - lo;
    }
    uint32_t b = u >> 20;
    return g->above[b] + ((int32_t)(u ^ 0x80000000u) < g->inside[b]);
}

static int parse_stream(stream_t *g, unsigned long long key, unsigned long long ascending, long long n,
                        unsigned long long above, unsigned long long inside, unsigned long long exact_below) {
    g->key = (uint32_t)key;
    g->ascending = (const int64_t *)(uintptr_t)ascending;
    g->n = n;
    g->above = (const int32_t *)(uintptr_t)above;
    g->inside = (const int32_t *)(uintptr_t)inside;
    g->exact_below = exact_below;
    return 1;
}

#define STREAM_FORMAT "KKLKKK" /* key, ascending, n, above, inside, exact_below */

/* out[j] = offset - 1 + sum_{i <= j} (gap(u_{start+i}) + 1): the kept positions of counters
 * start .. start + count - 1. */
static PyObject *seeded_positions(PyObject *self, PyObject *args) {
    unsigned long long out_p, key, ascending, above, inside, exact_below, start;
    long long n, count, offset;
    if (!PyArg_ParseTuple(args, "K" STREAM_FORMAT "KLL", &out_p, &key, &ascending, &n, &above, &inside,
                          &exact_below, &start, &count, &offset))
        return NULL;
    stream_t g;
    parse_stream(&g, key, ascending, n, above, inside, exact_below);
    int64_t *out = (int64_t *)(uintptr_t)out_p;
    Py_BEGIN_ALLOW_THREADS
    int64_t pos = offset - 1;
    for (int64_t j = 0; j < count; j++) {
        pos += gap_at(&g, (uint64_t)start + (uint64_t)j) + 1;
        out[j] = pos;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* checkpoints[i] = the position of counter i * chunk - 1 (-1 for i = 0), for i <= ceil(count /
 * chunk), the last entry being counter count - 1's: where a walk from chunk i starts. The chunks'
 * sums are formed on threads, then added up. */
typedef struct {
    const stream_t *g;
    int64_t *sums, chunk, count;
} sums_args;

static void chunk_sums(void *p, int64_t first, int64_t last, int64_t *unused) {
    const sums_args *a = (const sums_args *)p;
    (void)unused;
    for (int64_t i = first; i < last; i++) {
        int64_t end = (i + 1) * a->chunk < a->count ? (i + 1) * a->chunk : a->count, sum = 0;
        for (int64_t k = i * a->chunk; k < end; k++) sum += gap_at(a->g, (uint64_t)k) + 1;
        a->sums[i + 1] = sum;
    }
}

static PyObject *seeded_checkpoints(PyObject *self, PyObject *args) {
    unsigned long long out_p, key, ascending, above, inside, exact_below;
    long long n, count, chunk;
    int threads;
    if (!PyArg_ParseTuple(args, "K" STREAM_FORMAT "LLi", &out_p, &key, &ascending, &n, &above, &inside,
                          &exact_below, &count, &chunk, &threads))
        return NULL;
    stream_t g;
    parse_stream(&g, key, ascending, n, above, inside, exact_below);
    int64_t *out = (int64_t *)(uintptr_t)out_p, chunks = (count + chunk - 1) / chunk;
    sums_args a = {&g, out, chunk, count};
    Py_BEGIN_ALLOW_THREADS
    out[0] = -1;
    split_rows(chunk_sums, &a, chunks, chunk, threads);
    for (int64_t i = 1; i <= chunks; i++) out[i] += out[i - 1];
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    float *signs = acc + (cols > 0 ? cols : 1);
    if (!acc) {
        *edges += last - first; /* no memory for a row: the caller takes the torch path */
        return;
    }
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

static PyObject *reconstruct_bf16(PyObject *self, PyObject *args) {
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

/* ---- on-the-fly products: x @ delta.T for a few tokens, from the stored form ------------------ */

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

/* table[(g * 256 + b) * lanes + t] = sum of x[8g + k][t] over the bits k set in byte b: one add
 * per entry (b without its lowest bit, plus that bit's column); total[t] = sum of x[c][t]. */
VECTOR_CLONES
static void byte_table(float *restrict table, float *restrict total, const float *restrict xt, int64_t groups,
                       int64_t lanes) {
    for (int64_t t = 0; t < lanes; t++) total[t] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float *restrict tab = table + g * 256 * lanes;
        for (int64_t t = 0; t < lanes; t++) tab[t] = 0.0f;
        for (int b = 1; b < 256; b++) {
            const float *restrict prev = tab + (int64_t)(b & (b - 1)) * lanes;
            const float *restrict col = xt + (8 * g + __builtin_ctz((unsigned)b)) * lanes;
            float *restrict entry = tab + (int64_t)b * lanes;
            for (int64_t t = 0; t < lanes; t++) entry[t] = prev[t] + col[t];
        }
        for (int64_t t = 0; t < lanes; t++) total[t] += tab[255 * lanes + t];
    }
}

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

/* y[t][r] = s_r * (2 * sum over the set bits of x - sum of x): x . (2 * bit - 1), one table entry
 * of partial sums per byte of sign bits (the LUT-GEMM idea: no +-1 matrix, no multiply per
 * weight). Eight lanes at a time, four independent sums so that the adds do not wait on each
 * other. */
VECTOR_CLONES
static void sign_product_rows(void *p, int64_t first, int64_t last, int64_t *unused) {
    const sign_product_args *a = (const sign_product_args *)p;
    const int64_t lanes = a->lanes, groups = a->groups, step = 256 * lanes;
    (void)unused;
    for (int64_t r = first; r < last; r++) {
        const uint8_t *restrict bytes = a->bits + r * groups;
        const float s = a->row_scale ? a->row_scale[r] : a->scale;
        for (int64_t q = 0; q < lanes; q += 8) {
            v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0}, s5 = {0}, s6 = {0}, s7 = {0};
            const float *restrict tab = a->table + q;
            int64_t g = 0;
            for (; g + 8 <= groups; g += 8, tab += 8 * step) {
                s0 += load8(tab + bytes[g] * lanes);
                s1 += load8(tab + step + bytes[g + 1] * lanes);
                s2 += load8(tab + 2 * step + bytes[g + 2] * lanes);
                s3 += load8(tab + 3 * step + bytes[g + 3] * lanes);
                s4 += load8(tab + 4 * step + bytes[g + 4] * lanes);
                s5 += load8(tab + 5 * step + bytes[g + 5] * lanes);
                s6 += load8(tab + 6 * step + bytes[g + 6] * lanes);
                s7 += load8(tab + 7 * step + bytes[g + 7] * lanes);
            }
            for (; g < groups; g++, tab += step) s0 += load8(tab + bytes[g] * lanes);
            const v8 sum = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
            for (int t = 0; t < 8; t++) a->y[(q + t) * a->rows + r] = s * (2.0f * sum[t] - a->total[q + t]);
        }
    }
}

static PyObject *sign_product(PyObject *self, PyObject *args) {
    unsigned long long xt, table, total, bits, row_scale, y;
    long long lanes, rows, cols;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLKKfKi", &xt, &table, &total, &lanes, &rows, &cols, &bits, &row_scale, &scale,
                          &y, &threads))
        return NULL;
    sign_product_args a = {(const float *)(uintptr_t)xt, (const float *)(uintptr_t)table,
                           (const float *)(uintptr_t)total, lanes, rows, cols, cols / 8,
                           (const uint8_t *)(uintptr_t)bits, (const float *)(uintptr_t)row_scale, scale,
                           (float *)(uintptr_t)y};
    Py_BEGIN_ALLOW_THREADS
    byte_table((float *)(uintptr_t)table, (float *)(uintptr_t)total, a.xt, a.groups, lanes);
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

static PyObject *sparse_product(PyObject *self, PyObject *args) {
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

/* ---- all_finite ------------------------------------------------------------------------------ */

/* Whether n floats (kind 0: bfloat16, 1: float16, 2: float32) are all finite: no exponent field of
 * all ones. One thread, no torch op: a torch reduction here would leave OpenMP workers spinning
 * through the parallel loop that follows. */
VECTOR_CLONES
static uint32_t any_special16(const uint16_t *restrict x, int64_t n, uint16_t exponent) {
    uint32_t special = 0;
    for (int64_t i = 0; i < n; i++) special |= (uint32_t)((x[i] & exponent) == exponent);
    return special;
}

VECTOR_CLONES
static uint32_t any_special32(const uint32_t *restrict x, int64_t n) {
    uint32_t special = 0;
    for (int64_t i = 0; i < n; i++) special |= (uint32_t)((x[i] & 0x7F800000u) == 0x7F800000u);
    return special;
}

static PyObject *all_finite(PyObject *self, PyObject *args) {
    unsigned long long data;
    long long n;
    int kind;
    if (!PyArg_ParseTuple(args, "KLi", &data, &n, &kind)) return NULL;
    uint32_t special;
    Py_BEGIN_ALLOW_THREADS
    if (kind == 2)
        special = any_special32((const uint32_t *)(uintptr_t)data, n);
    else
        special = any_special16((const uint16_t *)(uintptr_t)data, n, kind == 0 ? 0x7F80u : 0x7C00u);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(!special);
}

static PyMethodDef methods[] = {
    {"all_finite", all_finite, METH_VARARGS, "Whether every element of a float buffer is finite."},
    {"sign_product", sign_product, METH_VARARGS, "x @ (scale * signs).T for a few tokens (SPEC 5.3)."},
    {"sparse_product", sparse_product, METH_VARARGS, "x @ delta.T for a few tokens, from kept positions."},
    {"cast_window_bf16", cast_window_bf16, METH_VARARGS, "SPEC 9.1 window-dithered cast of float32 rows to bfloat16."},
    {"reconstruct_bf16", reconstruct_bf16, METH_VARARGS, "A bfloat16 parameter from its base and one delta."},
    {"seeded_positions", seeded_positions, METH_VARARGS, "Kept positions of a seeded mask (SPEC 6)."},
    {"seeded_checkpoints", seeded_checkpoints, METH_VARARGS, "Where walks of a seeded mask's stream start."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "Native loops of a first load.", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) SIGNS[b][k] = ((b >> k) & 1) ? 1.0f : -1.0f;
    return PyModule_Create(&module);
}
