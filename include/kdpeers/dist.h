/* dist.h: the MPI layer: world/peer/cohort communicators, start-up agreement and the exchanges. */
#ifndef KDPEERS_DIST_H
#define KDPEERS_DIST_H

#include <stdatomic.h>

#include "kdpeers/common.h"

/*
 * Uniform layout (uniform = 1): world size = P peers x k ranks_per_peer. World rank r belongs to
 * peer r / k and holds slice r % k of each batch. The peer communicator joins the k ranks of one
 * peer (gradient allreduce); the cohort communicator joins the P ranks that hold the same slice of
 * the batch across all peers (logit/feature exchange). Cohort rank == peer index.
 *
 * Per-peer layout (uniform = 0, peer.N.ranks_per_peer): peer p has k_p ranks, world size =
 * sum_p k_p, peer p's ranks are world ranks peer_first[p] .. peer_first[p] + k_p - 1 and slice s
 * of them holds rows [B s / k_p, B (s + 1) / k_p) of each B-row batch. The exchanges go over the
 * world (kdp_dist_layout_allgather); the cohort communicator joins only the slice-0 ranks (one
 * per peer, cohort rank == peer) and is MPI_COMM_NULL on the others.
 */
#define KDP_DIST_MAX_PEERS 64
struct kdp_dist;
/* Called while this rank waits at the agreement point (kdp_dist_step_sync), about every
   KDP_DIST_WAIT_PERIOD seconds once it has waited that long, with the seconds waited so far
   (a stop of this process itself, e.g. SIGSTOP of every rank, is not counted as waiting), and
   once more with done = 1 when the agreement point completes after such a call. */
typedef void (*kdp_dist_wait_fn)(void *ctx, struct kdp_dist *d, double waited, int done);
#define KDP_DIST_WAIT_PERIOD 0.1
typedef struct kdp_dist {
  int world_rank, world_size;
  int local_rank, local_size; /* on this node, from MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) */
  int ranks_per_peer;         /* ranks of this rank's peer (k, or k_p per peer) */
  int n_peers, peer, slice;   /* peer = cohort rank, slice = rank in the peer communicator */
  int uniform;                /* 1: every peer has ranks_per_peer ranks */
  int peer_k[KDP_DIST_MAX_PEERS], peer_first[KDP_DIST_MAX_PEERS]; /* filled for P <= 64 */
  void *world, *peer_comm, *cohort_comm, *node_comm; /* MPI_Comm, opaque outside src/dist */
  double t_exchange, t_allreduce, t_wait; /* seconds spent, accumulated */
  double bytes_exchanged;
  /* the agreement point: its count (the same on every rank), the wait hook, and for the stall
     check the ranks' reports of waiting (kdp_dist_report_waiting / kdp_dist_waiting_ranks) */
  uint64_t sync_seq;
  kdp_dist_wait_fn on_wait;
  void *wait_ctx;
  void *report_comm, *report_req; /* MPI_Comm, MPI_Request */
  uint64_t report_seq, *reported;  /* this rank's last report; rank 0: each rank's last one */
  /* the collective this rank waits in now (a function name, KDP_DIST_AGREEMENT, NULL: none) and
     how many it has waited in: read by the stall check's watchdog thread */
  _Atomic(const char *) waiting_in;
  atomic_uint_fast64_t waits;
} kdp_dist;
#define KDP_DIST_AGREEMENT "the step's agreement point"

/* MPI_Init_thread (FUNNELED) unless already initialised. Safe to call once per process. */
int kdp_dist_init_mpi(int *argc, char ***argv, kdp_error *err);
void kdp_dist_finalize(void);
/* The MPI library's version line (MPI_Get_library_version, callable before MPI_Init), e.g.
   "Open MPI v4.1.4, package: Debian OpenMPI, ...", cut at the first newline. */
