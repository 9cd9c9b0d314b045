/* methods.c: the cohort API: every online-distillation method's losses and gradients for one rank. */
#include "kdpeers/kd.h"
#include "kdpeers/nn.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BN_MOMENTUM 0.1f
#define BN_EPS 1e-5f
/* rows with at most this many classes keep their exponentials on the stack */
#define ROW_CACHE 256

static const char *const method_names[KDP_METHOD_COUNT] = {
    "independent", "dml", "codistill", "avg", "one", "ffl", "okddip"};

int kdp_method_parse(const char *name, kdp_method *out, kdp_error *err) {
  for (int k = 0; k < KDP_METHOD_COUNT; k++)
    if (name && strcmp(name, method_names[k]) == 0) {
      *out = (kdp_method)k;
      return 0;
    }
  return kdp_fail(err, KDP_EINVAL,
                  "kd.method: unknown method '%s'; expected one of independent, dml, codistill, "
                  "avg, one, ffl, okddip",
                  name ? name : "(null)");
}

const char *kdp_method_name(kdp_method m) {
  return ((int)m >= 0 && m < KDP_METHOD_COUNT) ? method_names[m] : "unknown";
}

int kdp_method_uses_features(kdp_method m) {
  return m == KDP_METHOD_ONE || m == KDP_METHOD_FFL || m == KDP_METHOD_OKDDIP;
}

typedef struct tensor_view {
  char name[48];
  size_t off, size;
} tensor_view;

struct kdp_cohort {
  kdp_kd_spec s;
  size_t maxB, D, H; /* D = sum d_j; H = hidden width of gate (P) or fusion (d_f) */
  size_t m, r;       /* okddip: number of aux peers, projection rank */
  size_t aux[KDP_KD_MAX_PEERS]; /* okddip: aux peer indices in cohort order */
  int auxpos[KDP_KD_MAX_PEERS]; /* position in aux[] or -1 (leader) */
  size_t hoff[KDP_KD_MAX_PEERS + 1]; /* prefix sums of d_j */

  size_t n_params, n_buffers, n_tensors;
  float *params, *grads, *buffers;
  tensor_view *tensors;
  /* one/ffl views (offsets into params) */
  size_t o_w1, o_b1, o_gamma, o_beta, o_w2, o_b2;
  /* okddip views: query/key weights of aux position a */
  size_t o_wq[KDP_KD_MAX_PEERS], o_wk[KDP_KD_MAX_PEERS];

  /* scratch */
  float *probs;              /* P x B x C: s_T(z_j) */
  float *q;                  /* B x C: a teacher distribution */
  float *u, *du;             /* B x D */
  float *a1, *xhat, *bno, *act, *invstd, *dact, *dbno, *da1; /* B x H (invstd H) */
  float *g, *dg;             /* B x P gate weights */
  float *zt, *dzt;           /* B x C: z_e or z_f */
  float *qv, *kv, *dqv, *dkv; /* m x B x r */
  float *att;                /* B x m x m: att[b][i][j] = a_ij */
  float *tt;                 /* m x B x C: t_i */
  float *dt;                 /* B x C */
  float *tl, *dtl;           /* B x C: leader teacher logits */
  float *zm;                 /* B x C: mean logits */
};

/* ---------------------------------------------------------------- creation */

static void add_tensor(kdp_cohort *c, const char *name, size_t size) {
  tensor_view *t = &c->tensors[c->n_tensors++];
  snprintf(t->name, sizeof t->name, "%s", name);
  t->off = c->n_params;
  t->size = size;
  c->n_params += size;
}

