/* test_layers.c: check suite "layers": naive vs BLAS, finite differences, accumulate contract,
   batchnorm/flatten/shortcut semantics, and degenerate shapes. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/nn.h"
#include "testutil.h"

/* ------------------------------------------------------------------ helpers */

static void fill_uniform(kdp_rng *r, float *a, size_t n, float lo, float hi) {
  for (size_t i = 0; i < n; i++) a[i] = lo + (hi - lo) * kdp_rng_uniform(r);
}

/* values with |x| in [0.1, 1.1): far from the ReLU kink compared with the FD step */
static void fill_away_from_zero(kdp_rng *r, float *a, size_t n) {
  for (size_t i = 0; i < n; i++) {
    float m = 0.1f + kdp_rng_uniform(r);
    a[i] = (kdp_rng_u32(r) & 1) ? m : -m;
  }
}

/* a random permutation of {0, 0.05, 0.10, ...} shifted to be centred: no ties, gaps 0.05 */
static void fill_distinct(kdp_rng *r, float *a, size_t n) {
  for (size_t i = 0; i < n; i++) a[i] = 0.05f * (float)i - 0.025f * (float)n;
  for (size_t i = n; i > 1; i--) {
    size_t j = kdp_rng_below(r, (uint32_t)i);
    float t = a[i - 1];
    a[i - 1] = a[j];
    a[j] = t;
  }
}

/* bit-for-bit equal (copies and permutations) */
static void assert_exact(const char *what, const float *a, const float *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    ck_assert_msg(a[i] == b[i], "%s: index %zu of %zu: got %.8g, expected %.8g", what, i, n,
                  (double)a[i], (double)b[i]);
}

static float *fdup(const float *a, size_t n) {
  float *b = kdp_falloc(n);
  memcpy(b, a, n * sizeof(float));
  return b;
}

/* Context shared by every layer's forward wrapper in the finite-difference checks. */
typedef struct ctx {
  float *out, *in, *in2, *w, *b, *scratch, *mask, *xhat, *invstd, *rm, *rv, *gamma, *beta;
  int32_t *am;
  kdp_conv_shape cs;
  size_t B, H, W, C, Cout, I, O, K, stride, pad, n_out;
  float p;
} ctx;

typedef void (*fwd_fn)(ctx *c);

static double fd_loss(fwd_fn f, ctx *c, const float *r) {
  f(c);
  double L = 0;
  for (size_t i = 0; i < c->n_out; i++) L += (double)r[i] * (double)c->out[i];
  return L;
}

/* Tolerances (atol, rtol) per op, with step 1e-2 everywhere; about 10x the largest error seen:
   dense, pools, gap, relu, dropout, flatten, add, shortcut_a: 1e-4, 1e-4 (linear or piecewise
   linear away from kinks: only float rounding of out); conv: 3e-4, 3e-4 (longer sums);
   batchnorm: din 3e-4, 1e-3 (O(step^2) truncation), gamma/beta 3e-4, 3e-4. */

/* Central differences of L = sum(r * out) wrt every element of param, compared with the
   analytic gradient. The actual float step (p+eps) - (p-eps) is used as the divisor. */
static void fd_check(const char *what, fwd_fn f, ctx *c, float *param, size_t n,
                     const float *analytic, const float *r, float eps, double atol, double rtol) {
  float *num = kdp_falloc(n);
  for (size_t j = 0; j < n; j++) {
    float p0 = param[j];
    float hp = p0 + eps, hm = p0 - eps;
    param[j] = hp;
    double Lp = fd_loss(f, c, r);
    param[j] = hm;
    double Lm = fd_loss(f, c, r);
    param[j] = p0;
    num[j] = (float)((Lp - Lm) / ((double)hp - (double)hm));
  }
  f(c); /* restore the unperturbed forward state */
  kdp_test_assert_close(what, analytic, num, n, atol, rtol);
  free(num);
}

/* ------------------------------------------------------------------ naive vs BLAS */

/* random input (B x I), weights (O x I), bias (O) and output gradient (B x O) in [-1, 1) */
static void dense_inputs(kdp_rng *r, uint64_t seed, size_t B, size_t I, size_t O, float **in,
                         float **w, float **b, float **dout) {
  kdp_rng_seed(r, seed, 0);
  *in = kdp_falloc(B * I), *w = kdp_falloc(O * I), *b = kdp_falloc(O), *dout = kdp_falloc(B * O);
  fill_uniform(r, *in, B * I, -1, 1);
  fill_uniform(r, *w, O * I, -1, 1);
  fill_uniform(r, *b, O, -1, 1);
  fill_uniform(r, *dout, B * O, -1, 1);
}

static void check_dense_shape(size_t B, size_t I, size_t O, uint64_t seed) {
  kdp_rng r;
  float *in, *w, *b, *dout;
  dense_inputs(&r, seed, B, I, O, &in, &w, &b, &dout);
  float *o1 = kdp_falloc(B * O), *o2 = kdp_falloc(B * O);
  kdp_dense_forward(o1, in, w, b, B, I, O);
  kdp_dense_forward_naive(o2, in, w, b, B, I, O);
  char what[128];
  snprintf(what, sizeof what, "dense out B=%zu I=%zu O=%zu", B, I, O);
  kdp_test_assert_close(what, o1, o2, B * O, 1e-4, 1e-4);

  /* gradients start from the same non-zero values so accumulation is compared too */
  float *di1 = kdp_falloc(B * I), *dw1 = kdp_falloc(O * I), *db1 = kdp_falloc(O);
  fill_uniform(&r, di1, B * I, -1, 1);
  fill_uniform(&r, dw1, O * I, -1, 1);
  fill_uniform(&r, db1, O, -1, 1);
  float *di2 = fdup(di1, B * I), *dw2 = fdup(dw1, O * I), *db2 = fdup(db1, O);
  kdp_dense_backward(di1, dw1, db1, dout, in, w, B, I, O);
  kdp_dense_backward_naive(di2, dw2, db2, dout, in, w, B, I, O);
  snprintf(what, sizeof what, "dense din B=%zu I=%zu O=%zu", B, I, O);
  kdp_test_assert_close(what, di1, di2, B * I, 1e-4, 1e-4);
  snprintf(what, sizeof what, "dense dw B=%zu I=%zu O=%zu", B, I, O);
  kdp_test_assert_close(what, dw1, dw2, O * I, 1e-4, 1e-4);
  snprintf(what, sizeof what, "dense db B=%zu I=%zu O=%zu", B, I, O);
  kdp_test_assert_close(what, db1, db2, O, 1e-4, 1e-4);
  free(in), free(w), free(b), free(dout), free(o1), free(o2);
  free(di1), free(dw1), free(db1), free(di2), free(dw2), free(db2);
}

/* dense + relu: the fused kernel equals the BLAS dense followed by the relu layers (same GEMM
   tiles: bit for bit), and its naive twin within the dense tolerance */
static void check_dense_relu_shape(size_t B, size_t I, size_t O, uint64_t seed) {
  kdp_rng r;
  float *in, *w, *b, *dout;
  dense_inputs(&r, seed, B, I, O, &in, &w, &b, &dout);
  float *pre = kdp_falloc(B * O), *o1 = kdp_falloc(B * O), *o2 = kdp_falloc(B * O);
  float *o3 = kdp_falloc(B * O);
  kdp_dense_forward(pre, in, w, b, B, I, O);
  kdp_relu_forward(o1, pre, B * O);
  kdp_dense_relu_forward(o2, in, w, b, B, I, O);
  kdp_dense_relu_forward_naive(o3, in, w, b, B, I, O);
  char what[128];
  snprintf(what, sizeof what, "dense+relu out B=%zu I=%zu O=%zu", B, I, O);
  assert_exact(what, o2, o1, B * O);
  kdp_test_assert_close(what, o3, o1, B * O, 1e-4, 1e-4);
  size_t pos = 0;
  for (size_t i = 0; i < B * O; i++) pos += o1[i] > 0.0f;
  ck_assert_msg(pos > 0 && pos < B * O, "%s: the relu must cut some and pass some", what);
  /* backward: the unfused relu then dense, against the fused (dout masked in place) */
  float *di1 = kdp_falloc(B * I), *dw1 = kdp_falloc(O * I), *db1 = kdp_falloc(O);
  float *dpre = kdp_falloc(B * O);
  fill_uniform(&r, di1, B * I, -1, 1);
  fill_uniform(&r, dw1, O * I, -1, 1);
  fill_uniform(&r, db1, O, -1, 1);
  float *di2 = fdup(di1, B * I), *dw2 = fdup(dw1, O * I), *db2 = fdup(db1, O);
  float *di3 = fdup(di1, B * I), *dw3 = fdup(dw1, O * I), *db3 = fdup(db1, O);
  float *g2 = fdup(dout, B * O), *g3 = fdup(dout, B * O);
  kdp_relu_backward(dpre, dout, o1, B * O);
  kdp_dense_backward(di1, dw1, db1, dpre, in, w, B, I, O);
  kdp_dense_relu_backward(di2, dw2, db2, g2, o2, in, w, B, I, O);
  kdp_dense_relu_backward_naive(di3, dw3, db3, g3, o3, in, w, B, I, O);
  snprintf(what, sizeof what, "dense+relu grads B=%zu I=%zu O=%zu", B, I, O);
  assert_exact(what, di2, di1, B * I);
  assert_exact(what, dw2, dw1, O * I);
  assert_exact(what, db2, db1, O);
  kdp_test_assert_close(what, di3, di1, B * I, 1e-4, 1e-4);
  kdp_test_assert_close(what, dw3, dw1, O * I, 1e-4, 1e-4);
  kdp_test_assert_close(what, db3, db1, O, 1e-4, 1e-4);
  free(in), free(w), free(b), free(dout), free(pre), free(o1), free(o2), free(o3);
  free(di1), free(dw1), free(db1), free(dpre), free(di2), free(dw2), free(db2);
  free(di3), free(dw3), free(db3), free(g2), free(g3);
}

