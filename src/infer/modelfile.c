/* modelfile.c: .kdpm model files (format 1: flat vectors; format 2: PyTorch's named tensors), read
   and written through the checkpoint container, and predictions on raw pixels. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/data.h"
#include "kdpeers/infer.h"
#include "kdpeers/kd.h"

static const char *const MNAMES[6] = {"mean0", "mean1", "mean2", "std0", "std1", "std2"};

static int prefixed(kdp_error *err, int rc, const char *path) {
  kdp_error e2 = *err;
  return kdp_fail(err, rc, "%s: %s", path, e2.msg);
}

/* format 2: every tensor by its PyTorch name, with PyTorch's shape */
static int read_named(kdp_modelfile *mf, const kdp_ckpt *ck, kdp_error *err) {
  kdp_model *m = mf->m;
  size_t cap = 0;
  for (size_t i = 0; i < kdp_model_n_tensors(m); i++)
    if (kdp_model_tensor_size(m, i) > cap) cap = kdp_model_tensor_size(m, i);
  float *tmp = kdp_falloc(cap ? cap : 1);
  int rc = 0;
  for (size_t i = 0; i < kdp_model_n_tensors(m) && rc == 0; i++) {
    const char *name = kdp_model_tensor_name(m, i);
    size_t dims[4], nd = kdp_model_tensor_shape(m, i, dims);
    kdp_ckpt_info info;
    rc = kdp_ckpt_info_of(ck, name, &info, err);
    if (rc == 0 && info.type != KDP_CKPT_F32)
      rc = kdp_fail(err, KDP_EFORMAT, "tensor '%s' is not float32", name);
    int same = rc == 0 && info.ndim == nd;
    for (size_t k = 0; same && k < nd; k++) same = info.dims[k] == dims[k];
    if (rc == 0 && !same)
      rc = kdp_fail(err, KDP_EFORMAT,
                    "tensor '%s' has another shape than %s's (%zu dims, expected %zu: %zu x %zu x "
                    "%zu x %zu)",
                    name, kdp_model_arch(m), info.ndim, nd, dims[0], dims[1], dims[2], dims[3]);
    if (rc == 0) rc = kdp_ckpt_get_f32(ck, name, tmp, kdp_model_tensor_size(m, i), err);
    if (rc == 0) kdp_model_tensor_from_torch(m, i, tmp);
  }
  float *buf = kdp_model_buffers(m);
  for (size_t i = 0; i < kdp_model_n_buffer_tensors(m) && rc == 0; i++)
    rc = kdp_ckpt_get_f32(ck, kdp_model_buffer_name(m, i), buf + kdp_model_buffer_offset(m, i),
                          kdp_model_buffer_size(m, i), err);
  free(tmp);
  return rc;
}

static double g_memory_limit = 0; /* bytes; 0: the machine's physical memory */

void kdp_modelfile_set_memory_limit(double bytes) { g_memory_limit = bytes; }

static double memory_limit(void) {
  if (g_memory_limit > 0) return g_memory_limit;
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? (double)pages * (double)page : 1e300;
}

/* The file's weights must fit the architecture before anything is allocated for it (a damaged
   arch string could otherwise ask for terabytes): the flat "params" vector, or the sum of the
   named f32 tensors of format 2, against the model's plan. And the model must fit in memory at
   max_batch: a few weights can still ask for terabytes of activations (a damaged input shape, a
   wide conv on a 4096 x 4096 image), which kdp_falloc would answer by aborting. */