int kdp_cohort_create(kdp_cohort **out, const kdp_kd_spec *spec, size_t max_batch,
                      kdp_error *err) {
  *out = NULL;
  if (!spec) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: spec is NULL");
  kdp_kd_spec s = *spec;
  if ((int)s.method < 0 || s.method >= KDP_METHOD_COUNT)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: method %d is not a kdp_method",
                    (int)s.method);
  if (s.P < 1 || s.P > KDP_KD_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: %zu peers; expected 1..%d", s.P,
                    KDP_KD_MAX_PEERS);
  if (s.C < 1) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: C must be >= 1");
  if (max_batch < 1) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: max_batch must be >= 1");
  int feats = kdp_method_uses_features(s.method);
  if (feats)
    for (size_t j = 0; j < s.P; j++)
      if (s.dims[j] < 1)
        return kdp_fail(err, KDP_EINVAL,
                        "kdp_cohort_create: method %s reads features but peer %zu has feature "
                        "dim 0; set spec.dims[%zu]",
                        kdp_method_name(s.method), j, j);
  if (s.method == KDP_METHOD_OKDDIP) {
    if (s.leader < 0) s.leader = (int)s.P - 1;
    if ((size_t)s.leader >= s.P)
      return kdp_fail(err, KDP_EINVAL,
                      "kd.leader = %d is not a cohort rank; expected -1 (last) or 0..%zu",
                      spec->leader, s.P - 1);
  }

  kdp_cohort *c = kdp_xcalloc(1, sizeof *c);
  c->maxB = max_batch;
  c->hoff[0] = 0;
  for (size_t j = 0; j < s.P; j++) c->hoff[j + 1] = c->hoff[j] + (feats ? s.dims[j] : 0);
  c->D = c->hoff[s.P];
  c->tensors = kdp_xcalloc(2 * s.P + 8, sizeof *c->tensors);
  const size_t B = max_batch, C = s.C, P = s.P;
  char name[48];

  if (s.method == KDP_METHOD_ONE) {
    c->H = P;
    c->o_w1 = c->n_params; add_tensor(c, "gate.weight", P * c->D);
    c->o_b1 = c->n_params; add_tensor(c, "gate.bias", P);
    c->o_gamma = c->n_params; add_tensor(c, "gate_bn.weight", P);
    c->o_beta = c->n_params; add_tensor(c, "gate_bn.bias", P);
    c->n_buffers = 2 * P;
  } else if (s.method == KDP_METHOD_FFL) {
    if (s.fusion_dim == 0) {
      s.fusion_dim = c->D / P;
      if (s.fusion_dim < 1) s.fusion_dim = 1;
    }
    size_t H = c->H = s.fusion_dim;
    c->o_w1 = c->n_params; add_tensor(c, "fusion.fc1.weight", H * c->D);
    c->o_b1 = c->n_params; add_tensor(c, "fusion.fc1.bias", H);
    c->o_gamma = c->n_params; add_tensor(c, "fusion.bn.weight", H);
    c->o_beta = c->n_params; add_tensor(c, "fusion.bn.bias", H);
    c->o_w2 = c->n_params; add_tensor(c, "fusion.fc2.weight", C * H);
    c->o_b2 = c->n_params; add_tensor(c, "fusion.fc2.bias", C);
    c->n_buffers = 2 * H;
  } else if (s.method == KDP_METHOD_OKDDIP) {
    size_t dmin = 0;
    for (size_t j = 0; j < P; j++) {
      if ((int)j == s.leader) {
        c->auxpos[j] = -1;
        continue;
      }
      c->auxpos[j] = (int)c->m;
      c->aux[c->m++] = j;
      if (dmin == 0 || s.dims[j] < dmin) dmin = s.dims[j];
    }
    if (s.proj_dim == 0) {
      s.proj_dim = dmin / 8;
      if (s.proj_dim < 1) s.proj_dim = 1;
    }
    c->r = s.proj_dim;
    for (size_t a = 0; a < c->m; a++) {
      size_t j = c->aux[a];
      snprintf(name, sizeof name, "att.%zu.query.weight", j);
      c->o_wq[a] = c->n_params; add_tensor(c, name, c->r * s.dims[j]);
      snprintf(name, sizeof name, "att.%zu.key.weight", j);
      c->o_wk[a] = c->n_params; add_tensor(c, name, c->r * s.dims[j]);
    }
  }
  c->s = s;
  c->params = kdp_falloc(c->n_params);
  c->grads = kdp_falloc(c->n_params);
  c->buffers = kdp_falloc(c->n_buffers);
  for (size_t k = 0; k < c->n_buffers / 2; k++) c->buffers[c->n_buffers / 2 + k] = 1.0f;

  c->probs = kdp_falloc(P * B * C);
  c->q = kdp_falloc(B * C);
  c->zt = kdp_falloc(B * C);
  c->dzt = kdp_falloc(B * C);
  c->zm = kdp_falloc(B * C);
  if (c->H) {
    size_t n = B * c->H;
    c->u = kdp_falloc(B * c->D);
    c->du = kdp_falloc(B * c->D);
    c->a1 = kdp_falloc(n); c->xhat = kdp_falloc(n); c->bno = kdp_falloc(n);
    c->act = kdp_falloc(n); c->dact = kdp_falloc(n); c->dbno = kdp_falloc(n);
    c->da1 = kdp_falloc(n);
    c->invstd = kdp_falloc(c->H);
    c->g = kdp_falloc(B * P);
    c->dg = kdp_falloc(B * P);
  }
  if (s.method == KDP_METHOD_OKDDIP) {
    size_t n = (c->m ? c->m : 1) * B * c->r;
    c->qv = kdp_falloc(n); c->kv = kdp_falloc(n);
    c->dqv = kdp_falloc(n); c->dkv = kdp_falloc(n);
    c->att = kdp_falloc(B * (c->m * c->m + 1));
    c->tt = kdp_falloc((c->m ? c->m : 1) * B * C);
    c->dt = kdp_falloc(B * C);
    c->tl = kdp_falloc(B * C);
    c->dtl = kdp_falloc(B * C);
  }
  *out = c;
  return 0;
}

