/* config.c: the run configuration. One static key table drives defaults, INI files (inih),
   -s overrides, KDP_* environment variables, validation, printing and the docs. */
#include "kdpeers/config.h"
#include "kdpeers/kd.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* The key table                                                                               */
/* ------------------------------------------------------------------------------------------ */

typedef enum key_type {
  KT_INT,     /* int */
  KT_INT64,   /* int64_t */
  KT_UINT64,  /* uint64_t */
  KT_DOUBLE,  /* double */
  KT_BOOL,    /* int, 0 or 1 */
  KT_STRING,  /* char[size] */
  KT_ENUM,    /* char[size], one of choices */
  KT_DOUBLE3  /* double[3], "a" or "a,b,c" */
} key_type;

enum { R_LO = KDP_RANGE_LO, R_HI = KDP_RANGE_HI, R_LO_EXCL = KDP_RANGE_LO_EXCL,
       R_HI_EXCL = KDP_RANGE_HI_EXCL };

/* Extra check for string values (e.g. milestones); writes a reason into why on failure. */
typedef int (*key_check)(const char *value, char *why, size_t n);

typedef struct key_def {
  const char *section;
  const char *key;
  key_type type;
  size_t off;   /* offsetof(kdp_config, field) */
  size_t size;  /* sizeof the field */
  double lo, hi;
  unsigned flags;
  const char *const *choices; /* KT_ENUM, NULL-terminated */
  const char *(*choice_at)(size_t i); /* KT_ENUM: the i-th choice or NULL (instead of choices) */
  size_t eoff;                 /* KT_ENUM: 1 + offsetof the int that receives the choice's index */
  key_check check;
  const char *def; /* default, parsed through the same setter */
  const char *help;
  const char *example; /* [peer.N] keys: the example value of configs/default.ini */
} key_def;

#define AT(field) .off = offsetof(kdp_config, field), .size = sizeof(((kdp_config *)0)->field)
/* KT_ENUM: the int field that receives the index of the choice (consumers read it, not the
   string) */
#define ENUM_AT(field) .eoff = 1 + offsetof(kdp_config, field)
#define RANGE(a, b) .lo = (a), .hi = (b), .flags = R_LO | R_HI
#define ATLEAST(a) .lo = (a), .flags = R_LO
#define ABOVE(a) .lo = (a), .flags = R_LO | R_LO_EXCL

static const char *const progress_choices[] = {"auto", "bar", "plain", "none", NULL};
static const char *const format_choices[] = {"idx", "cifar10", "cifar100", "npy", "folder",
                                             NULL};
static const char *const schedule_choices[] = {"constant", "cosine", "multistep", NULL};
static const char *const exchange_choices[] = {"logits", "weights", NULL};
static const char *const divergence_choices[] = {"stop", "rollback", NULL};
static const char *const ensemble_choices[] = {"naive", "minlogit", "general", NULL};
/* kdp_grad_sum's order */
static const char *const grad_sum_choices[] = {"auto", "allreduce", "shm", NULL};

static int check_milestones(const char *value, char *why, size_t n);
static int check_listen(const char *value, char *why, size_t n);
static int check_bytes(const char *value, char *why, size_t n);

#define FMNIST "/usr/share/datasets/fashion-mnist/"

