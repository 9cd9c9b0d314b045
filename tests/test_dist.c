/* test_dist.c: under mpirun (-np 2, 3, 4): the pipeline (gather -> compute -> scatter, the
   module sharded by row blocks) gives every method the numbers of the single-process reference
   on every layout (one rank per peer, ranks_per_peer = 2, a per-peer layout), on batches whose
   row blocks are unequal or empty; replicated modules stay bitwise identical; a module whose
   ranks step only their peer's columns (ffl) equals the reference over several steps, with
   evaluations and checkpoints' gathers in between; the row exchanges move the right rows. */
#include <check.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/dist.h"
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"
#include "kdpeers/train.h"
#include "testutil.h"

static kdp_dist D;
static int g_fail; /* mismatches are counted, not thrown: a rank that stopped early would leave
                      the others waiting in a collective */

static void near(const char *what, const float *a, const float *b, size_t n, double atol,
                 double rtol) {
  size_t w = 0;
  double e = kdp_test_maxerr(a, b, n, atol, rtol, &w);
  if (e > 1.0) {
    fprintf(stderr, "rank %d: %s: index %zu: got %.8g, expected %.8g\n", D.world_rank, what, w,
            (double)a[w], (double)b[w]);
    g_fail++;
  }
}

#define NB 6
#define NC 5

/* near over peer j's parts of a module (kdp_cohort_module_ranges part), laid out as the params */
static void near_part(const char *what, const kdp_cohort *c, kdp_module_part part, size_t j,
                      const float *a, const float *b) {
  size_t n = kdp_cohort_module_ranges(c, part, j, NULL, 0);
  size_t *rg = calloc(2 * n + 1, sizeof *rg);
  kdp_cohort_module_ranges(c, part, j, rg, n);
  for (size_t k = 0; k < n; k++)
    near(what, a + rg[2 * k], b + rg[2 * k], rg[2 * k + 1] - rg[2 * k], 1e-6, 1e-4);
  free(rg);
}

static size_t dim_of(size_t j) { return 8 + 4 * (j % 3); } /* heterogeneous feature dims */

/* identical on every rank: the whole cohort's tensors for one step */
static void make_batch(kdp_rng *r, size_t P, float *z, float *h, size_t nh, int32_t *y) {
  for (size_t k = 0; k < P * NB * NC; k++) z[k] = 2.0f * kdp_rng_normal(r);
  for (size_t k = 0; k < nh; k++) h[k] = kdp_rng_normal(r);
  for (size_t k = 0; k < NB; k++) y[k] = (int32_t)kdp_rng_below(r, NC);
}

static kdp_kdcl_ensemble g_ensemble; /* kdcl's kd.ensemble for make_cohort */

static kdp_cohort *make_cohort(kdp_method m, size_t P, int detach) {
  kdp_kd_spec sp;
  memset(&sp, 0, sizeof sp);
  sp.method = m;
  sp.ensemble = g_ensemble;
  sp.P = P;
  sp.C = NC;
  for (size_t j = 0; j < P; j++) sp.dims[j] = dim_of(j);
  sp.leader = -1;
  sp.detach = detach;
  sp.contrast_weight = 0.5f; /* mcl: the contrastive terms count (kd.contrast_weight) */
  sp.embed_dim = 16;
  kdp_cohort *c = NULL;
  kdp_error err;
  ck_assert_msg(kdp_cohort_create(&c, &sp, NB, &err) == 0, "cohort: %s", err.msg);
  kdp_rng r;
  kdp_rng_seed(&r, 11, KDP_STREAM_MODULE);
  kdp_cohort_module_init(c, &r);
  if (m == KDP_METHOD_KDCL && g_ensemble == KDP_KDCL_GENERAL) { /* unequal weights, sum 1 */
    float w[KDP_KD_MAX_PEERS];
    for (size_t j = 0; j < P; j++) w[j] = (float)(j + 1) / (float)(P * (P + 1) / 2);
    ck_assert_msg(kdp_kdcl_set_weights(c, w, &err) == 0, "%s", err.msg);
  }
  return c;
}

/* This rank's rows of a B-row batch of the whole cohort (z, h as the reference's input): its
   peer's logits and features on its own rows. */
static void own_rows(kdp_dist *L, const kdp_cohort *ref, size_t B, const float *z, const float *h,
                     const float **zo, const float **ho, size_t *lo, size_t *hi) {
  size_t p = (size_t)L->peer;
  kdp_dist_rows(L, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, lo, hi);
  *zo = z + (p * B + *lo) * NC;
  *ho = kdp_cohort_feature_floats(ref, B) ? h + kdp_cohort_feature_offset(ref, p, B) + *lo * dim_of(p)
                                          : NULL;
}

/* The pipeline's step on the layout L vs the single-process objective, for one method on a
   B-row batch: this rank's rows of dJ/dz and dJ/dh, its peer's loss (its ranks' rows summed),
   the module's gradient. */
