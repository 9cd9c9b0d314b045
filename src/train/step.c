/* step.c: one training step on one rank, read top to bottom: kdp_train_step (batch, forward,
   agreement point, distillation, backward, allreduce, SGD) and its distillation part,
   kdp_pipeline_step: gather the rows the method reads (dist), compute its losses and gradients
   (kd), scatter every peer's gradients back (dist). The same path for every layout and method;
   evaluation and the /predict teacher reuse its gathers. */
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"
#include "kdpeers/train.h"
#include "train_internal.h"

struct kdp_pipeline {
  kdp_dist *d;
  kdp_cohort *c;
  const kdp_method_ops *ops;
  size_t P, C, me, maxB;
  int tgrad, fgrad, lgrad;             /* teacher, feature and (module's) logit gradients */
  size_t wz[KDP_KD_MAX_PEERS];         /* row widths: logits (C) */
  size_t wh[KDP_KD_MAX_PEERS];         /* features (d_j) */
  float *z_all;                        /* P x maxB x C: every peer's logits on gathered rows */
  float *zb, *hb;                      /* the row block of every peer's logits / features */
  float *tb, *dtb;                     /* the module's teachers of the block, their gradients */
  float *t_own, *dt_own;               /* this peer's teacher on its own rows, its gradient */
  float *dzb, *dhb;                    /* the module's gradients of every peer's block rows */
  float *ens;                          /* maxB x C: evaluation scratch */
  float *ze_all;                       /* P x maxB x C: every peer's mean teacher (pcl) */
  size_t E, we[KDP_KD_MAX_PEERS];      /* mcl: embedding width, row widths (E) */
  float *vw, *dvw, *dzw;               /* mcl: P x maxB x E embeddings, their gradients; maxB x C */
  /* a module sharded by peer columns (kdp_cohort_col_width W > 0, ffl): my partial product on my
     own rows and its gradient (maxB x W); every peer's partials on the block (P x maxB x W),
     their sum's gradient (maxB x W) */
  size_t W, wc[KDP_KD_MAX_PEERS];
  float *part_own, *dpart_own, *partb, *dpartb;
  /* a module whose backward runs before the peer term (early): its gradients of my own rows'
     logits and features, received with the teachers and added after the peer term */
  float *dz_own, *dh_own;
  /* the module's parts (kdp_cohort_module_ranges of this peer): nsh SHARED ranges, then nown OWN,
     then nshard SHARDED, as (lo, hi) pairs; the OWN block packed (own_n floats); stale: bit 0 the
     other peers' blocks of the params, bit 1 of the momentum, are older than the last step */
  size_t *rg, nsh, nown, nshard, own_n;
  float *pack;
  unsigned stale;
  /* between 2 ranks the step sums the SHARED gradient itself (summed = 1 until the allreduce
     call): the other rank's part, received with the teachers (gsum, 2 blocks) */
  float *gsum;
  int summed;
  kdp_kd_reduce red;                   /* batch statistics summed over the world's blocks */
  int switokd, expert;                 /* switokd: the last step's mode (1 = expert) */
  kdp_switokd_gaps gaps;
};

static void sum_world(void *ctx, double *buf, size_t n) {
  kdp_dist_group_sum_f64(ctx, KDP_GROUP_WORLD, buf, n);
}