static const key_def keys[] = {
    /* [run] */
    {"run", "epochs", KT_INT, AT(epochs), RANGE(1, 100000), .def = "10",
     .help = "number of training epochs"},
    {"run", "max_steps", KT_INT64, AT(max_steps), ATLEAST(0), .def = "0",
     .help = "stop after this many optimizer steps (0 = no limit)"},
    {"run", "seed", KT_UINT64, AT(seed), .def = "42",
     .help = "seed of every random stream (init, shuffle, augmentation, dropout)"},
    {"run", "dir", KT_STRING, AT(dir), .def = "runs/default",
     .help = "output directory for logs, metrics and checkpoints"},
    {"run", "threads", KT_INT, AT(threads), RANGE(0, 256), .def = "0",
     .help = "threads of each rank's whole step (0 = the cores it is bound to, else cores / ranks)"},
    {"run", "eval_every", KT_INT, AT(eval_every), ATLEAST(1), .def = "1",
     .help = "evaluate on the test set every N epochs (and at the end)"},
    {"run", "log_every", KT_INT, AT(log_every), ATLEAST(1), .def = "50",
     .help = "steps between log lines / progress refreshes"},
    {"run", "ranks_per_peer", KT_INT, AT(ranks_per_peer), RANGE(1, 64), .def = "1",
     .help = "MPI ranks training each peer (data parallel within a peer)"},
    {"run", "bucket_kb", KT_INT, AT(bucket_kb), RANGE(0, 1048576), .def = "256",
     .help = "ranks_per_peer > 1: the gradient allreduce runs in buckets of at least this many KiB, "
             "each started as soon as the backward pass has written it (0 = one allreduce after "
             "the backward pass)"},
    {"run", "grad_sum", KT_ENUM, AT(grad_sum), .choices = grad_sum_choices, ENUM_AT(grad_sum_id),
     .def = "auto",
     .help = "ranks_per_peer > 1: how a peer's ranks sum their gradients: shm (each rank sums "
             "its 1/k slice of all the ranks' gradients in an MPI-3 shared-memory window; "
             "bucket_kb unused), allreduce (MPI, in buckets per bucket_kb), or auto (shm when all "
             "of a peer's ranks share a node, else allreduce; shm also falls back to it then)"},
    {"run", "progress", KT_ENUM, AT(progress), .choices = progress_choices, ENUM_AT(progress_id),
     .def = "auto",
     .help = "rank-0 output: bar on a terminal, plain timestamped lines, or none (auto picks)"},
    {"run", "timeline", KT_BOOL, AT(timeline), .def = "false",
     .help = "write run.dir/timeline-rankNNN.json, a Chrome trace of compute and communication"},
    {"run", "max_memory", KT_STRING, AT(max_memory), .check = check_bytes, .def = "0",
     .help = "memory the ranks of one node may use, e.g. 16G or 512M (0 = the node's physical "
             "memory); a model estimated to need more is refused before anything is written"},
    {"run", "stall_warn_seconds", KT_DOUBLE, AT(stall_warn_seconds), ATLEAST(0), .def = "60",
     .help = "warn, set kdpeers_stalled and answer /healthz 503 when ranks are this late at a step "
             "(0 = off)"},
    {"run", "stall_abort_seconds", KT_DOUBLE, AT(stall_abort_seconds), ATLEAST(0), .def = "600",
     .help = "end the job (exit 1) when ranks are this late at a step (0 = wait forever)"},
    {"run", "ema_decay", KT_DOUBLE, AT(ema_decay), .lo = 0, .hi = 1,
     .flags = R_LO | R_HI | R_HI_EXCL, .def = "0",
     .help = "every peer keeps a temporal mean (EMA) of its weights with this decay, evaluated "
             "as peerN.ema (0 = off; kd.method = pcl: 0 means 0.999)"},
    /* [data] */
    {"data", "format", KT_ENUM, AT(format), .choices = format_choices, ENUM_AT(format_id),
     .def = "idx",
     .help = "dataset format: idx (MNIST/Fashion-MNIST, .gz ok), CIFAR binary batches, npy "
             "(NumPy arrays) or folder (CLASS/IMAGE.png); see docs/data.md"},
    {"data", "train_images", KT_STRING, AT(train_images),
     .def = FMNIST "train-images-idx3-ubyte.gz",
     .help = "training images (cifar: comma-separated list of batch files; folder: the "
             "directory of class sub-directories)"},
    {"data", "train_labels", KT_STRING, AT(train_labels),
     .def = FMNIST "train-labels-idx1-ubyte.gz",
     .help = "training labels (unused for cifar and folder)"},
    {"data", "test_images", KT_STRING, AT(test_images), .def = FMNIST "t10k-images-idx3-ubyte.gz",
     .help = "test images (cifar: the test batch file; folder: a directory like train_images)"},
    {"data", "test_labels", KT_STRING, AT(test_labels), .def = FMNIST "t10k-labels-idx1-ubyte.gz",
     .help = "test labels (unused for cifar and folder)"},
    {"data", "subset", KT_INT64, AT(subset), ATLEAST(0), .def = "0",
     .help = "train on the first N training examples (0 = all)"},
    {"data", "val_size", KT_INT64, AT(val_size), ATLEAST(0), .def = "0",
     .help = "hold out the last N training examples (after data.subset) as a validation split, "
             "never trained on; every evaluation then reports validation accuracy (0 = none)"},
    {"data", "augment_per_peer", KT_BOOL, AT(augment_per_peer), .def = "false",
     .help = "with data.augment: every peer draws its own crops and flips of the same batch"},
    {"data", "label_noise", KT_DOUBLE, AT(label_noise), RANGE(0, 1), .def = "0",
     .help = "fraction of training labels replaced by a random other class"},
    {"data", "noise_seed", KT_UINT64, AT(noise_seed), .def = "1",
     .help = "seed of the label-noise stream"},
    {"data", "augment", KT_BOOL, AT(augment), .def = "false",
     .help = "random crop (padding data.crop_pad) and horizontal flip (data.flip)"},
    {"data", "crop_pad", KT_INT, AT(crop_pad), RANGE(0, 16), .def = "4",
     .help = "zero padding of the random crop, in pixels"},
    {"data", "flip", KT_BOOL, AT(flip), .def = "true",
     .help = "random horizontal flips when data.augment is on"},
    {"data", "mean", KT_DOUBLE3, AT(mean), .def = "0.2860",
     .help = "normalisation mean: 1 value or 3 per-channel values (1 copies to all)"},
    {"data", "std", KT_DOUBLE3, AT(std), ABOVE(0), .def = "0.3530",
     .help = "normalisation std: 1 value or 3 per-channel values (1 copies to all)"},
    {"data", "test_subset", KT_INT64, AT(test_subset), ATLEAST(0), .def = "0",
     .help = "evaluate on the first N test examples (0 = all)"},
    {"data", "shared", KT_BOOL, AT(shared), .def = "true",
     .help = "ranks on a node share one copy of the dataset (MPI shared memory)"},
    /* [model] */
    {"model", "arch", KT_STRING, AT(arch), .def = "mlp(512,256)",
     .help = "architecture of every peer: mlp(h,...), cnn, resnet20/32/56/110, wrnD_K, seq:SPEC"},
    /* [optim] */
    {"optim", "lr", KT_DOUBLE, AT(lr), RANGE(0, 10), .def = "0.05",
     .help = "peak learning rate (SGD)"},
    {"optim", "momentum", KT_DOUBLE, AT(momentum), .lo = 0, .hi = 1,
     .flags = R_LO | R_HI | R_HI_EXCL, .def = "0.9", .help = "SGD momentum"},
    {"optim", "nesterov", KT_BOOL, AT(nesterov), .def = "true", .help = "Nesterov momentum"},
    {"optim", "weight_decay", KT_DOUBLE, AT(weight_decay), RANGE(0, 1), .def = "0.0005",
     .help = "L2 weight decay (coupled, added to the gradient)"},
    {"optim", "batch_size", KT_INT, AT(batch_size), RANGE(1, 65536), .def = "128",
     .help = "mini-batch size per peer"},
    {"optim", "schedule", KT_ENUM, AT(schedule), .choices = schedule_choices,
     ENUM_AT(schedule_id), .def = "cosine",
     .help = "learning-rate schedule after warm-up"},
    {"optim", "milestones", KT_STRING, AT(milestones), .check = check_milestones, .def = "",
     .help = "multistep: increasing epochs at which lr is multiplied by gamma, e.g. 150,225"},
    {"optim", "gamma", KT_DOUBLE, AT(gamma), .lo = 0, .hi = 1, .flags = R_LO | R_LO_EXCL | R_HI,
     .def = "0.1", .help = "multistep: lr factor at each milestone"},
    {"optim", "warmup_epochs", KT_DOUBLE, AT(warmup_epochs), ATLEAST(0), .def = "0",
     .help = "linear lr warm-up from 0, in epochs (fractions allowed)"},
    /* [kd] */
    {"kd", "method", KT_ENUM, AT(method), .choice_at = kdp_method_at, ENUM_AT(method_id),
     .def = "dml",
     .help = "online distillation method (independent = no distillation)"},
    {"kd", "temperature", KT_DOUBLE, AT(temperature), .lo = 0, .hi = 100,
     .flags = R_LO | R_LO_EXCL | R_HI, .def = "3", .help = "softmax temperature of the KD terms"},
    {"kd", "weight", KT_DOUBLE, AT(weight), RANGE(0, 1000), .def = "1",
     .help = "weight of the distillation loss relative to cross-entropy"},
    {"kd", "rampup_epochs", KT_DOUBLE, AT(rampup_epochs), ATLEAST(0), .def = "0",
     .help = "ramp the KD weight up from 0 over this many epochs"},
    {"kd", "burn_in_steps", KT_INT64, AT(burn_in_steps), ATLEAST(0), .def = "0",
     .help = "steps of plain cross-entropy before distillation starts"},
    {"kd", "exchange", KT_ENUM, AT(exchange), .choices = exchange_choices, ENUM_AT(exchange_id),
     .def = "logits",
     .help = "codistill: exchange logits every step, or weights every kd.exchange_every steps"},
    {"kd", "exchange_every", KT_INT, AT(exchange_every), ATLEAST(1), .def = "50",
     .help = "codistill weights mode: steps between weight exchanges"},
    {"kd", "leader", KT_INT, AT(leader), RANGE(-1, KDP_MAX_PEERS - 1), .def = "-1",
     .help = "okddip: leader peer index (-1 = last peer)"},
    {"kd", "detach", KT_BOOL, AT(detach), .def = "false",
     .help = "okddip: detach the attention-weighted teacher"},
    {"kd", "fusion_dim", KT_INT, AT(fusion_dim), RANGE(0, 65536), .def = "0",
     .help = "ffl: fusion feature dim d_f (0 = mean of the peers' feature dims)"},
    {"kd", "fusion_weight_decay", KT_DOUBLE, AT(fusion_weight_decay), ATLEAST(0), .def = "1e-05",
     .help = "ffl: weight decay of the fusion module"},
    {"kd", "ensemble", KT_ENUM, AT(ensemble), .choices = ensemble_choices, ENUM_AT(ensemble_id),
     .def = "naive",
     .help = "kdcl: the ensemble teacher: naive (mean logits), minlogit (per-class min of "
             "z - z_y) or general (weights from the validation split; needs data.val_size)"},
    {"kd", "tau", KT_DOUBLE, AT(tau), .lo = 0, .hi = 100, .flags = R_LO | R_LO_EXCL | R_HI,
     .def = "0.07", .help = "mcl: temperature of the contrastive similarities v_a v_b / tau"},
    {"kd", "contrast_weight", KT_DOUBLE, AT(contrast_weight), RANGE(0, 1000), .def = "0.1",
     .help = "mcl: weight lam_c of the contrastive terms (not ramped; the official code's "
             "weight of its hard terms)"},
    {"kd", "embed_dim", KT_INT, AT(embed_dim), RANGE(1, 65536), .def = "128",
     .help = "mcl: width of the peers' embeddings (the heads' output)"},
    {"kd", "embed_hidden", KT_INT, AT(embed_hidden), RANGE(1, 65536), .def = "128",
     .help = "mcl: hidden width of the peers' embedding heads"},
    {"kd", "teacher_peer", KT_INT, AT(teacher_peer), RANGE(0, KDP_MAX_PEERS - 1), .def = "0",
     .help = "switokd: the teacher peer (the others are its students)"},
    /* [checkpoint] */
    {"checkpoint", "every_steps", KT_INT64, AT(ckpt_every_steps), ATLEAST(0), .def = "0",
     .help = "checkpoint every N steps (0 = off)"},
    {"checkpoint", "every_minutes", KT_DOUBLE, AT(ckpt_every_minutes), ATLEAST(0), .def = "10",
     .help = "checkpoint every M minutes of wall time (0 = off)"},
    {"checkpoint", "keep", KT_INT, AT(ckpt_keep), RANGE(1, 1000), .def = "2",
     .help = "complete checkpoints kept in run.dir/checkpoints"},
    {"checkpoint", "on_divergence", KT_ENUM, AT(ckpt_on_divergence),
     .choices = divergence_choices, ENUM_AT(on_divergence_id), .def = "stop",
     .help = "NaN/Inf: stop, or roll back to the last checkpoint with a smaller lr"},
    {"checkpoint", "rollback_lr_scale", KT_DOUBLE, AT(ckpt_rollback_lr_scale),
     .lo = 0, .hi = 1, .flags = R_LO | R_LO_EXCL | R_HI, .def = "0.5",
     .help = "lr factor applied at each rollback"},
    {"checkpoint", "max_rollbacks", KT_INT, AT(ckpt_max_rollbacks), RANGE(0, 1000), .def = "3",
     .help = "rollbacks in a run before a divergence stops it (on_divergence = rollback)"},
    /* [server] */
    {"server", "enabled", KT_BOOL, AT(server_enabled), .def = "true",
     .help = "run the HTTP server on rank 0"},
    {"server", "listen", KT_STRING, AT(server_listen), .check = check_listen, .def = "127.0.0.1",
     .help = "numeric IPv4/IPv6 address to bind (no port: see server.port); a non-loopback "
             "address requires server.token"},
    {"server", "port", KT_INT, AT(server_port), RANGE(0, 65535), .def = "0",
     .help = "TCP port (0 = any free port; see run.dir/server.addr)"},
    {"server", "token", KT_STRING, AT(server_token), .def = "", .flags = 0,
     .help = "bearer token for /control, /predict, /status and /history (never printed)"},
    {"server", "max_body", KT_INT64, AT(server_max_body), RANGE(1024, 1073741824),
     .def = "16777216", .help = "largest request body in bytes (413 beyond)"},
    {"server", "max_connections", KT_INT, AT(server_max_connections), RANGE(1, 10000),
     .def = "64",
     .help = "concurrent connections; a newcomer past it closes the least recently active one"},
    {"server", "idle_timeout", KT_DOUBLE, AT(server_idle_timeout), .lo = 0, .hi = 3600,
     .flags = R_LO | R_LO_EXCL | R_HI, .def = "30",
     .help = "seconds before an idle or slow connection is closed"},
    {"server", "max_body_total", KT_INT64, AT(server_max_body_total), RANGE(1024, 17179869184),
     .def = "67108864",
     .help = "request body bytes all connections together may hold (503 beyond)"},
    {"server", "header_timeout", KT_DOUBLE, AT(server_header_timeout), .lo = 0, .hi = 3600,
     .flags = R_LO | R_LO_EXCL | R_HI, .def = "10",
     .help = "seconds a client has to send a request's line and headers (at most idle_timeout)"},
    {"server", "min_rate", KT_INT64, AT(server_min_rate), RANGE(0, 1073741824), .def = "65536",
     .help = "bytes/s a request must average after header_timeout, or it is closed (0 = off)"},
    {"server", "predict_share", KT_DOUBLE, AT(server_predict_share), .lo = 0, .hi = 1,
     .flags = R_LO | R_LO_EXCL | R_HI, .def = "0.25",
     .help = "share of the training loop's wall time /predict may take (1 = no limit)"},
    {"server", "sd_dir", KT_STRING, AT(server_sd_dir), .def = "",
     .help = "directory that also gets this run's Prometheus file_sd target (kdpeers-NAME-HASH.json, "
             "removed at the end; scrape DIR/*.json)"},
};
#define N_KEYS (sizeof keys / sizeof keys[0])

