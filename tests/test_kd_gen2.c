/* test_kd_gen2.c: the "kd_gen2" suite: issue 12's methods (kdcl, pcl, mcl, switokd) and the
   cohort's diversity against PyTorch (the "g2." records of tests/golden_kd.bin, written by
   gen_kd_golden.py), plus the properties the trainer will rely on when it wires them (one
   allreduce for kdcl's teacher, reverse-collective sums for mcl, rank-identical modes). */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "testutil.h"

/* float32 C code vs float64 PyTorch on the same float32 inputs (as test_kd.c) */
#define LOSS_ATOL 2e-6
#define LOSS_RTOL 2e-5
#define GRAD_ATOL 2e-6
#define GRAD_RTOL 1e-4

typedef struct g2in {
  size_t P, B, C, nh;
  float T, W;
  const float *z, *h, *z_ema;
  int32_t y[64];
  size_t dims[KDP_KD_MAX_PEERS];
} g2in;

static const float *gget(const kdp_golden *g, const char *cs, const char *what, size_t n) {
  char name[128];
  snprintf(name, sizeof name, "%s%s%s", cs, *cs ? "." : "", what);
  const kdp_golden_rec *r = kdp_golden_get(g, name);
  ck_assert_msg(r->n == n, "golden %s has %zu values, expected %zu", name, r->n, n);
  return r->data;
}

static void g2_load(g2in *in, const kdp_golden *g) {
  const kdp_golden_rec *z = kdp_golden_get(g, "g2.z");
  in->P = z->dims[0];
  in->B = z->dims[1];
  in->C = z->dims[2];
  in->z = z->data;
  in->h = kdp_golden_get(g, "g2.h")->data;
  in->nh = kdp_golden_get(g, "g2.h")->n;
  in->z_ema = gget(g, "g2", "z_ema", in->P * in->B * in->C);
  const float *y = gget(g, "g2", "y", in->B), *dims = gget(g, "", "dims", in->P);
  for (size_t b = 0; b < in->B; b++) in->y[b] = (int32_t)y[b];
  for (size_t j = 0; j < in->P; j++) in->dims[j] = (size_t)dims[j];
  in->T = kdp_golden_get(g, "hyper")->data[0];
  in->W = kdp_golden_get(g, "hyper")->data[1];
}

static void spec_of(kdp_kd_spec *s, const g2in *in, const char *method) {
  memset(s, 0, sizeof *s);
  ck_assert_msg(kdp_method_parse_staged(method, &s->method, NULL) == 0, "%s", method);
  s->P = in->P;
  s->C = in->C;
  s->leader = -1;
  for (size_t j = 0; j < in->P; j++) s->dims[j] = in->dims[j];
}

static kdp_cohort *make(const kdp_kd_spec *s, size_t maxB) {
  kdp_cohort *c = NULL;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_cohort_create(&c, s, maxB, &err) == 0, "%s", err.msg);
  return c;
}

static void cmp(const char *cs, const char *what, const float *got, const float *want, size_t n,
                double atol, double rtol) {
  char label[160];
  snprintf(label, sizeof label, "%s.%s", cs, what);
  kdp_test_assert_close(label, got, want, n, atol, rtol);
}

/* What every case records: the objective's losses, dJ/dz, dJ/dh, the teacher, the module. */
typedef struct g2out {
  float *dz, *dh, *teacher;
  kdp_kd_losses per[KDP_KD_MAX_PEERS];
  double J;
} g2out;

static void run_objective(kdp_cohort *c, const g2in *in, kdp_kd_batch *b, g2out *o) {
  o->dz = calloc(in->P * in->B * in->C, sizeof(float));
  o->dh = calloc(in->nh, sizeof(float));
  o->teacher = calloc(in->B * in->C, sizeof(float));
  kdp_error err = {{0}};
  kdp_cohort_module_zero_grad(c);
  ck_assert_msg(kdp_cohort_objective(c, b, o->dz, o->dh, o->teacher, o->per, &o->J, &err) == 0,
                "%s", err.msg);
}

static void g2out_free(g2out *o) {
  free(o->dz);
  free(o->dh);
  free(o->teacher);
}

static void check_std(const kdp_golden *g, const char *cs, kdp_cohort *c, const g2in *in,
                      const g2out *o, int check_dh) {
  const size_t P = in->P, B = in->B, C = in->C;
  float ce[KDP_KD_MAX_PEERS], kd[KDP_KD_MAX_PEERS], loss[KDP_KD_MAX_PEERS];
  float jf = (float)o->J, lm = (float)o->per[0].module_loss;
  for (size_t i = 0; i < P; i++) {
    ce[i] = (float)o->per[i].ce;
    kd[i] = (float)o->per[i].kd;
    loss[i] = (float)o->per[i].loss;
  }
  cmp(cs, "ce", ce, gget(g, cs, "ce", P), P, LOSS_ATOL, LOSS_RTOL);
  cmp(cs, "kd", kd, gget(g, cs, "kd", P), P, LOSS_ATOL, LOSS_RTOL);
  cmp(cs, "loss", loss, gget(g, cs, "loss", P), P, LOSS_ATOL, LOSS_RTOL);
  cmp(cs, "module_loss", &lm, gget(g, cs, "module_loss", 1), 1, LOSS_ATOL, LOSS_RTOL);
  cmp(cs, "total", &jf, gget(g, cs, "total", 1), 1, LOSS_ATOL, LOSS_RTOL);
  cmp(cs, "dz", o->dz, gget(g, cs, "dz", P * B * C), P * B * C, GRAD_ATOL, GRAD_RTOL);
  if (check_dh) cmp(cs, "dh", o->dh, gget(g, cs, "dh", in->nh), in->nh, GRAD_ATOL, GRAD_RTOL);
  cmp(cs, "teacher", o->teacher, gget(g, cs, "teacher", B * C), B * C, 1e-5, 1e-5);
  size_t np = kdp_cohort_module_n_params(c);
  if (np)
    cmp(cs, "dparams", kdp_cohort_module_grads(c), gget(g, cs, "dparams", np), np, GRAD_ATOL,
        GRAD_RTOL);
  float *tev = calloc(B * C, sizeof(float));
  kdp_error err = {{0}};
  ck_assert_msg(kdp_cohort_teacher_eval(c, in->z, in->h, B, tev, &err) == 0, "%s", err.msg);
  cmp(cs, "teacher_eval", tev, gget(g, cs, "teacher_eval", B * C), B * C, 1e-5, 1e-5);
  free(tev);
}

