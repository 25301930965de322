/* Shared by the native loops' sources (see module.c): threads, vector clones, bfloat16 values. */
#ifndef DELTA_FORMAT_NATIVE_H
#define DELTA_FORMAT_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD (1 << 16)

/* fn(args, first, last, &result) over rows [first, last) of one slice. */
typedef void (*rows_fn)(void *args, int64_t first, int64_t last, int64_t *result);

/* fn over rows [0, rows), split into up to `threads` slices of at least MIN_ELEMENTS_PER_THREAD
 * elements (`cols` a row); the slices' results are summed. */
int64_t split_rows(rows_fn fn, void *args, int64_t rows, int64_t cols, int threads);

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
/* one build for every x86-64: the loader picks the widest vectors the CPU has */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

extern float SIGNS[256][8]; /* SIGNS[b][k] = +1 if bit k of b is set, else -1 */

static inline float bf16_value(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The module's functions, one source file each group. */
PyObject *cast_window_bf16(PyObject *self, PyObject *args);
PyObject *reconstruct_bf16(PyObject *self, PyObject *args);
PyObject *seeded_positions(PyObject *self, PyObject *args);
PyObject *seeded_checkpoints(PyObject *self, PyObject *args);
PyObject *sign_product(PyObject *self, PyObject *args);
PyObject *sparse_product(PyObject *self, PyObject *args);

#endif
