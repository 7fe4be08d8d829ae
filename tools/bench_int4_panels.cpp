// A standalone benchmark, not product code: INT4 in groups of 32 at one token (a batch-1 decode's GEMV), pllm's packed
// row layout (templates/cpu_quant_vnni.cpp.inc's 4-row tile: blocks in the lanes, one horizontal sum per row)
// against the panels the cpu backend repacks INT4 into on AVX512-VNNI CPUs (templates/cpu_quant_vnni_panels.cpp.inc
// at one token: 16 rows a panel interleaved 4 bytes at a time, rows in the lanes, each block's fp16 scales and mins
// applied once for 16 rows, two panels at a time), the same values in both, both checked against an fp64
// reference, 2 OpenMP threads, copies of the weight filling MB megabytes (256 by default: past the L3, every pass
// streams from memory; 60: SmolLM2's layers, which the VM's L3 can hold). Each round runs each layout's pass twice
// and times the second (the first brings its copies back after the other layout's pass); 9 rounds, the medians
// print with their ratio.
//
//   g++ -O3 -std=c++17 -fopenmp -march=native tools/bench_int4_panels.cpp -o /tmp/bench_int4_panels
//   for s in "3072 576" "960 576" "576 1536" "576 576"; do /tmp/bench_int4_panels $s [MB]; done  # SmolLM2's N K
//
// It measured whether repacking pays before the engine was changed for it (README, Against llama.cpp, ninth and
// twelfth sittings).
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <vector>
#include <chrono>
#include <algorithm>

static float h2f(uint16_t h) { return _cvtsh_ss(h); }
static uint16_t f2h(float f) { return _cvtss_sh(f, 0); }

struct Mat {  // one weight, both layouts of the same values
    int N, K, G;
    std::vector<uint8_t> rows;       // [N][K/2], byte j: element 2j low, 2j+1 high
    std::vector<uint16_t> rs, rm;    // [N][G]
    std::vector<uint8_t> panels;     // [N/16][G][4][16][4]: block b, load j, row r: bytes 4j..4j+3 of the row's block
    std::vector<uint16_t> ps, pm;    // [N/16][G][16]
};

static Mat make(int N, int K, uint32_t seed) {
    Mat m; m.N = N; m.K = K; m.G = K / 32;
    srand(seed);
    std::vector<uint8_t> code((size_t)N * K);
    for (auto &c : code) c = rand() & 15;
    m.rs.resize((size_t)N * m.G); m.rm.resize((size_t)N * m.G);
    for (size_t i = 0; i < m.rs.size(); i++) { m.rs[i] = f2h(0.001f * (1 + rand() % 100)); m.rm[i] = f2h(-0.008f * (1 + rand() % 100)); }
    m.rows.resize((size_t)N * K / 2);
    for (int n = 0; n < N; n++)
        for (int j = 0; j < K / 2; j++) m.rows[(size_t)n * K / 2 + j] = code[(size_t)n * K + 2 * j] | (code[(size_t)n * K + 2 * j + 1] << 4);
    m.panels.resize((size_t)N * K / 2); m.ps.resize(m.rs.size()); m.pm.resize(m.rm.size());
    for (int p = 0; p < N / 16; p++)
        for (int b = 0; b < m.G; b++) {
            for (int r = 0; r < 16; r++) {
                int n = p * 16 + r;
                m.ps[((size_t)p * m.G + b) * 16 + r] = m.rs[(size_t)n * m.G + b];
                m.pm[((size_t)p * m.G + b) * 16 + r] = m.rm[(size_t)n * m.G + b];
                for (int k = 0; k < 16; k++) {
                    uint8_t byte = code[(size_t)n * K + 32 * b + k] | (code[(size_t)n * K + 32 * b + 16 + k] << 4);
                    int j = k / 4;
                    m.panels[(((size_t)p * m.G + b) * 4 + j) * 64 + r * 4 + (k % 4)] = byte;
                }
            }
        }
    return m;
}

struct Act {  // one token: int8 codes natural and de-interleaved per chunk, block scales, lane scales, group sums
    int K;
    std::vector<int8_t> q, qdi;
    std::vector<float> d, dlane, xsum;
};

