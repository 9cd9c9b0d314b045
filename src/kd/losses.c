/* losses.c: softmax with temperature, cross-entropy, temperature-scaled KL, the ramp-up weight,
   the argmax and the probability-mean ensemble. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/kd.h"

size_t kdp_argmax(const float *v, size_t n) {
  size_t am = 0;
  for (size_t c = 1; c < n; c++)
    if (v[c] > v[am]) am = c;
  return am;
}

size_t kdp_count_hits(const float *z, const int32_t *y, size_t B, size_t C) {
  size_t hits = 0;
  for (size_t b = 0; b < B; b++) hits += (int32_t)kdp_argmax(z + b * C, C) == y[b];
  return hits;
}

/* Row max. */
static float row_max(const float *z, size_t C) { return z[kdp_argmax(z, C)]; }

/* Rows with at most this many classes keep their exponentials on the stack, so each element costs
   one exp; wider rows recompute them in the second pass. */
#define ROW_CACHE 256

/* sum_c exp((z_c - m) / T), in double; the terms go to e[] unless e is NULL. */
static double row_sumexp(const float *z, size_t C, float m, double invT, double *e) {
  double s = 0.0;
  for (size_t c = 0; c < C; c++) {
    double v = exp(((double)z[c] - (double)m) * invT);
    if (e) e[c] = v;
    s += v;
  }
  return s;
}

/* exp((z_c - m) / T), from the cache when there is one. */
static inline double row_exp(const double *e, const float *z, size_t c, float m, double invT) {
  return e ? e[c] : exp(((double)z[c] - (double)m) * invT);
}

void kdp_softmax_t(float *out, const float *z, size_t B, size_t C, float T) {
  const double invT = 1.0 / (double)T;
  double cache[ROW_CACHE], *e = C <= ROW_CACHE ? cache : NULL;
  for (size_t b = 0; b < B; b++) {
    const float *zr = z + b * C;
    float *o = out + b * C;
    float m = row_max(zr, C);
    double inv_s = 1.0 / row_sumexp(zr, C, m, invT, e);
    for (size_t c = 0; c < C; c++) o[c] = (float)(row_exp(e, zr, c, m, invT) * inv_s);
  }
}

double kdp_ce_loss(const float *z, const int32_t *y, size_t B, size_t C, float *dz, float scale,
                   size_t *n_correct) {
  double total = 0.0;
  size_t hits = 0;
  int bad = 0;
  const double g = (double)scale / (double)B;
  double cache[ROW_CACHE], *e = dz && C <= ROW_CACHE ? cache : NULL;
  for (size_t b = 0; b < B; b++) {
    const float *zr = z + b * C;
    int32_t yb = y[b];
    if (yb < 0 || (size_t)yb >= C) {
      bad = 1;
      continue;
    }
    size_t am = kdp_argmax(zr, C);
    float m = zr[am];
    if (am == (size_t)yb) hits++;
    double s = row_sumexp(zr, C, m, 1.0, e);
    total += log(s) - ((double)zr[yb] - (double)m);
    if (dz) {
      float *d = dz + b * C;
      const double gs = g / s;
      for (size_t c = 0; c < C; c++) {
        double p = row_exp(e, zr, c, m, 1.0) * gs;
        d[c] += (float)(c == (size_t)yb ? p - g : p);
      }
    }
  }
  if (n_correct) *n_correct = hits;
  if (bad) return NAN;
  return B ? total / (double)B : 0.0;
}

double kdp_kl_loss(const float *z, const float *q, size_t B, size_t C, float T, float *dz,
                   float scale) {
  const double invT = 1.0 / (double)T;
  const double g = (double)scale * (double)T / (double)B;
  double cache[ROW_CACHE], *e = C <= ROW_CACHE ? cache : NULL;
  double total = 0.0;
  for (size_t b = 0; b < B; b++) {
    const float *zr = z + b * C;
    const float *qr = q + b * C;
    float m = row_max(zr, C);
    double s = row_sumexp(zr, C, m, invT, e);
    double lse = log(s), inv_s = 1.0 / s;
    double row = 0.0;
    for (size_t c = 0; c < C; c++) {
      double qc = (double)qr[c];
      if (qc > 0.0) row += qc * (log(qc) - (((double)zr[c] - (double)m) * invT - lse));
      if (dz) dz[b * C + c] += (float)(g * (row_exp(e, zr, c, m, invT) * inv_s - qc));
    }
    total += row;
  }
  return B ? (double)T * (double)T * total / (double)B : 0.0;
}

double kdp_rampup(double epoch, double R) {
  if (!(R > 0.0)) return 1.0;
  double t = epoch / R;
  if (t > 1.0) t = 1.0;
  if (t < 0.0) t = 0.0;
  double u = 1.0 - t;
  return exp(-5.0 * u * u);
}

double kdp_kl_logits(const float *t, const float *z, size_t B, size_t C, float T, float *dt,
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
      float m = row_max(zr, C);
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
