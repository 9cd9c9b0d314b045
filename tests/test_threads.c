/* test_threads.c: check suite "threads": every nn kernel, the optimizer and whole training steps
   of the zoo give bitwise identical results at 1, 2, 3 and 4 threads (fixed tasks, partial sums
   added in task order); dropout masks in parallel blocks are the serial stream; kdp_rng_advance
   jumps exactly. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "testutil.h"

static const int WIDTHS[] = {2, 3, 4};

/* What one case computed: named output buffers, owned. */
#define MAX_OUT 16
typedef struct result {
  int n;
  const char *name[MAX_OUT];
  float *buf[MAX_OUT];
  size_t len[MAX_OUT];
} result;

static float *out_buf(result *r, const char *name, size_t n) {
  ck_assert(r->n < MAX_OUT);
  r->name[r->n] = name;
  r->len[r->n] = n;
  r->buf[r->n] = kdp_falloc(n ? n : 1);
  return r->buf[r->n++];
}

static void result_free(result *r) {
  for (int i = 0; i < r->n; i++) free(r->buf[i]);
  memset(r, 0, sizeof *r);
}

typedef void (*case_fn)(result *r);

/* Runs f at 1 thread, then at every width of WIDTHS, and asserts every output is bitwise equal.
   Also checks that the case is big enough to be split (kdp_nn_profile: more than one task). */
static void check_case(const char *what, case_fn f) {
  result ref = {0};
  kdp_nn_set_threads(1);
  f(&ref);
  for (size_t w = 0; w < sizeof WIDTHS / sizeof WIDTHS[0]; w++) {
    result got = {0};
    kdp_nn_set_threads(WIDTHS[w]);
    f(&got);
    ck_assert_int_eq(got.n, ref.n);
    for (int i = 0; i < ref.n; i++) {
      ck_assert(got.len[i] == ref.len[i]);
      if (memcmp(got.buf[i], ref.buf[i], ref.len[i] * sizeof(float)) == 0) continue;
      size_t k = 0; /* (one assertion per element would cost check a write each) */
      while (memcmp(&got.buf[i][k], &ref.buf[i][k], sizeof(float)) == 0) k++;
      ck_abort_msg("%s, %s[%zu]: %.9g at %d threads, %.9g at 1", what, ref.name[i], k,
                   (double)got.buf[i][k], WIDTHS[w], (double)ref.buf[i][k]);
    }
    result_free(&got);
  }
  result_free(&ref);
  kdp_nn_set_threads(1);
}

static void fill(float *a, size_t n, uint64_t seed, float lo, float hi) {
  kdp_rng r;
  kdp_rng_seed(&r, seed, 9);
  for (size_t i = 0; i < n; i++) a[i] = lo + (hi - lo) * kdp_rng_uniform(&r);
}

static float *rand_buf(size_t n, uint64_t seed) {
  float *a = kdp_falloc(n ? n : 1);
  fill(a, n, seed, -1.0f, 1.0f);
  return a;
}

/* ------------------------------------------------------------------ kernels */

/* dense at the mlp's first layer: tiles over the output (forward) and both gradients */
static void case_dense(result *r) {
  const size_t B = 128, I = 784, O = 512;
  float *x = rand_buf(B * I, 1), *w = rand_buf(O * I, 2), *b = rand_buf(O, 3);
  float *g = rand_buf(B * O, 4);
  kdp_dense_forward(out_buf(r, "out", B * O), x, w, b, B, I, O);
  float *din = out_buf(r, "din", B * I), *dw = out_buf(r, "dw", O * I), *db = out_buf(r, "db", O);
  fill(din, B * I, 5, -1, 1); /* accumulate onto non-zero gradients */
  fill(dw, O * I, 6, -1, 1);
  kdp_dense_backward(din, dw, db, g, x, w, B, I, O);
  float *o2 = out_buf(r, "out (no bias)", B * O);
  kdp_dense_forward(o2, x, w, NULL, B, I, O);
  free(x), free(w), free(b), free(g);
}

static void conv_case(result *r, kdp_conv_shape s) {
  kdp_conv_shape_init(&s);
  ck_assert_msg(kdp_conv_chunks(&s) > 1, "the case must run in several chunks");
  const size_t nin = s.B * s.H * s.W * s.Cin, nw = s.Cout * s.K * s.K * s.Cin;
  const size_t nout = s.B * s.OH * s.OW * s.Cout;
  float *x = rand_buf(nin, 11), *w = rand_buf(nw, 12), *b = rand_buf(s.Cout, 13);
  float *g = rand_buf(nout, 14), *sc = kdp_falloc(kdp_conv_scratch_floats(&s) + 1);
  kdp_conv2d_forward(out_buf(r, "out", nout), x, w, b, sc, &s);
  float *din = out_buf(r, "din", nin), *dw = out_buf(r, "dw", nw), *db = out_buf(r, "db", s.Cout);
  fill(dw, nw, 15, -1, 1);
  kdp_conv2d_backward(din, dw, db, g, x, w, sc, &s);
  free(x), free(w), free(b), free(g), free(sc);
}