/* Keys of the [peer.N] sections; .off is of the array's element 0, index N adds N * size. A
   key at its default (empty string, 0) means "use the global key". */
static const key_def peer_keys[] = {
    {"peer.N", "arch", KT_STRING, .off = offsetof(kdp_config, peer_arch),
     .size = sizeof(((kdp_config *)0)->peer_arch[0]), .def = "",
     .help = "architecture of peer N (empty = model.arch)", .example = "cnn"},
    {"peer.N", "ranks_per_peer", KT_INT, .off = offsetof(kdp_config, peer_ranks_per_peer),
     .size = sizeof(((kdp_config *)0)->peer_ranks_per_peer[0]), RANGE(0, 64), .def = "0",
     .help = "MPI ranks training peer N (0 = run.ranks_per_peer); the world size must be the sum "
             "over the peers",
     .example = "2"},
    {"peer.N", "teacher", KT_STRING, .off = offsetof(kdp_config, peer_teacher),
     .size = sizeof(((kdp_config *)0)->peer_teacher[0]), .def = "",
     .help = "a model file (kdpeers export) that peer N is: frozen, forward only in eval mode, "
             "never updated (empty = a trained peer)",
     .example = "teacher.kdpm"},
};
#define N_PEER_KEYS (sizeof peer_keys / sizeof peer_keys[0])

static const char *const sections[] = {"run",        "data",   "model", "optim",
                                       "kd",         "checkpoint", "server", NULL};

/* ------------------------------------------------------------------------------------------ */
/* Small helpers                                                                               */
/* ------------------------------------------------------------------------------------------ */

static const char *type_name(const key_def *k) {
  switch (k->type) {
  case KT_INT: return "int";
  case KT_INT64: return "int64";
  case KT_UINT64: return "uint64";
  case KT_DOUBLE: return "double";
  case KT_BOOL: return "bool";
  case KT_STRING: return "string";
  case KT_ENUM: return "enum";
  case KT_DOUBLE3: return "double list";
  }
  return "?";
}

static kdp_range key_range_of(const key_def *k) {
  kdp_range r = {k->lo, k->hi, k->flags};
  return r;
}

static void range_text(const key_def *k, char *buf, size_t n) {
  kdp_range r = key_range_of(k);
  kdp_range_text(&r, buf, n);
}

/* the i-th choice of a KT_ENUM key, NULL past the last */
static const char *choice(const key_def *k, size_t i) {
  if (k->choice_at) return k->choice_at(i);
  return k->choices ? k->choices[i] : NULL;
}

static void choices_text(const key_def *k, char *buf, size_t n) {
  size_t used = 0;
  buf[0] = 0;
  for (size_t i = 0; choice(k, i); i++) {
    int w = snprintf(buf + used, n - used, "%s%s", i ? ", " : "", choice(k, i));
    if (w < 0 || (size_t)w >= n - used) break;
    used += (size_t)w;
  }
}

static bool in_range(const key_def *k, double v) {
  kdp_range r = key_range_of(k);
  return kdp_range_contains(&r, v);
}

static int why_range_as(const key_def *k, const char *what, char *why, size_t n) {
  char r[96];
  range_text(k, r, sizeof r);
  if ((k->flags & R_LO) && (k->flags & R_HI))
    snprintf(why, n, "%s: expected a value in %s", what, r);
  else
    snprintf(why, n, "%s: expected a value %s", what, r);
  return KDP_EINVAL;
}

static int why_range(const key_def *k, char *why, size_t n) {
  return why_range_as(k, "out of range", why, n);
}

/* Copies at most max visible characters of s into buf, with "..." if shortened. */
static const char *shorten(const char *s, char *buf, size_t n) {
  const size_t max = 80;
  size_t len = strlen(s);
  if (len <= max || n < max + 4) {
    snprintf(buf, n, "%s", s);
  } else {
    memcpy(buf, s, max);
    memcpy(buf + max, "...", 4);
  }
  return buf;
}

/* Trims leading and trailing white space in place. */
static char *trim(char *s) {
  while (isspace((unsigned char)*s)) s++;
  size_t n = strlen(s);
  while (n > 0 && isspace((unsigned char)s[n - 1])) s[--n] = 0;
  return s;
}

/* Optimal-string-alignment edit distance (adjacent swaps count 1); large for long strings. */
static int edit_distance(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  if (la > 62 || lb > 62) return 1000;
  int d[64][64];
  for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
  for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
  for (size_t i = 1; i <= la; i++) {
    for (size_t j = 1; j <= lb; j++) {
      int cost = a[i - 1] != b[j - 1];
      int v = d[i - 1][j] + 1;
      if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
      if (d[i - 1][j - 1] + cost < v) v = d[i - 1][j - 1] + cost;
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && d[i - 2][j - 2] + 1 < v)
        v = d[i - 2][j - 2] + 1;
      d[i][j] = v;
    }
  }
  return d[la][lb];
}

/* ------------------------------------------------------------------------------------------ */
/* Value parsing                                                                               */
/* ------------------------------------------------------------------------------------------ */

static int parse_int64(const char *s, int64_t *out, char *why, size_t n) {
  char *end;
  if (!*s || isspace((unsigned char)*s)) {
    snprintf(why, n, "expected an integer");
    return KDP_EINVAL;
  }
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (end == s) {
    snprintf(why, n, "expected an integer");
    return KDP_EINVAL;
  }
  if (*end) {
    snprintf(why, n, "expected an integer, found trailing characters '%.40s'", end);
    return KDP_EINVAL;
  }
  if (errno == ERANGE) {
    snprintf(why, n, "integer overflow: expected an integer that fits in 64 bits");
    return KDP_EINVAL;
  }
  *out = (int64_t)v;
  return 0;
}

static int parse_uint64(const char *s, uint64_t *out, char *why, size_t n) {
  char *end;
  if (!*s || isspace((unsigned char)*s) || *s == '-') {
    snprintf(why, n, "expected a non-negative integer");
    return KDP_EINVAL;
  }
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (end == s) {
    snprintf(why, n, "expected a non-negative integer");
    return KDP_EINVAL;
  }
  if (*end) {
    snprintf(why, n, "expected a non-negative integer, found trailing characters '%.40s'", end);
    return KDP_EINVAL;
  }
  if (errno == ERANGE) {
    snprintf(why, n, "integer overflow: expected a non-negative integer below 2^64");
    return KDP_EINVAL;
  }
  *out = (uint64_t)v;
  return 0;
}

/* Parses one finite double from s; *end_out receives the first unparsed character (may be NULL
   to require the whole string). */
static int parse_double_at(const char *s, double *out, const char **end_out, char *why, size_t n) {
  char *end;
  while (isspace((unsigned char)*s)) s++;
  errno = 0;
  double v = strtod(s, &end);
  if (end == s) {
    snprintf(why, n, "expected a number");
    return KDP_EINVAL;
  }
  if (!isfinite(v) || (errno == ERANGE && fabs(v) > 1.0)) {
    snprintf(why, n, "expected a finite number");
    return KDP_EINVAL;
  }
  if (end_out) {
    *end_out = end;
  } else if (*end) {
    snprintf(why, n, "expected a number, found trailing characters '%.40s'", end);
    return KDP_EINVAL;
  }
  *out = v;
  return 0;
}

static int parse_bool(const char *s, int *out, char *why, size_t n) {
  static const char *const t[] = {"true", "1", "yes", "on"};
  static const char *const f[] = {"false", "0", "no", "off"};
  for (int i = 0; i < 4; i++) {
    if (strcasecmp(s, t[i]) == 0) {
      *out = 1;
      return 0;
    }
    if (strcasecmp(s, f[i]) == 0) {
      *out = 0;
      return 0;
    }
  }
  snprintf(why, n, "expected a boolean: true/false, 1/0, yes/no or on/off");
  return KDP_EINVAL;
}

