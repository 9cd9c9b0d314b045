/* gemmtiles.c: kdp-gemmtiles, two facts about this machine's OpenBLAS at the training GEMM shapes
 * of mlp(512,256) and cnn (batch 128; whole-batch and chunked conv GEMMs):
 *   1. determinism: is cblas_sgemm bitwise the same at 1 and at N OpenBLAS threads, and when C is
 *      computed as three column or row blocks (sub-GEMMs)? (docs/threads.md: kdpeers needs its
 *      own fixed tiles when it is not)
 *   2. the cost of kdpeers' fixed tiles (src/nn/par.c kdp_gemm_plan) at 1 thread: the time of the
 *      GEMM as its tiles against the whole GEMM, best of --reps.
 *
 * Usage: kdp-gemmtiles [--threads N] [--reps N]
 */
#include <cblas.h>
#ifdef I
#undef I
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../src/nn/par.h"
#include "kdpeers/nn.h"

typedef struct shape {
  const char *name;
  int ta, tb;
  size_t M, N, K;
  float beta;
} shape;

static const shape SHAPES[] = {
    {"mlp fc1 fwd", 0, 1, 128, 512, 784, 0},   {"mlp fc1 dW", 1, 0, 512, 784, 128, 1},
    {"mlp fc2 fwd", 0, 1, 128, 256, 512, 0},   {"mlp fc2 dW", 1, 0, 256, 512, 128, 1},
    {"mlp fc2 dX", 0, 0, 128, 512, 256, 1},    {"mlp fc3 fwd", 0, 1, 128, 10, 256, 0},
    {"mlp fc3 dW", 1, 0, 10, 256, 128, 1},     {"mlp fc3 dX", 0, 0, 128, 256, 10, 1},
    {"cnn conv1 fwd", 0, 1, 12544, 32, 9, 0},  {"cnn conv1 dW", 1, 0, 32, 9, 12544, 1},
    {"cnn conv2 fwd", 0, 1, 1568, 64, 288, 0}, {"cnn conv2 dW", 1, 0, 64, 288, 1568, 1},
    {"cnn conv2 dX", 0, 0, 1568, 288, 64, 0},  {"cnn conv2 fwd B", 0, 1, 25088, 64, 288, 0},
    {"cnn conv2 dW B", 1, 0, 64, 288, 25088, 1}, {"cnn fc1 fwd", 0, 1, 128, 128, 3136, 0},
    {"cnn fc1 dW", 1, 0, 128, 3136, 128, 1},   {"cnn fc1 dX", 0, 0, 128, 3136, 128, 1},
};

static void fill(float *x, size_t n, unsigned s) {
  for (size_t i = 0; i < n; i++) {
    s = s * 1103515245u + 12345u;
    x[i] = (float)((s >> 8) & 0xffff) / 65536.0f - 0.5f;
  }
}

/* C rows [m0, m1) x columns [n0, n1) of the GEMM */
static void gemm_block(const shape *g, const float *A, const float *B, float *C, size_t m0,
                       size_t m1, size_t n0, size_t n1) {
  size_t lda = g->ta ? g->M : g->K, ldb = g->tb ? g->K : g->N, ldc = g->N;
  const float *a = g->ta ? A + m0 : A + m0 * lda;
  const float *b = g->tb ? B + n0 * ldb : B + n0;
  cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans, g->tb ? CblasTrans : CblasNoTrans,
              (int)(m1 - m0), (int)(n1 - n0), (int)g->K, 1.0f, a, (int)lda, b, (int)ldb, g->beta,
              C + m0 * ldc + n0, (int)ldc);
}