static Act prepare(int K, uint32_t seed) {
    Act a; a.K = K; srand(seed);
    a.q.resize(K); a.qdi.resize(K); a.d.resize(K / 32); a.dlane.resize(K / 64 * 16); a.xsum.resize(K / 32);
    for (int i = 0; i < K; i++) a.q[i] = (int8_t)(rand() % 255 - 127);
    for (int b = 0; b < K / 32; b++) {
        a.d[b] = 0.01f * (1 + rand() % 50);
        int s = 0; for (int i = 0; i < 32; i++) s += a.q[32 * b + i];
        a.xsum[b] = a.d[b] * s;
    }
    for (int c = 0; c < K / 64; c++) {
        for (int i = 0; i < 32; i++) { a.qdi[64 * c + i] = a.q[64 * c + 2 * i]; a.qdi[64 * c + 32 + i] = a.q[64 * c + 2 * i + 1]; }
        for (int l = 0; l < 16; l++) a.dlane[c * 16 + l] = a.d[2 * c + ((l / 4) % 2)];
    }
    return a;
}

static void reference(const Mat &m, const Act &a, float *y) {
    for (int n = 0; n < m.N; n++) {
        double acc = 0;
        for (int i = 0; i < m.K; i++) {
            uint8_t byte = m.rows[(size_t)n * m.K / 2 + i / 2];
            int c = i % 2 ? byte >> 4 : byte & 15;
            int g = i / 32;
            double w = c * (double)h2f(m.rs[(size_t)n * m.G + g]) + h2f(m.rm[(size_t)n * m.G + g]);
            acc += w * a.d[g] * a.q[i];
        }
        y[n] = (float)acc;
    }
}

#define PF 16384
// pllm's row code (cpu_quant_vnni.cpp.inc's int_tile<4, 1, GROUPS_OF_32, INT4, uint16_t>), rows n..n+3
static inline void rows_tile4(const Mat &m, const Act &a, int n, float *y) {
    const int chunks = m.K / 64, rb = m.K / 2;
    const uint8_t *codes[4]; const uint16_t *sc[4];
    for (int r = 0; r < 4; r++) { codes[r] = m.rows.data() + (size_t)(n + r) * rb; sc[r] = m.rs.data() + (size_t)(n + r) * m.G; }
    __m512 acc[4]; for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
    const __m512i pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512i sh = _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL);
    const char *side = (const char *)(m.rs.data() + (size_t)(n + PF / rb) * m.G), *mside = (const char *)(m.rm.data() + (size_t)(n + PF / rb) * m.G);
    for (int c = 0; c < chunks; c++) {
        if (64 * c < 4 * m.G * 2 + 63) { __builtin_prefetch(side + 64 * c); __builtin_prefetch(mside + 64 * c); }
        const __m512i x = _mm512_loadu_si512(a.qdi.data() + 64 * c);
        const __m512 d = _mm512_loadu_ps(a.dlane.data() + 16 * c);
        for (int r = 0; r < 4; r++) {
            if (c % 2 == 0) __builtin_prefetch(codes[r] + c * 32 + PF);
            const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(codes[r] + c * 32)));
            const __m512i w = _mm512_and_si512(_mm512_srlv_epi16(b, sh), _mm512_set1_epi8(0x0F));
            uint32_t two; memcpy(&two, sc[r] + 2 * c, 4);
            const __m512 s = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128((int)two))));
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, s), acc[r]);
        }
    }
    for (int g = 0; g < m.G; g += 16) {
        const __mmask16 mk = m.G - g >= 16 ? 0xFFFF : (__mmask16)((1u << (m.G - g)) - 1);
        const __m512 xs = _mm512_maskz_loadu_ps(mk, a.xsum.data() + g);
        for (int r = 0; r < 4; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, m.rm.data() + (size_t)(n + r) * m.G + g)), xs, acc[r]);
    }
    for (int r = 0; r < 4; r++) y[n + r] = _mm512_reduce_add_ps(acc[r]);
}

