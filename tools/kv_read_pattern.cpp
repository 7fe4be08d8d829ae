// How fast one thread reads a paged KV cache in the decode attention's order, with no arithmetic beyond a sum:
//
//     g++ -O2 -march=native tools/kv_read_pattern.cpp -o /tmp/kv_read_pattern && /tmp/kv_read_pattern [tokens]
//         [kv_heads] [head_dim] [layers] [block_size]      (defaults 2000 3 64 30 16: SmolLM2's bf16 cache)
//
// Each layer's K and V caches are [blocks, block_size, kv_heads, head_dim] bf16 (one token's row holds every KV
// head), far past the caches over all layers. Patterns, best of 8 passes over every layer:
//   one head, shuffled   - as the kernel's work items read: one KV head's head_dim * 2 bytes of each token row (a
//                          stride of the whole row), block after block in a shuffled table, its K then its V, then
//                          the next head
//   one head, in order   - the same with the blocks in order
//   all heads, shuffled  - whole token rows (every head), blocks shuffled
//   flat                 - the same bytes end to end
//   heads within a block - each block's rows one KV head at a time (its K, its V), then the next block
// Portable vector code (GCC vector extensions), as tools/stream_read.cpp: the loads are what is measured.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <random>
#include <vector>

typedef int32_t v8 __attribute__((vector_size(32)));

static double now() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static v8 read_span(const char *p, int64_t bytes, v8 acc) {
    for (int64_t o = 0; o < bytes; o += 32) {
        v8 x;
        memcpy(&x, p + o, sizeof(x));
        acc += x;
    }
    return acc;
}

int main(int argc, char **argv) {
    const int tokens = argc > 1 ? atoi(argv[1]) : 2000, kv_heads = argc > 2 ? atoi(argv[2]) : 3;
    const int head_dim = argc > 3 ? atoi(argv[3]) : 64, layers = argc > 4 ? atoi(argv[4]) : 30;
    const int block_size = argc > 5 ? atoi(argv[5]) : 16;
    const int64_t head_bytes = 2LL * head_dim, row = head_bytes * kv_heads;
    if (tokens < 1 || kv_heads < 1 || head_dim < 16 || head_dim % 16 != 0 || layers < 1 || block_size < 1) {
        fprintf(stderr, "usage: %s [tokens] [kv_heads] [head_dim: a multiple of 16] [layers] [block_size]\n", argv[0]);
        return 2;
    }
    const int blocks = (tokens + block_size - 1) / block_size;
    const int64_t layer_bytes = (int64_t)blocks * block_size * row;
    std::vector<char *> caches(2 * layers);  // K and V of each layer
    for (auto &p : caches) {
        p = (char *)aligned_alloc(4096, (layer_bytes + 4095) / 4096 * 4096);
        memset(p, 1, layer_bytes);
    }
    std::vector<int> order(blocks);
    for (int i = 0; i < blocks; i++) order[i] = i;
    std::mt19937 rng(1);
    const char *names[] = {"one head, shuffled", "one head, in order", "all heads, shuffled", "flat",
                           "heads within a block"};
    const double pass_bytes = 2.0 * layers * layer_bytes;
    printf("%d tokens, %d KV heads of %d, %d layers: %.1f MB of K and V a pass\n", tokens, kv_heads, head_dim, layers,
           pass_bytes / 1e6);
    for (int mode = 0; mode < 5; mode++) {
        if (mode == 1 || mode == 3)
            std::sort(order.begin(), order.end());
        else
            std::shuffle(order.begin(), order.end(), rng);
        double best = 1e30;
        v8 acc = {};
        for (int pass = 0; pass < 8; pass++) {
            const double t = now();
            for (int l = 0; l < layers; l++) {
                if (mode == 3) {
                    acc = read_span(caches[2 * l], layer_bytes, acc);
                    acc = read_span(caches[2 * l + 1], layer_bytes, acc);
                    continue;
                }
                if (mode == 4) {
                    for (int b = 0; b < blocks; b++)
                        for (int h = 0; h < kv_heads; h++)
                            for (int kv = 0; kv < 2; kv++) {
                                const char *block = caches[2 * l + kv] + (int64_t)order[b] * block_size * row;
                                for (int i = 0; i < block_size; i++)
                                    acc = read_span(block + i * row + h * head_bytes, head_bytes, acc);
                            }
                    continue;
                }
                const bool whole = mode == 2;
                for (int h = 0; h < (whole ? 1 : kv_heads); h++)
                    for (int kv = 0; kv < 2; kv++)
                        for (int b = 0; b < blocks; b++) {
                            const char *block = caches[2 * l + kv] + (int64_t)order[b] * block_size * row;
                            for (int i = 0; i < block_size; i++)
                                acc = read_span(block + i * row + (whole ? 0 : h * head_bytes),
                                                whole ? row : head_bytes, acc);
                        }
            }
            const double dt = now() - t;
            best = dt < best ? dt : best;
        }
        volatile int32_t sink = acc[0];
        (void)sink;
        printf("%-20s %6.1f GB/s\n", names[mode], pass_bytes / best / 1e9);
    }
    return 0;
}