int main(int argc, char **argv) {
  int threads = 2, reps = 50;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
  }
  if (threads < 2 || reps < 1) {
    fprintf(stderr, "usage: kdp-gemmtiles [--threads N >= 2] [--reps N]\n");
    return 2;
  }
  printf("kdp-gemmtiles: %s; kernel %s\n", openblas_get_config(), openblas_get_corename());
  printf("%-16s %6s %5s %5s  %-9s %-9s %-9s  %5s %9s %9s %6s\n", "shape", "M", "N", "K",
         "1 vs N thr", "3 col blk", "3 row blk", "tiles", "whole us", "tiled us", "cost");
  int ndiff = 0;
  for (size_t i = 0; i < sizeof SHAPES / sizeof SHAPES[0]; i++) {
    const shape *g = &SHAPES[i];
    size_t na = g->M * g->K, nb = g->K * g->N, nc = g->M * g->N;
    float *A = malloc(na * 4), *B = malloc(nb * 4), *C0 = malloc(nc * 4), *C[3], *Ci = malloc(nc * 4);
    fill(A, na, 1 + (unsigned)i);
    fill(B, nb, 7 + (unsigned)i);
    fill(Ci, nc, 3 + (unsigned)i);
    for (int k = 0; k < 3; k++) C[k] = malloc(nc * 4);
    memcpy(C0, Ci, nc * 4);
    openblas_set_num_threads(1);
    gemm_block(g, A, B, C0, 0, g->M, 0, g->N);
    /* 1 vs N threads */
    memcpy(C[0], Ci, nc * 4);
    openblas_set_num_threads(threads);
    gemm_block(g, A, B, C[0], 0, g->M, 0, g->N);
    openblas_set_num_threads(1);
    /* three column blocks, three row blocks, at multiples of 16 */
    memcpy(C[1], Ci, nc * 4);
    memcpy(C[2], Ci, nc * 4);
    size_t nbnd[4] = {0, (g->N / 3) & ~(size_t)15, (2 * g->N / 3) & ~(size_t)15, g->N};
    size_t mbnd[4] = {0, (g->M / 3) & ~(size_t)15, (2 * g->M / 3) & ~(size_t)15, g->M};
    for (int k = 0; k < 3; k++) {
      if (nbnd[k + 1] > nbnd[k]) gemm_block(g, A, B, C[1], 0, g->M, nbnd[k], nbnd[k + 1]);
      if (mbnd[k + 1] > mbnd[k]) gemm_block(g, A, B, C[2], mbnd[k], mbnd[k + 1], 0, g->N);
    }
    const char *res[3];
    for (int k = 0; k < 3; k++) {
      int d = memcmp(C0, C[k], nc * 4) != 0;
      res[k] = d ? "DIFFERS" : "same";
      ndiff += d;
    }
    /* kdpeers' tiles against the whole GEMM, one thread, best of reps (interleaved) */
    kdp_gemm t = {.ta = g->ta, .tb = g->tb, .M = g->M, .N = g->N, .K = g->K,
                  .lda = g->ta ? g->M : g->K, .ldb = g->tb ? g->K : g->N, .ldc = g->N, .A = A,
                  .B = B, .C = C[0], .beta = g->beta};
    kdp_gemm_plan(&t);
    double best_w = 1e9, best_t = 1e9;
    for (int r = 0; r < reps; r++) {
      double t0 = kdp_now();
      gemm_block(g, A, B, C[0], 0, g->M, 0, g->N);
      double t1 = kdp_now();
      for (size_t k = 0; k < t.tiles; k++) kdp_gemm_tile(&t, k);
      double t2 = kdp_now();
      if (t1 - t0 < best_w) best_w = t1 - t0;
      if (t2 - t1 < best_t) best_t = t2 - t1;
    }
    printf("%-16s %6zu %5zu %5zu  %-9s %-9s %-9s  %5zu %9.1f %9.1f %+5.1f%%%s\n", g->name, g->M,
           g->N, g->K, res[0], res[1], res[2], t.tiles, 1e6 * best_w, 1e6 * best_t,
           100.0 * (best_t / best_w - 1.0), strncmp(g->name, "cnn conv", 8) ? "" : " (kdpeers: chunks)");
    free(A), free(B), free(C0), free(Ci);
    for (int k = 0; k < 3; k++) free(C[k]);
  }
  printf("%d of %zu comparisons differ: %s\n", ndiff, 3 * sizeof SHAPES / sizeof SHAPES[0],
         ndiff ? "OpenBLAS results depend on its thread count or on how C is split; kdpeers' "
                 "fixed single-threaded tiles are needed for thread-count-independent results"
               : "this OpenBLAS looks reproducible at these shapes (kdpeers still uses its tiles)");
  return 0;
}
