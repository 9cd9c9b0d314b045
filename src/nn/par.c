/* par.c: the team of threads of the nn kernels (kdpeers' pool, or OpenMP with -Dthreads=openmp),
   fixed GEMM tiles, chunks and row blocks, and the profile of the parallel loops (see par.h). */
#include "par.h"

#include <cblas.h>
#ifdef I
#undef I
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KDP_PAR_OPENMP
#include <omp.h>
#else
#include <dlfcn.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kdpeers/nn.h"

static int g_threads = 1;
/* the thread that set the team up: the only one whose loops use the pool (any other thread runs
   its loops itself, in item order: the same results) */
static pthread_t g_owner;
static int g_owned = 0;
/* KDP_GEMM_MODE=openblas: whole GEMMs threaded by OpenBLAS instead of fixed tiles (results then
   depend on the thread count; only for the measurements of docs/threads.md) */
static int g_blas_threaded = 0;

static struct {
  int on;
  uint64_t loops;
  double seconds;                         /* wall time inside parallel loops */
  double modelled[KDP_NN_PROFILE_WIDTHS]; /* the same loops at 1, 2, 4, ... threads */
} g_prof;

/* ---------------- the pool ---------------- */

/* the thread's index in the team (0: the caller of kdp_par_for), and whether it is inside a
   parallel loop (nested loops run serially) */
static _Thread_local int tls_tid = 0, tls_in_loop = 0;

int kdp_par_tid(void) { return tls_tid; }

static void run_pieces(size_t n, size_t pieces, kdp_par_fn fn, void *ctx, size_t k) {
  size_t lo = k * n / pieces, hi = (k + 1) * n / pieces;
  if (hi > lo) fn(ctx, lo, hi);
}

#ifdef KDP_PAR_OPENMP

static void pool_resize(int n) { (void)n; }

static void pool_run(size_t n, size_t pieces, int team, kdp_par_fn fn, void *ctx) {
#pragma omp parallel num_threads(team)
  {
    tls_tid = omp_get_thread_num();
    tls_in_loop = 1;
#pragma omp for schedule(dynamic, 1)
    for (size_t k = 0; k < pieces; k++) run_pieces(n, pieces, fn, ctx, k);
    tls_in_loop = 0;
    tls_tid = 0;
  }
}

#else

/* Waiting: spin with a pause, offering the core to other runnable threads every 64 spins
   (sched_yield returns at once when there are none), for up to KDP_SPIN_NS; then sleep on a futex.
   libgomp's default spins without yielding for ~300000 pauses, which on a shared machine stalls
   a team whose other thread has been preempted (docs/threads.md). */
#define KDP_SPIN_NS 2000000.0

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
  return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* waits until *w != old; returns the new value. *asleep is set while it sleeps. */
static uint32_t wait_change(_Atomic uint32_t *w, uint32_t old, _Atomic int *asleep) {
  double t0 = 0;
  for (unsigned i = 1;; i++) {
    uint32_t v = atomic_load_explicit(w, memory_order_acquire);
    if (v != old) return v;
    cpu_relax();
    if (i % 64 == 0) {
      sched_yield();
      if (t0 == 0)
        t0 = kdp_now();
      else if (kdp_now() - t0 > KDP_SPIN_NS * 1e-9)
        break;
    }
  }
  atomic_store(asleep, 1);
  uint32_t v;
  while ((v = atomic_load(w)) == old) futex(w, FUTEX_WAIT_PRIVATE, old);
  atomic_store(asleep, 0);
  return v;
}

/* one worker's doorbell, on its own cache line */
typedef struct slot {
  _Atomic uint32_t go; /* bumped when the worker has a job (or must stop) */
  _Atomic int asleep;
  char pad[56];
} slot;

static struct {
  int n; /* threads including the caller */
  pthread_t *th;
  slot *slots;
  _Atomic uint32_t left; /* workers of the current job still running it */
  _Atomic int waiter;    /* the caller asleep on left */
  _Atomic size_t next;   /* next piece of the current job */
  int stop;
  /* the current job: written by the caller before it rings the workers, read-only until they
     are all done */
  size_t n_items, pieces;
  kdp_par_fn fn;
  void *ctx;
} P = {.n = 1};

