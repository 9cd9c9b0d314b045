/* ffl: peer feature fusion (Kim et al., ICPR 2020). A fusion head, replicated on every rank,
   reads the peers' features (not detached): z_f = fc2(relu(bn(fc1(concat_j h_j)))). Peers:
   L_i = CE(z_i, y) + lam w T^2 KL(sg s_T(z_f) || s_T(z_i)); the fused head:
   L_f = CE(z_f, y) + lam w T^2 KL(sg s_T(mean_j z_j) || s_T(z_f)), which trains the head and
   reaches every peer's features. Its own weight decay (kd.fusion_weight_decay). Row-sharded:
   each rank runs the head on its row block of the batch. Sharded by peer columns too: fc1's
   columns of peer j meet only h_j, so each peer multiplies its own rows by its block of fc1
   (col_forward) and the row block's owner sums the P partials (blk->part): the head's per-rank
   work stays B d_f d_j as P grows, instead of (B/P) d_f sum_j d_j over a weight of P blocks.
   fc1's weight keeps its layout (d_f x sum_j d_j) on every rank, but a rank steps only its
   peer's block of it (kdp_cohort_module_ranges); the others are gathered where they are read
   (kdp_pipeline_module_sync: evaluation, /predict, checkpoints). */
#include <string.h>

#include "kd_internal.h"
#include "kdpeers/nn.h"

typedef struct ffl_state {
  kd_hidden fc1;
  size_t o_w2, o_b2;
  float *u, *du;   /* maxB x D */
  float *zf, *dzf; /* maxB x C: fused logits and their gradient */
  float *zm, *qm;  /* maxB x C: the peers' mean logits, its s_T */
} ffl_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  (void)err;
  if (s->fusion_dim == 0) {
    s->fusion_dim = c->D / s->P;
    if (s->fusion_dim < 1) s->fusion_dim = 1;
  }
  const size_t H = s->fusion_dim, B = c->maxB;
  ffl_state *st = kdp_cohort_alloc(c, sizeof *st);
  kd_hidden_setup(c, &st->fc1, "fusion.fc1", "fusion.bn", c->D, H, KDP_SPLIT_NONE);
  st->o_w2 = kdp_cohort_add_tensor(c, "fusion.fc2.weight", s->C, H, -1, KDP_SPLIT_NONE,
                                   KDP_SPLIT_NONE);
  st->o_b2 = kdp_cohort_add_tensor(c, "fusion.fc2.bias", s->C, 1, -1, KDP_SPLIT_NONE,
                                   KDP_SPLIT_NONE);
  kd_falloc_each(c, B * c->D, &st->u, &st->du, NULL);
  kd_falloc_each(c, B * s->C, &st->zf, &st->dzf, &st->zm, &st->qm, NULL);
  kdp_cohort_set_state(c, st);
  return 0;
}

static void init(kdp_cohort *c, kdp_rng *rng) {
  ffl_state *st = kdp_cohort_state(c);
  const size_t H = c->s.fusion_dim, C = c->s.C;
  kd_hidden_init(c, &st->fc1, rng);
  kd_fill_uniform(c->params + st->o_w2, C * H, H, rng);
  kd_fill_uniform(c->params + st->o_b2, C, H, rng);
}

static void forward(kdp_cohort *c, const kdp_kd_rows *blk, int train, const kdp_kd_reduce *red,
                    float *teacher) {
  ffl_state *st = kdp_cohort_state(c);
  const size_t n = blk->n, H = c->s.fusion_dim, C = c->s.C;
  if (blk->part) {
    kd_hidden_forward_parts(c, &st->fc1, blk->part, n, train, red);
  } else {
    if (n) kd_concat_features(c, st->u, blk->h, n);
    kd_hidden_forward(c, &st->fc1, st->u, n, train, red);
  }
  if (!n) return;
  kdp_dense_forward(st->zf, st->fc1.act, c->params + st->o_w2, c->params + st->o_b2, n, H, C);
  memcpy(teacher, st->zf, n * C * sizeof(float));
}

/* L_f on the block's rows: into the head and every peer's features */
static double backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                       const kdp_kd_reduce *red, float *dz, float *dh) {
  (void)dteacher;
  (void)dz;
  ffl_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, n = blk->n, H = c->s.fusion_dim, C = c->s.C;
  double L = 0.0;
  if (n) {
    memset(st->dzf, 0, n * C * sizeof(float));
    L = kdp_ce_loss(st->zf, blk->y, n, C, st->dzf, blk->scale, NULL);
    for (size_t k = 0; k < n * C; k++) {
      double acc = 0.0;
      for (size_t j = 0; j < P; j++) acc += blk->z[j * n * C + k];
      st->zm[k] = (float)(acc / (double)P);
    }
    kdp_softmax_t(st->qm, st->zm, n, C, blk->T); /* sg mean of the peers' logits */
    L += (double)blk->weight *
         kdp_kl_loss(st->zf, st->qm, n, C, blk->T, st->dzf, blk->scale * blk->weight);
    memset(st->fc1.dact, 0, n * H * sizeof(float));
    kdp_dense_backward(st->fc1.dact, c->grads + st->o_w2, c->grads + st->o_b2, st->dzf,
                       st->fc1.act, c->params + st->o_w2, n, H, C);
    if (!blk->part) memset(st->du, 0, n * c->D * sizeof(float));
  }
  if (blk->part) {
    kd_hidden_backward_parts(c, &st->fc1, n, blk->dpart, red);
  } else {
    kd_hidden_backward(c, &st->fc1, st->u, n, st->du, red);
    if (n) kd_split_features(c, dh, st->du, n);
  }
  return L * (double)blk->scale;
}

/* fc1 sharded by peer columns: z_f's first layer reads concat_j h_j, so peer j's block of its
   columns meets only h_j */
static size_t col_width(const kdp_cohort *c) { return c->s.fusion_dim; }

static void col_forward(kdp_cohort *c, size_t j, const float *h, size_t n, float *part) {
  ffl_state *st = kdp_cohort_state(c);
  kd_hidden_col_forward(c, &st->fc1, j, h, n, part);
}

static void col_backward(kdp_cohort *c, size_t j, const float *h, size_t n, const float *dpart,
                         float *dh) {
  ffl_state *st = kdp_cohort_state(c);
  kd_hidden_col_backward(c, &st->fc1, j, h, n, dpart, dh);
}

static unsigned grads(const kdp_cohort *c) {
  (void)c;
  return KDP_GRAD_FEATURES;
}

const kdp_method_ops kdp_ffl_ops = {
    .name = "ffl", .teacher = "fused", .min_peers = 2, .module_decay = KDP_DECAY_MODULE,
    .module_reads = KDP_READS_LOGITS | KDP_READS_FEATURES,
    .setup = setup, .init = init, .grads = grads, .forward = forward,
    .peer_loss = kd_sg_teacher_loss, .backward = backward, .col_width = col_width,
    .col_forward = col_forward, .col_backward = col_backward};

