/* par.h (internal to src/nn): the step's threads. Every parallel loop of the nn kernels runs a
   FIXED list of items (GEMM tiles, batch chunks, row blocks, elements) whose boundaries depend only
   on the shapes, never on the thread count; an item writes its own outputs or its own partial sums,
   and partial sums are added in item order on one thread. So a run with 1 thread and a run with N
   threads execute the same floating-point operations in the same order: their results are bitwise
   equal (tests/test_threads.c). OpenBLAS is always called with one thread, from inside these loops
   (kdp_nn_set_threads). The loops run on kdpeers' own pool of threads (spin, yield, then sleep:
   robust when the cores are shared) or, with -Dthreads=openmp, on OpenMP (docs/threads.md). */
#ifndef KDPEERS_NN_PAR_H
#define KDPEERS_NN_PAR_H

#include <stddef.h>
#include <stdint.h>

/* the team size set by kdp_nn_set_threads (1 before any call) */
int kdp_par_threads(void);

/* Team for a loop over `work` cheap elements: 1 below KDP_PAR_MIN_WORK (waking the team, ~1-3 us,
   would cost more than the loop), 1 inside another parallel loop, else the team. */
#define KDP_PAR_MIN_WORK 32768
int kdp_par_team(size_t work);
/* Team for `n` coarse tasks (tiles, chunks): min(n, threads), 1 inside a parallel loop. */
int kdp_par_team_tasks(size_t n);

/* The thread running the current item: 0 (the caller) .. team - 1. For per-thread scratch. */
int kdp_par_tid(void);

/* fn(ctx, lo, hi) over the items [0, n), cut into `pieces` contiguous pieces of about equal size
   (piece k = [k n / pieces, (k + 1) n / pieces)) that the `team` threads take in any order; returns
   when all are done. team 1 runs the pieces in order on the caller. Loops over independent
   elements use pieces = team; loops over tasks use pieces = n. Profiled (kdp_nn_profile) as n
   items of equal cost. */
typedef void (*kdp_par_fn)(void *ctx, size_t lo, size_t hi);
void kdp_par_for(size_t n, size_t pieces, int team, kdp_par_fn fn, void *ctx);
/* the common cases: n tasks on kdp_par_team_tasks(n) threads; n elements on kdp_par_team(work) */
void kdp_par_tasks(size_t n, kdp_par_fn fn, void *ctx);
void kdp_par_elems(size_t n, size_t work, kdp_par_fn fn, void *ctx);

/* ---- fixed row blocks for reductions over N rows of C columns ----
   Blocks of about KDP_ROW_BLOCK_FLOATS floats, a multiple of 4 rows (the sums take rows four at a
   time); block k is rows [k * rows, min(N, (k + 1) * rows)). */
#define KDP_ROW_BLOCK_FLOATS 32768
size_t kdp_row_block_rows(size_t N, size_t C);
static inline size_t kdp_row_blocks(size_t N, size_t C) {
  size_t r = kdp_row_block_rows(N, C);
  return N ? (N + r - 1) / r : 0;
}

/* ---- GEMMs in fixed tiles ----
   C (M x N, row-major, ldc) = op(A) op(B) + beta C, split along N (when M <= N: each tile packs
   A again, the smaller operand) or M into a power-of-two number of tiles of at least
   KDP_GEMM_TILE_FLOPS each, and into 2 when the GEMM has half that (so that 2 threads share
   every GEMM worth splitting); boundaries on multiples of 16. One cblas_sgemm call per tile.
   Every tile repacks the shared operand: measured at the mlp's shapes (kdp-gemmtiles), 4 tiles
   cost 4-6% of the GEMM's time on one thread, 2 tiles about 2%. */
#ifndef KDP_GEMM_TILE_FLOPS
#define KDP_GEMM_TILE_FLOPS (1u << 25)
#endif
typedef struct kdp_gemm {
  int ta, tb; /* op(A) = A^T when ta (A stored K x M), op(B) = B^T when tb (B stored N x K) */
  size_t M, N, K, lda, ldb, ldc;
  const float *A, *B;
  float *C;
  float beta;
  int split_n;  /* tiles split N (else M) */
  size_t tiles; /* number of tiles */
} kdp_gemm;
/* fills g->split_n and g->tiles from the shape */
void kdp_gemm_plan(kdp_gemm *g);
/* runs tile t of g (single-threaded OpenBLAS). beta = 0 zeroes the tile (kdp_zero_rows) and adds
   onto it (beta = 1): OpenBLAS's own zeroing (sgemm_beta) is about half memset's speed here (3.6%
   against 1.7% of an mlp step, Haswell kernels), and the kernel adds onto the zeroed C either way,
   so the result is the same */
void kdp_gemm_tile(const kdp_gemm *g, size_t t);
/* C (M x N, row stride ldc) = 0 */
void kdp_zero_rows(float *C, size_t M, size_t N, size_t ldc);
/* the rows [*lo, *hi) or columns of C that tile t covers */
void kdp_gemm_tile_range(const kdp_gemm *g, size_t t, size_t *lo, size_t *hi);

/* ---- batch chunks of the convolutions ----
   n chunks of balanced size (sizes differ by at most one sample) of at most `max_per_chunk`
   samples each; the count is rounded up to a multiple of 4 (when above 1) so that 2 and 4 threads
   get equal shares. Chunk c is samples [c * B / n, (c + 1) * B / n). */
size_t kdp_chunk_count(size_t B, size_t max_per_chunk);
static inline size_t kdp_chunk_lo(size_t c, size_t B, size_t n) { return c * B / n; }

#endif