void kdp_cohort_free(kdp_cohort *c) {
  if (!c) return;
  float *bufs[] = {c->params, c->grads, c->buffers, c->probs, c->q, c->zt, c->dzt, c->zm,
                   c->u, c->du, c->a1, c->xhat, c->bno, c->act, c->dact, c->dbno, c->da1,
                   c->invstd, c->g, c->dg, c->qv, c->kv, c->dqv, c->dkv, c->att, c->tt,
                   c->dt, c->tl, c->dtl};
  for (size_t k = 0; k < sizeof bufs / sizeof bufs[0]; k++) free(bufs[k]);
  free(c->tensors);
  free(c);
}

const kdp_kd_spec *kdp_cohort_spec(const kdp_cohort *c) { return &c->s; }

static void fill_uniform(float *p, size_t n, size_t fan_in, kdp_rng *rng) {
  float bound = 1.0f / sqrtf((float)(fan_in ? fan_in : 1));
  for (size_t k = 0; k < n; k++) p[k] = (2.0f * kdp_rng_uniform(rng) - 1.0f) * bound;
}

void kdp_cohort_module_init(kdp_cohort *c, kdp_rng *rng) {
  const size_t C = c->s.C, H = c->H;
  if (c->s.method == KDP_METHOD_ONE || c->s.method == KDP_METHOD_FFL) {
    fill_uniform(c->params + c->o_w1, H * c->D, c->D, rng);
    fill_uniform(c->params + c->o_b1, H, c->D, rng);
    for (size_t k = 0; k < H; k++) {
      c->params[c->o_gamma + k] = 1.0f;
      c->params[c->o_beta + k] = 0.0f;
      c->buffers[k] = 0.0f;
      c->buffers[H + k] = 1.0f;
    }
    if (c->s.method == KDP_METHOD_FFL) {
      fill_uniform(c->params + c->o_w2, C * H, H, rng);
      fill_uniform(c->params + c->o_b2, C, H, rng);
    }
  } else if (c->s.method == KDP_METHOD_OKDDIP) {
    for (size_t a = 0; a < c->m; a++) {
      size_t d = c->s.dims[c->aux[a]];
      fill_uniform(c->params + c->o_wq[a], c->r * d, d, rng);
      fill_uniform(c->params + c->o_wk[a], c->r * d, d, rng);
    }
  }
}

size_t kdp_cohort_module_n_params(const kdp_cohort *c) { return c->n_params; }
float *kdp_cohort_module_params(kdp_cohort *c) { return c->params; }
float *kdp_cohort_module_grads(kdp_cohort *c) { return c->grads; }
void kdp_cohort_module_zero_grad(kdp_cohort *c) {
  if (c->n_params) memset(c->grads, 0, c->n_params * sizeof(float));
}
size_t kdp_cohort_module_n_buffers(const kdp_cohort *c) { return c->n_buffers; }
float *kdp_cohort_module_buffers(kdp_cohort *c) { return c->buffers; }
size_t kdp_cohort_module_n_tensors(const kdp_cohort *c) { return c->n_tensors; }
const char *kdp_cohort_module_tensor_name(const kdp_cohort *c, size_t i) {
  return i < c->n_tensors ? c->tensors[i].name : NULL;
}
size_t kdp_cohort_module_tensor_offset(const kdp_cohort *c, size_t i) {
  return i < c->n_tensors ? c->tensors[i].off : 0;
}
size_t kdp_cohort_module_tensor_size(const kdp_cohort *c, size_t i) {
  return i < c->n_tensors ? c->tensors[i].size : 0;
}

size_t kdp_cohort_feature_offset(const kdp_cohort *c, size_t j, size_t B) {
  return B * c->hoff[j < c->s.P ? j : c->s.P];
}
size_t kdp_cohort_feature_floats(const kdp_cohort *c, size_t B) { return B * c->D; }
int kdp_cohort_feature_grads(const kdp_cohort *c) {
  return c->s.method == KDP_METHOD_FFL || (c->s.method == KDP_METHOD_OKDDIP && !c->s.detach);
}

/* ---------------------------------------------------------------- helpers */

