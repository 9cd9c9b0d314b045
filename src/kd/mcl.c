/* mcl: mutual contrastive learning (Yang et al., AAAI 2022), the supervised form of winycg/MCL.
   Every peer owns an embedding head, v_i = l2normalize(fc2(relu(fc1(h_i)))) (kdp_embed_head_*: its
   parameters are the peer's, not replicated). With S_ab = v_a v_b^T / tau (B x B):
   L_i = CE(z_i, y) + lam_c [SC(S_ii) + (1/(P-1)) sum_{j != i} (SC(S_ij) + T^2 KL_rows(sg S_ji || S_ij)
   + T^2 KL_rows(sg S_jj || S_ii))] + dml's term. The contrastive terms couple all rows of the
   batch, so the peer term runs on the whole batch's embeddings (allgathered) and returns
   dL_i/dv_j for every peer j: the trainer sums them over the cohort with one reduce-scatter. */
#include <cblas.h>
#ifdef I
#undef I
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_internal.h"
#include "kdpeers/nn.h"

/* ---------------------------------------------------------------- the embedding head */

struct kdp_embed_head {
  size_t d, H, E, maxn;
  float *a1, *act, *u, *du, *dact; /* maxn x H, maxn x H, maxn x E, maxn x E, maxn x H */
  float *inv;                      /* maxn: 1 / ||u|| */
};

int kdp_embed_head_create(kdp_embed_head **out, size_t d, size_t hidden, size_t E, size_t max_n,
                          kdp_error *err) {
  *out = NULL;
  if (!d || !hidden || !E || !max_n)
    return kdp_fail(err, KDP_EINVAL, "kdp_embed_head_create: d %zu, hidden %zu, E %zu and max_n "
                    "%zu must all be >= 1", d, hidden, E, max_n);
  kdp_embed_head *h = kdp_xcalloc(1, sizeof *h);
  h->d = d;
  h->H = hidden;
  h->E = E;
  h->maxn = max_n;
  h->a1 = kdp_falloc(max_n * hidden);
  h->act = kdp_falloc(max_n * hidden);
  h->dact = kdp_falloc(max_n * hidden);
  h->u = kdp_falloc(max_n * E);
  h->du = kdp_falloc(max_n * E);
  h->inv = kdp_falloc(max_n);
  *out = h;
  return 0;
}

void kdp_embed_head_free(kdp_embed_head *h) {
  if (!h) return;
  free(h->a1);
  free(h->act);
  free(h->dact);
  free(h->u);
  free(h->du);
  free(h->inv);
  free(h);
}

size_t kdp_embed_head_n_params(const kdp_embed_head *h) {
  return h->H * h->d + h->H + h->E * h->H + h->E;
}

void kdp_embed_head_init(const kdp_embed_head *h, float *params, kdp_rng *rng) {
  float *w1 = params, *b1 = w1 + h->H * h->d, *w2 = b1 + h->H, *b2 = w2 + h->E * h->H;
  kd_fill_uniform(w1, h->H * h->d, h->d, rng);
  kd_fill_uniform(b1, h->H, h->d, rng);
  kd_fill_uniform(w2, h->E * h->H, h->H, rng);
  kd_fill_uniform(b2, h->E, h->H, rng);
}

void kdp_embed_head_forward(kdp_embed_head *h, const float *params, const float *x, size_t n,
                            float *v) {
  const size_t H = h->H, E = h->E;
  const float *w1 = params, *b1 = w1 + H * h->d, *w2 = b1 + H, *b2 = w2 + E * H;
  if (!n) return;
  kdp_dense_forward(h->a1, x, w1, b1, n, h->d, H);
  kdp_relu_forward(h->act, h->a1, n * H);
  kdp_dense_forward(h->u, h->act, w2, b2, n, H, E);
  for (size_t r = 0; r < n; r++) {
    const float *ur = h->u + r * E;
    double ss = 0.0;
    for (size_t k = 0; k < E; k++) ss += (double)ur[k] * ur[k];
    double nrm = sqrt(ss);
    h->inv[r] = (float)(1.0 / (nrm > 1e-12 ? nrm : 1e-12));
    for (size_t k = 0; k < E; k++) v[r * E + k] = ur[k] * h->inv[r];
  }
}