static void check_method(kdp_dist *L, const char *layout, size_t B, kdp_method m, int detach,
                         int burn_in) {
  size_t P = (size_t)L->n_peers, me = (size_t)L->peer;
  if ((int)P < kdp_method_ops_of(m)->min_peers) return;
  kdp_cohort *dist = make_cohort(m, P, detach), *ref = make_cohort(m, P, detach);
  size_t nh = kdp_cohort_feature_floats(ref, NB);
  float *z = kdp_falloc(P * NB * NC), *h = kdp_falloc(nh);
  int32_t y[NB];
  kdp_rng r;
  kdp_rng_seed(&r, 1234 + (uint64_t)m, 99);
  make_batch(&r, P, z, h, nh, y);
  /* switokd: detach = 1 puts the teacher (peer 0) near the labels, so the step is in expert
     mode; 0 puts the students there, so it is in learning mode */
  const int sw = m == KDP_METHOD_SWITOKD;
  for (size_t j = 0; sw && j < P; j++)
    if ((j == 0) == (detach != 0))
      for (size_t b = 0; b < NB; b++) z[(j * NB + b) * NC + (size_t)y[b]] += 6.0f;
  nh = kdp_cohort_feature_floats(ref, B); /* the first B rows of each block, repacked */
  float *hb = kdp_falloc(nh);
  for (size_t j = 0; nh && j < P; j++)
    memcpy(hb + kdp_cohort_feature_offset(ref, j, B), h + kdp_cohort_feature_offset(ref, j, NB),
           B * dim_of(j) * sizeof(float));
  float *zb = kdp_falloc(P * B * NC);
  for (size_t j = 0; j < P; j++) memcpy(zb + j * B * NC, z + j * NB * NC, B * NC * sizeof(float));
  /* pcl: the peers' mean teachers' logits (P x B x C), drawn from their own stream */
  const int reads_ema = (kdp_method_ops_of(m)->peer_reads & KDP_READS_EMA_LOGITS) != 0;
  float *zeb = kdp_falloc(P * B * NC);
  kdp_rng re;
  kdp_rng_seed(&re, 4321 + (uint64_t)m, 98);
  for (size_t k = 0; k < P * B * NC; k++) zeb[k] = 2.0f * kdp_rng_normal(&re);
  /* reference: the total objective's gradients, in one process */
  float *rdz = kdp_falloc(P * B * NC), *rdh = kdp_falloc(nh), *teach = kdp_falloc(B * NC);
  /* mcl: every peer's embeddings of the batch (unit rows) and the reference's dJ/dv */
  const size_t E = kdp_cohort_embed_dim(ref);
  float *vb = kdp_falloc(P * B * E + 1), *rdv = kdp_falloc(P * B * E + 1);
  for (size_t k = 0; k < P * B; k++) {
    double ss = 0;
    for (size_t e = 0; e < E; e++) ss += pow(vb[k * E + e] = kdp_rng_normal(&r), 2);
    for (size_t e = 0; e < E; e++) vb[k * E + e] /= (float)sqrt(ss);
  }
  kdp_kd_losses per[KDP_KD_MAX_PEERS];
  double total = 0;
  kdp_error err;
  kdp_kd_batch in = {.z = zb, .h = hb, .y = y, .B = B, .T = 3.0f, .weight = 0.7f,
                     .burn_in = burn_in, .z_ema = reads_ema ? zeb : NULL,
                     .v = E ? vb : NULL, .dv = E ? rdv : NULL};
  if (sw) {
    in.expert = kdp_switokd_mode(zb, y, P, B, NC, 0, NULL);
    if (in.expert != (detach != 0)) {
      fprintf(stderr, "rank %d: %s switokd B=%zu: the reference's mode is %d, the case wants %d\n",
              D.world_rank, layout, B, in.expert, detach != 0);
      g_fail++;
    }
  }
  kdp_cohort_module_zero_grad(ref);
  ck_assert_msg(kdp_cohort_objective(ref, &in, rdz, rdh, teach, per, &total, &err) == 0, "%s",
                err.msg);
  /* distributed: this rank only passes its own rows of its peer's logits and features */
  kdp_pipeline *pl = NULL;
  ck_assert_msg(kdp_pipeline_create(&pl, L, dist, NB, &err) == 0, "%s", err.msg);
  float *dz = kdp_falloc(NB * NC), *dh = kdp_falloc(NB * dim_of(me)), *dv = kdp_falloc(NB * E + 1);
  const float *zo, *ho;
  size_t lo, hi;
  own_rows(L, ref, B, zb, hb, &zo, &ho, &lo, &hi);
  kdp_step_in si = {.B = B, .y = y, .z = zo, .h = ho, .T = 3.0f, .weight = 0.7f,
                    .burn_in = burn_in, .z_ema = zeb + (me * B + lo) * NC,
                    .v = E ? vb + (me * B + lo) * E : NULL, .dv = E ? dv : NULL};
  kdp_kd_losses Lo;
  ck_assert_msg(kdp_pipeline_step(pl, &si, dz, dh, &Lo, &err) == 0, "%s", err.msg);
  kdp_pipeline_module_allreduce(pl);
  char what[128];
  const char *name = kdp_method_name(m);
  if (sw && kdp_pipeline_expert(pl, NULL) != in.expert) {
    fprintf(stderr, "rank %d: %s switokd B=%zu: the pipeline decided mode %d, the reference %d\n",
            D.world_rank, layout, B, kdp_pipeline_expert(pl, NULL), in.expert);
    g_fail++;
  }
  /* the peer's loss over the batch: its ranks' own-row means, weighted by their rows */
  double loss = Lo.loss * (double)(hi - lo) / (double)B;
  kdp_dist_peer_allreduce_f64(L, &loss, 1);
  snprintf(what, sizeof what, "%s %s%s B=%zu: loss of peer %zu", layout, name,
           detach ? "(detach)" : "", B, me);
  if (!(fabs(loss - per[me].loss) <= 1e-5 * (1 + fabs(per[me].loss)))) {
    fprintf(stderr, "rank %d: %s: %.9g vs reference %.9g\n", D.world_rank, what, loss,
            per[me].loss);
    g_fail++;
  }
  snprintf(what, sizeof what, "%s %s%s B=%zu: dL/dz of peer %zu", layout, name,
           detach ? "(detach)" : "", B, me);
  near(what, dz, rdz + (me * B + lo) * NC, (hi - lo) * NC, 1e-6, 1e-4);
  if (kdp_cohort_feature_grads(ref)) {
    snprintf(what, sizeof what, "%s %s%s B=%zu: dL/dh of peer %zu", layout, name,
             detach ? "(detach)" : "", B, me);
    near(what, dh, rdh + kdp_cohort_feature_offset(ref, me, B) + lo * dim_of(me),
         (hi - lo) * dim_of(me), 1e-6, 1e-4);
  }
  if (E) { /* every peer's term's gradient through this rank's rows of its peer's embeddings */
    snprintf(what, sizeof what, "%s %s B=%zu: dJ/dv of peer %zu", layout, name, B, me);
    near(what, dv, rdv + (me * B + lo) * E, (hi - lo) * E, 1e-6, 1e-4);
  }
  size_t nm = kdp_cohort_module_n_params(ref);
  if (nm) { /* the parts this rank keeps: the replicated ones and its peer's own block */
    snprintf(what, sizeof what, "%s %s%s B=%zu: module gradient", layout, name,
             detach ? "(detach)" : "", B);
    near_part(what, ref, KDP_PART_SHARED, me, kdp_cohort_module_grads(dist),
              kdp_cohort_module_grads(ref));
    snprintf(what, sizeof what, "%s %s%s B=%zu: module gradient, peer %zu's own block", layout,
             name, detach ? "(detach)" : "", B, me);
    near_part(what, ref, KDP_PART_OWN, me, kdp_cohort_module_grads(dist),
              kdp_cohort_module_grads(ref));
  }
  size_t nb = kdp_cohort_module_n_buffers(ref);
  if (nb) {
    snprintf(what, sizeof what, "%s %s B=%zu: module running statistics", layout, name, B);
    near(what, kdp_cohort_module_buffers(dist), kdp_cohort_module_buffers(ref), nb, 1e-6, 1e-4);
  }
  /* evaluation: the method's teacher and the ensemble over the whole batch, summed over ranks */
  kdp_eval_sums es;
  memset(&es, 0, sizeof es);
  ck_assert_msg(kdp_pipeline_eval(pl, B, y, zo, ho, &es, &err) == 0, "%s", err.msg);
  double ev[2] = {es.teacher_hits, es.ens_hits};
  kdp_dist_group_sum_f64(L, KDP_GROUP_WORLD, ev, 2);
  if (kdp_method_ops_of(m)->teacher) {
    float *tev = kdp_falloc(B * NC);
    ck_assert(kdp_cohort_teacher_eval(ref, zb, hb, B, tev, &err) == 0);
    double want = (double)kdp_count_hits(tev, y, B, NC);
    if (ev[0] != want) {
      fprintf(stderr, "rank %d: %s %s B=%zu: teacher hits %g, reference %g\n", D.world_rank,
              layout, name, B, ev[0], want);
      g_fail++;
    }
    free(tev);
  }
  kdp_pipeline_free(pl);
  kdp_cohort_free(dist);
  kdp_cohort_free(ref);
  float *bufs[] = {z, h, zb, hb, rdz, rdh, teach, dz, dh, zeb, vb, rdv, dv};
  for (size_t k = 0; k < sizeof bufs / sizeof bufs[0]; k++) free(bufs[k]);
}

