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
  int k, me;
  size_t slo, shi;
  float *model_grads;
  /* kdp_buckets_share_sgd: a second window holding every rank's copy of the parameters
     (param[r]) and of the momentum (mom[r]); the model and optimizer whose arrays these are,
     and their own arrays while the window's are lent */
  MPI_Win *pwin;
  float **param, **mom;
  kdp_model *sgd_model;
  kdp_sgd *opt;
  float *own_params, *own_mom;
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
  if (b->pwin) KDP_CHECK_MPI(MPI_Win_sync(*b->pwin));
  KDP_WAIT_MPI(b->d, MPI_Barrier(b->shm_comm));
  KDP_CHECK_MPI(MPI_Win_sync(*b->win));
  if (b->pwin) KDP_CHECK_MPI(MPI_Win_sync(*b->pwin));
}

enum { SHM_CHUNK = 1024 };

/* acc[0, m) := arena 0 + arena 1 + ... + arena k-1 at [c, c + m), in that order */
static void chunk_sum(float *acc, float *const *arena, int k, size_t c, size_t m) {
  const float *a0 = arena[0] + c;
  for (size_t i = 0; i < m; i++) acc[i] = a0[i];
  for (int r = 1; r < k; r++) {
    const float *ar = arena[r] + c;
    for (size_t i = 0; i < m; i++) acc[i] += ar[i];
  }
}

/* slice [lo, hi) of every arena := the sum, in chunks that stay in L1 */
static void shm_sum_slice(float *const *arena, int k, size_t lo, size_t hi) {
  float acc[SHM_CHUNK];
  for (size_t c = lo; c < hi; c += SHM_CHUNK) {
    size_t m = hi - c < SHM_CHUNK ? hi - c : SHM_CHUNK;
    chunk_sum(acc, arena, k, c, m);
    for (int r = 0; r < k; r++) memcpy(arena[r] + c, acc, m * sizeof(float));
  }
}

/* rank r's slice [lo, hi) of n floats over k ranks: cut at multiples of 16 floats (64 bytes), so
   no two ranks write one cache line */
static void slice_of(size_t n, int k, int r, size_t *lo, size_t *hi) {
  *lo = (n * (size_t)r / (size_t)k) & ~(size_t)15;
  *hi = r + 1 == k ? n : (n * (size_t)(r + 1) / (size_t)k) & ~(size_t)15;
}

/* slice [slo, shi): the sum of the arenas (as shm_sum_slice, into L1 only) takes its SGD step on
   this rank's copy of the parameters and momentum (kdp_sgd_apply: kdp_sgd_step's operations per
   element) */
static void shm_sum_sgd_slice(kdp_buckets *b, float lr) {
  float acc[SHM_CHUNK];
  float *p = b->param[b->me], *buf = b->mom[b->me];
  for (size_t c = b->slo; c < b->shi; c += SHM_CHUNK) {
    size_t m = b->shi - c < SHM_CHUNK ? b->shi - c : SHM_CHUNK;
    chunk_sum(acc, b->arena, b->k, c, m);
    kdp_sgd_apply(b->opt, p + c, buf + c, acc, lr, m);
  }
}

/* every other rank's slice of the parameters (mom = 0) or of the momentum (mom = 1), from that
   rank's copy into this rank's, after a barrier. Pulled rather than pushed (each rank writing its
   slice into the others' copies): the lines this rank's next forward reads are then in its own
   cache, and no rank writes lines another core holds (kdp-bucketprof, mlp(512,256), 2 ranks,
   the momentum copied too, load ~1: k1 / k2-shm 1.55-1.58 pushed, 1.58-1.72 pulled). In chunks:
   one memcpy of a whole slice (1 MB) takes glibc's non-temporal stores, which leave the copy out
   of the cache. The momentum is pulled only by kdp_buckets_gather_sgd: copying it every step
   cost what the fusion saved. */
