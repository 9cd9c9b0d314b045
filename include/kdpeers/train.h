/* train.h: the training run: data, peers, the step loop, evaluation, metrics and progress output. */
#ifndef KDPEERS_TRAIN_H
#define KDPEERS_TRAIN_H

#include "kdpeers/config.h"
#include "kdpeers/dist.h"
#include "kdpeers/kd.h"

/* Runs the job described by cfg on the layout d (kdp_dist_setup done). Rank 0 prints progress and
   writes run.dir/metrics.jsonl. Returns 0 or a negative code with err set (same on all ranks
   where the failure is collective). */
/* ---- elastic resume (elastic.c): --resume-as P' [--keep i,j,...] [--clone-from N] ---- */
typedef struct kdp_elastic {
  /* the request (command line) */
  int P;                     /* --resume-as: peers of the resumed cohort (0: not elastic) */
  int world;                 /* --resume-as auto: this run's ranks (P follows, see the plan) */
  int keep[KDP_MAX_PEERS];   /* --keep: the checkpoint's peers to keep when shrinking */
  int n_keep;                /* 0: the first P */
  int clone_from;            /* --clone-from: grown peers copy this peer (-1: own seeds) */
  uint64_t clone_seed;       /* --clone-seed: the copies' perturbation (0: run.seed) */
  /* the plan (kdp_elastic_plan) */
  int64_t step;              /* the checkpoint resumed from */
  int old_P, old_world;      /* its cohort and world size */
  int old_first[KDP_MAX_PEERS], old_k[KDP_MAX_PEERS]; /* its layout: first rank, ranks */
  char old_arch[KDP_MAX_PEERS][KDP_STR];              /* its peers' architectures */
  int map[KDP_MAX_PEERS];    /* new peer i continues old peer map[i]; -1: a new peer */
  int frozen[KDP_MAX_PEERS]; /* new peer i is a frozen teacher (peer.N.teacher): built from
                                its file, never cloned */
  int resized;               /* the cohort changes (else a plain resume) */
} kdp_elastic;

/* The relative size of the perturbation of a --clone-from copy: each parameter p becomes
   p (1 + eps u), u uniform in [-1, 1] from --clone-seed. */
#define KDP_CLONE_NOISE 0.01

/* Plans an elastic resume from run.dir's newest complete checkpoint (no MPI, every rank
   alike): checks e's request against the checkpoint's cohort and rewrites cfg's per-peer
   settings (peer.N.arch, peer.N.ranks_per_peer, peer.N.teacher) for the new cohort: a kept
   peer takes its old peer's, a new one its own peer.N.* (a clone: its source's arch; a frozen
   teacher is never a clone, nor cloned). KDP_EINVAL with a message
   for an inconsistent request; 0 and e->step = -1 when there is no checkpoint.
   --resume-as auto (e->P = -1, e->world = the ranks): the cohort that fits the ranks, keeping the
   peers in order: the first peers whose ranks_per_peer add up to the ranks (fewer ranks), every
   peer plus new ones with their peer.N.ranks_per_peer / run.ranks_per_peer (more ranks). */
int kdp_elastic_plan(kdp_config *cfg, kdp_elastic *e, kdp_error *err);
/* After the layout is set up: KDP_EINVAL unless d has e->P peers. */
int kdp_elastic_check_layout(const kdp_elastic *e, const kdp_config *cfg, const kdp_dist *d,
                             kdp_error *err);

/* Remaps a replicated module's values from the cohort oldc to newc: new peer i's entries (rows
   of a KDP_SPLIT_PEERS tensor, column blocks of a KDP_SPLIT_FEATURES one, tensors owned by it)
   take old peer map[i]'s; entries of new peers (map[i] < 0) and tensors whose shape changed
   keep what dst held (a fresh module's values). src/dst: params, buffers or momentum (what:
   0 params, 1 buffers; momentum is laid out as params). Writes a summary to log. Returns the
   count of floats carried over. */
struct kdp_cohort;
size_t kdp_elastic_remap(const struct kdp_cohort *oldc, const float *src,
                         const struct kdp_cohort *newc, float *dst, const int *map, int what,
                         char *log, size_t log_n);

typedef struct kdp_run_opts {
  int fresh;        /* --fresh: ignore and delete old checkpoints, truncate metrics.jsonl */
  int allow_change; /* --allow-config-change: resume although non-structural keys changed */
  int serve_only;   /* kdpeers serve: restore the newest checkpoint and only serve (no steps);
                       control and prediction logs go to run.dir/serve.jsonl */
  const kdp_elastic *elastic; /* --resume-as (planned), or NULL */
} kdp_run_opts;
int kdp_train_run(const kdp_config *cfg, kdp_dist *d, const kdp_run_opts *opts, kdp_error *err);

