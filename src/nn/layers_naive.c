/* layers_naive.c: plain-loop reference twins of the BLAS dense and conv kernels, for tests. */
#include "kdpeers/nn.h"

#include <stdlib.h>
#include <string.h>

/* out (B x O) = in (B x I) . w^T + b */
void kdp_dense_forward_naive(float *out, const float *in, const float *w, const float *b, size_t B,
                             size_t I, size_t O) {
  for (size_t r = 0; r < B; r++)
    for (size_t o = 0; o < O; o++) {
      double acc = b ? (double)b[o] : 0.0;
      for (size_t i = 0; i < I; i++) acc += (double)in[r * I + i] * (double)w[o * I + i];
      out[r * O + o] = (float)acc;
    }
}

void kdp_dense_backward_naive(float *din, float *dw, float *db, const float *dout,
                              const float *in, const float *w, size_t B, size_t I, size_t O) {
  for (size_t r = 0; r < B; r++)
    for (size_t o = 0; o < O; o++) {
      float g = dout[r * O + o];
      if (db) db[o] += g;
      for (size_t i = 0; i < I; i++) {
        if (dw) dw[o * I + i] += g * in[r * I + i];
        if (din) din[r * I + i] += g * w[o * I + i];
      }
    }
}

void kdp_dense_relu_forward_naive(float *out, const float *in, const float *w, const float *b,
                                  size_t B, size_t I, size_t O) {
  kdp_dense_forward_naive(out, in, w, b, B, I, O);
  for (size_t i = 0; i < B * O; i++) out[i] = out[i] > 0.0f ? out[i] : 0.0f;
}

void kdp_dense_relu_backward_naive(float *din, float *dw, float *db, float *dout,
                                   const float *out, const float *in, const float *w, size_t B,
                                   size_t I, size_t O) {
  for (size_t i = 0; i < B * O; i++)
    if (!(out[i] > 0.0f)) dout[i] = 0.0f;
  kdp_dense_backward_naive(din, dw, db, dout, in, w, B, I, O);
}

/* Input index for output (b, oh, ow) and tap (kh, kw), or -1 if it falls in the padding. */
static long conv_in_pos(const kdp_conv_shape *s, size_t b, size_t oh, size_t ow, size_t kh,
                        size_t kw) {
  long ih = (long)(oh * s->stride + kh) - (long)s->pad;
  long iw = (long)(ow * s->stride + kw) - (long)s->pad;
  if (ih < 0 || iw < 0 || ih >= (long)s->H || iw >= (long)s->W) return -1;
  return (long)(((b * s->H + (size_t)ih) * s->W + (size_t)iw) * s->Cin);
}

void kdp_conv2d_forward_naive(float *out, const float *in, const float *w, const float *b,
                              const kdp_conv_shape *s) {
  const size_t K = s->K, Cin = s->Cin, Cout = s->Cout;
  for (size_t bb = 0; bb < s->B; bb++)
    for (size_t oh = 0; oh < s->OH; oh++)
      for (size_t ow = 0; ow < s->OW; ow++)
        for (size_t co = 0; co < Cout; co++) {
          double acc = b ? (double)b[co] : 0.0;
          for (size_t kh = 0; kh < K; kh++)
            for (size_t kw = 0; kw < K; kw++) {
              long p = conv_in_pos(s, bb, oh, ow, kh, kw);
              if (p < 0) continue;
              for (size_t ci = 0; ci < Cin; ci++)
                acc += (double)in[(size_t)p + ci] *
                       (double)w[((co * K + kh) * K + kw) * Cin + ci];
            }
          out[((bb * s->OH + oh) * s->OW + ow) * Cout + co] = (float)acc;
        }
}

void kdp_conv2d_backward_naive(float *din, float *dw, float *db, const float *dout,
                               const float *in, const float *w, const kdp_conv_shape *s) {
  const size_t K = s->K, Cin = s->Cin, Cout = s->Cout;
  for (size_t bb = 0; bb < s->B; bb++)
    for (size_t oh = 0; oh < s->OH; oh++)
      for (size_t ow = 0; ow < s->OW; ow++)
        for (size_t co = 0; co < Cout; co++) {
          float g = dout[((bb * s->OH + oh) * s->OW + ow) * Cout + co];
          if (db) db[co] += g;
          for (size_t kh = 0; kh < K; kh++)
            for (size_t kw = 0; kw < K; kw++) {
              long p = conv_in_pos(s, bb, oh, ow, kh, kw);
              if (p < 0) continue;
              size_t widx = ((co * K + kh) * K + kw) * Cin;
              for (size_t ci = 0; ci < Cin; ci++) {
                if (dw) dw[widx + ci] += g * in[(size_t)p + ci];
                if (din) din[(size_t)p + ci] += g * w[widx + ci];
              }
            }
        }
}

