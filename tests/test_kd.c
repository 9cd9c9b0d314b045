/* test_kd.c: the "kd" suite: losses (finite differences), every method against PyTorch
   (tests/golden_kd.bin from gen_kd_golden.py), the per-rank decomposition, and limits. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "testutil.h"

/* ---------------------------------------------------------------- helpers */

static void fill_normal(float *p, size_t n, float s, kdp_rng *r) {
  for (size_t k = 0; k < n; k++) p[k] = s * kdp_rng_normal(r);
}

static void rand_dist(float *q, size_t B, size_t C, kdp_rng *r) {
  for (size_t b = 0; b < B; b++) {
    double s = 0;
    for (size_t c = 0; c < C; c++) s += (q[b * C + c] = 0.05f + kdp_rng_uniform(r));
    for (size_t c = 0; c < C; c++) q[b * C + c] = (float)(q[b * C + c] / s);
  }
}

static int all_finite(const float *a, size_t n) {
  for (size_t k = 0; k < n; k++)
    if (!isfinite(a[k])) return 0;
  return 1;
}

/* ---------------------------------------------------------------- losses */

START_TEST(test_softmax_rows) {
  kdp_rng r;
  kdp_rng_seed(&r, 1, 0);
  enum { B = 4, C = 7 };
  float z[B * C], p[B * C];
  fill_normal(z, B * C, 3.0f, &r);
  const float Ts[] = {1.0f, 3.0f, 0.5f};
  for (int t = 0; t < 3; t++) {
    kdp_softmax_t(p, z, B, C, Ts[t]);
    for (size_t b = 0; b < B; b++) {
      double s = 0, den = 0;
      for (size_t c = 0; c < C; c++) den += exp(z[b * C + c] / Ts[t]);
      for (size_t c = 0; c < C; c++) {
        s += p[b * C + c];
        double ref = exp(z[b * C + c] / Ts[t]) / den;
        ck_assert_msg(fabs(p[b * C + c] - ref) < 1e-6, "softmax T=%g row %zu col %zu: %g vs %g",
                      (double)Ts[t], b, c, (double)p[b * C + c], ref);
      }
      ck_assert_msg(fabs(s - 1.0) < 1e-5, "softmax row %zu sums to %g", b, s);
    }
  }
}
END_TEST

START_TEST(test_ce_grad_fd) {
  kdp_rng r;
  kdp_rng_seed(&r, 2, 0);
  enum { B = 5, C = 6 };
  float z[B * C], dz[B * C] = {0};
  int32_t y[B];
  fill_normal(z, B * C, 2.0f, &r);
  for (size_t b = 0; b < B; b++) y[b] = (int32_t)kdp_rng_below(&r, C);
  size_t hits = 99;
  double L = kdp_ce_loss(z, y, B, C, dz, 0.5f, &hits);
  /* reference loss and hits */
  double ref = 0;
  size_t rh = 0;
  for (size_t b = 0; b < B; b++) {
    double s = 0;
    size_t am = 0;
    for (size_t c = 0; c < C; c++) {
      s += exp(z[b * C + c]);
      if (z[b * C + c] > z[b * C + am]) am = c;
    }
    ref += log(s) - z[b * C + y[b]];
    rh += am == (size_t)y[b];
  }
  ck_assert_msg(fabs(L - ref / B) < 1e-6, "ce %g vs %g", L, ref / B);
  ck_assert_uint_eq(hits, rh);
  const float eps = 1e-2f;
  for (size_t k = 0; k < B * C; k++) {
    float save = z[k];
    z[k] = save + eps;
    double lp = kdp_ce_loss(z, y, B, C, NULL, 1.0f, NULL);
    z[k] = save - eps;
    double lm = kdp_ce_loss(z, y, B, C, NULL, 1.0f, NULL);
    z[k] = save;
    double fd = 0.5 * (lp - lm) / (2.0 * eps); /* times scale 0.5 */
    ck_assert_msg(fabs(fd - dz[k]) < 1e-4 + 1e-3 * fabs(fd), "ce grad %zu: fd %g analytic %g", k,
                  fd, (double)dz[k]);
  }
  /* accumulation: a second call adds the same again */
  float dz2[B * C];
  memcpy(dz2, dz, sizeof dz);
  kdp_ce_loss(z, y, B, C, dz2, 0.5f, NULL);
  for (size_t k = 0; k < B * C; k++) ck_assert(fabsf(dz2[k] - 2.0f * dz[k]) < 1e-6f);
}
END_TEST

START_TEST(test_kl_grad_fd) {
  kdp_rng r;
  kdp_rng_seed(&r, 3, 0);
  enum { B = 4, C = 5 };
  float z[B * C], q[B * C];
  fill_normal(z, B * C, 2.0f, &r);
  rand_dist(q, B, C, &r);
  const float Ts[] = {1.0f, 3.0f, 4.5f};
  for (int t = 0; t < 3; t++) {
    float T = Ts[t], dz[B * C] = {0};
    double L = kdp_kl_loss(z, q, B, C, T, dz, 0.7f);
    /* direct reference: T^2 * batchmean KL */
    double ref = 0;
    for (size_t b = 0; b < B; b++) {
      double s = 0;
      for (size_t c = 0; c < C; c++) s += exp(z[b * C + c] / T);
      for (size_t c = 0; c < C; c++) {
        double lp = z[b * C + c] / T - log(s);
        ref += q[b * C + c] * (log(q[b * C + c]) - lp);
      }
    }
    ref = ref * T * T / B;
    ck_assert_msg(fabs(L - ref) < 1e-5 * (1 + fabs(ref)), "kl T=%g: %g vs %g", (double)T, L, ref);
    ck_assert(L >= 0.0);
    const float eps = 1e-2f;
    for (size_t k = 0; k < B * C; k++) {
      float save = z[k];
      z[k] = save + eps;
      double lp = kdp_kl_loss(z, q, B, C, T, NULL, 1.0f);
      z[k] = save - eps;
      double lm = kdp_kl_loss(z, q, B, C, T, NULL, 1.0f);
      z[k] = save;
      double fd = 0.7 * (lp - lm) / (2.0 * eps);
      ck_assert_msg(fabs(fd - dz[k]) < 1e-4 + 2e-3 * fabs(fd), "kl T=%g grad %zu: fd %g analytic %g",
                    (double)T, k, fd, (double)dz[k]);
    }
    /* q = s_T(z) gives zero loss and zero gradient */
    float p[B * C], dz0[B * C] = {0};
    kdp_softmax_t(p, z, B, C, T);
    double L0 = kdp_kl_loss(z, p, B, C, T, dz0, 1.0f);
    ck_assert_msg(fabs(L0) < 1e-5, "KL(p||p) = %g", L0);
    for (size_t k = 0; k < B * C; k++) ck_assert(fabsf(dz0[k]) < 1e-6f);
  }
}
END_TEST