int kdp_pipeline_create(kdp_pipeline **out, kdp_dist *d, kdp_cohort *c, size_t max_batch,
                        kdp_error *err) {
  const kdp_kd_spec *s = kdp_cohort_spec(c);
  *out = NULL;
  if (s->P != (size_t)d->n_peers)
    return kdp_fail(err, KDP_EINVAL, "a cohort of %zu peers on a layout of %d peers", s->P,
                    d->n_peers);
  if (max_batch > kdp_cohort_max_batch(c))
    return kdp_fail(err, KDP_EINVAL, "batches of %zu rows, but the cohort takes at most %zu",
                    max_batch, kdp_cohort_max_batch(c));
  kdp_pipeline *p = kdp_xcalloc(1, sizeof *p);
  p->d = d;
  p->c = c;
  p->ops = kdp_cohort_ops(c);
  p->P = s->P;
  p->C = s->C;
  p->me = (size_t)d->peer;
  p->maxB = max_batch;
  p->tgrad = kdp_cohort_teacher_grad(c);
  p->fgrad = kdp_cohort_feature_grads(c);
  p->lgrad = kdp_cohort_logit_grads(c);
  for (size_t j = 0; j < p->P; j++) {
    p->wz[j] = s->C;
    p->wh[j] = s->dims[j];
  }
  const size_t nz = p->P * max_batch * s->C, nh = kdp_cohort_feature_floats(c, max_batch);
  p->z_all = kdp_falloc(nz);
  p->zb = kdp_falloc(nz);
  p->hb = kdp_falloc(nh ? nh : 1);
  p->tb = kdp_falloc(nz);
  p->dtb = kdp_falloc(nz);
  p->dzb = kdp_falloc(nz);
  p->dhb = kdp_falloc(nh ? nh : 1);
  p->t_own = kdp_falloc(max_batch * s->C);
  p->dt_own = kdp_falloc(max_batch * s->C);
  p->ens = kdp_falloc(max_batch * s->C);
  p->ze_all = kdp_falloc(p->ops->peer_reads & KDP_READS_EMA_LOGITS ? nz : 1);
  p->red = (kdp_kd_reduce){.sum = sum_world, .ctx = d};
  p->E = kdp_cohort_embed_dim(c);
  for (size_t j = 0; j < p->P; j++) p->we[j] = p->E;
  if (p->E) {
    p->vw = kdp_falloc(p->P * max_batch * p->E);
    p->dvw = kdp_falloc(p->P * max_batch * p->E);
    p->dzw = kdp_falloc(max_batch * s->C);
  }
  p->switokd = s->method == KDP_METHOD_SWITOKD;
  p->W = kdp_cohort_col_width(c);
  if (p->W) {
    for (size_t j = 0; j < p->P; j++) p->wc[j] = p->W;
    p->part_own = kdp_falloc(max_batch * p->W);
    p->dpart_own = kdp_falloc(max_batch * p->W);
    p->partb = kdp_falloc(p->P * max_batch * p->W);
    p->dpartb = kdp_falloc(max_batch * p->W);
  }
  if (p->lgrad) p->dz_own = kdp_falloc(max_batch * s->C);
  if (p->fgrad && !p->W) p->dh_own = kdp_falloc(max_batch * s->dims[p->me]);
  p->nsh = kdp_cohort_module_ranges(c, KDP_PART_SHARED, p->me, NULL, 0);
  p->nown = kdp_cohort_module_ranges(c, KDP_PART_OWN, p->me, NULL, 0);
  p->nshard = kdp_cohort_module_ranges(c, KDP_PART_SHARDED, p->me, NULL, 0);
  p->rg = kdp_xcalloc(2 * (p->nsh + p->nown + p->nshard) + 1, sizeof *p->rg);
  kdp_cohort_module_ranges(c, KDP_PART_SHARED, p->me, p->rg, p->nsh);
  kdp_cohort_module_ranges(c, KDP_PART_OWN, p->me, p->rg + 2 * p->nsh, p->nown);
  kdp_cohort_module_ranges(c, KDP_PART_SHARDED, p->me, p->rg + 2 * (p->nsh + p->nown), p->nshard);
  for (size_t k = p->nsh; k < p->nsh + p->nown; k++) p->own_n += p->rg[2 * k + 1] - p->rg[2 * k];
  if (p->own_n) p->pack = kdp_falloc(p->own_n);
  *out = p;
  return 0;
}

void kdp_pipeline_free(kdp_pipeline *p) {
  if (!p) return;
  float *bufs[] = {p->z_all, p->zb, p->hb, p->tb, p->dtb, p->dzb, p->dhb, p->t_own, p->dt_own,
                   p->ens, p->ze_all, p->vw, p->dvw, p->dzw, p->part_own, p->dpart_own,
                   p->partb, p->dpartb, p->dz_own, p->dh_own};
  for (size_t k = 0; k < sizeof bufs / sizeof bufs[0]; k++) free(bufs[k]);
  free(p->rg);
  free(p->pack);
  free(p->gsum);
  free(p);
}

kdp_cohort *kdp_pipeline_cohort(kdp_pipeline *p) { return p->c; }

/* rows [lo, hi) of a B-row batch, checked against the buffers */
static int rows(kdp_pipeline *p, kdp_rows which, size_t B, size_t *lo, size_t *hi,
                kdp_error *err) {
  if (B > p->maxB)
    return kdp_fail(err, KDP_EINVAL, "a batch of %zu rows; the pipeline takes at most %zu", B,
                    p->maxB);
  kdp_dist_rows(p->d, KDP_GROUP_WORLD, which, B, lo, hi);
  return 0;
}

/* A peer term over the whole batch (mcl: the contrastive softmax couples every row): every rank
   gathers all B rows of every peer's logits and embeddings and computes its peer's term; its rows
   of dz are its own; dL_i/dv_j of every peer j go back to the rows' owners, summed over the
   terms. A peer on k ranks computes its term k times (the same numbers) but only its slice-0
   rank sends dL_i/dv: so dJ/dv sums exactly one term per peer, in peer order, whatever the
   layout. */