static void case_conv(result *r) {
  /* the cnn's second conv, 18 samples: chunks of unequal size */
  conv_case(r, (kdp_conv_shape){.B = 18, .H = 14, .W = 14, .Cin = 32, .Cout = 64, .K = 3,
                                .stride = 1, .pad = 1});
}

static void case_conv_strided(result *r) {
  conv_case(r, (kdp_conv_shape){.B = 13, .H = 30, .W = 29, .Cin = 16, .Cout = 24, .K = 5,
                                .stride = 2, .pad = 2});
}

static void case_conv_pointwise(result *r) {
  conv_case(r, (kdp_conv_shape){.B = 40, .H = 16, .W = 16, .Cin = 32, .Cout = 64, .K = 1,
                                .stride = 1, .pad = 0});
}

/* the fused conv -> bn -> pool -> relu block at the cnn's first layer, train then eval */
static void case_fused(result *r) {
  kdp_conv_shape s = {.B = 50, .H = 28, .W = 28, .Cin = 1, .Cout = 32, .K = 3, .stride = 1,
                      .pad = 1};
  kdp_conv_shape_init(&s);
  ck_assert(kdp_conv_chunks(&s) > 1);
  const size_t C = s.Cout, N = s.B * s.OH * s.OW, nin = s.B * s.H * s.W;
  const size_t np = s.B * (s.OH / 2) * (s.OW / 2) * C, nw = C * 9;
  float *x = rand_buf(nin, 21), *w = rand_buf(nw, 22), *b = rand_buf(C, 23);
  float *ga = rand_buf(C, 24), *be = rand_buf(C, 25), *g = rand_buf(np, 26);
  float *sc = kdp_falloc(kdp_conv_bn_pool_relu_scratch_floats(&s) + 1);
  uint8_t *win = kdp_xcalloc(np, 1);
  float *out = out_buf(r, "out", np), *xwin = out_buf(r, "xwin", np), *y = out_buf(r, "y", N * C);
  float *mean = out_buf(r, "mean", C), *inv = out_buf(r, "invstd", C);
  float *rm = out_buf(r, "run_mean", C), *rv = out_buf(r, "run_var", C);
  for (size_t c = 0; c < C; c++) rv[c] = 1.0f;
  kdp_conv_bn_pool_relu_forward(out, win, xwin, y, mean, inv, rm, rv, x, w, b, ga, be, sc, &s, 1,
                                0.1f, 1e-5f);
  float *wf = out_buf(r, "win", np);
  for (size_t i = 0; i < np; i++) wf[i] = win[i];
  float *din = out_buf(r, "din", nin), *dw = out_buf(r, "dw", nw), *db = out_buf(r, "db", C);
  float *dg = out_buf(r, "dgamma", 2 * C);
  kdp_conv_bn_pool_relu_backward(din, 1, dw, db, dg, dg + C, g, out, win, xwin, y, mean, inv, x,
                                 w, ga, sc, &s);
  kdp_conv_bn_pool_relu_forward(out_buf(r, "out (eval)", np), NULL, NULL, y, NULL, NULL, rm, rv,
                                x, w, b, ga, be, sc, &s, 0, 0.1f, 1e-5f);
  free(x), free(w), free(b), free(ga), free(be), free(g), free(sc), free(win);
}

/* batchnorm over many row blocks, with a large offset (the merge of the block statistics) */
static void case_bn(result *r) {
  const size_t N = 20000, C = 24;
  float *x = rand_buf(N * C, 31), *ga = rand_buf(C, 32), *be = rand_buf(C, 33);
  float *g = rand_buf(N * C, 34);
  for (size_t i = 0; i < N * C; i++) x[i] = 100.0f + 3.0f * x[i];
  float *out = out_buf(r, "out", N * C), *xh = out_buf(r, "xhat", N * C);
  float *inv = out_buf(r, "invstd", C), *rm = out_buf(r, "run_mean", C);
  float *rv = out_buf(r, "run_var", C);
  kdp_bn_forward_train(out, xh, inv, rm, rv, x, ga, be, N, C, 0.1f, 1e-5f);
  float *din = out_buf(r, "din", N * C), *dg = out_buf(r, "dgamma", 2 * C);
  kdp_bn_backward(din, dg, dg + C, g, xh, inv, ga, N, C);
  kdp_bn_backward_set(out_buf(r, "din (set)", N * C), NULL, NULL, g, xh, inv, ga, N, C);
  kdp_bn_forward_eval(out_buf(r, "out (eval)", N * C), x, ga, be, rm, rv, N, C, 1e-5f);
  free(x), free(ga), free(be), free(g);
}