void kdp_dist_library_version(char *buf, size_t n);
/* Rank of this process in MPI_COMM_WORLD (0 when MPI is not initialised). */
int kdp_dist_world_rank(void);
/* Builds the communicators; fails clearly when world size is not divisible by ranks_per_peer. */
int kdp_dist_setup(kdp_dist *d, int ranks_per_peer, kdp_error *err);
/* The layout from run.ranks_per_peer (k) and the per-peer overrides peer_k[0..n) (0 = k): P is
   the peer count whose k_p sum to the world size. Without overrides, or when every k_p is equal,
   this is kdp_dist_setup(k_p). Fails clearly, naming the numbers, when no peer count fits the
   world size or an override names a peer beyond the last. */
int kdp_dist_setup_layout(kdp_dist *d, int k, const int *peer_k, int n, kdp_error *err);
/* Rows [lo, hi) of a B-row batch that world rank r (peer p, slice s) holds. */
void kdp_dist_rank_rows(const kdp_dist *d, int p, int s, size_t B, size_t *lo, size_t *hi);
void kdp_dist_free(kdp_dist *d);

/* Every rank passes its bytes; fails on every rank (with the first differing rank and byte
   offset in the message) unless all ranks hold identical bytes. what names the thing. */
int kdp_dist_agree(kdp_dist *d, const void *buf, size_t n, const char *what, kdp_error *err);
/* Logical AND of ok over the world (for "did every rank succeed?"). */
int kdp_dist_all_ok(kdp_dist *d, int ok);

/* Sum-allreduce in place over the peer communicator (data parallelism inside a peer). */
void kdp_dist_peer_allreduce(kdp_dist *d, float *buf, size_t n);
/* Gradient buckets (src/dist/buckets.c): the peer allreduce of a flat gradient vector in
   pieces, each started (MPI_Iallreduce in place over the peer communicator) as soon as the
   backward pass has finished the layers that write it, as PyTorch DDP does. A bucket is a
   contiguous range of grads cut at layer marks (kdp_model_grad_marks: decreasing offsets where a
   layer's gradients begin), at least bucket_floats long except the last, from the end of the
   vector: the first bucket holds the last layers. bucket_floats = 0 turns buckets off: finish is
   then kdp_dist_peer_allreduce, one blocking allreduce after the backward pass. With one rank per
   peer every call does nothing. Every rank of a peer must pass the same n, marks and size. */
typedef struct kdp_buckets kdp_buckets;
kdp_buckets *kdp_buckets_create(kdp_dist *d, float *grads, size_t n, const size_t *marks,
                                size_t n_marks, size_t bucket_floats);
/* grads[ready, n) are final for this step: starts the buckets inside that range, and calls
   MPI_Test on the running ones so that they progress (Open MPI moves a non-blocking collective
   only inside MPI calls). Shaped as a kdp_backward_hook (ctx = the kdp_buckets). */
void kdp_buckets_ready(void *b, size_t ready);
/* Starts the buckets not started yet (all of them when no backward pass ran) and waits for
   every one: grads then holds the sum over the peer's ranks. Ready for the next step. */
void kdp_buckets_finish(kdp_buckets *b);
/* Buckets of bucket_kb KiB over model m's gradients (src/nn's kdp_model, its layer marks), set as
   m's backward hook; kdp_buckets_free removes the hook. */
struct kdp_model;
kdp_buckets *kdp_buckets_for_model(kdp_dist *d, struct kdp_model *m, size_t bucket_kb);
size_t kdp_buckets_count(const kdp_buckets *b);
/* buckets started in this step so far (for tests) */
size_t kdp_buckets_started(const kdp_buckets *b);
/* [lo, hi) of bucket i (bucket 0 ends at n) */
void kdp_buckets_range(const kdp_buckets *b, size_t i, size_t *lo, size_t *hi);
void kdp_buckets_free(kdp_buckets *b);
/* Sum-allreduce in place over the cohort (replicated modules, ensemble probabilities). */
void kdp_dist_cohort_allreduce(kdp_dist *d, float *buf, size_t n);
/* Sum over the peers, each peer counted once (a peer's ranks must pass the same values); every
   rank receives it. Uniform layouts: over the cohort; per-peer layouts: over the world, with the
   slice-0 ranks contributing. */