static int whole_batch_step(kdp_pipeline *p, const kdp_step_in *in, float *dz, size_t olo,
                            size_t ohi, kdp_kd_losses *out, kdp_error *err) {
  const size_t B = in->B, C = p->C, E = p->E, n = ohi - olo;
  if (!in->v || !in->dv)
    return kdp_fail(err, KDP_EINVAL, "method %s: the step needs the embeddings (v, dv)",
                    p->ops->name);
  kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_ALL, B, p->wz, in->z, p->z_all);
  kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_ALL, B, p->we, in->v, p->vw);
  memset(p->dvw, 0, p->P * B * E * sizeof(float));
  memset(p->dzw, 0, B * C * sizeof(float));
  kdp_kd_peer_in pin = {.z = p->z_all + p->me * B * C, .z_all = p->z_all, .y = in->y, .n = B,
                        .T = in->T, .weight = in->weight, .scale = 1.0f, .burn_in = in->burn_in,
                        .v_all = p->vw, .dv_all = p->dvw};
  int rc = kdp_cohort_peer_loss(p->c, p->me, &pin, p->dzw, NULL, out, err);
  if (rc) return rc;
  for (size_t k = 0; k < n * C; k++) dz[k] += p->dzw[olo * C + k];
  out->n_correct = n ? kdp_count_hits(in->z, in->y + olo, n, C) : 0;
  if (p->d->slice != 0) memset(p->dvw, 0, p->P * B * E * sizeof(float));
  kdp_dist_scatter_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_ALL, B, p->we, 0, p->dvw, in->dv);
  return 0;
}

/* switokd's mode of a B-row batch from every peer's logits on this rank's n own rows z_all
   (P x n x C), identical on every rank: the row sums of the rows (kdp_switokd_sums) of peer 0's
   ranks, whose slices partition the batch, gathered to every rank (a world sum of one nonzero slot
   per slice, exact) and added in slice order, then kdp_switokd_decide. With one rank per peer
   every rank holds the whole batch and no exchange is needed. */
static int switokd_mode(kdp_pipeline *p, const float *z_all, const int32_t *y, size_t n,
                        size_t B) {
  kdp_dist *d = p->d;
  const size_t t = (size_t)kdp_cohort_spec(p->c)->teacher_peer;
  double sums[3];
  kdp_switokd_sums(z_all, y, p->P, n, p->C, t, sums);
  if (d->world_size > (int)p->P) {
    const size_t k0 = (size_t)d->peer_k[0];
    double *v = kdp_xcalloc(3 * k0, sizeof(double));
    if (d->peer == 0) memcpy(v + 3 * (size_t)d->slice, sums, sizeof sums);
    kdp_dist_group_sum_f64(d, KDP_GROUP_WORLD, v, 3 * k0);
    sums[0] = sums[1] = sums[2] = 0.0;
    for (size_t s = 0; s < k0; s++)
      for (size_t k = 0; k < 3; k++) sums[k] += v[3 * s + k];
    free(v);
  }
  return kdp_switokd_decide(sums, p->P >= 2 ? B : 0, &p->gaps);
}

int kdp_pipeline_expert(const kdp_pipeline *p, kdp_switokd_gaps *gaps) {
  if (gaps) *gaps = p->gaps;
  return p->switokd && p->expert;
}

/* the SHARED gradient summed with the other rank's (2 ranks): in rank order, as MPI sums it */
static void add_other(kdp_pipeline *p) {
  float *g = kdp_cohort_module_grads(p->c) + p->rg[0];
  const size_t ns = p->rg[1] - p->rg[0], me = (size_t)p->d->world_rank;
  const float *o = p->gsum + (1 - me) * ns;
  for (size_t k = 0; k < ns; k++) g[k] = me == 0 ? g[k] + o[k] : o[k] + g[k];
}

/* the module's backward on the block's m rows (blk), into dzb / dhb / the partials' gradient */
static int module_backward(kdp_pipeline *p, const kdp_kd_rows *blk, size_t m, kdp_error *err) {
  if (p->lgrad) memset(p->dzb, 0, p->P * m * p->C * sizeof(float));
  const int dh_rows = p->fgrad && !p->W; /* by columns (ffl) dh comes from the partials' gradient */
  if (dh_rows) memset(p->dhb, 0, kdp_cohort_feature_floats(p->c, m) * sizeof(float));
  return kdp_cohort_module_backward(p->c, blk, p->tgrad ? p->dtb : NULL, &p->red,
                                    p->lgrad ? p->dzb : NULL, dh_rows ? p->dhb : NULL, NULL, err);
}