/* pools with overlapping windows and padding, gap, relu, flatten, add, shortcut, dropout */
static void case_elementwise(result *r) {
  const size_t B = 64, H = 17, W = 15, C = 16, n = B * H * W * C;
  const size_t OH = (H + 2 - 3) / 2 + 1, OW = (W + 2 - 3) / 2 + 1, no = B * OH * OW * C;
  float *x = rand_buf(n, 41), *x2 = rand_buf(n, 42), *g = rand_buf(n, 43);
  int32_t *am = kdp_xcalloc(no, sizeof(int32_t));
  kdp_maxpool_forward(out_buf(r, "maxpool", no), am, x, B, H, W, C, 3, 2, 1);
  float *d = out_buf(r, "maxpool din", n);
  kdp_maxpool_backward(d, g, am, B, no);
  kdp_avgpool_forward(out_buf(r, "avgpool", no), x, B, H, W, C, 3, 2, 1);
  kdp_avgpool_backward(d, g, B, H, W, C, 3, 2, 1);
  kdp_gap_forward(out_buf(r, "gap", B * C), x, B, H * W, C);
  kdp_gap_backward(d, g, B, H * W, C);
  kdp_relu_forward(out_buf(r, "relu", n), x, n);
  kdp_relu_backward(d, g, x, n);
  kdp_flatten_forward(out_buf(r, "flatten", n), x, B, H, W, C);
  kdp_flatten_backward(d, g, B, H, W, C);
  kdp_add_forward(out_buf(r, "add", n), x, x2, n);
  float *d2 = out_buf(r, "add din2", n);
  kdp_add_backward(d, d2, g, n);
  kdp_shortcut_a_forward(out_buf(r, "shortcut", B * 9 * 8 * 32), x, B, H, W, C, 32, 2);
  kdp_shortcut_a_backward(d, g, B, H, W, C, 32, 2);
  float *mask = out_buf(r, "dropout mask", n);
  kdp_rng rng;
  kdp_rng_seed(&rng, 7, KDP_STREAM_DROPOUT);
  kdp_dropout_forward(out_buf(r, "dropout", n), mask, x, n, 0.3f, &rng);
  kdp_dropout_backward(d, g, mask, n);
  float *after = out_buf(r, "rng after dropout", 1);
  after[0] = kdp_rng_uniform(&rng);
  free(x), free(x2), free(g), free(am);
}

static void case_sgd(result *r) {
  const size_t n = 300000;
  float *p = out_buf(r, "params", n), *buf = out_buf(r, "momentum", n);
  float *g = rand_buf(n, 51);
  fill(p, n, 52, -1, 1);
  kdp_sgd o;
  kdp_sgd_init(&o, n, 0.9f, 5e-4f, 1);
  for (int s = 0; s < 3; s++) {
    kdp_sgd_step(&o, p, g, 0.05f);
    for (size_t i = 0; i < n; i++) g[i] = 0.5f * g[i] + 0.01f * p[i];
  }
  memcpy(buf, o.buf, n * sizeof(float));
  kdp_sgd_free(&o);
  free(g);
}

START_TEST(test_kernels) {
  check_case("dense", case_dense);
  check_case("conv", case_conv);
  check_case("conv, stride 2", case_conv_strided);
  check_case("conv, pointwise", case_conv_pointwise);
  check_case("fused conv block", case_fused);
  check_case("batchnorm", case_bn);
  check_case("pools and element-wise", case_elementwise);
  check_case("sgd", case_sgd);
}
END_TEST

/* ------------------------------------------------------------------ whole training steps */

typedef struct model_case {
  const char *arch;
  kdp_input_shape in;
  size_t B;
} model_case;

static const model_case MODELS[] = {
    {"mlp(512,256)", {28, 28, 1, 10}, 128},
    {"cnn", {28, 28, 1, 10}, 64},
    {"resnet20", {32, 32, 3, 10}, 12},
    {"wrn10_2", {16, 16, 3, 10}, 10},
    {"seq:conv(8,3),bn,relu,avgpool(3,2,1),dropout(0.25),conv(16,1),bn,relu,maxpool(3,2),"
     "dropout(0.5),gap,dense(10)",
     {20, 20, 3, 10}, 48},
};
static size_t g_model;

/* three SGD steps on random data with the cross-entropy gradient, then the weights, momentum, BN
   statistics, logits and features */