/* ---------------------------------------------------------------- staging */

START_TEST(test_staged_methods) {
  /* every second-generation method is wired: a kd.method value that kdp_method_at lists, with its
     ops, and nothing is left between KDP_METHOD_COUNT and KDP_METHOD_END */
  const char *wired[] = {"kdcl", "pcl", "mcl", "switokd"};
  const kdp_method ids[] = {KDP_METHOD_KDCL, KDP_METHOD_PCL, KDP_METHOD_MCL, KDP_METHOD_SWITOKD};
  for (size_t k = 0; k < sizeof wired / sizeof wired[0]; k++) {
    kdp_method m;
    kdp_error err = {{0}};
    ck_assert_msg(kdp_method_parse(wired[k], &m, &err) == 0, "%s", err.msg);
    ck_assert_int_eq((int)m, (int)ids[k]);
    ck_assert((int)m < KDP_METHOD_COUNT && kdp_method_ops_of(m) != NULL);
    ck_assert_str_eq(kdp_method_name(m), wired[k]);
    int listed = 0;
    for (size_t i = 0; kdp_method_at(i); i++) listed += strcmp(kdp_method_at(i), wired[k]) == 0;
    ck_assert_int_eq(listed, 1);
  }
  ck_assert_int_eq(KDP_METHOD_COUNT + 1, KDP_METHOD_END);
  ck_assert(kdp_method_ops_of(KDP_METHOD_COUNT) == NULL);
  kdp_method m;
  ck_assert_int_eq(kdp_method_parse_staged("dml", &m, NULL), 0);
  ck_assert_int_eq((int)m, KDP_METHOD_DML);
  ck_assert_int_eq(kdp_method_parse("nosuch", &m, NULL), KDP_EINVAL);
}
END_TEST

/* ---------------------------------------------------------------- kdcl */

START_TEST(test_kdcl_general_weights) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  const kdp_golden_rec *zv = kdp_golden_get(g, "g2.zval");
  const size_t P = zv->dims[0], N = zv->dims[1], C = zv->dims[2];
  const float *yf = gget(g, "g2", "yval", N), *wg = gget(g, "g2", "kdcl_w", P);
  int32_t *y = calloc(N, sizeof(int32_t));
  for (size_t b = 0; b < N; b++) y[b] = (int32_t)yf[b];
  float w[KDP_KD_MAX_PEERS], w2[KDP_KD_MAX_PEERS];
  kdp_error err = {{0}};
  ck_assert_msg(kdp_kdcl_general_weights(w, zv->data, y, P, N, C, &err) == 0, "%s", err.msg);
  kdp_test_assert_close("kdcl general weights", w, wg, P, 1e-5, 1e-4);
  /* the golden's third peer is a noisy copy of the second: clipped to exactly 0 */
  double sum = 0;
  size_t zeros = 0;
  for (size_t j = 0; j < P; j++) {
    sum += w[j];
    zeros += w[j] == 0.0f;
  }
  ck_assert_msg(zeros == 1 && fabs(sum - 1.0) < 1e-6, "zeros %zu sum %g", zeros, sum);
  /* deterministic: the same bits again (every rank computes them) */
  ck_assert(kdp_kdcl_general_weights(w2, zv->data, y, P, N, C, NULL) == 0);
  ck_assert(memcmp(w, w2, P * sizeof(float)) == 0);
  /* identical peers: equal weights (the ridge keeps the singular system solvable) */
  float *same = calloc(P * N * C, sizeof(float));
  for (size_t j = 0; j < P; j++) memcpy(same + j * N * C, zv->data, N * C * sizeof(float));
  ck_assert(kdp_kdcl_general_weights(w2, same, y, P, N, C, &err) == 0);
  for (size_t j = 0; j < P; j++) ck_assert_msg(fabsf(w2[j] - 1.0f / (float)P) < 1e-4, "%g", w2[j]);
  y[3] = (int32_t)C;
  ck_assert_int_eq(kdp_kdcl_general_weights(w2, zv->data, y, P, N, C, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "y[3]"), "%s", err.msg);
  free(same);
  free(y);
  kdp_golden_free(g);
}
END_TEST

