/* tools.c: the artefact commands: inspect a checkpoint or model file, export a standalone
   student, evaluate a model or a whole run, predict labels for images. */
#include "kdpeers/tools.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/data.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "kdpeers/infer.h"
#include "kdpeers/onnx.h"
#include "kdpeers/train.h"

#define TOOL_BATCH 500

typedef kdp_modelfile loaded_model;

static void loaded_free(loaded_model *lm) { kdp_modelfile_free(lm); }

static int is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A peer's EMA copy (run.ema_decay, pcl's mean teacher) from its checkpoint file, over the
   peer's weights in mf. */
static int load_ema(loaded_model *mf, const kdp_ckpt *ck, const char *path, kdp_error *err) {
  if (!kdp_ckpt_has(ck, "ema.params"))
    return kdp_fail(err, KDP_EINVAL,
                    "%s holds no EMA copy: --ema needs a run trained with run.ema_decay > 0 or "
                    "kd.method = pcl",
                    path);
  int rc = kdp_ckpt_get_f32(ck, "ema.params", kdp_model_params(mf->m), kdp_model_n_params(mf->m),
                            err);
  if (rc == 0)
    rc = kdp_ckpt_get_f32(ck, "ema.buffers", kdp_model_buffers(mf->m),
                          kdp_model_n_buffers(mf->m), err);
  return rc;
}

/* what load_models reads of each peer */
enum {
  LOAD_WEIGHTS, /* the peer's weights */
  LOAD_EMA,     /* its EMA copy instead (an error when its file holds none) */
  LOAD_BOTH     /* its weights, then its EMA copy when its file holds one (peerN.ema) */
};

/* 1 for a model LOAD_EMA or LOAD_BOTH read as a peer's EMA copy (labelled peerN.ema) */
static int is_ema_copy(const loaded_model *lm) {
  size_t n = strlen(lm->label);
  return n > 4 && strcmp(lm->label + n - 4, ".ema") == 0;
}

/* Loads the models of a run's newest checkpoint (one per peer: slice 0's file, read as `what`
   says), or one model file. Returns the count (>= 1) or a negative code. */
static int load_models(const char *path, int only_peer, int what, loaded_model *out, int max,
                       kdp_error *err) {
  if (!is_dir(path)) {
    if (what == LOAD_EMA)
      return kdp_fail(err, KDP_EINVAL, "--ema reads a run directory's checkpoint, not a model "
                                       "file (%s)", path);
    int rc = kdp_modelfile_read(&out[0], path, TOOL_BATCH, err);
    return rc == 0 ? 1 : rc;
  }
  int64_t step = 0;
  int found = kdp_ckpt_find_latest(path, &step, err);
  if (found < 0) return found;
  if (found == 0)
    return kdp_fail(err, KDP_EIO,
                    "%s holds no complete checkpoint (run.dir/checkpoints/step-*/MANIFEST.kdpc)",
                    path);
  int n_files = 0;
  int rc = kdp_ckpt_verify_step(path, step, &n_files, err);
  if (rc != 0) return rc;
  int n = 0;
  for (int r = 0; r < n_files && n < max; r++) {
    char fp[4096];
    kdp_ckpt_peer_path(path, step, r, fp, sizeof fp);
    kdp_ckpt *ck = NULL;
    rc = kdp_ckpt_read(fp, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, err);
    if (rc != 0) break;
    int64_t peer = 0, slice = 0;
    rc = kdp_ckpt_get_i64(ck, "peer", &peer, err);
    if (rc == 0) rc = kdp_ckpt_get_i64(ck, "slice", &slice, err);
    const int want = rc == 0 && slice == 0 && (only_peer < 0 || peer == only_peer);
    const int copies = !want ? 0 : what == LOAD_BOTH && kdp_ckpt_has(ck, "ema.params") ? 2 : 1;
    for (int c = 0; c < copies && rc == 0 && n < max; c++) {
      const int ema = what == LOAD_EMA || c == 1;
      rc = kdp_modelfile_from_ckpt(&out[n], ck, fp, TOOL_BATCH, err);
      if (rc == 0 && ema && (rc = load_ema(&out[n], ck, fp, err)) != 0) loaded_free(&out[n]);
      if (rc == 0)
        snprintf(out[n++].label, sizeof out[0].label, "peer%lld%s", (long long)peer,
                 ema ? ".ema" : "");
    }
    kdp_ckpt_free(ck);
    if (rc != 0) break;
  }
  if (rc != 0) {
    for (int i = 0; i < n; i++) loaded_free(&out[i]);
    return rc;
  }
  if (n == 0)
    return kdp_fail(err, KDP_EINVAL, "%s: the checkpoint at step %lld has no peer %d", path,
                    (long long)step, only_peer);
  return n;
}