void kdp_ensemble_logprob(float *out, const float *z, size_t P, size_t B, size_t C) {
  /* log mean_j p_j(c): the mean of the probabilities, then one log per class. A class whose
     probability underflows under every peer is redone in log space (logsumexp over j of
     log p_j(c)), so the result stays finite for logits far apart. */
  const size_t np = P ? P : 1;
  double *e = kdp_xmalloc(np * (C ? C : 1) * sizeof(double));
  double *mx = kdp_xmalloc(np * sizeof(double)), *inv = kdp_xmalloc(np * sizeof(double));
  const double logP = log((double)P);
  for (size_t b = 0; b < B; b++) {
    for (size_t j = 0; j < P; j++) {
      const float *zr = z + (j * B + b) * C;
      float m = zr[0];
      for (size_t k = 1; k < C; k++)
        if (zr[k] > m) m = zr[k];
      double s = 0.0;
      for (size_t k = 0; k < C; k++) s += e[j * C + k] = exp((double)zr[k] - m);
      mx[j] = m;
      inv[j] = 1.0 / s;
    }
    for (size_t c = 0; c < C; c++) {
      double acc = 0.0;
      for (size_t j = 0; j < P; j++) acc += e[j * C + c] * inv[j];
      if (acc > 1e-290) {
        out[b * C + c] = (float)(log(acc) - logP);
        continue;
      }
      double lmax = -INFINITY, sum = 0.0;
      for (size_t j = 0; j < P; j++) {
        double lp = (double)z[(j * B + b) * C + c] - mx[j] + log(inv[j]);
        if (lp > lmax) lmax = lp;
      }
      for (size_t j = 0; j < P; j++)
        sum += exp((double)z[(j * B + b) * C + c] - mx[j] + log(inv[j]) - lmax);
      out[b * C + c] = (float)(lmax + log(sum) - logP);
    }
  }
  free(e);
  free(mx);
  free(inv);
}

static size_t count_hits(const float *t, const int32_t *y, size_t B, size_t C) {
  size_t hits = 0;
  for (size_t b = 0; b < B; b++) {
    const float *r = t + b * C;
    size_t am = 0;
    for (size_t c = 1; c < C; c++)
      if (r[c] > r[am]) am = c;
    if ((int32_t)am == y[b]) hits++;
  }
  return hits;
}

/*
 * T^2 KL(s_T(t) || s_T(z)), batchmean, with gradients w.r.t. both logits (either may be NULL):
 *   dz += scale T (p - q) / B,   dt += scale T q (l - k) / B,
 * where q = s_T(t), p = s_T(z), l_c = log q_c - log p_c and k = sum_c q_c l_c (the row's KL).
 */
static double kl_logits(const float *t, const float *z, size_t B, size_t C, float T, float *dt,
                        float *dz, float scale) {
  const double invT = 1.0 / (double)T;
  const double g = (double)scale * (double)T / (double)B;
  /* one exp per element for rows of up to ROW_CACHE classes; wider rows recompute */
  double cache_t[ROW_CACHE], cache_z[ROW_CACHE];
  double *et = C <= ROW_CACHE ? cache_t : NULL, *ez = C <= ROW_CACHE ? cache_z : NULL;
  double total = 0.0;
  for (size_t b = 0; b < B; b++) {
    const float *tr = t + b * C, *zr = z + b * C;
    float mt = tr[0], mz = zr[0];
    for (size_t c = 1; c < C; c++) {
      if (tr[c] > mt) mt = tr[c];
      if (zr[c] > mz) mz = zr[c];
    }
    double st = 0.0, sz = 0.0;
    for (size_t c = 0; c < C; c++) {
      double vt = exp(((double)tr[c] - mt) * invT), vz = exp(((double)zr[c] - mz) * invT);
      if (et) {
        et[c] = vt;
        ez[c] = vz;
      }
      st += vt;
      sz += vz;
    }
    double lt = log(st), lz = log(sz), row = 0.0;
    for (size_t c = 0; c < C; c++) {
      double logq = ((double)tr[c] - mt) * invT - lt;
      double logp = ((double)zr[c] - mz) * invT - lz;
      double q = et ? et[c] / st : exp(logq);
      row += q * (logq - logp);
    }
    total += row;
    for (size_t c = 0; c < C; c++) {
      double logq = ((double)tr[c] - mt) * invT - lt;
      double logp = ((double)zr[c] - mz) * invT - lz;
      double q = et ? et[c] / st : exp(logq), p = ez ? ez[c] / sz : exp(logp);
      if (dz) dz[b * C + c] += (float)(g * (p - q));
      if (dt) dt[b * C + c] += (float)(g * q * ((logq - logp) - row));
    }
  }
  return (double)T * (double)T * total / (double)B;
}

/* u (B x D) = concat_j h_j per sample; du back into dh (accumulate). */
static void gather_u(kdp_cohort *c, const float *h, size_t B) {
  for (size_t j = 0; j < c->s.P; j++) {
    size_t d = c->s.dims[j];
    const float *hj = h + B * c->hoff[j];
    for (size_t b = 0; b < B; b++) memcpy(c->u + b * c->D + c->hoff[j], hj + b * d, d * sizeof(float));
  }
}
static void scatter_du(kdp_cohort *c, float *dh, size_t B) {
  for (size_t j = 0; j < c->s.P; j++) {
    size_t d = c->s.dims[j];
    float *hj = dh + B * c->hoff[j];
    for (size_t b = 0; b < B; b++) {
      const float *src = c->du + b * c->D + c->hoff[j];
      for (size_t k = 0; k < d; k++) hj[b * d + k] += src[k];
    }
  }
}

