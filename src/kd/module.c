/* module.c: what the replicated modules share: their input rows (the peers' features side by
   side), and linear -> batchnorm -> relu with the whole batch's statistics when the batch's rows
   are spread over row blocks. */
#include <cblas.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>

#include "kd_internal.h"
#include "kdpeers/nn.h"

void kd_fill_uniform(float *p, size_t n, size_t fan_in, kdp_rng *rng) {
  float bound = 1.0f / sqrtf((float)(fan_in ? fan_in : 1));
  for (size_t k = 0; k < n; k++) p[k] = (2.0f * kdp_rng_uniform(rng) - 1.0f) * bound;
}

void kd_falloc_each(kdp_cohort *c, size_t n, ...) {
  va_list ap;
  va_start(ap, n);
  for (float **p = va_arg(ap, float **); p; p = va_arg(ap, float **)) *p = kdp_cohort_falloc(c, n);
  va_end(ap);
}

void kd_concat_features(const kdp_cohort *c, float *u, const float *h, size_t n) {
  for (size_t j = 0; j < c->s.P; j++) {
    size_t d = c->s.dims[j];
    const float *hj = h + n * c->hoff[j];
    for (size_t b = 0; b < n; b++) memcpy(u + b * c->D + c->hoff[j], hj + b * d, d * sizeof(float));
  }
}

void kd_split_features(const kdp_cohort *c, float *dh, const float *du, size_t n) {
  for (size_t j = 0; j < c->s.P; j++) {
    size_t d = c->s.dims[j];
    float *hj = dh + n * c->hoff[j];
    for (size_t b = 0; b < n; b++) {
      const float *src = du + b * c->D + c->hoff[j];
      for (size_t k = 0; k < d; k++) hj[b * d + k] += src[k];
    }
  }
}

void kd_hidden_setup(kdp_cohort *c, kd_hidden *L, const char *lin, const char *bn, size_t D,
                     size_t H, kdp_split out_split) {
  char name[48];
  L->D = D;
  L->H = H;
  snprintf(name, sizeof name, "%s.weight", lin);
  L->o_w = kdp_cohort_add_tensor(c, name, H, D, -1, out_split, KDP_SPLIT_FEATURES);
  snprintf(name, sizeof name, "%s.bias", lin);
  L->o_b = kdp_cohort_add_tensor(c, name, H, 1, -1, out_split, KDP_SPLIT_NONE);
  snprintf(name, sizeof name, "%s.weight", bn);
  L->o_gamma = kdp_cohort_add_tensor(c, name, H, 1, -1, out_split, KDP_SPLIT_NONE);
  snprintf(name, sizeof name, "%s.bias", bn);
  L->o_beta = kdp_cohort_add_tensor(c, name, H, 1, -1, out_split, KDP_SPLIT_NONE);
  L->o_mean = kdp_cohort_add_buffers_split(c, H, 0.0f, out_split);
  L->o_var = kdp_cohort_add_buffers_split(c, H, 1.0f, out_split);
  size_t n = c->maxB * H;
  L->a1 = kdp_cohort_falloc(c, n);
  L->xhat = kdp_cohort_falloc(c, n);
  L->bno = kdp_cohort_falloc(c, n);
  L->act = kdp_cohort_falloc(c, n);
  L->dact = kdp_cohort_falloc(c, n);
  L->dbno = kdp_cohort_falloc(c, n);
  L->da1 = kdp_cohort_falloc(c, n);
  L->mean = kdp_cohort_falloc(c, H);
  L->invstd = kdp_cohort_falloc(c, H);
  L->sums = kdp_cohort_alloc(c, (2 * H + 1) * sizeof(double));
  L->shift = kdp_cohort_alloc(c, H * sizeof(double));
}