static int check_plan(const kdp_ckpt *ck, const char *arch, kdp_input_shape in, size_t max_batch,
                      kdp_error *err) {
  kdp_model_memory plan;
  int rc = kdp_model_plan_infer(arch, in, max_batch, &plan, err);
  if (rc != 0) return rc;
  size_t have = 0, want = plan.n_params;
  if (kdp_ckpt_has(ck, "params")) {
    kdp_ckpt_info info;
    rc = kdp_ckpt_info_of(ck, "params", &info, err);
    if (rc != 0) return rc;
    have = info.count;
  } else {
    want += plan.n_buffers;
    for (size_t i = 0; i < kdp_ckpt_count(ck); i++) {
      kdp_ckpt_info info;
      if (kdp_ckpt_entry(ck, i, &info) == 0 && info.type == KDP_CKPT_F32) have += info.count;
    }
  }
  if (have != want)
    return kdp_fail(err, KDP_EFORMAT, "holds %zu %s, its arch '%s' has %zu", have,
                    kdp_ckpt_has(ck, "params") ? "parameters" : "tensor values (parameters and "
                                                                "batchnorm statistics)",
                    arch, want);
  /* parameters (and their packed copy), activations, the normalised input batch */
  double need = 2.0 * plan.params_bytes + plan.activation_bytes +
                4.0 * (double)max_batch * (double)(in.H * in.W * in.C);
  if (need > memory_limit())
    return kdp_fail(err, KDP_EFORMAT,
                    "arch '%s' on %zux%zux%zu images needs %.3g GiB at batches of %zu images, "
                    "more than the %.3g GiB of memory here (a damaged file, or a smaller --batch)",
                    arch, in.H, in.W, in.C, need / 1073741824.0, max_batch,
                    memory_limit() / 1073741824.0);
  return 0;
}

int kdp_modelfile_from_ckpt(kdp_modelfile *mf, const kdp_ckpt *ck, const char *path,
                            size_t max_batch, kdp_error *err) {
  memset(mf, 0, sizeof *mf);
  snprintf(mf->label, sizeof mf->label, "model");
  const char *arch = NULL, *names = NULL;
  int64_t h = 0, w = 0, c = 0, classes = 0;
  uint64_t format = 1;
  double mv[6] = {0, 0, 0, 1, 1, 1};
  int rc = kdp_ckpt_get_str(ck, "arch", &arch, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_h", &h, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_w", &w, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "input_c", &c, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "classes", &classes, err);
  for (int i = 0; i < 6 && rc == 0; i++) rc = kdp_ckpt_get_f64(ck, MNAMES[i], &mv[i], err);
  if (rc == 0 && kdp_ckpt_has(ck, "model_format"))
    rc = kdp_ckpt_get_u64(ck, "model_format", &format, err);
  if (rc != 0) return prefixed(err, rc, path);
  if (format > KDP_MODEL_FORMAT)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: model format %llu was written by a newer kdpeers (this one reads 1..%d)",
                    path, (unsigned long long)format, KDP_MODEL_FORMAT);
  if (h <= 0 || w <= 0 || c <= 0 || c > 3 || classes < 2 || h > 4096 || w > 4096 ||
      classes > 100000)
    return kdp_fail(err, KDP_EFORMAT, "%s: implausible input shape %lldx%lldx%lld, %lld classes",
                    path, (long long)h, (long long)w, (long long)c, (long long)classes);
  mf->in = (kdp_input_shape){(size_t)h, (size_t)w, (size_t)c, (size_t)classes};
  for (int i = 0; i < 3; i++) {
    mf->mean[i] = (float)mv[i];
    mf->std[i] = (float)mv[3 + i];
  }
  rc = check_plan(ck, arch, mf->in, max_batch, err);
  if (rc != 0) return prefixed(err, rc, path);
  rc = kdp_model_create_infer(&mf->m, arch, mf->in, max_batch, err);
  if (rc != 0) return prefixed(err, rc, path);
  mf->max_batch = max_batch;
  mf->x = kdp_falloc(max_batch * (size_t)(h * w * c));
  /* the flat vectors (format 1 and run checkpoints) or the named tensors (format 2) */
  if (kdp_ckpt_has(ck, "params")) {
    mf->format = strcmp(kdp_ckpt_kind(ck), "model") == 0 ? 1 : 0;
    rc = kdp_ckpt_get_f32(ck, "params", kdp_model_params(mf->m), kdp_model_n_params(mf->m), err);
    if (rc == 0)
      rc = kdp_ckpt_get_f32(ck, "buffers", kdp_model_buffers(mf->m), kdp_model_n_buffers(mf->m),
                            err);
  } else {
    mf->format = (int)format;
    rc = read_named(mf, ck, err);
  }
  if (rc == 0 && kdp_ckpt_has(ck, "class_names")) {
    rc = kdp_ckpt_get_str(ck, "class_names", &names, err);
    if (rc == 0) rc = kdp_modelfile_set_class_names(mf, names, '\n', err);
  }
  if (rc != 0) {
    kdp_modelfile_free(mf);
    return prefixed(err, rc, path);
  }
  return 0;
}

