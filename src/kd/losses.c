/* losses.c: softmax with temperature, cross-entropy, temperature-scaled KL and the ramp-up weight. */
#include "kdpeers/kd.h"

#include <math.h>

/* Row max. */
static float row_max(const float *z, size_t C) {
  float m = z[0];
  for (size_t c = 1; c < C; c++)
    if (z[c] > m) m = z[c];
  return m;
}

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
    float m = zr[0];
    size_t am = 0;
    for (size_t c = 1; c < C; c++)
      if (zr[c] > m) {
        m = zr[c];
        am = c;
      }
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