void kdp_dist_cohort_allreduce_f64(kdp_dist *d, double *buf, size_t n);
void kdp_dist_peer_allreduce_f64(kdp_dist *d, double *buf, size_t n);
/* Allgather n floats per cohort member into out (n_peers x n), cohort order. */
void kdp_dist_cohort_allgather(kdp_dist *d, const float *in, float *out, size_t n);
/* Allgatherv: counts[i] floats from member i, placed at displs[i]. */
void kdp_dist_cohort_allgatherv(kdp_dist *d, const float *in, size_t n, float *out,
                                const size_t *counts, const size_t *displs);
/* Reduce-scatter over the cohort: in holds n_peers blocks of n floats (block j addressed to peer
   j); out receives the sum over members of the block addressed to this peer. */
void kdp_dist_cohort_reduce_scatter(kdp_dist *d, const float *in, float *out, size_t n);
/* Reduce-scatter with per-member block sizes: in holds the blocks back to back (block j has
   counts[j] floats); out receives counts[peer] floats. */
void kdp_dist_cohort_reduce_scatterv(kdp_dist *d, const float *in, float *out,
                                     const size_t *counts);
/* Per-peer layout: every rank passes its rows [lo, hi) of a B-row batch (kdp_dist_rank_rows);
   peer p's block of out starts at offset[p] and has width[p] floats per row. Afterwards every
   rank holds every peer's whole block (MPI_Allgatherv over the world). */
void kdp_dist_layout_allgather(kdp_dist *d, const float *in, size_t B, const size_t *width,
                               const size_t *offset, float *out);
/* Broadcast of n floats from world rank 0 (exactly replicated module gradients). */
void kdp_dist_world_bcast_f(kdp_dist *d, float *buf, size_t n);
/* Sum-allreduce over the whole world (replicated modules under hybrid parallelism). */
void kdp_dist_world_allreduce(kdp_dist *d, float *buf, size_t n);
/* Gathers one uint32 per world rank at rank 0 (out: world_size values, only read on rank 0). */
void kdp_dist_gather_u32(kdp_dist *d, uint32_t v, uint32_t *out);
/* Memory shared by the ranks of this node (MPI_Win_allocate_shared on the node communicator):
   local rank 0 allocates `bytes`, every rank of the node gets the same base address. *win is the
   handle for kdp_dist_node_shared_free (collective over the node). */
void *kdp_dist_node_shared(kdp_dist *d, size_t bytes, void **win);
void kdp_dist_node_shared_free(void *win);
/* Broadcast from local rank 0 over the node; barrier over the node. */
void kdp_dist_node_bcast(kdp_dist *d, void *buf, size_t bytes);
void kdp_dist_node_barrier(kdp_dist *d);
/* Sum over the world of a double. */
double kdp_dist_sum(kdp_dist *d, double v);
/* Broadcast from world rank 0. */
void kdp_dist_bcast(kdp_dist *d, void *buf, size_t bytes);
/* The per-step agreement point: element-wise MAX of n ints over the world, in place. The time
   spent here is the wait for the slowest rank (counted in t_wait), so the exchange that follows
   measures transfer only. A non-blocking allreduce, tested in a loop: a short spin, then short
   sleeps (a long wait costs little CPU), calling d->on_wait meanwhile. */
void kdp_dist_step_sync(kdp_dist *d, int32_t *flags, size_t n);
/* Tells rank 0 that this rank waits at the current agreement point (once per agreement point;
   nothing on rank 0). */
void kdp_dist_report_waiting(kdp_dist *d);
/* Rank 0, while it waits at an agreement point: arrived[r] = 1 for the ranks known to have
   reached it (itself, and those that reported waiting there), 0 for the others; returns how
   many have not. */