START_TEST(test_rampup_values) {
  ck_assert(kdp_rampup(0.0, 0.0) == 1.0);
  ck_assert(kdp_rampup(3.0, -1.0) == 1.0);
  ck_assert(fabs(kdp_rampup(0.0, 80.0) - exp(-5.0)) < 1e-12);
  ck_assert(fabs(kdp_rampup(40.0, 80.0) - exp(-5.0 * 0.25)) < 1e-12);
  ck_assert(fabs(kdp_rampup(20.0, 80.0) - exp(-5.0 * 0.5625)) < 1e-12);
  ck_assert(kdp_rampup(80.0, 80.0) == 1.0);
  ck_assert(kdp_rampup(300.0, 80.0) == 1.0);
  double prev = 0;
  for (int e = 0; e <= 100; e++) {
    double w = kdp_rampup(e, 80.0);
    ck_assert_msg(w >= prev && w <= 1.0, "rampup not monotone at %d", e);
    prev = w;
  }
}
END_TEST

static int reads_features(kdp_method m) {
  const kdp_method_ops *o = kdp_method_ops_of(m);
  return ((o->peer_reads | o->module_reads) & KDP_READS_FEATURES) != 0;
}

START_TEST(test_method_names) {
  for (int m = 0; m < KDP_METHOD_COUNT; m++) {
    kdp_method out = KDP_METHOD_COUNT;
    ck_assert_int_eq(kdp_method_parse(kdp_method_name((kdp_method)m), &out, NULL), 0);
    ck_assert_int_eq((int)out, m);
  }
  kdp_error err = {{0}};
  kdp_method out;
  ck_assert_int_eq(kdp_method_parse("dmll", &out, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "dmll") && strstr(err.msg, "okddip"), "message: %s", err.msg);
  ck_assert(reads_features(KDP_METHOD_ONE) && reads_features(KDP_METHOD_FFL) &&
            reads_features(KDP_METHOD_OKDDIP) && !reads_features(KDP_METHOD_DML));
  ck_assert(kdp_method_ops_of(KDP_METHOD_COUNT) == NULL && kdp_method_at(KDP_METHOD_COUNT) == NULL);
}
END_TEST

/* ---------------------------------------------------------------- golden */

static const char *const golden_cases[] = {"independent", "dml", "codistill", "codistill_burnin",
                                           "avg", "one", "ffl", "okddip", "okddip_detach",
                                           "okddip_leader0"};
#define N_CASES (sizeof golden_cases / sizeof golden_cases[0])

typedef struct gin {
  size_t P, B, C, nh;
  float T, W;
  const float *z, *h;
  int32_t y[64];
  kdp_kd_spec spec;
  int burn_in;
} gin;

static const float *gget(const kdp_golden *g, const char *cs, const char *what, size_t n) {
  char name[128];
  snprintf(name, sizeof name, "%s.%s", cs, what);
  const kdp_golden_rec *r = kdp_golden_get(g, name);
  ck_assert_msg(r->n == n, "golden %s has %zu values, expected %zu", name, r->n, n);
  return r->data;
}

static void gin_load(gin *in, const kdp_golden *g, const char *cs) {
  const kdp_golden_rec *z = kdp_golden_get(g, "z"), *dims = kdp_golden_get(g, "dims");
  in->P = z->dims[0];
  in->B = z->dims[1];
  in->C = z->dims[2];
  in->z = z->data;
  in->h = kdp_golden_get(g, "h")->data;
  in->nh = kdp_golden_get(g, "h")->n;
  const float *y = kdp_golden_get(g, "y")->data;
  for (size_t b = 0; b < in->B; b++) in->y[b] = (int32_t)y[b];
  in->T = kdp_golden_get(g, "hyper")->data[0];
  in->W = kdp_golden_get(g, "hyper")->data[1];
  memset(&in->spec, 0, sizeof in->spec);
  const float *cfg = gget(g, cs, "config", 6);
  in->spec.method = (kdp_method)(int)cfg[0];
  in->spec.P = in->P;
  in->spec.C = in->C;
  for (size_t j = 0; j < in->P; j++) in->spec.dims[j] = (size_t)dims->data[j];
  in->spec.leader = (int)cfg[1];
  in->spec.detach = (int)cfg[2];
  in->burn_in = (int)cfg[3];
  in->spec.fusion_dim = (size_t)cfg[4];
  in->spec.proj_dim = (size_t)cfg[5];
}

/* Tolerances (float32 C code vs float64 PyTorch on the same float32 inputs). */
#define LOSS_ATOL 2e-6
#define LOSS_RTOL 2e-5
#define GRAD_ATOL 2e-6
#define GRAD_RTOL 1e-4