int kdp_tool_inspect(const char *path) {
  kdp_error err;
  if (is_dir(path)) {
    int64_t step = 0;
    int found = kdp_ckpt_find_latest(path, &step, &err);
    if (found <= 0) {
      fprintf(stderr, "kdpeers inspect: %s\n",
              found < 0 ? err.msg : "no complete checkpoint in this run directory");
      return 1;
    }
    char mp[4096];
    kdp_ckpt_manifest_path(path, step, mp, sizeof mp);
    printf("newest complete checkpoint: step %lld\n", (long long)step);
    return kdp_ckpt_describe(mp, stdout) == 0 ? 0 : 1;
  }
  int rc = kdp_ckpt_describe(path, stdout);
  if (rc != 0) return 1;
  /* a digest per tensor, so two files' weights can be compared */
  kdp_ckpt *ck = NULL;
  if (kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, &err) != 0) return 1;
  printf("tensor digests (crc32 of the little-endian float32 data):\n");
  for (size_t i = 0; i < kdp_ckpt_count(ck); i++) {
    kdp_ckpt_info info;
    if (kdp_ckpt_entry(ck, i, &info) != 0 || strcmp(kdp_ckpt_type_name(info.type), "f32") != 0)
      continue;
    float *buf = kdp_falloc(info.count);
    if (kdp_ckpt_get_f32(ck, info.name, buf, info.count, &err) == 0)
      printf("  %-24s crc32 %08lx (%zu floats)\n", info.name,
             crc32(0L, (const Bytef *)buf, (uInt)(info.count * sizeof(float))), info.count);
    free(buf);
  }
  kdp_ckpt_free(ck);
  return 0;
}

static const char *const FASHION_NAMES =
    "T-shirt/top\nTrouser\nPullover\nDress\nCoat\nSandal\nShirt\nSneaker\nBag\nAnkle boot\n";

/* Class names a run's data imply, one per line: Fashion-MNIST's when its IDX files live in a
   directory named fashion-mnist (Debian's dataset-fashion-mnist), CIFAR's from the
   batches.meta.txt / fine_label_names.txt beside the batches. Empty when unknown. (Image-folder
   runs need no guess: their checkpoints carry the folder's class names.) */
static void run_class_names(const char *run_dir, char *out, size_t n) {
  out[0] = 0;
  char ini[256];
  int n_ranks = 0;
  kdp_error err;
  if (kdp_tool_saved_config(run_dir, ini, sizeof ini, &n_ranks, &err) != 0) return;
  kdp_config cfg;
  kdp_config_defaults(&cfg);
  int rc = kdp_config_load_file(&cfg, ini, &err);
  unlink(ini);
  if (rc != 0) return;
  if (cfg.format_id == KDP_FORMAT_IDX) {
    if (strstr(cfg.train_images, "fashion-mnist/")) snprintf(out, n, "%s", FASHION_NAMES);
    return;
  }
  char dir[KDP_PATH + 64];
  snprintf(dir, sizeof dir, "%s", cfg.train_images);
  char *comma = strchr(dir, ',');
  if (comma) *comma = 0;
  char *slash = strrchr(dir, '/');
  if (slash) slash[1] = 0; else dir[0] = 0;
  strcat(dir, cfg.format_id == KDP_FORMAT_CIFAR100 ? "fine_label_names.txt" : "batches.meta.txt");
  FILE *f = fopen(dir, "r");
  if (!f) return;
  size_t len = fread(out, 1, n - 1, f);
  fclose(f);
  out[len] = 0;
  while (len > 0 && (out[len - 1] == '\n' || out[len - 1] == '\r' || out[len - 1] == ' '))
    out[--len] = 0;
}