/* "a" or "a,b,c" (white space allowed around entries); one value copies to all three. */
static int parse_double3(const char *s, double out[3], char *why, size_t n) {
  double v[3];
  int count = 0;
  const char *p = s;
  for (;;) {
    const char *end;
    if (count == 3) {
      snprintf(why, n, "expected 1 or 3 comma-separated numbers, got more than 3");
      return KDP_EINVAL;
    }
    if (parse_double_at(p, &v[count], &end, why, n) != 0) {
      snprintf(why, n, "expected 1 or 3 comma-separated numbers (entry %d is not a number)",
               count + 1);
      return KDP_EINVAL;
    }
    count++;
    while (isspace((unsigned char)*end)) end++;
    if (*end == 0) break;
    if (*end != ',') {
      snprintf(why, n, "expected 1 or 3 comma-separated numbers, found trailing characters '%.40s'",
               end);
      return KDP_EINVAL;
    }
    p = end + 1;
  }
  if (count == 2) {
    snprintf(why, n, "expected 1 or 3 comma-separated numbers, got 2");
    return KDP_EINVAL;
  }
  for (int i = 0; i < 3; i++) out[i] = count == 1 ? v[0] : v[i];
  return 0;
}

/* Parses a milestone list; stores up to max entries if out != NULL. Returns the count or
   KDP_EINVAL with why filled. */
static int parse_milestones(const char *s, double *out, int max, char *why, size_t n) {
  const char *p = s;
  while (isspace((unsigned char)*p)) p++;
  if (*p == 0) return 0;
  int count = 0;
  double prev = 0;
  for (;;) {
    double v;
    const char *end;
    char tmp[128];
    if (parse_double_at(p, &v, &end, tmp, sizeof tmp) != 0) {
      snprintf(why, n,
               "entry %d is not a number: expected increasing positive numbers separated by "
               "commas, e.g. 150,225",
               count + 1);
      return KDP_EINVAL;
    }
    if (!(v > 0) || (count > 0 && !(v > prev))) {
      char a[32];
      kdp_fmt_double(v, a, sizeof a);
      snprintf(why, n,
               "entry %d (%s) is not %s: expected increasing positive numbers separated by "
               "commas, e.g. 150,225",
               count + 1, a, v > 0 ? "larger than the one before" : "positive");
      return KDP_EINVAL;
    }
    if (out) {
      if (count >= max) {
        snprintf(why, n, "more than %d milestones", max);
        return KDP_EINVAL;
      }
      out[count] = v;
    }
    count++;
    prev = v;
    while (isspace((unsigned char)*end)) end++;
    if (*end == 0) break;
    if (*end != ',') {
      snprintf(why, n,
               "trailing characters '%.40s': expected increasing positive numbers separated by "
               "commas, e.g. 150,225",
               end);
      return KDP_EINVAL;
    }
    p = end + 1;
  }
  return count;
}

static int check_milestones(const char *value, char *why, size_t n) {
  int r = parse_milestones(value, NULL, 0, why, n);
  return r < 0 ? r : 0;
}

/* server.listen: a numeric address, "localhost", or "[v6]". Sets *loopback. Returns 0 or
   KDP_EINVAL with why filled (an "address:port" is told that the port is server.port). */
static int parse_listen(const char *value, int *loopback, char *why, size_t n) {
  char host[64];
  size_t len = strlen(value);
  unsigned char a[16];
  *loopback = 0;
  if (strcmp(value, "localhost") == 0) {
    *loopback = 1;
    return 0;
  }
  if (len < sizeof host) {
    memcpy(host, value, len + 1);
    if (host[0] == '[' && len > 2 && host[len - 1] == ']') {
      memmove(host, host + 1, len - 2);
      host[len - 2] = 0;
    }
    if (inet_pton(AF_INET, host, a) == 1) {
      *loopback = a[0] == 127;
      return 0;
    }
    if (inet_pton(AF_INET6, host, a) == 1) {
      static const unsigned char lo6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
      *loopback = memcmp(a, lo6, 16) == 0;
      return 0;
    }
  }
  /* "address:port" (IPv4, a name or "[v6]:port"): the port has its own key */
  const char *colon = strrchr(value, ':');
  if (colon && colon[1] && strspn(colon + 1, "0123456789") == strlen(colon + 1) &&
      (!strchr(value, ':') || strchr(value, ':') == colon || value[0] == '[')) {
    snprintf(why, n,
             "'%.80s' holds a port: server.listen takes an address only, the port is server.port "
             "(e.g. -s server.listen=%.*s -s server.port=%s; port 0 = any free port)",
             value, (int)(colon - value), value, colon + 1);
    return KDP_EINVAL;
  }
  snprintf(why, n,
           "'%.80s' is not a numeric IPv4/IPv6 address: expected e.g. 127.0.0.1 (this machine "
           "only), ::1, or 0.0.0.0 (every interface, needs server.token)",
           value);
  return KDP_EINVAL;
}

static int check_listen(const char *value, char *why, size_t n) {
  int loopback;
  return parse_listen(value, &loopback, why, n);
}

int kdp_config_parse_bytes(const char *s, uint64_t *out, char *why, size_t n) {
  const char *end;
  double v;
  char tmp[128];
  if (parse_double_at(s, &v, &end, tmp, sizeof tmp) != 0 || v < 0) {
    snprintf(why, n, "expected a size in bytes with an optional suffix K, M, G or T, e.g. 16G");
    return KDP_EINVAL;
  }
  double mult = 1;
  switch (toupper((unsigned char)*end)) {
  case 'K': mult = 1024.0; break;
  case 'M': mult = 1024.0 * 1024.0; break;
  case 'G': mult = 1024.0 * 1024.0 * 1024.0; break;
  case 'T': mult = 1024.0 * 1024.0 * 1024.0 * 1024.0; break;
  case 0: break;
  default: mult = 0; break;
  }
  if (*end) {
    end++;
    if (*end == 'i') end++; /* "16Gi" */
    if (toupper((unsigned char)*end) == 'B') end++;
  }
  if (mult == 0 || *end || v * mult >= 18446744073709551615.0) {
    snprintf(why, n, "expected a size in bytes with an optional suffix K, M, G or T, e.g. 16G");
    return KDP_EINVAL;
  }
  *out = (uint64_t)(v * mult);
  return 0;
}

static int check_bytes(const char *value, char *why, size_t n) {
  uint64_t v;
  return kdp_config_parse_bytes(value, &v, why, n);
}

/* ------------------------------------------------------------------------------------------ */
/* The setter: every path (defaults, files, -s, env) goes through here                         */
/* ------------------------------------------------------------------------------------------ */

static int set_value(kdp_config *c, const key_def *k, size_t extra, const char *value, char *why,
                     size_t n) {
  char *field = (char *)c + k->off + extra;
  switch (k->type) {
  case KT_INT:
  case KT_INT64: {
    int64_t v;
    if (parse_int64(value, &v, why, n) != 0) {
      if (strncmp(why, "integer overflow", 16) == 0 && (k->flags & (R_LO | R_HI)))
        why_range_as(k, "integer overflow", why, n);
      return KDP_EINVAL;
    }
    if (k->type == KT_INT && (v < INT_MIN || v > INT_MAX)) {
      if (k->flags & (R_LO | R_HI)) return why_range(k, why, n);
      snprintf(why, n, "out of range: expected a value in [%d, %d]", INT_MIN, INT_MAX);
      return KDP_EINVAL;
    }
    if (!in_range(k, (double)v)) return why_range(k, why, n);
    if (k->type == KT_INT) {
      int iv = (int)v;
      memcpy(field, &iv, sizeof iv);
    } else {
      memcpy(field, &v, sizeof v);
    }
    return 0;
  }
  case KT_UINT64: {
    uint64_t v;
    if (parse_uint64(value, &v, why, n) != 0) return KDP_EINVAL;
    memcpy(field, &v, sizeof v);
    return 0;
  }
  case KT_DOUBLE: {
    double v;
    if (parse_double_at(value, &v, NULL, why, n) != 0) return KDP_EINVAL;
    if (!in_range(k, v)) return why_range(k, why, n);
    memcpy(field, &v, sizeof v);
    return 0;
  }
  case KT_DOUBLE3: {
    double v[3];
    if (parse_double3(value, v, why, n) != 0) return KDP_EINVAL;
    for (int i = 0; i < 3; i++)
      if (!in_range(k, v[i])) return why_range(k, why, n);
    memcpy(field, v, sizeof v);
    return 0;
  }
  case KT_BOOL: {
    int v;
    if (parse_bool(value, &v, why, n) != 0) return KDP_EINVAL;
    memcpy(field, &v, sizeof v);
    return 0;
  }
  case KT_ENUM: {
    for (size_t i = 0; choice(k, i); i++) {
      const char *ch = choice(k, i);
      if (strcmp(value, ch) == 0) {
        memset(field, 0, k->size);
        memcpy(field, ch, strlen(ch));
        if (k->eoff) {
          int id = (int)i;
          memcpy((char *)field - k->off + (k->eoff - 1), &id, sizeof id);
        }
        return 0;
      }
    }
    char list[256];
    choices_text(k, list, sizeof list);
    snprintf(why, n, "expected one of: %s", list);
    return KDP_EINVAL;
  }
  case KT_STRING: {
    size_t len = strlen(value);
    if (len >= k->size) {
      snprintf(why, n, "too long: %zu characters, at most %zu allowed", len, k->size - 1);
      return KDP_EINVAL;
    }
    if (k->check && k->check(value, why, n) != 0) return KDP_EINVAL;
    memset(field, 0, k->size);
    memcpy(field, value, len);
    return 0;
  }
  }
  snprintf(why, n, "internal error: unknown key type");
  return KDP_EINVAL;
}