static void cmp(const char *cs, const char *what, const float *got, const float *want, size_t n,
                double atol, double rtol) {
  char label[160];
  snprintf(label, sizeof label, "%s.%s", cs, what);
  kdp_test_assert_close(label, got, want, n, atol, rtol);
}

START_TEST(test_golden_methods) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  for (size_t ci = 0; ci < N_CASES; ci++) {
    const char *cs = golden_cases[ci];
    gin in;
    gin_load(&in, g, cs);
    const size_t P = in.P, B = in.B, C = in.C;
    kdp_error err = {{0}};
    kdp_cohort *c = NULL;
    ck_assert_msg(kdp_cohort_create(&c, &in.spec, B, &err) == 0, "%s: %s", cs, err.msg);
    ck_assert_uint_eq(kdp_cohort_feature_floats(c, B),
                      reads_features(in.spec.method) ? in.nh : 0);
    size_t np = kdp_cohort_module_n_params(c), nb = kdp_cohort_module_n_buffers(c);
    float *p0 = NULL;
    if (np) {
      p0 = (float *)gget(g, cs, "params", np);
      memcpy(kdp_cohort_module_params(c), p0, np * sizeof(float));
    } else {
      char nm[64];
      snprintf(nm, sizeof nm, "%s.params", cs);
      ck_assert_msg(kdp_golden_find(g, nm) == NULL, "%s: golden has module params, C has none", cs);
    }
    float *buf0 = calloc(nb + 1, sizeof(float));
    memcpy(buf0, kdp_cohort_module_buffers(c), nb * sizeof(float));

    kdp_kd_batch b = {.z = in.z, .h = in.h, .y = in.y, .B = B, .T = in.T, .weight = in.W,
                      .burn_in = in.burn_in};
    float *dz = calloc(P * B * C, sizeof(float)), *dh = calloc(in.nh, sizeof(float));
    float *teacher = calloc(B * C, sizeof(float));
    kdp_kd_losses per[8];
    double J = 0;
    kdp_cohort_module_zero_grad(c);
    ck_assert_msg(kdp_cohort_objective(c, &b, dz, dh, teacher, per, &J, &err) == 0, "%s: %s", cs,
                  err.msg);
    float ce[8], kd[8], loss[8], jf = (float)J, lm = (float)per[0].module_loss;
    for (size_t i = 0; i < P; i++) {
      ce[i] = (float)per[i].ce;
      kd[i] = (float)per[i].kd;
      loss[i] = (float)per[i].loss;
    }
    cmp(cs, "ce", ce, gget(g, cs, "ce", P), P, LOSS_ATOL, LOSS_RTOL);
    cmp(cs, "kd", kd, gget(g, cs, "kd", P), P, LOSS_ATOL, LOSS_RTOL);
    cmp(cs, "loss", loss, gget(g, cs, "loss", P), P, LOSS_ATOL, LOSS_RTOL);
    cmp(cs, "module_loss", &lm, gget(g, cs, "module_loss", 1), 1, LOSS_ATOL, LOSS_RTOL);
    cmp(cs, "total", &jf, gget(g, cs, "total", 1), 1, LOSS_ATOL, LOSS_RTOL);
    cmp(cs, "dz", dz, gget(g, cs, "dz", P * B * C), P * B * C, GRAD_ATOL, GRAD_RTOL);
    cmp(cs, "dh", dh, gget(g, cs, "dh", in.nh), in.nh, GRAD_ATOL, GRAD_RTOL);
    cmp(cs, "teacher", teacher, gget(g, cs, "teacher", B * C), B * C, 1e-5, 1e-5);
    if (np)
      cmp(cs, "dparams", kdp_cohort_module_grads(c), gget(g, cs, "dparams", np), np, GRAD_ATOL,
          GRAD_RTOL);
    if (nb)
      cmp(cs, "buffers", kdp_cohort_module_buffers(c), gget(g, cs, "buffers", nb), nb, 1e-6, 1e-5);
    /* accuracy counts agree with the logits */
    for (size_t i = 0; i < P; i++) {
      size_t hits = 0;
      kdp_ce_loss(in.z + i * B * C, in.y, B, C, NULL, 1.0f, &hits);
      ck_assert_uint_eq(per[i].n_correct, hits);
    }

    /* eval-mode teacher with the running stats of that one train forward */
    float *tev = calloc(B * C, sizeof(float));
    ck_assert_msg(kdp_cohort_teacher_eval(c, in.z, in.h, B, tev, &err) == 0, "%s", err.msg);
    cmp(cs, "teacher_eval", tev, gget(g, cs, "teacher_eval", B * C), B * C, 1e-5, 1e-5);

    /* each rank's share, against autograd of L_i + L_module / P */
    for (size_t i = 0; i < P; i++) {
      char what[64];
      memcpy(kdp_cohort_module_buffers(c), buf0, nb * sizeof(float));
      memset(dz, 0, P * B * C * sizeof(float));
      memset(dh, 0, in.nh * sizeof(float));
      kdp_cohort_module_zero_grad(c);
      kdp_kd_losses o;
      ck_assert_msg(kdp_cohort_step(c, i, &b, dz, dh, teacher, &o, &err) == 0, "%s", err.msg);
      ck_assert_msg(fabs(o.loss - per[i].loss) < 1e-9 && fabs(o.ce - per[i].ce) < 1e-9,
                    "%s: step loss of peer %zu differs from the objective's", cs, i);
      snprintf(what, sizeof what, "rank%zu.dz", i);
      cmp(cs, what, dz, gget(g, cs, what, P * B * C), P * B * C, GRAD_ATOL, GRAD_RTOL);
      snprintf(what, sizeof what, "rank%zu.dh", i);
      cmp(cs, what, dh, gget(g, cs, what, in.nh), in.nh, GRAD_ATOL, GRAD_RTOL);
      if (np) {
        snprintf(what, sizeof what, "rank%zu.dparams", i);
        cmp(cs, what, kdp_cohort_module_grads(c), gget(g, cs, what, np), np, GRAD_ATOL,
            GRAD_RTOL);
      }
    }
    free(tev);
    free(dz);
    free(dh);
    free(teacher);
    free(buf0);
    kdp_cohort_free(c);
  }
  kdp_golden_free(g);
}
END_TEST

