/* layers_naive.c: plain-loop reference twins of the BLAS dense and conv kernels, for tests. */
#include "kdpeers/nn.h"

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