int kdp_modelfile_read(kdp_modelfile *mf, const char *path, size_t max_batch, kdp_error *err) {
  memset(mf, 0, sizeof *mf);
  kdp_ckpt *ck = NULL;
  int rc = kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, err);
  if (rc != 0) return rc;
  if (strcmp(kdp_ckpt_kind(ck), "model") != 0)
    rc = kdp_fail(err, KDP_EFORMAT,
                  "%s is a '%s' file, not a model file (make one with kdpeers export RUN_DIR "
                  "--peer N -o student.kdpm)",
                  path, kdp_ckpt_kind(ck));
  else
    rc = kdp_modelfile_from_ckpt(mf, ck, path, max_batch, err);
  kdp_ckpt_free(ck);
  return rc;
}

void kdp_modelfile_free(kdp_modelfile *mf) {
  kdp_model_free(mf->m);
  mf->m = NULL;
  if (mf->class_names)
    for (size_t i = 0; i < mf->in.n_classes; i++) free(mf->class_names[i]);
  free(mf->class_names);
  mf->class_names = NULL;
  free(mf->x);
  mf->x = NULL;
}

int kdp_modelfile_set_class_names(kdp_modelfile *mf, const char *list, char sep, kdp_error *err) {
  size_t C = mf->in.n_classes, n = 0;
  char **names = kdp_xcalloc(C, sizeof *names);
  const char *s = list;
  int rc = 0;
  while (rc == 0) {
    const char *end = strchr(s, sep);
    size_t len = end ? (size_t)(end - s) : strlen(s);
    if (n == C) {
      rc = kdp_fail(err, KDP_EINVAL, "more than %zu class names in '%.60s'", C, list);
      break;
    }
    if (!kdp_class_name_ok(s, len)) {
      rc = kdp_fail(err, KDP_EINVAL,
                    "class name %zu of '%.60s' is empty, longer than %d bytes or has a control "
                    "character or a quote",
                    n, list, KDP_MAX_CLASS_NAME - 1);
      break;
    }
    names[n++] = strndup(s, len);
    if (!end || (sep == '\n' && !end[1])) break; /* the end; a name per line ends in \n */
    s = end + 1;
  }
  if (rc == 0 && n != C)
    rc = kdp_fail(err, KDP_EINVAL, "%zu class names for %zu classes", n, C);
  if (rc != 0) {
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
  }
  if (mf->class_names)
    for (size_t i = 0; i < C; i++) free(mf->class_names[i]);
  free(mf->class_names);
  mf->class_names = names;
  return 0;
}