/* ---------------------------------------------------------------- forward */

/* linear -> BN -> relu on u into act (B x H). */
static void hidden_forward(kdp_cohort *c, size_t B, int train) {
  const size_t H = c->H;
  float *p = c->params;
  kdp_dense_forward(c->a1, c->u, p + c->o_w1, p + c->o_b1, B, c->D, H);
  if (train)
    kdp_bn_forward_train(c->bno, c->xhat, c->invstd, c->buffers, c->buffers + H, c->a1,
                         p + c->o_gamma, p + c->o_beta, B, H, BN_MOMENTUM, BN_EPS);
  else
    kdp_bn_forward_eval(c->bno, c->a1, p + c->o_gamma, p + c->o_beta, c->buffers, c->buffers + H,
                        B, H, BN_EPS);
  kdp_relu_forward(c->act, c->bno, B * H);
}

/* dact -> grads of linear/BN params, and du (zeroed here) if want_du. */
static void hidden_backward(kdp_cohort *c, size_t B, int want_du) {
  const size_t H = c->H;
  float *p = c->params, *gp = c->grads;
  memset(c->dbno, 0, B * H * sizeof(float));
  memset(c->da1, 0, B * H * sizeof(float));
  kdp_relu_backward(c->dbno, c->dact, c->act, B * H);
  kdp_bn_backward(c->da1, gp + c->o_gamma, gp + c->o_beta, c->dbno, c->xhat, c->invstd,
                  p + c->o_gamma, B, H);
  if (want_du) memset(c->du, 0, B * c->D * sizeof(float));
  kdp_dense_backward(want_du ? c->du : NULL, gp + c->o_w1, gp + c->o_b1, c->da1, c->u,
                     p + c->o_w1, B, c->D, H);
}

static void one_forward(kdp_cohort *c, const float *z, const float *h, size_t B, int train) {
  const size_t P = c->s.P, C = c->s.C;
  gather_u(c, h, B);
  hidden_forward(c, B, train);
  for (size_t b = 0; b < B; b++) {
    const float *a = c->act + b * P;
    float *g = c->g + b * P;
    float mx = a[0];
    for (size_t j = 1; j < P; j++)
      if (a[j] > mx) mx = a[j];
    double s = 0.0;
    for (size_t j = 0; j < P; j++) s += exp((double)a[j] - mx);
    for (size_t j = 0; j < P; j++) g[j] = (float)(exp((double)a[j] - mx) / s);
    for (size_t k = 0; k < C; k++) {
      double acc = 0.0;
      for (size_t j = 0; j < P; j++) acc += (double)g[j] * z[(j * B + b) * C + k];
      c->zt[b * C + k] = (float)acc;
    }
  }
}

static void ffl_forward(kdp_cohort *c, const float *h, size_t B, int train) {
  gather_u(c, h, B);
  hidden_forward(c, B, train);
  kdp_dense_forward(c->zt, c->act, c->params + c->o_w2, c->params + c->o_b2, B, c->H, c->s.C);
}

static void okddip_forward(kdp_cohort *c, const float *z, const float *h, size_t B) {
  const size_t m = c->m, r = c->r, C = c->s.C;
  for (size_t a = 0; a < m; a++) {
    size_t j = c->aux[a], d = c->s.dims[j];
    const float *hj = h + B * c->hoff[j];
    kdp_dense_forward(c->qv + a * B * r, hj, c->params + c->o_wq[a], NULL, B, d, r);
    kdp_dense_forward(c->kv + a * B * r, hj, c->params + c->o_wk[a], NULL, B, d, r);
  }
  for (size_t b = 0; b < B; b++) {
    for (size_t ai = 0; ai < m; ai++) {
      float *att = c->att + (b * m + ai) * m;
      const float *qi = c->qv + (ai * B + b) * r;
      double e[KDP_KD_MAX_PEERS], mx = -INFINITY, s = 0.0;
      for (size_t aj = 0; aj < m; aj++) {
        const float *kj = c->kv + (aj * B + b) * r;
        double acc = 0.0;
        for (size_t k = 0; k < r; k++) acc += (double)qi[k] * kj[k];
        e[aj] = acc;
        if (acc > mx) mx = acc;
      }
      for (size_t aj = 0; aj < m; aj++) s += exp(e[aj] - mx);
      for (size_t aj = 0; aj < m; aj++) att[aj] = (float)(exp(e[aj] - mx) / s);
      for (size_t k = 0; k < C; k++) {
        double acc = 0.0;
        for (size_t aj = 0; aj < m; aj++) acc += (double)att[aj] * z[(c->aux[aj] * B + b) * C + k];
        c->tt[(ai * B + b) * C + k] = (float)acc;
      }
    }
    for (size_t k = 0; k < C; k++) {
      double acc = 0.0;
      for (size_t aj = 0; aj < m; aj++) acc += z[(c->aux[aj] * B + b) * C + k];
      c->tl[b * C + k] = (float)(m ? acc / (double)m : 0.0);
    }
  }
}