/* ---------------------------------------------------------------- random cohorts */

typedef struct rcase {
  kdp_cohort *c;
  size_t P, B, C, nh;
  float *z, *h, *ze; /* ze: pcl's mean teachers' logits (P x B x C) */
  float *v, *dv;     /* v, dv: mcl's embeddings (P x B x E), unit rows, and their gradients */
  int32_t *y;
  kdp_kd_batch b;
} rcase;

static void rcase_make(rcase *rc, kdp_method m, size_t P, size_t B, size_t C, const size_t *dims,
                       uint64_t seed, int detach, float zscale) {
  kdp_kd_spec s;
  memset(&s, 0, sizeof s);
  s.method = m;
  s.P = P;
  s.C = C;
  s.leader = -1;
  s.detach = detach;
  for (size_t j = 0; j < P; j++) s.dims[j] = dims[j];
  kdp_error err = {{0}};
  rc->c = NULL;
  ck_assert_msg(kdp_cohort_create(&rc->c, &s, B, &err) == 0, "%s", err.msg);
  kdp_rng r;
  kdp_rng_seed(&r, seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(rc->c, &r);
  /* move BN affine params off 1/0 so their role is exercised */
  size_t nt = kdp_cohort_module_n_tensors(rc->c);
  for (size_t t = 0; t < nt; t++)
    if (strstr(kdp_cohort_module_tensor(rc->c, t)->name, "bn.")) {
      float *p = kdp_cohort_module_params(rc->c) + kdp_cohort_module_tensor(rc->c, t)->off;
      for (size_t k = 0; k < kdp_cohort_module_tensor(rc->c, t)->size; k++)
        p[k] += 0.2f * kdp_rng_normal(&r);
    }
  rc->P = P;
  rc->B = B;
  rc->C = C;
  rc->nh = kdp_cohort_feature_floats(rc->c, B);
  rc->z = calloc(P * B * C, sizeof(float));
  rc->h = calloc(rc->nh + 1, sizeof(float));
  rc->y = calloc(B, sizeof(int32_t));
  fill_normal(rc->z, P * B * C, zscale, &r);
  fill_normal(rc->h, rc->nh, 1.0f, &r);
  for (size_t b = 0; b < B; b++) rc->y[b] = (int32_t)kdp_rng_below(&r, (uint32_t)C);
  rc->ze = calloc(P * B * C, sizeof(float));
  const int reads_ema = (kdp_method_ops_of(m)->peer_reads & KDP_READS_EMA_LOGITS) != 0;
  if (reads_ema) fill_normal(rc->ze, P * B * C, zscale, &r);
  const size_t E = kdp_cohort_embed_dim(rc->c);
  rc->v = calloc(P * B * E + 1, sizeof(float));
  rc->dv = calloc(P * B * E + 1, sizeof(float));
  fill_normal(rc->v, P * B * E, 1.0f, &r);
  for (size_t k = 0; E && k < P * B; k++) {
    double ss = 0;
    for (size_t e = 0; e < E; e++) ss += (double)rc->v[k * E + e] * rc->v[k * E + e];
    for (size_t e = 0; e < E; e++) rc->v[k * E + e] /= (float)sqrt(ss);
  }
  kdp_kd_batch b = {.z = rc->z, .h = rc->h, .y = rc->y, .B = B, .T = 3.0f, .weight = 0.7f,
                    .z_ema = reads_ema ? rc->ze : NULL,
                    .v = E ? rc->v : NULL, .dv = E ? rc->dv : NULL};
  rc->b = b;
}

static void rcase_free(rcase *rc) {
  kdp_cohort_free(rc->c);
  free(rc->z);
  free(rc->h);
  free(rc->ze);
  free(rc->v);
  free(rc->dv);
  free(rc->y);
}

/* sum over ranks of kdp_cohort_step == kdp_cohort_objective, for every method */
START_TEST(test_rank_sum_identity) {
  const size_t dims[] = {12, 20, 9, 16};
  for (int m = 0; m < KDP_METHOD_COUNT; m++)
    for (int detach = 0; detach < 2; detach++) {
      if (detach && m != KDP_METHOD_OKDDIP) continue;
      rcase rc;
      rcase_make(&rc, (kdp_method)m, 4, 8, 7, dims, 100 + (uint64_t)m, detach, 2.0f);
      const size_t nz = rc.P * rc.B * rc.C, np = kdp_cohort_module_n_params(rc.c);
      float *dz_ref = calloc(nz, 4), *dh_ref = calloc(rc.nh + 1, 4), *dp_ref = calloc(np + 1, 4);
      float *dz = calloc(nz, 4), *dh = calloc(rc.nh + 1, 4), *dp = calloc(np + 1, 4);
      kdp_error err = {{0}};
      double J = 0, Jsum = 0;
      kdp_cohort_module_zero_grad(rc.c);
      ck_assert(kdp_cohort_objective(rc.c, &rc.b, dz_ref, dh_ref, NULL, NULL, &J, &err) == 0);
      memcpy(dp_ref, kdp_cohort_module_grads(rc.c), np * 4);
      for (size_t i = 0; i < rc.P; i++) {
        float *dzi = calloc(nz, 4), *dhi = calloc(rc.nh + 1, 4);
        kdp_kd_losses o;
        kdp_cohort_module_zero_grad(rc.c);
        ck_assert_msg(kdp_cohort_step(rc.c, i, &rc.b, dzi, dhi, NULL, &o, &err) == 0, "%s",
                      err.msg);
        Jsum += o.loss + o.module_loss / (double)rc.P;
        for (size_t k = 0; k < nz; k++) dz[k] += dzi[k];
        for (size_t k = 0; k < rc.nh; k++) dh[k] += dhi[k];
        for (size_t k = 0; k < np; k++) dp[k] += kdp_cohort_module_grads(rc.c)[k];
        free(dzi);
        free(dhi);
      }
      char what[64];
      snprintf(what, sizeof what, "%s%s", kdp_method_name((kdp_method)m), detach ? "+detach" : "");
      ck_assert_msg(fabs(J - Jsum) < 1e-6 * (1 + fabs(J)), "%s: J %g vs sum of shares %g", what, J,
                    Jsum);
      cmp(what, "sum_i dz", dz, dz_ref, nz, 1e-6, 1e-5);
      cmp(what, "sum_i dh", dh, dh_ref, rc.nh, 1e-6, 1e-5);
      cmp(what, "sum_i dparams", dp, dp_ref, np, 1e-6, 1e-5);
      /* the methods that feed features back must do so, the others must not */
      double hn = 0;
      for (size_t k = 0; k < rc.nh; k++) hn += fabs(dh_ref[k]);
      ck_assert_msg((hn > 0) == (kdp_cohort_feature_grads(rc.c) != 0), "%s: |dh| = %g", what, hn);
      free(dz_ref); free(dh_ref); free(dp_ref); free(dz); free(dh); free(dp);
      rcase_free(&rc);
    }
}
END_TEST

/*
 * Finite differences, independent of PyTorch. Stop-gradients make the returned gradients differ
 * from the derivative of J wherever a teacher is sg, so the FD target is chosen per method:
 *   independent, okddip (nothing detached): J w.r.t. z, h and the attention params;
 *   one: L_gate w.r.t. the gate params (the peers' terms use sg(z_e), so they add no param grad);
 *   ffl: L_f w.r.t. h and the fusion params (L_f's teacher sg(mean z) does not depend on them).
 * dml/codistill/avg are sg-only compositions of kdp_kl_loss, checked by FD above and by golden.
 */
START_TEST(test_objective_fd) {
  const size_t dims[] = {6, 10, 5};
  const kdp_method ms[] = {KDP_METHOD_INDEPENDENT, KDP_METHOD_OKDDIP, KDP_METHOD_ONE,
                           KDP_METHOD_FFL};
  for (int mi = 0; mi < 4; mi++) {
    kdp_method m = ms[mi];
    int module_only = m == KDP_METHOD_ONE || m == KDP_METHOD_FFL;
    rcase rc;
    rcase_make(&rc, m, 3, 6, 4, dims, 300 + (uint64_t)m, 0, 1.5f);
    const size_t nz = rc.P * rc.B * rc.C, np = kdp_cohort_module_n_params(rc.c);
    float *dz = calloc(nz, 4), *dh = calloc(rc.nh + 1, 4), *scratch = calloc(nz + rc.nh + 1, 4);
    kdp_error err = {{0}};
    kdp_cohort_module_zero_grad(rc.c);
    ck_assert(kdp_cohort_objective(rc.c, &rc.b, dz, dh, NULL, NULL, NULL, &err) == 0);
    float *dp = calloc(np + 1, 4);
    memcpy(dp, kdp_cohort_module_grads(rc.c), np * 4);
    /* probe every logit, every 2nd feature and every 2nd param */
    struct {
      float *x, *g;
      size_t n, step;
      const char *what;
    } probes[] = {{rc.z, dz, module_only ? 0 : nz, 1, "dz"},
                  {rc.h, dh, m == KDP_METHOD_ONE ? 0 : rc.nh, 2, "dh"},
                  {kdp_cohort_module_params(rc.c), dp, np, 2, "dparams"}};
    const float eps = 3e-3f;
    size_t n_probed = 0;
    for (int pi = 0; pi < 3; pi++)
      for (size_t k = 0; k < probes[pi].n; k += probes[pi].step) {
        float *x = probes[pi].x, save = x[k];
        double Jp = 0, Jm = 0;
        kdp_kd_losses per[3];
        float *sz = scratch, *sh = scratch + nz;
        x[k] = save + eps;
        ck_assert(kdp_cohort_objective(rc.c, &rc.b, sz, sh, NULL, per, &Jp, &err) == 0);
        if (module_only) Jp = per[0].module_loss;
        x[k] = save - eps;
        ck_assert(kdp_cohort_objective(rc.c, &rc.b, sz, sh, NULL, per, &Jm, &err) == 0);
        if (module_only) Jm = per[0].module_loss;
        x[k] = save;
        double fd = (Jp - Jm) / (2.0 * eps), an = probes[pi].g[k];
        ck_assert_msg(fabs(fd - an) < 2e-3 + 2e-2 * fabs(fd), "%s %s[%zu]: fd %g analytic %g",
                      kdp_method_name(m), probes[pi].what, k, fd, an);
        n_probed++;
      }
    ck_assert(n_probed > 10);
    free(dz);
    free(dh);
    free(dp);
    free(scratch);
    rcase_free(&rc);
  }
}
END_TEST

START_TEST(test_module_init_layout) {
  const size_t dims[] = {16, 24, 8};
  for (int m = KDP_METHOD_ONE; m <= KDP_METHOD_OKDDIP; m++) {
    rcase a, b;
    rcase_make(&a, (kdp_method)m, 3, 4, 5, dims, 7, 0, 1.0f);
    rcase_make(&b, (kdp_method)m, 3, 4, 5, dims, 7, 0, 1.0f);
    size_t np = kdp_cohort_module_n_params(a.c), sum = 0;
    ck_assert(np > 0);
    /* same seed, bitwise identical replicas */
    ck_assert(memcmp(kdp_cohort_module_params(a.c), kdp_cohort_module_params(b.c), np * 4) == 0);
    kdp_rng r;
    kdp_rng_seed(&r, 9, KDP_STREAM_MODULE);
    kdp_cohort_module_init(a.c, &r);
    const float *p = kdp_cohort_module_params(a.c);
    for (size_t t = 0; t < kdp_cohort_module_n_tensors(a.c); t++) {
      const char *nm = kdp_cohort_module_tensor(a.c, t)->name;
      size_t off = kdp_cohort_module_tensor(a.c, t)->off, n = kdp_cohort_module_tensor(a.c, t)->size;
      ck_assert_uint_eq(off, sum);
      sum += n;
      if (strstr(nm, "bn.weight")) {
        for (size_t k = 0; k < n; k++) ck_assert(p[off + k] == 1.0f);
      } else if (strstr(nm, "bn.bias")) {
        for (size_t k = 0; k < n; k++) ck_assert(p[off + k] == 0.0f);
      } else {
        /* fan_in: the row length of the weight it belongs to */
        size_t fan = 0;
        if (m == KDP_METHOD_ONE) fan = 48;
        else if (m == KDP_METHOD_FFL) fan = strstr(nm, "fc2") ? 16 : 48;
        else fan = strstr(nm, "att.0") ? 16 : 24;
        float bound = 1.0f / sqrtf((float)fan), mx = 0;
        for (size_t k = 0; k < n; k++) mx = fmaxf(mx, fabsf(p[off + k]));
        ck_assert_msg(mx <= bound && mx > 0.5f * bound, "%s: max |w| %g, bound %g", nm,
                      (double)mx, (double)bound);
      }
    }
    ck_assert_uint_eq(sum, np);
    size_t nb = kdp_cohort_module_n_buffers(a.c);
    for (size_t k = 0; k < nb; k++)
      ck_assert(kdp_cohort_module_buffers(a.c)[k] == (k < nb / 2 ? 0.0f : 1.0f));
    /* okddip: leader (peer 2) has no projections, rank = min aux dim / 8 = 2 */
    if (m == KDP_METHOD_OKDDIP) {
      ck_assert_uint_eq(kdp_cohort_module_n_tensors(a.c), 4);
      ck_assert_uint_eq(np, 2 * 2 * 16 + 2 * 2 * 24);
      ck_assert_int_eq(kdp_cohort_spec(a.c)->leader, 2);
    }
    rcase_free(&a);
    rcase_free(&b);
  }
}
END_TEST

/* The module's parts per peer (kdp_cohort_module_ranges): for ffl, SHARED and the P OWN blocks
   cover every parameter exactly once, OWN(j) is peer j's columns of fc1's weight, SHARDED is that
   weight whole; zero_grad_of(j) zeroes SHARED and OWN(j) only. Methods not sharded by peer
   columns: SHARED is the whole module. */
static size_t mark_part(const kdp_cohort *c, kdp_module_part part, size_t j, int *seen) {
  size_t n = kdp_cohort_module_ranges(c, part, j, NULL, 0), tot = 0;
  size_t *rg = calloc(2 * n + 1, sizeof *rg);
  ck_assert_uint_eq(kdp_cohort_module_ranges(c, part, j, rg, n), n);
  for (size_t k = 0; k < n; k++) {
    ck_assert(rg[2 * k] < rg[2 * k + 1]);
    if (k) ck_assert(rg[2 * k] > rg[2 * k - 1]); /* ordered, adjacent ones merged */
    for (size_t i = rg[2 * k]; i < rg[2 * k + 1]; i++) seen[i]++;
    tot += rg[2 * k + 1] - rg[2 * k];
  }
  free(rg);
  return tot;
}

START_TEST(test_module_parts) {
  const size_t dims[] = {16, 24, 8}, D = 48;
  for (int m = KDP_METHOD_ONE; m <= KDP_METHOD_OKDDIP; m++) {
    rcase a;
    rcase_make(&a, (kdp_method)m, 3, 4, 5, dims, 7, 0, 1.0f);
    const kdp_cohort *c = a.c;
    const size_t np = kdp_cohort_module_n_params(c);
    int *seen = calloc(np, sizeof *seen);
    size_t shared = mark_part(c, KDP_PART_SHARED, 0, seen);
    if (m != KDP_METHOD_FFL) {
      ck_assert_uint_eq(shared, np);
      ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_SHARED, 1, NULL, 0), 1);
      ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_OWN, 1, NULL, 0), 0);
      ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_SHARDED, 1, NULL, 0), 0);
    } else {
      const kdp_kd_tensor *w1 = kdp_cohort_module_tensor(c, 0);
      ck_assert_str_eq(w1->name, "fusion.fc1.weight");
      const size_t H = w1->rows;
      ck_assert_uint_eq(shared, np - H * D);
      for (size_t j = 0; j < 3; j++) {
        ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_OWN, j, NULL, 0), H);
        int *mine = calloc(np, sizeof *mine);
        ck_assert_uint_eq(mark_part(c, KDP_PART_OWN, j, mine), H * dims[j]);
        size_t h0 = j == 0 ? 0 : j == 1 ? 16 : 40;
        for (size_t i = 0; i < np; i++) {
          seen[i] += mine[i];
          int in_block = i < H * D && i % D >= h0 && i % D < h0 + dims[j];
          ck_assert_int_eq(mine[i], in_block);
        }
        free(mine);
        /* zero_grad_of(j): SHARED and OWN(j) zeroed, the rest untouched */
        float *g = kdp_cohort_module_grads(a.c);
        for (size_t i = 0; i < np; i++) g[i] = 1.0f;
        kdp_cohort_module_zero_grad_of(a.c, j);
        for (size_t i = 0; i < np; i++) {
          int in_block = i < H * D && i % D >= h0 && i % D < h0 + dims[j];
          ck_assert(g[i] == ((i >= H * D || in_block) ? 0.0f : 1.0f));
        }
      }
      int *sh = calloc(np, sizeof *sh);
      ck_assert_uint_eq(mark_part(c, KDP_PART_SHARDED, 0, sh), H * D);
      ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_SHARDED, 0, NULL, 0), 1);
      ck_assert_uint_eq(kdp_cohort_module_ranges(c, KDP_PART_OWN, 3, NULL, 0), 0);
      free(sh);
    }
    for (size_t i = 0; i < np; i++)
      ck_assert_msg(seen[i] == 1, "param %zu counted %d times", i, seen[i]);
    /* a short list: the first pairs written, the count still the whole */
    size_t two[4] = {0, 0, 0, 0};
    size_t n = kdp_cohort_module_ranges(c, KDP_PART_OWN, 1, two, 1);
    if (m == KDP_METHOD_FFL) {
      ck_assert_uint_gt(n, 1);
      ck_assert_uint_eq(two[0], 16);
      ck_assert_uint_eq(two[1], 40);
      ck_assert_uint_eq(two[2], 0);
    }
    free(seen);
    rcase_free(&a);
  }
}
END_TEST

