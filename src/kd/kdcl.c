/* kdcl: collaborative learning (Guo et al., CVPR 2020). One ensemble teacher z_t built from every
   peer's logits teaches each peer: L_i = CE(z_i, y) + lam w T^2 KL(sg s_T(z_t) || s_T(z_i)).
   kd.ensemble picks z_t: naive mean_j z_j; minlogit min_j (z_j - z_j[y]) per class; general
   sum_j w_j z_j with w from the validation split (kdp_kdcl_general_weights). Each is one reduction
   over the peers of a per-peer contribution (sum or min), so the trainer needs one allreduce of
   B x C floats instead of an allgather. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_internal.h"

typedef struct kdcl_state {
  size_t o_w; /* general: the weights w (P) in the module buffers */
} kdcl_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  if ((int)s->ensemble < KDP_KDCL_NAIVE || s->ensemble > KDP_KDCL_GENERAL)
    return kdp_fail(err, KDP_EINVAL,
                    "kd.ensemble = %d: expected naive (0), minlogit (1) or general (2)",
                    (int)s->ensemble);
  kdcl_state *st = kdp_cohort_alloc(c, sizeof *st);
  if (s->ensemble == KDP_KDCL_GENERAL)
    st->o_w = kdp_cohort_add_buffers(c, s->P, 1.0f / (float)s->P);
  kdp_cohort_set_state(c, st);
  return 0;
}

static void contribute(const kdp_cohort *c, size_t j, const float *z, const int32_t *y, size_t n,
                       float *out) {
  const size_t C = c->s.C;
  const kdcl_state *st = c->state;
  if (c->s.ensemble == KDP_KDCL_MINLOGIT) {
    for (size_t b = 0; b < n; b++) {
      const float *zr = z + b * C;
      float zy = zr[y[b]];
      for (size_t k = 0; k < C; k++) out[b * C + k] = zr[k] - zy;
    }
    return;
  }
  float a = c->s.ensemble == KDP_KDCL_GENERAL ? c->buffers[st->o_w + j] : 1.0f / (float)c->s.P;
  for (size_t k = 0; k < n * C; k++) out[k] = a * z[k];
}

static kdp_reduce_op reduce_op(const kdp_cohort *c) {
  return c->s.ensemble == KDP_KDCL_MINLOGIT ? KDP_REDUCE_MIN : KDP_REDUCE_SUM;
}

/* reported as "kdcl": z_t for naive and general; minlogit's z_t needs the label (an oracle at
   test time), so the probability-mean ensemble stands in for it */
static void teacher_eval(kdp_cohort *c, const kdp_kd_rows *blk, float *out) {
  if (c->s.ensemble == KDP_KDCL_MINLOGIT)
    kdp_ensemble_logprob(out, blk->z, c->s.P, blk->n, c->s.C);
  else
    kdp_cohort_reduced_teacher(c, blk->z, NULL, blk->n, out, NULL);
}

int kdp_kdcl_set_weights(kdp_cohort *c, const float *w, kdp_error *err) {
  if (c->ops != &kdp_kdcl_ops || c->s.ensemble != KDP_KDCL_GENERAL)
    return kdp_fail(err, KDP_EINVAL, "kdp_kdcl_set_weights: the cohort is not kdcl general");
  double sum = 0.0;
  for (size_t j = 0; j < c->s.P; j++) {
    if (!(w[j] >= 0.0f) || !isfinite(w[j]))
      return kdp_fail(err, KDP_EINVAL, "kdp_kdcl_set_weights: w[%zu] = %g is not >= 0", j,
                      (double)w[j]);
    sum += w[j];
  }
  if (fabs(sum - 1.0) > 1e-4)
    return kdp_fail(err, KDP_EINVAL, "kdp_kdcl_set_weights: the weights sum to %g, not 1", sum);
  const kdcl_state *st = c->state;
  memcpy(c->buffers + st->o_w, w, c->s.P * sizeof(float));
  return 0;
}

