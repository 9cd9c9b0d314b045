/* checkpoint.c: the trainer's state to and from msgpack checkpoints (one file per rank, a manifest
   by rank 0), resume checks, and --fresh. */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdpeers/ckpt.h"
#include "train_internal.h"

/* the config as INI text (what --print-config prints) */
static char *config_text(const kdp_config *c) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  if (!f) return NULL;
  kdp_config_print(c, f);
  fclose(f);
  return buf;
}

int kdp_train_save(kdp_trainer *t, kdp_error *err) {
  kdp_dist *d = t->d;
  const char *dir = t->cfg->dir;
  char path[KDP_PATH + 128];
  double t0 = kdp_now();
  int rc = 0;
  /* the whole module and its momentum, every peer's blocks current (collective) */
  if (t->pipe) kdp_pipeline_module_sync(t->pipe, t->mopt.buf);
  /* the peer's momentum, whole on every rank (the shared window's fused SGD keeps each rank's
     slice only; collective over the peer's ranks) */
  kdp_buckets_gather_sgd(t->buckets);
  kdp_ckpt_step_dir(dir, t->step, path, sizeof path);
  rc = kdp_ckpt_mkdirs(path, err);
  kdp_ckpt_writer *w = NULL;
  if (rc == 0) {
    kdp_ckpt_peer_path(dir, t->step, d->world_rank, path, sizeof path);
    rc = kdp_ckpt_writer_open(&w, path, "peer", err);
  }
  if (rc == 0) {
    char *cfg = config_text(t->cfg);
    size_t np = kdp_model_n_params(t->model), nb = kdp_model_n_buffers(t->model);
    int64_t moff = t->is_root ? kdp_metrics_offset(t) : -1;
#define PUT(call) \
  if (rc == 0) rc = (call)
    PUT(kdp_ckpt_put_str(w, "config", cfg ? cfg : "", err));
    free(cfg);
    PUT(kdp_ckpt_put_str(w, "kdpeers_version", KDP_VERSION, err));
    PUT(kdp_ckpt_put_i64(w, "world_size", d->world_size, err));
    PUT(kdp_ckpt_put_i64(w, "ranks_per_peer", d->ranks_per_peer, err));
    PUT(kdp_ckpt_put_i64(w, "peer", d->peer, err));
    PUT(kdp_ckpt_put_i64(w, "slice", d->slice, err));
    PUT(kdp_ckpt_put_str(w, "arch", kdp_model_arch(t->model), err));
    PUT(kdp_ckpt_put_str(w, "method", t->P > 1 ? t->cfg->method : "independent", err));
    PUT(kdp_ckpt_put_i64(w, "input_h", (int64_t)t->train.H, err));
    PUT(kdp_ckpt_put_i64(w, "input_w", (int64_t)t->train.W, err));
    PUT(kdp_ckpt_put_i64(w, "input_c", (int64_t)t->train.C, err));
    PUT(kdp_ckpt_put_i64(w, "classes", (int64_t)t->C, err));
    if (t->train.class_names) PUT(kdp_ckpt_put_str(w, "class_names", t->train.class_names, err));
    PUT(kdp_ckpt_put_f64(w, "mean0", t->mean[0], err));
    PUT(kdp_ckpt_put_f64(w, "mean1", t->mean[1], err));
    PUT(kdp_ckpt_put_f64(w, "mean2", t->mean[2], err));
    PUT(kdp_ckpt_put_f64(w, "std0", t->std[0], err));
    PUT(kdp_ckpt_put_f64(w, "std1", t->std[1], err));
    PUT(kdp_ckpt_put_f64(w, "std2", t->std[2], err));
    PUT(kdp_ckpt_put_i64(w, "step", t->step, err));
    PUT(kdp_ckpt_put_i64(w, "batcher.epoch", t->batcher.epoch, err));
    PUT(kdp_ckpt_put_u64(w, "batcher.pos", t->batcher.pos, err));
    PUT(kdp_ckpt_put_u64(w, "rng.augment.state", t->batcher.aug_rng.state, err));
    PUT(kdp_ckpt_put_u64(w, "rng.augment.inc", t->batcher.aug_rng.inc, err));
    PUT(kdp_ckpt_put_u64(w, "rng.dropout.state", t->dropout_rng.state, err));
    PUT(kdp_ckpt_put_u64(w, "rng.dropout.inc", t->dropout_rng.inc, err));
    PUT(kdp_ckpt_put_f32(w, "params", kdp_model_params(t->model), 1, &np, err));
    if (rc == 0 && kdp_fault_stop_step(d, KDP_FAULT_STOP_CKPT) == t->step) {
      fflush(NULL); /* fault injection: a rank lost halfway through its temp file */
      kdp_fault_stop(d, KDP_FAULT_STOP_CKPT, t->step);
    }
    PUT(kdp_ckpt_put_f32(w, "momentum", t->opt.buf, 1, &np, err));
    PUT(kdp_ckpt_put_i64(w, "opt_steps", t->opt.n_steps, err));
    PUT(kdp_ckpt_put_f32(w, "buffers", kdp_model_buffers(t->model), 1, &nb, err));
    PUT(kdp_ckpt_put_f64(w, "log.loss", t->run_loss, err));
    PUT(kdp_ckpt_put_f64(w, "log.kd", t->run_kd, err));
    PUT(kdp_ckpt_put_u64(w, "log.correct", t->run_correct, err));
    PUT(kdp_ckpt_put_u64(w, "log.n", t->run_n, err));
    PUT(kdp_ckpt_put_i64(w, "log.window", t->log_window, err));
    PUT(kdp_ckpt_put_f64(w, "train_seconds", t->train_time, err));
    PUT(kdp_ckpt_put_f64(w, "lr_scale", t->lr_scale, err));
    PUT(kdp_ckpt_put_f64(w, "temperature", t->temperature, err));
    PUT(kdp_ckpt_put_f64(w, "kd_weight", t->kd_weight, err));
    PUT(kdp_ckpt_put_i64(w, "rollbacks", t->n_rollbacks, err));
    PUT(kdp_ckpt_put_i64(w, "metrics_offset", moff, err));
    if (t->resizes) PUT(kdp_ckpt_put_str(w, "resizes", t->resizes, err));
    /* the last evaluation's validation accuracies (rank 0): what export --best picks from */
    if (t->val_table) {
      PUT(kdp_ckpt_put_str(w, "val.table", t->val_table, err));
      PUT(kdp_ckpt_put_i64(w, "val.step", t->val_step, err));
    }
    PUT(kdp_distill_save(t, w, err));
    PUT(kdp_train_ema_save(t, w, err));
    /* churn's previous labels: this rank's block rows of every peer, peer after peer */
    PUT(kdp_ckpt_put_i64(w, "diversity.step", t->div_step, err));
    if (t->div_step >= 0)
      for (int j = 0; j < t->P && rc == 0; j++) {
        char key[48];
        snprintf(key, sizeof key, "diversity.labels%d", j);
        rc = kdp_ckpt_put_bin(w, key, t->div_labels + (size_t)j * t->test.n,
                              t->div_rows * sizeof(int32_t), err);
      }
#undef PUT
  }
  uint32_t crc = 0;
  if (w) {
    if (rc == 0)
      rc = kdp_ckpt_writer_commit(w, &crc, err);
    else
      kdp_ckpt_writer_abort(w);
  }
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "another rank failed to write its checkpoint file");
    return rc;
  }
  uint32_t *crcs = kdp_xcalloc((size_t)d->world_size, sizeof *crcs);
  kdp_dist_gather_u32(d, crc, crcs);
  if (t->is_root) {
    /* fault injection for the tests: a crash between the peer files and the manifest */
    const char *slow = getenv("KDP_FAULT_CKPT_SLEEP_MS");
    if (slow) usleep((useconds_t)atoi(slow) * 1000u);
    rc = kdp_ckpt_write_manifest(dir, t->step, d->world_size, crcs, err);
    if (rc == 0) rc = kdp_ckpt_prune(dir, t->cfg->ckpt_keep, err);
    if (rc == 0) kdp_metrics_event(t, "checkpoint", t->step, kdp_now() - t0);
  }
  free(crcs);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EIO, "rank 0 failed to write the checkpoint manifest");
    return rc;
  }
  return 0;
}