void kd_hidden_init(kdp_cohort *c, const kd_hidden *L, kdp_rng *rng) {
  kd_fill_uniform(c->params + L->o_w, L->H * L->D, L->D, rng);
  kd_fill_uniform(c->params + L->o_b, L->H, L->D, rng);
  for (size_t k = 0; k < L->H; k++) {
    c->params[L->o_gamma + k] = 1.0f;
    c->params[L->o_beta + k] = 0.0f;
    c->buffers[L->o_mean + k] = 0.0f;
    c->buffers[L->o_var + k] = 1.0f;
  }
}

static void reduce(const kdp_kd_reduce *red, double *buf, size_t n) {
  if (red && red->sum) red->sum(red->ctx, buf, n);
}

/* batchnorm -> relu of L->a1 (n x H) */
static void hidden_bn_relu(kdp_cohort *c, kd_hidden *L, size_t n, int train,
                           const kdp_kd_reduce *red) {
  const size_t H = L->H;
  const float *p = c->params;
  float *rm = c->buffers + L->o_mean, *rv = c->buffers + L->o_var;
  if (!train) {
    kdp_bn_forward_eval(L->bno, L->a1, p + L->o_gamma, p + L->o_beta, rm, rv, n, H, KD_BN_EPS);
  } else {
    /* sums of (x - running mean) over this block's rows, then over the batch's blocks: the
       running mean is the same on every replica and close to the batch mean */
    double *sum = L->sums, *sq = sum + H;
    memset(L->sums, 0, (2 * H + 1) * sizeof(double));
    for (size_t k = 0; k < H; k++) L->shift[k] = (double)rm[k];
    kdp_bn_stats_rows(sum, sq, L->a1, L->shift, n, H);
    L->sums[2 * H] = (double)n;
    reduce(red, L->sums, 2 * H + 1);
    L->total = (size_t)L->sums[2 * H];
    kdp_bn_stats_finish(L->mean, L->invstd, rm, rv, sum, sq, L->shift, L->total, H, KD_BN_MOMENTUM,
                        KD_BN_EPS);
    kdp_bn_normalize(L->bno, L->xhat, L->a1, L->mean, L->invstd, p + L->o_gamma, p + L->o_beta, n,
                     H);
  }
  kdp_relu_forward(L->act, L->bno, n * H);
}

void kd_hidden_forward(kdp_cohort *c, kd_hidden *L, const float *u, size_t n, int train,
                       const kdp_kd_reduce *red) {
  const float *p = c->params;
  if (n) kdp_dense_forward(L->a1, u, p + L->o_w, p + L->o_b, n, L->D, L->H);
  hidden_bn_relu(c, L, n, train, red);
}

/* ---- the linear layer sharded by peer columns: its weight's columns [hoff_j, hoff_j + d_j) meet
   only peer j's features, W_j (H x d_j, leading dimension D) ---- */

void kd_hidden_col_forward(const kdp_cohort *c, const kd_hidden *L, size_t j, const float *h,
                           size_t n, float *part) {
  const size_t d = c->s.dims[j];
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)L->H, (int)d, 1.0f, h, (int)d,
              c->params + L->o_w + c->hoff[j], (int)L->D, 0.0f, part, (int)L->H);
}

void kd_hidden_col_backward(kdp_cohort *c, const kd_hidden *L, size_t j, const float *h, size_t n,
                            const float *dpart, float *dh) {
  const size_t d = c->s.dims[j], H = L->H;
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)H, (int)d, (int)n, 1.0f, dpart,
              (int)H, h, (int)d, 1.0f, c->grads + L->o_w + c->hoff[j], (int)L->D);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d, (int)H, 1.0f, dpart,
              (int)H, c->params + L->o_w + c->hoff[j], (int)L->D, 1.0f, dh, (int)d);
}

