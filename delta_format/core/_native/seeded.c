/* The seeded mask's positions (SPEC §6): a block of them, and the checkpoints of a walk. */
#include "seeded.h"

/* out[j] = offset - 1 + sum_{i <= j} (gap(u_{start+i}) + 1): the kept positions of counters
 * start .. start + count - 1. */
PyObject *seeded_positions(PyObject *self, PyObject *args) {
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

PyObject *seeded_checkpoints(PyObject *self, PyObject *args) {
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