/* ---------------------------------------------------------------- limits */

START_TEST(test_p1_is_independent) {
  const size_t dims[] = {8};
  rcase ind;
  rcase_make(&ind, KDP_METHOD_INDEPENDENT, 1, 5, 4, dims, 11, 0, 2.0f);
  float dzr[20] = {0}, dhr[40] = {0};
  kdp_kd_losses ref;
  ck_assert(kdp_cohort_step(ind.c, 0, &ind.b, dzr, dhr, NULL, &ref, NULL) == 0);
  const kdp_method ms[] = {KDP_METHOD_DML, KDP_METHOD_CODISTILL, KDP_METHOD_AVG,
                           KDP_METHOD_OKDDIP};
  for (int k = 0; k < 4; k++) {
    rcase rc;
    rcase_make(&rc, ms[k], 1, 5, 4, dims, 11, 0, 2.0f);
    memcpy(rc.z, ind.z, sizeof dzr);
    memcpy(rc.y, ind.y, 5 * sizeof(int32_t));
    float dz[20] = {0}, dh[40] = {0};
    kdp_kd_losses o;
    kdp_error err = {{0}};
    ck_assert_msg(kdp_cohort_step(rc.c, 0, &rc.b, dz, dh, NULL, &o, &err) == 0, "%s", err.msg);
    ck_assert_msg(fabs(o.loss - ref.loss) < 1e-6 && fabs(o.kd) < 1e-6, "%s: loss %g vs %g",
                  kdp_method_name(ms[k]), o.loss, ref.loss);
    kdp_test_assert_close(kdp_method_name(ms[k]), dz, dzr, 20, 1e-7, 1e-6);
    for (int q = 0; q < 40; q++) ck_assert(dh[q] == 0.0f);
    rcase_free(&rc);
  }
  rcase_free(&ind);
}
END_TEST