START_TEST(test_kdcl_golden) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  g2in in;
  g2_load(&in, g);
  const size_t P = in.P, B = in.B, C = in.C, n = B * C;
  const char *names[] = {"naive", "minlogit", "general"};
  for (int e = 0; e < 3; e++) {
    char cs[32];
    snprintf(cs, sizeof cs, "kdcl_%s", names[e]);
    kdp_kd_spec s;
    spec_of(&s, &in, "kdcl");
    s.ensemble = (kdp_kdcl_ensemble)(int)gget(g, cs, "config", 1)[0];
    ck_assert_int_eq((int)s.ensemble, e);
    kdp_cohort *c = make(&s, B);
    kdp_error err = {{0}};
    if (e == KDP_KDCL_GENERAL) {
      /* 1/P until the first evaluation, in the module buffers (checkpointed) */
      ck_assert_uint_eq(kdp_cohort_module_n_buffers(c), P);
      ck_assert(kdp_cohort_module_buffers(c)[0] == 1.0f / (float)P);
      ck_assert_msg(kdp_kdcl_set_weights(c, gget(g, "g2", "kdcl_w", P), &err) == 0, "%s", err.msg);
      float bad[3] = {0.5f, 0.6f, 0.0f};
      ck_assert_int_eq(kdp_kdcl_set_weights(c, bad, &err), KDP_EINVAL);
    } else {
      ck_assert_uint_eq(kdp_cohort_module_n_buffers(c), 0);
      ck_assert_int_eq(kdp_kdcl_set_weights(c, gget(g, "g2", "kdcl_w", P), &err), KDP_EINVAL);
    }
    ck_assert_int_eq(kdp_cohort_teacher_reduce_op(c),
                     e == KDP_KDCL_MINLOGIT ? KDP_REDUCE_MIN : KDP_REDUCE_SUM);
    kdp_kd_batch b = {.z = in.z, .y = in.y, .B = B, .T = in.T, .weight = in.W};
    g2out o;
    run_objective(c, &in, &b, &o);
    check_std(g, cs, c, &in, &o, 1);

    /* the teacher as the trainer builds it: each peer's contribution, one allreduce */
    float *zt = calloc(n, sizeof(float)), *red = calloc(n, sizeof(float));
    float *part = calloc(n, sizeof(float));
    ck_assert(kdp_cohort_reduced_teacher(c, in.z, in.y, B, zt, &err) == 0);
    cmp(cs, "zt", zt, gget(g, cs, "zt", n), n, 1e-6, 1e-6);
    for (size_t j = 0; j < P; j++) {
      ck_assert(kdp_cohort_teacher_contribution(c, j, in.z + j * n, in.y, B, part, &err) == 0);
      for (size_t k = 0; k < n; k++)
        red[k] = j == 0 ? part[k]
                 : e == KDP_KDCL_MINLOGIT ? fminf(red[k], part[k])
                                          : red[k] + part[k];
    }
    ck_assert_msg(memcmp(red, zt, n * sizeof(float)) == 0, "%s: allreduce != reference", cs);
    if (e == KDP_KDCL_MINLOGIT) /* every true-class entry is 0: each peer's shifted logit is */
      for (size_t r = 0; r < B; r++) ck_assert(zt[r * C + in.y[r]] == 0.0f);
    /* the peer term from the reduced teacher alone (no allgather of z) */
    for (size_t i = 0; i < P; i++) {
      float *dz = calloc(n, sizeof(float));
      kdp_kd_peer_in pin = {.z = in.z + i * n, .teacher = red, .y = in.y, .n = B, .T = in.T,
                            .weight = in.W, .scale = 1.0f};
      kdp_kd_losses L;
      ck_assert_msg(kdp_cohort_peer_loss(c, i, &pin, dz, NULL, &L, &err) == 0, "%s", err.msg);
      ck_assert(fabs(L.loss - o.per[i].loss) < 1e-9);
      ck_assert(memcmp(dz, o.dz + i * n, n * sizeof(float)) == 0);
      pin.teacher = NULL;
      ck_assert_int_eq(kdp_cohort_peer_loss(c, i, &pin, dz, NULL, &L, &err), KDP_EINVAL);
      free(dz);
    }
    free(zt);
    free(red);
    free(part);
    g2out_free(&o);
    kdp_cohort_free(c);
  }
  kdp_golden_free(g);
}
END_TEST

/* ---------------------------------------------------------------- pcl and the EMA */

START_TEST(test_pcl_golden) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  g2in in;
  g2_load(&in, g);
  const size_t P = in.P, B = in.B, C = in.C, n = B * C;
  kdp_kd_spec s;
  spec_of(&s, &in, "pcl");
  kdp_cohort *c = make(&s, B);
  const size_t np = kdp_cohort_module_n_params(c);
  ck_assert_uint_eq(np, C * 48 + C);
  memcpy(kdp_cohort_module_params(c), gget(g, "pcl", "params", np), np * sizeof(float));
  ck_assert(kdp_cohort_feature_grads(c));
  kdp_kd_batch b = {.z = in.z, .h = in.h, .y = in.y, .B = B, .T = in.T, .weight = in.W,
                    .z_ema = in.z_ema};
  g2out o;
  run_objective(c, &in, &b, &o);
  check_std(g, "pcl", c, &in, &o, 1);
  kdp_error err = {{0}};
  /* without the mean teachers' logits the call fails */
  kdp_kd_batch nb = b;
  nb.z_ema = NULL;
  ck_assert_int_eq(kdp_cohort_objective(c, &nb, o.dz, o.dh, NULL, NULL, NULL, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "z_ema"), "%s", err.msg);

  /* each rank's share L_i + L_e / P */
  float *dz = calloc(P * n, sizeof(float)), *dh = calloc(in.nh, sizeof(float));
  for (size_t i = 0; i < P; i++) {
    char what[48];
    memset(dz, 0, P * n * sizeof(float));
    memset(dh, 0, in.nh * sizeof(float));
    kdp_cohort_module_zero_grad(c);
    ck_assert_msg(kdp_cohort_step(c, i, &b, dz, dh, NULL, NULL, &err) == 0, "%s", err.msg);
    snprintf(what, sizeof what, "rank%zu.dz", i);
    cmp("pcl", what, dz, gget(g, "pcl", what, P * n), P * n, GRAD_ATOL, GRAD_RTOL);
    snprintf(what, sizeof what, "rank%zu.dh", i);
    cmp("pcl", what, dh, gget(g, "pcl", what, in.nh), in.nh, GRAD_ATOL, GRAD_RTOL);
    snprintf(what, sizeof what, "rank%zu.dparams", i);
    cmp("pcl", what, kdp_cohort_module_grads(c), gget(g, "pcl", what, np), np, GRAD_ATOL,
        GRAD_RTOL);
  }

  /* row-sharded as the trainer runs it: the module on row blocks [0, 3) and [3, B), each peer's
     term on its block's rows with scale n/B; the sums are the whole batch's gradients */
  memset(dz, 0, P * n * sizeof(float));
  memset(dh, 0, in.nh * sizeof(float));
  kdp_cohort_module_zero_grad(c);
  const size_t cut[3] = {0, 3, B};
  for (int k = 0; k < 2; k++) {
    size_t r0 = cut[k], m = cut[k + 1] - r0;
    float scale = (float)m / (float)B;
    float *zb = calloc(P * m * C, sizeof(float)), *eb = calloc(P * m * C, sizeof(float));
    float *hb = calloc(in.nh, sizeof(float)), *dzb = calloc(P * m * C, sizeof(float));
    float *dhb = calloc(in.nh, sizeof(float)), *t = calloc(m * C, sizeof(float));
    for (size_t j = 0; j < P; j++) {
      memcpy(zb + j * m * C, in.z + (j * B + r0) * C, m * C * sizeof(float));
      memcpy(eb + j * m * C, in.z_ema + (j * B + r0) * C, m * C * sizeof(float));
      size_t d = in.dims[j], ob = kdp_cohort_feature_offset(c, j, m);
      memcpy(hb + ob, in.h + kdp_cohort_feature_offset(c, j, B) + r0 * d, m * d * sizeof(float));
    }
    kdp_kd_rows blk = {.z = zb, .h = hb, .y = in.y + r0, .n = m, .T = in.T, .weight = in.W,
                       .scale = scale};
    ck_assert(kdp_cohort_module_forward(c, &blk, NULL, t, &err) == 0);
    for (size_t i = 0; i < P; i++) {
      kdp_kd_peer_in pin = {.z = zb + i * m * C, .teacher = t, .y = in.y + r0, .n = m, .T = in.T,
                            .weight = in.W, .scale = scale, .z_ema = eb};
      ck_assert_msg(kdp_cohort_peer_loss(c, i, &pin, dzb + i * m * C, NULL, NULL, &err) == 0, "%s",
                    err.msg);
    }
    ck_assert(kdp_cohort_module_backward(c, &blk, NULL, NULL, dzb, dhb, NULL, &err) == 0);
    for (size_t j = 0; j < P; j++) {
      for (size_t q = 0; q < m * C; q++) dz[(j * B + r0) * C + q] += dzb[j * m * C + q];
      size_t d = in.dims[j], ob = kdp_cohort_feature_offset(c, j, m);
      for (size_t q = 0; q < m * d; q++)
        dh[kdp_cohort_feature_offset(c, j, B) + r0 * d + q] += dhb[ob + q];
    }
    free(zb); free(eb); free(hb); free(dzb); free(dhb); free(t);
  }
  cmp("pcl", "row blocks dz", dz, gget(g, "pcl", "dz", P * n), P * n, GRAD_ATOL, GRAD_RTOL);
  cmp("pcl", "row blocks dh", dh, gget(g, "pcl", "dh", in.nh), in.nh, GRAD_ATOL, GRAD_RTOL);
  cmp("pcl", "row blocks dparams", kdp_cohort_module_grads(c), gget(g, "pcl", "dparams", np), np,
      GRAD_ATOL, GRAD_RTOL);
  free(dz);
  free(dh);
  g2out_free(&o);
  kdp_cohort_free(c);
  kdp_golden_free(g);
}
END_TEST

