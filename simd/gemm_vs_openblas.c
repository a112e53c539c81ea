/*
 * gemm_vs_openblas.c: the measurement behind not calling OpenBLAS from the kernels. It
 * times simd/kernels.c's gemm() (AVX-512 level) against single-threaded cblas_sgemm on
 * the products of the chunkwise algorithm (C = 64, K = V = 128 and neighbours), both
 * accumulating into C. Not built by meson; from the repository root:
 *
 *   gcc -O3 -mavx512f -mavx2 -mfma -Isimd -Iinclude -Isrc -Iref simd/gemm_vs_openblas.c \
 *       -lopenblas -lm -o /tmp/gemm_vs_openblas && /tmp/gemm_vs_openblas
 *
 * docs/benchmarks.md ("OpenBLAS") records the result: equal within noise, so a call per
 * product (each inside one OpenMP work item, where OpenBLAS must run single-threaded)
 * buys nothing.
 */
#define KLA_SIMD_LEVEL avx512
#include "kernels.c"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(void)
{
    openblas_set_num_threads(1);
    const int shapes[][3] = { { 64, 128, 128 }, { 128, 128, 64 }, { 64, 64, 128 },
                              { 64, 128, 64 },  { 16, 128, 128 }, { 32, 128, 128 } };
    float *A = malloc(4 * 256 * 256), *B = malloc(4 * 256 * 256), *C = malloc(4 * 256 * 256);
    for (int i = 0; i < 256 * 256; i++) A[i] = (float)rand() / RAND_MAX, B[i] = (float)rand() / RAND_MAX, C[i] = 0;
    for (unsigned s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int M = shapes[s][0], N = shapes[s][1], Kd = shapes[s][2], reps = 2000;
        double b1 = 1e9, b2 = 1e9;
        for (int r = 0; r < 5; r++) {
            const double t0 = now();
            for (int i = 0; i < reps; i++) gemm(M, N, Kd, 1, A, Kd, B, N, 1, C, N);
            const double t1 = now();
            for (int i = 0; i < reps; i++)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, Kd, 1, A, Kd, B, N, 1, C, N);
            const double t2 = now();
            if (t1 - t0 < b1) b1 = t1 - t0;
            if (t2 - t1 < b2) b2 = t2 - t1;
        }
        const double fl = 2.0 * M * N * Kd * reps;
        printf("M=%3d N=%3d K=%3d  in-house %6.1f GFLOP/s  cblas_sgemm %6.1f GFLOP/s\n", M, N, Kd,
               fl / b1 * 1e-9, fl / b2 * 1e-9);
    }
    free(A), free(B), free(C);
    return 0;
}
