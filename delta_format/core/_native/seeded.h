/* SPEC §6's seeded-mask stream in C: the hash and the gap count (seeded.c, reconstruct.c). */
#ifndef DELTA_FORMAT_SEEDED_H
#define DELTA_FORMAT_SEEDED_H

#include "native.h"

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

static inline int parse_stream(stream_t *g, unsigned long long key, unsigned long long ascending, long long n,
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

#endif