void kdp_embed_head_backward(kdp_embed_head *h, const float *params, const float *x, size_t n,
                             const float *dv, float *dparams, float *dx) {
  const size_t H = h->H, E = h->E;
  const float *w1 = params, *w2 = w1 + H * h->d + H;
  float *dw1 = dparams, *db1 = dw1 + H * h->d, *dw2 = db1 + H, *db2 = dw2 + E * H;
  if (!n) return;
  /* v = u / |u|: du = (dv - v <v, dv>) / |u| */
  for (size_t r = 0; r < n; r++) {
    const float *dr = dv + r * E, *ur = h->u + r * E;
    const double inv = h->inv[r];
    double dot = 0.0;
    for (size_t k = 0; k < E; k++) dot += (double)ur[k] * inv * dr[k];
    for (size_t k = 0; k < E; k++) h->du[r * E + k] = (float)((dr[k] - ur[k] * inv * dot) * inv);
  }
  memset(h->dact, 0, n * H * sizeof(float));
  kdp_dense_backward(h->dact, dw2, db2, h->du, h->act, w2, n, H, E);
  /* relu: the gradient passes where the activation is positive (a1 reused as da1) */
  memset(h->a1, 0, n * H * sizeof(float));
  kdp_relu_backward(h->a1, h->dact, h->act, n * H);
  kdp_dense_backward(dx, dw1, db1, h->a1, x, w1, n, h->d, H);
}

/* ---------------------------------------------------------------- the contrastive terms */

typedef struct mcl_state {
  float *Sii, *Sij, *Sji, *Sjj; /* maxB x maxB */
  float *dSii, *dSij;           /* maxB x maxB */
  float *g;                     /* maxB x C: the peer term's dz */
} mcl_state;

static int setup(kdp_cohort *c, kdp_kd_spec *s, kdp_error *err) {
  if (s->embed_dim == 0) s->embed_dim = 128;
  if (s->embed_hidden == 0) s->embed_hidden = 128;
  if (s->tau == 0.0f) s->tau = 0.07f;
  if (!(s->tau > 0.0f) || !isfinite(s->tau))
    return kdp_fail(err, KDP_EINVAL, "kd.tau = %g: expected a finite temperature > 0",
                    (double)s->tau);
  if (!(s->contrast_weight >= 0.0f) || !isfinite(s->contrast_weight))
    return kdp_fail(err, KDP_EINVAL, "kd.contrast_weight = %g: expected a finite value >= 0",
                    (double)s->contrast_weight);
  mcl_state *st = kdp_cohort_alloc(c, sizeof *st);
  const size_t BB = c->maxB * c->maxB;
  float **m[] = {&st->Sii, &st->Sij, &st->Sji, &st->Sjj, &st->dSii, &st->dSij};
  for (size_t k = 0; k < sizeof m / sizeof m[0]; k++) *m[k] = kdp_cohort_falloc(c, BB);
  st->g = kdp_cohort_falloc(c, c->maxB * s->C);
  kdp_cohort_set_state(c, st);
  return 0;
}

/* S (n x n) = a b^T / tau, a and b (n x E) */
static void sim(float *S, const float *a, const float *b, size_t n, size_t E, float tau) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)n, (int)E, 1.0f / tau, a,
              (int)E, b, (int)E, 0.0f, S, (int)n);
}

/* da += dS b / tau * s and db += dS^T a / tau * s (the gradients of S = a b^T / tau) */
static void sim_backward(const float *dS, const float *a, const float *b, float *da, float *db,
                         size_t n, size_t E, float alpha) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)E, (int)n, alpha, dS, (int)n,
              b, (int)E, 1.0f, da, (int)E);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)n, (int)E, (int)n, alpha, dS, (int)n,
              a, (int)E, 1.0f, db, (int)E);
}

/* SC(S) = -mean over anchors n with a positive of mean_{m in pos(n)} (S_nm - log sum_{m' != n}
   exp S_nm'), pos(n) = {m != n : y_m = y_n}; dS (n x n) += coef * dSC/dS. Double per row. */