static const char *const FORMAT_NAMES[] = {"kdpm", "onnx"};

/* export --best's candidates: the models of the last evaluation's validation table (the run's
   checkpoint, "MODEL ACC" lines) named "peer<N><suffix>", each exported as `pick` of peer N:
   the peers, and their EMA copies (peerN.ema) when the run kept them (run.ema_decay, pcl). */
static const struct {
  const char *suffix;
  kdp_export_pick pick;
} BEST_CANDIDATES[] = {
    {"", KDP_PICK_PEER},
    {".ema", KDP_PICK_EMA},
};

/* The candidate of the validation table with the best accuracy (the first of equals, in the
   table's order); 0, or 2 (usage: no directory, no split) / 1 (unreadable) with a message. */
static int pick_best(const char *run_dir, kdp_export_opts *best) {
  kdp_error err;
  if (!is_dir(run_dir)) {
    fprintf(stderr, "kdpeers export: --best picks from a run directory's validation accuracies; "
                    "%s is a model file\n", run_dir);
    return 2;
  }
  int64_t step = 0;
  int found = kdp_ckpt_find_latest(run_dir, &step, &err);
  if (found <= 0) {
    fprintf(stderr, "kdpeers export: %s\n",
            found < 0 ? err.msg : "the run directory holds no complete checkpoint");
    return 1;
  }
  char fp[4096];
  kdp_ckpt_peer_path(run_dir, step, 0, fp, sizeof fp);
  kdp_ckpt *ck = NULL;
  if (kdp_ckpt_read(fp, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, &err) != 0) {
    fprintf(stderr, "kdpeers export: %s\n", err.msg);
    return 1;
  }
  const char *table = NULL;
  int64_t vstep = -1;
  if (!kdp_ckpt_has(ck, "val.table") || kdp_ckpt_get_str(ck, "val.table", &table, &err) != 0 ||
      kdp_ckpt_get_i64(ck, "val.step", &vstep, &err) != 0) {
    kdp_ckpt_free(ck);
    fprintf(stderr, "kdpeers export: --best needs validation accuracies, and the run %s had no "
                    "validation split (or no evaluation yet): train with -s data.val_size=N to "
                    "hold out the last N training examples, or export a peer with --peer N\n",
                    run_dir);
    return 2;
  }
  double best_acc = -1;
  char line[96], seen[1024] = "";
  for (const char *p = table; *p;) {
    size_t len = strcspn(p, "\n");
    snprintf(line, sizeof line, "%.*s", (int)(len < sizeof line ? len : sizeof line - 1), p);
    p += len + (p[len] == '\n');
    char name[64], rest[64];
    double acc;
    int peer, used = 0;
    if (sscanf(line, "%63s %lf", name, &acc) != 2 || sscanf(name, "peer%d%n", &peer, &used) != 1)
      continue;
    for (size_t c = 0; c < sizeof BEST_CANDIDATES / sizeof BEST_CANDIDATES[0]; c++) {
      snprintf(rest, sizeof rest, "%s", name + used);
      if (strcmp(rest, BEST_CANDIDATES[c].suffix) != 0) continue;
      size_t sl = strlen(seen);
      snprintf(seen + sl, sizeof seen - sl, "%s%s %.2f%%", sl ? ", " : "", name, 100 * acc);
      if (acc > best_acc) {
        best_acc = acc;
        best->pick = BEST_CANDIDATES[c].pick;
        best->peer = peer;
      }
    }
  }
  kdp_ckpt_free(ck);
  if (best_acc < 0) {
    fprintf(stderr, "kdpeers export: the run's validation table names no peer\n");
    return 1;
  }
  printf("export --best: peer %d%s has the best validation accuracy at step %lld (%s)\n",
         best->peer, best->pick == KDP_PICK_PEER ? "" : " (EMA)", (long long)vstep, seen);
  return 0;
}

