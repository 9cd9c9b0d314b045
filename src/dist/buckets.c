/* buckets.c: the gradient allreduce of a peer's ranks in buckets, overlapped with the backward
   pass (see kdpeers/dist.h). */
#include <mpi.h>
#include <stdlib.h>

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

void kdp_buckets_finish(kdp_buckets *b) {
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

kdp_buckets *kdp_buckets_for_model(kdp_dist *d, kdp_model *m, size_t bucket_kb) {
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
  if (b->model) kdp_model_set_backward_hook(b->model, NULL, NULL);
  free(b->lo);
  free(b->hi);
  free(b->req);
  free(b);
}