/* every method, on a full and on a small batch (row blocks of unequal size, some empty) */
static void check_layout(kdp_dist *L, const char *layout) {
  const size_t Bs[] = {NB, 3};
  for (size_t b = 0; b < 2; b++) {
    check_method(L, layout, Bs[b], KDP_METHOD_INDEPENDENT, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_DML, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_CODISTILL, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_CODISTILL, 0, 1);
    check_method(L, layout, Bs[b], KDP_METHOD_AVG, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_ONE, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_FFL, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_OKDDIP, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_OKDDIP, 1, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_PCL, 0, 0);
    /* kdcl: the teacher reduced over the peers by one allreduce (sum, or min for minlogit) */
    for (int e = KDP_KDCL_NAIVE; e <= KDP_KDCL_GENERAL; e++) {
      g_ensemble = (kdp_kdcl_ensemble)e;
      check_method(L, layout, Bs[b], KDP_METHOD_KDCL, 0, 0);
    }
    g_ensemble = KDP_KDCL_NAIVE;
    check_method(L, layout, Bs[b], KDP_METHOD_MCL, 0, 0);
    check_method(L, layout, Bs[b], KDP_METHOD_SWITOKD, 0, 0); /* learning mode */
    check_method(L, layout, Bs[b], KDP_METHOD_SWITOKD, 1, 0); /* expert mode */
  }
}

START_TEST(test_methods_match_reference) {
  /* one rank per peer */
  check_layout(&D, "k=1");
  /* ranks_per_peer = 2 (even world sizes) and a per-peer layout (peer 0 on 2 ranks) */
  kdp_error err;
  if (D.world_size % 2 == 0) {
    kdp_dist L2;
    ck_assert_msg(kdp_dist_setup(&L2, 2, &err) == 0, "%s", err.msg);
    check_layout(&L2, "k=2");
    kdp_dist_free(&L2);
  }
  if (D.world_size >= 3) {
    kdp_dist L3;
    int pk[1] = {2};
    ck_assert_msg(kdp_dist_setup_layout(&L3, 1, pk, 1, &err) == 0, "%s", err.msg);
    check_layout(&L3, "peer0-k=2");
    kdp_dist_free(&L3);
  }
  ck_assert_msg(g_fail == 0, "%d mismatches against the single-process reference", g_fail);
}
END_TEST

/* 100 steps of module updates from distributed gradients: the replicas stay bitwise equal once
   every peer's blocks are gathered (kdp_pipeline_module_sync), params and momentum; before, a
   module sharded by peer columns differs (each rank stepped only its own block). */
static void check_replicas(kdp_method m) {
  size_t P = (size_t)D.n_peers, me = (size_t)D.peer;
  if (m == KDP_METHOD_OKDDIP && P < 3) return;
  kdp_cohort *c = make_cohort(m, P, 0);
  size_t nh = kdp_cohort_feature_floats(c, NB), nm = kdp_cohort_module_n_params(c);
  kdp_pipeline *pl = NULL;
  kdp_error err;
  ck_assert(kdp_pipeline_create(&pl, &D, c, NB, &err) == 0);
  kdp_sgd opt;
  kdp_sgd_init(&opt, nm, 0.9f, 1e-4f, 1);
  float *z = kdp_falloc(P * NB * NC), *h = kdp_falloc(nh), *dz = kdp_falloc(NB * NC);
  float *dh = kdp_falloc(NB * dim_of(me)), *ze = kdp_falloc(NB * NC);
  int32_t y[NB];
  kdp_rng r;
  /* each rank draws different data: only the allreduce keeps the replicas equal */
  kdp_rng_seed(&r, 77, 1000 + me);
  for (int step = 0; step < 100; step++) {
    make_batch(&r, P, z, h, nh, y);
    for (size_t k = 0; k < NB * NC; k++) ze[k] = z[me * NB * NC + k] * 0.5f; /* pcl */
    kdp_step_in si = {.B = NB, .y = y, .z = z + me * NB * NC,
                      .h = h + kdp_cohort_feature_offset(c, me, NB), .T = 3.0f, .weight = 1.0f,
                      .z_ema = ze};
    kdp_kd_losses L;
    ck_assert(kdp_pipeline_step(pl, &si, dz, dh, &L, &err) == 0);
    kdp_pipeline_module_allreduce(pl);
    kdp_pipeline_module_sgd(pl, &opt, 0.05f);
  }
  int rc;
  if (kdp_cohort_col_width(c) && P > 1) {
    rc = kdp_dist_agree(&D, kdp_cohort_module_params(c), nm * sizeof(float),
                        "module parameters before the sync", &err);
    ck_assert_msg(rc != 0, "%s: each rank steps only its own block, yet the replicas agree before "
                  "the sync", kdp_method_name(m));
  }
  kdp_pipeline_module_sync(pl, opt.buf);
  rc = kdp_dist_agree(&D, kdp_cohort_module_params(c), nm * sizeof(float),
                      "replicated module parameters", &err);
  ck_assert_msg(rc == 0, "%s after 100 steps: %s", kdp_method_name(m), err.msg);
  rc = kdp_dist_agree(&D, opt.buf, nm * sizeof(float), "replicated module momentum", &err);
  ck_assert_msg(rc == 0, "%s after 100 steps: %s", kdp_method_name(m), err.msg);
  size_t nb = kdp_cohort_module_n_buffers(c);
  if (nb) {
    rc = kdp_dist_agree(&D, kdp_cohort_module_buffers(c), nb * sizeof(float),
                        "replicated module BN statistics", &err);
    ck_assert_msg(rc == 0, "%s after 100 steps: %s", kdp_method_name(m), err.msg);
  }
  kdp_sgd_free(&opt);
  kdp_pipeline_free(pl);
  kdp_cohort_free(c);
  free(z);
  free(h);
  free(dz);
  free(dh);
  free(ze);
}

START_TEST(test_replicas_bitwise) {
  check_replicas(KDP_METHOD_ONE);
  check_replicas(KDP_METHOD_FFL);
  check_replicas(KDP_METHOD_OKDDIP);
  check_replicas(KDP_METHOD_PCL);
}
END_TEST