/* ---- resume checks: compare the saved config with this run's, key by key ---- */

/* keys that may change between a checkpoint and its resume without a flag: they do not change
   what is computed (run.dir: a moved run directory resumes as it is) */
static int operational_key(const char *k) {
  static const char *const ok[] = {"run.dir", "run.progress", "run.threads", "run.log_every",
                                   "run.max_steps", "run.eval_every", "checkpoint.every_steps",
                                   "checkpoint.every_minutes", "checkpoint.keep",
                                   "run.max_memory", "checkpoint.max_rollbacks",
                                   "run.stall_warn_seconds", "run.stall_abort_seconds", NULL};
  if (strncmp(k, "server.", 7) == 0) return 1;
  for (int i = 0; ok[i]; i++)
    if (strcmp(k, ok[i]) == 0) return 1;
  return 0;
}

/* keys whose change makes the checkpoint unusable: a different model or method */
static int structural_key(const char *k) {
  if (strncmp(k, "peer.", 5) == 0) return 1;
  return strcmp(k, "model.arch") == 0 || strcmp(k, "kd.method") == 0 ||
         strcmp(k, "kd.exchange") == 0 || strcmp(k, "run.ranks_per_peer") == 0;
}

/* "section.key" = value pairs of an INI text as kdp_config_print writes it */
typedef struct ini_pair {
  char key[400];
  char value[KDP_PATH + 64];
} ini_pair;

