/* test_model.c: the model zoo: sizes against PyTorch, shapes, whole-model finite differences
   (with gradient flowing into the features), init, determinism, eval mode, bad arch strings. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/nn.h"
#include "testutil.h"

static const kdp_input_shape FMNIST = {28, 28, 1, 10};
static const kdp_input_shape CIFAR = {32, 32, 3, 10};

static kdp_model *make(const char *arch, kdp_input_shape in, size_t max_batch) {
  kdp_model *m = NULL;
  kdp_error err = {{0}};
  int rc = kdp_model_create(&m, arch, in, max_batch, &err);
  ck_assert_msg(rc == 0 && m != NULL, "kdp_model_create(%s) = %d: %s", arch, rc, err.msg);
  return m;
}

static void fill_uniform(float *x, size_t n, kdp_rng *rng, float lo, float hi) {
  for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * kdp_rng_uniform(rng);
}

static int ends_with(const char *s, const char *suf) {
  size_t a = strlen(s), b = strlen(suf);
  return a >= b && strcmp(s + a - b, suf) == 0;
}

static int is_bn(const kdp_model *m, size_t i) {
  /* BN tensors are named "*bn*.weight|bias" in every zoo model */
  const char *n = kdp_model_tensor_name(m, i);
  const char *dot = strrchr(n, '.');
  const char *bn = strstr(n, "bn");
  return bn != NULL && dot != NULL && bn < dot && strchr(bn, '.') == dot;
}

/* ------------------------------------------------------------------ sizes vs PyTorch */

/* Printed by tests/gen_golden.py ("parameter counts"), from its PyTorch definitions:
   CIFAR ResNets with option-A shortcuts (no parameters), bias-free convs, BN affine;
   WRN pre-activation with bias-free 1x1 conv shortcuts where the shape changes. */
typedef struct zoo_case {
  const char *arch;
  int cifar;
  size_t n_params, n_buffers, feature_dim;
} zoo_case;

static const zoo_case ZOO[] = {
    {"mlp(512,256)", 0, 535818, 0, 256},
    {"mlp(64,32)", 0, 52650, 0, 32},
    {"cnn", 0, 421834, 192, 128},
    {"resnet20", 1, 269722, 1376, 64},
    {"resnet32", 1, 464154, 2272, 64},
    {"resnet56", 1, 853018, 4064, 64},
    {"resnet110", 1, 1727962, 8096, 64},
    {"wrn16_2", 1, 691674, 1824, 128},
    {"wrn16_4", 1, 2748890, 3616, 256},
};

START_TEST(test_param_counts) {
  const zoo_case *z = &ZOO[_i];
  kdp_model *m = make(z->arch, z->cifar ? CIFAR : FMNIST, 2);
  ck_assert_msg(kdp_model_n_params(m) == z->n_params, "%s: %zu params, PyTorch has %zu", z->arch,
                kdp_model_n_params(m), z->n_params);
  ck_assert_msg(kdp_model_n_buffers(m) == z->n_buffers, "%s: %zu buffer floats, PyTorch %zu",
                z->arch, kdp_model_n_buffers(m), z->n_buffers);
  ck_assert_msg(kdp_model_feature_dim(m) == z->feature_dim, "%s: feature dim %zu, expected %zu",
                z->arch, kdp_model_feature_dim(m), z->feature_dim);
  ck_assert_uint_eq(kdp_model_n_classes(m), 10);
  ck_assert_str_eq(kdp_model_arch(m), z->arch);
  ck_assert(kdp_model_flops_per_sample(m) > 2.0 * (double)z->n_params * 0.99 ||
            strncmp(z->arch, "mlp", 3) != 0);
  ck_assert(kdp_model_flops_per_sample(m) > 0);
  /* named views tile the arena, names unique */
  size_t off = 0;
  for (size_t i = 0; i < kdp_model_n_tensors(m); i++) {
    ck_assert_msg(kdp_model_tensor_offset(m, i) == off, "%s: tensor %s not contiguous", z->arch,
                  kdp_model_tensor_name(m, i));
    ck_assert(kdp_model_tensor_size(m, i) > 0);
    off += kdp_model_tensor_size(m, i);
    for (size_t j = 0; j < i; j++)
      ck_assert_msg(strcmp(kdp_model_tensor_name(m, i), kdp_model_tensor_name(m, j)) != 0,
                    "%s: tensor name %s twice", z->arch, kdp_model_tensor_name(m, i));
  }
  ck_assert_uint_eq(off, kdp_model_n_params(m));
  off = 0;
  for (size_t i = 0; i < kdp_model_n_buffer_tensors(m); i++) {
    ck_assert_uint_eq(kdp_model_buffer_offset(m, i), off);
    const char *bn = kdp_model_buffer_name(m, i);
    ck_assert_msg(ends_with(bn, i % 2 ? ".running_var" : ".running_mean"), "%s: buffer %zu is %s",
                  z->arch, i, bn);
    off += i + 1 < kdp_model_n_buffer_tensors(m)
               ? kdp_model_buffer_offset(m, i + 1) - kdp_model_buffer_offset(m, i)
               : kdp_model_n_buffers(m) - kdp_model_buffer_offset(m, i);
  }
  ck_assert_uint_eq(off, kdp_model_n_buffers(m));
  kdp_model_free(m);
}
END_TEST

