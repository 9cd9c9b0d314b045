/* switokd: switchable online KD (Qian et al., ECCV 2022), hfutqian/SwitOKD. Peer kd.teacher_peer
   is the teacher t, the others are students. Every step, from the exchanged train-mode logits,
   every rank decides the mode (kdp_switokd_mode): expert when the distillation gap G exceeds the
   threshold delta and the teacher is closer to the labels than the students' mean, else learning.
   Students: L_i = CE(z_i, y) + lam w T^2 KL(sg s_T(z_t) || s_T(z_i)). The teacher, in learning
   mode: L_t = CE(z_t, y) + lam w T^2 KL(sg s_T(z_s) || s_T(z_t)), z_s the students' mean logits;
   in expert mode it has no gradient at all (the trainer skips its optimizer step). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_internal.h"

typedef struct switokd_state {
  float *g, *zs; /* maxB x C: the peer term's gradient, the students' mean logits */
  double *row;   /* C */
} switokd_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  if (s->teacher_peer < 0 || (size_t)s->teacher_peer >= s->P)
    return kdp_fail(err, KDP_EINVAL, "kd.teacher_peer = %d is not a cohort rank; expected 0..%zu",
                    s->teacher_peer, s->P - 1);
  switokd_state *st = kdp_cohort_alloc(c, sizeof *st);
  st->g = kdp_cohort_falloc(c, c->maxB * s->C);
  st->zs = kdp_cohort_falloc(c, c->maxB * s->C);
  st->row = kdp_cohort_alloc(c, s->C * sizeof(double));
  kdp_cohort_set_state(c, st);
  return 0;
}

/* zs (C) = the mean over the students of row b's logits, in double */
static void students_mean(double *zs, const float *z_all, size_t P, size_t n, size_t C, size_t t,
                          size_t b) {
  for (size_t k = 0; k < C; k++) zs[k] = 0.0;
  for (size_t j = 0; j < P; j++)
    if (j != t)
      for (size_t k = 0; k < C; k++) zs[k] += z_all[(j * n + b) * C + k];
  for (size_t k = 0; k < C; k++) zs[k] /= (double)(P - 1);
}

static void softmax_d(double *p, const double *z, size_t C) {
  double mx = z[0], s = 0.0;
  for (size_t k = 1; k < C; k++)
    if (z[k] > mx) mx = z[k];
  for (size_t k = 0; k < C; k++) s += p[k] = exp(z[k] - mx);
  for (size_t k = 0; k < C; k++) p[k] /= s;
}

void kdp_switokd_sums(const float *z_all, const int32_t *y, size_t P, size_t n, size_t C,
                      size_t teacher, double sums[3]) {
  sums[0] = sums[1] = sums[2] = 0.0;
  if (P < 2 || !n || !C || teacher >= P) return;
  double *buf = kdp_xmalloc(4 * C * sizeof(double));
  double *zs = buf, *zt = buf + C, *ps = buf + 2 * C, *pt = buf + 3 * C;
  for (size_t b = 0; b < n; b++) {
    students_mean(zs, z_all, P, n, C, teacher, b);
    for (size_t k = 0; k < C; k++) zt[k] = z_all[(teacher * n + b) * C + k];
    softmax_d(ps, zs, C);
    softmax_d(pt, zt, C);
    for (size_t k = 0; k < C; k++) {
      double oh = (int32_t)k == y[b] ? 1.0 : 0.0;
      sums[0] += fabs(ps[k] - oh);
      sums[1] += fabs(pt[k] - oh);
      sums[2] += fabs(pt[k] - ps[k]);
    }
  }
  free(buf);
}

int kdp_switokd_decide(const double sums[3], size_t n, kdp_switokd_gaps *out) {
  kdp_switokd_gaps g;
  memset(&g, 0, sizeof g);
  if (n) {
    g.s = sums[0] / (double)n;
    g.g_t = sums[1] / (double)n;
    g.G = sums[2] / (double)n;
    g.eps = g.g_t + g.s > 0.0 ? exp(-g.g_t / (g.g_t + g.s)) : 1.0;
    g.delta = g.s - g.eps * g.g_t;
    g.expert = g.G > g.delta && g.g_t < g.s;
  }
  if (out) *out = g;
  return g.expert;
}

int kdp_switokd_mode(const float *z_all, const int32_t *y, size_t P, size_t n, size_t C,
                     size_t teacher, kdp_switokd_gaps *out) {
  double sums[3];
  kdp_switokd_sums(z_all, y, P, n, C, teacher, sums);
  return kdp_switokd_decide(sums, P >= 2 && teacher < P ? n : 0, out);
}

void kdp_switokd_modes(int *modes, const float *z_seq, const int32_t *y_seq, size_t steps,
                       size_t P, size_t n, size_t C, size_t teacher) {
  for (size_t k = 0; k < steps; k++)
    modes[k] = kdp_switokd_mode(z_seq + k * P * n * C, y_seq + k * n, P, n, C, teacher, NULL);
}

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)dteacher;
  switokd_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, n = in->n, C = c->s.C, t = (size_t)c->s.teacher_peer;
  if (i == t && in->expert) { /* the teacher pauses: its CE is reported, nothing flows */
    out->ce = kdp_ce_loss(in->z, in->y, n, C, NULL, 0.0f, &out->n_correct);
    out->loss = out->ce;
    return;
  }
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, st->g, 1.0f, &out->n_correct);
  double kd = 0.0;
  if (P > 1 && i != t) {
    kd = kdp_kl_logits(in->z_all + t * n * C, in->z, n, C, in->T, NULL, st->g, in->weight);
  } else if (P > 1) {
    for (size_t b = 0; b < n; b++) {
      students_mean(st->row, in->z_all, P, n, C, t, b);
      for (size_t k = 0; k < C; k++) st->zs[b * C + k] = (float)st->row[k];
    }
    kd = kdp_kl_logits(st->zs, in->z, n, C, in->T, NULL, st->g, in->weight);
  }
  kd_peer_done(dz, st->g, C, in, in->weight, kd, out);
}

const kdp_method_ops kdp_switokd_ops = {
    .name = "switokd", .min_peers = 2, .peer_reads = KDP_READS_LOGITS,
    .setup = setup, .peer_loss = peer_loss};