START_TEST(test_ema_golden) {
  ck_assert(kdp_ema_rate(0.999, 1) == 0.5); /* the first update averages */
  ck_assert(fabs(kdp_ema_rate(0.999, 3) - 0.75) < 1e-15);
  ck_assert(kdp_ema_rate(0.9, 9) == 0.9 && kdp_ema_rate(0.9, 1000) == 0.9);
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  const kdp_golden_rec *th = kdp_golden_get(g, "ema.thetas");
  const size_t N = th->dims[0] - 1, n = th->dims[1];
  const float *decays = gget(g, "ema", "decays", 2);
  float *ema = calloc(n, sizeof(float));
  for (int k = 0; k < 2; k++) {
    char what[32];
    snprintf(what, sizeof what, "d%d.traj", k);
    const float *traj = gget(g, "ema", what, N * n);
    memcpy(ema, th->data, n * sizeof(float));
    for (size_t t = 1; t <= N; t++) {
      /* the golden stores the decays as float32; PyTorch used the doubles 0.9 and 0.999 (at
         t = 9, min(1 - 1/10, decay) must be the double 0.9, not 0.9f) */
      double decay = round((double)decays[k] * 1e6) / 1e6;
      kdp_ema_update(ema, th->data + t * n, n, decay, (int64_t)t);
      char lab[64];
      snprintf(lab, sizeof lab, "ema decay %g after step %zu", decay, t);
      /* the same float operations as PyTorch (a product, then a fused multiply-add): the same
         bits; the tolerance check first, to say by how much if not */
      kdp_test_assert_close(lab, ema, traj + (t - 1) * n, n, 3e-7, 1e-6);
      ck_assert_msg(memcmp(ema, traj + (t - 1) * n, n * sizeof(float)) == 0,
                    "%s: not bitwise PyTorch's", lab);
    }
  }
  free(ema);
  kdp_golden_free(g);
}
END_TEST

/* ---------------------------------------------------------------- mcl */