int kdp_pipeline_step(kdp_pipeline *p, const kdp_step_in *in, float *dz, float *dh,
                      kdp_kd_losses *out, kdp_error *err) {
  const kdp_method_ops *o = p->ops;
  const size_t B = in->B, C = p->C;
  size_t olo, ohi, blo = 0, bhi = 0;
  int rc = rows(p, KDP_ROWS_OWN, B, &olo, &ohi, err);
  if (rc) return rc;
  if (o->module_reads) kdp_dist_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, &blo, &bhi);
  if (p->E) return whole_batch_step(p, in, dz, olo, ohi, out, err);
  const size_t n = ohi - olo, m = bhi - blo;
  if (o->module_reads) kdp_cohort_module_zero_grad_of(p->c, p->me);

  /* 1. gather: every peer's logits on my own rows; every peer's block rows for the module */
  const float *z_all = in->z_all;
  if (!z_all && (o->peer_reads & KDP_READS_LOGITS)) {
    kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, p->wz, in->z, p->z_all);
    z_all = p->z_all;
  }
  if (o->peer_reads & KDP_READS_EMA_LOGITS)
    kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, p->wz, in->z_ema, p->ze_all);
  /* the module's inputs on the block: its logits and features (or partials) in one exchange */
  kdp_rows_field f[KDP_DIST_MAX_FIELDS];
  size_t nf = 0;
  if (o->module_reads & KDP_READS_LOGITS)
    f[nf++] = (kdp_rows_field){.width = p->wz, .in = in->z, .out = p->zb};
  if ((o->module_reads & KDP_READS_FEATURES) && p->W) {
    /* sharded by peer columns: my columns' partial product on my rows, gathered to the block */
    rc = kdp_cohort_col_forward(p->c, p->me, in->h, n, p->part_own, err);
    if (rc) return rc;
    f[nf++] = (kdp_rows_field){.width = p->wc, .in = p->part_own, .out = p->partb};
  } else if (o->module_reads & KDP_READS_FEATURES) {
    f[nf++] = (kdp_rows_field){.width = p->wh, .in = in->h, .out = p->hb};
  }
  kdp_dist_gather_rows_fields(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, f, nf);

  /* 2. compute: the module's teachers on the block, sent to their peers' rows; my peer term.
     A module whose backward does not read the peers' teacher gradients (one, ffl, pcl, okddip
     detached) runs its backward at once: its gradients of every peer's rows (logits, features or
     partials) travel with the teachers, and the sum of its replicated gradient starts
     (kdp_pipeline_module_allreduce finishes it). */
  kdp_kd_rows blk = {.z = p->zb, .h = p->hb, .y = in->y + blo, .n = m, .T = in->T,
                     .weight = in->weight, .scale = (float)m / (float)B,
                     .part = p->W ? p->partb : NULL, .dpart = p->W ? p->dpartb : NULL};
  const int early = o->module_reads && !p->tgrad;
  if (o->module_reads) {
    rc = kdp_cohort_module_forward(p->c, &blk, &p->red, p->tb, err);
    if (rc) return rc;
    nf = 0;
    f[nf++] = (kdp_rows_field){.width = p->wz, .shared = !o->teacher_per_peer, .in = p->tb,
                               .out = p->t_own};
    if (early) {
      rc = module_backward(p, &blk, m, err);
      if (rc) return rc;
      if (p->lgrad)
        f[nf++] = (kdp_rows_field){.width = p->wz, .in = p->dzb, .out = p->dz_own};
      if (p->fgrad && p->W)
        f[nf++] = (kdp_rows_field){.width = p->wc, .shared = 1, .in = p->dpartb,
                                   .out = p->dpart_own};
      else if (p->fgrad)
        f[nf++] = (kdp_rows_field){.width = p->wh, .in = p->dhb, .out = p->dh_own};
      /* the replicated parts' gradient is complete: between 2 ranks each sends the other its
         part with the teachers (the bytes of a 2-rank allreduce, no collective of its own);
         else its sum starts now */
      float *g = kdp_cohort_module_grads(p->c) + (p->nsh ? p->rg[0] : 0);
      const size_t ns = p->nsh == 1 ? p->rg[1] - p->rg[0] : 0;
      if (ns && p->d->world_size == 2) {
        if (!p->gsum) p->gsum = kdp_falloc(2 * ns);
        f[nf++] = (kdp_rows_field){.whole = ns, .in = g, .out = p->gsum};
        p->summed = 1;
      } else if (ns) {
        kdp_dist_world_allreduce_start(p->d, g, ns);
      }
    }
    kdp_dist_scatter_blocks_fields(p->d, KDP_GROUP_WORLD, B, f, nf);
    if (early && p->summed) add_other(p);
  }
  if (o->contribute) { /* a teacher reduced over the peers (kdcl): one allreduce of my rows */
    rc = kdp_cohort_teacher_contribution(p->c, p->me, in->z, in->y + olo, n, p->t_own, err);
    if (rc) return rc;
    kdp_dist_reduce_rows(p->d, B, C,
                         kdp_cohort_teacher_reduce_op(p->c) == KDP_REDUCE_MIN ? KDP_DIST_MIN
                                                                               : KDP_DIST_SUM,
                         p->t_own);
  }
  if (p->tgrad) memset(p->dt_own, 0, n * C * sizeof(float));
  if (p->switokd) p->expert = switokd_mode(p, z_all, in->y + olo, n, B);
  kdp_kd_peer_in pin = {.z = in->z, .z_all = z_all, .teacher = p->t_own, .y = in->y + olo,
                        .n = n, .T = in->T, .weight = in->weight,
                        .scale = (float)n / (float)B, .burn_in = in->burn_in,
                        .z_ema = o->peer_reads & KDP_READS_EMA_LOGITS ? p->ze_all : NULL,
                        .expert = p->switokd && p->expert};
  rc = kdp_cohort_peer_loss(p->c, p->me, &pin, dz, p->tgrad ? p->dt_own : NULL, out, err);
  if (rc) return rc;
  if (!o->module_reads) return 0;

  if (early) {
    /* the module's gradients of my rows, received with the teachers: added after the peer term,
       as the scatter below adds them (one sender per row) */
    if (p->lgrad)
      for (size_t k = 0; k < n * C; k++) dz[k] += p->dz_own[k];
    if (p->fgrad && !p->W)
      for (size_t k = 0; k < n * p->wh[p->me]; k++) dh[k] += p->dh_own[k];
  } else {
    /* the module's backward on the block, with the peers' teacher gradients gathered to it */
    if (p->tgrad)
      kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wz, p->dt_own, p->dtb);
    rc = module_backward(p, &blk, m, err);
    if (rc) return rc;
    /* 3. scatter: every peer's block rows of the module's gradients back to its ranks (dz only
       when the module's backward reaches the logits: ffl's and pcl's read them stop-gradient) */
    if (p->lgrad)
      kdp_dist_scatter_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wz, 0, p->dzb, dz);
    if (p->fgrad && p->W)
      kdp_dist_scatter_rows_set(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wc, 1, p->dpartb,
                                p->dpart_own);
    else if (p->fgrad)
      kdp_dist_scatter_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wh, 0, p->dhb, dh);
  }
  /* sharded by peer columns (ffl): my columns' share of the partials' gradient */
  if (p->fgrad && p->W)
    return kdp_cohort_col_backward(p->c, p->me, in->h, n, p->dpart_own, dh, err);
  return 0;
}

