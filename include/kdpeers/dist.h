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
 * of them holds rows [B s / k_p, B (s + 1) / k_p) of each B-row batch. The cohort communicator
 * joins only the slice-0 ranks (one per peer, cohort rank == peer) and is MPI_COMM_NULL on the
 * others. The row exchanges below treat both layouts alike.
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
  /* the row exchanges' scratch (counts and displacements per world rank, received rows) */
  int *xcounts;
  float *xbuf;
  size_t xcap;
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
  void *sum_req; /* MPI_Request of kdp_dist_world_allreduce_start, NULL when none is running */
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
/* MPI_COMM_WORLD's size (1 before MPI_Init) */
int kdp_dist_world_size(void);
/* Builds the communicators; fails clearly when world size is not divisible by ranks_per_peer. */
int kdp_dist_setup(kdp_dist *d, int ranks_per_peer, kdp_error *err);
/* The layout from run.ranks_per_peer (k) and the per-peer overrides peer_k[0..n) (0 = k): P is
   the peer count whose k_p sum to the world size. Without overrides, or when every k_p is equal,
   this is kdp_dist_setup(k_p). Fails clearly, naming the numbers, when no peer count fits the
   world size or an override names a peer beyond the last. */
int kdp_dist_setup_layout(kdp_dist *d, int k, const int *peer_k, int n, kdp_error *err);
void kdp_dist_free(kdp_dist *d);

/* Every rank passes its bytes; fails on every rank (with the first differing rank and byte
   offset in the message) unless all ranks hold identical bytes. what names the thing. */
int kdp_dist_agree(kdp_dist *d, const void *buf, size_t n, const char *what, kdp_error *err);
/* Logical AND of ok over the world (for "did every rank succeed?"). */
int kdp_dist_all_ok(kdp_dist *d, int ok);
/* After a part that may fail on some ranks only (rc != 0 there, err set): 0 on every rank when
   none failed; else every rank returns the code of the lowest failing world rank and receives
   its message in err, prefixed with "rank R: " on the other ranks. */
int kdp_dist_first_error(kdp_dist *d, int rc, kdp_error *err);

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
/* grads[ready, n) are final for this step: starts the buckets inside that range (not when
   ready == 0, the end of the backward pass: see finish), and calls MPI_Test on the running ones
   so that they progress (Open MPI moves a non-blocking collective only inside MPI calls). Shaped
   as a kdp_backward_hook (ctx = the kdp_buckets). */
void kdp_buckets_ready(void *b, size_t ready);
/* Sums the buckets not started yet (all of them when no backward pass ran; a contiguous range at
   the front of grads) in one blocking allreduce, then waits for the started ones: grads then
   holds the sum over the peer's ranks. Ready for the next step. */
void kdp_buckets_finish(kdp_buckets *b);
/* How a peer's ranks sum their gradients (run.grad_sum): through a shared-memory window when
   all of them are on one node (auto, shm), else the allreduce (in buckets when bucket_kb > 0). */
typedef enum kdp_grad_sum {
  KDP_GRAD_SUM_AUTO = 0,
  KDP_GRAD_SUM_ALLREDUCE,
  KDP_GRAD_SUM_SHM
} kdp_grad_sum;
/* The shared-memory sum (collective over the peer's ranks): the k ranks' gradient arenas of n
   floats each live in one MPI-3 shared window (MPI_Win_allocate_shared over the peer's ranks,
   which must share a node). kdp_buckets_finish then: a barrier (the arenas are written), each
   rank sums its 1/k slice over the k arenas in rank order (arena 0 + arena 1 + ...: on 2 ranks
   bitwise the allreduce's a + b, on more a fixed order) and writes the sum into that slice of
   every arena, a barrier: each rank's own arena holds the whole sum, with no copy back. *grads
   receives this rank's arena. Returns NULL (nothing allocated) when the peer's ranks span
   nodes or the peer has one rank. */
kdp_buckets *kdp_buckets_create_shm(kdp_dist *d, size_t n, float **grads);
/* 1: b sums through the shared window */
int kdp_buckets_is_shm(const kdp_buckets *b);
/* The gradient sum for model m (src/nn's kdp_model): how = allreduce, or auto/shm when the peer's
   ranks span nodes: buckets of bucket_kb KiB over its layer marks, set as m's backward hook;
   how = auto/shm on one node: m's gradient arena moves into the shared window (no hook: on
   shared memory the overlap hides nothing, docs/threads.md). kdp_buckets_free removes the hook
   or gives m back its own arena (with the gradients). */
