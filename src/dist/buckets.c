/* buckets.c: the gradient allreduce of a peer's ranks in buckets, overlapped with the backward
   pass (see kdpeers/dist.h). */
#include <mpi.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dist_mpi.h"
#include "kdpeers/dist.h"
#include "kdpeers/nn.h"

struct kdp_buckets {
  kdp_dist *d;
  float *grads;
  size_t n, nb;    /* nb buckets; 0 = off (one blocking allreduce) */
  size_t *lo, *hi; /* bucket i = grads[lo[i], hi[i]), i = 0 at the end of the vector */
  MPI_Request *req;
  kdp_model *model; /* kdp_buckets_for_model: the model whose backward hook this is */
  size_t started, tested; /* buckets started this step; the first one not known complete */
  /* the shared-memory sum (kdp_buckets_create_shm): the window, its communicator (the peer's
     ranks, rank = slice), the k arenas (arena[slice], each padded to whole pages), this rank's
     slice [lo, hi) of the vector, and the model's own arena while the window's is lent */
  MPI_Win *win;
  MPI_Comm shm_comm;
  float **arena;
  int k;
  size_t slo, shi;
  float *model_grads;
};

kdp_buckets *kdp_buckets_create(kdp_dist *d, float *grads, size_t n, const size_t *marks,
                                size_t n_marks, size_t bucket_floats) {
  kdp_buckets *b = kdp_xcalloc(1, sizeof *b);
  b->d = d;
  b->grads = grads;
  b->n = n;
  if (bucket_floats == 0 || n == 0 || d->ranks_per_peer <= 1) return b;
  b->lo = kdp_xmalloc((n_marks + 1) * sizeof *b->lo);
  b->hi = kdp_xmalloc((n_marks + 1) * sizeof *b->hi);
  size_t top = n;
  for (size_t i = 0; i < n_marks; i++) {
    size_t m = marks[i];
    if (m >= top || top - m < bucket_floats) continue;
    b->lo[b->nb] = m;
    b->hi[b->nb++] = top;
    top = m;
  }
  if (top > 0) {
    b->lo[b->nb] = 0;
    b->hi[b->nb++] = top;
  }
  b->req = kdp_xmalloc(b->nb * sizeof *b->req);
  return b;
}

/* Tests the running buckets in order, from the first not known complete; each MPI_Test also
   moves every other outstanding request of this process (opal_progress). */
static void test_started(kdp_buckets *b) {
  while (b->tested < b->started) {
    int done = 0;
    KDP_CHECK_MPI(MPI_Test(&b->req[b->tested], &done, MPI_STATUS_IGNORE));
    if (!done) return;
    b->tested++;
  }
}

static void start_from(kdp_buckets *b, size_t ready) {
  while (b->started < b->nb && b->lo[b->started] >= ready) {
    size_t i = b->started++;
    KDP_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, b->grads + b->lo[i], (int)(b->hi[i] - b->lo[i]),
                                 MPI_FLOAT, MPI_SUM, COMM(b->d->peer_comm), &b->req[i]));
  }
}

void kdp_buckets_ready(void *ctx, size_t ready) {
  kdp_buckets *b = ctx;
  if (!b->nb) return;
  /* ready == 0: the backward pass has written its last gradients; the buckets still waiting
     (the first layer's) go in kdp_buckets_finish's blocking allreduce */
  if (ready > 0) start_from(b, ready);
  test_started(b);
}

/* MPI-3's unified model with a passive-target epoch open for the window's life: a memory
   barrier (MPI_Win_sync), a barrier of the ranks, another memory barrier: every write to the
   window before it is seen by every read after it. */
static void shm_sync(kdp_buckets *b) {
  KDP_CHECK_MPI(MPI_Win_sync(*b->win));
  KDP_WAIT_MPI(b->d, MPI_Barrier(b->shm_comm));
  KDP_CHECK_MPI(MPI_Win_sync(*b->win));
}