/* Everything the peer terms and the global term read. */
static void cohort_forward(kdp_cohort *c, const kdp_kd_batch *in) {
  const size_t P = c->s.P, B = in->B, C = c->s.C;
  switch (c->s.method) {
    case KDP_METHOD_CODISTILL:
    case KDP_METHOD_AVG:
      for (size_t j = 0; j < P; j++) kdp_softmax_t(c->probs + j * B * C, in->z + j * B * C, B, C, in->T);
      break;
    case KDP_METHOD_ONE: one_forward(c, in->z, in->h, B, 1); break;
    case KDP_METHOD_FFL: ffl_forward(c, in->h, B, 1); break;
    case KDP_METHOD_OKDDIP:
      okddip_forward(c, in->z, in->h, B);
      memset(c->dqv, 0, (c->m ? c->m : 1) * B * c->r * sizeof(float));
      memset(c->dkv, 0, (c->m ? c->m : 1) * B * c->r * sizeof(float));
      break;
    default: break;
  }
}

/* ---------------------------------------------------------------- peer term L_i */

/* Backward of t_i = sum_j a_ij z_j (a_ij = softmax_j(q_i . k_j)) from dt (B x C). */
static void okddip_attention_backward(kdp_cohort *c, size_t ai, const float *z, size_t B,
                                      float *dz) {
  const size_t m = c->m, r = c->r, C = c->s.C;
  for (size_t b = 0; b < B; b++) {
    const float *att = c->att + (b * m + ai) * m;
    const float *dtr = c->dt + b * C;
    double da[KDP_KD_MAX_PEERS], dot = 0.0;
    for (size_t aj = 0; aj < m; aj++) {
      size_t j = c->aux[aj];
      const float *zj = z + (j * B + b) * C;
      float *dzj = dz + (j * B + b) * C;
      double acc = 0.0;
      for (size_t k = 0; k < C; k++) {
        acc += (double)dtr[k] * zj[k];
        dzj[k] += att[aj] * dtr[k];
      }
      da[aj] = acc;
      dot += (double)att[aj] * acc;
    }
    const float *qi = c->qv + (ai * B + b) * r;
    float *dqi = c->dqv + (ai * B + b) * r;
    for (size_t aj = 0; aj < m; aj++) {
      float de = (float)((double)att[aj] * (da[aj] - dot));
      const float *kj = c->kv + (aj * B + b) * r;
      float *dkj = c->dkv + (aj * B + b) * r;
      for (size_t k = 0; k < r; k++) {
        dqi[k] += de * kj[k];
        dkj[k] += de * qi[k];
      }
    }
  }
}

static void peer_term(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz,
                      kdp_kd_losses *o) {
  const size_t P = c->s.P, B = in->B, C = c->s.C;
  const float T = in->T;
  const float *zi = in->z + i * B * C;
  float *dzi = dz + i * B * C;
  float w = in->weight;
  double kd = 0.0;
  o->ce = kdp_ce_loss(zi, in->y, B, C, dzi, 1.0f, &o->n_correct);
  switch (c->s.method) {
    case KDP_METHOD_INDEPENDENT: w = 0.0f; break;
    case KDP_METHOD_DML:
      if (P > 1) {
        for (size_t j = 0; j < P; j++)
          if (j != i)
            kd += kl_logits(in->z + j * B * C, zi, B, C, T, NULL, dzi, w / (float)(P - 1));
        kd /= (double)(P - 1);
      }
      break;
    case KDP_METHOD_CODISTILL:
    case KDP_METHOD_AVG: {
      int excl = c->s.method == KDP_METHOD_CODISTILL;
      size_t n = excl ? P - 1 : P;
      if (excl && in->burn_in) w = 0.0f;
      if (n == 0) break;
      for (size_t k = 0; k < B * C; k++) {
        double acc = 0.0;
        for (size_t j = 0; j < P; j++)
          if (!excl || j != i) acc += c->probs[j * B * C + k];
        c->q[k] = (float)(acc / (double)n);
      }
      kd = kdp_kl_loss(zi, c->q, B, C, T, dzi, w);
      break;
    }
    case KDP_METHOD_ONE:
    case KDP_METHOD_FFL:
      kdp_softmax_t(c->q, c->zt, B, C, T); /* sg teacher */
      kd = kdp_kl_loss(zi, c->q, B, C, T, dzi, w);
      break;
    case KDP_METHOD_OKDDIP: {
      const int det = c->s.detach;
      if ((int)i == c->s.leader) {
        if (c->m == 0) break;
        memset(c->dtl, 0, B * C * sizeof(float));
        kd = kl_logits(c->tl, zi, B, C, T, det ? NULL : c->dtl, dzi, w);
        if (!det)
          for (size_t aj = 0; aj < c->m; aj++) {
            float *dzj = dz + c->aux[aj] * B * C;
            for (size_t k = 0; k < B * C; k++) dzj[k] += c->dtl[k] / (float)c->m;
          }
      } else {
        size_t ai = (size_t)c->auxpos[i];
        memset(c->dt, 0, B * C * sizeof(float));
        kd = kl_logits(c->tt + ai * B * C, zi, B, C, T, det ? NULL : c->dt, dzi, w);
        if (!det) okddip_attention_backward(c, ai, in->z, B, dz);
      }
      break;
    }
    default: break;
  }
  o->kd = kd;
  o->loss = o->ce + (double)w * kd;
}

