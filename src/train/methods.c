/* methods.c: glue between the exchanges (dist) and the loss math (kd) for each method. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "train_internal.h"

typedef enum { M_INDEPENDENT, M_DML, M_CODISTILL, M_AVG, M_ONE, M_FFL, M_OKDDIP } method_id;

typedef struct mstate {
  method_id id;
  float *z_all;  /* P x Bl x C allgathered logits */
  float *q;      /* Bl x C teacher distribution */
  float *p_tmp;  /* Bl x C */
} mstate;

static method_id parse_method(const char *s) {
  if (strcmp(s, "dml") == 0) return M_DML;
  if (strcmp(s, "codistill") == 0) return M_CODISTILL;
  if (strcmp(s, "avg") == 0) return M_AVG;
  if (strcmp(s, "one") == 0) return M_ONE;
  if (strcmp(s, "ffl") == 0) return M_FFL;
  if (strcmp(s, "okddip") == 0) return M_OKDDIP;
  return M_INDEPENDENT;
}

int kdp_method_init(kdp_trainer *t, kdp_error *err) {
  mstate *s = kdp_xcalloc(1, sizeof *s);
  t->method = s;
  t->lr_scale = 1.0;
  s->id = t->P > 1 ? parse_method(t->cfg->method) : M_INDEPENDENT;
  if (s->id == M_ONE || s->id == M_FFL || s->id == M_OKDDIP)
    return kdp_fail(err, KDP_EINVAL, "kd.method = %s is not available yet in this build",
                    t->cfg->method);
  if (s->id == M_CODISTILL && strcmp(t->cfg->exchange, "weights") == 0)
    return kdp_fail(err, KDP_EINVAL, "kd.exchange = weights is not available yet in this build");
  s->z_all = kdp_falloc((size_t)t->P * t->Bl * t->C);
  s->q = kdp_falloc(t->Bl * t->C);
  s->p_tmp = kdp_falloc(t->Bl * t->C);
  return 0;
}

void kdp_method_free(kdp_trainer *t) {
  mstate *s = t->method;
  if (!s) return;
  free(s->z_all);
  free(s->q);
  free(s->p_tmp);
  free(s);
  t->method = NULL;
}

void kdp_method_step(kdp_trainer *t, const float *z, const int32_t *y, size_t b, int64_t step,
                     double epoch, float scale, kdp_step_loss *out) {
  mstate *s = t->method;
  size_t C = t->C, n = b * C;
  int P = t->P, me = t->d->peer;
  const kdp_config *cfg = t->cfg;
  float T = (float)cfg->temperature;
  double w = cfg->weight * kdp_rampup(epoch, cfg->rampup_epochs);
  memset(out, 0, sizeof *out);
  out->ce = kdp_ce_loss(z, y, b, C, t->dlogits, scale, &out->correct);
  if (s->id == M_INDEPENDENT) return;
  kdp_dist_cohort_allgather(t->d, z, s->z_all, n);
  if (s->id == M_CODISTILL && step < cfg->burn_in_steps) return;
  if (s->id == M_DML) {
    /* (1/(P-1)) sum_{j != i} T^2 KL(sg s_T(z_j) || s_T(z_i)) */
    for (int j = 0; j < P; j++) {
      if (j == me) continue;
      kdp_softmax_t(s->q, s->z_all + (size_t)j * n, b, C, T);
      out->kd += kdp_kl_loss(z, s->q, b, C, T, t->dlogits, (float)(w / (P - 1)) * scale) /
                 (double)(P - 1);
    }
    out->kd *= w;
    return;
  }
  /* codistill: mean over the others; avg: mean over all peers including this one */
  memset(s->q, 0, n * sizeof(float));
  int cnt = 0;
  for (int j = 0; j < P; j++) {
    if (s->id == M_CODISTILL && j == me) continue;
    kdp_softmax_t(s->p_tmp, s->z_all + (size_t)j * n, b, C, T);
    for (size_t k = 0; k < n; k++) s->q[k] += s->p_tmp[k];
    cnt++;
  }
  for (size_t k = 0; k < n; k++) s->q[k] /= (float)cnt;
  out->kd = w * kdp_kl_loss(z, s->q, b, C, T, t->dlogits, (float)w * scale);
}

void kdp_method_after_backward(kdp_trainer *t) { (void)t; }
void kdp_method_opt_step(kdp_trainer *t, float lr) {
  (void)t;
  (void)lr;
}