/* the row exchanges on a layout: gather to row blocks and to every row, scatter back */
static void check_rows(kdp_dist *L, size_t B) {
  size_t P = (size_t)L->n_peers, p = (size_t)L->peer, width[KDP_DIST_MAX_PEERS], lo, hi, tl, th;
  for (size_t j = 0; j < P; j++) width[j] = j + 1;
  kdp_dist_rows(L, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, &lo, &hi);
  float mine[64], out[64 * 64], back[64];
  for (size_t r = lo; r < hi; r++)
    for (size_t c = 0; c < width[p]; c++) mine[(r - lo) * width[p] + c] = (float)(1000 * p + 10 * r + c);
  const kdp_rows targets[] = {KDP_ROWS_BLOCK, KDP_ROWS_ALL, KDP_ROWS_OWN};
  for (size_t t = 0; t < 3; t++) {
    kdp_dist_rows(L, KDP_GROUP_WORLD, targets[t], B, &tl, &th);
    size_t nt = th - tl, off = 0;
    kdp_dist_gather_rows(L, KDP_GROUP_WORLD, targets[t], B, width, hi > lo ? mine : NULL, out);
    for (size_t j = 0; j < P; j++) {
      for (size_t r = tl; r < th; r++)
        for (size_t c = 0; c < width[j]; c++)
          ck_assert_msg(out[off + (r - tl) * width[j] + c] == (float)(1000 * j + 10 * r + c),
                        "gather: target %zu, peer %zu, row %zu", t, j, r);
      off += nt * width[j];
    }
    /* scatter ones back: each own row receives one per rank whose target holds it */
    double held[64] = {0};
    for (size_t r = tl; r < th; r++) held[r] = 1;
    kdp_dist_group_sum_f64(L, KDP_GROUP_WORLD, held, B);
    for (size_t k = 0; k < off; k++) out[k] = 1.0f;
    memset(back, 0, sizeof back);
    kdp_dist_scatter_rows(L, KDP_GROUP_WORLD, targets[t], B, width, 0, out, back);
    for (size_t k = 0; k < (hi - lo) * width[p]; k++) {
      double want = held[lo + k / width[p]];
      ck_assert_msg(back[k] == (float)want, "scatter: target %zu: %g, want %g", t,
                    (double)back[k], want);
    }
    if (targets[t] == KDP_ROWS_BLOCK)
      for (size_t r = 0; r < B; r++) ck_assert(held[r] == 1); /* every row in one block */
    /* the setting scatter: row r's value r + 1 from every rank whose target holds it, over
       whatever out held before (received in place for row blocks, zeroed and added otherwise) */
    off = 0;
    for (size_t j = 0; j < P; j++) {
      for (size_t r = tl; r < th; r++)
        for (size_t c = 0; c < width[j]; c++) out[off + (r - tl) * width[j] + c] = (float)(r + 1);
      off += nt * width[j];
    }
    for (size_t k = 0; k < 64; k++) back[k] = -7.0f;
    kdp_dist_scatter_rows_set(L, KDP_GROUP_WORLD, targets[t], B, width, 0, out, back);
    for (size_t k = 0; k < (hi - lo) * width[p]; k++) {
      double want = held[lo + k / width[p]] * (double)(lo + k / width[p] + 1);
      ck_assert_msg(back[k] == (float)want, "scatter_set: target %zu: %g, want %g", t,
                    (double)back[k], want);
    }
  }
}

/* Two tensors' rows in one exchange (kdp_dist_gather_rows_fields, kdp_dist_scatter_blocks_fields)
   equal the two exchanges made one after the other: the same floats in the same places, the same
   bytes counted; and a started world sum equals the blocking one. */
static void check_fields(kdp_dist *L, size_t B) {
  size_t P = (size_t)L->n_peers, p = (size_t)L->peer, wa[KDP_DIST_MAX_PEERS],
         wb[KDP_DIST_MAX_PEERS], lo, hi;
  for (size_t j = 0; j < P; j++) {
    wa[j] = j + 1;
    wb[j] = 3;
  }
  kdp_dist_rows(L, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, &lo, &hi);
  float a[64], b[64], oa[2][64 * 64], ob[2][64 * 64], ba[2][64], bb[2][64];
  for (size_t k = 0; k < 64; k++) {
    a[k] = (float)(1000 * p + k);
    b[k] = (float)(-1000.0 * (double)p - 0.5 * (double)k);
  }
  const kdp_rows targets[] = {KDP_ROWS_BLOCK, KDP_ROWS_ALL, KDP_ROWS_OWN};
  for (size_t t = 0; t < 3; t++) {
    memset(oa, 0, sizeof oa);
    memset(ob, 0, sizeof ob);
    double by0 = L->bytes_exchanged;
    kdp_dist_gather_rows(L, KDP_GROUP_WORLD, targets[t], B, wa, hi > lo ? a : NULL, oa[0]);
    kdp_dist_gather_rows(L, KDP_GROUP_WORLD, targets[t], B, wb, hi > lo ? b : NULL, ob[0]);
    double by1 = L->bytes_exchanged;
    kdp_rows_field f[2] = {{.width = wa, .in = hi > lo ? a : NULL, .out = oa[1]},
                           {.width = wb, .in = hi > lo ? b : NULL, .out = ob[1]}};
    kdp_dist_gather_rows_fields(L, KDP_GROUP_WORLD, targets[t], B, f, 2);
    ck_assert_msg(memcmp(oa[0], oa[1], sizeof oa[0]) == 0 && memcmp(ob[0], ob[1], sizeof ob[0]) == 0,
                  "gather of 2 fields, target %zu: not the 2 gathers' rows", t);
    ck_assert_msg(L->bytes_exchanged - by1 == by1 - by0, "gather of 2 fields: %g bytes, want %g",
                  L->bytes_exchanged - by1, by1 - by0);
  }
  /* to the row blocks' owners' rows, set in place: field a per peer, field b shared */
  size_t tl, th;
  kdp_dist_rows(L, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, &tl, &th);
  for (size_t k = 0; k < 64 * 64; k++) {
    oa[0][k] = (float)(7 * k + L->world_rank);
    ob[0][k] = (float)(0.25 * (double)k - L->world_rank);
  }
  for (size_t k = 0; k < 64; k++) ba[0][k] = ba[1][k] = bb[0][k] = bb[1][k] = -7.0f;
  double by0 = L->bytes_exchanged;
  kdp_dist_scatter_rows_set(L, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, wa, 0, oa[0], ba[0]);
  kdp_dist_scatter_rows_set(L, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, wb, 1, ob[0], bb[0]);
  double by1 = L->bytes_exchanged;
  kdp_rows_field f[2] = {{.width = wa, .in = oa[0], .out = ba[1]},
                         {.width = wb, .shared = 1, .in = ob[0], .out = bb[1]}};
  kdp_dist_scatter_blocks_fields(L, KDP_GROUP_WORLD, B, f, 2);
  ck_assert_msg(memcmp(ba[0], ba[1], sizeof ba[0]) == 0 && memcmp(bb[0], bb[1], sizeof bb[0]) == 0,
                "scatter of 2 fields: not the 2 scatters' rows");
  ck_assert_msg(L->bytes_exchanged - by1 == by1 - by0, "scatter of 2 fields: %g bytes, want %g",
                L->bytes_exchanged - by1, by1 - by0);
  /* a whole field with them: every other member's 5 floats in member order, mine untouched */
  float w5[5], all5[5 * 64];
  for (size_t k = 0; k < 5; k++) w5[k] = (float)(100 * L->world_rank + (int)k);
  for (size_t k = 0; k < 5 * 64; k++) all5[k] = -1.0f;
  kdp_rows_field f3[3] = {f[0], f[1], {.whole = 5, .in = w5, .out = all5}};
  kdp_dist_scatter_blocks_fields(L, KDP_GROUP_WORLD, B, f3, 3);
  ck_assert_msg(memcmp(ba[0], ba[1], sizeof ba[0]) == 0 && memcmp(bb[0], bb[1], sizeof bb[0]) == 0,
                "scatter of 2 fields with a whole one: not the 2 scatters' rows");
  for (int m = 0; m < L->world_size; m++)
    for (size_t k = 0; k < 5; k++)
      ck_assert_msg(all5[5 * (size_t)m + k] == (m == L->world_rank ? -1.0f : (float)(100 * m + (int)k)),
                    "whole field: member %d's value %zu is %g", m, k, (double)all5[5 * (size_t)m + k]);
  /* a started world sum, other collectives in between, equals the blocking one */
  float s0[37], s1[37];
  for (size_t k = 0; k < 37; k++) s0[k] = s1[k] = 0.1f * (float)k + 0.37f * (float)L->world_rank;
  kdp_dist_world_allreduce(L, s0, 37);
  kdp_dist_world_allreduce_start(L, s1, 37);
  kdp_rows_field g = {.width = wa, .in = hi > lo ? a : NULL, .out = oa[1]};
  kdp_dist_gather_rows_fields(L, KDP_GROUP_WORLD, KDP_ROWS_BLOCK, B, &g, 1);
  kdp_dist_world_allreduce_finish(L);
  ck_assert(L->sum_req == NULL);
  ck_assert_msg(memcmp(s0, s1, sizeof s0) == 0, "a started world sum differs from the blocking one");
}