/* ---------------------------------------------------------------- global term L_module */

/* L_gate (one) or L_f (ffl), with gradients scaled by scale. Returns the (unscaled) loss. */
static double global_term(kdp_cohort *c, const kdp_kd_batch *in, float *dz, float *dh,
                          float scale) {
  const size_t P = c->s.P, B = in->B, C = c->s.C;
  if (c->s.method == KDP_METHOD_ONE) {
    memset(c->dzt, 0, B * C * sizeof(float));
    double L = kdp_ce_loss(c->zt, in->y, B, C, c->dzt, scale, NULL);
    for (size_t b = 0; b < B; b++) {
      const float *dze = c->dzt + b * C;
      const float *g = c->g + b * P;
      double dgb[KDP_KD_MAX_PEERS], dot = 0.0;
      for (size_t j = 0; j < P; j++) {
        const float *zj = in->z + (j * B + b) * C;
        float *dzj = dz + (j * B + b) * C;
        double acc = 0.0;
        for (size_t k = 0; k < C; k++) {
          acc += (double)dze[k] * zj[k];
          dzj[k] += g[j] * dze[k];
        }
        dgb[j] = acc;
        dot += (double)g[j] * acc;
      }
      for (size_t j = 0; j < P; j++) c->dact[b * P + j] = (float)((double)g[j] * (dgb[j] - dot));
    }
    hidden_backward(c, B, 0); /* the gate input is sg(h) */
    return L;
  }
  if (c->s.method == KDP_METHOD_FFL) {
    memset(c->dzt, 0, B * C * sizeof(float));
    double L = kdp_ce_loss(c->zt, in->y, B, C, c->dzt, scale, NULL);
    for (size_t k = 0; k < B * C; k++) {
      double acc = 0.0;
      for (size_t j = 0; j < P; j++) acc += in->z[j * B * C + k];
      c->zm[k] = (float)(acc / (double)P);
    }
    kdp_softmax_t(c->q, c->zm, B, C, in->T); /* sg mean of the peers' logits */
    L += (double)in->weight * kdp_kl_loss(c->zt, c->q, B, C, in->T, c->dzt, scale * in->weight);
    memset(c->dact, 0, B * c->H * sizeof(float));
    kdp_dense_backward(c->dact, c->grads + c->o_w2, c->grads + c->o_b2, c->dzt, c->act,
                       c->params + c->o_w2, B, c->H, C);
    hidden_backward(c, B, 1);
    scatter_du(c, dh, B);
    return L;
  }
  return 0.0;
}

static void okddip_module_backward(kdp_cohort *c, const float *h, float *dh, size_t B) {
  if (c->s.method != KDP_METHOD_OKDDIP || c->s.detach) return;
  const size_t r = c->r;
  for (size_t a = 0; a < c->m; a++) {
    size_t j = c->aux[a], d = c->s.dims[j];
    const float *hj = h + B * c->hoff[j];
    float *dhj = dh + B * c->hoff[j];
    kdp_dense_backward(dhj, c->grads + c->o_wq[a], NULL, c->dqv + a * B * r, hj,
                       c->params + c->o_wq[a], B, d, r);
    kdp_dense_backward(dhj, c->grads + c->o_wk[a], NULL, c->dkv + a * B * r, hj,
                       c->params + c->o_wk[a], B, d, r);
  }
}

static void write_teacher(kdp_cohort *c, const float *z, size_t B, float *teacher) {
  const size_t C = c->s.C;
  switch (c->s.method) {
    case KDP_METHOD_ONE:
    case KDP_METHOD_FFL: memcpy(teacher, c->zt, B * C * sizeof(float)); break;
    case KDP_METHOD_OKDDIP:
      memcpy(teacher, z + (size_t)c->s.leader * B * C, B * C * sizeof(float));
      break;
    default: kdp_ensemble_logprob(teacher, z, c->s.P, B, C); break;
  }
}