/* ---------------------------------------------------------------- the module's parts */

/* this peer's OWN block of v (laid out as the params) to p->pack (out = 1), or back */
static void own_block(kdp_pipeline *p, float *v, int out) {
  const size_t *r = p->rg + 2 * p->nsh;
  float *q = p->pack;
  for (size_t k = 0; k < p->nown; k++) {
    size_t n = r[2 * k + 1] - r[2 * k];
    if (out)
      memcpy(q, v + r[2 * k], n * sizeof(float));
    else
      memcpy(v + r[2 * k], q, n * sizeof(float));
    q += n;
  }
}

void kdp_pipeline_module_allreduce(kdp_pipeline *p) {
  float *g = kdp_cohort_module_grads(p->c);
  if (p->summed) /* the step summed it (ffl: its backward ran before the peer term) */
    p->summed = 0;
  else if (p->d->sum_req) /* the step started it */
    kdp_dist_world_allreduce_finish(p->d);
  else
    for (size_t k = 0; k < p->nsh; k++)
      kdp_dist_world_allreduce(p->d, g + p->rg[2 * k], p->rg[2 * k + 1] - p->rg[2 * k]);
  /* the OWN block's gradient is complete on this peer's ranks: summed over them only */
  if (p->own_n && p->d->ranks_per_peer > 1) {
    own_block(p, g, 1);
    kdp_dist_peer_allreduce(p->d, p->pack, p->own_n);
    own_block(p, g, 0);
  }
}