START_TEST(test_one_class) {
  const size_t dims[] = {4, 6, 5};
  for (int m = 0; m < KDP_METHOD_COUNT; m++) {
    rcase rc;
    rcase_make(&rc, (kdp_method)m, 3, 4, 1, dims, 21, 0, 3.0f);
    float dz[12] = {0}, dh[64] = {0}, t[4];
    kdp_kd_losses o;
    kdp_error err = {{0}};
    ck_assert_msg(kdp_cohort_step(rc.c, 1, &rc.b, dz, dh, t, &o, &err) == 0, "%s", err.msg);
    ck_assert_msg(fabs(o.loss) < 1e-6 && fabs(o.module_loss) < 1e-6, "%s C=1: loss %g",
                  kdp_method_name((kdp_method)m), o.loss);
    for (int k = 0; k < 12; k++) ck_assert(fabsf(dz[k]) < 1e-6f);
    ck_assert(all_finite(dh, 64) && all_finite(t, 4));
    ck_assert_uint_eq(o.n_correct, 4);
    rcase_free(&rc);
  }
}
END_TEST

START_TEST(test_extreme_logits) {
  /* CE on +-80 logits: confident right rows cost ~0, confident wrong rows ~160 */
  float z[2 * 3] = {80, -80, -80, -80, 80, -80}, dz[6] = {0};
  int32_t y[2] = {0, 0};
  double L = kdp_ce_loss(z, y, 2, 3, dz, 1.0f, NULL);
  ck_assert_msg(fabs(L - 80.0) < 1e-3, "CE %g", L); /* (0 + 160) / 2 */
  ck_assert(all_finite(dz, 6));
  float q[6] = {1, 0, 0, 0, 1, 0};
  double K = kdp_kl_loss(z, q, 2, 3, 1.0f, dz, 1.0f);
  ck_assert(isfinite(K) && K >= 0 && all_finite(dz, 6));
  float p[6];
  kdp_softmax_t(p, z, 2, 3, 0.1f);
  ck_assert(all_finite(p, 6) && p[0] == 1.0f);
  /* every method with logits of +-80 */
  const size_t dims[] = {8, 12, 6};
  for (int m = 0; m < KDP_METHOD_COUNT; m++) {
    rcase rc;
    rcase_make(&rc, (kdp_method)m, 3, 5, 6, dims, 31, 0, 1.0f);
    for (size_t k = 0; k < 3 * 5 * 6; k++) rc.z[k] = (rc.z[k] > 0 ? 80.0f : -80.0f);
    float dzm[90] = {0}, dhm[200] = {0}, t[30];
    kdp_kd_losses per[3];
    double J = 0;
    kdp_error err = {{0}};
    ck_assert(kdp_cohort_objective(rc.c, &rc.b, dzm, dhm, t, per, &J, &err) == 0);
    ck_assert_msg(isfinite(J), "%s: J = %g", kdp_method_name((kdp_method)m), J);
    ck_assert(all_finite(dzm, 90) && all_finite(dhm, 200) && all_finite(t, 30));
    ck_assert(all_finite(kdp_cohort_module_grads(rc.c), kdp_cohort_module_n_params(rc.c)));
    float tev[30];
    ck_assert(kdp_cohort_teacher_eval(rc.c, rc.z, rc.h, 5, tev, &err) == 0);
    ck_assert(all_finite(tev, 30));
    rcase_free(&rc);
  }
}
END_TEST