/* ---- the distillation part of one step (step.c): gather (dist) -> compute (kd) -> scatter ---- */
struct kdp_cohort;
struct kdp_kd_losses;
typedef struct kdp_pipeline kdp_pipeline;
/* For global batches of up to max_batch rows of the cohort c on the layout d. */
int kdp_pipeline_create(kdp_pipeline **out, kdp_dist *d, struct kdp_cohort *c, size_t max_batch,
                        kdp_error *err);
void kdp_pipeline_free(kdp_pipeline *p);
struct kdp_cohort *kdp_pipeline_cohort(kdp_pipeline *p);

/* One step's input on this rank: the global batch's labels and this rank's own rows of its
   peer's outputs (rows kdp_dist_rows(d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B)). */
typedef struct kdp_step_in {
  size_t B;            /* rows of the global batch */
  const int32_t *y;    /* its B labels */
  const float *z, *h;  /* own rows (n x C) of the peer's logits, (n x d) of its features */
  const float *z_all;  /* NULL: the peers' logits are gathered; else every peer's logits on the
                          own rows (P x n x C), computed here (codistill's stale copies) */
  float T, weight;     /* temperature; effective KD weight lam * w(e) */
  int burn_in;         /* codistill: step < kd.burn_in_steps */
  const float *z_ema;  /* pcl (KDP_READS_EMA_LOGITS): own rows (n x C) of the peer's mean
                          teacher's logits; gathered like z */
  const float *v;      /* mcl: own rows (n x E) of the peer's embeddings; else NULL */
  float *dv;           /* mcl, OUTPUT: += own rows (n x E) of dJ/dv, every peer's term summed */
} kdp_step_in;

/* The distillation part of a step (collective over the world): ADDS this rank's rows of dJ/dz
   into dz (n x C) and, when the method has feature gradients, of dJ/dh into dh; leaves this
   rank's share of the module's gradient in the cohort (kdp_pipeline_module_allreduce sums it).
   out: the peer's losses on its own rows (means over them). Losses are means over the B rows.
   Methods that read embeddings (mcl) run the peer term on the whole batch instead: every rank
   gathers every peer's logits and embeddings of all B rows, computes its peer's term (out: its
   losses over the batch, n_correct over its own rows), keeps its rows of dz, and the slice-0 rank
   of each peer sends its term's dL/dv of every peer back to the rows' owners (one reduce-scatter,
   kdp_dist_scatter_rows), which add them into in->dv. */
int kdp_pipeline_step(kdp_pipeline *p, const kdp_step_in *in, float *dz, float *dh,
                      struct kdp_kd_losses *out, kdp_error *err);
/* switokd: 1 when the last kdp_pipeline_step decided expert mode (the same on every rank), and
   its gaps (gaps may be NULL); 0 for other methods. */
int kdp_pipeline_expert(const kdp_pipeline *p, kdp_switokd_gaps *gaps);
/* Sums the module's gradient where it is partial: its replicated parts over every rank (the
   replicas then step alike); the column block of a module sharded by peer columns that this peer
   owns (kdp_cohort_module_ranges KDP_PART_OWN: ffl's fc1 columns of this peer) over the peer's
   ranks only, since no other peer writes it. A rank touches only its peer's parts: the work does
   not grow with the other peers' blocks. */
void kdp_pipeline_module_allreduce(kdp_pipeline *p);
struct kdp_sgd;
/* The module's SGD step (opt: its optimizer, momentum laid out as the params) of this peer's parts
   only, SHARED and OWN; the other peers' blocks of the params and the momentum then go stale on
   this rank until kdp_pipeline_module_sync. */
void kdp_pipeline_module_sgd(kdp_pipeline *p, struct kdp_sgd *opt, float lr);
/* Brings the other peers' blocks up to date on every rank (collective over the world; nothing
   when no step went by since the last call): the params, and the momentum when momentum is not
   NULL. Whatever reads the whole module calls it first: kdp_pipeline_eval does, the checkpoint
   (params and momentum) and the /predict teacher (kdp_pipeline_teacher_cohort, which cannot: it
   runs on the cohort communicator) call it. Afterwards every rank holds the same whole module,
   bitwise, as if every rank had stepped all of it. */
void kdp_pipeline_module_sync(kdp_pipeline *p, float *momentum);

/* Evaluation of one batch of B rows (collective over the world), added to s: this peer on its
   own rows (z, h: its rows of the peer's eval-mode outputs); the ensemble (mean of the peers'
   probabilities) and the method's teacher on this rank's block of the batch, so that summed
   over the world every row counts once. Losses are sums over rows.
   With P >= 2 it also adds the cohort's diversity on this rank's block (div: mean pairwise KL
   and disagreement sums, kdp_diversity_init'ed by the caller) and, when labels is not NULL,
   writes every peer j's predicted labels of the block rows to labels[j * labels_stride +
   labels_n ...] and advances labels_n by the block's rows (the churn's labels: the same rows
   in the same order at every evaluation). */