void kdp_pipeline_module_sgd(kdp_pipeline *p, kdp_sgd *opt, float lr) {
  if (!kdp_cohort_module_n_params(p->c)) return;
  kdp_sgd_step_ranges(opt, kdp_cohort_module_params(p->c), kdp_cohort_module_grads(p->c), lr,
                      p->rg, p->nsh + p->nown);
  if (p->nown) p->stale = 3;
}

/* every peer's block of the sharded tensors from its slice-0 rank to every rank: the others
   contribute zeros to a world sum, which is then exact */
static void sync_blocks(kdp_pipeline *p, float *v) {
  const size_t *r = p->rg + 2 * (p->nsh + p->nown);
  own_block(p, v, 1);
  for (size_t k = 0; k < p->nshard; k++)
    memset(v + r[2 * k], 0, (r[2 * k + 1] - r[2 * k]) * sizeof(float));
  if (p->d->slice == 0) own_block(p, v, 0);
  for (size_t k = 0; k < p->nshard; k++)
    kdp_dist_world_allreduce(p->d, v + r[2 * k], r[2 * k + 1] - r[2 * k]);
}

void kdp_pipeline_module_sync(kdp_pipeline *p, float *momentum) {
  if (p->stale & 1u) sync_blocks(p, kdp_cohort_module_params(p->c));
  if ((p->stale & 2u) && momentum) sync_blocks(p, momentum);
  p->stale &= momentum ? 0u : ~1u;
}

/* ---------------------------------------------------------------- evaluation */

int kdp_pipeline_eval(kdp_pipeline *p, size_t B, const int32_t *y, const float *z,
                      const float *h, kdp_eval_sums *s, kdp_error *err) {
  const size_t P = p->P, C = p->C;
  size_t olo, ohi, blo, bhi;
  int rc = rows(p, KDP_ROWS_OWN, B, &olo, &ohi, err);
  if (rc) return rc;
  kdp_pipeline_module_sync(p, NULL); /* the teacher reads every peer's block */
  /* this peer on its own rows */
  if (ohi > olo) {
    size_t hits = 0;
    s->peer_loss += kdp_ce_loss(z, y + olo, ohi - olo, C, NULL, 0, &hits) * (double)(ohi - olo);
    s->peer_hits += (double)hits;
  }
  if (P < 2) return 0;
  /* the ensemble and the method's teacher on my block of the batch: every row once */
  const int teach = p->ops->teacher != NULL;
  kdp_dist_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, &blo, &bhi);
  const size_t m = bhi - blo;
  const int32_t *yb = y + blo;
  kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wz, z, p->zb);
  if (teach && (p->ops->module_reads & KDP_READS_FEATURES))
    kdp_dist_gather_rows(p->d, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, p->wh, h, p->hb);
  if (!m) return 0;
  for (size_t j = 0; s->logits && j < P; j++)
    memcpy(s->logits + (j * s->logits_stride + s->first + blo) * C, p->zb + j * m * C,
           m * C * sizeof(float));
  kdp_diversity_add(&s->div, p->zb, m, C);
  if (s->labels) {
    for (size_t j = 0; j < P; j++)
      kdp_predicted_labels(s->labels + j * s->labels_stride + s->labels_n, p->zb + j * m * C, m, C);
    s->labels_n += m;
  }
  memset(p->ens, 0, m * C * sizeof(float));
  for (size_t j = 0; j < P; j++) {
    kdp_softmax_t(p->t_own, p->zb + j * m * C, m, C, 1.0f);
    for (size_t k = 0; k < m * C; k++) p->ens[k] += p->t_own[k];
  }
  for (size_t b = 0; b < m; b++) {
    const float *pr = p->ens + b * C;
    s->ens_hits += (double)(kdp_argmax(pr, C) == (size_t)yb[b]);
    double q = pr[yb[b]] / (double)P;
    s->ens_loss -= log(q > 1e-30 ? q : 1e-30);
  }
  if (!teach) return 0;
  kdp_kd_rows blk = {.z = p->zb, .h = p->hb, .y = yb, .n = m, .T = 1.0f, .scale = 1.0f};
  rc = kdp_cohort_teacher_eval_rows(p->c, &blk, p->ens, err);
  if (rc) return rc;
  size_t th = 0;
  s->teacher_loss += kdp_ce_loss(p->ens, yb, m, C, NULL, 0, &th) * (double)m;
  s->teacher_hits += (double)th;
  return 0;
}