int kdp_dist_waiting_ranks(kdp_dist *d, unsigned char *arrived);
/* Ends every rank of the job (MPI_Abort) with this exit status. */
void kdp_dist_abort(kdp_dist *d, int status);
/* Max over world of a double (e.g. slowest rank's time). */
double kdp_dist_max(kdp_dist *d, double v);
void kdp_dist_barrier(kdp_dist *d);

/* ---- exchanges: the distillation step of one rank, fed by collectives ---- */

struct kdp_cohort;
typedef struct kdp_exchange kdp_exchange;

/* Buffers for exchanging batches of up to max_b rows of C logits (and the cohort's features). */
int kdp_exchange_create(kdp_exchange **out, kdp_dist *d, struct kdp_cohort *c, size_t C,
                        size_t max_b, kdp_error *err);
void kdp_exchange_free(kdp_exchange *x);

/* Settings of one step (everything kdp_kd_batch holds except the gathered tensors). */
typedef struct kdp_exchange_args {
  const int32_t *y; /* b labels of this rank's slice */
  size_t b;
  float T, weight;  /* weight = lam * w(e) */
  int burn_in;
  float scale;      /* multiplies every gradient handed back (hybrid: b / global batch) */
} kdp_exchange_args;

/*
 * One distillation step for this rank's peer: allgathers z (b x C) and, when the method reads
 * them, h (b x d_peer) over the cohort; computes this rank's share of the objective
 * (kdp_cohort_step); reduce-scatters the gradients that reach other peers' logits and features.
 * ACCUMULATES scale * dJ/dz into dz (b x C) and, when kdp_cohort_feature_grads, into dh
 * (b x d_peer). The module's grads are left scaled in the cohort (not yet summed over ranks: call
 * kdp_exchange_module_allreduce). Returns 0 or KDP_EINVAL.
 */
struct kdp_kd_losses;
int kdp_exchange_step(kdp_exchange *x, const float *z, const float *h,
                      const kdp_exchange_args *a, float *dz, float *dh,
                      struct kdp_kd_losses *out, kdp_error *err);
/*
 * Per-peer layout (d->uniform = 0): one distillation step over the whole global batch. a->y holds
 * all a->b labels of the global batch; this rank passes its rows [lo, hi) of its peer's logits z
 * ((hi - lo) x C) and, when the method reads them, features h. The rows of every rank are
 * allgathered over the world, every rank computes the whole cohort objective
 * (kdp_cohort_objective: J = sum_i L_i + L_module, means over the b rows) and ACCUMULATES its own
 * rows of dJ/dz into dz and, when kdp_cohort_feature_grads, of dJ/dh into dh (a->scale is not
 * used: the peer allreduce of the parameter gradients sums the rows of the peer's ranks into the
 * gradient of the global-batch mean). The module's grads are the whole dJ/dtheta on every rank
 * (kdp_exchange_module_allreduce then only makes the replicas bit-identical). out receives this
 * rank's peer's losses over the whole global batch.
 */
int kdp_exchange_step_layout(kdp_exchange *x, const float *z, const float *h,
                             const kdp_exchange_args *a, size_t lo, size_t hi, float *dz,
                             float *dh, struct kdp_kd_losses *out, kdp_error *err);
/* Per-peer layout, evaluation (collective over the world): gathers every rank's rows of a B-row
   eval batch as above and returns every peer's logits (P x B x C, valid until the next call);
   when teacher != NULL, also the method's teacher logits (B x C, eval mode). */
const float *kdp_exchange_eval_layout(kdp_exchange *x, const float *z, const float *h, size_t B,
                                      float *teacher, kdp_error *err);
/* Sums the replicated module's gradients over every rank (world), so the replicas step alike;
   per-peer layout: every rank already holds the whole gradient, rank 0's is broadcast. */
void kdp_exchange_module_allreduce(kdp_exchange *x);
/* Teacher logits (b x C) in eval mode for an eval batch (collective over the cohort). */
int kdp_exchange_teacher_eval(kdp_exchange *x, const float *z, const float *h, size_t b,
                              float *teacher, kdp_error *err);

#endif
