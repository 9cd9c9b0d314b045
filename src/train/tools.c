/* tools.c: the artefact commands: inspect a checkpoint or model file, export a standalone
   student, evaluate a model or a whole run, predict labels for images. */
#include "kdpeers/tools.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
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
  char *class_names; /* "name\n" per class (image-folder datasets), or NULL */
} loaded_model;

static void loaded_free(loaded_model *lm) {
  kdp_model_free(lm->m);
  free(lm->class_names);
  lm->m = NULL;
  lm->class_names = NULL;
}

/* the name of class k in a "a\nb\n" list, written into buf ("" if none) */
static const char *class_name(const char *names, size_t k, char *buf, size_t n) {
  buf[0] = 0;
  for (const char *p = names; p && *p; k--) {
    const char *nl = strchr(p, '\n');
    size_t len = nl ? (size_t)(nl - p) : strlen(p);
    if (k == 0) {
      snprintf(buf, n, "%.*s", (int)len, p);
      break;
    }
    if (!nl) break;
    p = nl + 1;
  }
  return buf;
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
  /* class names: optional (models of image-folder datasets; absent in older files) */
  const char *names = NULL;
  if (kdp_ckpt_has(ck, "class_names")) {
    size_t k = 0;
    rc = kdp_ckpt_get_str(ck, "class_names", &names, err);
    for (const char *q = names; rc == 0 && *q; q++) k += *q == '\n';
    if (rc == 0 && k != (size_t)classes)
      return kdp_fail(err, KDP_EFORMAT, "%s: class_names lists %zu names for %lld classes", path,
                      k, (long long)classes);
    if (rc != 0) return rc;
  }
  /* the file's parameters must fit the architecture before anything is allocated for it (a
     damaged arch string could otherwise ask for terabytes) */
  kdp_model_memory plan;
  kdp_ckpt_info pinfo;
  rc = kdp_model_plan(arch, lm->in, TOOL_BATCH, &plan, err);
  if (rc == 0) rc = kdp_ckpt_info_of(ck, "params", &pinfo, err);
  if (rc == 0 && pinfo.count != plan.n_params)
    rc = kdp_fail(err, KDP_EFORMAT, "%s: holds %zu parameters, its arch '%s' has %zu", path,
                  pinfo.count, arch, plan.n_params);
  if (rc == 0) rc = kdp_model_create(&lm->m, arch, lm->in, TOOL_BATCH, err);
  if (rc != 0) return rc;
  if (names) lm->class_names = strdup(names);
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
  if (lm.class_names) PUT(kdp_ckpt_put_str(w, "class_names", lm.class_names, &err));
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

/* raw uint8 pixels (H x W x C per image) on standard input */
static int predict_stdin(const loaded_model *lm, kdp_dataset *ds, kdp_error *err) {
  size_t isz = lm->in.H * lm->in.W * lm->in.C, cap = 0, len = 0;
  uint8_t *pix = NULL;
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
  ds->images = pix;
  ds->n = len / isz;
  if (len % isz != 0)
    return kdp_fail(err, KDP_EINVAL,
                    "standard input holds %zu bytes, not a multiple of one image (%zux%zux%zu = "
                    "%zu bytes)",
                    len, lm->in.H, lm->in.W, lm->in.C, isz);
  return 0;
}

/* an IDX image file (raw or .gz); predictions need no labels, so only the image header is read */
static int predict_idx(const loaded_model *lm, const char *input, kdp_dataset *ds,
                       kdp_error *err) {
  size_t isz = lm->in.H * lm->in.W * lm->in.C;
  gzFile f = gzopen(input, "rb");
  uint8_t hdr[16];
  int rc = 0;
  if (!f || gzread(f, hdr, 16) != 16 || hdr[0] != 0 || hdr[1] != 0 || hdr[2] != 8 || hdr[3] != 3) {
    rc = kdp_fail(err, KDP_EFORMAT,
                  "%s is not an IDX image file (magic 0x00000803), a .npy or a .png%s%s", input,
                  f ? "" : ": ", f ? "" : strerror(errno));
  } else {
    size_t count = (size_t)hdr[4] << 24 | (size_t)hdr[5] << 16 | (size_t)hdr[6] << 8 | hdr[7];
    size_t hh = (size_t)hdr[8] << 24 | (size_t)hdr[9] << 16 | (size_t)hdr[10] << 8 | hdr[11];
    size_t ww = (size_t)hdr[12] << 24 | (size_t)hdr[13] << 16 | (size_t)hdr[14] << 8 | hdr[15];
    if (hh != lm->in.H || ww != lm->in.W || lm->in.C != 1) {
      rc = kdp_fail(err, KDP_EINVAL, "%s holds %zux%zu images, the model takes %zux%zux%zu",
                    input, hh, ww, lm->in.H, lm->in.W, lm->in.C);
    } else if (count > ((size_t)1 << 31) / isz) {
      rc = kdp_fail(err, KDP_EFORMAT, "%s claims %zu images", input, count);
    } else {
      ds->images = kdp_xmalloc(count * isz + 1);
      ds->n = count;
      if ((size_t)gzread(f, ds->images, (unsigned)(count * isz)) != count * isz)
        rc = kdp_fail(err, KDP_EIO, "%s is truncated", input);
    }
  }
  if (f) gzclose(f);
  return rc;
}

/* the images of every input, as one dataset of the model's shape: IDX files, .npy image arrays,
   .png files, or "-" (raw pixels on stdin) */
static int predict_inputs(const loaded_model *lm, const char *const *inputs, int n_inputs,
                          kdp_dataset *out, kdp_error *err) {
  size_t isz = lm->in.H * lm->in.W * lm->in.C;
  memset(out, 0, sizeof *out);
  out->H = lm->in.H;
  out->W = lm->in.W;
  out->C = lm->in.C;
  out->n_classes = lm->in.n_classes;
  out->owns = 1;
  int rc = 0;
  size_t cap = 0;
  for (int i = 0; i < n_inputs && rc == 0; i++) {
    const char *in = inputs[i];
    size_t len = strlen(in);
    kdp_dataset one;
    memset(&one, 0, sizeof one);
    if (strcmp(in, "-") == 0) {
      rc = predict_stdin(lm, &one, err);
      one.owns = 1;
    } else if (len > 4 && strcasecmp(in + len - 4, ".png") == 0) {
      one.images = kdp_xmalloc(isz);
      one.n = 1;
      one.owns = 1;
      rc = kdp_png_read(in, lm->in.H, lm->in.W, lm->in.C, one.images, err);
    } else if (len > 4 && strcasecmp(in + len - 4, ".npy") == 0) {
      rc = kdp_npy_load_images(&one, in, err);
      if (rc == 0 && (one.H != lm->in.H || one.W != lm->in.W || one.C != lm->in.C))
        rc = kdp_fail(err, KDP_EINVAL, "%s holds %zux%zux%zu images, the model takes %zux%zux%zu",
                      in, one.H, one.W, one.C, lm->in.H, lm->in.W, lm->in.C);
    } else {
      rc = predict_idx(lm, in, &one, err);
      one.owns = 1;
    }
    size_t elem = kdp_dataset_elem(&one);
    if (rc == 0 && out->n > 0 && elem != kdp_dataset_elem(out))
      rc = kdp_fail(err, KDP_EINVAL, "%s: float32 and uint8 inputs cannot be mixed", in);
    if (rc == 0 && one.n > 0) {
      out->elem = elem;
      if (out->n + one.n > cap) {
        cap = 2 * (out->n + one.n);
        out->images = realloc(out->images, cap * isz * elem);
        if (!out->images) abort();
      }
      memcpy(out->images + out->n * isz * elem, one.images, one.n * isz * elem);
      out->n += one.n;
    }
    kdp_dataset_free(&one);
  }
  out->labels = kdp_xcalloc(out->n ? out->n : 1, 1);
  return rc;
}

int kdp_tool_predict(const char *model_path, const char *const *inputs, int n_inputs,
                     int top_only) {
  kdp_error err;
  loaded_model lm;
  int n = load_models(model_path, 0, &lm, 1, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers predict: %s\n", err.msg);
    return 1;
  }
  size_t isz = lm.in.H * lm.in.W * lm.in.C, C = lm.in.n_classes;
  kdp_dataset ds;
  int rc = predict_inputs(&lm, inputs, n_inputs, &ds, &err);
  if (rc != 0) fprintf(stderr, "kdpeers predict: %s\n", err.msg);
  if (rc == 0) {
    float *x = kdp_falloc(TOOL_BATCH * isz), *p = kdp_falloc(TOOL_BATCH * C);
    int32_t *y = kdp_xcalloc(TOOL_BATCH, sizeof(int32_t));
    char name[256];
    for (size_t first = 0; first < ds.n; first += TOOL_BATCH) {
      size_t b = ds.n - first < TOOL_BATCH ? ds.n - first : TOOL_BATCH;
      kdp_dataset_get(&ds, first, b, lm.mean, lm.std, x, y);
      model_probs(&lm, x, b, p);
      for (size_t r = 0; r < b; r++) {
        const float *row = p + r * C;
        size_t am = 0;
        for (size_t k = 1; k < C; k++)
          if (row[k] > row[am]) am = k;
        printf("%zu %zu", first + r, am);
        if (lm.class_names) printf(" %s", class_name(lm.class_names, am, name, sizeof name));
        if (!top_only)
          for (size_t k = 0; k < C; k++) printf(" %.5f", (double)row[k]);
        putchar('\n');
      }
    }
    free(x);
    free(p);
    free(y);
  }
  kdp_dataset_free(&ds);
  loaded_free(&lm);
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
  int n = load_models(run_dir, -1, lm, KDP_MAX_PEERS, &err);
  if (n < 0) {
    fprintf(stderr, "kdpeers serve: %s\n", err.msg);
    return 1;
  }
  size_t isz = lm[0].in.H * lm[0].in.W * lm[0].in.C, C = lm[0].in.n_classes;
  kdp_server_options o;
  kdp_server_options_defaults(&o);
  char addr_file[KDP_PATH + 32];
  snprintf(addr_file, sizeof addr_file, "%s/server.addr", run_dir);
  o.listen = cfg->server_listen;
  o.port = cfg->server_port;
  o.token = cfg->server_token[0] ? cfg->server_token : NULL;
  o.addr_file = addr_file;
  o.max_body = (size_t)cfg->server_max_body;
  o.max_connections = cfg->server_max_connections;
  o.idle_timeout = cfg->server_idle_timeout;
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