static double sup_contrast(const float *S, const int32_t *y, size_t n, float *dS, double coef) {
  size_t valid = 0;
  for (size_t r = 0; r < n; r++)
    for (size_t m = 0; m < n; m++)
      if (m != r && y[m] == y[r]) {
        valid++;
        break;
      }
  if (!valid) return 0.0;
  double total = 0.0;
  for (size_t r = 0; r < n; r++) {
    const float *Sr = S + r * n;
    size_t npos = 0;
    double mx = -INFINITY, pos = 0.0;
    for (size_t m = 0; m < n; m++) {
      if (m == r) continue;
      if (Sr[m] > mx) mx = Sr[m];
      if (y[m] == y[r]) {
        npos++;
        pos += Sr[m];
      }
    }
    if (!npos) continue;
    double se = 0.0;
    for (size_t m = 0; m < n; m++)
      if (m != r) se += exp((double)Sr[m] - mx);
    double lse = mx + log(se);
    total += -(pos / (double)npos - lse);
    const double g = coef / (double)valid;
    for (size_t m = 0; m < n; m++) {
      if (m == r) continue;
      double d = exp((double)Sr[m] - lse) - (y[m] == y[r] ? 1.0 / (double)npos : 0.0);
      dS[r * n + m] += (float)(g * d);
    }
  }
  return total / (double)valid;
}

static void transpose(float *dst, const float *src, size_t n) {
  for (size_t r = 0; r < n; r++)
    for (size_t m = 0; m < n; m++) dst[m * n + r] = src[r * n + m];
}

static void peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                      float *dteacher, kdp_kd_losses *out) {
  (void)dteacher;
  mcl_state *st = kdp_cohort_state(c);
  const size_t P = c->s.P, n = in->n, C = c->s.C, E = c->s.embed_dim, nn = n * n;
  const float tau = c->s.tau, lc = c->s.contrast_weight, T = in->T;
  const float *vi = in->v_all + i * n * E;
  float *dvi = in->dv_all + i * n * E;
  /* CE and dml's term (ramped) */
  memset(st->g, 0, n * C * sizeof(float));
  out->ce = kdp_ce_loss(in->z, in->y, n, C, st->g, 1.0f, &out->n_correct);
  double kd = kd_mean_kl_others(in->z_all, in->z, i, P, n, C, T, in->weight, st->g);
  kd_peer_done(dz, st->g, C, in, in->weight, kd, out);
  /* the contrastive bracket (not ramped) */
  const double q = P > 1 ? 1.0 / (double)(P - 1) : 0.0;
  const float cq = (float)(lc * q);
  memset(st->dSii, 0, nn * sizeof(float));
  sim(st->Sii, vi, vi, n, E, tau);
  double con = sup_contrast(st->Sii, in->y, n, st->dSii, lc);
  for (size_t j = 0; j < P; j++) {
    if (j == i) continue;
    const float *vj = in->v_all + j * n * E;
    memset(st->dSij, 0, nn * sizeof(float));
    sim(st->Sij, vi, vj, n, E, tau);
    transpose(st->Sji, st->Sij, n);
    sim(st->Sjj, vj, vj, n, E, tau);
    double t = sup_contrast(st->Sij, in->y, n, st->dSij, cq);
    t += kdp_kl_logits(st->Sji, st->Sij, n, n, T, NULL, st->dSij, cq);
    t += kdp_kl_logits(st->Sjj, st->Sii, n, n, T, NULL, st->dSii, cq);
    con += q * t;
    sim_backward(st->dSij, vi, vj, dvi, in->dv_all + j * n * E, n, E, in->scale / tau);
  }
  sim_backward(st->dSii, vi, vi, dvi, dvi, n, E, in->scale / tau);
  out->contrast = con;
  out->loss += (double)lc * con;
}

static unsigned grads(const kdp_cohort *c) {
  (void)c;
  return KDP_GRAD_EMBEDDINGS;
}

const kdp_method_ops kdp_mcl_ops = {
    .name = "mcl", .min_peers = 2, .peer_reads = KDP_READS_LOGITS | KDP_READS_EMBEDDINGS,
    .setup = setup, .grads = grads, .peer_loss = peer_loss};
