/* okddip: online distillation with diverse peers (Chen et al., AAAI 2020). P-1 auxiliary peers
   and a leader (kd.leader, default the last). Each auxiliary peer j projects its features,
   q_j = h_j W_L^j and k_j = h_j W_E^j (rank r); a_ij = softmax_j(q_i . k_j) over the auxiliary
   peers; peer i's teacher t_i = sum_j a_ij z_j. Auxiliary peers: L_i = CE(z_i, y) +
   lam w T^2 KL(s_T(t_i) || s_T(z_i)); the leader: L_L = CE(z_L, y) + lam w T^2
   KL(s_T(mean_aux z_j) || s_T(z_L)). Nothing is detached (unless kd.detach): the teachers'
   gradients go back through the attention into every auxiliary peer's logits and features, the
   only way the attention is trained. Row-sharded: each rank computes the attention of its row
   block, sends every peer its teacher's rows and gets their gradients back. */
#include <math.h>
#include <string.h>

#include "kd_internal.h"
#include "kdpeers/nn.h"

typedef struct okddip_state {
  size_t m, r;                        /* auxiliary peers, projection rank */
  size_t aux[KDP_KD_MAX_PEERS];       /* auxiliary peers in cohort order */
  int auxpos[KDP_KD_MAX_PEERS];       /* position in aux, -1 for the leader */
  size_t o_wq[KDP_KD_MAX_PEERS], o_wk[KDP_KD_MAX_PEERS];
  float *qv, *kv, *dqv, *dkv;         /* m x maxB x r */
  float *att;                         /* maxB x m x m: att[b][i][j] = a_ij */
  float *g, *dt;                      /* maxB x C: the peer term's gradient scratch */
} okddip_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  if (s->leader < 0) s->leader = (int)s->P - 1;
  if ((size_t)s->leader >= s->P)
    return kdp_fail(err, KDP_EINVAL,
                    "kd.leader = %d is not a cohort rank; expected -1 (last) or 0..%zu", s->leader,
                    s->P - 1);
  okddip_state *st = kdp_cohort_alloc(c, sizeof *st);
  size_t dmin = 0;
  for (size_t j = 0; j < s->P; j++) {
    if ((int)j == s->leader) {
      st->auxpos[j] = -1;
      continue;
    }
    st->auxpos[j] = (int)st->m;
    st->aux[st->m++] = j;
    if (dmin == 0 || s->dims[j] < dmin) dmin = s->dims[j];
  }
  if (s->proj_dim == 0) {
    s->proj_dim = dmin / 8;
    if (s->proj_dim < 1) s->proj_dim = 1;
  }
  st->r = s->proj_dim;
  char name[48];
  for (size_t a = 0; a < st->m; a++) {
    size_t j = st->aux[a];
    snprintf(name, sizeof name, "att.%zu.query.weight", j);
    st->o_wq[a] = kdp_cohort_add_tensor(c, name, st->r, s->dims[j], (int)j, KDP_SPLIT_NONE,
                                        KDP_SPLIT_NONE);
    snprintf(name, sizeof name, "att.%zu.key.weight", j);
    st->o_wk[a] = kdp_cohort_add_tensor(c, name, st->r, s->dims[j], (int)j, KDP_SPLIT_NONE,
                                        KDP_SPLIT_NONE);
  }
  const size_t B = c->maxB, nq = (st->m ? st->m : 1) * B * st->r;
  kd_falloc_each(c, nq, &st->qv, &st->kv, &st->dqv, &st->dkv, NULL);
  st->att = kdp_cohort_falloc(c, B * (st->m * st->m + 1));
  kd_falloc_each(c, B * s->C, &st->g, &st->dt, NULL);
  kdp_cohort_set_state(c, st);
  return 0;
}

static void init(kdp_cohort *c, kdp_rng *rng) {
  okddip_state *st = kdp_cohort_state(c);
  for (size_t a = 0; a < st->m; a++) {
    size_t d = c->s.dims[st->aux[a]];
    kd_fill_uniform(c->params + st->o_wq[a], st->r * d, d, rng);
    kd_fill_uniform(c->params + st->o_wk[a], st->r * d, d, rng);
  }
}

static unsigned grads(const kdp_cohort *c) {
  return c->s.detach ? 0u : KDP_GRAD_TEACHER | KDP_GRAD_FEATURES | KDP_GRAD_LOGITS;
}

/* every peer's teacher (P x n x C) on the block's rows: t_i for the auxiliary peers, the mean
   of the auxiliary peers' logits for the leader */