static void job_pieces(void) {
  for (;;) {
    size_t k = atomic_fetch_add_explicit(&P.next, 1, memory_order_relaxed);
    if (k >= P.pieces) break;
    run_pieces(P.n_items, P.pieces, P.fn, P.ctx, k);
  }
}

static void ring(int i) {
  atomic_fetch_add(&P.slots[i].go, 1);
  if (atomic_load(&P.slots[i].asleep)) futex(&P.slots[i].go, FUTEX_WAKE_PRIVATE, 1);
}

/* An OpenMP build of OpenBLAS takes its thread count from the OpenMP settings of the CALLING
   thread (omp_get_max_threads: OMP_NUM_THREADS or the core count, in a thread OpenMP did not
   start), not from openblas_set_num_threads, which only sets them for the thread that called it:
   in a worker it would run every GEMM on several threads of its own (measured: non-deterministic
   results, docs/threads.md). So each worker sets its own OpenMP thread count to 1. */
static void blas_one_thread_here(void) {
  if (openblas_get_parallel() != 2) return; /* 0 sequential, 1 pthreads, 2 OpenMP */
  void (*set)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "omp_set_num_threads");
  if (set) set(1);
}

static void *worker(void *arg) {
  const int i = (int)(intptr_t)arg;
  tls_tid = i;
  tls_in_loop = 1;
  blas_one_thread_here();
  uint32_t seen = 0;
  for (;;) {
    seen = wait_change(&P.slots[i].go, seen, &P.slots[i].asleep);
    if (P.stop) break;
    job_pieces();
    if (atomic_fetch_sub(&P.left, 1) == 1 && atomic_load(&P.waiter))
      futex(&P.left, FUTEX_WAKE_PRIVATE, 1);
  }
  return NULL;
}

static void pool_stop(void) {
  if (P.n <= 1) return;
  P.stop = 1;
  for (int i = 1; i < P.n; i++) ring(i);
  for (int i = 1; i < P.n; i++) pthread_join(P.th[i], NULL);
  free(P.th);
  free(P.slots);
  P.th = NULL;
  P.slots = NULL;
  P.n = 1;
  P.stop = 0;
}

static void pool_resize(int n) {
  if (n == P.n) return;
  pool_stop();
  if (n <= 1) return;
  P.th = kdp_xcalloc((size_t)n, sizeof(pthread_t));
  if (posix_memalign((void **)&P.slots, 64, (size_t)n * sizeof(slot)) != 0) abort();
  memset(P.slots, 0, (size_t)n * sizeof(slot));
  for (int i = 1; i < n; i++) {
    if (pthread_create(&P.th[i], NULL, worker, (void *)(intptr_t)i) != 0) {
      fprintf(stderr, "kdpeers: cannot start thread %d of %d: the loops use %d\n", i + 1, n, i);
      break;
    }
    char name[16];
    snprintf(name, sizeof name, "kdp-worker%d", i % 1000);
    pthread_setname_np(P.th[i], name);
    P.n = i + 1;
  }
}

static void pool_run(size_t n, size_t pieces, int team, kdp_par_fn fn, void *ctx) {
  if (team > P.n) team = P.n;
  P.n_items = n;
  P.pieces = pieces;
  P.fn = fn;
  P.ctx = ctx;
  atomic_store(&P.next, 0);
  atomic_store(&P.left, (uint32_t)(team - 1));
  for (int i = 1; i < team; i++) ring(i); /* seq_cst: the job is visible to the workers */
  tls_in_loop = 1;
  job_pieces();
  tls_in_loop = 0;
  /* wait for the workers: spin and yield, then sleep */
  double t0 = 0;
  for (unsigned i = 1; atomic_load_explicit(&P.left, memory_order_acquire) != 0; i++) {
    cpu_relax();
    if (i % 64 != 0) continue;
    sched_yield();
    if (t0 == 0) {
      t0 = kdp_now();
    } else if (kdp_now() - t0 > KDP_SPIN_NS * 1e-9) {
      atomic_store(&P.waiter, 1);
      uint32_t v;
      while ((v = atomic_load(&P.left)) != 0) futex(&P.left, FUTEX_WAIT_PRIVATE, v);
      atomic_store(&P.waiter, 0);
      break;
    }
  }
}

#endif