/* Several steps of the module trained from the pipeline (each rank steps its parts only) against
   the single-process reference stepping the whole module, with an evaluation of the teacher and
   a checkpoint's gathering (kdp_pipeline_module_sync of params and momentum) in between: a rank's
   stale blocks of the other peers must not reach either. */
static void check_trajectory(kdp_dist *L, const char *layout, kdp_method m) {
  size_t P = (size_t)L->n_peers, me = (size_t)L->peer;
  if ((int)P < kdp_method_ops_of(m)->min_peers) return;
  kdp_cohort *dist = make_cohort(m, P, 0), *ref = make_cohort(m, P, 0);
  const size_t nh = kdp_cohort_feature_floats(ref, NB), nm = kdp_cohort_module_n_params(ref);
  const size_t nb = kdp_cohort_module_n_buffers(ref);
  kdp_sgd ro, dopt;
  kdp_sgd_init(&ro, nm, 0.9f, 5e-4f, 0);
  kdp_sgd_init(&dopt, nm, 0.9f, 5e-4f, 0);
  kdp_pipeline *pl = NULL;
  kdp_error err;
  ck_assert_msg(kdp_pipeline_create(&pl, L, dist, NB, &err) == 0, "%s", err.msg);
  float *z = kdp_falloc(P * NB * NC), *h = kdp_falloc(nh), *rdz = kdp_falloc(P * NB * NC);
  float *rdh = kdp_falloc(nh), *dz = kdp_falloc(NB * NC), *dh = kdp_falloc(NB * dim_of(me));
  float *tev = kdp_falloc(NB * NC);
  int32_t y[NB];
  kdp_rng r;
  kdp_rng_seed(&r, 555, 7); /* the same batches on every rank */
  char what[128];
  for (int step = 0; step < 6; step++) {
    make_batch(&r, P, z, h, nh, y);
    kdp_kd_batch in = {.z = z, .h = h, .y = y, .B = NB, .T = 3.0f, .weight = 0.7f};
    kdp_cohort_module_zero_grad(ref);
    ck_assert_msg(kdp_cohort_objective(ref, &in, rdz, rdh, NULL, NULL, NULL, &err) == 0, "%s",
                  err.msg);
    kdp_sgd_step(&ro, kdp_cohort_module_params(ref), kdp_cohort_module_grads(ref), 0.1f);
    const float *zo, *ho;
    size_t lo, hi;
    own_rows(L, ref, NB, z, h, &zo, &ho, &lo, &hi);
    kdp_step_in si = {.B = NB, .y = y, .z = zo, .h = ho, .T = 3.0f, .weight = 0.7f};
    kdp_kd_losses Lo;
    memset(dz, 0, NB * NC * sizeof(float));
    memset(dh, 0, NB * dim_of(me) * sizeof(float));
    ck_assert_msg(kdp_pipeline_step(pl, &si, dz, dh, &Lo, &err) == 0, "%s", err.msg);
    kdp_pipeline_module_allreduce(pl);
    kdp_pipeline_module_sgd(pl, &dopt, 0.1f);
    if (step % 2 == 1) { /* an evaluation: the teacher's loss over the batch, summed over ranks */
      kdp_eval_sums es;
      memset(&es, 0, sizeof es);
      ck_assert_msg(kdp_pipeline_eval(pl, NB, y, zo, ho, &es, &err) == 0, "%s", err.msg);
      double ev[2] = {es.teacher_loss, es.teacher_hits};
      kdp_dist_group_sum_f64(L, KDP_GROUP_WORLD, ev, 2);
      ck_assert(kdp_cohort_teacher_eval(ref, z, h, NB, tev, &err) == 0);
      size_t th = 0;
      double want = kdp_ce_loss(tev, y, NB, NC, NULL, 0, &th) * (double)NB;
      if (!(fabs(ev[0] - want) <= 1e-4 * (1 + fabs(want))) || ev[1] != (double)th) {
        fprintf(stderr, "rank %d: %s %s step %d: teacher loss %.9g hits %g, reference %.9g %zu\n",
                D.world_rank, layout, kdp_method_name(m), step, ev[0], ev[1], want, th);
        g_fail++;
      }
    }
    if (step % 3 == 2) { /* a checkpoint: the whole module and momentum, as every rank writes */
      kdp_pipeline_module_sync(pl, dopt.buf);
      snprintf(what, sizeof what, "%s %s step %d: checkpointed module params", layout,
               kdp_method_name(m), step);
      near(what, kdp_cohort_module_params(dist), kdp_cohort_module_params(ref), nm, 1e-6, 1e-4);
      snprintf(what, sizeof what, "%s %s step %d: checkpointed module momentum", layout,
               kdp_method_name(m), step);
      near(what, dopt.buf, ro.buf, nm, 1e-6, 1e-4);
      if (kdp_dist_agree(L, kdp_cohort_module_params(dist), nm * sizeof(float), what, &err) ||
          kdp_dist_agree(L, dopt.buf, nm * sizeof(float), what, &err)) {
        fprintf(stderr, "rank %d: %s\n", D.world_rank, err.msg);
        g_fail++;
      }
    }
  }
  snprintf(what, sizeof what, "%s %s: module running statistics", layout, kdp_method_name(m));
  if (nb)
    near(what, kdp_cohort_module_buffers(dist), kdp_cohort_module_buffers(ref), nb, 1e-6, 1e-4);
  kdp_sgd_free(&ro);
  kdp_sgd_free(&dopt);
  kdp_pipeline_free(pl);
  kdp_cohort_free(dist);
  kdp_cohort_free(ref);
  float *bufs[] = {z, h, rdz, rdh, dz, dh, tev};
  for (size_t k = 0; k < sizeof bufs / sizeof bufs[0]; k++) free(bufs[k]);
}

START_TEST(test_module_trajectory) {
  check_trajectory(&D, "k=1", KDP_METHOD_FFL);
  check_trajectory(&D, "k=1", KDP_METHOD_ONE);
  kdp_error err;
  if (D.world_size >= 3) { /* peer 0 on 2 ranks: its block's gradient summed over them */
    kdp_dist L3;
    int pk[1] = {2};
    ck_assert_msg(kdp_dist_setup_layout(&L3, 1, pk, 1, &err) == 0, "%s", err.msg);
    check_trajectory(&L3, "peer0-k=2", KDP_METHOD_FFL);
    kdp_dist_free(&L3);
  }
  ck_assert_msg(g_fail == 0, "%d mismatches against the single-process reference", g_fail);
}
END_TEST

