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
 *   sign_product, sparse_product  on the fly, x @ delta.T for a few tokens (products.c).
 *
 * A row that cannot be rounded here (an edge: |sum| at bfloat16's largest value or past it, or
 * not finite) is reported, and the caller makes the parameter with the torch path, which handles
 * edges and reports overflows. Loops release the GIL and may split their rows over threads.
 */
#include <pthread.h>

#include "native.h"

float SIGNS[256][8];

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

int64_t split_rows(rows_fn fn, void *args, int64_t rows, int64_t cols, int threads) {
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