/* The tensor names and their order are the PyTorch state_dict's (checkpoint/golden contract). */
START_TEST(test_tensor_names) {
  kdp_model *m = make("cnn", FMNIST, 1);
  static const char *want[] = {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                               "conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias",
                               "fc1.weight",   "fc1.bias",   "fc2.weight", "fc2.bias"};
  static const size_t size[] = {288, 32, 32, 32, 18432, 64, 64, 64, 401408, 128, 1280, 10};
  ck_assert_uint_eq(kdp_model_n_tensors(m), 12);
  for (size_t i = 0; i < 12; i++) {
    ck_assert_str_eq(kdp_model_tensor_name(m, i), want[i]);
    ck_assert_uint_eq(kdp_model_tensor_size(m, i), size[i]);
  }
  ck_assert_uint_eq(kdp_model_n_buffer_tensors(m), 4);
  ck_assert_str_eq(kdp_model_buffer_name(m, 0), "bn1.running_mean");
  ck_assert_str_eq(kdp_model_buffer_name(m, 3), "bn2.running_var");
  kdp_model_free(m);
  m = make("mlp(512,256)", FMNIST, 1);
  ck_assert_uint_eq(kdp_model_n_tensors(m), 6);
  ck_assert_str_eq(kdp_model_tensor_name(m, 0), "fc1.weight");
  ck_assert_uint_eq(kdp_model_tensor_size(m, 0), 512 * 784);
  ck_assert_str_eq(kdp_model_tensor_name(m, 5), "fc3.bias");
  ck_assert_uint_eq(kdp_model_tensor_size(m, 5), 10);
  kdp_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ shapes */

START_TEST(test_forward_shapes) {
  static const struct {
    const char *arch;
    kdp_input_shape in;
    size_t fdim;
  } cases[] = {{"mlp(512,256)", {28, 28, 1, 10}, 256},
               {"cnn", {28, 28, 1, 10}, 128},
               {"resnet20", {32, 32, 3, 7}, 64},
               {"wrn16_2", {16, 16, 3, 5}, 128}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    const size_t B = 3;
    kdp_input_shape in = cases[c].in;
    kdp_model *m = make(cases[c].arch, in, B);
    kdp_rng rng;
    kdp_rng_seed(&rng, 3, KDP_STREAM_INIT);
    kdp_model_init(m, &rng);
    ck_assert_uint_eq(kdp_model_n_classes(m), in.n_classes);
    ck_assert_uint_eq(kdp_model_feature_dim(m), cases[c].fdim);
    /* the last tensor is the classifier bias: one per class */
    ck_assert_uint_eq(kdp_model_tensor_size(m, kdp_model_n_tensors(m) - 1), in.n_classes);
    size_t nx = B * in.H * in.W * in.C;
    float *x = malloc(nx * sizeof(float));
    fill_uniform(x, nx, &rng, -1, 1);
    for (int train = 1; train >= 0; train--) {
      /* a smaller batch than max_batch is allowed */
      for (size_t b = B - 1; b <= B; b++) {
        const float *z = kdp_model_forward(m, x, b, train, &rng);
        ck_assert_ptr_nonnull(z);
        double s = 0;
        for (size_t i = 0; i < b * in.n_classes; i++) {
          ck_assert_msg(isfinite(z[i]), "%s: logit %zu not finite", cases[c].arch, i);
          s += fabs(z[i]);
        }
        ck_assert_msg(s > 0, "%s: all logits zero", cases[c].arch);
        const float *f = kdp_model_features(m);
        ck_assert_ptr_nonnull(f);
        for (size_t i = 0; i < b * cases[c].fdim; i++) ck_assert(isfinite(f[i]));
      }
    }
    free(x);
    kdp_model_free(m);
  }
}
END_TEST

/* ------------------------------------------------------------------ finite differences */

/* L = sum(r1 * logits) + sum(r2 * features), in double. */
static double fd_loss(kdp_model *m, const float *x, size_t B, const float *r1, const float *r2) {
  const float *z = kdp_model_forward(m, x, B, 1, NULL);
  const float *f = kdp_model_features(m);
  double L = 0;
  for (size_t i = 0; i < B * kdp_model_n_classes(m); i++) L += (double)r1[i] * z[i];
  if (r2)
    for (size_t i = 0; i < B * kdp_model_feature_dim(m); i++) L += (double)r2[i] * f[i];
  return L;
}

/*
 * Central differences in float32 at h = 1e-3 and h/2 ("double-checked"): where the two disagree
 * by more than the tolerance, a ReLU or max-pool kink lies within h of the point and the
 * coordinate is skipped; at least 80% of the coordinates must be checked. Tolerance
 * |analytic - fd| <= 3e-2 |fd| + 3e-3 x (largest gradient): the float32 forward carries ~1e-7
 * relative noise (~1e-6 on L), divided by h it gives ~1e-3; kinks crossed by the perturbation
 * (thousands of ReLUs behind a first-layer weight) and BN over tiny batches shift the
 * difference quotient by a few percent. Exact agreement with PyTorch is test_golden's job;
 * these checks catch structural errors (a missing shortcut or dfeatures term fails by 2x).
 */
static void fd_check(const char *arch, kdp_input_shape in, size_t B, int use_dfeat,
                     size_t coords_per_tensor, size_t tensor_stride) {
  kdp_model *m = make(arch, in, B);
  kdp_rng rng;
  kdp_rng_seed(&rng, 11, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  float *p = kdp_model_params(m);
  /* non-trivial BN affine parameters */
  for (size_t t = 0; t < kdp_model_n_tensors(m); t++)
    if (is_bn(m, t)) {
      float *q = p + kdp_model_tensor_offset(m, t);
      for (size_t i = 0; i < kdp_model_tensor_size(m, t); i++)
        q[i] += 0.3f * (kdp_rng_uniform(&rng) - 0.5f);
    }
  size_t nx = B * in.H * in.W * in.C, C = in.n_classes, F = kdp_model_feature_dim(m);
  float *x = malloc(nx * sizeof(float)), *r1 = malloc(B * C * sizeof(float));
  float *r2 = malloc(B * F * sizeof(float));
  fill_uniform(x, nx, &rng, -1, 1);
  fill_uniform(r1, B * C, &rng, -1, 1);
  fill_uniform(r2, B * F, &rng, -1, 1);

  kdp_model_zero_grad(m);
  (void)fd_loss(m, x, B, r1, use_dfeat ? r2 : NULL);
  kdp_model_backward(m, r1, use_dfeat ? r2 : NULL);
  const float *g = kdp_model_grads(m);
  double gscale = 0;
  for (size_t i = 0; i < kdp_model_n_params(m); i++) gscale = fmax(gscale, fabs(g[i]));
  ck_assert_msg(gscale > 0, "%s: all gradients zero", arch);

  size_t checked = 0, skipped = 0;
  for (size_t t = 0; t < kdp_model_n_tensors(m); t += tensor_stride) {
    size_t off = kdp_model_tensor_offset(m, t), sz = kdp_model_tensor_size(m, t);
    for (size_t k = 0; k < coords_per_tensor; k++) {
      size_t j = off + (k == 0 ? 0 : kdp_rng_below(&rng, (uint32_t)sz));
      double fd[2];
      for (int s = 0; s < 2; s++) {
        float h = s ? 5e-4f : 1e-3f, save = p[j];
        p[j] = save + h;
        double Lp = fd_loss(m, x, B, r1, use_dfeat ? r2 : NULL);
        p[j] = save - h;
        double Lm = fd_loss(m, x, B, r1, use_dfeat ? r2 : NULL);
        p[j] = save;
        fd[s] = (Lp - Lm) / (2.0 * (double)h);
      }
      double tol1 = 3e-2 * fabs(fd[1]) + 3e-3 * gscale;
      if (fabs(fd[0] - fd[1]) > tol1) {
        skipped++;
        continue;
      }
      checked++;
      if (getenv("KDP_TEST_VERBOSE"))
        fprintf(stderr, "  %s%s %s[%zu]: backward %.6g fd %.6g (h=1e-3 %.6g)\n", arch,
                use_dfeat ? "+df" : "", kdp_model_tensor_name(m, t), j - off, (double)g[j],
                fd[1], fd[0]);
      ck_assert_msg(fabs((double)g[j] - fd[1]) <= tol1,
                    "%s%s: d/d %s[%zu]: backward %.6g, finite difference %.6g (h=1e-3: %.6g)",
                    arch, use_dfeat ? " with dfeatures" : "", kdp_model_tensor_name(m, t),
                    j - off, (double)g[j], fd[1], fd[0]);
    }
  }
  ck_assert_msg(checked >= 4 * (checked + skipped) / 5,
                "%s: %zu of %zu coordinates sat on kinks", arch, skipped, checked + skipped);
  free(x);
  free(r1);
  free(r2);
  kdp_model_free(m);
}

START_TEST(test_fd_mlp) {
  kdp_input_shape in = {6, 6, 1, 3};
  fd_check("mlp(7,5)", in, 3, 0, 4, 1);
  fd_check("mlp(7,5)", in, 3, 1, 4, 1);
}
END_TEST

START_TEST(test_fd_seq) {
  kdp_input_shape in = {6, 6, 2, 3};
  fd_check("seq:conv(4,3,1,1),bn,relu,maxpool(2),conv(5,3,1,1),bn,relu,gap,dense(3)", in, 3, 1,
           4, 1);
  fd_check("seq:conv(4,3,1,1),bn,relu,avgpool(2),flatten,dense(6),relu,dense(3)", in, 2, 1, 4, 1);
}
END_TEST

START_TEST(test_fd_cnn) {
  /* the cnn's layers on 8x8 images (fewer ReLU/max-pool units near a kink), train-mode BN,
     features = fc1's ReLU output */
  kdp_input_shape in = {8, 8, 1, 10};
  fd_check("cnn", in, 2, 0, 3, 1);
  fd_check("cnn", in, 2, 1, 3, 1);
}
END_TEST

START_TEST(test_fd_resnet) {
  /* option-A shortcuts (both strides), residual adds, GAP: resnet8 (one block per stage), the
     smallest CIFAR ResNet; resnet20 is the same blocks repeated, and deeper nets on tiny images
     have too many ReLUs near a kink for float32 differences */
  kdp_input_shape in = {8, 8, 3, 4};
  fd_check("resnet8", in, 2, 1, 3, 1);
}
END_TEST

START_TEST(test_fd_wrn) {
  /* pre-activation blocks with 1x1 conv shortcuts */
  kdp_input_shape in = {8, 8, 3, 4};
  fd_check("wrn10_1", in, 2, 1, 2, 1);
}
END_TEST

/* dfeatures joins the backward: grads(r1, r2) = grads(r1, NULL) + grads(0, r2), and NULL
   equals a zero dfeatures. */
START_TEST(test_dfeatures_linear) {
  kdp_input_shape in = {8, 8, 3, 4};
  const size_t B = 2;
  kdp_model *m = make("resnet20", in, B);
  kdp_rng rng;
  kdp_rng_seed(&rng, 5, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  size_t n = kdp_model_n_params(m), F = kdp_model_feature_dim(m), C = in.n_classes;
  float *x = malloc(B * 8 * 8 * 3 * sizeof(float)), *r1 = malloc(B * C * sizeof(float));
  float *r2 = malloc(B * F * sizeof(float)), *z1 = calloc(B * C, sizeof(float));
  float *z2 = calloc(B * F, sizeof(float));
  float *ga = malloc(n * sizeof(float)), *gb = malloc(n * sizeof(float));
  fill_uniform(x, B * 8 * 8 * 3, &rng, -1, 1);
  fill_uniform(r1, B * C, &rng, -1, 1);
  fill_uniform(r2, B * F, &rng, -1, 1);
  (void)kdp_model_forward(m, x, B, 1, NULL);
  kdp_model_zero_grad(m);
  kdp_model_backward(m, r1, r2);
  memcpy(ga, kdp_model_grads(m), n * sizeof(float));
  /* backward accumulates: r1-only then features-only into the same grads */
  kdp_model_zero_grad(m);
  kdp_model_backward(m, r1, NULL);
  memcpy(gb, kdp_model_grads(m), n * sizeof(float));
  kdp_model_backward(m, z1, r2);
  kdp_test_assert_close("grads(r1,r2) vs grads(r1,0)+grads(0,r2)", kdp_model_grads(m), ga, n,
                        1e-5, 1e-4);
  /* the features term really contributes */
  double d = 0;
  for (size_t i = 0; i < n; i++) d = fmax(d, fabs(ga[i] - gb[i]));
  ck_assert_msg(d > 1e-3, "dfeatures had no effect on the grads (max change %g)", d);
  /* NULL == zeros */
  kdp_model_zero_grad(m);
  kdp_model_backward(m, r1, z2);
  ck_assert_msg(memcmp(kdp_model_grads(m), gb, n * sizeof(float)) == 0,
                "zero dfeatures and NULL give different grads");
  free(x), free(r1), free(r2), free(z1), free(z2), free(ga), free(gb);
  kdp_model_free(m);
}
END_TEST

/* kdp_model_backward_set (the trainer's backward: it writes the gradients, no zeroing pass first)
   gives bitwise the gradients of kdp_model_zero_grad + kdp_model_backward whatever the grads held
   before (NaN here), fast and naive kernels, dense, conv, batchnorm, pools, dropout, residual and
   fused blocks, with dfeatures; and input gradients written by the dense GEMMs (beta = 0) equal
   the previous accumulation onto zeros (the whole backward would differ otherwise). */
static void backward_set_check(const char *arch, kdp_input_shape in, size_t B, int naive) {
  kdp_model *m = make(arch, in, B);
  kdp_model_set_naive(m, naive);
  kdp_rng rng, drop1, drop2;
  kdp_rng_seed(&rng, 9, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  const size_t n = kdp_model_n_params(m), F = kdp_model_feature_dim(m), C = in.n_classes;
  const size_t isz = in.H * in.W * in.C;
  float *x = malloc(B * isz * sizeof(float)), *r1 = malloc(B * C * sizeof(float));
  float *r2 = malloc(B * F * sizeof(float)), *ga = malloc(n * sizeof(float));
  fill_uniform(x, B * isz, &rng, -1, 1);
  fill_uniform(r1, B * C, &rng, -1, 1);
  fill_uniform(r2, B * F, &rng, -1, 1);
  for (int feat = 0; feat < 2; feat++) {
    kdp_rng_seed(&drop1, 3, KDP_STREAM_DROPOUT);
    drop2 = drop1;
    (void)kdp_model_forward(m, x, B, 1, &drop1);
    kdp_model_zero_grad(m);
    kdp_model_backward(m, r1, feat ? r2 : NULL);
    memcpy(ga, kdp_model_grads(m), n * sizeof(float));
    (void)kdp_model_forward(m, x, B, 1, &drop2);
    float *g = kdp_model_grads(m);
    for (size_t i = 0; i < n; i++) g[i] = NAN;
    kdp_model_backward_set(m, r1, feat ? r2 : NULL);
    ck_assert_msg(memcmp(g, ga, n * sizeof(float)) == 0,
                  "%s (%s, dfeatures %d): backward_set differs from zero_grad + backward", arch,
                  naive ? "naive" : "fast", feat);
  }
  free(x), free(r1), free(r2), free(ga);
  kdp_model_free(m);
}

/* check on every kind of op, fast and naive kernels */
static void on_each_kind(void (*check)(const char *arch, kdp_input_shape in, size_t B, int naive)) {
  kdp_input_shape mn = {28, 28, 1, 10}, small = {8, 8, 3, 4};
  for (int naive = 0; naive < 2; naive++) {
    check("mlp(64,32)", mn, 8, naive);
    check("cnn", mn, 4, naive);
    check("resnet20", small, 2, naive);
    check("seq:conv(8,3,1,1),bn,relu,maxpool(2,2),dropout(0.3),conv(8,3,1,1),relu,"
          "avgpool(2,2),flatten,dense(16),bn,relu,dense(4)",
          small, 3, naive);
  }
}

START_TEST(test_backward_set) { on_each_kind(backward_set_check); }
END_TEST

/* kdp_model_backward_sgd (the trainer's step at k = 1: each layer's SGD step inside the backward
   pass) gives bitwise the params and momentum of kdp_model_backward_set + kdp_sgd_step over
   three steps (the first-step momentum copy, then the update; nesterov and plain momentum, and
   none), fast and naive kernels; the model's own hook still hears every layer. Fails when a
   layer's step runs before an op that reads its params (tried: one op early). */
static void count_hook(void *ctx, size_t ready) {
  (void)ready;
  ++*(int *)ctx;
}

static void backward_sgd_check(const char *arch, kdp_input_shape in, size_t B, int naive) {
  const float mus[3] = {0.9f, 0.9f, 0.0f};
  const int nesterovs[3] = {1, 0, 0};
  for (int v = 0; v < 3; v++) {
    kdp_model *a = make(arch, in, B), *b = make(arch, in, B);
    kdp_model_set_naive(a, naive);
    kdp_model_set_naive(b, naive);
    kdp_rng rng, da, db;
    kdp_rng_seed(&rng, 11, KDP_STREAM_INIT);
    kdp_model_init(a, &rng);
    kdp_rng_seed(&rng, 11, KDP_STREAM_INIT);
    kdp_model_init(b, &rng);
    const size_t n = kdp_model_n_params(a), F = kdp_model_feature_dim(a), C = in.n_classes;
    const size_t isz = in.H * in.W * in.C;
    float *x = malloc(B * isz * sizeof(float)), *r1 = malloc(B * C * sizeof(float));
    float *r2 = malloc(B * F * sizeof(float));
    kdp_sgd oa, ob;
    kdp_sgd_init(&oa, n, mus[v], 5e-4f, nesterovs[v]);
    kdp_sgd_init(&ob, n, mus[v], 5e-4f, nesterovs[v]);
    int calls = 0, calls_set = 0;
    kdp_rng_seed(&da, 3, KDP_STREAM_DROPOUT);
    db = da;
    for (int s = 0; s < 3; s++) {
      fill_uniform(x, B * isz, &rng, -1, 1);
      fill_uniform(r1, B * C, &rng, -1, 1);
      fill_uniform(r2, B * F, &rng, -1, 1);
      const float lr = 0.1f / (float)(s + 1);
      (void)kdp_model_forward(a, x, B, 1, &da);
      kdp_model_set_backward_hook(a, count_hook, &calls_set);
      kdp_model_backward_set(a, r1, s == 1 ? r2 : NULL);
      kdp_sgd_step(&oa, kdp_model_params(a), kdp_model_grads(a), lr);
      (void)kdp_model_forward(b, x, B, 1, &db);
      kdp_model_set_backward_hook(b, count_hook, &calls);
      kdp_model_backward_sgd(b, r1, s == 1 ? r2 : NULL, &ob, lr);
      ck_assert_msg(memcmp(kdp_model_params(a), kdp_model_params(b), n * sizeof(float)) == 0 &&
                        memcmp(oa.buf, ob.buf, n * sizeof(float)) == 0,
                    "%s (%s, momentum %g, nesterov %d), step %d: backward_sgd differs from "
                    "backward_set + sgd_step",
                    arch, naive ? "naive" : "fast", (double)mus[v], nesterovs[v], s);
      ck_assert_int_eq(ob.n_steps, oa.n_steps);
    }
    ck_assert_int_gt(calls, 0);
    ck_assert_int_eq(calls, calls_set);
    kdp_sgd_free(&oa), kdp_sgd_free(&ob);
    free(x), free(r1), free(r2);
    kdp_model_free(a), kdp_model_free(b);
  }
}

START_TEST(test_backward_sgd) { on_each_kind(backward_sgd_check); }
END_TEST

/* ------------------------------------------------------------------ init, determinism */

/* fan_in of a non-BN tensor: weights (Cout x fan_in): Cout is the size of the next tensor (its
   bias, or the BN that follows a bias-free conv); biases take their weight's fan_in. */
static size_t fan_in_of(const kdp_model *m, size_t t) {
  const char *n = kdp_model_tensor_name(m, t);
  if (ends_with(n, ".bias")) return fan_in_of(m, t - 1);
  ck_assert_msg(t + 1 < kdp_model_n_tensors(m), "%s is the last tensor", n);
  size_t cout = kdp_model_tensor_size(m, t + 1);
  return kdp_model_tensor_size(m, t) / cout;
}

static void check_init(const char *arch, kdp_input_shape in) {
  kdp_model *m = make(arch, in, 1), *m2 = make(arch, in, 1);
  kdp_rng a, b;
  kdp_rng_seed(&a, 42, KDP_STREAM_INIT);
  kdp_rng_seed(&b, 42, KDP_STREAM_INIT);
  /* junk first, so init must overwrite everything */
  memset(kdp_model_buffers(m), 0x7f, kdp_model_n_buffers(m) * sizeof(float));
  memset(kdp_model_params(m2), 0x7f, kdp_model_n_params(m2) * sizeof(float));
  kdp_model_init(m, &a);
  kdp_model_init(m2, &b);
  size_t n = kdp_model_n_params(m);
  ck_assert_msg(memcmp(kdp_model_params(m), kdp_model_params(m2), n * sizeof(float)) == 0,
                "%s: same seed, different params", arch);
  kdp_rng_seed(&b, 43, KDP_STREAM_INIT);
  kdp_model_init(m2, &b);
  size_t same = 0;
  for (size_t i = 0; i < n; i++) same += kdp_model_params(m)[i] == kdp_model_params(m2)[i];
  ck_assert_msg(same < n / 2, "%s: seeds 42 and 43 give %zu equal params of %zu", arch, same, n);

  const float *p = kdp_model_params(m);
  for (size_t t = 0; t < kdp_model_n_tensors(m); t++) {
    const char *name = kdp_model_tensor_name(m, t);
    const float *q = p + kdp_model_tensor_offset(m, t);
    size_t sz = kdp_model_tensor_size(m, t);
    if (is_bn(m, t)) {
      float want = ends_with(name, ".weight") ? 1.0f : 0.0f;
      for (size_t i = 0; i < sz; i++)
        ck_assert_msg(q[i] == want, "%s: %s[%zu] = %g, expected %g", arch, name, i, (double)q[i],
                      (double)want);
      continue;
    }
    size_t fi = fan_in_of(m, t);
    double bound = 1.0 / sqrt((double)fi), amax = 0, mean = 0;
    for (size_t i = 0; i < sz; i++) {
      ck_assert_msg(fabs(q[i]) <= bound * (1 + 1e-6), "%s: %s[%zu] = %g outside +-1/sqrt(%zu)",
                    arch, name, i, (double)q[i], fi);
      amax = fmax(amax, fabs(q[i]));
      mean += q[i];
    }
    mean /= (double)sz;
    /* uniform over the whole range: large tensors come close to the bound, centred on 0 */
    if (sz >= 256) {
      ck_assert_msg(amax > 0.97 * bound, "%s: %s max |w| %g, bound %g", arch, name, amax, bound);
      ck_assert_msg(fabs(mean) < 4.0 * bound / sqrt(3.0 * (double)sz), "%s: %s mean %g", arch,
                    name, mean);
    }
  }
  const float *bf = kdp_model_buffers(m);
  for (size_t j = 0; j < kdp_model_n_buffer_tensors(m); j++) {
    size_t o = kdp_model_buffer_offset(m, j);
    size_t e = j + 1 < kdp_model_n_buffer_tensors(m) ? kdp_model_buffer_offset(m, j + 1)
                                                     : kdp_model_n_buffers(m);
    float want = ends_with(kdp_model_buffer_name(m, j), "running_var") ? 1.0f : 0.0f;
    for (size_t i = o; i < e; i++)
      ck_assert_msg(bf[i] == want, "%s: %s = %g after init", arch, kdp_model_buffer_name(m, j),
                    (double)bf[i]);
  }
  const float *g = kdp_model_grads(m);
  for (size_t i = 0; i < n; i++) ck_assert_msg(g[i] == 0.0f, "%s: grads not zero after init", arch);
  kdp_model_free(m);
  kdp_model_free(m2);
}

START_TEST(test_init) {
  check_init("mlp(512,256)", FMNIST);
  check_init("cnn", FMNIST);
  check_init("resnet20", CIFAR);
}
END_TEST

/* Same seed, same input -> bit-identical logits and grads (no hidden state between runs). */
START_TEST(test_deterministic_steps) {
  float out[2][2 * 10];
  float *grads[2];
  size_t n = 0;
  for (int r = 0; r < 2; r++) {
    kdp_model *m = make("cnn", FMNIST, 2);
    kdp_rng rng;
    kdp_rng_seed(&rng, 9, KDP_STREAM_INIT);
    kdp_model_init(m, &rng);
    float x[2 * 784];
    fill_uniform(x, 2 * 784, &rng, -1, 1);
    const float *z = kdp_model_forward(m, x, 2, 1, &rng);
    memcpy(out[r], z, sizeof out[r]);
    kdp_model_backward(m, z, NULL);
    n = kdp_model_n_params(m);
    grads[r] = malloc(n * sizeof(float));
    memcpy(grads[r], kdp_model_grads(m), n * sizeof(float));
    kdp_model_free(m);
  }
  ck_assert(memcmp(out[0], out[1], sizeof out[0]) == 0);
  ck_assert(memcmp(grads[0], grads[1], n * sizeof(float)) == 0);
  free(grads[0]);
  free(grads[1]);
}
END_TEST

/* ------------------------------------------------------------------ eval mode */

/* Eval mode normalises with the running stats: per-sample output independent of the rest of the
   batch, different from train mode, and the running stats stay untouched. */
static void check_eval(const char *arch, kdp_input_shape in, int naive) {
  const size_t B = 4, C = in.n_classes, D = in.H * in.W * in.C;
  kdp_model *m = make(arch, in, B);
  if (naive) kdp_model_set_naive(m, 1);
  kdp_rng rng;
  kdp_rng_seed(&rng, 21, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  float *x = malloc(B * D * sizeof(float)), *x2 = malloc(B * D * sizeof(float));
  /* a few train forwards on shifted data move the running stats away from 0 / 1 */
  for (int k = 0; k < 5; k++) {
    fill_uniform(x, B * D, &rng, -0.5f, 1.5f);
    (void)kdp_model_forward(m, x, B, 1, &rng);
  }
  size_t nb = kdp_model_n_buffers(m);
  float *buf = malloc(nb * sizeof(float));
  memcpy(buf, kdp_model_buffers(m), nb * sizeof(float));
  int moved = 0;
  for (size_t j = 0; j < kdp_model_n_buffer_tensors(m); j++) {
    float v = buf[kdp_model_buffer_offset(m, j)];
    moved += ends_with(kdp_model_buffer_name(m, j), "running_var") ? v != 1.0f : v != 0.0f;
  }
  ck_assert_msg(moved == (int)kdp_model_n_buffer_tensors(m), "%s: train forward left stats", arch);

  fill_uniform(x, B * D, &rng, -1, 1);
  memcpy(x2, x, D * sizeof(float)); /* same sample 0, different companions */
  fill_uniform(x2 + D, (B - 1) * D, &rng, -3, 3);
  float e1[16], e2[16], e3[16], t1[16], t2[16];
  memcpy(e1, kdp_model_forward(m, x, B, 0, NULL), C * sizeof(float));
  ck_assert_msg(memcmp(buf, kdp_model_buffers(m), nb * sizeof(float)) == 0,
                "%s: eval forward changed the running stats", arch);
  memcpy(e2, kdp_model_forward(m, x2, B, 0, NULL), C * sizeof(float));
  memcpy(e3, kdp_model_forward(m, x, 1, 0, NULL), C * sizeof(float));
  /* per-sample in eval mode; BLAS may pick other kernels for other batch sizes, so 1e-5 */
  kdp_test_assert_close("eval logits of sample 0, other batch", e2, e1, C, 1e-5, 1e-5);
  kdp_test_assert_close("eval logits of sample 0, alone", e3, e1, C, 1e-5, 1e-5);
  memcpy(t1, kdp_model_forward(m, x, B, 1, &rng), C * sizeof(float));
  memcpy(t2, kdp_model_forward(m, x2, B, 1, &rng), C * sizeof(float));
  double d_mode = 0, d_batch = 0;
  for (size_t c = 0; c < C; c++) {
    d_mode = fmax(d_mode, fabs(t1[c] - e1[c]));
    d_batch = fmax(d_batch, fabs(t1[c] - t2[c]));
  }
  ck_assert_msg(d_mode > 1e-3, "%s: train and eval logits agree (%g): running stats unused?",
                arch, d_mode);
  ck_assert_msg(d_batch > 1e-3, "%s: train-mode logits do not depend on the batch (%g)", arch,
                d_batch);
  free(x), free(x2), free(buf);
  kdp_model_free(m);
}

START_TEST(test_eval_mode) {
  check_eval("cnn", FMNIST, 0);
  check_eval("cnn", FMNIST, 1);
  kdp_input_shape in = {8, 8, 3, 10};
  check_eval("resnet20", in, 0);
  check_eval("wrn10_1", in, 0);
}
END_TEST

START_TEST(test_describe) {
  kdp_model *m = make("cnn", FMNIST, 1);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  kdp_model_describe(m, f);
  fclose(f);
  ck_assert_ptr_nonnull(strstr(buf, "cnn"));
  size_t lines = 0;
  for (char *c = buf; *c; c++) lines += *c == '\n';
  ck_assert_msg(lines >= 12, "describe printed %zu lines for the 13-op cnn", lines);
  free(buf);
  kdp_model_free(m);
}
END_TEST

/* ------------------------------------------------------------------ limits */

static const char *BAD_ARCH[] = {"mlp(",      "mlp(0)",   "mlp(5,)",   "mlp(-3)",
                                 "mlp(5,x)",  "resnet21", "resnet",    "resnet20x", "wrn16_0",
                                 "wrn15_2",   "seq:bogus", "seq:",     "seq:conv(4)",
                                 "seq:dense(0)", "seq:dropout(1.5)", "cnnx", "", "MLP(5)"};

START_TEST(test_bad_arch) {
  const char *arch = BAD_ARCH[_i];
  kdp_model *m = (kdp_model *)&m; /* must be reset to NULL */
  kdp_error err = {{0}};
  int rc = kdp_model_create(&m, arch, FMNIST, 4, &err);
  ck_assert_msg(rc == KDP_EINVAL, "'%s': returned %d, expected KDP_EINVAL", arch, rc);
  ck_assert_msg(m == NULL, "'%s': *out not NULL on failure", arch);
  ck_assert_msg(err.msg[0] != 0, "'%s': no message", arch);
  if (arch[0]) ck_assert_msg(strstr(err.msg, arch) != NULL, "'%s': message does not name it: %s",
                             arch, err.msg);
}
END_TEST

START_TEST(test_bad_shapes) {
  kdp_model *m = NULL;
  kdp_error err = {{0}};
  kdp_input_shape zero = {0, 28, 1, 10}, one_class = {28, 28, 1, 1}, tiny = {2, 2, 1, 10};
  ck_assert_int_eq(kdp_model_create(&m, "cnn", zero, 4, &err), KDP_EINVAL);
  ck_assert_ptr_null(m);
  ck_assert_int_eq(kdp_model_create(&m, "mlp(5)", one_class, 4, &err), KDP_EINVAL);
  ck_assert_int_eq(kdp_model_create(&m, "mlp(5)", FMNIST, 0, &err), KDP_EINVAL);
  /* 2x2 -> maxpool -> 1x1 -> maxpool(2) does not fit */
  err.msg[0] = 0;
  ck_assert_int_eq(kdp_model_create(&m, "cnn", tiny, 4, &err), KDP_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "cnn"));
  ck_assert_int_eq(kdp_model_create(&m, "seq:conv(4,3,1,1),maxpool(2),maxpool(2)", tiny, 4, &err),
                   KDP_EINVAL);
  ck_assert_ptr_null(m);
}
END_TEST

START_TEST(test_plan_large) {
  kdp_model_memory mem;
  kdp_error err = {{0}};
  /* a large hidden size parses (it used to be "expected positive hidden sizes"); the plan
     counts it without allocating */
  ck_assert_msg(kdp_model_plan("mlp(3000000)", FMNIST, 500, &mem, &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(mem.n_params, (size_t)784 * 3000000 + 3000000 + 3000000 * 10 + 10);
  ck_assert_double_eq(mem.params_bytes, 2.0 * 4.0 * (double)mem.n_params + 4.0);
  /* 500 rows of 3e6 hidden units: the relu output and its gradient (dense -> relu is fused: the
     pre-activation is never stored, so not a third or fourth such buffer) */
  ck_assert(mem.activation_bytes >= 2.0 * 500 * 3e6 * 4.0);
  ck_assert(mem.activation_bytes < 3.0 * 500 * 3e6 * 4.0);
  ck_assert_msg(kdp_model_plan("seq:conv(100000,3)", FMNIST, 500, &mem, &err) == 0, "%s", err.msg);
  ck_assert(mem.activation_bytes > 500.0 * 28 * 28 * 100000 * 4 * 2);
  /* sizes beyond 2^44 values are refused as too large, not wrapped around */
  ck_assert_int_eq(kdp_model_plan("mlp(1099511627776,1099511627776)", FMNIST, 500, &mem, &err),
                   KDP_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "too large"));
  /* the plan is what creating the model allocates: same parameter count; bytes by hand */
  static const char *archs[] = {"mlp(64,32)", "cnn", "resnet20", "seq:conv(8,3),bn,relu,dropout(0.2),maxpool(2),dense(10)"};
  kdp_input_shape in3 = {32, 32, 3, 10};
  for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++) {
    kdp_input_shape in = i == 2 ? in3 : FMNIST;
    kdp_model *m = NULL;
    ck_assert_int_eq(kdp_model_plan(archs[i], in, 16, &mem, &err), 0);
    ck_assert_int_eq(kdp_model_create(&m, archs[i], in, 16, &err), 0);
    ck_assert_uint_eq(mem.n_params, kdp_model_n_params(m));
    ck_assert_double_eq(mem.params_bytes,
                        4.0 * (2.0 * (double)kdp_model_n_params(m) +
                               (double)(kdp_model_n_buffers(m) ? kdp_model_n_buffers(m) : 1)));
    ck_assert_uint_eq(mem.feature_dim, kdp_model_feature_dim(m));
    kdp_model_free(m);
  }
  /* mlp(64,32) at batch 16 by hand: activations 64, 32, 10 (val + grad) + scratch 1; each
     dense -> relu is fused, so the two pre-activations (64, 32) are not stored */
  ck_assert_int_eq(kdp_model_plan("mlp(64,32)", FMNIST, 16, &mem, &err), 0);
  ck_assert_double_eq(mem.activation_bytes, 4.0 * (16.0 * 2 * (64 + 32 + 10) + 1));
  /* eval-only (kdp_model_plan_infer counts what kdp_model_create_infer allocates): no gradients;
     activations share memory once dead, and the fused dense -> relu pairs store no
     pre-activation: relu1's 64-wide buffer and relu2's 32-wide one (the features) serve the
     whole net (the logits take relu1's once dead) */
  ck_assert_int_eq(kdp_model_plan_infer("mlp(64,32)", FMNIST, 16, &mem, &err), 0);
  ck_assert_uint_eq(mem.n_buffers, 0);
  ck_assert_double_eq(mem.params_bytes, 4.0 * ((double)mem.n_params + 1));
  ck_assert_double_eq(mem.activation_bytes, 4.0 * (16.0 * (64 + 32) + 1));
  kdp_model_memory train;
  ck_assert_int_eq(kdp_model_plan("cnn", FMNIST, 64, &train, &err), 0);
  ck_assert_int_eq(kdp_model_plan_infer("cnn", FMNIST, 64, &mem, &err), 0);
  ck_assert_uint_eq(mem.n_params, train.n_params);
  ck_assert_uint_eq(mem.n_buffers, train.n_buffers);
  ck_assert_double_eq(train.params_bytes - mem.params_bytes, 4.0 * (double)train.n_params);
  /* (the conv scratch, shared by both, is most of the cnn's activation memory) */
  ck_assert_msg(mem.activation_bytes < train.activation_bytes, "eval-only %g vs %g bytes",
                mem.activation_bytes, train.activation_bytes);
}
END_TEST

/* ------------------------------------------------------------------ backward hook */

/* The hook's promise (kdp_model_set_backward_hook): once it reports ready, grads[ready, n) do not
   change for the rest of the pass. Each newly final range is copied when reported; at the end the
   copy must equal the gradients. ready never grows, ends at 0, and takes the values of
   kdp_model_grad_marks. */
typedef struct hook_rec {
  const float *g;
  float *snap;
  size_t last, calls, n_ready, ready[1024];
  int grew;
} hook_rec;

static void rec_hook(void *ctx, size_t ready) {
  hook_rec *h = ctx;
  h->calls++;
  if (ready > h->last) h->grew = 1;
  if (ready >= h->last) return;
  memcpy(h->snap + ready, h->g + ready, (h->last - ready) * sizeof(float));
  if (h->n_ready < 1024) h->ready[h->n_ready++] = ready;
  h->last = ready;
}

static const struct {
  const char *arch;
  kdp_input_shape in;
} HOOKED[] = {
    {"mlp(64,32)", {28, 28, 1, 10}},
    {"cnn", {28, 28, 1, 10}},
    {"resnet20", {32, 32, 3, 10}},
    {"wrn10_2", {16, 16, 3, 10}},
    {"seq:conv(8,3),bn,relu,avgpool(3,2,1),dropout(0.25),conv(16,1),bn,relu,maxpool(3,2),"
     "dropout(0.5),gap,dense(10)",
     {20, 20, 3, 10}},
};

START_TEST(test_backward_hook) {
  const size_t B = 4;
  kdp_model *m = make(HOOKED[_i].arch, HOOKED[_i].in, B);
  kdp_rng rng;
  kdp_rng_seed(&rng, 3, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  kdp_input_shape in = HOOKED[_i].in;
  size_t nx = B * in.H * in.W * in.C, nz = B * in.n_classes, nf = B * kdp_model_feature_dim(m);
  size_t np = kdp_model_n_params(m);
  float *x = kdp_xmalloc(nx * sizeof *x), *dz = kdp_xmalloc(nz * sizeof *dz);
  float *df = kdp_xmalloc(nf * sizeof *df);
  fill_uniform(x, nx, &rng, -1, 1);
  fill_uniform(dz, nz, &rng, -1, 1);
  fill_uniform(df, nf, &rng, -1, 1);
  hook_rec *h = kdp_xcalloc(1, sizeof *h);
  h->g = kdp_model_grads(m);
  h->snap = kdp_xcalloc(np, sizeof(float));
  h->last = np;
  kdp_model_set_backward_hook(m, rec_hook, h);
  kdp_rng drop;
  kdp_rng_seed(&drop, 9, KDP_STREAM_DROPOUT);
  kdp_model_zero_grad(m);
  kdp_model_forward(m, x, B, 1, &drop);
  kdp_model_backward(m, dz, df);
  ck_assert_msg(!h->grew, "%s: ready grew", HOOKED[_i].arch);
  ck_assert_uint_eq(h->last, 0);
  ck_assert_msg(memcmp(h->snap, h->g, np * sizeof(float)) == 0,
                "%s: gradients changed after the hook reported them final", HOOKED[_i].arch);
  size_t marks[1024], nm = kdp_model_grad_marks(m, marks, 1024);
  ck_assert_uint_eq(nm, h->n_ready);
  for (size_t k = 0; k < nm; k++) ck_assert_uint_eq(marks[k], h->ready[k]);
  ck_assert_msg(h->calls >= nm, "one call per layer at least");
  /* removed: the next pass calls nothing */
  size_t calls = h->calls;
  kdp_model_set_backward_hook(m, NULL, NULL);
  kdp_model_forward(m, x, B, 1, &drop);
  kdp_model_backward(m, dz, df);
  ck_assert_uint_eq(h->calls, calls);
  free(h->snap);
  free(h);
  free(x);
  free(dz);
  free(df);
  kdp_model_free(m);
}
END_TEST

static Suite *model_suite(void) {
  Suite *s = suite_create("model");
  TCase *core = kdp_test_case("core");
  tcase_add_loop_test(core, test_param_counts, 0, (int)(sizeof ZOO / sizeof ZOO[0]));
  tcase_add_test(core, test_tensor_names);
  tcase_add_test(core, test_forward_shapes);
  tcase_add_test(core, test_fd_mlp);
  tcase_add_test(core, test_fd_seq);
  tcase_add_test(core, test_fd_cnn);
  tcase_add_test(core, test_fd_resnet);
  tcase_add_test(core, test_fd_wrn);
  tcase_add_test(core, test_dfeatures_linear);
  tcase_add_test(core, test_backward_set);
  tcase_add_test(core, test_init);
  tcase_add_test(core, test_deterministic_steps);
  tcase_add_test(core, test_eval_mode);
  tcase_add_test(core, test_describe);
  tcase_add_test(core, test_backward_sgd);
  tcase_add_loop_test(core, test_backward_hook, 0, (int)(sizeof HOOKED / sizeof HOOKED[0]));
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_loop_test(lim, test_bad_arch, 0, (int)(sizeof BAD_ARCH / sizeof BAD_ARCH[0]));
  tcase_add_test(lim, test_bad_shapes);
  tcase_add_test(lim, test_plan_large);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(model_suite());
  srunner_run_all(sr, CK_NORMAL);
  int nf = srunner_ntests_failed(sr);
  srunner_free(sr);
  return nf == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