START_TEST(test_collectives) {
  check_rows(&D, 7);
  check_rows(&D, 2); /* fewer rows than ranks at 3 and 4: empty blocks */
  check_fields(&D, 7);
  check_fields(&D, 2);
  kdp_error err;
  if (D.world_size >= 3) {
    kdp_dist L3;
    int pk[1] = {2};
    ck_assert_msg(kdp_dist_setup_layout(&L3, 1, pk, 1, &err) == 0, "%s", err.msg);
    check_rows(&L3, 7);
    check_rows(&L3, 3);
    check_fields(&L3, 7);
    kdp_dist_free(&L3);
  }
  /* min over the group */
  float v[2] = {(float)D.world_rank, -(float)D.world_rank};
  kdp_dist_group_min(&D, KDP_GROUP_WORLD, v, 2);
  ck_assert(v[0] == 0.0f && v[1] == -(float)(D.world_size - 1));
}
END_TEST

START_TEST(test_agree_detects_difference) {
  int v = D.world_rank == D.world_size - 1 ? 1 : 0;
  kdp_error err;
  int rc = kdp_dist_agree(&D, &v, sizeof v, "test value", &err);
  if (D.world_size > 1) {
    ck_assert_int_eq(rc, KDP_EMISMATCH);
    char want[32];
    snprintf(want, sizeof want, "rank %d", D.world_size - 1);
    ck_assert_msg(strstr(err.msg, want) != NULL, "message should name the rank: %s", err.msg);
  } else {
    ck_assert_int_eq(rc, 0);
  }
}
END_TEST


/* Gradient buckets (src/dist/buckets.c) over a peer of all the world's ranks. On 2 ranks the
   bucketed sums equal one MPI_Allreduce of the whole vector (kdp_dist_peer_allreduce) bitwise:
   a + b = b + a in IEEE arithmetic, whichever algorithm Open MPI picks. On more ranks the order
   of the additions is the algorithm's, and Open MPI 4.1's blocking allreduce picks its algorithm
   by message size (on 3 ranks, vectors of 24 to 128 KB are summed in another order than smaller
   and larger ones), so bucket sizes can change the last bits there: the sums are checked against
   the exact sum (in double) within the bound of any order of W - 1 float additions, and the
   bitwise differences from the blocking allreduce are printed. */
static void rank_values(float *g, size_t n, int r, int salt) {
  kdp_rng rng;
  kdp_rng_seed(&rng, 1000u + (unsigned)salt, (uint64_t)r);
  for (size_t k = 0; k < n; k++) g[k] = kdp_rng_normal(&rng) * (k % 7 == 0 ? 100.0f : 0.01f);
}

static size_t bitwise_mismatches(const float *a, const float *b, size_t n) {
  size_t bad = 0;
  for (size_t k = 0; k < n; k++) bad += memcmp(&a[k], &b[k], sizeof(float)) != 0;
  return bad;
}

/* elements of g (the sum over W ranks of parts[r * n + k]) outside the error bound of any order
   of W - 1 float additions: |g - exact| <= (W - 1) u sum |x| (u = 2^-24), to first order */
static size_t beyond_sum_bound(const float *g, const float *parts, size_t n, int W) {
  size_t bad = 0;
  for (size_t k = 0; k < n; k++) {
    double exact = 0, mag = 0;
    for (int r = 0; r < W; r++) {
      exact += parts[(size_t)r * n + k];
      mag += fabs(parts[(size_t)r * n + k]);
    }
    bad += fabs((double)g[k] - exact) > (W - 1) * 0x1p-24 * mag * 1.001;
  }
  return bad;
}

/* sums of W - 1 additions: bitwise equal to the blocking allreduce on 2 ranks, within the bound
   on any number; counts into bad[0] (bitwise, asserted for W = 2 only) and bad[1] (bound) */
static void check_bucketed(const float *g, const float *blocking, const float *parts, size_t n,
                           int W, size_t bad[2]) {
  bad[0] += bitwise_mismatches(g, blocking, n);
  bad[1] += beyond_sum_bound(g, parts, n, W);
}

START_TEST(test_buckets_sum) {
  kdp_dist peer;
  kdp_error err;
  int W = D.world_size;
  ck_assert_msg(kdp_dist_setup(&peer, W, &err) == 0, "%s", err.msg);
  /* vector sizes across Open MPI's algorithm switch points (14858 floats: in the 3-rank window
     above); bucket sizes from one layer per bucket to one bucket for everything */
  static const size_t sizes[] = {1, 1000, 14858, 70001, 535818};
  static const size_t bucket_floats[] = {1, 3000, 65536, 1u << 20};
  size_t bad[2] = {0, 0}, checked = 0;
  for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
    size_t n = sizes[si];
    /* layer marks: decreasing, uneven layers, ending at 0 */
    size_t marks[64], nm = 0, at = n;
    while (at > 0 && nm < 63) {
      size_t layer = 1 + (at * 3) / 11 + (nm % 3) * 17;
      at = layer >= at ? 0 : at - layer;
      marks[nm++] = at;
    }
    if (at) marks[nm++] = 0;
    float *g = kdp_xmalloc(n * sizeof *g), *ref = kdp_xmalloc(n * sizeof *ref);
    float *parts = kdp_xmalloc((size_t)W * n * sizeof *parts);
    rank_values(ref, n, peer.slice, (int)si);
    kdp_dist_peer_allreduce(&peer, ref, n);
    for (int r = 0; r < W; r++) rank_values(parts + (size_t)r * n, n, r, (int)si);
    for (size_t bi = 0; bi < sizeof bucket_floats / sizeof *bucket_floats; bi++) {
      kdp_buckets *b = kdp_buckets_create(&peer, g, n, marks, nm, bucket_floats[bi]);
      /* the buckets tile [0, n) from the end, each cut at a mark */
      size_t nb = kdp_buckets_count(b), top = n;
      ck_assert(nb >= 1);
      for (size_t i = 0; i < nb; i++) {
        size_t lo, hi;
        kdp_buckets_range(b, i, &lo, &hi);
        ck_assert(hi == top && lo < hi);
        ck_assert(i + 1 == nb || hi - lo >= bucket_floats[bi]);
        top = lo;
      }
      ck_assert(top == 0);
      /* twice (finish leaves it ready for the next step), then finish alone (a rank with no
         rows runs no backward pass) */
      for (int step = 0; step < 3; step++) {
        rank_values(g, n, peer.slice, (int)si);
        for (size_t m = 0; step < 2 && m < nm; m++) kdp_buckets_ready(b, marks[m]);
        kdp_buckets_finish(b);
        check_bucketed(g, ref, parts, n, W, bad);
        checked += n;
      }
      kdp_buckets_free(b);
    }
    free(g);
    free(ref);
    free(parts);
  }
  if (D.world_rank == 0)
    fprintf(stderr, "buckets on %d ranks: %zu of %zu sums differ bitwise from one blocking "
                    "allreduce of the whole vector, %zu beyond the summation bound\n",
            W, bad[0], checked, bad[1]);
  kdp_dist_free(&peer);
  ck_assert_msg(bad[1] == 0, "%zu of %zu bucketed sums beyond the summation bound", bad[1],
                checked);
  if (W == 2)
    ck_assert_msg(bad[0] == 0, "%zu of %zu bucketed sums differ from the blocking allreduce",
                  bad[0], checked);
}
END_TEST

