/* par.c: the team of threads of the nn kernels, fixed GEMM tiles, fixed chunks and row blocks,
   and the profile of the parallel loops (see par.h). */
#include "par.h"

#include <cblas.h>
#ifdef I
#undef I
#endif
#include <stdlib.h>
#include <string.h>

#include "kdpeers/nn.h"

static int g_threads = 1;
/* KDP_GEMM_MODE=openblas: whole GEMMs threaded by OpenBLAS instead of fixed tiles (results then
   depend on the thread count; only for the measurements of docs/threads.md) */
static int g_blas_threaded = 0;

static struct {
  int on;
  uint64_t loops;
  double seconds;                       /* wall time inside parallel loops */
  double modelled[KDP_NN_PROFILE_WIDTHS]; /* the same loops at 1, 2, 4, ... threads */
} g_prof;

void kdp_nn_set_threads(int n) {
  if (n < 1) n = 1;
  g_threads = n;
  const char *mode = getenv("KDP_GEMM_MODE");
  g_blas_threaded = mode && strcmp(mode, "openblas") == 0;
  /* one OpenBLAS thread: the tiles are the parallelism (an OpenMP OpenBLAS called inside a
     parallel loop would run single-threaded anyway; a pthreads one would not know) */
  openblas_set_num_threads(g_blas_threaded ? n : 1);
}

int kdp_nn_threads(void) { return g_threads; }
int kdp_par_threads(void) { return g_threads; }

static int in_parallel(void) {
#ifdef _OPENMP
  return omp_in_parallel();
#else
  return 1; /* no OpenMP: every loop runs on the calling thread */
#endif
}

int kdp_par_team(size_t work) {
  if (g_threads <= 1 || work < KDP_PAR_MIN_WORK || in_parallel()) return 1;
  return g_threads;
}

int kdp_par_team_tasks(size_t n) {
  if (g_threads <= 1 || n <= 1 || g_blas_threaded || in_parallel()) return 1;
  return n < (size_t)g_threads ? (int)n : g_threads;
}

/* ---------------- profile ---------------- */

void kdp_nn_profile_start(void) {
  memset(&g_prof, 0, sizeof g_prof);
  g_prof.on = 1;
}

void kdp_nn_profile_stop(kdp_nn_profile *out) {
  g_prof.on = 0;
  if (!out) return;
  out->loops = g_prof.loops;
  out->parallel_seconds = g_prof.seconds;
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++) out->modelled_seconds[k] = g_prof.modelled[k];
}

double kdp_par_tic(void) { return g_prof.on && !in_parallel() ? kdp_now() : 0.0; }

void kdp_par_toc(double t0, size_t n_tasks) {
  if (t0 == 0.0 || !g_prof.on) return;
  double dt = kdp_now() - t0;
  g_prof.loops++;
  g_prof.seconds += dt;
  if (n_tasks < 1) n_tasks = 1;
  /* n equal tasks on p threads take ceil(n / p) task times */
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++) {
    size_t p = (size_t)1 << k;
    g_prof.modelled[k] += dt * (double)((n_tasks + p - 1) / p) / (double)n_tasks;
  }
}

/* ---------------- blocks and chunks ---------------- */

size_t kdp_row_block_rows(size_t N, size_t C) {
  (void)N;
  size_t r = C ? KDP_ROW_BLOCK_FLOATS / C : KDP_ROW_BLOCK_FLOATS;
  r &= ~(size_t)3;
  return r < 4 ? 4 : r;
}

size_t kdp_chunk_count(size_t B, size_t max_per_chunk) {
  if (B == 0) return 0;
  if (max_per_chunk < 1) max_per_chunk = 1;
  size_t n = (B + max_per_chunk - 1) / max_per_chunk;
  if (n > 1) n = (n + 3) & ~(size_t)3;
  return n > B ? B : n;
}

/* ---------------- GEMM tiles ---------------- */

#define KDP_GEMM_TILE_MIN 64 /* narrowest tile before rounding */

void kdp_gemm_plan(kdp_gemm *g) {
  g->split_n = g->M <= g->N;
  size_t dim = g->split_n ? g->N : g->M;
  double flops = 2.0 * (double)g->M * (double)g->N * (double)g->K;
  size_t t = 1;
  if (!g_blas_threaded)
    while (2 * t * KDP_GEMM_TILE_MIN <= dim && flops / (double)(2 * t) >= KDP_GEMM_TILE_FLOPS)
      t *= 2;
  g->tiles = t;
}

void kdp_gemm_tile_range(const kdp_gemm *g, size_t t, size_t *lo, size_t *hi) {
  size_t dim = g->split_n ? g->N : g->M;
  *lo = t == 0 ? 0 : (dim * t / g->tiles) & ~(size_t)15;
  *hi = t + 1 == g->tiles ? dim : (dim * (t + 1) / g->tiles) & ~(size_t)15;
}

void kdp_gemm_tile(const kdp_gemm *g, size_t t) {
  size_t lo, hi;
  kdp_gemm_tile_range(g, t, &lo, &hi);
  if (hi <= lo || g->M == 0 || g->N == 0) return;
  const float *A = g->A, *B = g->B;
  float *C = g->C;
  size_t M = g->M, N = g->N;
  if (g->split_n) {
    B += g->tb ? lo * g->ldb : lo;
    C += lo;
    N = hi - lo;
  } else {
    A += g->ta ? lo : lo * g->lda;
    C += lo * g->ldc;
    M = hi - lo;
  }
  if (g->K == 0) { /* op(A) op(B) = 0 */
    for (size_t r = 0; r < M; r++)
      for (size_t c = 0; c < N; c++) C[r * g->ldc + c] = g->beta == 0.0f ? 0.0f : g->beta * C[r * g->ldc + c];
    return;
  }
  cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans, g->tb ? CblasTrans : CblasNoTrans,
              (int)M, (int)N, (int)g->K, 1.0f, A, (int)g->lda, B, (int)g->ldb, g->beta, C,
              (int)g->ldc);
}

void kdp_gemm_run(int ta, int tb, size_t M, size_t N, size_t K, const float *A, size_t lda,
                  const float *B, size_t ldb, float beta, float *C, size_t ldc) {
  kdp_gemm g = {.ta = ta, .tb = tb, .M = M, .N = N, .K = K, .lda = lda, .ldb = ldb, .ldc = ldc,
                .A = A, .B = B, .C = C, .beta = beta};
  kdp_gemm_plan(&g);
  const int nt = kdp_par_team_tasks(g.tiles);
  double t0 = kdp_par_tic();
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(dynamic, 1)
  for (size_t t = 0; t < g.tiles; t++) kdp_gemm_tile(&g, t);
  kdp_par_toc(t0, g.tiles);
}