static size_t ini_pairs(const char *text, ini_pair *out, size_t max) {
  char section[128] = "";
  size_t n = 0;
  const char *p = text;
  while (*p && n < max) {
    const char *e = strchr(p, '\n');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    char line[2048];
    if (len >= sizeof line) len = sizeof line - 1;
    memcpy(line, p, len);
    line[len] = 0;
    p = e ? e + 1 : p + len;
    if (line[0] == '[') {
      char *r = strchr(line, ']');
      if (r) *r = 0;
      snprintf(section, sizeof section, "%.120s", line + 1);
      continue;
    }
    char *eq = strstr(line, " = ");
    if (!eq || line[0] == '#' || line[0] == ';') continue;
    *eq = 0;
    snprintf(out[n].key, sizeof out[n].key, "%.120s.%.200s", section, line);
    snprintf(out[n].value, sizeof out[n].value, "%s", eq + 3);
    n++;
  }
  return n;
}

static const char *ini_find(const ini_pair *v, size_t n, const char *key) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(v[i].key, key) == 0) return v[i].value;
  return NULL;
}

/* A resume with a changed setting: said on stderr, logged once metrics.jsonl is open (rank 0) */
static void record_change(kdp_trainer *t, const char *key, const char *va, const char *vb) {
  if (!t->is_root) return;
  fprintf(stderr, "kdpeers: resuming with a changed setting: %s '%s' -> '%s'\n", key, va, vb);
  size_t n = t->n_changes < KDP_MAX_CHANGES ? t->n_changes++ : KDP_MAX_CHANGES - 1;
  snprintf(t->changes[n].key, sizeof t->changes[n].key, "%s", key);
  snprintf(t->changes[n].old_value, sizeof t->changes[n].old_value, "%s", va);
  snprintf(t->changes[n].new_value, sizeof t->changes[n].new_value, "%s", vb);
}

/* One key's difference between the checkpoint's config and this run's: structural ones are an
   error, others are refused unless allowed (then logged once metrics.jsonl is open). */
