/* config.h: the run configuration: built-in defaults, INI files (inih) and -s overrides, validated. */
#ifndef KDPEERS_CONFIG_H
#define KDPEERS_CONFIG_H

#include "kdpeers/common.h"

#define KDP_MAX_PEERS 64
#define KDP_STR 256
#define KDP_PATH 1024

/* The values of the enum keys, in the order of their choices (config validation sets the *_id
   field of each with its string; consumers read the enums, never the strings). kd.method's
   values are kdp_method (kd.h), the order of the methods' ops table. */
typedef enum { KDP_PROGRESS_AUTO, KDP_PROGRESS_BAR, KDP_PROGRESS_PLAIN,
               KDP_PROGRESS_NONE } kdp_progress_mode;
typedef enum { KDP_FORMAT_IDX, KDP_FORMAT_CIFAR10, KDP_FORMAT_CIFAR100, KDP_FORMAT_NPY,
               KDP_FORMAT_FOLDER } kdp_data_format;
typedef enum { KDP_LR_CONSTANT, KDP_LR_COSINE, KDP_LR_MULTISTEP } kdp_lr_schedule;
typedef enum { KDP_EXCHANGE_LOGITS, KDP_EXCHANGE_WEIGHTS } kdp_exchange_mode;
typedef enum { KDP_ON_DIVERGENCE_STOP, KDP_ON_DIVERGENCE_ROLLBACK } kdp_on_divergence;

/*
 * The whole configuration is one flat struct with no pointers, so ranks can broadcast it and
 * compare it byte for byte. Every field has a key "section.key"; the table in config.c is the
 * single source of truth for names, types, ranges, defaults and help text.
 */
typedef struct kdp_config {
  /* [run] */
  int epochs;
  int64_t max_steps;       /* 0 = off */
  uint64_t seed;
  char dir[KDP_PATH];
  int threads;             /* threads of each rank's step; 0 = its cores (kdp_train_blas_threads) */
  int eval_every;          /* evaluate every N epochs (and at the end) */
  int log_every;           /* steps between log lines / progress refreshes */
  int ranks_per_peer;
  int bucket_kb;            /* gradient allreduce buckets (KiB) when ranks_per_peer > 1; 0 = off */
  char grad_sum[16];        /* auto | allreduce | shm (how a peer's ranks sum gradients) */
  int grad_sum_id;          /* kdp_grad_sum */
  char progress[16];       /* auto | bar | plain | none */
  int progress_id;         /* kdp_progress_mode */
  int timeline;            /* write run.dir/timeline-rankNNN.json (Chrome trace) */
  char max_memory[32];     /* bytes the ranks of a node may use, "16G"; "0" = physical memory */
  double stall_warn_seconds;  /* a rank this late at a step: warn, /healthz 503; 0 = off */
  double stall_abort_seconds; /* ...end the job; 0 = never */
  double ema_decay;        /* every peer's temporal mean (EMA) of its weights; 0 = off (pcl: 0.999) */
  /* [data] */
  char format[16];         /* idx | cifar10 | cifar100 | npy | folder */
  int format_id;           /* kdp_data_format */
  char train_images[KDP_PATH]; /* for cifar: comma-separated list of batch files */
  char train_labels[KDP_PATH];
  char test_images[KDP_PATH];
  char test_labels[KDP_PATH];
  int64_t subset;          /* 0 = all */
  int64_t val_size;        /* the last N training examples (after subset) held out; 0 = none */
  int augment_per_peer;    /* data.augment draws per peer (KDP_STREAM_AUGMENT + peer) */
  double label_noise;      /* [0, 1] */
  uint64_t noise_seed;
  int augment;             /* random crop (pad data.crop_pad) + horizontal flip */
  int crop_pad;
  int flip;
  double mean[3];          /* normalisation; for 1-channel data only [0] is used */
  double std[3];
  int64_t test_subset;     /* evaluate on the first N test examples, 0 = all */
  int shared;              /* one copy of the dataset per node (MPI shared memory) */
  /* [model] */
  char arch[KDP_STR];
  /* [optim] */
  double lr;
  double momentum;
  int nesterov;
  double weight_decay;
  int batch_size;
  char schedule[16];       /* constant | cosine | multistep */
  int schedule_id;         /* kdp_lr_schedule */
  char milestones[KDP_STR];/* comma-separated epochs, e.g. "150,225" */
  double gamma;
  double warmup_epochs;
  /* [kd] */
  char method[16];         /* kd.method: a name of the methods' ops table (kd.h) */
  int method_id;           /* kdp_method */
  double temperature;
  double weight;
  double rampup_epochs;
  int64_t burn_in_steps;
  char exchange[16];       /* codistill: logits | weights */
  int exchange_id;         /* kdp_exchange_mode */
  int exchange_every;      /* codistill weights mode: k */
  int leader;              /* okddip leader cohort rank; -1 = last */
  int detach;              /* okddip: detach the attention teacher */
  int fusion_dim;          /* ffl: d_f; 0 = mean of the peers' feature dims */
  double fusion_weight_decay;
  char ensemble[16];       /* kdcl: naive | minlogit | general */
  int ensemble_id;         /* kdp_kdcl_ensemble */
  double tau;              /* mcl: contrastive temperature */
  double contrast_weight;  /* mcl: lam_c, weight of the contrastive bracket */
  int embed_dim;           /* mcl: embedding width E */
  int embed_hidden;        /* mcl: the embedding heads' hidden width */
  int teacher_peer;        /* switokd: the teacher peer (cohort rank) */
  /* [checkpoint] */
  int64_t ckpt_every_steps;   /* 0 = off */
  double ckpt_every_minutes;  /* 0 = off */
  int ckpt_keep;
  char ckpt_on_divergence[16]; /* stop | rollback */
  int on_divergence_id;        /* kdp_on_divergence */
  double ckpt_rollback_lr_scale;
  int ckpt_max_rollbacks;      /* rollbacks per run before a divergence stops it */
  /* [server] */
  int server_enabled;
  char server_listen[KDP_STR];
  int server_port;            /* 0 = any free port */
  char server_token[KDP_STR]; /* never printed or logged */
  int64_t server_max_body;    /* bytes */
  int server_max_connections;
  double server_idle_timeout; /* seconds */
  int64_t server_max_body_total; /* bytes buffered by all connections together */
  double server_header_timeout;  /* seconds to send a request line and headers */
  int64_t server_min_rate;       /* bytes/s a request must average after header_timeout */
  double server_predict_share;   /* share of the training loop's time /predict may take */
  char server_sd_dir[KDP_PATH];  /* "" or a directory for Prometheus file_sd targets */
  /* [peer.N] overrides */
  char peer_arch[KDP_MAX_PEERS][KDP_STR]; /* "" = use model.arch */
  int peer_ranks_per_peer[KDP_MAX_PEERS]; /* 0 = use run.ranks_per_peer */
  char peer_teacher[KDP_MAX_PEERS][KDP_PATH]; /* "" or a .kdpm: peer N is that frozen model */
} kdp_config;

