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

/* log sum_c exp((z_c - m) / T), in double. */
static double row_lse(const float *z, size_t C, float m, double invT) {
  double s = 0.0;
  for (size_t c = 0; c < C; c++) s += exp(((double)z[c] - (double)m) * invT);
  return log(s);
}

void kdp_softmax_t(float *out, const float *z, size_t B, size_t C, float T) {
  const double invT = 1.0 / (double)T;
  for (size_t b = 0; b < B; b++) {
    const float *zr = z + b * C;
    float *o = out + b * C;
    float m = row_max(zr, C);
    double lse = row_lse(zr, C, m, invT);
    for (size_t c = 0; c < C; c++) o[c] = (float)exp(((double)zr[c] - (double)m) * invT - lse);
  }
}

double kdp_ce_loss(const float *z, const int32_t *y, size_t B, size_t C, float *dz, float scale,
                   size_t *n_correct) {
  double total = 0.0;
  size_t hits = 0;
  int bad = 0;
  const double g = (double)scale / (double)B;
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
    double lse = row_lse(zr, C, m, 1.0);
    total += lse - ((double)zr[yb] - (double)m);
    if (dz) {
      float *d = dz + b * C;
      for (size_t c = 0; c < C; c++) {
        double p = exp((double)zr[c] - (double)m - lse);
        d[c] += (float)(g * (p - (c == (size_t)yb ? 1.0 : 0.0)));
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
  double total = 0.0;
  for (size_t b = 0; b < B; b++) {
    const float *zr = z + b * C;
    const float *qr = q + b * C;
    float m = row_max(zr, C);
    double lse = row_lse(zr, C, m, invT);
    double row = 0.0;
    for (size_t c = 0; c < C; c++) {
      double logp = ((double)zr[c] - (double)m) * invT - lse;
      double qc = (double)qr[c];
      if (qc > 0.0) row += qc * (log(qc) - logp);
      if (dz) dz[b * C + c] += (float)(g * (exp(logp) - qc));
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