START_TEST(test_dense_relu) {
  check_dense_relu_shape(128, 784, 512, 11); /* the mlp's first layer: several GEMM tiles */
  check_dense_relu_shape(7, 13, 5, 12);
  check_dense_relu_shape(3, 2, 2, 13);
}
END_TEST

START_TEST(test_dense_naive_vs_blas) {
  check_dense_shape(1, 1, 1, 1);
  check_dense_shape(7, 13, 5, 2);
  check_dense_shape(128, 300, 33, 3);
  check_dense_shape(3, 3136, 128, 4);
  check_dense_shape(65, 64, 10, 5);
}
END_TEST

/* Compares BLAS and naive conv: forward and din, dw, db (accumulating onto the same random
   start). Returns the number of batch chunks the BLAS path used. */
static size_t check_conv_shape(kdp_conv_shape s, int with_bias, uint64_t seed) {
  kdp_conv_shape_init(&s);
  kdp_rng r;
  kdp_rng_seed(&r, seed, 0);
  const size_t nin = s.B * s.H * s.W * s.Cin, nw = s.Cout * s.K * s.K * s.Cin;
  const size_t nout = s.B * s.OH * s.OW * s.Cout;
  float *in = kdp_falloc(nin), *w = kdp_falloc(nw), *b = kdp_falloc(s.Cout);
  float *dout = kdp_falloc(nout);
  fill_uniform(&r, in, nin, -1, 1);
  fill_uniform(&r, w, nw, -1, 1);
  fill_uniform(&r, b, s.Cout, -1, 1);
  fill_uniform(&r, dout, nout, -1, 1);
  size_t ns = kdp_conv_scratch_floats(&s);
  float *scratch = kdp_falloc(ns);
  float *o1 = kdp_falloc(nout), *o2 = kdp_falloc(nout);
  kdp_conv2d_forward(o1, in, w, with_bias ? b : NULL, scratch, &s);
  kdp_conv2d_forward_naive(o2, in, w, with_bias ? b : NULL, &s);
  char what[256];
#define SHAPE_FMT "B=%zu H=%zu W=%zu Cin=%zu Cout=%zu K=%zu stride=%zu pad=%zu"
#define SHAPE_ARGS s.B, s.H, s.W, s.Cin, s.Cout, s.K, s.stride, s.pad
  snprintf(what, sizeof what, "conv out " SHAPE_FMT, SHAPE_ARGS);
  kdp_test_assert_close(what, o1, o2, nout, 1e-4, 1e-4);

  float *di1 = kdp_falloc(nin), *dw1 = kdp_falloc(nw), *db1 = kdp_falloc(s.Cout);
  fill_uniform(&r, di1, nin, -1, 1);
  fill_uniform(&r, dw1, nw, -1, 1);
  fill_uniform(&r, db1, s.Cout, -1, 1);
  float *di2 = fdup(di1, nin), *dw2 = fdup(dw1, nw), *db2 = fdup(db1, s.Cout);
  kdp_conv2d_backward(di1, dw1, db1, dout, in, w, scratch, &s);
  kdp_conv2d_backward_naive(di2, dw2, db2, dout, in, w, &s);
  snprintf(what, sizeof what, "conv din " SHAPE_FMT, SHAPE_ARGS);
  kdp_test_assert_close(what, di1, di2, nin, 1e-4, 1e-4);
  snprintf(what, sizeof what, "conv dw " SHAPE_FMT, SHAPE_ARGS);
  kdp_test_assert_close(what, dw1, dw2, nw, 1e-4, 1e-4);
  snprintf(what, sizeof what, "conv db " SHAPE_FMT, SHAPE_ARGS);
  kdp_test_assert_close(what, db1, db2, s.Cout, 1e-4, 1e-4);

  /* NULL din: dw must come out the same as with din requested */
  float *dw3 = kdp_falloc(nw);
  float *dw4 = kdp_falloc(nw);
  kdp_conv2d_backward(NULL, dw3, NULL, dout, in, w, scratch, &s);
  kdp_conv2d_backward_naive(NULL, dw4, NULL, dout, in, w, &s);
  snprintf(what, sizeof what, "conv dw (din NULL) " SHAPE_FMT, SHAPE_ARGS);
  kdp_test_assert_close(what, dw3, dw4, nw, 1e-4, 1e-4);

  size_t chunks = kdp_conv_chunks(&s);
  free(in), free(w), free(b), free(dout), free(scratch), free(o1), free(o2);
  free(di1), free(dw1), free(db1), free(di2), free(dw2), free(db2), free(dw3), free(dw4);
  return chunks;
}

START_TEST(test_conv_naive_vs_blas) {
  /* B, H, W, Cin, Cout, K, stride, pad */
  static const size_t shapes[][8] = {
      {3, 5, 5, 1, 4, 3, 1, 1},   {2, 7, 6, 3, 5, 3, 2, 1},  {5, 9, 9, 3, 8, 5, 1, 2},
      {4, 8, 8, 3, 6, 1, 1, 0},   {3, 9, 7, 4, 6, 1, 2, 0},  {2, 6, 6, 2, 3, 5, 2, 0},
      {3, 11, 11, 1, 4, 5, 2, 2}, {2, 13, 9, 3, 7, 3, 1, 0}, {3, 10, 10, 3, 4, 3, 2, 2},
      {2, 28, 28, 1, 8, 3, 1, 1}, {1, 5, 8, 3, 2, 5, 1, 1},  {2, 8, 8, 3, 4, 1, 1, 1},
  };
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const size_t *v = shapes[i];
    kdp_conv_shape s = {.B = v[0], .H = v[1], .W = v[2], .Cin = v[3], .Cout = v[4], .K = v[5],
                        .stride = v[6], .pad = v[7]};
    check_conv_shape(s, (int)(i & 1), 100 + i);
  }
}
END_TEST

/* Batches in several chunks of unequal size (B not a multiple of the chunk count). */
START_TEST(test_conv_chunked) {
  kdp_conv_shape a = {.B = 5, .H = 28, .W = 28, .Cin = 16, .Cout = 8, .K = 3, .stride = 1,
                      .pad = 1};
  size_t ca = check_conv_shape(a, 1, 7);
  ck_assert_msg(ca > 1 && ca < a.B && a.B % ca != 0, "shape a: %zu chunks of B=%zu", ca, a.B);
  /* the CNN's second conv */
  kdp_conv_shape c = {.B = 11, .H = 14, .W = 14, .Cin = 32, .Cout = 64, .K = 3, .stride = 1,
                      .pad = 1};
  size_t cc = check_conv_shape(c, 0, 8);
  ck_assert_msg(cc > 1 && cc < c.B && c.B % cc != 0, "shape c: %zu chunks of B=%zu", cc, c.B);
  /* stride 2, pad 2, K=5 */
  kdp_conv_shape d = {.B = 7, .H = 30, .W = 29, .Cin = 3, .Cout = 5, .K = 5, .stride = 2,
                      .pad = 2};
  check_conv_shape(d, 1, 9);
}
END_TEST