static int compare_key(kdp_trainer *t, const char *key, const char *va, const char *vb,
                       kdp_error *err) {
  if (strcmp(va, vb) == 0 || operational_key(key)) return 0;
  /* --resume-as rewrote the per-peer settings from the checkpoint's (kdp_elastic_plan); each
     peer's architecture is checked against its file */
  if (t->elastic && strncmp(key, "peer.", 5) == 0) return 0;
  if (structural_key(key))
    return kdp_fail(err, KDP_EMISMATCH,
                    "the checkpoint in %s/checkpoints does not match this run: %s was '%s', now "
                    "'%s'. Use the original setting, another run.dir, or --fresh",
                    t->cfg->dir, key, va, vb);
  if (!t->allow_change)
    return kdp_fail(err, KDP_EMISMATCH,
                    "the checkpoint in %s/checkpoints was made with %s = '%s', this run has '%s'. "
                    "Rerun with --allow-config-change to resume with the new value (it is "
                    "logged), or use --fresh to start over",
                    t->cfg->dir, key, va, vb);
  record_change(t, key, va, vb);
  return 0;
}

/* Compares every key of the checkpoint's config text with this run's. A key the checkpoint's
   config lacks (it was written by an older kdpeers, before the key existed) is no change when this
   run keeps the key's default: an upgraded binary resumes a preempted job without
   --allow-config-change, and the key is reported and logged like an allowed change. */
int kdp_ckpt_compare_configs(kdp_trainer *t, const char *saved, const char *now, kdp_error *err) {
  enum { MAX_KEYS = 512 };
  ini_pair *a = kdp_xcalloc(MAX_KEYS, sizeof *a), *b = kdp_xcalloc(MAX_KEYS, sizeof *b);
  ini_pair *dflt = kdp_xcalloc(MAX_KEYS, sizeof *dflt);
  size_t na = ini_pairs(saved, a, MAX_KEYS), nb = ini_pairs(now, b, MAX_KEYS), nd = 0;
  kdp_config *dc = kdp_xcalloc(1, sizeof *dc);
  kdp_config_defaults(dc);
  char *dtext = config_text(dc);
  if (dtext) nd = ini_pairs(dtext, dflt, MAX_KEYS);
  free(dtext);
  free(dc);
  int rc = 0;
  for (size_t i = 0; i < nb && rc == 0; i++) {
    const char *old = ini_find(a, na, b[i].key);
    const char *def = old ? NULL : ini_find(dflt, nd, b[i].key);
    if (!old && def && strcmp(def, b[i].value) == 0) {
      if (!operational_key(b[i].key))
        record_change(t, b[i].key, "(unset: the checkpoint predates the key)", b[i].value);
      continue;
    }
    rc = compare_key(t, b[i].key, old ? old : "(unset)", b[i].value, err);
  }
  free(dflt);
  for (size_t i = 0; i < na && rc == 0; i++)
    if (!ini_find(b, nb, a[i].key)) rc = compare_key(t, a[i].key, a[i].value, "(unset)", err);
  free(a);
  free(b);
  return rc;
}

/* churn's previous labels (a checkpoint without them: churn starts again at the next evaluation) */
static int restore_diversity(kdp_trainer *t, const kdp_ckpt *ck, kdp_error *err) {
  t->div_step = -1;
  if (!kdp_ckpt_has(ck, "diversity.step")) return 0;
  int64_t step = -1;
  int rc = kdp_ckpt_get_i64(ck, "diversity.step", &step, err);
  if (rc != 0 || step < 0 || t->P < 2) return rc;
  const size_t n = t->test.n, P = (size_t)t->P;
  if (!t->div_labels) t->div_labels = kdp_xmalloc(P * n * sizeof(int32_t));
  size_t rows = 0;
  for (size_t j = 0; j < P; j++) {
    char key[48];
    const void *data = NULL;
    size_t len = 0;
    snprintf(key, sizeof key, "diversity.labels%zu", j);
    rc = kdp_ckpt_get_bin(ck, key, &data, &len, err);
    if (rc != 0) return rc;
    if (len % sizeof(int32_t) || len / sizeof(int32_t) > n || (j && len / sizeof(int32_t) != rows))
      return kdp_fail(err, KDP_EFORMAT, "%s holds %zu bytes, not the test set's labels", key, len);
    rows = len / sizeof(int32_t);
    if (len) memcpy(t->div_labels + j * n, data, len);
  }
  t->div_rows = rows;
  t->div_step = step;
  return 0;
}

