/* test_golden.c: the model zoo (mlp, cnn) and SGD against PyTorch 1.13, from the golden files
   written by tests/gen_golden.py (see its docstring for the records and how to regenerate). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "testutil.h"

/*
 * Tolerances. Both sides compute in float32 with different summation orders (BLAS blocking,
 * naive loops, PyTorch's own kernels), so they differ by a few float32 rounding errors of the
 * sums. gen_golden.py measures PyTorch's own float32 error against the same computation in
 * float64 and stores it as f32err.REC; every absolute tolerance below is BASE + 10 * f32err.REC,
 * which matters where cancellation makes rounding large: the conv1 gradient goes back through
 * two batchnorms over N = 6272 and 1568 rows (f32err ~4e-6 on values ~0.1), and conv biases in
 * front of a batchnorm have an exact gradient of 0, so their golden values are rounding noise.
 * A real bug (wrong index, missing term, wrong layout) gives errors of the size of the values.
 */
#define TOL_FWD_ATOL 1e-5   /* logits, features: sums of <= 3136 products of O(1) values */
#define TOL_FWD_RTOL 1e-4
#define TOL_LOSS_ATOL 1e-5  /* CE of logits that agree to ~1e-6 */
#define TOL_LOSS_RTOL 1e-5
#define TOL_DZ_ATOL 1e-6    /* (softmax - onehot) / B, values <= 0.125 */
#define TOL_DZ_RTOL 1e-4
#define TOL_GRAD_ATOL 1e-6  /* gradients, values 1e-3 .. 0.4 */
#define TOL_GRAD_RTOL 1e-3
#define TOL_BUF_ATOL 1e-6   /* BN running stats after one momentum-0.1 update */
#define TOL_BUF_RTOL 1e-4
/* after 5 SGD steps the rounding differences of each step are carried along (the cnn's loss
   jumps to ~19 at step 3 with lr 0.05, which amplifies them; f32err accounts for it) */
#define TOL_STEP_ATOL 1e-5
#define TOL_STEP_RTOL 1e-4

#define B_GOLD 8

/* Repeats golden_hash()/paramgen() of gen_golden.py: value i = float32(k) * scale. */
static void paramgen(float *dst, size_t n, uint32_t seed, float scale) {
  for (size_t i = 0; i < n; i++) {
    uint32_t x = (uint32_t)i * 0x9E3779B1u + seed * 0x85EBCA77u + 0x165667B1u;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    x *= 0x297A2D39u;
    x ^= x >> 15;
    int32_t k = (int32_t)(x >> 8) - 8388608;
    dst[i] = (float)k * scale;
  }
}

static double f32err(const kdp_golden *g, const char *rec) {
  char name[300];
  snprintf(name, sizeof name, "f32err.%.256s", rec);
  return (double)kdp_golden_get(g, name)->data[0];
}

/* Mismatches are collected so that one run names every tensor that is off (the first wrong
   layer explains the rest); run_golden fails at the end of each phase if there were any. */
static char g_fail[4096];
static int g_nfail;

static void note(const char *what, const float *a, const float *b, size_t n, double atol,
                 double rtol) {
  size_t w = 0;
  double e = kdp_test_maxerr(a, b, n, atol, rtol, &w);
  if (getenv("KDP_TEST_VERBOSE"))
    fprintf(stderr, "  %-48s err/tol %.3g (index %zu)\n", what, e, w);
  if (e <= 1.0) return;
  size_t len = strlen(g_fail);
  if (g_nfail++ < 12)
    snprintf(g_fail + len, sizeof g_fail - len,
             "\n  %s: mismatch at index %zu of %zu: got %.8g, expected %.8g (atol %g, rtol %g)",
             what, w, n, (double)a[w], (double)b[w], atol, rtol);
}

static void fail_if_any(const char *tag, const char *phase) {
  ck_assert_msg(g_nfail == 0, "%s, %s: %d tensors differ from PyTorch:%s", tag, phase, g_nfail,
                g_fail);
}