static int export_best(const kdp_export_opts *o) {
  kdp_export_opts best = *o;
  int rc = pick_best(o->src, &best);
  return rc != 0 ? rc : kdp_tool_export(&best);
}

int kdp_tool_export(const kdp_export_opts *o) {
  kdp_error err;
  if (o->pick == KDP_PICK_BEST) return export_best(o);
  loaded_model lm;
  int n = load_models(o->src, o->peer, o->pick == KDP_PICK_EMA ? LOAD_EMA : LOAD_WEIGHTS, &lm, 1,
                      &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers export: %s\n", err.msg);
    return 1;
  }
  int rc = 0;
  if (o->classes) {
    rc = kdp_modelfile_set_class_names(&lm, o->classes, ',', &err);
  } else if (!lm.class_names && is_dir(o->src)) {
    char names[4096];
    run_class_names(o->src, names, sizeof names);
    /* names that do not fit the model (another dataset) are left out, not an error */
    if (names[0] && kdp_modelfile_set_class_names(&lm, names, '\n', &err) != 0)
      fprintf(stderr, "kdpeers export: warning: the run's class names do not fit: %s\n", err.msg);
  }
  double t0 = kdp_now();
  if (rc == 0)
    rc = o->format == KDP_EXPORT_ONNX ? kdp_onnx_write(&lm, o->out, &err)
                                      : kdp_modelfile_write(&lm, o->out, o->src, o->peer, &err);
  if (rc != 0) {
    fprintf(stderr, "kdpeers export: %s\n", err.msg);
  } else {
    char what[64] = "the model";
    if (is_dir(o->src))
      snprintf(what, sizeof what, "peer %d%s", o->peer,
               o->pick == KDP_PICK_EMA ? "'s EMA copy" : "");
    printf("exported %s of %s (%s, %zu params) as %s to %s in %.3f s\n", what, o->src,
           kdp_model_arch(lm.m), kdp_model_n_params(lm.m), FORMAT_NAMES[o->format], o->out,
           kdp_now() - t0);
  }
  loaded_free(&lm);
  return rc == 0 ? 0 : 1;
}

/* Every model of a run (each peer, then its EMA copy when the run kept them) or one model
   file on the test set, and the peers' ensemble (the mean of their probabilities, as the run's
   own "ensemble" of a cohort without a method teacher; the EMA copies are not in it). */