START_TEST(test_ensemble_logprob) {
  /* moderate logits: log of the mean of the softmaxes, computed directly */
  const size_t P = 3, B = 2, C = 4;
  float z[3 * 2 * 4], out[2 * 4];
  for (size_t k = 0; k < P * B * C; k++) z[k] = (float)((int)(k * 7 % 11) - 5) * 0.9f;
  kdp_ensemble_logprob(out, z, P, B, C);
  for (size_t b = 0; b < B; b++)
    for (size_t c = 0; c < C; c++) {
      double mean = 0;
      for (size_t j = 0; j < P; j++) {
        const float *r = z + (j * B + b) * C;
        double s = 0;
        for (size_t k = 0; k < C; k++) s += exp((double)r[k]);
        mean += exp((double)r[c]) / s / (double)P;
      }
      ck_assert_msg(fabs(out[b * C + c] - log(mean)) < 1e-5, "b %zu c %zu: %g vs %g", b, c,
                    out[b * C + c], log(mean));
    }
  /* a class that underflows under every peer (log p = -800 and -900) stays finite and exact:
     log((e^-800 + e^-900) / 2) = -800 - log 2 + log1p(e^-100) */
  float far[2 * 1 * 2] = {0.0f, -800.0f, 0.0f, -900.0f}, lo[2];
  kdp_ensemble_logprob(lo, far, 2, 1, 2);
  ck_assert_msg(fabs(lo[0] - 0.0) < 1e-6, "%g", lo[0]);
  ck_assert_msg(fabs(lo[1] - (-800.0 - log(2.0))) < 1e-3, "%g", lo[1]);
}
END_TEST

