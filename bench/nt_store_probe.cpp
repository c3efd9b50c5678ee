// Probe (not part of the package): do non-temporal stores pay for a stage-B-shaped loop here?
// Three bf16 streams in (base and two models, 5120 x 13824 each), one bf16 stream out, one add
// per element, 64-byte output lines written whole; mode 0 ordinary stores, mode 1 streaming.
// Build and run (bench/RESULTS.md, session of 2026-12-01):
//   g++ -O3 -march=native -fopenmp bench/nt_store_probe.cpp -o /tmp/nt_store_probe
//   for m in 0 1; do OMP_NUM_THREADS=2 /tmp/nt_store_probe $m; done
#include <immintrin.h>
#include <omp.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <chrono>
typedef uint16_t u16;
static inline __m512 ld(const u16* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m256i cv(__m512 y) {
    __m512i u = _mm512_castps_si512(y);
    u = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), 16);
    return _mm512_cvtepi32_epi16(u);
}
int main(int argc, char** argv) {
    long n = 5120L * 13824;
    int mode = atoi(argv[1]);
    u16 *b = (u16*)aligned_alloc(64, n * 2), *x = (u16*)aligned_alloc(64, n * 2),
        *y = (u16*)aligned_alloc(64, n * 2), *o = (u16*)aligned_alloc(64, n * 2);
#pragma omp parallel for
    for (long i = 0; i < n; i++) {
        b[i] = 0x3c00 + (i & 255);
        x[i] = 0x3c00 + (i & 127);
        y[i] = 0x3c00 + (i & 63);
        o[i] = 0;
    }
    double best = 1e9;
    for (int r = 0; r < 10; r++) {
        auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static)
        for (long blk = 0; blk < n / 1024; blk++) {
            long s = blk * 1024;
            for (long k = s; k < s + 1024; k += 32) {
                __m512 bb = ld(b + k), bb2 = ld(b + k + 16);
                __m512 r0 = _mm512_add_ps(
                    bb, _mm512_add_ps(_mm512_sub_ps(ld(x + k), bb), _mm512_sub_ps(ld(y + k), bb)));
                __m512 r1 = _mm512_add_ps(bb2, _mm512_add_ps(_mm512_sub_ps(ld(x + k + 16), bb2),
                                                             _mm512_sub_ps(ld(y + k + 16), bb2)));
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(cv(r0)), cv(r1), 1);
                if (mode == 1)
                    _mm512_stream_si512((__m512i*)(o + k), both);
                else
                    _mm512_store_si512((__m512i*)(o + k), both);
            }
        }
        _mm_sfence();
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (dt < best) best = dt;
    }
    printf("mode %d: %.2f ms, %.1f GB/s (4 streams)\n", mode, best * 1e3, n * 8 / best / 1e9);
}