/* conv, then the (loop-only) batchnorm, max-pool and relu layers on full-size temporaries */
void kdp_conv_bn_pool_relu_forward_naive(float *out, uint8_t *win, float *xwin, float *y,
                                         float *mean, float *invstd, float *run_mean,
                                         float *run_var, const float *in, const float *w,
                                         const float *b, const float *gamma, const float *beta,
                                         const kdp_conv_shape *s, int train, float momentum,
                                         float eps) {
  const size_t B = s->B, C = s->Cout, OH = s->OH, OW = s->OW, N = B * OH * OW;
  const size_t PH = OH / 2, PW = OW / 2, np = B * PH * PW * C;
  if (N == 0 || C == 0) return;
  kdp_conv2d_forward_naive(y, in, w, b, s);
  float *bo = kdp_falloc(N * C), *xhat = kdp_falloc(N * C), *pool = kdp_falloc(np ? np : 1);
  int32_t *am = kdp_xcalloc(np ? np : 1, sizeof(int32_t));
  if (train) {
    /* the mean kdp_bn_forward_train uses: double sums shifted by the first row */
    for (size_t c = 0; c < C; c++) {
      double sum = 0;
      for (size_t r = 0; r < N; r++) sum += (double)y[r * C + c] - (double)y[c];
      mean[c] = (float)((double)y[c] + sum * (1.0 / (double)N));
    }
    kdp_bn_forward_train(bo, xhat, invstd, run_mean, run_var, y, gamma, beta, N, C, momentum,
                         eps);
  } else {
    kdp_bn_forward_eval(bo, y, gamma, beta, run_mean, run_var, N, C, eps);
  }
  kdp_maxpool_forward(pool, am, bo, B, OH, OW, C, 2, 2, 0);
  kdp_relu_forward(out, pool, np);
  if (train)
    for (size_t i = 0; i < np; i++) {
      size_t pos = (size_t)am[i] / C; /* (b * OH + h) * OW + w */
      size_t h = (pos / OW) % OH, wc = pos % OW;
      win[i] = (uint8_t)((h & 1) * 2 + (wc & 1) + (out[i] > 0.0f ? KDP_WIN_RELU : 0));
      xwin[i] = xhat[am[i]];
    }
  free(am);
  free(pool);
  free(xhat);
  free(bo);
}

void kdp_conv_bn_pool_relu_backward_naive(float *din, int din_set, float *dw, float *db,
                                          float *dgamma, float *dbeta, const float *dout,
                                          const float *out, const uint8_t *win,
                                          const float *xwin, const float *y, const float *mean,
                                          const float *invstd, const float *in, const float *w,
                                          const float *gamma, const kdp_conv_shape *s) {
  const size_t B = s->B, C = s->Cout, OH = s->OH, OW = s->OW, N = B * OH * OW;
  const size_t PH = OH / 2, PW = OW / 2, np = B * PH * PW * C;
  (void)xwin;
  if (N == 0 || C == 0) return;
  float *dpool = kdp_falloc(np ? np : 1), *dbn = kdp_falloc(N * C), *xhat = kdp_falloc(N * C);
  float *dy = kdp_falloc(N * C); /* kdp_falloc zeroes */
  kdp_relu_backward(dpool, dout, out, np);
  for (size_t i = 0; i < np; i++) {
    size_t c = i % C, p = i / C, pw = p % PW, ph = (p / PW) % PH, bb = p / (PW * PH);
    size_t k = win[i] & 3, h = 2 * ph + k / 2, wc = 2 * pw + k % 2;
    dbn[((bb * OH + h) * OW + wc) * C + c] += dpool[i];
  }
  for (size_t r = 0; r < N; r++)
    for (size_t c = 0; c < C; c++) xhat[r * C + c] = (y[r * C + c] - mean[c]) * invstd[c];
  kdp_bn_backward(dy, dgamma, dbeta, dbn, xhat, invstd, gamma, N, C);
  if (din && din_set) memset(din, 0, B * s->H * s->W * s->Cin * sizeof(float));
  kdp_conv2d_backward_naive(din, dw, db, dy, in, w, s);
  free(dy);
  free(xhat);
  free(dbn);
  free(dpool);
}