START_TEST(test_mcl_golden) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  g2in in;
  g2_load(&in, g);
  const size_t P = in.P, B = in.B, C = in.C, n = B * C;
  const float *cfg = gget(g, "mcl", "config", 4);
  const size_t HID = (size_t)cfg[0], E = (size_t)cfg[1], nv = P * B * E;
  kdp_kd_spec s;
  spec_of(&s, &in, "mcl");
  s.embed_hidden = HID;
  s.embed_dim = E;
  s.tau = cfg[2];
  s.contrast_weight = cfg[3];
  kdp_cohort *c = make(&s, B);
  ck_assert_uint_eq(kdp_cohort_embed_dim(c), E);
  ck_assert_uint_eq(kdp_cohort_module_n_params(c), 0); /* the heads are the peers' own */
  kdp_error err = {{0}};

  /* each peer's head: forward to v */
  kdp_embed_head *hd[KDP_KD_MAX_PEERS];
  size_t hoff[KDP_KD_MAX_PEERS + 1] = {0};
  for (size_t j = 0; j < P; j++) {
    ck_assert_msg(kdp_embed_head_create(&hd[j], in.dims[j], HID, E, B, &err) == 0, "%s", err.msg);
    hoff[j + 1] = hoff[j] + kdp_embed_head_n_params(hd[j]);
  }
  const float *heads = gget(g, "mcl", "params", hoff[P]);
  float *v = calloc(nv, sizeof(float)), *dv = calloc(nv, sizeof(float));
  for (size_t j = 0, fo = 0; j < P; fo += B * in.dims[j], j++)
    kdp_embed_head_forward(hd[j], heads + hoff[j], in.h + fo, B, v + j * B * E);
  const float *vg = gget(g, "mcl", "v", nv);
  kdp_test_assert_close("mcl.v", v, vg, nv, 1e-6, 1e-5);

  /* the objective on the golden's float32 v */
  kdp_kd_batch b = {.z = in.z, .y = in.y, .B = B, .T = in.T, .weight = in.W, .v = vg, .dv = dv};
  g2out o;
  run_objective(c, &in, &b, &o);
  check_std(g, "mcl", c, &in, &o, 0);
  float con[KDP_KD_MAX_PEERS];
  for (size_t i = 0; i < P; i++) con[i] = (float)o.per[i].contrast;
  cmp("mcl", "contrast", con, gget(g, "mcl", "contrast", P), P, LOSS_ATOL, LOSS_RTOL);
  cmp("mcl", "dv", dv, gget(g, "mcl", "dv", nv), nv, GRAD_ATOL, GRAD_RTOL);

  /* through the heads: dJ/dh and dJ/dheads */
  float *dh = calloc(in.nh, sizeof(float)), *dp = calloc(hoff[P], sizeof(float));
  size_t fo = 0;
  for (size_t j = 0; j < P; j++) {
    kdp_embed_head_forward(hd[j], heads + hoff[j], in.h + fo, B, v + j * B * E);
    kdp_embed_head_backward(hd[j], heads + hoff[j], in.h + fo, B, dv + j * B * E, dp + hoff[j],
                            dh + fo);
    fo += B * in.dims[j];
  }
  cmp("mcl", "dh", dh, gget(g, "mcl", "dh", in.nh), in.nh, GRAD_ATOL, GRAD_RTOL);
  cmp("mcl", "dparams", dp, gget(g, "mcl", "dparams", hoff[P]), hoff[P], GRAD_ATOL, GRAD_RTOL);

  /* each rank's dL_i/dv_j for every j (what it sends), and the reverse collective's sum */
  float *dvi = calloc(nv, sizeof(float)), *sum = calloc(nv, sizeof(float));
  float *dz = calloc(P * n, sizeof(float));
  for (size_t i = 0; i < P; i++) {
    char what[48];
    memset(dvi, 0, nv * sizeof(float));
    memset(dz, 0, P * n * sizeof(float));
    kdp_kd_batch bi = b;
    bi.dv = dvi;
    ck_assert_msg(kdp_cohort_step(c, i, &bi, dz, NULL, NULL, NULL, &err) == 0, "%s", err.msg);
    snprintf(what, sizeof what, "rank%zu.dv", i);
    cmp("mcl", what, dvi, gget(g, "mcl", what, nv), nv, GRAD_ATOL, GRAD_RTOL);
    snprintf(what, sizeof what, "rank%zu.dz", i);
    cmp("mcl", what, dz, gget(g, "mcl", what, P * n), P * n, GRAD_ATOL, GRAD_RTOL);
    /* rank i's term reaches every peer's embeddings, not only its own */
    for (size_t j = 0; j < P; j++) {
      double a = 0;
      for (size_t k = 0; k < B * E; k++) a += fabs(dvi[j * B * E + k]);
      ck_assert_msg(a > 1e-6, "rank %zu: dL/dv_%zu is zero", i, j);
    }
    for (size_t k = 0; k < nv; k++) sum[k] += dvi[k];
  }
  kdp_test_assert_close("mcl: sum over ranks of dL_i/dv", sum, dv, nv, 1e-6, 1e-5);
  /* without the embeddings or their gradient buffer the call fails */
  kdp_kd_batch nb = b;
  nb.dv = NULL;
  ck_assert_int_eq(kdp_cohort_objective(c, &nb, dz, NULL, NULL, NULL, NULL, &err), KDP_EINVAL);
  free(dvi);
  free(sum);
  free(dz);
  free(dh);
  free(dp);
  free(v);
  free(dv);
  for (size_t j = 0; j < P; j++) kdp_embed_head_free(hd[j]);
  g2out_free(&o);
  kdp_cohort_free(c);
  kdp_golden_free(g);
}
END_TEST

/* An anchor whose class occurs once has no positive: it is left out of SC's mean (PyTorch's
   official code gives NaN); with no positive at all the term is 0, never NaN. */
START_TEST(test_mcl_no_positive) {
  enum { P = 2, B = 4, C = 4, E = 6 };
  kdp_kd_spec s;
  memset(&s, 0, sizeof s);
  ck_assert(kdp_method_parse_staged("mcl", &s.method, NULL) == 0);
  s.P = P;
  s.C = C;
  s.embed_dim = E;
  s.contrast_weight = 1.0f;
  kdp_cohort *c = make(&s, B);
  kdp_rng r;
  kdp_rng_seed(&r, 5, 0);
  float z[P * B * C], v[P * B * E], dv[P * B * E] = {0}, dz[P * B * C] = {0};
  for (size_t k = 0; k < P * B * C; k++) z[k] = kdp_rng_normal(&r);
  for (size_t k = 0; k < P * B * E; k++) v[k] = 0.4f * kdp_rng_normal(&r);
  int32_t y[B] = {0, 1, 2, 3};
  kdp_kd_batch b = {.z = z, .y = y, .B = B, .T = 2.0f, .weight = 0.5f, .v = v, .dv = dv};
  kdp_kd_losses per[P];
  double J;
  ck_assert(kdp_cohort_objective(c, &b, dz, NULL, NULL, per, &J, NULL) == 0);
  ck_assert(isfinite(J));
  for (size_t k = 0; k < P * B * E; k++) ck_assert(isfinite(dv[k]));
  /* only the soft terms remain: 2 x T^2 KL rows per peer, >= 0 */
  ck_assert(per[0].contrast >= 0.0 && per[1].contrast >= 0.0);
  kdp_cohort_free(c);
}
END_TEST

/* ---------------------------------------------------------------- switokd */

static void cmp_gaps(const char *what, const kdp_switokd_gaps *gp, const float *want) {
  const double got[5] = {gp->s, gp->g_t, gp->G, gp->eps, gp->delta};
  for (int k = 0; k < 5; k++)
    ck_assert_msg(fabs(got[k] - want[k]) < 1e-6, "%s: gap %d = %.9g, PyTorch %.9g", what, k, got[k],
                  (double)want[k]);
}

