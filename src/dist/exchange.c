/* exchange.c: feeds the cohort loss math (kd) with allgathered logits and features, and hands
   each peer the gradients addressed to it with a reduce-scatter. */
#include <stdlib.h>
#include <string.h>

#include "kdpeers/dist.h"
#include "kdpeers/kd.h"

struct kdp_exchange {
  kdp_dist *d;
  kdp_cohort *c;
  size_t C, max_b, P, me;
  int uses_feat, feat_grads, cross_grads;
  float *z_all, *dz_all, *my;   /* P x max_b x C, P x max_b x C, max_b x max(C, d_me) */
  float *h_all, *dh_all;        /* cohort feature floats for max_b */
  size_t counts[KDP_KD_MAX_PEERS], displs[KDP_KD_MAX_PEERS];
};

int kdp_exchange_create(kdp_exchange **out, kdp_dist *d, kdp_cohort *c, size_t C, size_t max_b,
                        kdp_error *err) {
  const kdp_kd_spec *sp = kdp_cohort_spec(c);
  if (sp->P != (size_t)d->n_peers)
    return kdp_fail(err, KDP_EINVAL, "cohort of %zu peers on a layout of %d peers", sp->P,
                    d->n_peers);
  kdp_exchange *x = kdp_xcalloc(1, sizeof *x);
  x->d = d;
  x->c = c;
  x->C = C;
  x->max_b = max_b;
  x->P = sp->P;
  x->me = (size_t)d->peer;
  const kdp_method_ops *o = kdp_cohort_ops(c);
  x->uses_feat = ((o->peer_reads | o->module_reads) & KDP_READS_FEATURES) != 0;
  x->feat_grads = kdp_cohort_feature_grads(c);
  /* gradients reach other peers' logits through the gate/fusion losses and okddip's attention */
  x->cross_grads = (o->module_reads && !o->teacher_per_peer) || kdp_cohort_teacher_grad(c);
  size_t dme = sp->dims[x->me];
  x->z_all = kdp_falloc(x->P * max_b * C);
  x->dz_all = kdp_falloc(x->P * max_b * C);
  x->my = kdp_falloc(max_b * (C > dme ? C : dme));
  size_t nf = kdp_cohort_feature_floats(c, max_b);
  x->h_all = kdp_falloc(nf ? nf : 1);
  x->dh_all = kdp_falloc(nf ? nf : 1);
  *out = x;
  return 0;
}

void kdp_exchange_free(kdp_exchange *x) {
  if (!x) return;
  free(x->z_all);
  free(x->dz_all);
  free(x->my);
  free(x->h_all);
  free(x->dh_all);
  free(x);
}

static void set_counts(kdp_exchange *x, size_t b) {
  const kdp_kd_spec *sp = kdp_cohort_spec(x->c);
  for (size_t j = 0; j < x->P; j++) {
    x->counts[j] = b * sp->dims[j];
    x->displs[j] = kdp_cohort_feature_offset(x->c, j, b);
  }
}

static void gather(kdp_exchange *x, const float *z, const float *h, size_t b) {
  kdp_dist_cohort_allgather(x->d, z, x->z_all, b * x->C);
  if (x->uses_feat) {
    set_counts(x, b);
    kdp_dist_cohort_allgatherv(x->d, h, x->counts[x->me], x->h_all, x->counts, x->displs);
  }
}

/* The cohort's input for a step of a->b rows from the gathered z_all (h_all), with the gradient
   buffers it accumulates into (dz_all, dh_all, the module's) zeroed. */
static kdp_kd_batch step_batch(kdp_exchange *x, const kdp_exchange_args *a) {
  size_t b = a->b;
  memset(x->dz_all, 0, x->P * b * x->C * sizeof(float));
  if (x->feat_grads) memset(x->dh_all, 0, kdp_cohort_feature_floats(x->c, b) * sizeof(float));
  if (kdp_cohort_module_n_params(x->c)) kdp_cohort_module_zero_grad(x->c);
  kdp_kd_batch in = {.z = x->z_all,
                     .h = x->uses_feat ? x->h_all : NULL,
                     .y = a->y,
                     .B = b,
                     .T = a->T,
                     .weight = a->weight,
                     .burn_in = a->burn_in};
  return in;
}

