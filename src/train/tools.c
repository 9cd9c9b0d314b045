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
#include "kdpeers/train.h"

#define TOOL_BATCH 500

/* A model with the normalisation it was trained with. */
typedef struct loaded_model {
  kdp_model *m;
  kdp_input_shape in;
  float mean[3], std[3];
  char label[64];
} loaded_model;

static void loaded_free(loaded_model *lm) {
  kdp_model_free(lm->m);
  lm->m = NULL;
}

/* Builds the model described by a checkpoint or model file's entries and loads its weights. */
static int model_from_ckpt(const kdp_ckpt *ck, const char *path, loaded_model *lm,
                           kdp_error *err) {
  memset(lm, 0, sizeof *lm);
  const char *arch = NULL;
  int64_t h = 0, w = 0, c = 0, classes = 0;
  double mv[6] = {0, 0, 0, 1, 1, 1};
  static const char *mnames[6] = {"mean0", "mean1", "mean2", "std0", "std1", "std2"};
  int rc = kdp_ckpt_get_str(ck, "arch", &arch, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_h", &h, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_w", &w, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_c", &c, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "classes", &classes, err);
  for (int i = 0; i < 6 && rc == 0; i++) rc = kdp_ckpt_get_f64(ck, mnames[i], &mv[i], err);
  if (rc != 0) {
    kdp_error e2 = *err;
    return kdp_fail(err, rc, "%s: %s", path, e2.msg);
  }
  if (h <= 0 || w <= 0 || c <= 0 || c > 3 || classes < 2 || h > 4096 || w > 4096 ||
      classes > 100000)
    return kdp_fail(err, KDP_EFORMAT, "%s: implausible input shape %lldx%lldx%lld, %lld classes",
                    path, (long long)h, (long long)w, (long long)c, (long long)classes);
  lm->in = (kdp_input_shape){(size_t)h, (size_t)w, (size_t)c, (size_t)classes};
  for (int i = 0; i < 3; i++) {
    lm->mean[i] = (float)mv[i];
    lm->std[i] = (float)mv[3 + i];
  }
  rc = kdp_model_create(&lm->m, arch, lm->in, TOOL_BATCH, err);
  if (rc != 0) return rc;
  rc = kdp_ckpt_get_f32(ck, "params", kdp_model_params(lm->m), kdp_model_n_params(lm->m), err);
  if (rc == 0)
    rc = kdp_ckpt_get_f32(ck, "buffers", kdp_model_buffers(lm->m), kdp_model_n_buffers(lm->m),
                          err);
  if (rc != 0) {
    kdp_error e2 = *err;
    loaded_free(lm);
    return kdp_fail(err, rc, "%s: %s", path, e2.msg);
  }
  return 0;
}

static int is_dir(const char *p) {
  struct stat st;
  return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Loads the models of a run's newest checkpoint (one per peer: slice 0's file), or one model
   file. Returns the count (>= 1) or a negative code. */
static int load_models(const char *path, int only_peer, loaded_model *out, int max,
                       kdp_error *err) {
  if (!is_dir(path)) {
    kdp_ckpt *ck = NULL;
    int rc = kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, err);
    if (rc != 0) return rc;
    rc = model_from_ckpt(ck, path, &out[0], err);
    snprintf(out[0].label, sizeof out[0].label, "model");
    kdp_ckpt_free(ck);
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
    if (rc == 0 && slice == 0 && (only_peer < 0 || peer == only_peer)) {
      rc = model_from_ckpt(ck, fp, &out[n], err);
      if (rc == 0) snprintf(out[n++].label, sizeof out[0].label, "peer%lld", (long long)peer);
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

int kdp_tool_export(const char *run_dir, int peer, const char *out_path) {
  kdp_error err;
  loaded_model lm;
  int n = load_models(run_dir, peer, &lm, 1, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers export: %s\n", err.msg);
    return 1;
  }
  kdp_ckpt_writer *w = NULL;
  int rc = kdp_ckpt_writer_open(&w, out_path, "model", &err);
  size_t np = kdp_model_n_params(lm.m), nb = kdp_model_n_buffers(lm.m);
  static const char *mnames[6] = {"mean0", "mean1", "mean2", "std0", "std1", "std2"};
#define PUT(call) \
  if (rc == 0) rc = (call)
  PUT(kdp_ckpt_put_str(w, "arch", kdp_model_arch(lm.m), &err));
  PUT(kdp_ckpt_put_i64(w, "input_h", (int64_t)lm.in.H, &err));
  PUT(kdp_ckpt_put_i64(w, "input_w", (int64_t)lm.in.W, &err));
  PUT(kdp_ckpt_put_i64(w, "input_c", (int64_t)lm.in.C, &err));
  PUT(kdp_ckpt_put_i64(w, "classes", (int64_t)lm.in.n_classes, &err));
  for (int i = 0; i < 6; i++) PUT(kdp_ckpt_put_f64(w, mnames[i], i < 3 ? lm.mean[i] : lm.std[i - 3], &err));
  PUT(kdp_ckpt_put_str(w, "source", run_dir, &err));
  PUT(kdp_ckpt_put_i64(w, "source_peer", peer, &err));
  PUT(kdp_ckpt_put_str(w, "kdpeers_version", KDP_VERSION, &err));
  PUT(kdp_ckpt_put_f32(w, "params", kdp_model_params(lm.m), 1, &np, &err));
  PUT(kdp_ckpt_put_f32(w, "buffers", kdp_model_buffers(lm.m), 1, &nb, &err));
#undef PUT
  if (w) {
    if (rc == 0)
      rc = kdp_ckpt_writer_commit(w, NULL, &err);
    else
      kdp_ckpt_writer_abort(w);
  }
  if (rc != 0) {
    fprintf(stderr, "kdpeers export: %s\n", err.msg);
  } else {
    printf("exported peer %d of %s (%s, %zu params) to %s\n", peer, run_dir, kdp_model_arch(lm.m),
           np, out_path);
  }
  loaded_free(&lm);
  return rc == 0 ? 0 : 1;
}

/* softmax probabilities of one model on b normalised images */
static const float *model_probs(loaded_model *lm, const float *x, size_t b, float *probs) {
  const float *z = kdp_model_forward(lm->m, x, b, 0, NULL);
  kdp_softmax_t(probs, z, b, lm->in.n_classes, 1.0f);
  return probs;
}

int kdp_tool_eval(const char *path, const kdp_config *cfg) {
  kdp_error err;
  loaded_model lm[KDP_MAX_PEERS];
  int n = load_models(path, -1, lm, KDP_MAX_PEERS, &err);
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
    size_t isz = test.H * test.W * test.C;
    float *x = kdp_falloc(TOOL_BATCH * isz), *p = kdp_falloc(TOOL_BATCH * C),
          *ens = kdp_falloc(TOOL_BATCH * C);
    int32_t *y = kdp_xcalloc(TOOL_BATCH, sizeof(int32_t));
    double *hits = kdp_xcalloc((size_t)n + 1, sizeof(double));
    double *loss = kdp_xcalloc((size_t)n + 1, sizeof(double));
    for (size_t first = 0; first < test.n; first += TOOL_BATCH) {
      size_t b = test.n - first < TOOL_BATCH ? test.n - first : TOOL_BATCH;
      memset(ens, 0, b * C * sizeof(float));
      for (int i = 0; i < n; i++) {
        /* every model normalises with its own statistics */
        kdp_dataset_get(&test, first, b, lm[i].mean, lm[i].std, x, y);
        model_probs(&lm[i], x, b, p);
        for (size_t r = 0; r < b; r++) {
          const float *row = p + r * C;
          size_t am = 0;
          for (size_t k = 1; k < C; k++)
            if (row[k] > row[am]) am = k;
          hits[i] += am == (size_t)y[r];
          loss[i] -= log(fmax(row[y[r]], 1e-30));
          for (size_t k = 0; k < C; k++) ens[r * C + k] += row[k] / (float)n;
        }
      }
      for (size_t r = 0; r < b; r++) {
        const float *row = ens + r * C;
        size_t am = 0;
        for (size_t k = 1; k < C; k++)
          if (row[k] > row[am]) am = k;
        hits[n] += am == (size_t)y[r];
        loss[n] -= log(fmax(row[y[r]], 1e-30));
      }
    }
    printf("%-10s %9s %9s   (%zu test examples)\n", "model", "test acc", "loss", test.n);
    for (int i = 0; i <= n; i++) {
      if (i == n && n == 1) break;
      printf("%-10s %8.2f%% %9.4f\n", i < n ? lm[i].label : "ensemble",
             100.0 * hits[i] / (double)test.n, loss[i] / (double)test.n);
    }
    free(x);
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

int kdp_tool_predict(const char *model_path, const char *input, int top_only) {
  kdp_error err;
  loaded_model lm;
  int n = load_models(model_path, 0, &lm, 1, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers predict: %s\n", err.msg);
    return 1;
  }
  size_t isz = lm.in.H * lm.in.W * lm.in.C, C = lm.in.n_classes;
  uint8_t *pix = NULL;
  size_t count = 0;
  int rc = 0;
  if (strcmp(input, "-") == 0) {
    /* raw uint8 pixels (H x W x C per image) on standard input */
    size_t cap = 0, len = 0;
    for (;;) {
      if (len == cap) {
        cap = cap ? 2 * cap : 1 << 20;
        pix = realloc(pix, cap);
        if (!pix) abort();
      }
      size_t got = fread(pix + len, 1, cap - len, stdin);
      if (got == 0) break;
      len += got;
    }
    if (len % isz != 0) {
      fprintf(stderr,
              "kdpeers predict: standard input holds %zu bytes, not a multiple of one image "
              "(%zux%zux%zu = %zu bytes)\n",
              len, lm.in.H, lm.in.W, lm.in.C, isz);
      rc = 1;
    }
    count = len / isz;
  } else {
    /* an IDX image file (raw or .gz); predictions need no labels, so only the image header is
       read here */
    gzFile f = gzopen(input, "rb");
    uint8_t hdr[16];
    if (!f || gzread(f, hdr, 16) != 16 || hdr[0] != 0 || hdr[1] != 0 || hdr[2] != 8 ||
        hdr[3] != 3) {
      fprintf(stderr, "kdpeers predict: %s is not an IDX image file (magic 0x00000803)%s%s\n",
              input, f ? "" : ": ", f ? "" : strerror(errno));
      rc = 1;
    } else {
      count = (size_t)hdr[4] << 24 | (size_t)hdr[5] << 16 | (size_t)hdr[6] << 8 | hdr[7];
      size_t hh = (size_t)hdr[8] << 24 | (size_t)hdr[9] << 16 | (size_t)hdr[10] << 8 | hdr[11];
      size_t ww = (size_t)hdr[12] << 24 | (size_t)hdr[13] << 16 | (size_t)hdr[14] << 8 | hdr[15];
      if (hh != lm.in.H || ww != lm.in.W || lm.in.C != 1) {
        fprintf(stderr, "kdpeers predict: %s holds %zux%zu images, the model takes %zux%zux%zu\n",
                input, hh, ww, lm.in.H, lm.in.W, lm.in.C);
        rc = 1;
      } else if (count > ((size_t)1 << 31) / isz) {
        fprintf(stderr, "kdpeers predict: %s claims %zu images\n", input, count);
        rc = 1;
      } else {
        pix = kdp_xmalloc(count * isz + 1);
        if ((size_t)gzread(f, pix, (unsigned)(count * isz)) != count * isz) {
          fprintf(stderr, "kdpeers predict: %s is truncated\n", input);
          rc = 1;
        }
      }
    }
    if (f) gzclose(f);
  }
  if (rc == 0) {
    kdp_dataset ds = {.n = count, .H = lm.in.H, .W = lm.in.W, .C = lm.in.C, .n_classes = C,
                      .images = pix, .labels = kdp_xcalloc(count ? count : 1, 1), .owns = 0};
    float *x = kdp_falloc(TOOL_BATCH * isz), *p = kdp_falloc(TOOL_BATCH * C);
    int32_t *y = kdp_xcalloc(TOOL_BATCH, sizeof(int32_t));
    for (size_t first = 0; first < count; first += TOOL_BATCH) {
      size_t b = count - first < TOOL_BATCH ? count - first : TOOL_BATCH;
      kdp_dataset_get(&ds, first, b, lm.mean, lm.std, x, y);
      model_probs(&lm, x, b, p);
      for (size_t r = 0; r < b; r++) {
        const float *row = p + r * C;
        size_t am = 0;
        for (size_t k = 1; k < C; k++)
          if (row[k] > row[am]) am = k;
        printf("%zu %zu", first + r, am);
        if (!top_only)
          for (size_t k = 0; k < C; k++) printf(" %.5f", (double)row[k]);
        putchar('\n');
      }
      if (fflush(stdout) != 0) { /* e.g. | head: stop (SIGPIPE is ignored, see main) */
        fprintf(stderr, "kdpeers predict: writing the output: %s\n", strerror(errno));
        rc = 1;
        break;
      }
    }
    free(ds.labels);
    free(x);
    free(p);
    free(y);
  }
  free(pix);
  loaded_free(&lm);
  return rc;
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
  int n = load_models(run_dir, -1, lm, KDP_MAX_PEERS, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    return 1;
  }
  size_t isz = lm[0].in.H * lm[0].in.W * lm[0].in.C, C = lm[0].in.n_classes;
  kdp_server_options o;
  kdp_server_strings str;
  kdp_config c2 = *cfg;
  snprintf(c2.dir, sizeof c2.dir, "%s", run_dir); /* server.addr goes to the served run */
  kdp_train_server_options(&c2, &o, &str);
  o.input_dim = (int)isz;
  kdp_server *srv = NULL;
  if (kdp_server_start(&srv, &o, &err) != 0) {
    fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    for (int i = 0; i < n; i++) loaded_free(&lm[i]);
    return 1;
  }
  fprintf(stderr, "kdpeers serve: %d peer%s of %s on %s (alone: no method teacher; run under "
                  "mpirun with the run's rank count for it)\n",
          n, n == 1 ? "" : "s", run_dir, kdp_server_address(srv));
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = serve_on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGUSR1, &sa, NULL);
  char status[512];
  snprintf(status, sizeof status,
           "{\"mode\":\"serve\",\"run_dir\":\"%s\",\"peers\":%d,\"classes\":%zu,\"input_dim\":%zu}",
           run_dir, n, C, isz);
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
      model_probs(&lm[i], x, b, p);
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