void kdp_nn_set_threads(int n) {
  if (n < 1) n = 1;
  g_threads = n;
  g_owner = pthread_self();
  g_owned = 1;
  const char *mode = getenv("KDP_GEMM_MODE");
  g_blas_threaded = mode && strcmp(mode, "openblas") == 0;
  pool_resize(n);
  /* one OpenBLAS thread: the tiles are the parallelism (an OpenMP OpenBLAS called inside a
     parallel loop would run single-threaded anyway; a pthreads one would not know) */
  openblas_set_num_threads(g_blas_threaded ? n : 1);
}

int kdp_nn_threads(void) { return g_threads; }
int kdp_par_threads(void) { return g_threads; }

static int pool_usable(void) {
  return g_threads > 1 && !tls_in_loop && g_owned && pthread_equal(pthread_self(), g_owner);
}

int kdp_par_team(size_t work) {
  return work >= KDP_PAR_MIN_WORK && pool_usable() ? g_threads : 1;
}

int kdp_par_team_tasks(size_t n) {
  if (n <= 1 || g_blas_threaded || !pool_usable()) return 1;
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

static void profile_add(double dt, size_t n_items) {
  g_prof.loops++;
  g_prof.seconds += dt;
  if (n_items < 1) n_items = 1;
  /* n equal items on p threads take ceil(n / p) item times */
  for (int k = 0; k < KDP_NN_PROFILE_WIDTHS; k++) {
    size_t p = (size_t)1 << k;
    g_prof.modelled[k] += dt * (double)((n_items + p - 1) / p) / (double)n_items;
  }
}

/* ---------------- loops ---------------- */

void kdp_par_for(size_t n, size_t pieces, int team, kdp_par_fn fn, void *ctx) {
  if (n == 0) return;
  if (pieces < 1) pieces = 1;
  if (pieces > n) pieces = n;
  /* profiled: the owner's outermost loops */
  const int outer = !tls_in_loop && (!g_owned || pthread_equal(pthread_self(), g_owner));
  double t0 = g_prof.on && outer ? kdp_now() : 0.0;
  if (team <= 1 || pieces == 1 || !pool_usable()) {
    int was = tls_in_loop;
    tls_in_loop = 1; /* loops inside run serially too */
    for (size_t k = 0; k < pieces; k++) run_pieces(n, pieces, fn, ctx, k);
    tls_in_loop = was;
  } else {
    pool_run(n, pieces, team, fn, ctx);
  }
  if (t0 != 0.0) profile_add(kdp_now() - t0, n);
}

void kdp_par_tasks(size_t n, kdp_par_fn fn, void *ctx) {
  kdp_par_for(n, n, kdp_par_team_tasks(n), fn, ctx);
}

void kdp_par_elems(size_t n, size_t work, kdp_par_fn fn, void *ctx) {
  int team = kdp_par_team(work);
  kdp_par_for(n, (size_t)team, team, fn, ctx);
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
  if (!g_blas_threaded && 2 * KDP_GEMM_TILE_MIN <= dim) {
    while (4 * t * KDP_GEMM_TILE_MIN <= dim && flops / (double)(2 * t) >= KDP_GEMM_TILE_FLOPS)
      t *= 2;
    /* two threads get a share of every GEMM worth splitting */
    if (t == 1 && flops >= 0.5 * KDP_GEMM_TILE_FLOPS) t = 2;
  }
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
  if (g->K == 0) { /* op(A) op(B) is 0 */
    for (size_t r = 0; r < M; r++)
      for (size_t c = 0; c < N; c++)
        C[r * g->ldc + c] = g->beta == 0.0f ? 0.0f : g->beta * C[r * g->ldc + c];
    return;
  }
  float beta = g->beta;
  if (beta == 0.0f) {
    kdp_zero_rows(C, M, N, g->ldc);
    beta = 1.0f;
  }
  cblas_sgemm(CblasRowMajor, g->ta ? CblasTrans : CblasNoTrans, g->tb ? CblasTrans : CblasNoTrans,
              (int)M, (int)N, (int)g->K, 1.0f, A, (int)g->lda, B, (int)g->ldb, beta, C,
              (int)g->ldc);
}

void kdp_zero_rows(float *C, size_t M, size_t N, size_t ldc) {
  if (ldc == N)
    memset(C, 0, M * N * sizeof(float));
  else
    for (size_t r = 0; r < M; r++) memset(C + r * ldc, 0, N * sizeof(float));
}