int kdp_tool_eval(const char *path, const kdp_config *cfg) {
  kdp_error err;
  loaded_model lm[2 * KDP_MAX_PEERS];
  int n = load_models(path, -1, LOAD_BOTH, lm, 2 * KDP_MAX_PEERS, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers eval: %s\n", err.msg);
    return 1;
  }
  kdp_dataset train, test;
  int rc = kdp_train_load_data(cfg, &train, &test, &err);
  if (rc != 0) {
    fprintf(stderr, "kdpeers eval: %s\n", err.msg);
    for (int i = 0; i < n; i++) loaded_free(&lm[i]);
    return 1;
  }
  kdp_dataset_free(&train);
  size_t C = lm[0].in.n_classes;
  for (int i = 0; i < n; i++)
    if (lm[i].in.H != test.H || lm[i].in.W != test.W || lm[i].in.C != test.C ||
        lm[i].in.n_classes != C || test.n_classes > C) {
      fprintf(stderr,
              "kdpeers eval: %s takes %zux%zux%zu inputs and %zu classes; the test set has "
              "%zux%zux%zu and %zu classes (set data.test_images / data.test_labels)\n",
              lm[i].label, lm[i].in.H, lm[i].in.W, lm[i].in.C, lm[i].in.n_classes, test.H, test.W,
              test.C, test.n_classes);
      rc = 1;
      goto out;
    }
  {
    int n_ens = 0;
    for (int i = 0; i < n; i++) n_ens += !is_ema_copy(&lm[i]);
    size_t elem = kdp_dataset_elem(&test), isz = test.H * test.W * test.C * elem;
    float *p = kdp_falloc(TOOL_BATCH * C), *ens = kdp_falloc(TOOL_BATCH * C);
    int32_t *y = kdp_xcalloc(TOOL_BATCH, sizeof(int32_t));
    double *hits = kdp_xcalloc((size_t)n + 1, sizeof(double));
    double *loss = kdp_xcalloc((size_t)n + 1, sizeof(double));
    for (size_t first = 0; first < test.n; first += TOOL_BATCH) {
      size_t b = test.n - first < TOOL_BATCH ? test.n - first : TOOL_BATCH;
      memset(ens, 0, b * C * sizeof(float));
      for (int i = 0; i < n; i++) {
        /* every model normalises with its own statistics */
        kdp_dataset_get(&test, first, b, NULL, NULL, NULL, y);
        kdp_modelfile_predict(&lm[i], test.images + first * isz, elem, b, p);
        for (size_t r = 0; r < b; r++) {
          const float *row = p + r * C;
          hits[i] += kdp_argmax(row, C) == (size_t)y[r];
          loss[i] -= log(fmax(row[y[r]], 1e-30));
          if (!is_ema_copy(&lm[i]))
            for (size_t k = 0; k < C; k++) ens[r * C + k] += row[k] / (float)n_ens;
        }
      }
      for (size_t r = 0; r < b; r++) {
        const float *row = ens + r * C;
        hits[n] += kdp_argmax(row, C) == (size_t)y[r];
        loss[n] -= log(fmax(row[y[r]], 1e-30));
      }
    }
    printf("%-10s %9s %9s   (%zu test examples)\n", "model", "test acc", "loss", test.n);
    for (int i = 0; i <= n; i++) {
      if (i == n && n_ens == 1) break;
      printf("%-10s %8.2f%% %9.4f\n", i < n ? lm[i].label : "ensemble",
             100.0 * hits[i] / (double)test.n, loss[i] / (double)test.n);
    }
    free(p);
    free(ens);
    free(y);
    free(hits);
    free(loss);
  }
out:
  kdp_dataset_free(&test);
  for (int i = 0; i < n; i++) loaded_free(&lm[i]);
  return rc == 0 ? 0 : 1;
}

/* ---- kdpeers serve RUN_DIR, alone: every peer of the checkpoint in this one process ---- */

#include <signal.h>
#include <unistd.h>

#include "kdpeers/serve.h"

static volatile sig_atomic_t g_serve_stop;
static void serve_on_signal(int sig) {
  (void)sig;
  g_serve_stop = 1;
}