START_TEST(test_conv_shape_init) {
  kdp_conv_shape s = {.B = 1, .H = 28, .W = 27, .Cin = 1, .Cout = 1, .K = 3, .stride = 2,
                      .pad = 1};
  kdp_conv_shape_init(&s);
  ck_assert_uint_eq(s.OH, 14); /* (28 + 2 - 3) / 2 + 1 */
  ck_assert_uint_eq(s.OW, 14); /* (27 + 2 - 3) / 2 + 1 */
  kdp_conv_shape p = {.B = 4, .H = 8, .W = 8, .Cin = 16, .Cout = 32, .K = 1, .stride = 1,
                      .pad = 0};
  kdp_conv_shape_init(&p);
  ck_assert_uint_eq(kdp_conv_scratch_floats(&p), 0); /* pointwise: no im2col */
}
END_TEST

/* ------------------------------------------------------------------ finite differences */

static void fw_dense(ctx *c) { kdp_dense_forward(c->out, c->in, c->w, c->b, c->B, c->I, c->O); }
static void fw_conv(ctx *c) { kdp_conv2d_forward(c->out, c->in, c->w, c->b, c->scratch, &c->cs); }
static void fw_maxpool(ctx *c) {
  kdp_maxpool_forward(c->out, c->am, c->in, c->B, c->H, c->W, c->C, c->K, c->stride, c->pad);
}
static void fw_avgpool(ctx *c) {
  kdp_avgpool_forward(c->out, c->in, c->B, c->H, c->W, c->C, c->K, c->stride, c->pad);
}
static void fw_gap(ctx *c) { kdp_gap_forward(c->out, c->in, c->B, c->H * c->W, c->C); }
static void fw_relu(ctx *c) { kdp_relu_forward(c->out, c->in, c->n_out); }
static void fw_dropout(ctx *c) {
  kdp_rng r; /* same seed every call: a fixed mask */
  kdp_rng_seed(&r, 42, KDP_STREAM_DROPOUT);
  kdp_dropout_forward(c->out, c->mask, c->in, c->n_out, c->p, &r);
}
static void fw_flatten(ctx *c) { kdp_flatten_forward(c->out, c->in, c->B, c->H, c->W, c->C); }
static void fw_add(ctx *c) { kdp_add_forward(c->out, c->in, c->in2, c->n_out); }
static void fw_shortcut(ctx *c) {
  kdp_shortcut_a_forward(c->out, c->in, c->B, c->H, c->W, c->C, c->Cout, c->stride);
}
static void fw_bn(ctx *c) {
  /* running stats go to throw-away copies so repeated forwards stay identical */
  kdp_bn_forward_train(c->out, c->xhat, c->invstd, c->rm, c->rv, c->in, c->gamma, c->beta,
                       c->B, c->C, 0.1f, 1e-5f);
}

START_TEST(test_fd_dense) {
  kdp_rng r;
  kdp_rng_seed(&r, 11, 0);
  ctx c = {.B = 4, .I = 7, .O = 5};
  c.n_out = c.B * c.O;
  c.in = kdp_falloc(c.B * c.I), c.w = kdp_falloc(c.O * c.I), c.b = kdp_falloc(c.O);
  c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out);
  fill_uniform(&r, c.in, c.B * c.I, -1, 1);
  fill_uniform(&r, c.w, c.O * c.I, -1, 1);
  fill_uniform(&r, c.b, c.O, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  float *din = kdp_falloc(c.B * c.I), *dw = kdp_falloc(c.O * c.I), *db = kdp_falloc(c.O);
  fw_dense(&c);
  kdp_dense_backward(din, dw, db, rr, c.in, c.w, c.B, c.I, c.O);
  /* linear op: central differences are exact up to float rounding of out */
  fd_check("fd dense din", fw_dense, &c, c.in, c.B * c.I, din, rr, 1e-2f, 1e-4, 1e-4);
  fd_check("fd dense dw", fw_dense, &c, c.w, c.O * c.I, dw, rr, 1e-2f, 1e-4, 1e-4);
  fd_check("fd dense db", fw_dense, &c, c.b, c.O, db, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.w), free(c.b), free(c.out), free(rr), free(din), free(dw), free(db);
}
END_TEST

