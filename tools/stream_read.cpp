// A streaming read over a buffer far larger than the caches: the read bandwidth the weight-streaming GEMVs are held
// against (tools/bench_gemv_bandwidth.py compiles it with the machine's compiler and -fopenmp). Each thread sums its
// contiguous share of the buffer as STREAMS interleaved sub-ranges read in step, 256 bytes of each at a time into
// independent sums, requesting each `prefetch` bytes ahead (0: the hardware prefetcher alone), as a GEMV tile reads
// several weight rows at once.
// Portable vector code (GCC vector extensions): the loads are what is measured, so any instruction set that loads a
// register at a time reads as fast; the benchmark compiles it with the build's baseline (AVX2 on x86-64).
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

template <int STREAMS>
static float read_share(const float *base, int64_t part, int64_t ahead) {
    v8 acc[STREAMS][8] = {};
    for (int64_t k = 0; k < part; k += 64) {
#pragma GCC unroll 8
        for (int s = 0; s < STREAMS; s++) {
            const float *p = base + s * part + k;
            if (ahead) {
                __builtin_prefetch(p + ahead);
                __builtin_prefetch(p + ahead + 32);
            }
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++) {
                v8 v;
                memcpy(&v, p + 8 * i, sizeof(v));
                acc[s][i] += v;
            }
        }
    }
    v8 total = {};
    for (int s = 0; s < STREAMS; s++)
        for (int i = 0; i < 8; i++) total += acc[s][i];
    float sum = 0.f;
    for (int i = 0; i < 8; i++) sum += total[i];
    return sum;
}

// The sum of buf's first n floats (rounded down to whole 256-byte pieces per stream and thread), so no read is
// optimised away; streams: 1, 2, 4 or 8. Returns NaN for another stream count.
extern "C" float pllm_stream_read(const float *buf, int64_t n, int streams, int64_t prefetch, int num_threads) {
    if (streams != 1 && streams != 2 && streams != 4 && streams != 8) return __builtin_nanf("");
    float total = 0.f;
    #pragma omp parallel num_threads(num_threads) reduction(+ : total)
    {
        const int threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t share = n / threads / (64 * streams) * (64 * streams);  // floats per thread
        const float *base = buf + t * share;
        const int64_t part = share / streams, ahead = prefetch / (int64_t)sizeof(float);
        switch (streams) {
            case 1: total += read_share<1>(base, part, ahead); break;
            case 2: total += read_share<2>(base, part, ahead); break;
            case 4: total += read_share<4>(base, part, ahead); break;
            default: total += read_share<8>(base, part, ahead); break;
        }
    }
    return total;
}