/* Compares a against golden record rec (n floats must match), atol = base + 10 * f32err. */
static void check_rec(const kdp_golden *g, const char *tag, const char *rec, const float *a,
                      size_t n, double atol, double rtol) {
  const kdp_golden_rec *r = kdp_golden_get(g, rec);
  ck_assert_msg(r->n == n, "%s: %s has %zu values in the golden file, the model has %zu", tag,
                rec, r->n, n);
  (void)tag;
  note(rec, a, r->data, n, atol + 10.0 * f32err(g, rec), rtol);
}

/* Writes param.NAME / paramgen.NAME into the arena; checks that the golden parameter records
   name exactly the model's tensors, in arena order, and that the views tile the arena. */
static void load_params(const kdp_golden *g, kdp_model *m, const char *tag) {
  float *p = kdp_model_params(m);
  size_t nt = kdp_model_n_tensors(m), gi = 0, off = 0;
  for (size_t i = 0; i < nt; i++) {
    const char *name = kdp_model_tensor_name(m, i);
    size_t sz = kdp_model_tensor_size(m, i);
    ck_assert_msg(kdp_model_tensor_offset(m, i) == off,
                  "%s: tensor %zu (%s) at offset %zu, expected %zu (views must tile the arena)",
                  tag, i, name, kdp_model_tensor_offset(m, i), off);
    off += sz;
    /* the i-th golden param record must be this tensor */
    while (gi < g->n && strncmp(g->recs[gi].name, "param.", 6) != 0 &&
           strncmp(g->recs[gi].name, "paramgen.", 9) != 0)
      gi++;
    ck_assert_msg(gi < g->n, "%s: model tensor %zu '%s' has no golden parameter", tag, i, name);
    const char *gname = strchr(g->recs[gi].name, '.') + 1;
    ck_assert_msg(strcmp(gname, name) == 0,
                  "%s: model tensor %zu is '%s', PyTorch's tensor %zu is '%s'", tag, i, name, i,
                  gname);
    const kdp_golden_rec *r = &g->recs[gi++];
    float *dst = p + kdp_model_tensor_offset(m, i);
    if (strncmp(r->name, "paramgen.", 9) == 0) {
      paramgen(dst, sz, (uint32_t)r->data[0], r->data[1]);
      char hn[256];
      snprintf(hn, sizeof hn, "paramgen_head.%s", name);
      const kdp_golden_rec *h = kdp_golden_get(g, hn);
      for (size_t j = 0; j < h->n && j < sz; j++)
        ck_assert_msg(dst[j] == h->data[j], "%s: paramgen of %s differs from Python at %zu", tag,
                      name, j);
    } else {
      ck_assert_msg(r->n == sz, "%s: %s has %zu values in PyTorch, %zu in the model", tag, name,
                    r->n, sz);
      memcpy(dst, r->data, sz * sizeof(float));
    }
  }
  ck_assert_msg(off == kdp_model_n_params(m), "%s: tensors cover %zu of %zu params", tag, off,
                kdp_model_n_params(m));
  for (; gi < g->n; gi++)
    ck_assert_msg(strncmp(g->recs[gi].name, "param.", 6) != 0 &&
                      strncmp(g->recs[gi].name, "paramgen.", 9) != 0,
                  "%s: PyTorch tensor %s is not in the model", tag, g->recs[gi].name);
}

/* Number of golden records named PREFIX*. */
static size_t count_prefix(const kdp_golden *g, const char *prefix) {
  size_t n = 0;
  for (size_t i = 0; i < g->n; i++)
    if (strncmp(g->recs[i].name, prefix, strlen(prefix)) == 0) n++;
  return n;
}

/* BN running stats by name (kdp_model_buffer_name): copies golden PREFIX.NAME into the model
   (load != 0) or compares them. The named views must tile kdp_model_buffers(). */