int kdp_pipeline_teacher_cohort(kdp_pipeline *p, const float *z, const float *h, size_t n,
                                float *out, kdp_error *err) {
  if (!p->ops->teacher) return kdp_fail(err, KDP_EINVAL, "method %s has no teacher", p->ops->name);
  if (n > p->maxB)
    return kdp_fail(err, KDP_EINVAL, "%zu rows; the pipeline takes at most %zu", n, p->maxB);
  kdp_dist_gather_rows(p->d, KDP_GROUP_COHORT, KDP_ROWS_ALL, n, p->wz, z, p->z_all);
  if (p->ops->module_reads & KDP_READS_FEATURES)
    kdp_dist_gather_rows(p->d, KDP_GROUP_COHORT, KDP_ROWS_ALL, n, p->wh, h, p->hb);
  kdp_kd_rows blk = {.z = p->z_all, .h = p->hb, .n = n, .T = 1.0f, .scale = 1.0f};
  return kdp_cohort_teacher_eval_rows(p->c, &blk, out, err);
}

/* ---------------------------------------------------------------- the training step */

void kdp_train_allreduce(kdp_trainer *t, float shm_lr) {
  /* the peer's gradient arena, summed over its ranks (data parallelism within a peer): the
     buckets the backward pass started, the rest now, then waits for all; or (shm_lr >= 0, the
     shared window) each rank's slice of the sum takes its SGD step right away and every rank
     pulls the other slices' new parameters (kdp_buckets_finish_sgd) */
  if (shm_lr >= 0) kdp_buckets_finish_sgd(t->buckets, shm_lr);
  else kdp_buckets_finish(t->buckets);
  kdp_embed_allreduce(t); /* mcl's head is the peer's too */
  /* the replicated module's, summed over every rank's row blocks */
  kdp_pipeline_module_allreduce(t->pipe);
}

/* dJ/dh reaches the features: a module's input (ffl, okddip) or mcl's embedding heads */
static int feature_grads(const kdp_trainer *t) {
  return kdp_cohort_feature_grads(t->cohort) || t->embed;
}

/* the distillation part of the step on this rank's n own rows x (logits z) of a B-row batch */
static void distill(kdp_trainer *t, kdp_loop *L, int64_t step, size_t B, const float *x,
                    const float *z, const float *z_ema, size_t n, kdp_step_result *r) {
  const kdp_config *cfg = t->cfg;
  memset(t->dlogits, 0, n * t->C * sizeof(float));
  if (feature_grads(t))
    memset(t->dfeat, 0, n * kdp_model_feature_dim(t->model) * sizeof(float));
  kdp_step_in in = {
      .B = B,
      .y = t->ybuf,
      .z = z,
      .h = kdp_model_features(t->model),
      .T = (float)t->temperature,
      .weight = (float)(t->kd_weight * kdp_rampup(r->epoch, cfg->rampup_epochs)),
      .burn_in = step < cfg->burn_in_steps,
      .z_ema = z_ema,
  };
  if (step == L->stop_exchange_at) {
    L->stop_exchange_at = -1;
    raise(SIGSTOP); /* fault injection: a rank lost inside the method's exchange */
  }
  if (t->stale) in.z_all = kdp_stale_logits(t->stale, t, step, x, z, n);
  if (t->embed) kdp_embed_forward(t, n, &in.v, &in.dv);
  kdp_kd_losses kl;
  kdp_error err;
  if (kdp_pipeline_step(t->pipe, &in, t->dlogits, t->dfeat, &kl, &err) != 0)
    kdp_die("the distillation step failed on rank %d: %s", t->d->world_rank, err.msg);
  if (t->embed) kdp_embed_backward(t, n, t->dfeat);
  r->loss.ce = kl.ce;
  r->loss.contrast = kdp_cohort_spec(t->cohort)->contrast_weight * kl.contrast;
  r->loss.kd = kl.loss - kl.ce - r->loss.contrast;
  r->loss.correct = kl.n_correct;
  if (t->frozen) r->loss.kd = 0; /* it does not learn: its loss is its CE */
  if (!isfinite(r->loss.ce))
    kdp_loop_diverged(L, t->d->peer, step, "cross-entropy loss", r->loss.ce);
  else if (!isfinite(r->loss.kd))
    kdp_loop_diverged(L, t->d->peer, step, "distillation loss", r->loss.kd);
}