START_TEST(test_switokd_golden) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  g2in in;
  g2_load(&in, g);
  const size_t P = in.P, B = in.B, C = in.C, n = B * C;
  const char *cases[] = {"switokd_learning", "switokd_expert", "switokd_t2"};
  for (int k = 0; k < 3; k++) {
    const char *cs = cases[k];
    const float *cfg = gget(g, cs, "config", 2);
    kdp_kd_spec s;
    spec_of(&s, &in, "switokd");
    s.teacher_peer = (int)cfg[0];
    int expert = (int)cfg[1];
    kdp_cohort *c = make(&s, B);
    kdp_kd_batch b = {.z = in.z, .y = in.y, .B = B, .T = in.T, .weight = in.W, .expert = expert};
    g2out o;
    run_objective(c, &in, &b, &o);
    check_std(g, cs, c, &in, &o, 1);
    if (expert) /* the teacher does not move at all */
      for (size_t q = 0; q < n; q++) ck_assert(o.dz[(size_t)s.teacher_peer * n + q] == 0.0f);
    kdp_switokd_gaps gp;
    const float *want = gget(g, cs, "gaps", 6);
    int mode = kdp_switokd_mode(in.z, in.y, P, B, C, (size_t)s.teacher_peer, &gp);
    cmp_gaps(cs, &gp, want);
    ck_assert_int_eq(mode, (int)want[5]);
    ck_assert_int_eq(gp.expert, mode);
    g2out_free(&o);
    kdp_cohort_free(c);
  }
  kdp_kd_spec s;
  spec_of(&s, &in, "switokd");
  s.teacher_peer = 3;
  kdp_cohort *c = NULL;
  kdp_error err = {{0}};
  ck_assert_int_eq(kdp_cohort_create(&c, &s, B, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "teacher_peer"), "%s", err.msg);
  kdp_golden_free(g);
}
END_TEST

/* The modes of 200 steps of a heterogeneous cohort trained in PyTorch (an MLP teacher, linear
   students; the teacher pauses in expert mode), recomputed from the logged logits. */
START_TEST(test_switokd_sequence) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  const kdp_golden_rec *z = kdp_golden_get(g, "switokd_seq.z");
  const size_t steps = z->dims[0], P = z->dims[1], B = z->dims[2], C = z->dims[3];
  const float *yf = gget(g, "switokd_seq", "y", steps * B);
  const float *want = gget(g, "switokd_seq", "modes", steps);
  const float *gaps = gget(g, "switokd_seq", "gaps", steps * 5);
  int32_t *y = calloc(steps * B, sizeof(int32_t));
  int *modes = calloc(steps, sizeof(int));
  for (size_t k = 0; k < steps * B; k++) y[k] = (int32_t)yf[k];
  kdp_switokd_modes(modes, z->data, y, steps, P, B, C, 0);
  char seq[512] = "", ref[512] = "";
  size_t n_expert = 0;
  for (size_t k = 0; k < steps && k + 1 < sizeof seq; k++) {
    seq[k] = modes[k] ? 'E' : 'l';
    ref[k] = want[k] > 0.5f ? 'E' : 'l';
    n_expert += modes[k] != 0;
  }
  fprintf(stderr, "switokd modes (E expert, l learning), %zu of %zu expert:\n  kdpeers %s\n  PyTorch %s\n",
          n_expert, steps, seq, ref);
  ck_assert_msg(strcmp(seq, ref) == 0, "mode sequences differ:\n%s\n%s", seq, ref);
  ck_assert(n_expert > 0 && n_expert < steps);
  float *half = calloc(P * B * C, sizeof(float));
  for (size_t k = 0; k < steps; k++) {
    kdp_switokd_gaps gp, gh;
    const float *zk = z->data + k * P * B * C;
    kdp_switokd_mode(zk, y + k * B, P, B, C, 0, &gp);
    char what[32];
    snprintf(what, sizeof what, "step %zu", k);
    cmp_gaps(what, &gp, gaps + k * 5);
    /* the batch's rows on two ranks: sums of each half, added, decide the same mode */
    double s1[3], s2[3];
    const size_t r = B / 3;
    for (size_t j = 0; j < P; j++) memcpy(half + j * r * C, zk + j * B * C, r * C * 4);
    kdp_switokd_sums(half, y + k * B, P, r, C, 0, s1);
    for (size_t j = 0; j < P; j++)
      memcpy(half + j * (B - r) * C, zk + (j * B + r) * C, (B - r) * C * 4);
    kdp_switokd_sums(half, y + k * B + r, P, B - r, C, 0, s2);
    for (int q = 0; q < 3; q++) s1[q] += s2[q];
    ck_assert_int_eq(kdp_switokd_decide(s1, B, &gh), modes[k]);
    ck_assert(fabs(gh.G - gp.G) < 1e-12 && fabs(gh.delta - gp.delta) < 1e-12);
  }
  free(half);
  free(y);
  free(modes);
  kdp_golden_free(g);
}
END_TEST

/* ---------------------------------------------------------------- diversity */

START_TEST(test_diversity_golden) {
  kdp_golden *g = kdp_golden_load("golden_kd.bin");
  const kdp_golden_rec *z = kdp_golden_get(g, "div.z");
  const size_t P = z->dims[0], N = z->dims[1], C = z->dims[2];
  const float *zprev = gget(g, "div", "zprev", P * N * C);
  /* added in two evaluation batches, [0, 20) and [20, N), as the trainer would */
  kdp_diversity d;
  kdp_diversity_init(&d, P);
  const size_t cut = 20, rest = N - cut;
  float *blk = calloc(P * N * C, sizeof(float));
  for (size_t j = 0; j < P; j++) memcpy(blk + j * cut * C, z->data + j * N * C, cut * C * 4);
  kdp_diversity_add(&d, blk, cut, C);
  for (size_t j = 0; j < P; j++)
    memcpy(blk + j * rest * C, z->data + (j * N + cut) * C, rest * C * 4);
  kdp_diversity_add(&d, blk, rest, C);
  ck_assert_uint_eq(d.n, N);
  float kl = (float)kdp_diversity_kl(&d), dis = (float)kdp_diversity_disagreement(&d);
  cmp("div", "kl", &kl, gget(g, "div", "kl", 1), 1, 1e-6, 1e-5);
  cmp("div", "disagreement", &dis, gget(g, "div", "disagreement", 1), 1, 1e-7, 1e-6);
  float churn[KDP_KD_MAX_PEERS];
  int32_t *cur = calloc(N, sizeof(int32_t)), *prev = calloc(N, sizeof(int32_t));
  for (size_t j = 0; j < P; j++) {
    kdp_predicted_labels(cur, z->data + j * N * C, N, C);
    kdp_predicted_labels(prev, zprev + j * N * C, N, C);
    churn[j] = (float)kdp_churn(prev, cur, N);
    ck_assert(kdp_churn(cur, cur, N) == 0.0);
  }
  cmp("div", "churn", churn, gget(g, "div", "churn", P), P, 1e-7, 1e-6);
  /* identical peers: no diversity at all; one peer: 0, not NaN */
  for (size_t j = 1; j < P; j++) memcpy(blk + j * N * C, z->data, N * C * 4);
  memcpy(blk, z->data, N * C * 4);
  kdp_diversity_init(&d, P);
  kdp_diversity_add(&d, blk, N, C);
  ck_assert(fabs(kdp_diversity_kl(&d)) < 1e-12 && kdp_diversity_disagreement(&d) == 0.0);
  kdp_diversity_init(&d, 1);
  kdp_diversity_add(&d, blk, N, C);
  ck_assert(kdp_diversity_kl(&d) == 0.0 && kdp_diversity_disagreement(&d) == 0.0);
  free(blk);
  free(cur);
  free(prev);
  kdp_golden_free(g);
}
END_TEST