int kdp_exchange_step(kdp_exchange *x, const float *z, const float *h,
                      const kdp_exchange_args *a, float *dz, float *dh, kdp_kd_losses *out,
                      kdp_error *err) {
  size_t b = a->b, n = b * x->C;
  if (b > x->max_b) return kdp_fail(err, KDP_EINVAL, "batch %zu > %zu", b, x->max_b);
  gather(x, z, h, b);
  kdp_kd_batch in = step_batch(x, a);
  int rc = kdp_cohort_step(x->c, x->me, &in, x->dz_all, x->feat_grads ? x->dh_all : NULL, NULL,
                           out, err);
  if (rc != 0) return rc;
  const float *g = x->dz_all + x->me * n;
  if (x->cross_grads) {
    kdp_dist_cohort_reduce_scatter(x->d, x->dz_all, x->my, n);
    g = x->my;
  }
  for (size_t k = 0; k < n; k++) dz[k] += a->scale * g[k];
  if (x->feat_grads && dh) {
    set_counts(x, b);
    kdp_dist_cohort_reduce_scatterv(x->d, x->dh_all, x->my, x->counts);
    size_t nd = x->counts[x->me];
    for (size_t k = 0; k < nd; k++) dh[k] += a->scale * x->my[k];
  }
  size_t nm = kdp_cohort_module_n_params(x->c);
  if (nm) {
    float *mg = kdp_cohort_module_grads(x->c);
    for (size_t k = 0; k < nm; k++) mg[k] *= a->scale;
  }
  return 0;
}

void kdp_exchange_module_allreduce(kdp_exchange *x) {
  size_t nm = kdp_cohort_module_n_params(x->c);
  if (!nm) return;
  if (x->d->uniform)
    kdp_dist_world_allreduce(x->d, kdp_cohort_module_grads(x->c), nm);
  else
    kdp_dist_world_bcast_f(x->d, kdp_cohort_module_grads(x->c), nm);
}

/* per-peer layout: every rank's rows of a B-row batch into z_all (and h_all) */
static void gather_layout(kdp_exchange *x, const float *z, const float *h, size_t B) {
  const kdp_kd_spec *sp = kdp_cohort_spec(x->c);
  size_t wz[KDP_KD_MAX_PEERS], oz[KDP_KD_MAX_PEERS];
  for (size_t j = 0; j < x->P; j++) {
    wz[j] = x->C;
    oz[j] = j * B * x->C;
  }
  kdp_dist_layout_allgather(x->d, z, B, wz, oz, x->z_all);
  if (x->uses_feat) {
    for (size_t j = 0; j < x->P; j++) {
      wz[j] = sp->dims[j];
      oz[j] = kdp_cohort_feature_offset(x->c, j, B);
    }
    kdp_dist_layout_allgather(x->d, h, B, wz, oz, x->h_all);
  }
}

int kdp_exchange_step_layout(kdp_exchange *x, const float *z, const float *h,
                             const kdp_exchange_args *a, size_t lo, size_t hi, float *dz,
                             float *dh, kdp_kd_losses *out, kdp_error *err) {
  size_t B = a->b, C = x->C;
  if (B > x->max_b) return kdp_fail(err, KDP_EINVAL, "batch %zu > %zu", B, x->max_b);
  if (lo > hi || hi > B)
    return kdp_fail(err, KDP_EINVAL, "rows [%zu, %zu) outside a batch of %zu", lo, hi, B);
  gather_layout(x, z, h, B);
  kdp_kd_batch in = step_batch(x, a);
  kdp_kd_losses per[KDP_KD_MAX_PEERS];
  int rc = kdp_cohort_objective(x->c, &in, x->dz_all, x->feat_grads ? x->dh_all : NULL, NULL,
                                per, NULL, err);
  if (rc != 0) return rc;
  const float *g = x->dz_all + (x->me * B + lo) * C;
  for (size_t k = 0; k < (hi - lo) * C; k++) dz[k] += g[k];
  if (x->feat_grads && dh) {
    size_t dme = kdp_cohort_spec(x->c)->dims[x->me];
    const float *gh = x->dh_all + kdp_cohort_feature_offset(x->c, x->me, B) + lo * dme;
    for (size_t k = 0; k < (hi - lo) * dme; k++) dh[k] += gh[k];
  }
  if (out) *out = per[x->me];
  return 0;
}

const float *kdp_exchange_eval_layout(kdp_exchange *x, const float *z, const float *h, size_t B,
                                      float *teacher, kdp_error *err) {
  if (B > x->max_b) {
    kdp_fail(err, KDP_EINVAL, "batch %zu > %zu", B, x->max_b);
    return NULL;
  }
  gather_layout(x, z, h, B);
  if (teacher &&
      kdp_cohort_teacher_eval(x->c, x->z_all, x->uses_feat ? x->h_all : NULL, B, teacher, err) != 0)
    return NULL;
  return x->z_all;
}

int kdp_exchange_teacher_eval(kdp_exchange *x, const float *z, const float *h, size_t b,
                              float *teacher, kdp_error *err) {
  if (b > x->max_b) return kdp_fail(err, KDP_EINVAL, "batch %zu > %zu", b, x->max_b);
  gather(x, z, h, b);
  return kdp_cohort_teacher_eval(x->c, x->z_all, x->uses_feat ? x->h_all : NULL, b, teacher,
                                 err);
}