/* the whole world as one peer (W ranks on this node) and its small mlp (8x8 inputs, 10 classes) */
static kdp_model *peer_model(kdp_dist *peer, size_t max_batch) {
  kdp_error err;
  ck_assert_msg(kdp_dist_setup(peer, D.world_size, &err) == 0, "%s", err.msg);
  kdp_input_shape ish = {8, 8, 1, 10};
  kdp_model *m = NULL;
  ck_assert_msg(kdp_model_create(&m, "mlp(96,64,32)", ish, max_batch, &err) == 0, "%s", err.msg);
  return m;
}

/* The model's backward hook starts every bucket during the backward pass (only the wait is left
   for finish), and the bucketed gradients are the peer's sum (as above). */
START_TEST(test_buckets_model_hook) {
  kdp_dist peer;
  int W = D.world_size;
  kdp_model *m = peer_model(&peer, 16);
  kdp_rng rng;
  kdp_rng_seed(&rng, 5, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  size_t np = kdp_model_n_params(m), nm = kdp_model_grad_marks(m, NULL, 0);
  ck_assert_uint_eq(nm, 4); /* one mark per dense layer, the last one 0 */
  size_t marks[4];
  kdp_model_grad_marks(m, marks, 4);
  ck_assert_uint_eq(marks[3], 0);
  float x[16 * 64], dz[16 * 10];
  rank_values(x, 16 * 64, peer.slice, 7);
  rank_values(dz, 16 * 10, peer.slice, 8);
  /* this rank's own gradients, every rank's, and their blocking allreduce */
  kdp_rng drop;
  kdp_rng_seed(&drop, 1, KDP_STREAM_DROPOUT);
  kdp_model_zero_grad(m);
  kdp_model_forward(m, x, 16, 1, &drop);
  kdp_model_backward(m, dz, NULL);
  float *parts = kdp_xmalloc((size_t)W * np * sizeof(float));
  float *blocking = kdp_xmalloc(np * sizeof(float));
  kdp_dist_cohort_allgather(&D, kdp_model_grads(m), parts, np);
  memcpy(blocking, kdp_model_grads(m), np * sizeof(float));
  kdp_dist_peer_allreduce(&peer, blocking, np);
  /* 1 KiB buckets: one per layer */
  kdp_buckets *b = kdp_buckets_for_model(&peer, m, 1, KDP_GRAD_SUM_ALLREDUCE);
  ck_assert_uint_eq(kdp_buckets_count(b), 4);
  kdp_model_zero_grad(m);
  kdp_model_forward(m, x, 16, 1, &drop);
  kdp_model_backward(m, dz, NULL);
  /* every bucket but the first layer's, which is complete only when the backward pass ends and
     goes in kdp_buckets_finish's blocking allreduce */
  ck_assert_uint_eq(kdp_buckets_started(b), kdp_buckets_count(b) - 1);
  kdp_buckets_finish(b);
  ck_assert_uint_eq(kdp_buckets_started(b), 0);
  kdp_buckets_free(b);
  size_t bad[2] = {0, 0};
  check_bucketed(kdp_model_grads(m), blocking, parts, np, W, bad);
  free(parts);
  free(blocking);
  kdp_model_free(m);
  kdp_dist_free(&peer);
  ck_assert_msg(bad[1] == 0, "%zu of %zu gradients beyond the summation bound", bad[1], np);
  if (W == 2) ck_assert_msg(bad[0] == 0, "%zu of %zu gradients differ", bad[0], np);
}
END_TEST

/* ordered[k] = ((parts[0][k] + parts[1][k]) + parts[2][k]) + ...: the shared window's order */
static void rank_order_sum(const float *parts, size_t n, int W, float *ordered) {
  for (size_t k = 0; k < n; k++) {
    float v = parts[k];
    for (int r = 1; r < W; r++) v += parts[(size_t)r * n + k];
    ordered[k] = v;
  }
}

/* The shared-window sum (run.grad_sum = shm): on every W, bitwise the rank-order sum
   ((x_0 + x_1) + x_2) + ... of the W ranks' vectors, hence on 2 ranks bitwise the blocking
   allreduce (a + b = b + a); every rank's arena holds the whole sum; again on the next step (the
   arenas are reused), for sizes not a multiple of the 16-float slice alignment and smaller than
   W slices. */
START_TEST(test_shm_sum) {
  kdp_dist peer;
  kdp_error err;
  int W = D.world_size;
  ck_assert_msg(kdp_dist_setup(&peer, W, &err) == 0, "%s", err.msg);
  static const size_t sizes[] = {1, 37, 1000, 70001, 535818};
  size_t bad[3] = {0, 0, 0}, checked = 0;
  for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
    size_t n = sizes[si];
    float *g = NULL;
    kdp_buckets *b = kdp_buckets_create_shm(&peer, n, &g);
    ck_assert_msg(b != NULL && g != NULL, "the %d ranks of this test share a node", W);
    ck_assert(kdp_buckets_is_shm(b));
    ck_assert_uint_eq(kdp_buckets_count(b), 0);
    ck_assert_uint_eq((uintptr_t)g % 64, 0);
    float *parts = kdp_xmalloc((size_t)W * n * sizeof *parts), *ordered = kdp_xmalloc(n * sizeof *ordered);
    float *blocking = kdp_xmalloc(n * sizeof *blocking);
    for (int step = 0; step < 2; step++) {
      for (int r = 0; r < W; r++) rank_values(parts + (size_t)r * n, n, r, (int)si + 10 * step);
      rank_order_sum(parts, n, W, ordered);
      rank_values(blocking, n, peer.slice, (int)si + 10 * step);
      kdp_dist_peer_allreduce(&peer, blocking, n);
      rank_values(g, n, peer.slice, (int)si + 10 * step);
      kdp_buckets_finish(b);
      check_bucketed(g, blocking, parts, n, W, bad);
      bad[2] += bitwise_mismatches(g, ordered, n);
      checked += n;
    }
    kdp_buckets_free(b);
    free(parts);
    free(ordered);
    free(blocking);
  }
  if (D.world_rank == 0)
    fprintf(stderr, "shared-window sum on %d ranks: %zu of %zu sums differ bitwise from the rank-order "
                    "sum, %zu from one blocking allreduce, %zu beyond the summation bound\n",
            W, bad[2], checked, bad[0], bad[1]);
  kdp_dist_free(&peer);
  ck_assert_msg(bad[2] == 0, "%zu of %zu sums differ from the rank-order sum", bad[2], checked);
  ck_assert_msg(bad[1] == 0, "%zu of %zu sums beyond the summation bound", bad[1], checked);
  if (W == 2)
    ck_assert_msg(bad[0] == 0, "%zu of %zu sums differ from the blocking allreduce", bad[0], checked);
}
END_TEST

/* run.grad_sum = auto on one node: the model's gradient arena moves into the window (no backward
   hook: no bucket starts), the backward pass writes there, finish sums it (bitwise the rank-order
   sum); kdp_buckets_free gives the model its own arena back, holding the sum. */