struct kdp_model;
kdp_buckets *kdp_buckets_for_model(kdp_dist *d, struct kdp_model *m, size_t bucket_kb,
                                   kdp_grad_sum how);
/* The shared sum fused with the optimizer step (collective over the peer's ranks; b from
   kdp_buckets_create_shm or kdp_buckets_for_model's shm path): m's parameter arena and o's
   momentum (o->n == n) move into a second shared window, one copy per rank (the values copied
   in; every other writer of them keeps writing its own rank's copy). kdp_buckets_finish_sgd(b,
   lr) then replaces kdp_buckets_finish + kdp_sgd_step(o, params, grads, lr): a barrier (the
   gradient arenas are written), each rank sums its slice of the k arenas (the same order) into
   L1 and applies the SGD update to that slice only (kdp_sgd_apply: bitwise kdp_sgd_step's), in
   its own copy; a barrier; each rank copies the other slices' new parameters from their ranks'
   copies into its own; a barrier (then no rank reads another's copy until the next step's sum);
   o->n_steps counts the step. The gradient arenas then hold this rank's own gradients, not the
   sum, and o->buf is current in this rank's slice only (no rank reads the others' momentum
   while it steps): kdp_buckets_gather_sgd (collective; nothing without kdp_buckets_share_sgd,
   b = NULL or momentum 0) makes every rank's o->buf whole, as a checkpoint needs it.
   kdp_buckets_free gathers it too and gives m and o their own arrays back, with the current
   values. */
struct kdp_sgd;
void kdp_buckets_share_sgd(kdp_buckets *b, struct kdp_model *m, struct kdp_sgd *o);
/* 1: kdp_buckets_share_sgd has been called on b */
int kdp_buckets_is_shm_sgd(const kdp_buckets *b);
void kdp_buckets_finish_sgd(kdp_buckets *b, float lr);
void kdp_buckets_gather_sgd(kdp_buckets *b);
size_t kdp_buckets_count(const kdp_buckets *b);
/* buckets started in this step so far (for tests) */
size_t kdp_buckets_started(const kdp_buckets *b);
/* [lo, hi) of bucket i (bucket 0 ends at n) */
void kdp_buckets_range(const kdp_buckets *b, size_t i, size_t *lo, size_t *hi);
void kdp_buckets_free(kdp_buckets *b);
/* Sum over the peers, each peer counted once (a peer's ranks must pass the same values); every
   rank receives it. Uniform layouts: over the cohort; per-peer layouts: over the world, with the
   slice-0 ranks contributing. */
void kdp_dist_cohort_allreduce_f64(kdp_dist *d, double *buf, size_t n);
void kdp_dist_peer_allreduce_f64(kdp_dist *d, double *buf, size_t n);
/* Allgather n floats per cohort member into out (n_peers x n), cohort order. */
void kdp_dist_cohort_allgather(kdp_dist *d, const float *in, float *out, size_t n);

/* ---- rows of a batch: who holds which, and the exchanges between them ----
 * A group of ranks holds a batch of B rows, each rank the rows of one peer:
 *   KDP_GROUP_WORLD: every rank; peer p's rows are split over its k_p ranks by slice, rows
 *     [B s / k_p, B (s + 1) / k_p) on slice s (the uniform layout is the case k_p = k);
 *   KDP_GROUP_COHORT: the cohort communicator's ranks, each holding all B rows of its peer (the
 *     ranks of one slice of a uniform layout, or the slice-0 ranks: call it only there).
 * A rank works on target rows: its own rows (KDP_ROWS_OWN), its block of the batch
 * (KDP_ROWS_BLOCK: rows [B m / M, B (m + 1) / M) on member m of M, so every row is worked on by
 * exactly one rank) or every row (KDP_ROWS_ALL). The exchanges move rows of per-peer tensors
 * (row width width[p] floats for peer p) between the rows a rank holds and the rows it works on:
 * one MPI_Alltoallv over the group, each pair of ranks sending the rows in the intersection. */