/* slice [lo, hi) of every arena := arena 0 + arena 1 + ... + arena k-1, in that order, in chunks
   that stay in L1 */
static void shm_sum_slice(float *const *arena, int k, size_t lo, size_t hi) {
  enum { CH = 1024 };
  float acc[CH];
  for (size_t c = lo; c < hi; c += CH) {
    size_t m = hi - c < CH ? hi - c : CH;
    const float *a0 = arena[0] + c;
    for (size_t i = 0; i < m; i++) acc[i] = a0[i];
    for (int r = 1; r < k; r++) {
      const float *ar = arena[r] + c;
      for (size_t i = 0; i < m; i++) acc[i] += ar[i];
    }
    for (int r = 0; r < k; r++) memcpy(arena[r] + c, acc, m * sizeof(float));
  }
}

static void shm_finish(kdp_buckets *b) {
  double t0 = kdp_now();
  shm_sync(b); /* every rank's arena is written */
  shm_sum_slice(b->arena, b->k, b->slo, b->shi);
  shm_sync(b); /* every slice's sum is in every arena; each rank owns its arena again */
  b->d->t_allreduce += kdp_now() - t0;
}

int kdp_buckets_is_shm(const kdp_buckets *b) { return b->win != NULL; }

kdp_buckets *kdp_buckets_create_shm(kdp_dist *d, size_t n, float **grads) {
  if (d->ranks_per_peer <= 1) return NULL;
  MPI_Comm c;
  int k = 0, me = 0, all = 0;
  KDP_CHECK_MPI(MPI_Comm_split_type(COMM(d->peer_comm), MPI_COMM_TYPE_SHARED, d->slice,
                                    MPI_INFO_NULL, &c));
  KDP_CHECK_MPI(MPI_Comm_size(c, &k));
  /* every rank of the peer must see the whole peer on its node */
  int here = k == d->ranks_per_peer;
  KDP_CHECK_MPI(MPI_Allreduce(&here, &all, 1, MPI_INT, MPI_LAND, COMM(d->peer_comm)));
  if (!all) {
    MPI_Comm_free(&c);
    return NULL;
  }
  KDP_CHECK_MPI(MPI_Comm_rank(c, &me)); /* == slice (the split's key) */
  kdp_buckets *b = kdp_xcalloc(1, sizeof *b);
  b->d = d;
  b->n = n;
  b->k = k;
  b->shm_comm = c;
  b->win = kdp_xmalloc(sizeof *b->win);
  /* each rank's arena on its own pages (noncontig: placed near its rank), 64-byte aligned within
     its segment (Open MPI's segments need not be: 8 bytes off a line here) */
  const size_t page = 4096, bytes = ((n ? n : 1) * sizeof(float) + 64 + page - 1) / page * page;
  MPI_Info info;
  KDP_CHECK_MPI(MPI_Info_create(&info));
  KDP_CHECK_MPI(MPI_Info_set(info, "alloc_shared_noncontig", "true"));
  void *mine = NULL;
  KDP_CHECK_MPI(MPI_Win_allocate_shared((MPI_Aint)bytes, sizeof(float), info, c, &mine, b->win));
  MPI_Info_free(&info);
  b->arena = kdp_xmalloc((size_t)k * sizeof *b->arena);
  for (int r = 0; r < k; r++) {
    MPI_Aint sz = 0;
    int du = 0;
    void *base = NULL;
    KDP_CHECK_MPI(MPI_Win_shared_query(*b->win, r, &sz, &du, &base));
    b->arena[r] = (float *)(((uintptr_t)base + 63) & ~(uintptr_t)63);
  }
  memset(b->arena[me], 0, n * sizeof(float));
  /* the slices: cut at multiples of 16 floats (64 bytes), so no two ranks write one cache line */
  b->slo = (n * (size_t)me / (size_t)k) & ~(size_t)15;
  b->shi = me + 1 == k ? n : (n * (size_t)(me + 1) / (size_t)k) & ~(size_t)15;
  KDP_CHECK_MPI(MPI_Win_lock_all(MPI_MODE_NOCHECK, *b->win));
  shm_sync(b);
  *grads = b->arena[me];
  return b;
}