void kd_hidden_forward_parts(kdp_cohort *c, kd_hidden *L, const float *part, size_t n, int train,
                             const kdp_kd_reduce *red) {
  const size_t H = L->H, P = c->s.P;
  const float *bias = c->params + L->o_b;
  /* row by row, summing one partial row at a time into a row of doubles (L->sums, free until
     the batchnorm): the additions of the element-wise loop (bias, then j = 0, 1, ...) in the same
     order, but contiguous and vectorised */
  double *acc = L->sums;
  for (size_t b = 0; b < n; b++) {
    for (size_t k = 0; k < H; k++) acc[k] = (double)bias[k];
    for (size_t j = 0; j < P; j++) {
      const float *pj = part + (j * n + b) * H;
      for (size_t k = 0; k < H; k++) acc[k] += (double)pj[k];
    }
    float *a = L->a1 + b * H;
    for (size_t k = 0; k < H; k++) a[k] = (float)acc[k];
  }
  hidden_bn_relu(c, L, n, train, red);
}

/* from L->dact to L->da1 (n x H); the batchnorm's gradients. 0 when the block has no rows. */
static int hidden_backward_da1(kdp_cohort *c, kd_hidden *L, size_t n, const kdp_kd_reduce *red) {
  const size_t H = L->H;
  const float *p = c->params;
  float *gp = c->grads;
  double *sg = L->sums, *sb = sg + H;
  memset(L->sums, 0, 2 * H * sizeof(double));
  memset(L->dbno, 0, n * H * sizeof(float));
  kdp_relu_backward(L->dbno, L->dact, L->act, n * H);
  kdp_bn_backward_sums(sg, sb, L->dbno, L->xhat, n, H);
  /* this block's share of dgamma and dbeta: the module's gradient is summed over the blocks */
  for (size_t k = 0; k < H; k++) {
    gp[L->o_gamma + k] += (float)sg[k];
    gp[L->o_beta + k] += (float)sb[k];
  }
  reduce(red, L->sums, 2 * H);
  if (!n) return 0;
  memset(L->da1, 0, n * H * sizeof(float));
  kdp_bn_backward_rows(L->da1, L->dbno, L->xhat, sg, sb, L->invstd, p + L->o_gamma, L->total, n,
                       H);
  return 1;
}

void kd_hidden_backward(kdp_cohort *c, kd_hidden *L, const float *u, size_t n, float *du,
                        const kdp_kd_reduce *red) {
  if (hidden_backward_da1(c, L, n, red))
    kdp_dense_backward(du, c->grads + L->o_w, c->grads + L->o_b, L->da1, u, c->params + L->o_w, n,
                       L->D, L->H);
}

void kd_hidden_backward_parts(kdp_cohort *c, kd_hidden *L, size_t n, float *dpart,
                              const kdp_kd_reduce *red) {
  if (!hidden_backward_da1(c, L, n, red)) return;
  const size_t H = L->H;
  float *db = c->grads + L->o_b;
  for (size_t r = 0; r < n; r++)
    for (size_t k = 0; k < H; k++) db[k] += L->da1[r * H + k];
  memcpy(dpart, L->da1, n * H * sizeof(float));
}

void kd_softmax_mix(const double *e, size_t m, const float *const *z, size_t C, float *a,
                    float *t) {
  double mx = -INFINITY, s = 0.0;
  for (size_t j = 0; j < m; j++)
    if (e[j] > mx) mx = e[j];
  for (size_t j = 0; j < m; j++) s += exp(e[j] - mx);
  for (size_t j = 0; j < m; j++) a[j] = (float)(exp(e[j] - mx) / s);
  for (size_t k = 0; k < C; k++) {
    double acc = 0.0;
    for (size_t j = 0; j < m; j++) acc += (double)a[j] * z[j][k];
    t[k] = (float)acc;
  }
}

void kd_softmax_mix_backward(const float *a, size_t m, const float *const *z, float *const *dz,
                             const float *dt, size_t C, float *de) {
  double da[KDP_KD_MAX_PEERS], dot = 0.0;
  for (size_t j = 0; j < m; j++) {
    double acc = 0.0;
    for (size_t k = 0; k < C; k++) {
      acc += (double)dt[k] * z[j][k];
      dz[j][k] += a[j] * dt[k];
    }
    da[j] = acc;
    dot += (double)a[j] * acc;
  }
  for (size_t j = 0; j < m; j++) de[j] = (float)((double)a[j] * (da[j] - dot));
}