static void model_buffers(const kdp_golden *g, kdp_model *m, const char *tag, const char *prefix,
                          int load) {
  float *buf = kdp_model_buffers(m);
  size_t nb = kdp_model_n_buffer_tensors(m), off = 0;
  ck_assert_msg(nb == count_prefix(g, prefix), "%s: model has %zu buffer tensors, PyTorch %zu",
                tag, nb, count_prefix(g, prefix));
  for (size_t j = 0; j < nb; j++) {
    const char *name = kdp_model_buffer_name(m, j);
    ck_assert_msg(kdp_model_buffer_offset(m, j) == off, "%s: buffer %s at %zu, expected %zu", tag,
                  name, kdp_model_buffer_offset(m, j), off);
    char rn[256];
    snprintf(rn, sizeof rn, "%s%s", prefix, name);
    const kdp_golden_rec *r = kdp_golden_get(g, rn);
    ck_assert_msg(off + r->n <= kdp_model_n_buffers(m), "%s: %s does not fit the buffers", tag, rn);
    if (load)
      memcpy(buf + off, r->data, r->n * sizeof(float));
    else
      check_rec(g, tag, rn, buf + off, r->n, TOL_BUF_ATOL, TOL_BUF_RTOL);
    off += r->n;
  }
  ck_assert_msg(off == kdp_model_n_buffers(m), "%s: buffer views cover %zu of %zu floats", tag,
                off, kdp_model_n_buffers(m));
}

typedef struct golden_ctx {
  kdp_golden *g;
  kdp_model *m;
  const float *x;
  int32_t *y;
  size_t B, C;
  float *dz;
} golden_ctx;

static void ctx_open(golden_ctx *c, const char *file, const char *arch, int naive) {
  memset(c, 0, sizeof *c);
  g_fail[0] = 0;
  g_nfail = 0;
  c->g = kdp_golden_load(file);
  const kdp_golden_rec *x = kdp_golden_get(c->g, "x"), *y = kdp_golden_get(c->g, "y");
  ck_assert_msg(x->ndim == 4 && x->dims[0] == B_GOLD, "%s: x must be (8,H,W,C)", file);
  c->B = x->dims[0];
  c->C = 10;
  kdp_input_shape in = {x->dims[1], x->dims[2], x->dims[3], c->C};
  kdp_error err = {{0}};
  int rc = kdp_model_create(&c->m, arch, in, c->B, &err);
  ck_assert_msg(rc == 0 && c->m != NULL, "kdp_model_create(%s): %d %s", arch, rc, err.msg);
  if (naive) kdp_model_set_naive(c->m, 1);
  c->x = x->data;
  c->y = malloc(c->B * sizeof(int32_t));
  for (size_t i = 0; i < c->B; i++) c->y[i] = (int32_t)y->data[i];
  c->dz = calloc(c->B * c->C, sizeof(float));
}

static void ctx_reset(golden_ctx *c, const char *tag) {
  load_params(c->g, c->m, tag);
  model_buffers(c->g, c->m, tag, "buffer0.", 1);
}

static void ctx_close(golden_ctx *c) {
  kdp_model_free(c->m);
  kdp_golden_free(c->g);
  free(c->y);
  free(c->dz);
}

/* train forward + CE; dz = dL/dlogits. Returns the loss. */
static double forward_ce(golden_ctx *c, const float **logits) {
  kdp_rng rng;
  kdp_rng_seed(&rng, 1, KDP_STREAM_DROPOUT);
  *logits = kdp_model_forward(c->m, c->x, c->B, 1, &rng);
  ck_assert_ptr_nonnull(*logits);
  memset(c->dz, 0, c->B * c->C * sizeof(float));
  return kdp_ce_loss(*logits, c->y, c->B, c->C, c->dz, 1.0f, NULL);
}