static void case_model(result *r) {
  const model_case *mc = &MODELS[g_model];
  kdp_model *m = NULL;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_model_create(&m, mc->arch, mc->in, mc->B, &err) == 0, "%s", err.msg);
  kdp_rng init, drop;
  kdp_rng_seed(&init, 3, KDP_STREAM_INIT);
  kdp_rng_seed(&drop, 3, KDP_STREAM_DROPOUT);
  kdp_model_init(m, &init);
  const size_t B = mc->B, isz = mc->in.H * mc->in.W * mc->in.C, C = mc->in.n_classes;
  float *x = rand_buf(B * isz, 61), *dz = kdp_falloc(B * C);
  int32_t *y = kdp_xcalloc(B, sizeof(int32_t));
  for (size_t i = 0; i < B; i++) y[i] = (int32_t)(i * 7 % C);
  const size_t np = kdp_model_n_params(m);
  kdp_sgd o;
  kdp_sgd_init(&o, np, 0.9f, 5e-4f, 1);
  const float *z = NULL;
  for (int s = 0; s < 3; s++) {
    kdp_model_zero_grad(m);
    z = kdp_model_forward(m, x, B, 1, &drop);
    memset(dz, 0, B * C * sizeof(float));
    kdp_ce_loss(z, y, B, C, dz, 1.0f, NULL);
    kdp_model_backward(m, dz, NULL);
    kdp_sgd_step(&o, kdp_model_params(m), kdp_model_grads(m), 0.05f);
  }
  memcpy(out_buf(r, "logits", B * C), z, B * C * sizeof(float));
  size_t nf = B * kdp_model_feature_dim(m);
  memcpy(out_buf(r, "features", nf), kdp_model_features(m), nf * sizeof(float));
  memcpy(out_buf(r, "params", np), kdp_model_params(m), np * sizeof(float));
  memcpy(out_buf(r, "grads", np), kdp_model_grads(m), np * sizeof(float));
  memcpy(out_buf(r, "momentum", np), o.buf, np * sizeof(float));
  size_t nb = kdp_model_n_buffers(m);
  memcpy(out_buf(r, "buffers", nb), kdp_model_buffers(m), nb * sizeof(float));
  const float *ze = kdp_model_forward(m, x, B, 0, NULL);
  memcpy(out_buf(r, "eval logits", B * C), ze, B * C * sizeof(float));
  kdp_sgd_free(&o);
  kdp_model_free(m);
  free(x), free(dz), free(y);
}

START_TEST(test_models) {
  g_model = (size_t)_i;
  check_case(MODELS[_i].arch, case_model);
}
END_TEST

/* ------------------------------------------------------------------ random streams */

START_TEST(test_rng_advance) {
  for (uint64_t delta = 0; delta < 70; delta += 7) {
    kdp_rng a, b;
    kdp_rng_seed(&a, 11, 5);
    b = a;
    for (uint64_t k = 0; k < delta; k++) (void)kdp_rng_u32(&a);
    kdp_rng_advance(&b, delta);
    ck_assert_msg(a.state == b.state && a.inc == b.inc, "advance by %llu", (unsigned long long)delta);
  }
  kdp_rng a, b;
  kdp_rng_seed(&a, 12, 6);
  b = a;
  for (int k = 0; k < 1000003; k++) (void)kdp_rng_u32(&a);
  kdp_rng_advance(&b, 1000003);
  ck_assert(a.state == b.state);
}
END_TEST

/* the dropout mask drawn in parallel blocks is the serial sequence of draws */
START_TEST(test_dropout_stream) {
  const size_t n = 3 * 4096 + 77;
  float *x = rand_buf(n, 71), *out = kdp_falloc(n), *mask = kdp_falloc(n);
  kdp_rng r, s;
  kdp_rng_seed(&r, 5, KDP_STREAM_DROPOUT);
  s = r;
  kdp_nn_set_threads(3);
  kdp_dropout_forward(out, mask, x, n, 0.4f, &r);
  kdp_nn_set_threads(1);
  const float keep = 1.0f / (1.0f - 0.4f);
  for (size_t i = 0; i < n; i++) {
    float want = kdp_rng_uniform(&s) < 0.4f ? 0.0f : keep;
    if (mask[i] != want || out[i] != x[i] * want)
      ck_abort_msg("mask[%zu] = %g, the serial stream gives %g", i, (double)mask[i],
                   (double)want);
  }
  ck_assert_msg(r.state == s.state, "the stream ends where the serial loop ends");
  free(x), free(out), free(mask);
}
END_TEST

static Suite *threads_suite(void) {
  Suite *s = suite_create("threads");
  TCase *tc = kdp_test_case("core");
  tcase_add_test(tc, test_rng_advance);
  tcase_add_test(tc, test_dropout_stream);
  tcase_add_test(tc, test_kernels);
  tcase_add_loop_test(tc, test_models, 0, (int)(sizeof MODELS / sizeof MODELS[0]));
  suite_add_tcase(s, tc);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(threads_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