void kdp_config_defaults(kdp_config *c);
/* Reads an INI file over c. Unknown sections/keys, malformed or out-of-range values fail with
   "FILE:LINE: ..." in err. */
int kdp_config_load_file(kdp_config *c, const char *path, kdp_error *err);
/* Applies "section.key=value" (also "peer.N.key=value"). Errors name the argument. */
int kdp_config_set(kdp_config *c, const char *assignment, kdp_error *err);
/* Applies KDP_* environment variables (KDP_RUN_SEED, KDP_OPTIM_LR, ...: KDP_<SECTION>_<KEY>). */
int kdp_config_apply_env(kdp_config *c, kdp_error *err);
/* Cross-field checks (e.g. milestones parse, method known). */
int kdp_config_validate(const kdp_config *c, kdp_error *err);
/* Writes the effective config as INI (round-trips through kdp_config_load_file). */
void kdp_config_print(const kdp_config *c, FILE *f);
/* Prints every key with type, default and help (for --help). */
void kdp_config_print_keys(FILE *f);
/* The same key list in another format: KDP_KEYS_TEXT (as kdp_config_print_keys), KDP_KEYS_MARKDOWN
   (the table of docs/config.md) or KDP_KEYS_INI (annotated defaults, configs/default.ini). */
enum { KDP_KEYS_TEXT = 0, KDP_KEYS_MARKDOWN = 1, KDP_KEYS_INI = 2 };
void kdp_config_print_keys_fmt(FILE *f, int fmt);
/* The range validation accepts for a numeric key (e.g. "kd", "temperature"); KDP_EINVAL if
   there is no such numeric key. */
int kdp_config_range(const char *section, const char *key, kdp_range *out);
/* 1 if kd.method (and kd.exchange) accept a frozen peer (peer.N.teacher); else 0 and why */
int kdp_frozen_peer_ok(const kdp_config *c, char *why, size_t n);
/* arch for peer i */
const char *kdp_config_peer_arch(const kdp_config *c, int peer);
/* MPI ranks of peer i: peer.i.ranks_per_peer when set, else run.ranks_per_peer */
int kdp_config_peer_ranks(const kdp_config *c, int peer);
/* Parses optim.milestones into out (max n); returns count or negative on error. */
int kdp_config_milestones(const kdp_config *c, double *out, int max, kdp_error *err);
/* run.max_memory in bytes (0 = not set: the node's physical memory applies). */
uint64_t kdp_config_max_memory(const kdp_config *c);
/* A byte count with an optional binary suffix (K, M, G, T; "16G", "512M", "1.5G", "1000000");
   0 and the value in *out, or KDP_EINVAL with why filled. */
int kdp_config_parse_bytes(const char *s, uint64_t *out, char *why, size_t n);

/* The KDP_ environment variables that are not config keys: read by kdpeers' own scripts and
   tests, or by kdpeers for fault injection. Any other KDP_ variable that names no key is an
   error (a misspelt key must not be ignored). NULL-terminated; docs/config.md lists them. */
extern const char *const kdp_config_other_env[];

#endif