typedef struct kdp_eval_sums {
  double peer_loss, peer_hits, ens_loss, ens_hits, teacher_loss, teacher_hits;
  kdp_diversity div;
  int32_t *labels;
  size_t labels_stride, labels_n;
  /* when logits is not NULL: every peer j's logits of the block rows into
     logits[(j * logits_stride + first + row) * C ...], row the batch row, first set by the caller
     to the batch's first example (kdcl general's validation logits; summed over the world every
     row is written once) */
  float *logits;
  size_t logits_stride, first;
} kdp_eval_sums;
int kdp_pipeline_eval(kdp_pipeline *p, size_t B, const int32_t *y, const float *z,
                      const float *h, kdp_eval_sums *s, kdp_error *err);
/* The method's teacher (n x C, eval mode) over the cohort communicator, where every member
   holds all n rows of its peer (z: n x C, h: n x d): the /predict teacher. Call
   kdp_pipeline_module_sync on every rank first. */
int kdp_pipeline_teacher_cohort(kdp_pipeline *p, const float *z, const float *h, size_t n,
                                float *out, kdp_error *err);

/* Threads of this rank's step (kdp_nn_set_threads): cfg->threads, else the cores this process
   is bound to when that is fewer than the node's, else cores / ranks on this node (at least 1). */
/* Loads the train and test sets named by data.*, then applies subset, test_subset, the
   validation split (data.val_size: the last examples leave train->n) and label noise (the
   training part only). */
struct kdp_dataset;
int kdp_train_load_data(const kdp_config *cfg, struct kdp_dataset *train,
                        struct kdp_dataset *test, kdp_error *err);
/* The validation split (data.val_size = n > 0) of a training set loaded by kdp_train_load_data:
   a view (owns nothing) of the n examples that follow train->n in its buffers. */
void kdp_train_val_view(const struct kdp_dataset *train, size_t n, struct kdp_dataset *val);

/* Exit statuses batch scripts rely on (see README): */
#define KDP_EXIT_PREEMPTED 75   /* a signal: checkpointed at a step boundary; requeue and rerun */
#define KDP_EXIT_SIGNAL_NOW 143 /* a second signal: exited at once, no checkpoint */

/* SIGTERM, SIGUSR1, SIGINT: the first asks for a checkpoint and exit at the next step boundary;
   a second one exits at once. */
void kdp_train_install_signals(void);
int kdp_train_signal_count(void);

int kdp_train_blas_threads(const kdp_config *cfg, const kdp_dist *d);

/* Evaluation runs in batches of this many rows (the models are built for it). */
#define KDP_TRAIN_EVAL_BATCH 500

/* The memory a run takes, estimated from the model plans (kdp_model_plan) before anything is
   allocated: per rank of each peer, and on this node with the dataset. Bytes. */
typedef struct kdp_peer_memory {
  double params, model, optimizer, activations, buffers, per_rank;
  int ranks;
  size_t batch; /* rows the model is built for: max(batch per rank, evaluation batch) */
} kdp_peer_memory;
typedef struct kdp_memory_estimate {
  kdp_peer_memory peer[KDP_MAX_PEERS];
  int n_peers, worst_peer, local_ranks;
  double per_rank_max, dataset, node_total, limit;
  int limit_is_config; /* limit is run.max_memory (else physical or cgroup memory) */
} kdp_memory_estimate;
int kdp_train_memory_estimate(const kdp_config *cfg, const kdp_dist *d,
                              const struct kdp_dataset *train, const struct kdp_dataset *test,
                              kdp_memory_estimate *est, kdp_error *err);
/* KDP_EINVAL with the estimate in err when node_total exceeds the limit */
int kdp_train_memory_check(const kdp_memory_estimate *est, kdp_error *err);
void kdp_train_memory_print(const kdp_memory_estimate *est, FILE *f);

/* The rank-0 server's options from cfg's server.* keys, with the /control bounds taken from the
   config ranges of optim.lr, kd.temperature and kd.weight. o's strings point into str. */
typedef struct kdp_server_strings {
  char addr_file[KDP_PATH + 32];
  char note[3][256];
} kdp_server_strings;
struct kdp_server_options;
void kdp_train_server_options(const kdp_config *cfg, struct kdp_server_options *o,
                              kdp_server_strings *str);

/* Frozen peers (peer.N.teacher = FILE.kdpm): reads each file's architecture into peer.N.arch
   when that is empty (so the layout, memory estimate, /status and checkpoints name it), and
   refuses a file that is missing or not a model file, or a peer.N.arch that differs. */
int kdp_frozen_resolve_arch(kdp_config *cfg, kdp_error *err);

#endif