static void run_golden(const char *file, const char *arch, int naive) {
  char tag[128];
  snprintf(tag, sizeof tag, "%s (%s kernels)", arch, naive ? "naive" : "BLAS");
  golden_ctx c;
  ctx_open(&c, file, arch, naive);
  kdp_model *m = c.m;
  ck_assert_uint_eq(kdp_model_n_classes(m), c.C);

  /* ---- one forward / backward ---- */
  ctx_reset(&c, tag);
  const float *logits;
  float loss = (float)forward_ce(&c, &logits);
  check_rec(c.g, tag, "logits", logits, c.B * c.C, TOL_FWD_ATOL, TOL_FWD_RTOL);
  check_rec(c.g, tag, "features", kdp_model_features(m), c.B * kdp_model_feature_dim(m),
            TOL_FWD_ATOL, TOL_FWD_RTOL);
  check_rec(c.g, tag, "loss", &loss, 1, TOL_LOSS_ATOL, TOL_LOSS_RTOL);
  check_rec(c.g, tag, "dlogits", c.dz, c.B * c.C, TOL_DZ_ATOL, TOL_DZ_RTOL);
  model_buffers(c.g, m, tag, "buffer.", 0);

  fail_if_any(tag, "forward");

  /* grads accumulate: start from zero */
  kdp_model_zero_grad(m);
  kdp_model_backward(m, c.dz, NULL);
  const float *gr = kdp_model_grads(m);
  for (size_t i = 0; i < kdp_model_n_tensors(m); i++) {
    char rn[256];
    snprintf(rn, sizeof rn, "grad.%s", kdp_model_tensor_name(m, i));
    check_rec(c.g, tag, rn, gr + kdp_model_tensor_offset(m, i), kdp_model_tensor_size(m, i),
              TOL_GRAD_ATOL, TOL_GRAD_RTOL);
  }

  fail_if_any(tag, "backward");

  /* ---- 5 SGD steps from the initial state ---- */
  ctx_reset(&c, tag);
  const kdp_golden_rec *sl = kdp_golden_get(c.g, "steps.loss");
  kdp_sgd opt;
  kdp_sgd_init(&opt, kdp_model_n_params(m), 0.9f, 5e-4f, 1);
  float losses[16];
  ck_assert(sl->n <= 16);
  for (size_t s = 0; s < sl->n; s++) {
    kdp_model_zero_grad(m);
    losses[s] = (float)forward_ce(&c, &logits);
    kdp_model_backward(m, c.dz, NULL);
    kdp_sgd_step(&opt, kdp_model_params(m), kdp_model_grads(m), 0.05f);
  }
  ck_assert_int_eq((int)opt.n_steps, (int)sl->n);
  kdp_sgd_free(&opt);
  check_rec(c.g, tag, "steps.loss", losses, sl->n, TOL_STEP_ATOL, TOL_STEP_RTOL);
  const float *p = kdp_model_params(m);
  for (size_t i = 0; i < kdp_model_n_tensors(m); i++) {
    const char *name = kdp_model_tensor_name(m, i);
    const float *t = p + kdp_model_tensor_offset(m, i);
    size_t sz = kdp_model_tensor_size(m, i);
    char rn[256], rows[256];
    snprintf(rn, sizeof rn, "final.%s", name);
    if (kdp_golden_find(c.g, rn)) {
      check_rec(c.g, tag, rn, t, sz, TOL_STEP_ATOL, TOL_STEP_RTOL);
      continue;
    }
    /* large tensor: only some rows were stored (keeps the file small) */
    snprintf(rn, sizeof rn, "final_sub.%s", name);
    snprintf(rows, sizeof rows, "final_rows.%s", name);
    const kdp_golden_rec *sub = kdp_golden_get(c.g, rn), *ri = kdp_golden_get(c.g, rows);
    size_t cols = sub->dims[1];
    ck_assert_msg(sz % cols == 0, "%s: %s has %zu values, not rows of %zu", tag, name, sz, cols);
    char fe[256];
    snprintf(fe, sizeof fe, "final.%s", name);
    double atol = TOL_STEP_ATOL + 10.0 * f32err(c.g, fe);
    for (size_t r = 0; r < ri->n; r++) {
      size_t row = (size_t)ri->data[r];
      ck_assert(row < sz / cols);
      char what[320];
      snprintf(what, sizeof what, "final %s row %zu", name, row);
      note(what, t + row * cols, sub->data + r * cols, cols, atol, TOL_STEP_RTOL);
    }
  }
  model_buffers(c.g, m, tag, "final_buffer.", 0);
  const float *ev = kdp_model_forward(m, c.x, c.B, 0, NULL);
  ck_assert_ptr_nonnull(ev);
  check_rec(c.g, tag, "final.eval_logits", ev, c.B * c.C, TOL_FWD_ATOL, TOL_FWD_RTOL);
  fail_if_any(tag, "5 SGD steps");
  ctx_close(&c);
}