/* ---------------------------------------------------------------- public entry points */

static int check_batch(const kdp_cohort *c, const kdp_kd_batch *in, const float *dz,
                       const float *dh, const char *fn, kdp_error *err) {
  if (!in || !in->z || !in->y)
    return kdp_fail(err, KDP_EINVAL, "%s: batch, logits z and labels y are required", fn);
  if (in->B < 1 || in->B > c->maxB)
    return kdp_fail(err, KDP_EINVAL, "%s: batch %zu outside 1..%zu (max_batch of the cohort)", fn,
                    in->B, c->maxB);
  if (!(in->T > 0.0f) || !isfinite(in->T))
    return kdp_fail(err, KDP_EINVAL, "%s: temperature %g must be finite and > 0", fn,
                    (double)in->T);
  if (!(in->weight >= 0.0f) || !isfinite(in->weight))
    return kdp_fail(err, KDP_EINVAL, "%s: KD weight %g must be finite and >= 0", fn,
                    (double)in->weight);
  if (!dz) return kdp_fail(err, KDP_EINVAL, "%s: dz (P x B x C) is required", fn);
  if (kdp_method_uses_features(c->s.method) && !in->h)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the peers' features h", fn,
                    kdp_method_name(c->s.method));
  if (kdp_cohort_feature_grads(c) && !dh)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s returns feature gradients; dh is required",
                    fn, kdp_method_name(c->s.method));
  for (size_t b = 0; b < in->B; b++)
    if (in->y[b] < 0 || (size_t)in->y[b] >= c->s.C)
      return kdp_fail(err, KDP_EINVAL, "%s: label y[%zu] = %d outside [0, %zu)", fn, b,
                      (int)in->y[b], c->s.C);
  return 0;
}

int kdp_cohort_step(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz, float *dh,
                    float *teacher, kdp_kd_losses *out, kdp_error *err) {
  int rc = check_batch(c, in, dz, dh, "kdp_cohort_step", err);
  if (rc) return rc;
  if (i >= c->s.P)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_step: peer %zu outside 0..%zu", i, c->s.P - 1);
  kdp_kd_losses o;
  memset(&o, 0, sizeof o);
  cohort_forward(c, in);
  peer_term(c, i, in, dz, &o);
  o.module_loss = global_term(c, in, dz, dh, 1.0f / (float)c->s.P);
  okddip_module_backward(c, in->h, dh, in->B);
  if (teacher) {
    write_teacher(c, in->z, in->B, teacher);
    o.teacher_correct = count_hits(teacher, in->y, in->B, c->s.C);
  }
  if (out) *out = o;
  return 0;
}

int kdp_cohort_objective(kdp_cohort *c, const kdp_kd_batch *in, float *dz, float *dh,
                         float *teacher, kdp_kd_losses *per_peer, double *total,
                         kdp_error *err) {
  int rc = check_batch(c, in, dz, dh, "kdp_cohort_objective", err);
  if (rc) return rc;
  cohort_forward(c, in);
  double J = 0.0;
  kdp_kd_losses o[KDP_KD_MAX_PEERS];
  memset(o, 0, sizeof o);
  for (size_t i = 0; i < c->s.P; i++) {
    peer_term(c, i, in, dz, &o[i]);
    J += o[i].loss;
  }
  double Lm = global_term(c, in, dz, dh, 1.0f);
  J += Lm;
  okddip_module_backward(c, in->h, dh, in->B);
  float *t = teacher ? teacher : c->q;
  write_teacher(c, in->z, in->B, t);
  size_t th = count_hits(t, in->y, in->B, c->s.C);
  for (size_t i = 0; i < c->s.P; i++) {
    o[i].module_loss = Lm;
    o[i].teacher_correct = th;
    if (per_peer) per_peer[i] = o[i];
  }
  if (total) *total = J;
  return 0;
}

int kdp_cohort_teacher_eval(kdp_cohort *c, const float *z, const float *h, size_t B,
                            float *teacher, kdp_error *err) {
  if (!z || !teacher)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_teacher_eval: z and teacher are required");
  if (B < 1 || B > c->maxB)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_teacher_eval: batch %zu outside 1..%zu", B,
                    c->maxB);
  if ((c->s.method == KDP_METHOD_ONE || c->s.method == KDP_METHOD_FFL) && !h)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_teacher_eval: method %s needs features h",
                    kdp_method_name(c->s.method));
  if (c->s.method == KDP_METHOD_ONE) one_forward(c, z, h, B, 0);
  else if (c->s.method == KDP_METHOD_FFL) ffl_forward(c, h, B, 0);
  write_teacher(c, z, B, teacher);
  return 0;
}