int kdp_train_step(kdp_trainer *t, kdp_loop *L, int64_t step, kdp_step_result *r,
                   kdp_error *err) {
  const size_t isz = t->train.H * t->train.W * t->train.C;
  memset(r, 0, sizeof *r);
  kdp_die_context(t->d->peer, step); /* what a fatal error names */
  if (step == L->signal_at) raise(SIGUSR1);
  r->t0 = kdp_now();
  r->epoch = (double)step / (double)t->steps_per_epoch;

  /* the global batch; this rank's rows of it */
  size_t B = kdp_batcher_peek(&t->batcher), lo, hi;
  kdp_dist_rows(t->d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, &lo, &hi);
  kdp_batcher_next_rows(&t->batcher, t->xbuf, t->ybuf, lo, hi); /* every label, own images */
  kdp_trace_mark(t, "data", r->t0, kdp_now());
  const size_t n = hi - lo;
  const float *x = t->xbuf + lo * isz;
  r->rows = n;

  /* forward (a rank can hold no rows of a final partial batch: it then only takes part in the
     collectives, with zero gradients) */
  double tc0 = kdp_now();
  const float *z = !n          ? t->dlogits
                   : t->frozen ? kdp_model_forward(t->model, x, n, 0, NULL) /* eval mode */
                               : kdp_model_forward(t->model, x, n, 1, &t->dropout_rng);
  L->t_compute += kdp_now() - tc0;
  kdp_trace_mark(t, "forward", tc0, kdp_now());

  /* the agreement point, before the exchange */
  int rc = kdp_boundary_agree(t, L, step, z, n, r, err);
  if (rc != 0) return rc;

  /* pcl: the mean teacher's train-mode logits on the same rows */
  const float *z_ema = NULL;
  if (t->ops->peer_reads & KDP_READS_EMA_LOGITS) {
    tc0 = kdp_now();
    z_ema = n ? kdp_train_ema_forward(t, x, n) : t->dlogits;
    L->t_compute += kdp_now() - tc0;
    kdp_trace_mark(t, "ema forward", tc0, kdp_now());
  }

  /* gather -> compute -> scatter */
  double tx0 = kdp_now();
  distill(t, L, step, B, x, z, z_ema, n, r);
  kdp_trace_mark(t, "exchange+kd", tx0, kdp_now());

  /* backward, allreduce, SGD. A frozen peer never learns, and switokd's teacher pauses in expert
     mode: no backward pass and no optimizer step (momentum and weight decay untouched; its
     gradients stay zero through the peer's allreduce), while the lr schedule goes on with the
     step count. */
  const int still = t->frozen || (kdp_pipeline_expert(t->pipe, NULL) &&
                                  t->d->peer == kdp_cohort_spec(t->cohort)->teacher_peer);
  r->lr = kdp_schedule_lr(&t->sched, step) * t->lr_scale;
  /* one rank per peer: no gradient sum between the backward pass and the optimizer, so each
     layer takes its SGD step as soon as its gradients are final (bitwise the same) */
  const int fused = n && !still && t->d->ranks_per_peer == 1;
  /* k ranks on one node (run.grad_sum = auto/shm): the sum and the SGD step fused per slice over
     the shared window (a rank without rows steps its slice too; every rank of the peer agrees on
     `still`, the choice between the two shared paths) */
  const int shm_sgd = !still && kdp_buckets_is_shm_sgd(t->buckets);
  tc0 = kdp_now();
  /* the backward pass writes the gradients (no zeroing pass first); without it they are zero */
  if (fused)
    kdp_model_backward_sgd(t->model, t->dlogits, feature_grads(t) ? t->dfeat : NULL, &t->opt,
                           (float)r->lr);
  else if (n && !still)
    kdp_model_backward_set(t->model, t->dlogits, feature_grads(t) ? t->dfeat : NULL);
  else
    kdp_model_zero_grad(t->model);
  L->t_compute += kdp_now() - tc0;
  kdp_trace_mark(t, "backward", tc0, kdp_now());
  double ta0 = kdp_now();
  kdp_train_allreduce(t, shm_sgd ? (float)r->lr : -1.0f);
  kdp_trace_mark(t, "allreduce", ta0, kdp_now());
  tc0 = kdp_now();
  if (shm_sgd)
    kdp_model_params(t->model); /* (its weights changed: as the call below tells the model) */
  else if (!still && !fused)
    kdp_sgd_step(&t->opt, kdp_model_params(t->model), kdp_model_grads(t->model), (float)r->lr);
  kdp_pipeline_module_sgd(t->pipe, &t->mopt, (float)r->lr); /* its parts this rank keeps */
  kdp_embed_sgd(t, (float)r->lr);
  kdp_train_ema_update(t); /* run.ema_decay: the temporal mean follows every step */
  L->t_compute += kdp_now() - tc0;
  kdp_trace_mark(t, "optimizer", tc0, kdp_now());
  t->train_time += kdp_now() - r->t0;
  kdp_live_step_time(t, kdp_now() - r->t0);
  t->step = step + 1;
  return 0;
}