void kdp_buckets_finish(kdp_buckets *b) {
  if (b->win) {
    shm_finish(b);
    return;
  }
  if (!b->nb) {
    kdp_dist_peer_allreduce(b->d, b->grads, b->n);
    return;
  }
  double t0 = kdp_now();
  kdp_dist *d = b->d;
  /* the buckets the backward pass did not start (the first layer's, at least) have nothing left
     to overlap with: one blocking allreduce over their range (contiguous at the front of the
     vector), whose algorithms (coll/tuned) are faster than the non-blocking ones (coll/libnbc):
     1.6 MB of mlp(512,256)'s first layer, 2 ranks on shared memory, best of 300: 0.15 ms against
     0.21 ms (docs/threads.md). It also drives the started buckets' progress. */
  size_t rest = b->started < b->nb ? b->hi[b->started] : 0;
  if (rest)
    KDP_WAIT_MPI(d, MPI_Allreduce(MPI_IN_PLACE, b->grads, (int)rest, MPI_FLOAT, MPI_SUM,
                                  COMM(d->peer_comm)));
  KDP_WAIT_MPI(d, MPI_Waitall((int)(b->started - b->tested), b->req + b->tested,
                              MPI_STATUSES_IGNORE));
  b->started = b->tested = 0;
  d->t_allreduce += kdp_now() - t0;
}

kdp_buckets *kdp_buckets_for_model(kdp_dist *d, kdp_model *m, size_t bucket_kb,
                                   kdp_grad_sum how) {
  /* (a model without gradients, e.g. a frozen teacher's, keeps the allreduce path: it sums
     nothing) */
  if (how != KDP_GRAD_SUM_ALLREDUCE && kdp_model_grads(m)) {
    float *g = NULL;
    kdp_buckets *b = kdp_buckets_create_shm(d, kdp_model_n_params(m), &g);
    if (b) {
      b->model = m;
      b->model_grads = kdp_model_swap_grads(m, g);
      return b;
    }
    if (how == KDP_GRAD_SUM_SHM && d->ranks_per_peer > 1 && d->slice == 0)
      fprintf(stderr, "kdpeers: peer %d: run.grad_sum = shm, but its %d ranks are not all on "
                      "one node: summing its gradients with the allreduce\n",
              d->peer, d->ranks_per_peer);
  }
  size_t nm = kdp_model_grad_marks(m, NULL, 0);
  size_t *marks = kdp_xmalloc((nm ? nm : 1) * sizeof *marks);
  kdp_model_grad_marks(m, marks, nm);
  kdp_buckets *b = kdp_buckets_create(d, kdp_model_grads(m), kdp_model_n_params(m), marks, nm,
                                      bucket_kb * 1024 / sizeof(float));
  free(marks);
  if (b->nb) {
    b->model = m;
    kdp_model_set_backward_hook(m, kdp_buckets_ready, b);
  }
  return b;
}

size_t kdp_buckets_count(const kdp_buckets *b) { return b->nb; }
size_t kdp_buckets_started(const kdp_buckets *b) { return b->started; }

void kdp_buckets_range(const kdp_buckets *b, size_t i, size_t *lo, size_t *hi) {
  *lo = b->lo[i];
  *hi = b->hi[i];
}

void kdp_buckets_free(kdp_buckets *b) {
  if (!b) return;
  if (b->model && b->win) kdp_model_swap_grads(b->model, b->model_grads);
  else if (b->model) kdp_model_set_backward_hook(b->model, NULL, NULL);
  if (b->win) {
    MPI_Win_unlock_all(*b->win);
    MPI_Win_free(b->win);
    MPI_Comm_free(&b->shm_comm);
    free(b->win);
    free(b->arena);
  }
  free(b->lo);
  free(b->hi);
  free(b->req);
  free(b);
}