/* ---------------------------------------------------------------- limits and finite differences */

/* a cohort of a staged method with random inputs (every input any of them reads) */
typedef struct scase {
  kdp_cohort *c;
  size_t P, B, C, E, nh;
  float *z, *h, *ze, *v, *dv, *dz, *dh;
  int32_t *y;
  kdp_kd_batch b;
} scase;

static void scase_make(scase *k, const char *method, size_t P, size_t B, size_t C, float zs,
                       uint64_t seed) {
  const size_t dims[] = {6, 9, 4, 7};
  kdp_kd_spec s;
  memset(&s, 0, sizeof s);
  ck_assert(kdp_method_parse_staged(method, &s.method, NULL) == 0);
  s.P = P;
  s.C = C;
  s.leader = -1;
  s.ensemble = KDP_KDCL_GENERAL;
  s.embed_dim = 5;
  s.embed_hidden = 7;
  s.contrast_weight = 1.0f;
  s.teacher_peer = 1;
  for (size_t j = 0; j < P; j++) s.dims[j] = dims[j];
  memset(k, 0, sizeof *k);
  k->c = make(&s, B);
  kdp_rng r;
  kdp_rng_seed(&r, seed, KDP_STREAM_MODULE);
  kdp_cohort_module_init(k->c, &r);
  k->P = P;
  k->B = B;
  k->C = C;
  k->E = 5;
  k->nh = kdp_cohort_feature_floats(k->c, B);
  k->z = calloc(P * B * C, 4);
  k->ze = calloc(P * B * C, 4);
  k->dz = calloc(P * B * C, 4);
  k->h = calloc(k->nh + 1, 4);
  k->dh = calloc(k->nh + 1, 4);
  k->v = calloc(P * B * k->E, 4);
  k->dv = calloc(P * B * k->E, 4);
  k->y = calloc(B, sizeof(int32_t));
  for (size_t q = 0; q < P * B * C; q++) {
    k->z[q] = zs * kdp_rng_normal(&r);
    k->ze[q] = zs * kdp_rng_normal(&r);
  }
  for (size_t q = 0; q < k->nh; q++) k->h[q] = kdp_rng_normal(&r);
  for (size_t b = 0; b < P * B; b++) { /* unit rows, as the heads give */
    double ss = 0;
    for (size_t e = 0; e < k->E; e++) {
      k->v[b * k->E + e] = kdp_rng_normal(&r);
      ss += (double)k->v[b * k->E + e] * k->v[b * k->E + e];
    }
    for (size_t e = 0; e < k->E; e++) k->v[b * k->E + e] /= (float)sqrt(ss);
  }
  for (size_t b = 0; b < B; b++) k->y[b] = (int32_t)kdp_rng_below(&r, (uint32_t)C);
  kdp_kd_batch bt = {.z = k->z, .h = k->h, .y = k->y, .B = B, .T = 3.0f, .weight = 0.7f,
                     .z_ema = k->ze, .v = k->v, .dv = k->dv};
  k->b = bt;
}

static void scase_free(scase *k) {
  kdp_cohort_free(k->c);
  free(k->z); free(k->ze); free(k->dz); free(k->h); free(k->dh); free(k->v); free(k->dv);
  free(k->y);
}

static const char *const staged_all[] = {"kdcl", "pcl", "mcl", "switokd"};

START_TEST(test_staged_extreme_logits) {
  for (size_t m = 0; m < 4; m++)
    for (int expert = 0; expert < 2; expert++) {
      scase k;
      scase_make(&k, staged_all[m], 3, 5, 6, 1.0f, 31);
      for (size_t q = 0; q < 3 * 5 * 6; q++) {
        k.z[q] = k.z[q] > 0 ? 80.0f : -80.0f;
        k.ze[q] = k.ze[q] > 0 ? 80.0f : -80.0f;
      }
      k.b.expert = expert;
      kdp_kd_losses per[3];
      double J = 0;
      float t[30];
      kdp_error err = {{0}};
      ck_assert_msg(kdp_cohort_objective(k.c, &k.b, k.dz, k.dh, t, per, &J, &err) == 0, "%s",
                    err.msg);
      ck_assert_msg(isfinite(J), "%s: J = %g", staged_all[m], J);
      for (size_t q = 0; q < 90; q++) ck_assert(isfinite(k.dz[q]));
      for (size_t q = 0; q < k.nh; q++) ck_assert(isfinite(k.dh[q]));
      for (size_t q = 0; q < 3 * 5 * k.E; q++) ck_assert(isfinite(k.dv[q]));
      for (size_t q = 0; q < 30; q++) ck_assert(isfinite(t[q]));
      ck_assert(kdp_cohort_teacher_eval(k.c, k.z, k.h, 5, t, &err) == 0);
      for (size_t q = 0; q < 30; q++) ck_assert(isfinite(t[q]));
      scase_free(&k);
    }
}
END_TEST