/* Cholesky solve of A x = b, A (m x m) symmetric positive definite, in place; 0 on success */
static int spd_solve(double *A, double *x, size_t m) {
  for (size_t j = 0; j < m; j++) {
    double d = A[j * m + j];
    for (size_t k = 0; k < j; k++) d -= A[j * m + k] * A[j * m + k];
    if (!(d > 0.0)) return -1;
    A[j * m + j] = sqrt(d);
    for (size_t i = j + 1; i < m; i++) {
      double v = A[i * m + j];
      for (size_t k = 0; k < j; k++) v -= A[i * m + k] * A[j * m + k];
      A[i * m + j] = v / A[j * m + j];
    }
  }
  for (size_t i = 0; i < m; i++) { /* L u = b */
    double v = x[i];
    for (size_t k = 0; k < i; k++) v -= A[i * m + k] * x[k];
    x[i] = v / A[i * m + i];
  }
  for (size_t i = m; i-- > 0;) { /* L^T x = u */
    double v = x[i];
    for (size_t k = i + 1; k < m; k++) v -= A[k * m + i] * x[k];
    x[i] = v / A[i * m + i];
  }
  return 0;
}

int kdp_kdcl_general_weights(float *w, const float *z_val, const int32_t *y, size_t P, size_t N,
                             size_t C, kdp_error *err) {
  const char *fn = "kdp_kdcl_general_weights";
  if (P < 1 || P > KDP_KD_MAX_PEERS || N < 1 || C < 1 || !w || !z_val || !y)
    return kdp_fail(err, KDP_EINVAL, "%s: %zu peers, %zu examples, %zu classes (all >= 1, "
                    "peers <= %d) and the buffers are required", fn, P, N, C, KDP_KD_MAX_PEERS);
  for (size_t b = 0; b < N; b++)
    if (y[b] < 0 || (size_t)y[b] >= C)
      return kdp_fail(err, KDP_EINVAL, "%s: label y[%zu] = %d outside [0, %zu)", fn, b, (int)y[b],
                      C);
  double *Q = kdp_xcalloc(P * P, sizeof(double)), *x = kdp_xcalloc(P, sizeof(double));
  float *e = kdp_falloc(P * C);
  for (size_t b = 0; b < N; b++) {
    for (size_t j = 0; j < P; j++) { /* e_j = softmax(z_j) - onehot(y) */
      kdp_softmax_t(e + j * C, z_val + (j * N + b) * C, 1, C, 1.0f);
      e[j * C + y[b]] -= 1.0f;
    }
    for (size_t j = 0; j < P; j++)
      for (size_t k = 0; k <= j; k++) {
        double acc = 0.0;
        for (size_t q = 0; q < C; q++) acc += (double)e[j * C + q] * e[k * C + q];
        Q[j * P + k] += acc;
      }
  }
  for (size_t j = 0; j < P; j++) {
    for (size_t k = 0; k <= j; k++) Q[k * P + j] = Q[j * P + k] = Q[j * P + k] / (double)N;
    Q[j * P + j] += 1e-6;
    x[j] = 1.0;
  }
  int rc = spd_solve(Q, x, P);
  double sum = 0.0, pos = 0.0;
  for (size_t j = 0; j < P; j++) sum += x[j];
  if (rc == 0 && sum > 0.0)
    for (size_t j = 0; j < P; j++) pos += (x[j] /= sum) > 0.0 ? x[j] : 0.0;
  if (rc != 0 || !(pos > 0.0) || !isfinite(pos)) {
    free(Q);
    free(x);
    free(e);
    return kdp_fail(err, KDP_EINVAL, "%s: the validation logits give a singular system", fn);
  }
  for (size_t j = 0; j < P; j++) w[j] = (float)((x[j] > 0.0 ? x[j] : 0.0) / pos);
  free(Q);
  free(x);
  free(e);
  return 0;
}

const kdp_method_ops kdp_kdcl_ops = {
    .name = "kdcl", .teacher = "kdcl", .min_peers = 2,
    .setup = setup, .peer_loss = kd_sg_teacher_loss, .teacher_eval = teacher_eval,
    .contribute = contribute, .reduce_op = reduce_op};