static void fd_conv_case(kdp_conv_shape s, uint64_t seed) {
  kdp_conv_shape_init(&s);
  kdp_rng r;
  kdp_rng_seed(&r, seed, 0);
  ctx c = {.cs = s};
  const size_t nin = s.B * s.H * s.W * s.Cin, nw = s.Cout * s.K * s.K * s.Cin;
  c.n_out = s.B * s.OH * s.OW * s.Cout;
  c.in = kdp_falloc(nin), c.w = kdp_falloc(nw), c.b = kdp_falloc(s.Cout);
  c.out = kdp_falloc(c.n_out), c.scratch = kdp_falloc(kdp_conv_scratch_floats(&s));
  float *rr = kdp_falloc(c.n_out);
  fill_uniform(&r, c.in, nin, -1, 1);
  fill_uniform(&r, c.w, nw, -1, 1);
  fill_uniform(&r, c.b, s.Cout, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  float *din = kdp_falloc(nin), *dw = kdp_falloc(nw), *db = kdp_falloc(s.Cout);
  fw_conv(&c);
  kdp_conv2d_backward(din, dw, db, rr, c.in, c.w, c.scratch, &s);
  fd_check("fd conv din", fw_conv, &c, c.in, nin, din, rr, 1e-2f, 3e-4, 3e-4);
  fd_check("fd conv dw", fw_conv, &c, c.w, nw, dw, rr, 1e-2f, 3e-4, 3e-4);
  fd_check("fd conv db", fw_conv, &c, c.b, s.Cout, db, rr, 1e-2f, 3e-4, 3e-4);
  free(c.in), free(c.w), free(c.b), free(c.out), free(c.scratch), free(rr);
  free(din), free(dw), free(db);
}

START_TEST(test_fd_conv) {
  fd_conv_case((kdp_conv_shape){.B = 2, .H = 5, .W = 6, .Cin = 3, .Cout = 4, .K = 3, .stride = 2,
                                .pad = 1},
               21);
  fd_conv_case((kdp_conv_shape){.B = 2, .H = 4, .W = 4, .Cin = 2, .Cout = 3, .K = 1, .stride = 1,
                                .pad = 0},
               22);
}
END_TEST

START_TEST(test_fd_maxpool) {
  kdp_rng r;
  kdp_rng_seed(&r, 31, 0);
  /* K=3 stride 2 pad 1 (overlapping windows and padding) and K=2 stride 2 (the CNN's) */
  static const size_t cfg[][3] = {{3, 2, 1}, {2, 2, 0}};
  for (int k = 0; k < 2; k++) {
    ctx c = {.B = 2, .H = 5, .W = 6, .C = 3, .K = cfg[k][0], .stride = cfg[k][1],
             .pad = cfg[k][2]};
    size_t OH = (c.H + 2 * c.pad - c.K) / c.stride + 1, OW = (c.W + 2 * c.pad - c.K) / c.stride + 1;
    size_t nin = c.B * c.H * c.W * c.C;
    c.n_out = c.B * OH * OW * c.C;
    c.in = kdp_falloc(nin), c.out = kdp_falloc(c.n_out);
    c.am = calloc(c.n_out, sizeof(int32_t));
    float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(nin);
    fill_distinct(&r, c.in, nin); /* gaps of 0.05 > 2 * step: the argmax never changes */
    fill_uniform(&r, rr, c.n_out, -1, 1);
    fw_maxpool(&c);
    kdp_maxpool_backward(din, rr, c.am, c.B, c.n_out);
    fd_check("fd maxpool din", fw_maxpool, &c, c.in, nin, din, rr, 1e-2f, 1e-4, 1e-4);
    free(c.in), free(c.out), free(c.am), free(rr), free(din);
  }
}
END_TEST

START_TEST(test_fd_avgpool) {
  kdp_rng r;
  kdp_rng_seed(&r, 32, 0);
  ctx c = {.B = 2, .H = 5, .W = 6, .C = 3, .K = 3, .stride = 2, .pad = 1};
  size_t OH = (c.H + 2 * c.pad - c.K) / c.stride + 1, OW = (c.W + 2 * c.pad - c.K) / c.stride + 1;
  size_t nin = c.B * c.H * c.W * c.C;
  c.n_out = c.B * OH * OW * c.C;
  c.in = kdp_falloc(nin), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(nin);
  fill_uniform(&r, c.in, nin, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_avgpool(&c);
  kdp_avgpool_backward(din, rr, c.B, c.H, c.W, c.C, c.K, c.stride, c.pad);
  fd_check("fd avgpool din", fw_avgpool, &c, c.in, nin, din, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.out), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_gap) {
  kdp_rng r;
  kdp_rng_seed(&r, 33, 0);
  ctx c = {.B = 3, .H = 3, .W = 4, .C = 5};
  size_t nin = c.B * c.H * c.W * c.C;
  c.n_out = c.B * c.C;
  c.in = kdp_falloc(nin), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(nin);
  fill_uniform(&r, c.in, nin, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_gap(&c);
  kdp_gap_backward(din, rr, c.B, c.H * c.W, c.C);
  fd_check("fd gap din", fw_gap, &c, c.in, nin, din, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.out), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_relu) {
  kdp_rng r;
  kdp_rng_seed(&r, 34, 0);
  ctx c = {.n_out = 60};
  c.in = kdp_falloc(c.n_out), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(c.n_out);
  fill_away_from_zero(&r, c.in, c.n_out);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_relu(&c);
  kdp_relu_backward(din, rr, c.out, c.n_out);
  fd_check("fd relu din", fw_relu, &c, c.in, c.n_out, din, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.out), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_dropout) {
  kdp_rng r;
  kdp_rng_seed(&r, 35, 0);
  ctx c = {.n_out = 200, .p = 0.3f};
  c.in = kdp_falloc(c.n_out), c.out = kdp_falloc(c.n_out), c.mask = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(c.n_out);
  fill_uniform(&r, c.in, c.n_out, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_dropout(&c);
  size_t zeros = 0;
  for (size_t i = 0; i < c.n_out; i++) {
    ck_assert(c.mask[i] == 0.0f || fabsf(c.mask[i] - 1.0f / 0.7f) < 1e-6f);
    zeros += c.mask[i] == 0.0f;
  }
  ck_assert_msg(zeros > 30 && zeros < 90, "dropout p=0.3 dropped %zu of 200", zeros);
  kdp_dropout_backward(din, rr, c.mask, c.n_out);
  fd_check("fd dropout din", fw_dropout, &c, c.in, c.n_out, din, rr, 1e-2f, 1e-4, 1e-4);
  /* p = 0 copies */
  kdp_dropout_forward(c.out, c.mask, c.in, c.n_out, 0.0f, &r);
  assert_exact("dropout p=0", c.out, c.in, c.n_out);
  free(c.in), free(c.out), free(c.mask), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_flatten) {
  kdp_rng r;
  kdp_rng_seed(&r, 36, 0);
  ctx c = {.B = 2, .H = 3, .W = 2, .C = 4};
  c.n_out = c.B * c.H * c.W * c.C;
  c.in = kdp_falloc(c.n_out), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(c.n_out);
  fill_uniform(&r, c.in, c.n_out, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_flatten(&c);
  kdp_flatten_backward(din, rr, c.B, c.H, c.W, c.C);
  fd_check("fd flatten din", fw_flatten, &c, c.in, c.n_out, din, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.out), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_add) {
  kdp_rng r;
  kdp_rng_seed(&r, 37, 0);
  ctx c = {.n_out = 50};
  c.in = kdp_falloc(c.n_out), c.in2 = kdp_falloc(c.n_out), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *da = kdp_falloc(c.n_out), *db = kdp_falloc(c.n_out);
  fill_uniform(&r, c.in, c.n_out, -1, 1);
  fill_uniform(&r, c.in2, c.n_out, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_add(&c);
  kdp_add_backward(da, db, rr, c.n_out);
  fd_check("fd add da", fw_add, &c, c.in, c.n_out, da, rr, 1e-2f, 1e-4, 1e-4);
  fd_check("fd add db", fw_add, &c, c.in2, c.n_out, db, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.in2), free(c.out), free(rr), free(da), free(db);
}
END_TEST

START_TEST(test_fd_shortcut_a) {
  kdp_rng r;
  kdp_rng_seed(&r, 38, 0);
  ctx c = {.B = 2, .H = 5, .W = 4, .C = 3, .Cout = 7, .stride = 2};
  size_t nin = c.B * c.H * c.W * c.C;
  c.n_out = c.B * 3 * 2 * c.Cout;
  c.in = kdp_falloc(nin), c.out = kdp_falloc(c.n_out);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(nin);
  fill_uniform(&r, c.in, nin, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_shortcut(&c);
  kdp_shortcut_a_backward(din, rr, c.B, c.H, c.W, c.C, c.Cout, c.stride);
  fd_check("fd shortcut_a din", fw_shortcut, &c, c.in, nin, din, rr, 1e-2f, 1e-4, 1e-4);
  free(c.in), free(c.out), free(rr), free(din);
}
END_TEST

START_TEST(test_fd_bn) {
  kdp_rng r;
  kdp_rng_seed(&r, 39, 0);
  ctx c = {.B = 12, .C = 3}; /* B plays N (rows) here */
  c.n_out = c.B * c.C;
  c.in = kdp_falloc(c.n_out), c.out = kdp_falloc(c.n_out), c.xhat = kdp_falloc(c.n_out);
  c.invstd = kdp_falloc(c.C), c.rm = kdp_falloc(c.C), c.rv = kdp_falloc(c.C);
  c.gamma = kdp_falloc(c.C), c.beta = kdp_falloc(c.C);
  float *rr = kdp_falloc(c.n_out), *din = kdp_falloc(c.n_out);
  float *dg = kdp_falloc(c.C), *dbeta = kdp_falloc(c.C);
  fill_uniform(&r, c.in, c.n_out, -1, 2);
  fill_uniform(&r, c.gamma, c.C, 0.5f, 1.5f);
  fill_uniform(&r, c.beta, c.C, -1, 1);
  fill_uniform(&r, rr, c.n_out, -1, 1);
  fw_bn(&c);
  kdp_bn_backward(din, dg, dbeta, rr, c.xhat, c.invstd, c.gamma, c.B, c.C);
  /* non-linear in the input: O(eps^2) truncation plus float rounding / eps */
  fd_check("fd bn din", fw_bn, &c, c.in, c.n_out, din, rr, 1e-2f, 3e-4, 1e-3);
  fd_check("fd bn dgamma", fw_bn, &c, c.gamma, c.C, dg, rr, 1e-2f, 3e-4, 3e-4);
  fd_check("fd bn dbeta", fw_bn, &c, c.beta, c.C, dbeta, rr, 1e-2f, 3e-4, 3e-4);
  free(c.in), free(c.out), free(c.xhat), free(c.invstd), free(c.rm), free(c.rv);
  free(c.gamma), free(c.beta), free(rr), free(din), free(dg), free(dbeta);
}
END_TEST

/* ------------------------------------------------------------------ accumulate contract */

/* g2 (after two identical backward calls from zero) must be twice g1 (after one). */
static void assert_doubled(const char *what, const float *g1, const float *g2, size_t n) {
  float *twice = kdp_falloc(n);
  int nonzero = 0;
  for (size_t i = 0; i < n; i++) {
    twice[i] = 2.0f * g1[i];
    nonzero |= g1[i] != 0.0f;
  }
  ck_assert_msg(nonzero, "%s: gradient is all zero, the accumulate test would be vacuous", what);
  kdp_test_assert_close(what, g2, twice, n, 1e-5, 1e-5);
  free(twice);
}

START_TEST(test_accumulate) {
  kdp_rng r;
  kdp_rng_seed(&r, 51, 0);
  enum { B = 3, H = 6, W = 6, C = 4, CO = 5 };
  const size_t n = B * H * W * C;
  float *x = kdp_falloc(n), *x2 = kdp_falloc(n), *g = kdp_falloc(4 * n);
  fill_away_from_zero(&r, x, n);
  fill_uniform(&r, x2, n, -1, 1);
  fill_uniform(&r, g, 4 * n, -1, 1);
  float *a1 = kdp_falloc(4 * n), *a2 = kdp_falloc(4 * n);
  float *b1 = kdp_falloc(4 * n), *b2 = kdp_falloc(4 * n);
  float *c1 = kdp_falloc(4 * n), *c2 = kdp_falloc(4 * n);
  float *out = kdp_falloc(4 * n);
#define RESET()                                                 \
  do {                                                          \
    memset(a1, 0, 4 * n * sizeof(float));                      \
    memset(a2, 0, 4 * n * sizeof(float));                      \
    memset(b1, 0, 4 * n * sizeof(float));                      \
    memset(b2, 0, 4 * n * sizeof(float));                      \
    memset(c1, 0, 4 * n * sizeof(float));                      \
    memset(c2, 0, 4 * n * sizeof(float));                      \
  } while (0)

  /* dense: in (B x H*W*C) -> (B x CO) */
  {
    const size_t I = H * W * C;
    float *w = kdp_falloc(CO * I);
    fill_uniform(&r, w, CO * I, -1, 1);
    RESET();
    kdp_dense_backward(a1, b1, c1, g, x, w, B, I, CO);
    kdp_dense_backward(a2, b2, c2, g, x, w, B, I, CO);
    kdp_dense_backward(a2, b2, c2, g, x, w, B, I, CO);
    assert_doubled("dense din", a1, a2, B * I);
    assert_doubled("dense dw", b1, b2, CO * I);
    assert_doubled("dense db", c1, c2, CO);
    free(w);
  }
  /* conv, BLAS path (3x3) and pointwise path (1x1) */
  for (size_t K = 1; K <= 3; K += 2) {
    kdp_conv_shape s = {.B = B, .H = H, .W = W, .Cin = C, .Cout = CO, .K = K, .stride = 1,
                        .pad = K / 2};
    kdp_conv_shape_init(&s);
    size_t nw = CO * K * K * C;
    float *w = kdp_falloc(nw), *sc = kdp_falloc(kdp_conv_scratch_floats(&s));
    fill_uniform(&r, w, nw, -1, 1);
    RESET();
    kdp_conv2d_backward(a1, b1, c1, g, x, w, sc, &s);
    kdp_conv2d_backward(a2, b2, c2, g, x, w, sc, &s);
    kdp_conv2d_backward(a2, b2, c2, g, x, w, sc, &s);
    assert_doubled("conv din", a1, a2, n);
    assert_doubled("conv dw", b1, b2, nw);
    assert_doubled("conv db", c1, c2, CO);
    free(w), free(sc);
  }
  /* maxpool */
  {
    int32_t *am = calloc(n, sizeof(int32_t));
    kdp_maxpool_forward(out, am, x, B, H, W, C, 2, 2, 0);
    RESET();
    size_t no = B * 3 * 3 * C;
    kdp_maxpool_backward(a1, g, am, B, no);
    kdp_maxpool_backward(a2, g, am, B, no);
    kdp_maxpool_backward(a2, g, am, B, no);
    assert_doubled("maxpool din", a1, a2, n);
    free(am);
  }
  RESET();
  kdp_avgpool_backward(a1, g, B, H, W, C, 3, 2, 1);
  kdp_avgpool_backward(a2, g, B, H, W, C, 3, 2, 1);
  kdp_avgpool_backward(a2, g, B, H, W, C, 3, 2, 1);
  assert_doubled("avgpool din", a1, a2, n);

  RESET();
  kdp_gap_backward(a1, g, B, H * W, C);
  kdp_gap_backward(a2, g, B, H * W, C);
  kdp_gap_backward(a2, g, B, H * W, C);
  assert_doubled("gap din", a1, a2, n);

  kdp_relu_forward(out, x, n);
  RESET();
  kdp_relu_backward(a1, g, out, n);
  kdp_relu_backward(a2, g, out, n);
  kdp_relu_backward(a2, g, out, n);
  assert_doubled("relu din", a1, a2, n);

  {
    float *mask = kdp_falloc(n);
    kdp_rng dr;
    kdp_rng_seed(&dr, 3, KDP_STREAM_DROPOUT);
    kdp_dropout_forward(out, mask, x, n, 0.5f, &dr);
    RESET();
    kdp_dropout_backward(a1, g, mask, n);
    kdp_dropout_backward(a2, g, mask, n);
    kdp_dropout_backward(a2, g, mask, n);
    assert_doubled("dropout din", a1, a2, n);
    free(mask);
  }

  RESET();
  kdp_flatten_backward(a1, g, B, H, W, C);
  kdp_flatten_backward(a2, g, B, H, W, C);
  kdp_flatten_backward(a2, g, B, H, W, C);
  assert_doubled("flatten din", a1, a2, n);

  RESET();
  kdp_add_backward(a1, b1, g, n);
  kdp_add_backward(a2, b2, g, n);
  kdp_add_backward(a2, b2, g, n);
  assert_doubled("add da", a1, a2, n);
  assert_doubled("add db", b1, b2, n);

  RESET();
  kdp_shortcut_a_backward(a1, g, B, H, W, C, 2 * C, 2);
  kdp_shortcut_a_backward(a2, g, B, H, W, C, 2 * C, 2);
  kdp_shortcut_a_backward(a2, g, B, H, W, C, 2 * C, 2);
  assert_doubled("shortcut_a din", a1, a2, n);

  {
    const size_t N = B * H * W;
    float *xh = kdp_falloc(n), *is = kdp_falloc(C), *rm = kdp_falloc(C), *rv = kdp_falloc(C);
    float *gm = kdp_falloc(C), *bt = kdp_falloc(C);
    fill_uniform(&r, gm, C, 0.5f, 1.5f);
    kdp_bn_forward_train(out, xh, is, rm, rv, x2, gm, bt, N, C, 0.1f, 1e-5f);
    RESET();
    kdp_bn_backward(a1, b1, c1, g, xh, is, gm, N, C);
    kdp_bn_backward(a2, b2, c2, g, xh, is, gm, N, C);
    kdp_bn_backward(a2, b2, c2, g, xh, is, gm, N, C);
    assert_doubled("bn din", a1, a2, n);
    assert_doubled("bn dgamma", b1, b2, C);
    assert_doubled("bn dbeta", c1, c2, C);
    free(xh), free(is), free(rm), free(rv), free(gm), free(bt);
  }
#undef RESET
  free(x), free(x2), free(g), free(a1), free(a2), free(b1), free(b2), free(c1), free(c2);
  free(out);
}
END_TEST

/* ------------------------------------------------------------------ semantics */

START_TEST(test_bn_running_stats) {
  /* N=4 rows, C=2. channel 0: 1,2,3,4 -> mean 2.5, biased var 1.25, unbiased 5/3.
     channel 1: 10,10,10,14 -> mean 11, biased var 3, unbiased 4. eps = 1 (inside the sqrt):
     invstd = 1/sqrt(2.25) = 2/3 and 1/sqrt(4) = 1/2. */
  const float in[8] = {1, 10, 2, 10, 3, 10, 4, 14};
  const float gamma[2] = {1, 2}, beta[2] = {0, -1};
  float out[8], xhat[8], invstd[2];
  float rm[2] = {0, 1}, rv[2] = {1, 2};
  kdp_bn_forward_train(out, xhat, invstd, rm, rv, in, gamma, beta, 4, 2, 0.1f, 1.0f);
  ck_assert_float_eq_tol(invstd[0], 2.0f / 3.0f, 1e-6f);
  ck_assert_float_eq_tol(invstd[1], 0.5f, 1e-6f);
  ck_assert_float_eq_tol(rm[0], 0.25f, 1e-6f);                        /* 0.9*0 + 0.1*2.5 */
  ck_assert_float_eq_tol(rm[1], 2.0f, 1e-6f);                         /* 0.9*1 + 0.1*11 */
  ck_assert_float_eq_tol(rv[0], 0.9f + 0.1f * 5.0f / 3.0f, 1e-6f);    /* unbiased var */
  ck_assert_float_eq_tol(rv[1], 2.2f, 1e-6f);                         /* 0.9*2 + 0.1*4 */
  ck_assert_float_eq_tol(xhat[6], 1.0f, 1e-6f);                       /* (4-2.5)*2/3 */
  ck_assert_float_eq_tol(xhat[0], -1.0f, 1e-6f);                      /* (1-2.5)*2/3 */
  ck_assert_float_eq_tol(out[7], 2.0f * 1.5f - 1.0f, 1e-6f);          /* (14-11)/2 */
  ck_assert_float_eq_tol(out[1], 2.0f * -0.5f - 1.0f, 1e-6f);         /* (10-11)/2 */

  /* eval: (x - rm) / sqrt(rv + eps) * gamma + beta with rv + eps = 4 and 9 */
  const float x2[4] = {5, 1, -3, -5};
  const float m2[2] = {1, -2}, v2[2] = {3, 8}, g2[2] = {2, 1}, b2[2] = {0.5f, 0};
  float o2[4];
  kdp_bn_forward_eval(o2, x2, g2, b2, m2, v2, 2, 2, 1.0f);
  ck_assert_float_eq_tol(o2[0], 4.5f, 1e-6f);  /* (5-1)/2*2+0.5 */
  ck_assert_float_eq_tol(o2[1], 1.0f, 1e-6f);  /* (1+2)/3 */
  ck_assert_float_eq_tol(o2[2], -3.5f, 1e-6f); /* (-3-1)/2*2+0.5 */
  ck_assert_float_eq_tol(o2[3], -1.0f, 1e-6f); /* (-5+2)/3 */
}
END_TEST

START_TEST(test_bn_large_offset) {
  /* mean >> std: the shifted double sums must still give the right variance */
  enum { N = 1000, C = 2 };
  float *in = kdp_falloc(N * C), *out = kdp_falloc(N * C), *xh = kdp_falloc(N * C);
  float invstd[C], rm[C] = {0, 0}, rv[C] = {1, 1}, g[C] = {1, 1}, b[C] = {0, 0};
  for (size_t i = 0; i < N; i++) {
    in[i * C] = 1000.0f + ((i & 1) ? 0.5f : -0.5f); /* var exactly 0.25 */
    in[i * C + 1] = -3.0f + ((i & 1) ? 2.0f : -2.0f); /* var exactly 4 */
  }
  kdp_bn_forward_train(out, xh, invstd, rm, rv, in, g, b, N, C, 1.0f, 0.0f);
  ck_assert_float_eq_tol(invstd[0], 2.0f, 1e-4f);
  ck_assert_float_eq_tol(invstd[1], 0.5f, 1e-6f);
  ck_assert_float_eq_tol(rm[0], 1000.0f, 1e-3f);
  ck_assert_float_eq_tol(rv[0], 0.25f * N / (N - 1), 1e-5f);
  free(in), free(out), free(xh);
}
END_TEST

START_TEST(test_flatten_nchw) {
  enum { B = 2, H = 2, W = 3, C = 4 };
  float in[B * H * W * C], out[B * H * W * C], back[B * H * W * C];
  for (size_t b = 0; b < B; b++)
    for (size_t h = 0; h < H; h++)
      for (size_t w = 0; w < W; w++)
        for (size_t c = 0; c < C; c++)
          in[((b * H + h) * W + w) * C + c] = (float)(1000 * b + 100 * c + 10 * h + w);
  kdp_flatten_forward(out, in, B, H, W, C);
  for (size_t b = 0; b < B; b++)
    for (size_t c = 0; c < C; c++)
      for (size_t h = 0; h < H; h++)
        for (size_t w = 0; w < W; w++)
          ck_assert_float_eq(out[b * C * H * W + c * H * W + h * W + w],
                             (float)(1000 * b + 100 * c + 10 * h + w));
  memset(back, 0, sizeof back);
  kdp_flatten_backward(back, out, B, H, W, C); /* the inverse permutation */
  assert_exact("flatten backward", back, in, B * H * W * C);
}
END_TEST

START_TEST(test_shortcut_a_padding) {
  /* B=1, H=5 (odd: 3 rows kept, as x[:, :, ::2]), W=4, Cin=2 -> Cout=6: 2 zero channels each side */
  enum { H = 5, W = 4, CI = 2, CO = 6, OH = 3, OW = 2 };
  float in[H * W * CI], out[OH * OW * CO];
  for (size_t h = 0; h < H; h++)
    for (size_t w = 0; w < W; w++)
      for (size_t c = 0; c < CI; c++) in[(h * W + w) * CI + c] = (float)(1 + 100 * h + 10 * w + c);
  for (size_t i = 0; i < OH * OW * CO; i++) out[i] = 12345.0f;
  kdp_shortcut_a_forward(out, in, 1, H, W, CI, CO, 2);
  for (size_t oh = 0; oh < OH; oh++)
    for (size_t ow = 0; ow < OW; ow++) {
      const float *o = out + (oh * OW + ow) * CO;
      ck_assert_float_eq(o[0], 0.0f);
      ck_assert_float_eq(o[1], 0.0f);
      ck_assert_float_eq(o[2], (float)(1 + 200 * oh + 20 * ow));
      ck_assert_float_eq(o[3], (float)(2 + 200 * oh + 20 * ow));
      ck_assert_float_eq(o[4], 0.0f);
      ck_assert_float_eq(o[5], 0.0f);
    }
}
END_TEST

START_TEST(test_maxpool_semantics) {
  /* ties -> first max in scan order; padded positions never win over negative inputs */
  enum { H = 4, W = 4 };
  float in[H * W], out[4];
  int32_t am[4];
  for (size_t i = 0; i < H * W; i++) in[i] = 7.0f; /* all equal */
  kdp_maxpool_forward(out, am, in, 1, H, W, 1, 2, 2, 0);
  ck_assert_int_eq(am[0], 0);
  ck_assert_int_eq(am[1], 2);
  ck_assert_int_eq(am[2], 8);
  ck_assert_int_eq(am[3], 10);
  for (size_t i = 0; i < H * W; i++) in[i] = -1.0f - (float)i;
  float out3[9];
  int32_t am3[9];
  kdp_maxpool_forward(out3, am3, in, 1, H, W, 1, 3, 2, 1); /* OH = (4+2-3)/2+1 = 2 */
  ck_assert_float_eq(out3[0], -1.0f); /* window rows -1..1, cols -1..1: best real is in[0] */
  ck_assert_int_eq(am3[0], 0);
  ck_assert_float_eq(out3[3], -6.0f); /* rows 1..3, cols 1..3: best is in[1*4+1] = -6 */
  ck_assert_int_eq(am3[3], 5);
  /* multi-channel: argmax indexes the flat NHWC input */
  float in2[2 * 2 * 3] = {1, 9, 3, 4, 2, 6, 0, 8, 6, 2, 9, 5};
  float o2[3];
  int32_t a2[3];
  kdp_maxpool_forward(o2, a2, in2, 1, 2, 2, 3, 2, 2, 0);
  ck_assert_float_eq(o2[0], 4.0f);
  ck_assert_int_eq(a2[0], 3);
  ck_assert_float_eq(o2[1], 9.0f); /* tie between index 1 and 10: first wins */
  ck_assert_int_eq(a2[1], 1);
  ck_assert_float_eq(o2[2], 6.0f); /* tie between 5 and 8 */
  ck_assert_int_eq(a2[2], 5);
}
END_TEST

START_TEST(test_avgpool_count_include_pad) {
  /* 2x2 input of ones, K=3 stride 1 pad 1: every window holds 4 of 9 ones at the corners */
  float in[4] = {1, 1, 1, 1}, out[4];
  kdp_avgpool_forward(out, in, 1, 2, 2, 1, 3, 1, 1);
  for (int i = 0; i < 4; i++) ck_assert_float_eq_tol(out[i], 4.0f / 9.0f, 1e-7f);
}
END_TEST

/* ------------------------------------------------------------------ limits */

START_TEST(test_limits_conv) {
  /* B=1; 1x1 spatial with K=3 pad 1; pad >= K/2 (K=3 pad 2, K=1 pad 1, K=5 pad 4);
     H + 2 pad == K (one output) */
  static const size_t shapes[][8] = {
      {1, 1, 1, 3, 4, 3, 1, 1}, {1, 4, 4, 2, 3, 3, 1, 2}, {2, 3, 3, 2, 2, 1, 1, 1},
      {1, 2, 3, 1, 2, 5, 1, 4}, {1, 1, 1, 1, 1, 1, 1, 0}, {1, 1, 1, 2, 2, 3, 2, 1},
      {1, 3, 3, 1, 1, 5, 3, 1},
  };
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const size_t *v = shapes[i];
    kdp_conv_shape s = {.B = v[0], .H = v[1], .W = v[2], .Cin = v[3], .Cout = v[4], .K = v[5],
                        .stride = v[6], .pad = v[7]};
    check_conv_shape(s, 1, 300 + i);
  }
  /* H + 2 pad < K: no output, nothing written, no scratch */
  kdp_conv_shape z = {.B = 2, .H = 2, .W = 2, .Cin = 1, .Cout = 1, .K = 5, .stride = 1, .pad = 0};
  kdp_conv_shape_init(&z);
  ck_assert_uint_eq(z.OH, 0);
  ck_assert_uint_eq(z.OW, 0);
  ck_assert_uint_eq(kdp_conv_scratch_floats(&z), 0);
  float in[8] = {1, 2, 3, 4, 5, 6, 7, 8}, w[25] = {0}, din[8] = {0}, dw[25] = {0};
  float canary = 42.0f;
  kdp_conv2d_forward(&canary, in, w, NULL, NULL, &z);
  kdp_conv2d_backward(din, dw, NULL, &canary, in, w, NULL, &z);
  ck_assert_float_eq(canary, 42.0f);
  for (int i = 0; i < 8; i++) ck_assert_float_eq(din[i], 0.0f);
  /* B = 0 */
  kdp_conv_shape e = {.B = 0, .H = 4, .W = 4, .Cin = 1, .Cout = 1, .K = 3, .stride = 1, .pad = 1};
  kdp_conv_shape_init(&e);
  ck_assert_uint_eq(kdp_conv_scratch_floats(&e), 0);
  kdp_conv2d_forward(&canary, in, w, NULL, NULL, &e);
  ck_assert_float_eq(canary, 42.0f);
}
END_TEST

START_TEST(test_limits_dense) {
  check_dense_shape(1, 1, 1, 61);
  check_dense_shape(1, 1000, 1, 62);
  check_dense_shape(1000, 1, 3, 63);
  /* B = 0: nothing written */
  float canary = 42.0f, w = 1.0f, b = 1.0f;
  kdp_dense_forward(&canary, &w, &w, &b, 0, 1, 1);
  ck_assert_float_eq(canary, 42.0f);
  /* I = 0: the output is the bias */
  float out[2] = {0, 0};
  float bias = 3.0f;
  kdp_dense_forward(out, NULL, NULL, &bias, 2, 0, 1);
  ck_assert_float_eq(out[0], 3.0f);
  ck_assert_float_eq(out[1], 3.0f);
}
END_TEST

START_TEST(test_limits_pool_bn) {
  /* 1x1 spatial: maxpool K=1, K=2 pad 1 (pad = K/2), gap HW=1 */
  float in[3] = {-2, 5, 0.5f}, out[3], din[3] = {0, 0, 0};
  int32_t am[3];
  kdp_maxpool_forward(out, am, in, 1, 1, 1, 3, 1, 1, 0);
  assert_exact("maxpool 1x1", out, in, 3);
  kdp_maxpool_forward(out, am, in, 1, 1, 1, 3, 2, 2, 1); /* OH = (1+2-2)/2+1 = 1 */
  assert_exact("maxpool 1x1 pad", out, in, 3); /* -2 beats the padding */
  for (int c = 0; c < 3; c++) ck_assert_int_eq(am[c], c);
  kdp_gap_forward(out, in, 1, 1, 3);
  assert_exact("gap HW=1", out, in, 3);
  kdp_gap_backward(din, in, 1, 1, 3);
  assert_exact("gap HW=1 backward", din, in, 3);
  /* avgpool 1x1 input, K=3 pad 1: one window holding 1 of 9 */
  kdp_avgpool_forward(out, in, 1, 1, 1, 3, 3, 1, 1);
  for (int c = 0; c < 3; c++) ck_assert_float_eq_tol(out[c], in[c] / 9.0f, 1e-7f);
  /* BN over a single row: variance 0, xhat 0, out = beta, running var gets the biased 0 */
  float g[3] = {1, 2, 3}, b[3] = {0.1f, 0.2f, 0.3f}, xh[3], is[3], rm[3] = {0, 0, 0},
        rv[3] = {1, 1, 1};
  kdp_bn_forward_train(out, xh, is, rm, rv, in, g, b, 1, 3, 0.1f, 1e-5f);
  for (int c = 0; c < 3; c++) {
    ck_assert(isfinite(out[c]) && isfinite(rv[c]) && isfinite(is[c]));
    ck_assert_float_eq_tol(out[c], b[c], 1e-6f);
    ck_assert_float_eq_tol(rv[c], 0.9f, 1e-6f);
  }
  /* shortcut with Cout == Cin, stride 1: identity */
  kdp_shortcut_a_forward(out, in, 1, 1, 1, 3, 3, 1);
  assert_exact("shortcut identity", out, in, 3);
}
END_TEST

/* kdp_bn_backward_set writes what zeroing din and calling kdp_bn_backward would accumulate */
START_TEST(test_bn_backward_set) {
  const size_t N = 37, C = 5;
  kdp_rng r;
  kdp_rng_seed(&r, 5, 5);
  float *x = kdp_falloc(N * C), *y = kdp_falloc(N * C), *xhat = kdp_falloc(N * C);
  float *dout = kdp_falloc(N * C), *d1 = kdp_falloc(N * C), *d2 = kdp_falloc(N * C);
  float g[5], bt[5], rm[5] = {0}, rv[5] = {1, 1, 1, 1, 1}, inv[5];
  float dg1[5] = {0}, db1[5] = {0}, dg2[5] = {0}, db2[5] = {0};
  for (size_t i = 0; i < N * C; i++) {
    x[i] = 3.0f * kdp_rng_normal(&r) + 1.0f;
    dout[i] = kdp_rng_normal(&r);
    d2[i] = 123.0f; /* garbage that _set must overwrite */
  }
  for (size_t c = 0; c < C; c++) {
    g[c] = 0.5f + (float)c;
    bt[c] = 0.1f * (float)c;
  }
  kdp_bn_forward_train(y, xhat, inv, rm, rv, x, g, bt, N, C, 0.1f, 1e-5f);
  kdp_bn_backward(d1, dg1, db1, dout, xhat, inv, g, N, C);
  kdp_bn_backward_set(d2, dg2, db2, dout, xhat, inv, g, N, C);
  for (size_t i = 0; i < N * C; i++) ck_assert_msg(d1[i] == d2[i], "din[%zu]: %g vs %g", i, d1[i], d2[i]);
  for (size_t c = 0; c < C; c++) ck_assert(dg1[c] == dg2[c] && db1[c] == db2[c]);
  free(x);
  free(y);
  free(xhat);
  free(dout);
  free(d1);
  free(d2);
}
END_TEST

/* The fused conv -> bn -> maxpool -> relu block against the BLAS conv and the unfused layers:
   the conv output is bit-for-bit the same; the batch statistics are summed per chunk (the
   grouping of rows differs where a chunk's row count is not a multiple of 4) and the backward
   sums in another order, so the rest agrees to float rounding. */
static void check_cbpr_shape(kdp_conv_shape s, uint64_t seed) {
  kdp_conv_shape_init(&s);
  const size_t C = s.Cout, N = s.B * s.OH * s.OW, nin = s.B * s.H * s.W * s.Cin;
  const size_t np = s.B * (s.OH / 2) * (s.OW / 2) * C, nw = C * s.K * s.K * s.Cin;
  char what[160];
  kdp_rng r;
  kdp_rng_seed(&r, seed, 0);
  float *in = kdp_falloc(nin), *w = kdp_falloc(nw), *b = kdp_falloc(C), *g = kdp_falloc(C);
  float *bt = kdp_falloc(C), *dout = kdp_falloc(np);
  fill_uniform(&r, in, nin, -1, 1);
  fill_uniform(&r, w, nw, -1, 1);
  fill_uniform(&r, b, C, -1, 1);
  fill_uniform(&r, g, C, -1.5f, 1.5f); /* negative gammas flip which value wins the pool */
  fill_uniform(&r, bt, C, -0.5f, 0.5f);
  fill_uniform(&r, dout, np, -1, 1);
  float *scratch = kdp_falloc(kdp_conv_bn_pool_relu_scratch_floats(&s) + 1);
  /* unfused */
  float *y1 = kdp_falloc(N * C), *bo = kdp_falloc(N * C), *xhat = kdp_falloc(N * C);
  float *pool = kdp_falloc(np + 1), *out1 = kdp_falloc(np + 1), *inv1 = kdp_falloc(C);
  float *rm1 = kdp_falloc(C), *rv1 = kdp_falloc(C);
  int32_t *am = kdp_xcalloc(np + 1, sizeof(int32_t));
  for (size_t c = 0; c < C; c++) rv1[c] = 1.0f;
  float *rm2 = fdup(rm1, C), *rv2 = fdup(rv1, C);
  kdp_conv2d_forward(y1, in, w, b, scratch, &s);
  kdp_bn_forward_train(bo, xhat, inv1, rm1, rv1, y1, g, bt, N, C, 0.1f, 1e-5f);
  kdp_maxpool_forward(pool, am, bo, s.B, s.OH, s.OW, C, 2, 2, 0);
  kdp_relu_forward(out1, pool, np);
  /* fused */
  float *y2 = kdp_falloc(N * C), *out2 = kdp_falloc(np + 1), *xwin = kdp_falloc(np + 1);
  float *mean = kdp_falloc(C), *inv2 = kdp_falloc(C);
  uint8_t *win = kdp_xcalloc(np + 1, 1);
  kdp_conv_bn_pool_relu_forward(out2, win, xwin, y2, mean, inv2, rm2, rv2, in, w, b, g, bt,
                                scratch, &s, 1, 0.1f, 1e-5f);
  snprintf(what, sizeof what, "fused block B=%zu H=%zu W=%zu Cin=%zu Cout=%zu K=%zu s=%zu p=%zu",
           s.B, s.H, s.W, s.Cin, C, s.K, s.stride, s.pad);
  assert_exact(what, y2, y1, N * C);
  kdp_test_assert_close(what, out2, out1, np, 1e-6, 1e-6);
  kdp_test_assert_close(what, inv2, inv1, C, 1e-7, 1e-6);
  kdp_test_assert_close(what, rm2, rm1, C, 1e-7, 1e-6);
  kdp_test_assert_close(what, rv2, rv1, C, 1e-7, 1e-6);
  for (size_t i = 0; i < np; i++) {
    size_t p = (size_t)am[i] / C, h = (p / s.OW) % s.OH, wc = p % s.OW;
    ck_assert_msg(win[i] == (h & 1) * 2 + (wc & 1) + (out1[i] > 0.0f ? KDP_WIN_RELU : 0),
                  "%s: winner of pooled %zu", what, i);
    ck_assert(fabsf(xwin[i] - xhat[am[i]]) <= 1e-6f * (1.0f + fabsf(xhat[am[i]])));
  }

  /* backward, accumulating into non-zero gradients */
  float *dp = kdp_falloc(np + 1), *dbn = kdp_falloc(N * C), *dy = kdp_falloc(N * C);
  float *di1 = kdp_falloc(nin), *dw1 = kdp_falloc(nw), *db1 = kdp_falloc(C);
  float *dg1 = kdp_falloc(C), *dbt1 = kdp_falloc(C);
  fill_uniform(&r, di1, nin, -1, 1);
  fill_uniform(&r, dw1, nw, -1, 1);
  fill_uniform(&r, db1, C, -1, 1);
  fill_uniform(&r, dg1, C, -1, 1);
  fill_uniform(&r, dbt1, C, -1, 1);
  float *di2 = fdup(di1, nin), *dw2 = fdup(dw1, nw), *db2 = fdup(db1, C), *dg2 = fdup(dg1, C);
  float *dbt2 = fdup(dbt1, C);
  kdp_relu_backward(dp, dout, out1, np);
  kdp_maxpool_backward(dbn, dp, am, s.B, np);
  kdp_bn_backward(dy, dg1, dbt1, dbn, xhat, inv1, g, N, C);
  kdp_conv2d_backward(di1, dw1, db1, dy, in, w, scratch, &s);
  kdp_conv_bn_pool_relu_backward(di2, 0, dw2, db2, dg2, dbt2, dout, out2, win, xwin, y2, mean,
                                 inv2, in, w, g, scratch, &s);
  kdp_test_assert_close(what, di2, di1, nin, 1e-5, 1e-5);
  kdp_test_assert_close(what, dw2, dw1, nw, 1e-5, 1e-5);
  /* a conv bias in front of a batchnorm has an exact gradient of 0: both are the rounding noise
     of thousands of O(1) terms summed in different orders (a bug would be O(1)) */
  kdp_test_assert_close(what, db2, db1, C, 1e-3, 0);
  kdp_test_assert_close(what, dg2, dg1, C, 1e-5, 1e-5);
  kdp_test_assert_close(what, dbt2, dbt1, C, 1e-5, 1e-5);
  /* din_set overwrites garbage with the gradient alone */
  float *di3 = kdp_falloc(nin);
  for (size_t i = 0; i < nin; i++) di3[i] = 123.0f;
  memset(di1, 0, nin * sizeof(float));
  kdp_conv2d_backward(di1, NULL, NULL, dy, in, w, scratch, &s);
  kdp_conv_bn_pool_relu_backward(di3, 1, NULL, NULL, NULL, NULL, dout, out2, win, xwin, y2, mean,
                                 inv2, in, w, g, scratch, &s);
  kdp_test_assert_close(what, di3, di1, nin, 1e-5, 1e-5);

  /* eval mode: the running statistics */
  kdp_bn_forward_eval(bo, y1, g, bt, rm1, rv1, N, C, 1e-5f);
  kdp_maxpool_forward(pool, am, bo, s.B, s.OH, s.OW, C, 2, 2, 0);
  kdp_relu_forward(out1, pool, np);
  kdp_conv_bn_pool_relu_forward(out2, NULL, NULL, y2, NULL, NULL, rm2, rv2, in, w, b, g, bt,
                                scratch, &s, 0, 0.1f, 1e-5f);
  kdp_test_assert_close(what, out2, out1, np, 1e-6, 1e-6);

  free(in), free(w), free(b), free(g), free(bt), free(dout), free(scratch);
  free(y1), free(bo), free(xhat), free(pool), free(out1), free(inv1), free(rm1), free(rv1);
  free(am), free(rm2), free(rv2), free(y2), free(out2), free(xwin), free(mean), free(inv2);
  free(win), free(dp), free(dbn), free(dy), free(di1), free(dw1), free(db1), free(dg1);
  free(dbt1), free(di2), free(dw2), free(db2), free(dg2), free(dbt2), free(di3);
}

START_TEST(test_conv_bn_pool_relu) {
  /* B, H, W, Cin, Cout, K, stride, pad */
  static const size_t shapes[][8] = {
      {5, 28, 28, 1, 8, 3, 1, 1},  /* the cnn's first block, smaller */
      {11, 14, 14, 32, 64, 3, 1, 1}, /* its second, in chunks with a short last one */
      {3, 7, 9, 3, 5, 3, 1, 1},    /* odd maps: the last row and column are not pooled */
      {4, 6, 6, 3, 4, 1, 1, 0},    /* pointwise */
      {2, 11, 11, 2, 3, 3, 2, 1},  /* stride 2 */
  };
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const size_t *v = shapes[i];
    kdp_conv_shape s = {.B = v[0], .H = v[1], .W = v[2], .Cin = v[3], .Cout = v[4], .K = v[5],
                        .stride = v[6], .pad = v[7]};
    check_cbpr_shape(s, 300 + i);
  }
}
END_TEST

static Suite *layers_suite(void) {
  Suite *s = suite_create("layers");
  TCase *core = kdp_test_case("core");
  tcase_add_test(core, test_dense_naive_vs_blas);
  tcase_add_test(core, test_dense_relu);
  tcase_add_test(core, test_bn_backward_set);
  tcase_add_test(core, test_conv_naive_vs_blas);
  tcase_add_test(core, test_conv_chunked);
  tcase_add_test(core, test_conv_shape_init);
  tcase_add_test(core, test_conv_bn_pool_relu);
  tcase_add_test(core, test_fd_dense);
  tcase_add_test(core, test_fd_conv);
  tcase_add_test(core, test_fd_maxpool);
  tcase_add_test(core, test_fd_avgpool);
  tcase_add_test(core, test_fd_gap);
  tcase_add_test(core, test_fd_relu);
  tcase_add_test(core, test_fd_dropout);
  tcase_add_test(core, test_fd_flatten);
  tcase_add_test(core, test_fd_add);
  tcase_add_test(core, test_fd_shortcut_a);
  tcase_add_test(core, test_fd_bn);
  tcase_add_test(core, test_accumulate);
  tcase_add_test(core, test_bn_running_stats);
  tcase_add_test(core, test_bn_large_offset);
  tcase_add_test(core, test_flatten_nchw);
  tcase_add_test(core, test_shortcut_a_padding);
  tcase_add_test(core, test_maxpool_semantics);
  tcase_add_test(core, test_avgpool_count_include_pad);
  suite_add_tcase(s, core);
  TCase *limits = kdp_test_case("limits");
  tcase_add_test(limits, test_limits_conv);
  tcase_add_test(limits, test_limits_dense);
  tcase_add_test(limits, test_limits_pool_bn);
  suite_add_tcase(s, limits);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(layers_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