static const key_def *find_key(const char *section, const char *key) {
  for (size_t i = 0; i < N_KEYS; i++)
    if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].key, key) == 0) return &keys[i];
  return NULL;
}

int kdp_config_range(const char *section, const char *key, kdp_range *out) {
  const key_def *k = find_key(section, key);
  if (!k || (k->type != KT_INT && k->type != KT_INT64 && k->type != KT_DOUBLE)) return KDP_EINVAL;
  *out = key_range_of(k);
  return 0;
}

/* Parses "peer.N"; returns 1 and sets *idx if section is a peer section (even a bad one: then
   returns -1 with why filled), 0 if it is not a peer section at all. */
static int parse_peer_section(const char *section, int *idx, char *why, size_t n) {
  if (strncmp(section, "peer", 4) != 0 || (section[4] != '.' && section[4] != 0)) return 0;
  const char *p = section + 4;
  if (*p == 0 || p[1] == 0) {
    snprintf(why, n, "section [%s] needs a peer index: expected [peer.N] with N in 0..%d", section,
             KDP_MAX_PEERS - 1);
    return -1;
  }
  p++;
  for (const char *q = p; *q; q++) {
    if (!isdigit((unsigned char)*q) || q - p > 6) {
      snprintf(why, n, "bad section [%s]: expected [peer.N] with N an integer in 0..%d", section,
               KDP_MAX_PEERS - 1);
      return -1;
    }
  }
  long v = strtol(p, NULL, 10);
  if (v >= KDP_MAX_PEERS) {
    snprintf(why, n, "peer index %ld in [%s] out of range: expected 0..%d", v, section,
             KDP_MAX_PEERS - 1);
    return -1;
  }
  *idx = (int)v;
  return 1;
}

/* Describes an unknown key in why: suggestion, other section, list of the section's keys. */
static void why_unknown_key(const char *section, const key_def *tab, size_t ntab,
                            const char *shown_section, const char *key, char *why, size_t n) {
  const char *best = NULL;
  int bestd = 3;
  for (size_t i = 0; i < ntab; i++) {
    if (strcmp(tab[i].section, section) != 0) continue;
    int d = edit_distance(key, tab[i].key);
    if (d < bestd) {
      bestd = d;
      best = tab[i].key;
    }
  }
  const char *other = NULL;
  for (size_t i = 0; i < N_KEYS && !other; i++)
    if (strcmp(keys[i].key, key) == 0) other = keys[i].section;
  size_t used = 0;
  int w = snprintf(why, n, "unknown key '%.64s' in [%s]", key, shown_section);
  used = w > 0 ? (size_t)w : 0;
  if (best && used < n) {
    w = snprintf(why + used, n - used, " (did you mean '%s'?)", best);
    used += w > 0 ? (size_t)w : 0;
  }
  if (other && used < n) {
    w = snprintf(why + used, n - used, " ('%s' is a key of [%s])", key, other);
    used += w > 0 ? (size_t)w : 0;
  }
  if (used < n) {
    w = snprintf(why + used, n - used, ". Keys in [%s]:", shown_section);
    used += w > 0 ? (size_t)w : 0;
  }
  bool first = true;
  for (size_t i = 0; i < ntab && used < n; i++) {
    if (strcmp(tab[i].section, section) != 0) continue;
    w = snprintf(why + used, n - used, "%s %s", first ? "" : ",", tab[i].key);
    used += w > 0 ? (size_t)w : 0;
    first = false;
  }
}

/* "[run], [data], ..., [server], [peer.N] (N in 0..63)": every section, from the table */
static const char *sections_text(char *buf, size_t n) {
  size_t used = 0;
  buf[0] = 0;
  for (const char *const *s = sections; *s && used < n; s++) {
    int w = snprintf(buf + used, n - used, "[%s], ", *s);
    used += w > 0 ? (size_t)w : 0;
  }
  if (used < n) snprintf(buf + used, n - used, "[peer.N] (N in 0..%d)", KDP_MAX_PEERS - 1);
  return buf;
}

static void why_unknown_section(const char *section, char *why, size_t n) {
  const char *best = NULL;
  int bestd = 3;
  for (const char *const *s = sections; *s; s++) {
    int d = edit_distance(section, *s);
    if (d < bestd) {
      bestd = d;
      best = *s;
    }
  }
  char hint[64] = "", known[256];
  if (best) snprintf(hint, sizeof hint, " (did you mean [%s]?)", best);
  snprintf(why, n, "unknown section [%.64s]%s. Known sections: %s", section, hint,
           sections_text(known, sizeof known));
}

/* Sets section.key = value. On failure fills why; *is_value says whether the section and key
   were known (so the error is about the value and the caller should show "section.key = 'v'"). */