// Two 16-row panels at a time (rows in lanes), as templates/cpu_quant_vnni_panels.cpp.inc reads them at one token:
// the high nibbles masked in place (16 times the code), the block's sum (16 low + high) / 16, codes requested 4 KB
// ahead (PANEL_PREFETCH_BYTES)
#define PANEL_PF 4096
static inline void panels2(const Mat &m, const Act &a, int p, float *y) {
    const int32_t *x32 = (const int32_t *)a.q.data();
    const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0);
    __m512 acc[2];
    const uint8_t *base[2];
    const uint16_t *S[2], *M[2];
    for (int q = 0; q < 2; q++) {
        acc[q] = _mm512_setzero_ps();
        base[q] = m.panels.data() + (size_t)(p + q) * m.G * 256;
        S[q] = m.ps.data() + (size_t)(p + q) * m.G * 16;
        M[q] = m.pm.data() + (size_t)(p + q) * m.G * 16;
    }
    for (int b = 0; b < m.G; b++) {
        const __m512 d = _mm512_set1_ps(a.d[b]);
        __m512i xe[4], xo[4];
        for (int j = 0; j < 4; j++) { xe[j] = _mm512_set1_epi32(x32[8 * b + j]); xo[j] = _mm512_set1_epi32(x32[8 * b + 4 + j]); }
        for (int q = 0; q < 2; q++) {
            const uint8_t *blk = base[q] + (size_t)b * 256;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int j = 0; j < 4; j++) {
                __builtin_prefetch(blk + 64 * j + PANEL_PF);
                const __m512i v = _mm512_loadu_si512(blk + 64 * j);
                s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v, lo4), xe[j]);
                s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(v, hi4), xo[j]);
            }
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(s0, 4), s1)), _mm512_set1_ps(0.0625f));
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(S[q] + 16 * b)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(M[q] + 16 * b)));
            acc[q] = _mm512_fmadd_ps(f, _mm512_mul_ps(sc, d), acc[q]);
            acc[q] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.xsum[b]), acc[q]);
        }
    }
    for (int q = 0; q < 2; q++) _mm512_storeu_ps(y + 16 * (p + q), acc[q]);
}

int main(int argc, char **argv) {
    int N = argc > 1 ? atoi(argv[1]) : 3072, K = argc > 2 ? atoi(argv[2]) : 576;
    const double megabytes = argc > 3 ? atof(argv[3]) : 256;  // the copies' total: past the L3, or within it
    if (N % 32 || K % 64) {
        fprintf(stderr, "N must be a multiple of 32 (two panels) and K of 64\n");
        return 2;
    }
    const size_t bytes1 = (size_t)N * K / 2 + (size_t)N * (K / 32) * 4;
    const int copies = (int)(megabytes * 1e6 / bytes1) + 1;
    std::vector<Mat> mats; for (int i = 0; i < copies; i++) mats.push_back(make(N, K, 1 + i));
    Act a = prepare(K, 7);
    std::vector<float> y1(N), y2(N), yr(N);
    reference(mats[0], a, yr.data());
    for (int n = 0; n < N; n += 4) rows_tile4(mats[0], a, n, y1.data());
    for (int p = 0; p < N / 16; p += 2) panels2(mats[0], a, p, y2.data());
    double e1 = 0, e2 = 0, mx = 0;
    for (int n = 0; n < N; n++) { e1 = std::max(e1, (double)fabsf(y1[n] - yr[n])); e2 = std::max(e2, (double)fabsf(y2[n] - yr[n])); mx = std::max(mx, (double)fabsf(yr[n])); }
    printf("N=%d K=%d copies=%d (%.0f MB): max err rows %.2e panel %.2e (max |y| %.2e)\n", N, K, copies, copies * bytes1 / 1e6, e1, e2, mx);
    std::vector<double> tr, tp;
    for (int round = 0; round < 9; round++) {
        for (int v = 0; v < 2; v++)
          for (int pass = 0; pass < 2; pass++) {  // the second pass is timed
            auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < copies; i++) {
                const Mat &m = mats[i];
                if (v == 0) {
#pragma omp parallel for schedule(static) num_threads(2)
                    for (int n = 0; n < N; n += 4) rows_tile4(m, a, n, y1.data());
                } else {
#pragma omp parallel for schedule(static) num_threads(2)
                    for (int p = 0; p < N / 16; p += 2) panels2(m, a, p, y2.data());
                }
            }
            double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (pass == 1) (v == 0 ? tr : tp).push_back(s);
          }
    }
    std::sort(tr.begin(), tr.end()); std::sort(tp.begin(), tp.end());
    printf("rows (tile 4):  median %.2f ms  %.1f GB/s\n", tr[4] * 1e3, copies * bytes1 / tr[4] / 1e9);
    printf("panels (2 x 16): median %.2f ms  %.1f GB/s  (%.2fx)\n", tp[4] * 1e3, copies * bytes1 / tp[4] / 1e9, tr[4] / tp[4]);
}