START_TEST(test_bad_input) {
  kdp_kd_spec s;
  memset(&s, 0, sizeof s);
  kdp_cohort *c = NULL;
  kdp_error err = {{0}};
  s.method = KDP_METHOD_DML;
  s.C = 5;
  s.P = 0;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);
  ck_assert(c == NULL && strstr(err.msg, "peers"));
  s.P = KDP_KD_MAX_PEERS + 1;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);
  s.P = 3;
  s.C = 0;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);
  s.C = 5;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 0, &err), KDP_EINVAL);
  s.method = KDP_METHOD_ONE; /* dims all 0 */
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "dims[0]"), "%s", err.msg);
  s.method = KDP_METHOD_OKDDIP;
  s.dims[0] = s.dims[1] = s.dims[2] = 8;
  s.leader = 3;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "leader"), "%s", err.msg);
  s.method = (kdp_method)42;
  ck_assert_int_eq(kdp_cohort_create(&c, &s, 4, &err), KDP_EINVAL);

  const size_t dims[] = {8, 8, 8};
  rcase rc;
  rcase_make(&rc, KDP_METHOD_OKDDIP, 3, 4, 5, dims, 41, 0, 1.0f);
  float dz[60] = {0}, dh[96] = {0};
  kdp_kd_batch b = rc.b;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 3, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  b.B = 5;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "max_batch"), "%s", err.msg);
  b = rc.b;
  b.T = 0.0f;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  b = rc.b;
  b.weight = NAN;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  b = rc.b;
  b.h = NULL;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  b = rc.b;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, NULL, NULL, NULL, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "dh"), "%s", err.msg);
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, NULL, dh, NULL, NULL, &err), KDP_EINVAL);
  int32_t ybad[4] = {0, 1, 5, 2};
  b.y = ybad;
  ck_assert_int_eq(kdp_cohort_step(rc.c, 0, &b, dz, dh, NULL, NULL, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "y[2]"), "%s", err.msg);
  for (int k = 0; k < 60; k++) ck_assert(dz[k] == 0.0f); /* nothing written on failure */
  ck_assert_int_eq(kdp_cohort_teacher_eval(rc.c, rc.z, NULL, 9, dz, &err), KDP_EINVAL);
  rcase_free(&rc);
  /* CE with an out-of-range label is NaN, not a silent number */
  float z[3] = {1, 2, 3};
  int32_t y = 3;
  ck_assert(isnan(kdp_ce_loss(z, &y, 1, 3, NULL, 1.0f, NULL)));
}
END_TEST

static Suite *kd_suite(void) {
  Suite *s = suite_create("kd");
  TCase *core = kdp_test_case("core");
  tcase_add_test(core, test_softmax_rows);
  tcase_add_test(core, test_ce_grad_fd);
  tcase_add_test(core, test_kl_grad_fd);
  tcase_add_test(core, test_rampup_values);
  tcase_add_test(core, test_method_names);
  tcase_add_test(core, test_golden_methods);
  tcase_add_test(core, test_rank_sum_identity);
  tcase_add_test(core, test_objective_fd);
  tcase_add_test(core, test_module_init_layout);
  tcase_add_test(core, test_module_parts);
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_test(lim, test_p1_is_independent);
  tcase_add_test(lim, test_one_class);
  tcase_add_test(lim, test_extreme_logits);
  tcase_add_test(lim, test_ensemble_logprob);
  tcase_add_test(lim, test_bad_input);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(kd_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