typedef enum kdp_group { KDP_GROUP_WORLD = 0, KDP_GROUP_COHORT } kdp_group;
typedef enum kdp_rows { KDP_ROWS_OWN = 0, KDP_ROWS_BLOCK, KDP_ROWS_ALL } kdp_rows;
/* Rows [lo, hi) of a B-row batch that this rank works on (which = OWN: holds). */
void kdp_dist_rows(const kdp_dist *d, kdp_group g, kdp_rows which, size_t B, size_t *lo,
                   size_t *hi);
/* gather: every rank passes its own rows (n_own x width[its peer]) and receives, for its target
   rows (n_t of them), every peer's rows: out = P blocks (n_t x width[p]) back to back, cohort
   order. */
void kdp_dist_gather_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                          const size_t *width, const float *in, float *out);
/* scatter, the reverse: every rank passes, for its target rows, rows of every peer: in = P
   blocks (n_t x width[p]), or with shared = 1 one block (n_t x width[0]) that every peer
   receives (every width equal); each rank ADDS into out (n_own x width[its peer]) the rows of
   its own it receives, summed in rank order (a reduce-scatter where target rows overlap). */
void kdp_dist_scatter_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                           const size_t *width, int shared, const float *in, float *out);
/* the same, but out = the rows received, not added: with target BLOCK (the blocks partition the
   batch) each of a rank's rows comes from exactly one sender and is received in place, with no
   zeroing and no adding pass; other targets zero out first and add. */
void kdp_dist_scatter_rows_set(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                               const size_t *width, int shared, const float *in, float *out);
/* Several tensors' rows in one exchange (one MPI_Alltoallw, one message per pair of ranks): field
   f moves rows of width[p] floats of peer p from in to out, exactly as its own exchange would
   (the same rows, places and bytes counted). gather: as kdp_dist_gather_rows; scatter_blocks: as
   kdp_dist_scatter_rows_set with target KDP_ROWS_BLOCK (shared per field). One field: the plain
   exchange. A field with whole = n > 0 is no rows but n floats every member sends whole to every
   other member (an allgather): out = the group's size blocks of n, member order, this member's
   own block left untouched (width and shared unused). */
#define KDP_DIST_MAX_FIELDS 4
typedef struct kdp_rows_field {
  const size_t *width;
  int shared;
  const float *in;
  float *out;
  size_t whole;
} kdp_rows_field;
void kdp_dist_gather_rows_fields(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                                 const kdp_rows_field *f, size_t nf);
void kdp_dist_scatter_blocks_fields(kdp_dist *d, kdp_group g, size_t B, const kdp_rows_field *f,
                                    size_t nf);
/* Reduces rows across the peers: every rank passes its own rows of a B-row batch (n_own x width,
   in place) and receives on them the element-wise sum (or min) over the peers of the same rows,
   every peer counted once. One MPI_Allreduce: over the cohort communicator when the layout is
   uniform (its ranks hold the same rows); else over the world, of the whole B x width with the
   rows a rank does not hold set to the op's identity (0, +inf). */
typedef enum kdp_dist_op { KDP_DIST_SUM = 0, KDP_DIST_MIN } kdp_dist_op;
void kdp_dist_reduce_rows(kdp_dist *d, size_t B, size_t width, kdp_dist_op op, float *rows);
/* Sum / min of n values over the group's ranks, in place (every rank receives the result). */
void kdp_dist_group_sum_f64(kdp_dist *d, kdp_group g, double *buf, size_t n);
void kdp_dist_group_min(kdp_dist *d, kdp_group g, float *buf, size_t n);

/* Sum-allreduce over the whole world (replicated modules under hybrid parallelism). */
void kdp_dist_world_allreduce(kdp_dist *d, float *buf, size_t n);
/* The same sum started now (MPI_Iallreduce) and finished by kdp_dist_world_allreduce_finish:
   buf must stay untouched in between; the other collectives called meanwhile move it along.
   One at a time; finish without a started sum does nothing. */
void kdp_dist_world_allreduce_start(kdp_dist *d, float *buf, size_t n);
void kdp_dist_world_allreduce_finish(kdp_dist *d);
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

#endif