static int restore_step(kdp_trainer *t, int64_t step, int64_t *metrics_offset, kdp_error *err) {
  kdp_dist *d = t->d;
  /* --resume-as applies to the checkpoint it planned from (also when a rollback returns to it);
     a later checkpoint is the new cohort's own */
  const kdp_elastic *e = t->elastic && step == t->elastic->step ? t->elastic : NULL;
  char path[KDP_PATH + 128];
  int n_files = 0;
  int rc = kdp_ckpt_verify_step(t->cfg->dir, step, &n_files, err);
  int want = e ? e->old_world : d->world_size;
  if (rc == 0 && n_files != want)
    rc = kdp_fail(err, KDP_EMISMATCH,
                  "the checkpoint at step %lld in %s/checkpoints was written by %d ranks; this run "
                  "has %d. Start it with -np %d, resume with another cohort (--resume-as P), use "
                  "another run.dir, or --fresh",
                  (long long)step, t->cfg->dir, n_files, d->world_size, n_files);
  /* the file this rank resumes from: its own, or under --resume-as its old peer's */
  int role = KDP_ELASTIC_KEPT, src = d->world_rank;
  if (e) src = kdp_elastic_source(e, d->peer, d->slice, &role);
  const int own = role != KDP_ELASTIC_NEW;
  kdp_ckpt *ck = NULL;
  if (rc == 0) {
    kdp_ckpt_peer_path(t->cfg->dir, step, src, path, sizeof path);
    rc = kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, err);
  }
  if (rc == 0) {
    const char *saved = NULL;
    char *now = config_text(t->cfg);
    rc = kdp_ckpt_get_str(ck, "config", &saved, err);
    if (rc == 0) rc = kdp_ckpt_compare_configs(t, saved, now ? now : "", err);
    free(now);
  }
  /* --resume-as: the per-peer settings came from the checkpoint; a peer's file must hold it */
  if (rc == 0 && e && own) {
    const char *arch = NULL;
    rc = kdp_ckpt_get_str(ck, "arch", &arch, err);
    if (rc == 0 && strcmp(arch, kdp_model_arch(t->model)) != 0)
      rc = kdp_fail(err, KDP_EMISMATCH, "%s holds a peer of arch '%s'; this rank's peer is '%s'",
                    path, arch, kdp_model_arch(t->model));
  }
  /* the state read out of the file from here on: its errors name a key, not the file */
  const int reading = rc == 0;
  size_t np = kdp_model_n_params(t->model), nb = kdp_model_n_buffers(t->model);
  int64_t i64 = 0, epoch = 0, moff = -1;
  uint64_t pos = 0;