/* One class: CE and every logit KD term are 0 and so are the logits' gradients. */
START_TEST(test_staged_one_class) {
  for (size_t m = 0; m < 4; m++) {
    scase k;
    scase_make(&k, staged_all[m], 3, 4, 1, 3.0f, 21);
    kdp_kd_losses per[3];
    double J = 0;
    kdp_error err = {{0}};
    ck_assert_msg(kdp_cohort_objective(k.c, &k.b, k.dz, k.dh, NULL, per, &J, &err) == 0, "%s",
                  err.msg);
    for (size_t i = 0; i < 3; i++)
      ck_assert_msg(fabs(per[i].ce) < 1e-6 && fabs(per[i].kd) < 1e-6, "%s C=1: ce %g kd %g",
                    staged_all[m], per[i].ce, per[i].kd);
    for (size_t q = 0; q < 12; q++) ck_assert(fabsf(k.dz[q]) < 1e-6f);
    scase_free(&k);
  }
}
END_TEST

/* pcl's module loss L_e against finite differences (its peers' terms use sg(z_e), so the module's
   parameters and the features get gradients from L_e alone). */
START_TEST(test_pcl_fd) {
  scase k;
  scase_make(&k, "pcl", 3, 6, 4, 1.5f, 300);
  kdp_error err = {{0}};
  const size_t np = kdp_cohort_module_n_params(k.c);
  kdp_kd_losses per[3];
  kdp_cohort_module_zero_grad(k.c);
  ck_assert(kdp_cohort_objective(k.c, &k.b, k.dz, k.dh, NULL, per, NULL, &err) == 0);
  float *dp = calloc(np, 4), *sz = calloc(3 * 6 * 4, 4), *sh = calloc(k.nh, 4);
  memcpy(dp, kdp_cohort_module_grads(k.c), np * 4);
  struct { float *x, *g; size_t n; const char *what; } pr[] = {
      {k.h, k.dh, k.nh, "dh"}, {kdp_cohort_module_params(k.c), dp, np, "dparams"}};
  const float eps = 3e-3f;
  for (int p = 0; p < 2; p++)
    for (size_t q = 0; q < pr[p].n; q += 3) {
      float save = pr[p].x[q];
      double Lp, Lm;
      pr[p].x[q] = save + eps;
      ck_assert(kdp_cohort_objective(k.c, &k.b, sz, sh, NULL, per, NULL, &err) == 0);
      Lp = per[0].module_loss;
      pr[p].x[q] = save - eps;
      ck_assert(kdp_cohort_objective(k.c, &k.b, sz, sh, NULL, per, NULL, &err) == 0);
      Lm = per[0].module_loss;
      pr[p].x[q] = save;
      double fd = (Lp - Lm) / (2.0 * eps), an = pr[p].g[q];
      ck_assert_msg(fabs(fd - an) < 2e-3 + 2e-2 * fabs(fd), "pcl %s[%zu]: fd %g analytic %g",
                    pr[p].what, q, fd, an);
    }
  free(dp);
  free(sz);
  free(sh);
  scase_free(&k);
}
END_TEST

/* The embedding head's backward against finite differences of <v, r> for a fixed r. */
START_TEST(test_embed_head_fd) {
  enum { n = 5, d = 7, H = 6, E = 4 };
  kdp_embed_head *hd = NULL;
  kdp_error err = {{0}};
  ck_assert_int_eq(kdp_embed_head_create(&hd, d, 0, E, n, &err), KDP_EINVAL);
  ck_assert(hd == NULL && strstr(err.msg, "hidden"));
  ck_assert(kdp_embed_head_create(&hd, d, H, E, n, &err) == 0);
  const size_t np = kdp_embed_head_n_params(hd);
  ck_assert_uint_eq(np, H * d + H + E * H + E);
  kdp_rng r;
  kdp_rng_seed(&r, 17, 0);
  float *p = calloc(np, 4), *dp = calloc(np, 4), x[n * d], dx[n * d] = {0}, v[n * E], rr[n * E];
  kdp_embed_head_init(hd, p, &r);
  for (size_t q = 0; q < n * d; q++) x[q] = kdp_rng_normal(&r);
  for (size_t q = 0; q < n * E; q++) rr[q] = kdp_rng_normal(&r);
  kdp_embed_head_forward(hd, p, x, n, v);
  for (size_t b = 0; b < n; b++) {
    double ss = 0;
    for (size_t e = 0; e < E; e++) ss += (double)v[b * E + e] * v[b * E + e];
    ck_assert_msg(fabs(ss - 1.0) < 1e-5, "row %zu has norm^2 %g", b, ss);
  }
  kdp_embed_head_backward(hd, p, x, n, rr, dp, dx);
  struct { float *x, *g; size_t n; const char *what; } pr[] = {{x, dx, n * d, "dx"},
                                                               {p, dp, np, "dparams"}};
  const float eps = 1e-3f;
  for (int k = 0; k < 2; k++)
    for (size_t q = 0; q < pr[k].n; q++) {
      float save = pr[k].x[q];
      double f[2];
      for (int sgn = 0; sgn < 2; sgn++) {
        pr[k].x[q] = save + (sgn ? -eps : eps);
        kdp_embed_head_forward(hd, p, x, n, v);
        double acc = 0;
        for (size_t e = 0; e < n * E; e++) acc += (double)v[e] * rr[e];
        f[sgn] = acc;
      }
      pr[k].x[q] = save;
      double fd = (f[0] - f[1]) / (2.0 * eps), an = pr[k].g[q];
      ck_assert_msg(fabs(fd - an) < 2e-3 + 2e-2 * fabs(fd), "head %s[%zu]: fd %g analytic %g",
                    pr[k].what, q, fd, an);
    }
  free(p);
  free(dp);
  kdp_embed_head_free(hd);
}
END_TEST

static Suite *gen2_suite(void) {
  Suite *s = suite_create("kd_gen2");
  TCase *t = kdp_test_case("core");
  tcase_add_test(t, test_staged_methods);
  tcase_add_test(t, test_kdcl_general_weights);
  tcase_add_test(t, test_kdcl_golden);
  tcase_add_test(t, test_pcl_golden);
  tcase_add_test(t, test_ema_golden);
  tcase_add_test(t, test_mcl_golden);
  tcase_add_test(t, test_mcl_no_positive);
  tcase_add_test(t, test_switokd_golden);
  tcase_add_test(t, test_switokd_sequence);
  tcase_add_test(t, test_diversity_golden);
  tcase_add_test(t, test_staged_extreme_logits);
  tcase_add_test(t, test_staged_one_class);
  tcase_add_test(t, test_pcl_fd);
  tcase_add_test(t, test_embed_head_fd);
  suite_add_tcase(s, t);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(gen2_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