int kdp_modelfile_write(const kdp_modelfile *mf, const char *path, const char *source,
                        int64_t source_peer, kdp_error *err) {
  kdp_model *m = mf->m;
  kdp_ckpt_writer *w = NULL;
  int rc = kdp_ckpt_writer_open(&w, path, "model", err);
#define PUT(call) \
  if (rc == 0) rc = (call)
  PUT(kdp_ckpt_put_u64(w, "model_format", KDP_MODEL_FORMAT, err));
  PUT(kdp_ckpt_put_str(w, "arch", kdp_model_arch(m), err));
  PUT(kdp_ckpt_put_i64(w, "input_h", (int64_t)mf->in.H, err));
  PUT(kdp_ckpt_put_i64(w, "input_w", (int64_t)mf->in.W, err));
  PUT(kdp_ckpt_put_i64(w, "input_c", (int64_t)mf->in.C, err));
  PUT(kdp_ckpt_put_i64(w, "classes", (int64_t)mf->in.n_classes, err));
  for (int i = 0; i < 6; i++)
    PUT(kdp_ckpt_put_f64(w, MNAMES[i], i < 3 ? mf->mean[i] : mf->std[i - 3], err));
  if (mf->class_names) {
    /* one name per line, each ending in a newline (as a run's checkpoint stores them) */
    size_t len = 0;
    for (size_t i = 0; i < mf->in.n_classes; i++) len += strlen(mf->class_names[i]) + 1;
    char *list = kdp_xcalloc(len + 1, 1);
    for (size_t i = 0; i < mf->in.n_classes; i++) {
      strcat(list, mf->class_names[i]);
      strcat(list, "\n");
    }
    PUT(kdp_ckpt_put_str(w, "class_names", list, err));
    free(list);
  }
  PUT(kdp_ckpt_put_str(w, "source", source, err));
  PUT(kdp_ckpt_put_i64(w, "source_peer", source_peer, err));
  PUT(kdp_ckpt_put_str(w, "kdpeers_version", KDP_VERSION, err));
  PUT(kdp_ckpt_put_str(w, "layout", "pytorch state_dict: conv weights (out, in, kh, kw), dense "
                                    "(out, in), batchnorm running stats as buffers", err));
  /* the state_dict order: per op its weight and bias, then a batchnorm's running stats */
  size_t cap = 1;
  for (size_t i = 0; i < kdp_model_n_tensors(m); i++)
    if (kdp_model_tensor_size(m, i) > cap) cap = kdp_model_tensor_size(m, i);
  float *tmp = kdp_falloc(cap);
  const float *buf = kdp_model_buffers(m);
  for (size_t i = 0; i < kdp_model_n_ops(m) && rc == 0; i++) {
    kdp_op_info o;
    kdp_model_op(m, i, &o);
    size_t t[2] = {o.weight, o.bias}, b[2] = {o.running_mean, o.running_var};
    for (int k = 0; k < 2 && rc == 0; k++) {
      if (t[k] == KDP_NO_TENSOR) continue;
      size_t dims[4], nd = kdp_model_tensor_shape(m, t[k], dims);
      kdp_model_tensor_to_torch(m, t[k], tmp);
      rc = kdp_ckpt_put_f32(w, kdp_model_tensor_name(m, t[k]), tmp, nd, dims, err);
    }
    for (int k = 0; k < 2 && rc == 0; k++) {
      if (b[k] == KDP_NO_TENSOR) continue;
      size_t n = kdp_model_buffer_size(m, b[k]);
      rc = kdp_ckpt_put_f32(w, kdp_model_buffer_name(m, b[k]), buf + kdp_model_buffer_offset(m, b[k]),
                            1, &n, err);
    }
  }
  free(tmp);
#undef PUT
  if (!w) return rc;
  if (rc != 0) {
    kdp_ckpt_writer_abort(w);
    return rc;
  }
  return kdp_ckpt_writer_commit(w, NULL, err);
}

void kdp_modelfile_predict(kdp_modelfile *mf, const uint8_t *pix, size_t elem, size_t n,
                           float *probs) {
  size_t C = mf->in.n_classes;
  kdp_dataset ds = {.n = n, .H = mf->in.H, .W = mf->in.W, .C = mf->in.C, .n_classes = C,
                    .images = (uint8_t *)pix, .labels = NULL, .owns = 0, .elem = elem};
  for (size_t first = 0; first < n; first += mf->max_batch) {
    size_t b = n - first < mf->max_batch ? n - first : mf->max_batch;
    kdp_dataset_get(&ds, first, b, mf->mean, mf->std, mf->x, NULL);
    const float *z = kdp_model_forward(mf->m, mf->x, b, 0, NULL);
    kdp_softmax_t(probs + first * C, z, b, C, 1.0f);
  }
}