#define GET(call) \
  if (rc == 0) rc = (call)
  GET(kdp_ckpt_get_i64(ck, "step", &i64, err));
  if (rc == 0 && i64 != step)
    rc = kdp_fail(err, KDP_EFORMAT, "%s holds step %lld, its manifest says %lld", path,
                  (long long)i64, (long long)step);
  /* a new peer of a grown cohort keeps its fresh weights and optimizer; a frozen peer keeps its
     model file's (its crc32 is checked against the checkpoint's below) */
  if (own && !t->frozen) {
    GET(kdp_ckpt_get_f32(ck, "params", kdp_model_params(t->model), np, err));
    GET(kdp_ckpt_get_f32(ck, "momentum", t->opt.buf, np, err));
    GET(kdp_ckpt_get_i64(ck, "opt_steps", &t->opt.n_steps, err));
    GET(kdp_ckpt_get_f32(ck, "buffers", kdp_model_buffers(t->model), nb, err));
  }
  GET(kdp_ckpt_get_i64(ck, "batcher.epoch", &epoch, err));
  GET(kdp_ckpt_get_u64(ck, "batcher.pos", &pos, err));
  GET(kdp_ckpt_get_u64(ck, "rng.augment.state", &t->batcher.aug_rng.state, err));
  GET(kdp_ckpt_get_u64(ck, "rng.augment.inc", &t->batcher.aug_rng.inc, err));
  if (role == KDP_ELASTIC_KEPT) {
    GET(kdp_ckpt_get_u64(ck, "rng.dropout.state", &t->dropout_rng.state, err));
    GET(kdp_ckpt_get_u64(ck, "rng.dropout.inc", &t->dropout_rng.inc, err));
  }
  GET(kdp_ckpt_get_f64(ck, "log.loss", &t->run_loss, err));
  GET(kdp_ckpt_get_f64(ck, "log.kd", &t->run_kd, err));
  GET(kdp_ckpt_get_u64(ck, "log.correct", &t->run_correct, err));
  GET(kdp_ckpt_get_u64(ck, "log.n", &t->run_n, err));
  GET(kdp_ckpt_get_i64(ck, "log.window", &t->log_window, err));
  GET(kdp_ckpt_get_f64(ck, "train_seconds", &t->train_time, err));
  GET(kdp_ckpt_get_f64(ck, "lr_scale", &t->lr_scale, err));
  GET(kdp_ckpt_get_f64(ck, "temperature", &t->temperature, err));
  GET(kdp_ckpt_get_f64(ck, "kd_weight", &t->kd_weight, err));
  GET(kdp_ckpt_get_i64(ck, "rollbacks", &i64, err));
  if (rc == 0) t->n_rollbacks = (int)i64;
  GET(kdp_ckpt_get_i64(ck, "metrics_offset", &moff, err));
  /* the run's history of resizes, as of this checkpoint */
  free(t->resizes);
  t->resizes = NULL;
  if (rc == 0 && kdp_ckpt_has(ck, "resizes")) {
    const char *h = NULL;
    GET(kdp_ckpt_get_str(ck, "resizes", &h, err));
    if (rc == 0) t->resizes = kdp_xstrdup(h);
  }
  /* export --best's table of validation accuracies (rank 0's file) */
  free(t->val_table);
  t->val_table = NULL;
  if (rc == 0 && kdp_ckpt_has(ck, "val.table")) {
    const char *vt = NULL;
    GET(kdp_ckpt_get_str(ck, "val.table", &vt, err));
    GET(kdp_ckpt_get_i64(ck, "val.step", &t->val_step, err));
    if (rc == 0) t->val_table = kdp_xstrdup(vt);
  }
  if (rc == 0 && e && e->resized) kdp_elastic_record(t, e);
  if (rc == 0)
    rc = e && e->resized ? kdp_elastic_load_module(t, e, ck, err) : kdp_distill_load(t, ck, err);
  /* mcl's embedding head travels with its peer (kept or cloned); a new peer keeps a fresh one */
  if (rc == 0 && e && e->resized && own) rc = kdp_embed_load(t, ck, err);
  if (rc == 0 && e && e->resized && own) rc = kdp_frozen_load(t, ck, err);
  if (rc == 0 && e && e->resized && t->stale) rc = kdp_stale_load_resized(t->stale, t, e, ck, err);
  /* churn's previous labels belong to the old cohort after a resize: churn starts over */
  if (!(e && e->resized)) GET(restore_diversity(t, ck, err));