START_TEST(test_mlp_blas) { run_golden("golden_mlp.bin", "mlp(64,32)", 0); }
END_TEST
START_TEST(test_mlp_naive) { run_golden("golden_mlp.bin", "mlp(64,32)", 1); }
END_TEST
START_TEST(test_cnn_blas) { run_golden("golden_cnn.bin", "cnn", 0); }
END_TEST
START_TEST(test_cnn_naive) { run_golden("golden_cnn.bin", "cnn", 1); }
END_TEST

/* The comparison has teeth: one weight moved by 1% of its tensor's largest value (as a bug in
   one index or one boundary would) is detected in the logits or in that tensor's gradient. The
   weight is the one with the largest golden gradient, i.e. one the loss actually depends on
   (a weight behind a dead ReLU could change without any effect). */
static void run_perturbed(const char *file, const char *arch, const char *tensor) {
  golden_ctx c;
  ctx_open(&c, file, arch, 0);
  ctx_reset(&c, arch);
  size_t ti = kdp_model_n_tensors(c.m);
  for (size_t i = 0; i < kdp_model_n_tensors(c.m); i++)
    if (strcmp(kdp_model_tensor_name(c.m, i), tensor) == 0) ti = i;
  ck_assert_msg(ti < kdp_model_n_tensors(c.m), "%s has no tensor %s", arch, tensor);
  char rn[256];
  snprintf(rn, sizeof rn, "grad.%s", tensor);
  const kdp_golden_rec *rg = kdp_golden_get(c.g, rn);
  float *w = kdp_model_params(c.m) + kdp_model_tensor_offset(c.m, ti);
  float amax = 0;
  size_t idx = 0;
  for (size_t i = 0; i < rg->n; i++) {
    amax = fmaxf(amax, fabsf(w[i]));
    if (fabsf(rg->data[i]) > fabsf(rg->data[idx])) idx = i;
  }
  w[idx] += 0.01f * amax;
  const float *logits;
  (void)forward_ce(&c, &logits);
  const kdp_golden_rec *rl = kdp_golden_get(c.g, "logits");
  double e_fwd = kdp_test_maxerr(logits, rl->data, rl->n,
                                 TOL_FWD_ATOL + 10.0 * f32err(c.g, "logits"), TOL_FWD_RTOL, NULL);
  kdp_model_zero_grad(c.m);
  kdp_model_backward(c.m, c.dz, NULL);
  double e_grad = kdp_test_maxerr(kdp_model_grads(c.m) + kdp_model_tensor_offset(c.m, ti),
                                  rg->data, rg->n, TOL_GRAD_ATOL + 10.0 * f32err(c.g, rn),
                                  TOL_GRAD_RTOL, NULL);
  if (getenv("KDP_TEST_VERBOSE"))
    fprintf(stderr, "  perturbed %s %s[%zu]: err/tol logits %.3g, grad %.3g\n", arch, tensor, idx,
            e_fwd, e_grad);
  ck_assert_msg(e_fwd > 1.0 || e_grad > 1.0,
                "%s: moving %s[%zu] by 1%% of its range went unnoticed (err/tol %g, %g)", arch,
                tensor, idx, e_fwd, e_grad);
  ctx_close(&c);
}

START_TEST(test_perturbed_mlp) {
  run_perturbed("golden_mlp.bin", "mlp(64,32)", "fc1.weight");
  run_perturbed("golden_mlp.bin", "mlp(64,32)", "fc3.bias");
}
END_TEST
START_TEST(test_perturbed_cnn) {
  run_perturbed("golden_cnn.bin", "cnn", "conv1.weight");
  run_perturbed("golden_cnn.bin", "cnn", "bn2.bias");
  run_perturbed("golden_cnn.bin", "cnn", "fc1.weight");
}
END_TEST

static Suite *golden_suite(void) {
  Suite *s = suite_create("golden");
  TCase *core = kdp_test_case("core");
  tcase_add_test(core, test_mlp_blas);
  tcase_add_test(core, test_mlp_naive);
  tcase_add_test(core, test_cnn_blas);
  tcase_add_test(core, test_cnn_naive);
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_test(lim, test_perturbed_mlp);
  tcase_add_test(lim, test_perturbed_cnn);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(golden_suite());
  srunner_run_all(sr, CK_NORMAL);
  int nf = srunner_ntests_failed(sr);
  srunner_free(sr);
  return nf == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