static void forward(kdp_cohort *c, const kdp_kd_rows *blk, int train, const kdp_kd_reduce *red,
                    float *teacher) {
  (void)train;
  (void)red;
  okddip_state *st = kdp_cohort_state(c);
  const size_t m = st->m, r = st->r, C = c->s.C, n = blk->n;
  for (size_t a = 0; a < m; a++) {
    size_t j = st->aux[a], d = c->s.dims[j];
    const float *hj = blk->h + n * c->hoff[j];
    if (!n) break;
    kdp_dense_forward(st->qv + a * n * r, hj, c->params + st->o_wq[a], NULL, n, d, r);
    kdp_dense_forward(st->kv + a * n * r, hj, c->params + st->o_wk[a], NULL, n, d, r);
  }
  float *tl = teacher + (size_t)c->s.leader * n * C;
  for (size_t b = 0; b < n; b++) {
    const float *z[KDP_KD_MAX_PEERS];
    for (size_t aj = 0; aj < m; aj++) z[aj] = blk->z + (st->aux[aj] * n + b) * C;
    for (size_t ai = 0; ai < m; ai++) {
      const float *qi = st->qv + (ai * n + b) * r;
      double e[KDP_KD_MAX_PEERS];
      for (size_t aj = 0; aj < m; aj++) {
        const float *kj = st->kv + (aj * n + b) * r;
        double acc = 0.0;
        for (size_t k = 0; k < r; k++) acc += (double)qi[k] * kj[k];
        e[aj] = acc;
      }
      kd_softmax_mix(e, m, z, C, st->att + (b * m + ai) * m, teacher + (st->aux[ai] * n + b) * C);
    }
    for (size_t k = 0; k < C; k++) {
      double acc = 0.0;
      for (size_t aj = 0; aj < m; aj++) acc += blk->z[(st->aux[aj] * n + b) * C + k];
      tl[b * C + k] = (float)(m ? acc / (double)m : 0.0);
    }
  }
}

/* L_i against its teacher, with the teacher's gradient unless detached */
static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  okddip_state *st = kdp_cohort_state(c);
  const size_t n = in->n, C = c->s.C;
  const int det = c->s.detach;
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, st->g, 1.0f, &out->n_correct);
  double kd = 0.0;
  if (st->m > 0 || (int)i != c->s.leader) {
    memset(st->dt, 0, n * C * sizeof(float));
    kd = kdp_kl_logits(in->teacher, in->z, n, C, in->T, det ? NULL : st->dt, st->g, in->weight);
    if (!det) kd_add_scaled(dteacher, st->dt, n * C, in->scale);
  }
  kd_peer_done(dz, st->g, C, in, in->weight, kd, out);
}

/* t_ai = sum_j a_ij z_j (a_ij = softmax_j(q_i . k_j)) backwards from dt (n x C) */
static void attention_backward(okddip_state *st, size_t ai, const float *z, const float *dt,
                               size_t n, size_t C, float *dz) {
  const size_t m = st->m, r = st->r;
  for (size_t b = 0; b < n; b++) {
    const float *att = st->att + (b * m + ai) * m;
    const float *zr[KDP_KD_MAX_PEERS];
    float *dzr[KDP_KD_MAX_PEERS], de[KDP_KD_MAX_PEERS];
    for (size_t aj = 0; aj < m; aj++) {
      zr[aj] = z + (st->aux[aj] * n + b) * C;
      dzr[aj] = dz + (st->aux[aj] * n + b) * C;
    }
    kd_softmax_mix_backward(att, m, zr, dzr, dt + b * C, C, de);
    const float *qi = st->qv + (ai * n + b) * r;
    float *dqi = st->dqv + (ai * n + b) * r;
    for (size_t aj = 0; aj < m; aj++) {
      const float *kj = st->kv + (aj * n + b) * r;
      float *dkj = st->dkv + (aj * n + b) * r;
      for (size_t k = 0; k < r; k++) {
        dqi[k] += de[aj] * kj[k];
        dkj[k] += de[aj] * qi[k];
      }
    }
  }
}

/* the teachers' gradients on the block's rows: into the auxiliary peers' logits, the
   projections and the auxiliary peers' features */
static double backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                       const kdp_kd_reduce *red, float *dz, float *dh) {
  (void)red;
  okddip_state *st = kdp_cohort_state(c);
  const size_t m = st->m, r = st->r, C = c->s.C, n = blk->n;
  if (c->s.detach || !n || !m) return 0.0;
  memset(st->dqv, 0, m * n * r * sizeof(float));
  memset(st->dkv, 0, m * n * r * sizeof(float));
  const float *dtl = dteacher + (size_t)c->s.leader * n * C;
  for (size_t aj = 0; aj < m; aj++) {
    float *dzj = dz + st->aux[aj] * n * C;
    for (size_t k = 0; k < n * C; k++) dzj[k] += dtl[k] / (float)m;
  }
  for (size_t ai = 0; ai < m; ai++)
    attention_backward(st, ai, blk->z, dteacher + st->aux[ai] * n * C, n, C, dz);
  for (size_t a = 0; a < m; a++) {
    size_t j = st->aux[a], d = c->s.dims[j];
    const float *hj = blk->h + n * c->hoff[j];
    float *dhj = dh + n * c->hoff[j];
    kdp_dense_backward(dhj, c->grads + st->o_wq[a], NULL, st->dqv + a * n * r, hj,
                       c->params + st->o_wq[a], n, d, r);
    kdp_dense_backward(dhj, c->grads + st->o_wk[a], NULL, st->dkv + a * n * r, hj,
                       c->params + st->o_wk[a], n, d, r);
  }
  return 0.0;
}

/* the leader's logits */
static void teacher_eval(kdp_cohort *c, const kdp_kd_rows *blk, float *out) {
  memcpy(out, blk->z + (size_t)c->s.leader * blk->n * c->s.C, blk->n * c->s.C * sizeof(float));
}

const kdp_method_ops kdp_okddip_ops = {
    .name = "okddip", .teacher = "leader", .min_peers = 3, .module_decay = KDP_DECAY_PEERS,
    .module_reads = KDP_READS_LOGITS | KDP_READS_FEATURES, .teacher_per_peer = 1,
    .setup = setup, .init = init, .grads = grads, .forward = forward, .peer_loss = peer_loss,
    .backward = backward, .teacher_eval = teacher_eval};