START_TEST(test_shm_model) {
  kdp_dist peer;
  int W = D.world_size;
  kdp_model *m = peer_model(&peer, 16);
  kdp_rng rng, drop;
  kdp_rng_seed(&rng, 5, KDP_STREAM_INIT);
  kdp_model_init(m, &rng);
  kdp_rng_seed(&drop, 1, KDP_STREAM_DROPOUT);
  size_t np = kdp_model_n_params(m);
  float x[16 * 64], dz[16 * 10];
  rank_values(x, 16 * 64, peer.slice, 7);
  rank_values(dz, 16 * 10, peer.slice, 8);
  float *own = kdp_model_grads(m);
  kdp_buckets *b = kdp_buckets_for_model(&peer, m, 1, KDP_GRAD_SUM_AUTO);
  ck_assert(kdp_buckets_is_shm(b));
  ck_assert_ptr_ne(kdp_model_grads(m), own);
  kdp_model_zero_grad(m);
  kdp_model_forward(m, x, 16, 1, &drop);
  kdp_model_backward(m, dz, NULL);
  ck_assert_uint_eq(kdp_buckets_started(b), 0);
  float *parts = kdp_xmalloc((size_t)W * np * sizeof(float)), *sum = kdp_xmalloc(np * sizeof(float));
  kdp_dist_cohort_allgather(&D, kdp_model_grads(m), parts, np);
  kdp_buckets_finish(b);
  memcpy(sum, kdp_model_grads(m), np * sizeof(float));
  kdp_buckets_free(b);
  ck_assert_ptr_eq(kdp_model_grads(m), own);
  rank_order_sum(parts, np, W, parts); /* (row 0 of parts is read before it is written) */
  size_t bad = bitwise_mismatches(own, sum, np) + bitwise_mismatches(own, parts, np);
  free(parts);
  free(sum);
  kdp_model_free(m);
  kdp_dist_free(&peer);
  ck_assert_msg(bad == 0, "%zu of %zu gradients differ from the rank-order sum", bad, np);
}
END_TEST

/* kdp_buckets_share_sgd + kdp_buckets_finish_sgd: each rank sums its slice of the window's
   arenas and takes that slice's SGD step into every rank's copy; bitwise the sum (on 2 ranks the
   blocking allreduce, else the rank-order sum) + kdp_sgd_step on the whole vector, for momentum
   with and without nesterov and plain SGD, over several steps (the momentum's first step and the
   later ones); the momentum whole after kdp_buckets_gather_sgd; kdp_buckets_free gives the model
   and optimizer their own arrays back, the momentum gathered. */
START_TEST(test_shm_sgd) {
  kdp_dist peer;
  int W = D.world_size;
  kdp_model *m = peer_model(&peer, 4);
  size_t np = kdp_model_n_params(m), bad = 0, checked = 0;
  static const struct { float mu, wd; int nesterov; } cfgs[] = {
      {0.9f, 5e-4f, 1}, {0.8f, 1e-4f, 0}, {0.0f, 5e-4f, 0}};
  float *ref_p = kdp_falloc(np), *sum = kdp_falloc(np), *parts = kdp_falloc((size_t)W * np);
  for (size_t ci = 0; ci < sizeof cfgs / sizeof *cfgs; ci++) {
    kdp_rng rng;
    kdp_rng_seed(&rng, 3 + ci, KDP_STREAM_INIT);
    kdp_model_init(m, &rng);
    kdp_sgd o, ref;
    kdp_sgd_init(&o, np, cfgs[ci].mu, cfgs[ci].wd, cfgs[ci].nesterov);
    kdp_sgd_init(&ref, np, cfgs[ci].mu, cfgs[ci].wd, cfgs[ci].nesterov);
    float *own_p = kdp_model_params(m), *own_buf = o.buf, *g = NULL;
    memcpy(ref_p, own_p, np * sizeof(float));
    kdp_buckets *b = kdp_buckets_create_shm(&peer, np, &g);
    ck_assert(b != NULL);
    kdp_buckets_share_sgd(b, m, &o);
    ck_assert(kdp_buckets_is_shm_sgd(b));
    ck_assert_ptr_ne(kdp_model_params(m), own_p);
    for (int step = 0; step < 3; step++) {
      float lr = 0.05f / (float)(step + 1);
      int salt = 20 + 3 * (int)ci + step;
      if (W == 2) {
        rank_values(sum, np, peer.slice, salt);
        kdp_dist_peer_allreduce(&peer, sum, np);
      } else {
        for (int r = 0; r < W; r++) rank_values(parts + (size_t)r * np, np, r, salt);
        rank_order_sum(parts, np, W, sum);
      }
      kdp_sgd_step(&ref, ref_p, sum, lr);
      rank_values(g, np, peer.slice, salt);
      kdp_buckets_finish_sgd(b, lr);
      bad += bitwise_mismatches(kdp_model_params(m), ref_p, np);
      /* the momentum: whole after a gather (or, after the last step, kdp_buckets_free's) */
      if (step < 2) kdp_buckets_gather_sgd(b);
      if (cfgs[ci].mu != 0.0f && step < 2) bad += bitwise_mismatches(o.buf, ref.buf, np);
      checked += np;
      ck_assert_int_eq(o.n_steps, ref.n_steps);
    }
    kdp_buckets_free(b);
    ck_assert_ptr_eq(kdp_model_params(m), own_p);
    ck_assert_ptr_eq(o.buf, own_buf);
    bad += bitwise_mismatches(own_p, ref_p, np);
    if (cfgs[ci].mu != 0.0f) bad += bitwise_mismatches(own_buf, ref.buf, np);
    kdp_sgd_free(&o);
    kdp_sgd_free(&ref);
  }
  free(ref_p);
  free(sum);
  free(parts);
  kdp_model_free(m);
  kdp_dist_free(&peer);
  ck_assert_msg(bad == 0, "%zu values of %zu steps x %zu parameters differ from the %s + SGD step",
                bad, checked / np, np, W == 2 ? "allreduce" : "rank-order sum");
}
END_TEST

int main(int argc, char **argv) {
  kdp_error err;
  if (kdp_dist_init_mpi(&argc, &argv, &err) != 0 || kdp_dist_setup(&D, 1, &err) != 0) {
    fprintf(stderr, "%s\n", err.msg);
    return 1;
  }
  Suite *s = suite_create("dist");
  TCase *tc = kdp_test_case("core");
  tcase_add_test(tc, test_methods_match_reference);
  tcase_add_test(tc, test_replicas_bitwise);
  tcase_add_test(tc, test_module_trajectory);
  tcase_add_test(tc, test_collectives);
  tcase_add_test(tc, test_agree_detects_difference);
  tcase_add_test(tc, test_buckets_sum);
  tcase_add_test(tc, test_buckets_model_hook);
  tcase_add_test(tc, test_shm_sum);
  tcase_add_test(tc, test_shm_model);
  tcase_add_test(tc, test_shm_sgd);
  suite_add_tcase(s, tc);
  SRunner *sr = srunner_create(s);
  srunner_set_fork_status(sr, CK_NOFORK); /* MPI cannot survive fork */
  srunner_run_all(sr, D.world_rank == 0 ? CK_NORMAL : CK_SILENT);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  /* a failure on any rank fails the run */
  int ok = kdp_dist_all_ok(&D, failed == 0);
  kdp_dist_free(&D);
  kdp_dist_finalize();
  return ok ? 0 : 1;
}