#undef GET
  /* metrics.jsonl's offset is in the old rank 0's file */
  if (rc == 0 && e && t->is_root && src != 0) {
    kdp_ckpt *c0 = NULL;
    kdp_ckpt_peer_path(t->cfg->dir, step, 0, path, sizeof path);
    rc = kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &c0, err);
    if (rc == 0) rc = kdp_ckpt_get_i64(c0, "metrics_offset", &moff, err);
    kdp_ckpt_free(c0);
  }
  if (rc == 0 && role == KDP_ELASTIC_CLONE) kdp_elastic_perturb(t, e);
  /* the EMA copy: a kept peer's own; a new peer's (or a clone's) starts from its weights */
  if (rc == 0) rc = kdp_train_ema_load(t, ck, role != KDP_ELASTIC_KEPT, err);
  if (rc != 0 && rc != KDP_EMISMATCH && reading) {
    kdp_error e2 = *err;
    kdp_fail(err, rc, "cannot resume from %s: %s", path, e2.msg);
  }
  kdp_ckpt_free(ck);
  if (!kdp_dist_all_ok(d, rc == 0)) {
    if (rc == 0) rc = kdp_fail(err, KDP_EMISMATCH, "another rank could not resume (see its message)");
    return rc;
  }
  kdp_stale_resize_finish(t->stale, t); /* after a resize: new peers' copies (collective) */
  t->step = step;
  kdp_batcher_seek(&t->batcher, epoch, (size_t)pos);
  if (metrics_offset) *metrics_offset = moff;
  return 0;
}

int kdp_train_restore_latest(kdp_trainer *t, int64_t *metrics_offset, kdp_error *err) {
  int64_t found[2] = {0, -1}; /* rank 0's find_latest result, the step */
  if (t->is_root) {
    found[0] = kdp_ckpt_find_latest(t->cfg->dir, &found[1], err);
    if (found[0] == KDP_EFORMAT && !t->serve_only) {
      kdp_error e2 = *err;
      kdp_fail(err, KDP_EFORMAT,
               "%s. Stopping instead of starting over: --fresh would delete %s/checkpoints and "
               "empty metrics.jsonl, then train from step 0 (copy the checkpoints elsewhere "
               "first to keep them)",
               e2.msg, t->cfg->dir);
    }
  }
  kdp_dist_bcast(t->d, found, sizeof found);
  if (found[0] < 0) {
    if (!t->is_root)
      kdp_fail(err, (int)found[0], "rank 0 found no usable checkpoint (see its message)");
    return (int)found[0];
  }
  if (found[0] == 0) return 0;
  int64_t step = found[1];
  int rc = restore_step(t, step, metrics_offset, err);
  if (rc != 0) return rc;
  if (t->is_root)
    fprintf(stderr, "kdpeers: resumed from the checkpoint at step %lld in %s/checkpoints\n",
            (long long)step, t->cfg->dir);
  return 1;
}

/* removes a directory tree of plain files (our checkpoints) */
static int remove_tree(const char *path) {
  DIR *dir = opendir(path);
  if (!dir) return errno == ENOENT ? 0 : -1;
  struct dirent *de;
  int rc = 0;
  while ((de = readdir(dir)) != NULL) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    char sub[KDP_PATH + 300];
    snprintf(sub, sizeof sub, "%s/%s", path, de->d_name);
    struct stat st;
    if (lstat(sub, &st) != 0) continue;
    if (S_ISDIR(st.st_mode))
      rc |= remove_tree(sub);
    else if (unlink(sub) != 0)
      rc = -1;
  }
  closedir(dir);
  if (rmdir(path) != 0) rc = -1;
  return rc;
}

int kdp_train_forget_checkpoints(const char *dir, kdp_error *err) {
  char path[KDP_PATH + 64];
  snprintf(path, sizeof path, "%s/checkpoints", dir);
  if (remove_tree(path) != 0)
    return kdp_fail(err, KDP_EIO, "--fresh: cannot remove %s: %s", path, strerror(errno));
  snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
  if (truncate(path, 0) != 0 && errno != ENOENT)
    return kdp_fail(err, KDP_EIO, "--fresh: cannot truncate %s: %s", path, strerror(errno));
  return 0;
}