static int set_key(kdp_config *c, const char *section, const char *key, const char *value,
                   bool *is_value, char *why, size_t n) {
  *is_value = false;
  int idx = 0;
  int pr = parse_peer_section(section, &idx, why, n);
  if (pr < 0) return KDP_EINVAL;
  if (pr > 0) {
    for (size_t i = 0; i < N_PEER_KEYS; i++) {
      if (strcmp(peer_keys[i].key, key) == 0) {
        *is_value = true;
        return set_value(c, &peer_keys[i], (size_t)idx * peer_keys[i].size, value, why, n);
      }
    }
    why_unknown_key("peer.N", peer_keys, N_PEER_KEYS, section, key, why, n);
    return KDP_EINVAL;
  }
  bool known_section = false;
  for (const char *const *s = sections; *s; s++)
    if (strcmp(*s, section) == 0) known_section = true;
  if (!known_section) {
    why_unknown_section(section, why, n);
    return KDP_EINVAL;
  }
  const key_def *k = find_key(section, key);
  if (!k) {
    why_unknown_key(section, keys, N_KEYS, section, key, why, n);
    return KDP_EINVAL;
  }
  *is_value = true;
  return set_value(c, k, 0, value, why, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Public API                                                                                  */
/* ------------------------------------------------------------------------------------------ */

void kdp_config_defaults(kdp_config *c) {
  memset(c, 0, sizeof *c);
  char why[512];
  for (size_t i = 0; i < N_KEYS; i++) {
    if (set_value(c, &keys[i], 0, keys[i].def, why, sizeof why) != 0) {
      /* A bad built-in default is a programming error: fail loudly at once. */
      kdp_die("internal error: bad built-in default %s.%s = '%s': %s", keys[i].section,
              keys[i].key, keys[i].def, why);
    }
  }
  /* peer_arch stays all zero: "" = use model.arch. */
}

typedef struct file_state {
  FILE *f;
  const char *path;
  int line;        /* lines handed to inih so far = current line number in the handler */
  bool too_long;   /* a line did not fit inih's buffer */
  int max_len;
  kdp_config *c;
  kdp_error *err;
  int code;        /* first error */
} file_state;

/* fgets-style reader for inih that counts lines and refuses (never splits) over-long lines. */
static char *file_reader(char *buf, int num, void *stream) {
  file_state *s = stream;
  if (s->code || s->too_long) return NULL;
  if (!fgets(buf, num, s->f)) return NULL;
  s->line++;
  size_t len = strlen(buf);
  if (len + 1 == (size_t)num && buf[len - 1] != '\n') {
    int ch = fgetc(s->f);
    if (ch != EOF) {
      s->too_long = true;
      s->max_len = num - 2;
      return NULL;
    }
  }
  return buf;
}

static int file_handler(void *user, const char *section, const char *name, const char *value) {
  file_state *s = user;
  char why[KDP_ERRLEN], vbuf[96];
  if (s->code) return 0;
  if (!name || !value) return 1;
  if (section[0] == 0) {
    char known[256];
    s->code = kdp_fail(s->err, KDP_EINVAL,
                       "%s:%d: key '%s' appears before any [section]: put it under one of %s",
                       s->path, s->line, name, sections_text(known, sizeof known));
    return 0;
  }
  bool is_value;
  int rc = set_key(s->c, section, name, value, &is_value, why, sizeof why);
  if (rc == 0) return 1;
  if (is_value)
    s->code = kdp_fail(s->err, rc, "%s:%d: %s.%s = '%s': %s", s->path, s->line, section, name,
                       shorten(value, vbuf, sizeof vbuf), why);
  else
    s->code = kdp_fail(s->err, rc, "%s:%d: %s", s->path, s->line, why);
  return 0;
}

int kdp_config_load_file(kdp_config *c, const char *path, kdp_error *err) {
  if (!c || !path) return kdp_fail(err, KDP_EINVAL, "kdp_config_load_file: NULL argument");
  FILE *f = fopen(path, "r");
  if (!f) return kdp_fail(err, KDP_EIO, "cannot open config file %s: %s", path, strerror(errno));
  kdp_config *tmp = kdp_xmalloc(sizeof *tmp);
  memcpy(tmp, c, sizeof *tmp);
  file_state s = {.f = f, .path = path, .c = tmp, .err = err};

  /* inih's runtime options (Debian builds it with INI_RUNTIME_OPTIONS): long lines for paths,
     no multi-line continuation, '#' or ';' after white space starts a comment, stop at the first
     error. Restored afterwards. */
  int old_max = ini_max_line;
  bool old_multi = ini_allow_multiline, old_stop = ini_stop_on_first_error,
       old_novalue = ini_allow_no_value;
  char *old_inline = ini_inline_comment_prefixes;
  static char inline_prefixes[] = ";#";
  if (ini_max_line < 4096) ini_max_line = 4096;
  ini_allow_multiline = false;
  ini_stop_on_first_error = true;
  ini_allow_no_value = false;
  ini_inline_comment_prefixes = inline_prefixes;
  int rc = ini_parse_stream(file_reader, &s, file_handler, &s);
  ini_max_line = old_max;
  ini_allow_multiline = old_multi;
  ini_stop_on_first_error = old_stop;
  ini_allow_no_value = old_novalue;
  ini_inline_comment_prefixes = old_inline;

  int code = s.code;
  if (!code && ferror(f)) {
    code = kdp_fail(err, KDP_EIO, "%s:%d: read error: %s", path, s.line + 1, strerror(errno));
  } else if (!code && s.too_long) {
    code = kdp_fail(err, KDP_EINVAL, "%s:%d: line too long (more than %d characters)", path,
                    s.line, s.max_len);
  } else if (!code && rc == -2) {
    code = kdp_fail(err, KDP_ENOMEM, "%s: out of memory while parsing", path);
  } else if (!code && rc != 0) {
    code = kdp_fail(err, KDP_EINVAL,
                    "%s:%d: syntax error: expected '[section]', 'key = value' or a comment "
                    "starting with '#' or ';'",
                    path, rc);
  }
  fclose(f);
  if (!code) memcpy(c, tmp, sizeof *c);
  free(tmp);
  return code;
}

int kdp_config_set(kdp_config *c, const char *assignment, kdp_error *err) {
  if (!c || !assignment) return kdp_fail(err, KDP_EINVAL, "kdp_config_set: NULL argument");
  char buf[KDP_PATH + 512];
  char vbuf[96];
  const char *shown = shorten(assignment, vbuf, sizeof vbuf);
  if (strlen(assignment) >= sizeof buf)
    return kdp_fail(err, KDP_EINVAL, "-s %s: too long (at most %zu characters)", shown,
                    sizeof buf - 1);
  strcpy(buf, assignment);
  char *eq = strchr(buf, '=');
  if (!eq)
    return kdp_fail(err, KDP_EINVAL,
                    "-s %s: missing '=': expected section.key=value, e.g. optim.lr=0.1", shown);
  *eq = 0;
  char *name = trim(buf);
  char *value = trim(eq + 1);
  char *dot = strrchr(name, '.');
  if (!dot || dot == name || dot[1] == 0) {
    const key_def *hit = NULL;
    for (size_t i = 0; i < N_KEYS && !hit; i++)
      if (strcmp(keys[i].key, name) == 0) hit = &keys[i];
    if (hit)
      return kdp_fail(err, KDP_EINVAL, "-s %s: expected section.key=value; did you mean %s.%s?",
                      shown, hit->section, hit->key);
    return kdp_fail(err, KDP_EINVAL, "-s %s: expected section.key=value, e.g. optim.lr=0.1",
                    shown);
  }
  *dot = 0;
  char why[KDP_ERRLEN];
  bool is_value;
  int rc = set_key(c, name, dot + 1, value, &is_value, why, sizeof why);
  if (rc) return kdp_fail(err, rc, "-s %s: %s", shown, why);
  return 0;
}

static void env_name(const char *section, const char *key, char *buf, size_t n) {
  snprintf(buf, n, "KDP_%s_%s", section, key);
  for (char *p = buf; *p; p++) *p = (char)toupper((unsigned char)*p);
}

extern char **environ;

const char *const kdp_config_other_env[] = {
    /* the launch scripts */
    "KDP_ROOT", "KDP_LAUNCHER", "KDP_SRUN_MPI", "KDP_SRUN_ARGS", "KDP_MPIRUN_ARGS",
    "KDP_ARRAY_SETTINGS", "KDP_ELASTIC", "KDP_TTY_COLUMNS", "KDP_MPIRUN_KILL_DELAY", "KDP_BUILD",
    "KDP_BIND",
    /* the test suites */
    "KDP_SOURCE_ROOT", "KDP_BUILD_ROOT", "KDP_TEST_VERBOSE", "KDP_TEST_KEEP", "KDP_SANITIZERS", "KDP_SANITIZER_RUN", "KDP_FUZZ_TARGETS", "KDP_NETNS_HOSTS", "KDP_CHARTJS",
    "KDP_NETNS_LOG", "KDP_NETNS_SUBNET", "KDP_AGENT_HOSTNAME", "KDP_AGENT_CMD",
    "KDP_SLURM_CRED_EXPIRE", "KDP_TEST_JOBS", "KDP_CPU_LOG",
    /* fault injection (tests) */
    "KDP_FAULT_SIGNAL_AT_STEP", "KDP_FAULT_NAN_AT_STEP", "KDP_FAULT_CKPT_SLEEP_MS",
    "KDP_FAULT_METRICS_FULL", "KDP_FAULT_STOP_AT_STEP", "KDP_TEST_SAME_INIT",
    "KDP_TEST_EVAL_FAIL", NULL};

/* 1 if the variable NAME (up to '=') is a config key's: KDP_<SECTION>_<KEY>, KDP_PEER_<N>_<KEY> */
static int env_is_key(const char *name, size_t len) {
  char buf[128];
  for (size_t i = 0; i < N_KEYS; i++) {
    env_name(keys[i].section, keys[i].key, buf, sizeof buf);
    if (strlen(buf) == len && strncmp(buf, name, len) == 0) return 1;
  }
  for (int p = 0; p < KDP_MAX_PEERS; p++)
    for (size_t i = 0; i < N_PEER_KEYS; i++) {
      snprintf(buf, sizeof buf, "KDP_PEER_%d_%s", p, peer_keys[i].key);
      for (char *q = buf; *q; q++) *q = (char)toupper((unsigned char)*q);
      if (strlen(buf) == len && strncmp(buf, name, len) == 0) return 1;
    }
  return 0;
}

/* A KDP_ variable that is neither a key nor one of kdp_config_other_env: an error that suggests
   the nearest key. */
static int check_env_names(kdp_error *err) {
  for (char **e = environ; e && *e; e++) {
    const char *v = *e;
    if (strncmp(v, "KDP_", 4) != 0) continue;
    const char *eq = strchr(v, '=');
    size_t len = eq ? (size_t)(eq - v) : strlen(v);
    if (env_is_key(v, len)) continue;
    int other = 0;
    for (const char *const *o = kdp_config_other_env; *o && !other; o++)
      other = strlen(*o) == len && strncmp(*o, v, len) == 0;
    if (other) continue;
    char name[128], buf[128], hint[256] = "";
    snprintf(name, sizeof name, "%.*s", (int)(len < 100 ? len : 100), v);
    int best = 4;
    for (size_t i = 0; i < N_KEYS; i++) {
      env_name(keys[i].section, keys[i].key, buf, sizeof buf);
      int dist = edit_distance(name, buf);
      if (dist < best) {
        best = dist;
        snprintf(hint, sizeof hint, " (did you mean %s, the key %s.%s?)", buf, keys[i].section,
                 keys[i].key);
      }
    }
    return kdp_fail(err, KDP_EINVAL,
                    "environment variable %s names no config key%s. Keys are set by "
                    "KDP_<SECTION>_<KEY> (kdpeers --help lists them); the other KDP_ variables "
                    "are listed in docs/config.md. Unset it or fix its name",
                    name, hint);
  }
  return 0;
}

int kdp_config_apply_env(kdp_config *c, kdp_error *err) {
  if (!c) return kdp_fail(err, KDP_EINVAL, "kdp_config_apply_env: NULL argument");
  int bad = check_env_names(err);
  if (bad) return bad;
  kdp_config *tmp = kdp_xmalloc(sizeof *tmp);
  memcpy(tmp, c, sizeof *tmp);
  char name[128], why[KDP_ERRLEN], vbuf[96];
  int code = 0;
  for (size_t i = 0; i < N_KEYS && !code; i++) {
    env_name(keys[i].section, keys[i].key, name, sizeof name);
    const char *v = getenv(name);
    if (!v) continue;
    char *copy = kdp_xstrdup(v);
    if (set_value(tmp, &keys[i], 0, trim(copy), why, sizeof why) != 0)
      code = kdp_fail(err, KDP_EINVAL, "environment variable %s='%s' (%s.%s): %s", name,
                      shorten(v, vbuf, sizeof vbuf), keys[i].section, keys[i].key, why);
    free(copy);
  }
  for (int p = 0; p < KDP_MAX_PEERS && !code; p++) {
    for (size_t i = 0; i < N_PEER_KEYS && !code; i++) {
      snprintf(name, sizeof name, "KDP_PEER_%d_%s", p, peer_keys[i].key);
      for (char *q = name; *q; q++) *q = (char)toupper((unsigned char)*q);
      const char *v = getenv(name);
      if (!v) continue;
      char *copy = kdp_xstrdup(v);
      if (set_value(tmp, &peer_keys[i], (size_t)p * peer_keys[i].size, trim(copy), why,
                    sizeof why) != 0)
        code = kdp_fail(err, KDP_EINVAL, "environment variable %s='%s' (peer.%d.%s): %s", name,
                        shorten(v, vbuf, sizeof vbuf), p, peer_keys[i].key, why);
      free(copy);
    }
  }
  if (!code) memcpy(c, tmp, sizeof *c);
  free(tmp);
  return code;
}

/* Re-checks one stored field against its table entry (for structs built or received elsewhere). */
static int check_field(const kdp_config *c, const key_def *k, size_t extra, char *why, size_t n) {
  const char *field = (const char *)c + k->off + extra;
  switch (k->type) {
  case KT_INT: {
    int v;
    memcpy(&v, field, sizeof v);
    return in_range(k, v) ? 0 : why_range(k, why, n);
  }
  case KT_INT64: {
    int64_t v;
    memcpy(&v, field, sizeof v);
    return in_range(k, (double)v) ? 0 : why_range(k, why, n);
  }
  case KT_UINT64: return 0;
  case KT_DOUBLE: {
    double v;
    memcpy(&v, field, sizeof v);
    if (!isfinite(v)) {
      snprintf(why, n, "expected a finite number");
      return KDP_EINVAL;
    }
    return in_range(k, v) ? 0 : why_range(k, why, n);
  }
  case KT_DOUBLE3: {
    double v[3];
    memcpy(v, field, sizeof v);
    for (int i = 0; i < 3; i++) {
      if (!isfinite(v[i])) {
        snprintf(why, n, "expected finite numbers");
        return KDP_EINVAL;
      }
      if (!in_range(k, v[i])) return why_range(k, why, n);
    }
    return 0;
  }
  case KT_BOOL: {
    int v;
    memcpy(&v, field, sizeof v);
    if (v != 0 && v != 1) {
      snprintf(why, n, "expected a boolean (0 or 1), found %d", v);
      return KDP_EINVAL;
    }
    return 0;
  }
  case KT_ENUM:
  case KT_STRING: {
    if (!memchr(field, 0, k->size)) {
      snprintf(why, n, "string is not terminated within %zu bytes", k->size);
      return KDP_EINVAL;
    }
    if (k->type == KT_STRING) return k->check ? k->check(field, why, n) : 0;
    for (size_t i = 0; choice(k, i); i++) {
      if (strcmp(field, choice(k, i)) != 0) continue;
      int id = (int)i;
      if (k->eoff) memcpy(&id, (const char *)c + k->eoff - 1, sizeof id);
      if (id == (int)i) return 0;
      snprintf(why, n, "'%.32s' is choice %zu but its enum holds %d", field, i, id);
      return KDP_EINVAL;
    }
    char list[256];
    choices_text(k, list, sizeof list);
    snprintf(why, n, "'%.32s' is not one of: %s", field, list);
    return KDP_EINVAL;
  }
  }
  return 0;
}

/* A frozen peer (peer.N.teacher) takes part through its logits only: the methods whose peer term
   reads the peers' logits and nothing else, with no replicated module (its gradients would reach
   the frozen peer's features or teachers) and no stale weight copies. */
static int frozen_method_ok(const kdp_method_ops *o, int exchange_id) {
  return o && !o->module_reads && !(o->peer_reads & ~(unsigned)KDP_READS_LOGITS) &&
         !(o->stale_ok && exchange_id == KDP_EXCHANGE_WEIGHTS);
}

int kdp_frozen_peer_ok(const kdp_config *c, char *why, size_t n) {
  const kdp_method_ops *o = kdp_method_ops_of((kdp_method)c->method_id);
  if (frozen_method_ok(o, c->exchange_id)) return 1;
  char list[256] = "";
  size_t used = 0;
  for (size_t i = 0; kdp_method_at(i) && used < sizeof list; i++)
    if (frozen_method_ok(kdp_method_ops_of((kdp_method)i), KDP_EXCHANGE_LOGITS))
      used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "",
                               kdp_method_at(i));
  if (o && o->stale_ok)
    snprintf(why, n, "a frozen peer has no stale copies to exchange: use kd.exchange = logits");
  else
    snprintf(why, n,
             "kd.method = %s trains a module, heads or copies from every peer's features or "
             "gradients, but a frozen peer takes part through its logits only (methods that "
             "accept one: %s)",
             o ? o->name : "?", list);
  return 0;
}

int kdp_config_validate(const kdp_config *c, kdp_error *err) {
  if (!c) return kdp_fail(err, KDP_EINVAL, "kdp_config_validate: NULL config");
  char why[KDP_ERRLEN];
  for (size_t i = 0; i < N_KEYS; i++)
    if (check_field(c, &keys[i], 0, why, sizeof why) != 0)
      return kdp_fail(err, KDP_EINVAL, "config %s.%s: %s", keys[i].section, keys[i].key, why);
  for (int p = 0; p < KDP_MAX_PEERS; p++)
    for (size_t i = 0; i < N_PEER_KEYS; i++)
      if (check_field(c, &peer_keys[i], (size_t)p * peer_keys[i].size, why, sizeof why) != 0)
        return kdp_fail(err, KDP_EINVAL, "config peer.%d.%s: %s", p, peer_keys[i].key, why);
  if (c->arch[0] == 0)
    return kdp_fail(err, KDP_EINVAL, "config model.arch is empty: set an architecture, e.g. "
                                     "model.arch=mlp(512,256)");
  if (c->dir[0] == 0)
    return kdp_fail(err, KDP_EINVAL, "config run.dir is empty: set an output directory");
  int nm = parse_milestones(c->milestones, NULL, 0, why, sizeof why);
  if (nm < 0) return kdp_fail(err, KDP_EINVAL, "config optim.milestones = '%s': %s",
                              c->milestones, why);
  if (c->schedule_id == KDP_LR_MULTISTEP && nm == 0)
    return kdp_fail(err, KDP_EINVAL,
                    "config optim.schedule = multistep needs optim.milestones, e.g. "
                    "-s optim.milestones=150,225");
  int loopback = 0;
  if (parse_listen(c->server_listen, &loopback, why, sizeof why) != 0)
    return kdp_fail(err, KDP_EINVAL, "config server.listen: %s", why);
  if (c->server_enabled && !loopback && !c->server_token[0])
    return kdp_fail(err, KDP_EINVAL,
                    "config server.listen = %s is not a loopback address: anyone who reaches it "
                    "could stop the run or read its predictions, so it needs server.token (-s "
                    "server.token=... or KDP_SERVER_TOKEN); or listen on 127.0.0.1, or set "
                    "server.enabled = false",
                    c->server_listen);
  if (c->stall_warn_seconds > 0 && c->stall_abort_seconds > 0 &&
      c->stall_abort_seconds < c->stall_warn_seconds)
    return kdp_fail(err, KDP_EINVAL,
                    "config run.stall_abort_seconds = %g is below run.stall_warn_seconds = %g: "
                    "the job would end before the warning (set it to 0 or >= the warning)",
                    c->stall_abort_seconds, c->stall_warn_seconds);
  if (c->server_max_body_total < c->server_max_body)
    return kdp_fail(err, KDP_EINVAL,
                    "config server.max_body_total = %lld is smaller than server.max_body = %lld: "
                    "no request of the largest size could ever be buffered",
                    (long long)c->server_max_body_total, (long long)c->server_max_body);
  if (c->method_id == KDP_METHOD_KDCL && c->ensemble_id == KDP_KDCL_GENERAL && c->val_size <= 0)
    return kdp_fail(err, KDP_EINVAL,
                    "config kd.ensemble = general: kdcl's general ensemble fits its weights on a "
                    "validation split, and data.val_size is 0; hold out examples with -s "
                    "data.val_size=N (e.g. 5000), or use kd.ensemble = naive or minlogit");
  if (c->leader < -1 || c->leader >= KDP_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "config kd.leader = %d: expected -1 (last peer) or 0..%d",
                    c->leader, KDP_MAX_PEERS - 1);
  for (int p = 0; p < KDP_MAX_PEERS; p++)
    if (c->peer_teacher[p][0] && !kdp_frozen_peer_ok(c, why, sizeof why))
      return kdp_fail(err, KDP_EINVAL, "config peer.%d.teacher = %s: %s", p, c->peer_teacher[p],
                      why);
  return 0;
}

/* Formats the stored value of k (at extra offset) as it would be written in an INI file. */
static void format_value(const kdp_config *c, const key_def *k, size_t extra, char *buf,
                         size_t n) {
  const char *field = (const char *)c + k->off + extra;
  switch (k->type) {
  case KT_INT:
  case KT_BOOL: {
    int v;
    memcpy(&v, field, sizeof v);
    if (k->type == KT_BOOL)
      snprintf(buf, n, "%s", v ? "true" : "false");
    else
      snprintf(buf, n, "%d", v);
    return;
  }
  case KT_INT64: {
    int64_t v;
    memcpy(&v, field, sizeof v);
    snprintf(buf, n, "%lld", (long long)v);
    return;
  }
  case KT_UINT64: {
    uint64_t v;
    memcpy(&v, field, sizeof v);
    snprintf(buf, n, "%llu", (unsigned long long)v);
    return;
  }
  case KT_DOUBLE: {
    double v;
    memcpy(&v, field, sizeof v);
    kdp_fmt_double(v, buf, n);
    return;
  }
  case KT_DOUBLE3: {
    double v[3];
    memcpy(v, field, sizeof v);
    char a[3][32];
    for (int i = 0; i < 3; i++) kdp_fmt_double(v[i], a[i], sizeof a[i]);
    if (memcmp(&v[0], &v[1], sizeof v[0]) == 0 && memcmp(&v[0], &v[2], sizeof v[0]) == 0)
      snprintf(buf, n, "%s", a[0]);
    else
      snprintf(buf, n, "%s,%s,%s", a[0], a[1], a[2]);
    return;
  }
  case KT_ENUM:
  case KT_STRING: snprintf(buf, n, "%.*s", (int)k->size, field); return;
  }
  buf[0] = 0;
}

/* 1 if peer p's key k differs from its default (which means "use the global key") */
static int peer_key_set(const kdp_config *c, const key_def *k, int p) {
  const char *field = (const char *)c + k->off + (size_t)p * k->size;
  if (k->type == KT_STRING) return field[0] != 0;
  int v;
  memcpy(&v, field, sizeof v);
  return v != 0;
}

void kdp_config_print(const kdp_config *c, FILE *f) {
  char val[KDP_PATH + 64];
  const char *cur = NULL;
  fprintf(f, "# kdpeers %s configuration\n", KDP_VERSION);
  for (size_t i = 0; i < N_KEYS; i++) {
    if (!cur || strcmp(cur, keys[i].section) != 0) {
      fprintf(f, "%s[%s]\n", cur ? "\n" : "", keys[i].section);
      cur = keys[i].section;
    }
    if (&keys[i] == find_key("server", "token")) {
      /* the token is a secret: never print it */
      fprintf(f, "%stoken = \n", c->server_token[0] ? "; server.token is set (hidden)\n" : "");
      continue;
    }
    format_value(c, &keys[i], 0, val, sizeof val);
    fprintf(f, "%s = %s\n", keys[i].key, val);
  }
  /* only the [peer.N] sections with a key set, and only the keys set (the text of a run without
     a per-peer key stays what it was before the key existed, so its checkpoints still resume) */
  for (int p = 0; p < KDP_MAX_PEERS; p++) {
    int any = 0;
    for (size_t i = 0; i < N_PEER_KEYS; i++) any |= peer_key_set(c, &peer_keys[i], p);
    if (!any) continue;
    fprintf(f, "\n[peer.%d]\n", p);
    for (size_t i = 0; i < N_PEER_KEYS; i++) {
      if (!peer_key_set(c, &peer_keys[i], p)) continue;
      format_value(c, &peer_keys[i], (size_t)p * peer_keys[i].size, val, sizeof val);
      fprintf(f, "%s = %s\n", peer_keys[i].key, val);
    }
  }
}

/* Range column: numeric range, enum choices or peer index. */
static void key_range(const key_def *k, bool peer, char *buf, size_t n) {
  if (k->type == KT_ENUM) {
    char list[200];
    choices_text(k, list, sizeof list);
    snprintf(buf, n, "one of: %s", list);
  }
  else if (peer && k->type == KT_STRING)
    snprintf(buf, n, "N in 0..%d, at most %zu chars", KDP_MAX_PEERS - 1, k->size - 1);
  else if (peer) {
    char r[64];
    range_text(k, r, sizeof r);
    snprintf(buf, n, "N in 0..%d, %s", KDP_MAX_PEERS - 1, r);
  }
  else if (k->type == KT_BOOL)
    snprintf(buf, n, "true/false");
  else if (k->type == KT_DOUBLE3) {
    char r[64];
    range_text(k, r, sizeof r);
    snprintf(buf, n, "1 or 3 values%s%s", r[0] ? ", each " : "", r);
  } else if (k == find_key("optim", "milestones"))
    snprintf(buf, n, "increasing, > 0");
  else if (k->type == KT_UINT64)
    snprintf(buf, n, "[0, 2^64)");
  else if (k->type == KT_STRING)
    snprintf(buf, n, "at most %zu chars", k->size - 1);
  else
    range_text(k, buf, n);
}

void kdp_config_print_keys_fmt(FILE *f, int fmt) {
  kdp_config *d = kdp_xmalloc(sizeof *d);
  kdp_config_defaults(d);
  char val[KDP_PATH + 64], range[256], env[128];
  size_t total = N_KEYS + N_PEER_KEYS;
  if (fmt == KDP_KEYS_MARKDOWN)
    fprintf(f, "| Section | Key | Type | Default | Range | Env var | Meaning |\n"
               "|---|---|---|---|---|---|---|\n");
  else if (fmt == KDP_KEYS_INI)
    fprintf(f, "# kdpeers: every configuration key with its built-in default.\n"
               "# Override any key with -s section.key=value or KDP_SECTION_KEY=value;\n"
               "# the command line wins over the environment, which wins over this file.\n");
  else
    fprintf(f, "Configuration keys (INI file, -s section.key=value, or env KDP_SECTION_KEY):\n");
  const char *cur = NULL;
  for (size_t j = 0; j < total; j++) {
    bool peer = j >= N_KEYS;
    const key_def *k = peer ? &peer_keys[j - N_KEYS] : &keys[j];
    format_value(d, k, 0, val, sizeof val);
    key_range(k, peer, range, sizeof range);
    if (peer) {
      char up[64];
      env_name("", k->key, up, sizeof up); /* "KDP__KEY" */
      snprintf(env, sizeof env, "KDP_PEER_<N>_%s", up + 5);
    } else {
      env_name(k->section, k->key, env, sizeof env);
    }
    if (fmt == KDP_KEYS_MARKDOWN) {
      fprintf(f, "| %s | `%s` | %s | %s%s%s | %s | `%s` | %s |\n", k->section, k->key,
              type_name(k), val[0] ? "`" : "", val[0] ? val : "(empty)", val[0] ? "`" : "",
              range, env, k->help);
    } else if (fmt == KDP_KEYS_INI) {
      if (!cur || strcmp(cur, k->section) != 0) {
        if (peer)
          fprintf(f, "\n# Per-peer overrides: a [peer.N] section (N in 0..%d) per peer, e.g.\n"
                     "# [peer.1]\n",
                  KDP_MAX_PEERS - 1);
        else
          fprintf(f, "\n[%s]\n", k->section);
        cur = k->section;
      }
      fprintf(f, "# %s (%s%s%s; env %s)\n", k->help, type_name(k), range[0] ? ", " : "", range,
              env);
      if (peer)
        fprintf(f, "# %s = %s\n", k->key, k->example ? k->example : "");
      else
        fprintf(f, "%s = %s\n", k->key, val);
    } else {
      char name[64];
      snprintf(name, sizeof name, "%s.%s", peer ? "peer.N" : k->section, k->key);
      fprintf(f, "  %-26s = %s\n      %s (%s%s%s; env %s)\n", name, val[0] ? val : "(empty)",
              k->help, type_name(k), range[0] ? ", " : "", range, env);
    }
  }
  free(d);
}

void kdp_config_print_keys(FILE *f) { kdp_config_print_keys_fmt(f, KDP_KEYS_TEXT); }

const char *kdp_config_peer_arch(const kdp_config *c, int peer) {
  if (peer >= 0 && peer < KDP_MAX_PEERS && c->peer_arch[peer][0]) return c->peer_arch[peer];
  return c->arch;
}

int kdp_config_peer_ranks(const kdp_config *c, int peer) {
  if (peer >= 0 && peer < KDP_MAX_PEERS && c->peer_ranks_per_peer[peer] > 0)
    return c->peer_ranks_per_peer[peer];
  return c->ranks_per_peer;
}

int kdp_config_milestones(const kdp_config *c, double *out, int max, kdp_error *err) {
  char why[512];
  if (!c) return kdp_fail(err, KDP_EINVAL, "kdp_config_milestones: NULL config");
  if (max < 0) max = 0;
  int r = parse_milestones(c->milestones, out, max, why, sizeof why);
  if (r < 0) return kdp_fail(err, r, "optim.milestones = '%s': %s", c->milestones, why);
  return r;
}

uint64_t kdp_config_max_memory(const kdp_config *c) {
  uint64_t v = 0;
  char why[160];
  if (kdp_config_parse_bytes(c->max_memory, &v, why, sizeof why) != 0) return 0;
  return v;
}