int kdp_tool_serve_alone(const char *run_dir, const kdp_config *cfg) {
  kdp_error err;
  loaded_model lm[KDP_MAX_PEERS];
  int n = load_models(run_dir, -1, LOAD_WEIGHTS, lm, KDP_MAX_PEERS, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    return 1;
  }
  size_t isz = lm[0].in.H * lm[0].in.W * lm[0].in.C, C = lm[0].in.n_classes;
  kdp_server_options o;
  kdp_server_strings str;
  kdp_config c2 = *cfg;
  /* server.addr goes to the served run, or MODEL.kdpm.addr beside a model file */
  snprintf(c2.dir, sizeof c2.dir, "%s", run_dir);
  kdp_train_server_options(&c2, &o, &str);
  if (!is_dir(run_dir)) snprintf(str.addr_file, sizeof str.addr_file, "%s.addr", run_dir);
  o.input_dim = (int)isz;
  kdp_server *srv = NULL;
  if (kdp_server_start(&srv, &o, &err) != 0) {
    fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    for (int i = 0; i < n; i++) loaded_free(&lm[i]);
    return 1;
  }
  if (is_dir(run_dir))
    fprintf(stderr, "kdpeers serve: %d peer%s of %s on %s (alone: no method teacher; run under "
                    "mpirun with the run's rank count for it)\n",
            n, n == 1 ? "" : "s", run_dir, kdp_server_address(srv));
  else
    fprintf(stderr, "kdpeers serve: model %s (%s) on %s\n", run_dir, kdp_model_arch(lm[0].m),
            kdp_server_address(srv));
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = serve_on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGUSR1, &sa, NULL);
  char status[512];
  snprintf(status, sizeof status,
           "{\"mode\":\"serve\",\"%s\":\"%s\",\"peers\":%d,\"classes\":%zu,\"input_dim\":%zu}",
           is_dir(run_dir) ? "run_dir" : "model", run_dir, n, C, isz);
  kdp_server_publish(srv, "# HELP kdpeers_serving 1 while serving a saved run.\n"
                          "# TYPE kdpeers_serving gauge\nkdpeers_serving 1\n",
                     status);
  int maxb = 256;
  float *x = kdp_falloc((size_t)maxb * isz), *all = kdp_falloc((size_t)n * maxb * C);
  float *ens = kdp_falloc((size_t)maxb * C);
  while (!g_serve_stop) {
    kdp_command cmd;
    while (kdp_server_poll_command(srv, &cmd))
      if (cmd.action == KDP_ACTION_STOP) g_serve_stop = 1;
    kdp_predict_req *req = kdp_server_take_predict(srv);
    if (!req) {
      usleep(2000);
      continue;
    }
    if (req->n > maxb) {
      kdp_server_fail_predict(srv, req, 400, "too many inputs");
      continue;
    }
    size_t b = (size_t)req->n;
    memset(ens, 0, b * C * sizeof(float));
    for (int i = 0; i < n; i++) {
      for (size_t k = 0; k < b * isz; k++) {
        size_t c = k % lm[i].in.C;
        x[k] = (req->x[k] / 255.0f - lm[i].mean[c]) / lm[i].std[c];
      }
      float *p = all + (size_t)i * b * C;
      kdp_softmax_t(p, kdp_model_forward(lm[i].m, x, b, 0, NULL), b, C, 1.0f);
      for (size_t k = 0; k < b * C; k++) ens[k] += p[k] / (float)n;
    }
    kdp_predict_result r = {.P = n, .C = (int)C, .peers = all, .ensemble = ens};
    kdp_server_answer_predict(srv, req, &r);
  }
  kdp_server_stop(srv);
  free(x);
  free(all);
  free(ens);
  for (int i = 0; i < n; i++) loaded_free(&lm[i]);
  return 0;
}

int kdp_tool_saved_config(const char *run_dir, char *out, size_t n, int *n_ranks, kdp_error *err) {
  int64_t step = 0;
  int found = kdp_ckpt_find_latest(run_dir, &step, err);
  if (found < 0) return found;
  if (found == 0)
    return kdp_fail(err, KDP_EIO, "%s holds no complete checkpoint to serve", run_dir);
  int rc = kdp_ckpt_verify_step(run_dir, step, n_ranks, err);
  if (rc != 0) return rc;
  char fp[4096];
  kdp_ckpt_peer_path(run_dir, step, 0, fp, sizeof fp);
  kdp_ckpt *ck = NULL;
  rc = kdp_ckpt_read(fp, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, err);
  const char *text = NULL;
  if (rc == 0) rc = kdp_ckpt_get_str(ck, "config", &text, err);
  if (rc == 0) {
    snprintf(out, n, "/tmp/kdpeers-serve-XXXXXX");
    int fd = mkstemp(out);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f || fputs(text, f) < 0 || fclose(f) != 0)
      rc = kdp_fail(err, KDP_EIO, "cannot write a temporary config file: %s", strerror(errno));
  }
  kdp_ckpt_free(ck);
  return rc;
}