static void shm_pull_slices(kdp_buckets *b, int mom) {
  float *const *src = mom ? b->mom : b->param, *dst = src[b->me];
  for (int r = 0; r < b->k; r++) {
    if (r == b->me) continue;
    size_t lo, hi;
    slice_of(b->n, b->k, r, &lo, &hi);
    for (size_t c = lo; c < hi; c += SHM_CHUNK) {
      size_t m = hi - c < SHM_CHUNK ? hi - c : SHM_CHUNK;
      memcpy(dst + c, src[r] + c, m * sizeof(float));
    }
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
int kdp_buckets_is_shm_sgd(const kdp_buckets *b) { return b && b->pwin; }

void kdp_buckets_finish_sgd(kdp_buckets *b, float lr) {
  double t0 = kdp_now();
  shm_sync(b); /* every rank's arena is written */
  shm_sum_sgd_slice(b, lr);
  shm_sync(b); /* every slice has taken its step, in its rank's copy */
  shm_pull_slices(b, 0);
  /* every copy is whole again, and no rank reads another's: each may write its own copy (a
     rollback, a restore, an exchange of weights) as soon as it returns */
  shm_sync(b);
  b->opt->n_steps++;
  b->d->t_allreduce += kdp_now() - t0;
}

/* A shared window of `parts` arenas of n floats per rank of c (k ranks), each arena on its own
   pages (noncontig: placed near its rank) and 64-byte aligned within its segment (Open MPI's
   segments need not be: 8 bytes off a line here): out[r * parts + j] = rank r's arena j. */
static float **shm_alloc(MPI_Comm c, int k, size_t n, int parts, MPI_Win *win) {
  const size_t page = 4096, bytes = ((n ? n : 1) * sizeof(float) + 64 + page - 1) / page * page;
  MPI_Info info;
  KDP_CHECK_MPI(MPI_Info_create(&info));
  KDP_CHECK_MPI(MPI_Info_set(info, "alloc_shared_noncontig", "true"));
  void *mine = NULL;
  KDP_CHECK_MPI(MPI_Win_allocate_shared((MPI_Aint)(bytes * (size_t)parts), sizeof(float), info, c,
                                        &mine, win));
  MPI_Info_free(&info);
  float **out = kdp_xmalloc((size_t)k * (size_t)parts * sizeof *out);
  for (int r = 0; r < k; r++) {
    MPI_Aint sz = 0;
    int du = 0;
    void *base = NULL;
    KDP_CHECK_MPI(MPI_Win_shared_query(*win, r, &sz, &du, &base));
    for (int j = 0; j < parts; j++)
      out[r * parts + j] =
          (float *)(((uintptr_t)base + (size_t)j * bytes + 63) & ~(uintptr_t)63);
  }
  KDP_CHECK_MPI(MPI_Win_lock_all(MPI_MODE_NOCHECK, *win));
  return out;
}

void kdp_buckets_gather_sgd(kdp_buckets *b) {
  if (!b || !b->pwin || b->opt->momentum == 0.0f) return;
  shm_sync(b); /* (every slice's last step is written) */
  shm_pull_slices(b, 1);
  shm_sync(b); /* no rank reads another's copy any more */
}

void kdp_buckets_share_sgd(kdp_buckets *b, kdp_model *m, kdp_sgd *o) {
  if (!b->win || b->pwin) kdp_die("internal error: kdp_buckets_share_sgd without a shared sum");
  if (o->n != b->n || kdp_model_n_params(m) != b->n)
    kdp_die("internal error: an optimizer of %zu values, a model of %zu, a window of %zu",
            o->n, kdp_model_n_params(m), b->n);
  b->pwin = kdp_xmalloc(sizeof *b->pwin);
  float **a = shm_alloc(b->shm_comm, b->k, b->n, 2, b->pwin);
  b->param = kdp_xmalloc((size_t)b->k * sizeof *b->param);
  b->mom = kdp_xmalloc((size_t)b->k * sizeof *b->mom);
  for (int r = 0; r < b->k; r++) {
    b->param[r] = a[2 * r];
    b->mom[r] = a[2 * r + 1];
  }
  free(a);
  b->sgd_model = m;
  b->opt = o;
  b->own_params = kdp_model_swap_params(m, b->param[b->me]);
  memcpy(b->mom[b->me], o->buf, b->n * sizeof(float));
  b->own_mom = o->buf;
  o->buf = b->mom[b->me];
  KDP_CHECK_MPI(MPI_Win_sync(*b->pwin));
}

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
  b->me = me;
  b->win = kdp_xmalloc(sizeof *b->win);
  b->arena = shm_alloc(c, k, n, 1, b->win);
  memset(b->arena[me], 0, n * sizeof(float));
  slice_of(n, k, me, &b->slo, &b->shi);
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
  if (b->pwin) {
    /* the model and optimizer get their own arrays back, holding the current values */
    kdp_buckets_gather_sgd(b);
    kdp_model_swap_params(b->sgd_model, b->own_params);
    memcpy(b->own_mom, b->opt->buf, b->n * sizeof(float));
    b->opt->buf = b->own_mom;
    MPI_Win_unlock_all(*b->pwin);
    MPI_Win_free(b->pwin);
    free(b->pwin);
    free(b->param);
    free(b->mom);
  }
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
