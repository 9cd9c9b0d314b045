/* layers.c: the fast layer kernels (BLAS dense and im2col conv, single-pass NHWC loops). */
#include "kdpeers/nn.h"

#include <cblas.h>
/* OpenBLAS's config header pulls in <complex.h>, whose I macro clashes with our size names */
#ifdef I
#undef I
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ================= dense ================= */

/* out (B x O) = in (B x I) . w^T (w: O x I) + b */
/* batches up to this many rows go through sgemv, row by row */
#define KDP_DENSE_GEMV_MAX 2

void kdp_dense_forward(float *out, const float *in, const float *w, const float *b, size_t B,
                       size_t I, size_t O) {
  if (B == 0 || O == 0) return;
  if (I == 0) {
    for (size_t r = 0; r < B; r++)
      for (size_t o = 0; o < O; o++) out[r * O + o] = b ? b[o] : 0.0f;
    return;
  }
  if (B <= KDP_DENSE_GEMV_MAX) {
    /* a few rows (batch-1 inference): sgemm would pack all of w on every call, sgemv streams it */
    for (size_t r = 0; r < B; r++)
      cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)O, (int)I, 1.0f, w, (int)I, in + r * I, 1,
                  0.0f, out + r * O, 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)B, (int)O, (int)I, 1.0f, in, (int)I,
                w, (int)I, 0.0f, out, (int)O);
  }
  if (b) {
    for (size_t r = 0; r < B; r++) {
      float *o_row = out + r * O;
      for (size_t o = 0; o < O; o++) o_row[o] += b[o];
    }
  }
}

/* din (B x I) += dout . w; dw (O x I) += dout^T . in; db (O) += column sums of dout */
void kdp_dense_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                        const float *w, size_t B, size_t I, size_t O) {
  if (B == 0 || O == 0) return;
  if (db) {
    for (size_t r = 0; r < B; r++) {
      const float *g = dout + r * O;
      for (size_t o = 0; o < O; o++) db[o] += g[o];
    }
  }
  if (I == 0) return;
  if (dw)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)O, (int)I, (int)B, 1.0f, dout,
                (int)O, in, (int)I, 1.0f, dw, (int)I);
  if (din)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)B, (int)I, (int)O, 1.0f, dout,
                (int)O, w, (int)I, 1.0f, din, (int)I);
}

/* ================= conv2d (NHWC, im2col + GEMM) ================= */

/* Target size of one chunk's im2col matrix (or output, if larger): 2^19 floats = 2 MiB, about
   the L2, with M = chunk * OH * OW in the thousands. On the cnn's second conv (Zen 5, OpenBLAS
   Haswell kernels) 2^19 beat 2^18 and 2^20 by 2-3% of the layer's time. */
#ifndef KDP_CONV_CHUNK_TARGET
#define KDP_CONV_CHUNK_TARGET ((size_t)1 << 19)
#endif

void kdp_conv_shape_init(kdp_conv_shape *s) {
  size_t hp = s->H + 2 * s->pad, wp = s->W + 2 * s->pad;
  size_t st = s->stride ? s->stride : 1;
  s->OH = (s->K == 0 || hp < s->K) ? 0 : (hp - s->K) / st + 1;
  s->OW = (s->K == 0 || wp < s->K) ? 0 : (wp - s->K) / st + 1;
}

static int conv_is_pointwise(const kdp_conv_shape *s) {
  return s->K == 1 && s->stride == 1 && s->pad == 0;
}

static size_t conv_col_per_sample(const kdp_conv_shape *s) {
  return s->OH * s->OW * s->K * s->K * s->Cin;
}

/* Samples per chunk. Depends only on the shape and B, and never grows when B shrinks, so
   scratch sized for a batch B serves any batch <= B. */
static size_t conv_chunk(const kdp_conv_shape *s) {
  /* the output chunk counts too: with few input channels (the first conv) it is the larger */
  size_t per = conv_col_per_sample(s), per_out = s->OH * s->OW * s->Cout;
  if (per_out > per) per = per_out;
  size_t nb = per ? KDP_CONV_CHUNK_TARGET / per : s->B;
  if (nb < 1) nb = 1;
  if (nb > s->B) nb = s->B;
  return nb;
}

/* widest zero-padded input row (floats) im2col_short handles */
#define KDP_IM2COL_ROW 1024

size_t kdp_conv_scratch_floats(const kdp_conv_shape *s) {
  if (conv_is_pointwise(s) || s->B == 0) return 0;
  return 2 * conv_chunk(s) * conv_col_per_sample(s);
}

/* col ((nb*OH*OW) x (K*K*Cin)), columns ordered (kh, kw, cin), from in (nb x H x W x Cin).
   For fixed (oh, ow, kh) the K*Cin columns are one contiguous run of the input row. */
/* im2col for short runs (K * Cin < 16 floats, e.g. the first conv on 1-channel images): each
   input row is copied once into a zero-padded row, then every output position copies its K*Cin
   window from it with a fixed-trip loop (library calls would cost more than the copy). */
static void im2col_short(float *restrict col, const float *restrict in, float *restrict prow,
                         size_t nb, const kdp_conv_shape *s) {
  const size_t H = s->H, W = s->W, C = s->Cin, K = s->K, OH = s->OH, OW = s->OW;
  const size_t pad = s->pad, st = s->stride, run = K * C, kkc = K * run;
  for (size_t b = 0; b < nb; b++)
    for (size_t oh = 0; oh < OH; oh++)
      for (size_t kh = 0; kh < K; kh++) {
        ptrdiff_t ih = (ptrdiff_t)(oh * st + kh) - (ptrdiff_t)pad;
        float *dst = col + (b * OH + oh) * OW * kkc + kh * run;
        if (ih < 0 || ih >= (ptrdiff_t)H) {
          for (size_t ow = 0; ow < OW; ow++)
            for (size_t i = 0; i < 16; i++)
              if (i < run) dst[ow * kkc + i] = 0.0f;
          continue;
        }
        const float *src = in + ((b * H + (size_t)ih) * W) * C;
        memset(prow, 0, pad * C * sizeof(float));
        memcpy(prow + pad * C, src, W * C * sizeof(float));
        memset(prow + (pad + W) * C, 0, pad * C * sizeof(float));
        for (size_t ow = 0; ow < OW; ow++)
          for (size_t i = 0; i < 16; i++)
            if (i < run) dst[ow * kkc + i] = prow[ow * st * C + i];
      }
}

static void im2col(float *col, const float *in, size_t nb, const kdp_conv_shape *s) {
  const size_t H = s->H, W = s->W, C = s->Cin, K = s->K, OH = s->OH, OW = s->OW;
  const ptrdiff_t pad = (ptrdiff_t)s->pad, st = (ptrdiff_t)s->stride;
  const size_t run = K * C, kkc = K * run;
  if (run < 16 && (W + 2 * (size_t)pad) * C <= KDP_IM2COL_ROW) {
    float prow[KDP_IM2COL_ROW];
    im2col_short(col, in, prow, nb, s);
    return;
  }
  for (size_t b = 0; b < nb; b++) {
    const float *img = in + b * H * W * C;
    for (size_t oh = 0; oh < OH; oh++) {
      for (size_t ow = 0; ow < OW; ow++) {
        float *row = col + ((b * OH + oh) * OW + ow) * kkc;
        ptrdiff_t iw0 = (ptrdiff_t)ow * st - pad;
        size_t kw_lo = iw0 < 0 ? (size_t)(-iw0) : 0;
        ptrdiff_t hi = (ptrdiff_t)W - iw0;
        size_t kw_hi = hi <= 0 ? 0 : ((size_t)hi < K ? (size_t)hi : K);
        if (kw_lo > kw_hi) kw_lo = kw_hi;
        for (size_t kh = 0; kh < K; kh++) {
          float *dst = row + kh * run;
          ptrdiff_t ih = (ptrdiff_t)oh * st - pad + (ptrdiff_t)kh;
          if (ih < 0 || ih >= (ptrdiff_t)H || kw_lo == kw_hi) {
            memset(dst, 0, run * sizeof(float));
            continue;
          }
          if (kw_lo) memset(dst, 0, kw_lo * C * sizeof(float));
          memcpy(dst + kw_lo * C, img + ((size_t)ih * W + (size_t)(iw0 + (ptrdiff_t)kw_lo)) * C,
                 (kw_hi - kw_lo) * C * sizeof(float));
          if (kw_hi < K) memset(dst + kw_hi * C, 0, (K - kw_hi) * C * sizeof(float));
        }
      }
    }
  }
}

/* din (nb x H x W x Cin) += col2im(dcol); padded positions are dropped. */
static void col2im_add(float *din, const float *dcol, size_t nb, const kdp_conv_shape *s) {
  const size_t H = s->H, W = s->W, C = s->Cin, K = s->K, OH = s->OH, OW = s->OW;
  const ptrdiff_t pad = (ptrdiff_t)s->pad, st = (ptrdiff_t)s->stride;
  const size_t run = K * C, kkc = K * run;
  for (size_t b = 0; b < nb; b++) {
    float *img = din + b * H * W * C;
    for (size_t oh = 0; oh < OH; oh++) {
      for (size_t ow = 0; ow < OW; ow++) {
        const float *row = dcol + ((b * OH + oh) * OW + ow) * kkc;
        ptrdiff_t iw0 = (ptrdiff_t)ow * st - pad;
        size_t kw_lo = iw0 < 0 ? (size_t)(-iw0) : 0;
        ptrdiff_t hi = (ptrdiff_t)W - iw0;
        size_t kw_hi = hi <= 0 ? 0 : ((size_t)hi < K ? (size_t)hi : K);
        if (kw_lo >= kw_hi) continue;
        size_t n = (kw_hi - kw_lo) * C;
        for (size_t kh = 0; kh < K; kh++) {
          ptrdiff_t ih = (ptrdiff_t)oh * st - pad + (ptrdiff_t)kh;
          if (ih < 0 || ih >= (ptrdiff_t)H) continue;
          const float *src = row + kh * run + kw_lo * C;
          float *dst = img + ((size_t)ih * W + (size_t)(iw0 + (ptrdiff_t)kw_lo)) * C;
          for (size_t i = 0; i < n; i++) dst[i] += src[i];
        }
      }
    }
  }
}

static void add_bias_rows(float *out, const float *b, size_t rows, size_t C) {
  for (size_t r = 0; r < rows; r++) {
    float *o = out + r * C;
    for (size_t c = 0; c < C; c++) o[c] += b[c];
  }
}

/* conv output rows of samples [b0, b0 + n) (no bias); the pointwise input is its own im2col */
static void conv_forward_chunk(float *out, const float *in, const float *w, float *scratch,
                               size_t b0, size_t n, const kdp_conv_shape *s) {
  const size_t Cout = s->Cout, kkc = s->K * s->K * s->Cin, ohw = s->OH * s->OW;
  const size_t in_per = s->H * s->W * s->Cin;
  float *o = out + b0 * ohw * Cout;
  if (kkc == 0) {
    memset(o, 0, n * ohw * Cout * sizeof(float));
    return;
  }
  const float *col = in + b0 * in_per;
  if (!conv_is_pointwise(s)) {
    im2col(scratch, col, n, s);
    col = scratch;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(n * ohw), (int)Cout, (int)kkc, 1.0f,
              col, (int)kkc, w, (int)kkc, 0.0f, o, (int)Cout);
}

/* samples per chunk of the conv loops (pointwise convs need no scratch, so one chunk) */
static size_t conv_loop_chunk(const kdp_conv_shape *s) {
  return conv_is_pointwise(s) ? s->B : conv_chunk(s);
}

void kdp_conv2d_forward(float *out, const float *in, const float *w, const float *b,
                        float *scratch, const kdp_conv_shape *s) {
  const size_t B = s->B, Cout = s->Cout, ohw = s->OH * s->OW;
  if (B == 0 || ohw == 0 || Cout == 0) return;
  const size_t nb = conv_loop_chunk(s);
  for (size_t b0 = 0; b0 < B; b0 += nb)
    conv_forward_chunk(out, in, w, scratch, b0, B - b0 < nb ? B - b0 : nb, s);
  if (b) add_bias_rows(out, b, B * ohw, Cout);
}

void kdp_conv2d_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                         const float *w, float *scratch, const kdp_conv_shape *s) {
  const size_t B = s->B, Cout = s->Cout, kkc = s->K * s->K * s->Cin, ohw = s->OH * s->OW;
  if (B == 0 || ohw == 0 || Cout == 0) return;
  if (db) {
    for (size_t r = 0; r < B * ohw; r++) {
      const float *g = dout + r * Cout;
      for (size_t c = 0; c < Cout; c++) db[c] += g[c];
    }
  }
  if (kkc == 0 || (!dw && !din)) return;
  if (conv_is_pointwise(s)) {
    const int M = (int)(B * ohw);
    if (dw)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)Cout, (int)kkc, M, 1.0f, dout,
                  (int)Cout, in, (int)kkc, 1.0f, dw, (int)kkc);
    if (din)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)Cout, 1.0f, dout,
                  (int)Cout, w, (int)kkc, 1.0f, din, (int)kkc);
    return;
  }
  const size_t nb = conv_chunk(s), in_per = s->H * s->W * s->Cin;
  float *col = scratch, *dcol = scratch + nb * ohw * kkc;
  for (size_t b0 = 0; b0 < B; b0 += nb) {
    size_t n = B - b0 < nb ? B - b0 : nb;
    const int M = (int)(n * ohw);
    const float *g = dout + b0 * ohw * Cout;
    if (dw) {
      im2col(col, in + b0 * in_per, n, s);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)Cout, (int)kkc, M, 1.0f, g,
                  (int)Cout, col, (int)kkc, 1.0f, dw, (int)kkc);
    }
    if (din) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)Cout, 1.0f, g,
                  (int)Cout, w, (int)kkc, 0.0f, dcol, (int)kkc);
      col2im_add(din + b0 * in_per, dcol, n, s);
    }
  }
}

/* ================= pooling ================= */

static size_t pool_out(size_t H, size_t K, size_t stride, size_t pad) {
  size_t hp = H + 2 * pad;
  if (K == 0 || hp < K) return 0;
  return (hp - K) / (stride ? stride : 1) + 1;
}

/* Window [lo, hi) of valid input rows/cols for output position o. */
static void pool_window(size_t o, size_t K, size_t stride, size_t pad, size_t H, size_t *lo,
                        size_t *hi) {
  ptrdiff_t a = (ptrdiff_t)(o * stride) - (ptrdiff_t)pad;
  ptrdiff_t e = a + (ptrdiff_t)K;
  if (a < 0) a = 0;
  if (e > (ptrdiff_t)H) e = (ptrdiff_t)H;
  if (e < a) e = a;
  *lo = (size_t)a;
  *hi = (size_t)e;
}

void kdp_maxpool_forward(float *out, int32_t *argmax, const float *in, size_t B, size_t H,
                         size_t W, size_t C, size_t K, size_t stride, size_t pad) {
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  for (size_t b = 0; b < B; b++) {
    for (size_t oh = 0; oh < OH; oh++) {
      size_t h0, h1;
      pool_window(oh, K, stride, pad, H, &h0, &h1);
      for (size_t ow = 0; ow < OW; ow++) {
        size_t w0, w1;
        pool_window(ow, K, stride, pad, W, &w0, &w1);
        size_t oidx = ((b * OH + oh) * OW + ow) * C;
        float *restrict o = out + oidx;
        int32_t *restrict am = argmax + oidx;
        if (h0 == h1 || w0 == w1) { /* window entirely in the padding (pad > K/2) */
          for (size_t c = 0; c < C; c++) {
            o[c] = -INFINITY;
            am[c] = -1;
          }
          continue;
        }
        /* the first valid position starts the scan; later ones win only if strictly larger
           (ties -> first max) or NaN (propagates, as PyTorch does) */
        size_t first = ((b * H + h0) * W + w0) * C;
        for (size_t c = 0; c < C; c++) {
          o[c] = in[first + c];
          am[c] = (int32_t)(first + c);
        }
        for (size_t h = h0; h < h1; h++) {
          for (size_t w = (h == h0 ? w0 + 1 : w0); w < w1; w++) {
            size_t base = ((b * H + h) * W + w) * C;
            const float *restrict x = in + base;
            for (size_t c = 0; c < C; c++) {
              float v = x[c];
              int take = (v > o[c]) | (v != v);
              o[c] = take ? v : o[c];
              am[c] = take ? (int32_t)(base + c) : am[c];
            }
          }
        }
      }
    }
  }
}

void kdp_maxpool_backward(float *din, const float *dout, const int32_t *argmax, size_t n_out) {
  if (!din) return;
  for (size_t i = 0; i < n_out; i++)
    if (argmax[i] >= 0) din[argmax[i]] += dout[i];
}

void kdp_avgpool_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C,
                         size_t K, size_t stride, size_t pad) {
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  const float inv = K ? 1.0f / (float)(K * K) : 0.0f;
  for (size_t b = 0; b < B; b++) {
    for (size_t oh = 0; oh < OH; oh++) {
      size_t h0, h1;
      pool_window(oh, K, stride, pad, H, &h0, &h1);
      for (size_t ow = 0; ow < OW; ow++) {
        size_t w0, w1;
        pool_window(ow, K, stride, pad, W, &w0, &w1);
        float *o = out + ((b * OH + oh) * OW + ow) * C;
        for (size_t c = 0; c < C; c++) o[c] = 0.0f;
        for (size_t h = h0; h < h1; h++)
          for (size_t w = w0; w < w1; w++) {
            const float *x = in + ((b * H + h) * W + w) * C;
            for (size_t c = 0; c < C; c++) o[c] += x[c];
          }
        for (size_t c = 0; c < C; c++) o[c] *= inv;
      }
    }
  }
}

void kdp_avgpool_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C,
                          size_t K, size_t stride, size_t pad) {
  if (!din) return;
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  const float inv = K ? 1.0f / (float)(K * K) : 0.0f;
  for (size_t b = 0; b < B; b++) {
    for (size_t oh = 0; oh < OH; oh++) {
      size_t h0, h1;
      pool_window(oh, K, stride, pad, H, &h0, &h1);
      for (size_t ow = 0; ow < OW; ow++) {
        size_t w0, w1;
        pool_window(ow, K, stride, pad, W, &w0, &w1);
        const float *g = dout + ((b * OH + oh) * OW + ow) * C;
        for (size_t h = h0; h < h1; h++)
          for (size_t w = w0; w < w1; w++) {
            float *d = din + ((b * H + h) * W + w) * C;
            for (size_t c = 0; c < C; c++) d[c] += g[c] * inv;
          }
      }
    }
  }
}

void kdp_gap_forward(float *out, const float *in, size_t B, size_t HW, size_t C) {
  const float inv = HW ? 1.0f / (float)HW : 0.0f;
  for (size_t b = 0; b < B; b++) {
    float *o = out + b * C;
    const float *x = in + b * HW * C;
    for (size_t c = 0; c < C; c++) o[c] = 0.0f;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) o[c] += x[p * C + c];
    for (size_t c = 0; c < C; c++) o[c] *= inv;
  }
}

void kdp_gap_backward(float *din, const float *dout, size_t B, size_t HW, size_t C) {
  if (!din) return;
  const float inv = HW ? 1.0f / (float)HW : 0.0f;
  for (size_t b = 0; b < B; b++) {
    const float *g = dout + b * C;
    float *d = din + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) d[p * C + c] += g[c] * inv;
  }
}

/* ================= element-wise ================= */

void kdp_relu_forward(float *out, const float *in, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = in[i] > 0.0f ? in[i] : 0.0f;
}

void kdp_relu_backward(float *din, const float *dout, const float *out, size_t n) {
  if (!din) return;
  for (size_t i = 0; i < n; i++) din[i] += out[i] > 0.0f ? dout[i] : 0.0f;
}

void kdp_dropout_forward(float *out, float *mask, const float *in, size_t n, float p,
                         kdp_rng *rng) {
  if (p <= 0.0f || !rng) {
    for (size_t i = 0; i < n; i++) {
      mask[i] = 1.0f;
      out[i] = in[i];
    }
    return;
  }
  if (p >= 1.0f) {
    for (size_t i = 0; i < n; i++) mask[i] = out[i] = 0.0f;
    return;
  }
  const float keep = 1.0f / (1.0f - p);
  for (size_t i = 0; i < n; i++) mask[i] = kdp_rng_uniform(rng) < p ? 0.0f : keep;
  for (size_t i = 0; i < n; i++) out[i] = in[i] * mask[i];
}

void kdp_dropout_backward(float *din, const float *dout, const float *mask, size_t n) {
  if (!din) return;
  for (size_t i = 0; i < n; i++) din[i] += dout[i] * mask[i];
}

/* NHWC (HW x C per sample) -> NCHW (C x HW), i.e. a transpose per sample. */
void kdp_flatten_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C) {
  const size_t HW = H * W;
  for (size_t b = 0; b < B; b++) {
    const float *x = in + b * HW * C;
    float *o = out + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) o[c * HW + p] = x[p * C + c];
  }
}

void kdp_flatten_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C) {
  if (!din) return;
  const size_t HW = H * W;
  for (size_t b = 0; b < B; b++) {
    const float *g = dout + b * HW * C;
    float *d = din + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) d[p * C + c] += g[c * HW + p];
  }
}

void kdp_add_forward(float *out, const float *a, const float *b, size_t n) {
  for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void kdp_add_backward(float *da, float *db, const float *dout, size_t n) {
  if (da)
    for (size_t i = 0; i < n; i++) da[i] += dout[i];
  if (db)
    for (size_t i = 0; i < n; i++) db[i] += dout[i];
}

/* Output spatial size of x[:, ::stride, ::stride]: ceil(H / stride). */
static size_t sub_size(size_t H, size_t stride) {
  size_t st = stride ? stride : 1;
  return H ? (H - 1) / st + 1 : 0;
}

void kdp_shortcut_a_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t Cin,
                            size_t Cout, size_t stride) {
  const size_t OH = sub_size(H, stride), OW = sub_size(W, stride), st = stride ? stride : 1;
  const size_t lo = Cout > Cin ? (Cout - Cin) / 2 : 0;
  const size_t nc = Cin < Cout - lo ? Cin : Cout - lo;
  for (size_t b = 0; b < B; b++)
    for (size_t oh = 0; oh < OH; oh++)
      for (size_t ow = 0; ow < OW; ow++) {
        float *o = out + ((b * OH + oh) * OW + ow) * Cout;
        const float *x = in + ((b * H + oh * st) * W + ow * st) * Cin;
        for (size_t c = 0; c < lo; c++) o[c] = 0.0f;
        for (size_t c = 0; c < nc; c++) o[lo + c] = x[c];
        for (size_t c = lo + nc; c < Cout; c++) o[c] = 0.0f;
      }
}

void kdp_shortcut_a_backward(float *din, const float *dout, size_t B, size_t H, size_t W,
                             size_t Cin, size_t Cout, size_t stride) {
  if (!din) return;
  const size_t OH = sub_size(H, stride), OW = sub_size(W, stride), st = stride ? stride : 1;
  const size_t lo = Cout > Cin ? (Cout - Cin) / 2 : 0;
  const size_t nc = Cin < Cout - lo ? Cin : Cout - lo;
  for (size_t b = 0; b < B; b++)
    for (size_t oh = 0; oh < OH; oh++)
      for (size_t ow = 0; ow < OW; ow++) {
        const float *g = dout + ((b * OH + oh) * OW + ow) * Cout + lo;
        float *d = din + ((b * H + oh * st) * W + ow * st) * Cin;
        for (size_t c = 0; c < nc; c++) d[c] += g[c];
      }
}

/* ================= batchnorm ================= */

/* Row loops of batchnorm as helpers with restrict parameters, so gcc vectorises the channel
   loop without runtime alias checks. */
/* The per-channel sums below take rows four at a time, so the running sums (which live in
   memory) see one dependent add per four rows instead of one per row. */
static void bn_stats_rows(double *restrict sum, double *restrict sq, const float *restrict in,
                          const double *restrict sh, size_t N, size_t C) {
  size_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const float *x0 = in + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
    for (size_t c = 0; c < C; c++) {
      double d0 = (double)x0[c] - sh[c], d1 = (double)x1[c] - sh[c];
      double d2 = (double)x2[c] - sh[c], d3 = (double)x3[c] - sh[c];
      sum[c] += (d0 + d1) + (d2 + d3);
      sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; n < N; n++) {
    const float *x = in + n * C;
    for (size_t c = 0; c < C; c++) {
      double d = (double)x[c] - sh[c];
      sum[c] += d;
      sq[c] += d * d;
    }
  }
}

static void bn_norm_rows(float *restrict out, float *restrict xhat, const float *restrict in,
                         const float *restrict mean, const float *restrict invstd,
                         const float *restrict gamma, const float *restrict beta, size_t N,
                         size_t C) {
  for (size_t n = 0; n < N; n++) {
    const float *x = in + n * C;
    float *xh = xhat + n * C, *o = out + n * C;
    for (size_t c = 0; c < C; c++) {
      float v = (x[c] - mean[c]) * invstd[c];
      xh[c] = v;
      o[c] = v * gamma[c] + beta[c];
    }
  }
}

/* mean and invstd from the shifted sums of N rows; updates the running stats like PyTorch */
static void bn_finish_stats(float *mean, float *invstd, float *run_mean, float *run_var,
                            const double *sum, const double *sq, const double *sh, size_t N,
                            size_t C, float momentum, float eps) {
  const double invN = 1.0 / (double)N;
  for (size_t c = 0; c < C; c++) {
    double m = sum[c] * invN;
    double var = sq[c] * invN - m * m;
    if (var < 0) var = 0;
    double mu = sh[c] + m;
    mean[c] = (float)mu;
    invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
    if (run_mean) run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * (float)mu;
    if (run_var) {
      double unb = N > 1 ? var * (double)N / (double)(N - 1) : var;
      run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (float)unb;
    }
  }
}

void kdp_bn_forward_train(float *out, float *xhat, float *invstd, float *run_mean,
                          float *run_var, const float *in, const float *gamma, const float *beta,
                          size_t N, size_t C, float momentum, float eps) {
  if (C == 0) return;
  if (N == 0) {
    for (size_t c = 0; c < C; c++) invstd[c] = 1.0f / sqrtf(1.0f + eps);
    return;
  }
  double *sum = kdp_xcalloc(3 * C, sizeof(double)), *sq = sum + C, *sh = sum + 2 * C;
  float *mean = kdp_xmalloc(C * sizeof(float));
  /* sums shifted by the first row keep the sum-of-squares cancellation small */
  for (size_t c = 0; c < C; c++) sh[c] = (double)in[c];
  bn_stats_rows(sum, sq, in, sh, N, C);
  bn_finish_stats(mean, invstd, run_mean, run_var, sum, sq, sh, N, C, momentum, eps);
  bn_norm_rows(out, xhat, in, mean, invstd, gamma, beta, N, C);
  free(mean);
  free(sum);
}

/* eval-mode batchnorm as out = in * scale + shift */
static void bn_eval_coefs(float *scale, float *shift, const float *gamma, const float *beta,
                          const float *run_mean, const float *run_var, size_t C, float eps) {
  for (size_t c = 0; c < C; c++) {
    double is = 1.0 / sqrt((double)run_var[c] + (double)eps);
    scale[c] = (float)((double)gamma[c] * is);
    shift[c] = (float)((double)beta[c] - (double)run_mean[c] * (double)gamma[c] * is);
  }
}

void kdp_bn_forward_eval(float *out, const float *in, const float *gamma, const float *beta,
                         const float *run_mean, const float *run_var, size_t N, size_t C,
                         float eps) {
  if (C == 0) return;
  float *scale = kdp_xmalloc(2 * C * sizeof(float)), *shift = scale + C;
  bn_eval_coefs(scale, shift, gamma, beta, run_mean, run_var, C, eps);
  for (size_t n = 0; n < N; n++) {
    const float *x = in + n * C;
    float *o = out + n * C;
    for (size_t c = 0; c < C; c++) o[c] = x[c] * scale[c] + shift[c];
  }
  free(scale);
}

static void bn_bwd_sums(double *restrict sg, double *restrict sb, const float *restrict dout,
                        const float *restrict xhat, size_t N, size_t C) {
  size_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const float *g0 = dout + n * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
    const float *h0 = xhat + n * C, *h1 = h0 + C, *h2 = h1 + C, *h3 = h2 + C;
    for (size_t c = 0; c < C; c++) {
      sg[c] += ((double)g0[c] * (double)h0[c] + (double)g1[c] * (double)h1[c]) +
               ((double)g2[c] * (double)h2[c] + (double)g3[c] * (double)h3[c]);
      sb[c] += ((double)g0[c] + (double)g1[c]) + ((double)g2[c] + (double)g3[c]);
    }
  }
  for (; n < N; n++) {
    const float *g = dout + n * C, *xh = xhat + n * C;
    for (size_t c = 0; c < C; c++) {
      sg[c] += (double)g[c] * (double)xh[c];
      sb[c] += (double)g[c];
    }
  }
}

static void bn_bwd_din(float *restrict din, const float *restrict dout,
                       const float *restrict xhat, const float *restrict k1,
                       const float *restrict k2, const float *restrict k3, size_t N, size_t C) {
  for (size_t n = 0; n < N; n++) {
    const float *g = dout + n * C, *xh = xhat + n * C;
    float *d = din + n * C;
    for (size_t c = 0; c < C; c++) d[c] += k1[c] * g[c] - k2[c] - k3[c] * xh[c];
  }
}

/* the same, writing din instead of adding (saves zeroing it first) */
static void bn_bwd_din_set(float *restrict din, const float *restrict dout,
                           const float *restrict xhat, const float *restrict k1,
                           const float *restrict k2, const float *restrict k3, size_t N,
                           size_t C) {
  for (size_t n = 0; n < N; n++) {
    const float *g = dout + n * C, *xh = xhat + n * C;
    float *d = din + n * C;
    for (size_t c = 0; c < C; c++) d[c] = k1[c] * g[c] - k2[c] - k3[c] * xh[c];
  }
}

/* din = k1 * dout - k2 - k3 * xhat per channel, from the sums of dout*xhat (sg) and dout (sb) */
static void bn_bwd_coefs(float *k1, float *k2, float *k3, const double *sg, const double *sb,
                         const float *invstd, const float *gamma, size_t N, size_t C) {
  for (size_t c = 0; c < C; c++) {
    double a = (double)gamma[c] * (double)invstd[c];
    k1[c] = (float)a;
    k2[c] = (float)(a * sb[c] / (double)N);
    k3[c] = (float)(a * sg[c] / (double)N);
  }
}

/* dgamma += sum dout*xhat; dbeta += sum dout;
   din += gamma*invstd/N * (N*dout - sum(dout) - xhat*sum(dout*xhat)) */
static void bn_backward(float *din, float *dgamma, float *dbeta, const float *dout,
                        const float *xhat, const float *invstd, const float *gamma, size_t N,
                        size_t C, int set) {
  if (C == 0 || N == 0) return;
  double *sg = kdp_xcalloc(2 * C, sizeof(double)), *sb = sg + C;
  bn_bwd_sums(sg, sb, dout, xhat, N, C);
  if (dgamma)
    for (size_t c = 0; c < C; c++) dgamma[c] += (float)sg[c];
  if (dbeta)
    for (size_t c = 0; c < C; c++) dbeta[c] += (float)sb[c];
  if (din) {
    float *k = kdp_xmalloc(3 * C * sizeof(float));
    float *k1 = k, *k2 = k + C, *k3 = k + 2 * C;
    bn_bwd_coefs(k1, k2, k3, sg, sb, invstd, gamma, N, C);
    if (set)
      bn_bwd_din_set(din, dout, xhat, k1, k2, k3, N, C);
    else
      bn_bwd_din(din, dout, xhat, k1, k2, k3, N, C);
    free(k);
  }
  free(sg);
}

void kdp_bn_backward(float *din, float *dgamma, float *dbeta, const float *dout,
                     const float *xhat, const float *invstd, const float *gamma, size_t N,
                     size_t C) {
  bn_backward(din, dgamma, dbeta, dout, xhat, invstd, gamma, N, C, 0);
}

void kdp_bn_backward_set(float *din, float *dgamma, float *dbeta, const float *dout,
                         const float *xhat, const float *invstd, const float *gamma, size_t N,
                         size_t C) {
  bn_backward(din, dgamma, dbeta, dout, xhat, invstd, gamma, N, C, 1);
}

/* batchnorm in pieces: the helpers above, for rows spread over processes */
void kdp_bn_stats_rows(double *sum, double *sq, const float *in, const double *shift, size_t N,
                       size_t C) {
  bn_stats_rows(sum, sq, in, shift, N, C);
}

void kdp_bn_stats_finish(float *mean, float *invstd, float *run_mean, float *run_var,
                         const double *sum, const double *sq, const double *shift, size_t total,
                         size_t C, float momentum, float eps) {
  bn_finish_stats(mean, invstd, run_mean, run_var, sum, sq, shift, total ? total : 1, C, momentum,
                  eps);
}

void kdp_bn_normalize(float *out, float *xhat, const float *in, const float *mean,
                      const float *invstd, const float *gamma, const float *beta, size_t N,
                      size_t C) {
  bn_norm_rows(out, xhat, in, mean, invstd, gamma, beta, N, C);
}

void kdp_bn_backward_sums(double *sg, double *sb, const float *dout, const float *xhat, size_t N,
                          size_t C) {
  bn_bwd_sums(sg, sb, dout, xhat, N, C);
}

void kdp_bn_backward_rows(float *din, const float *dout, const float *xhat, const double *sg,
                          const double *sb, const float *invstd, const float *gamma,
                          size_t total, size_t N, size_t C) {
  if (C == 0 || N == 0) return;
  float *k = kdp_xmalloc(3 * C * sizeof(float));
  bn_bwd_coefs(k, k + C, k + 2 * C, sg, sb, invstd, gamma, total, C);
  bn_bwd_din(din, dout, xhat, k, k + C, k + 2 * C, N, C);
  free(k);
}

/* ================= fused conv -> batchnorm -> 2x2 max-pool -> relu ================= */

/* One sweep over the conv output per direction instead of five: batch statistics are summed
   chunk by chunk while the GEMM output is in cache, the normalised map is never stored (only the
   pooled, relu'd output, each window's winner and its xhat), and backward builds the conv output
   gradient chunk by chunk in scratch (it is 3/4 zeros from the pool, so it is cheap to recompute)
   right before that chunk's GEMMs. */

size_t kdp_conv_bn_pool_relu_scratch_floats(const kdp_conv_shape *s) {
  if (s->B == 0) return 0;
  return kdp_conv_scratch_floats(s) + conv_loop_chunk(s) * s->OH * s->OW * s->Cout;
}

/* db (C) += column sums of g (rows x C), four rows per dependent add */
static void col_sums4(float *restrict db, const float *restrict g, size_t rows, size_t C) {
  size_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float *g0 = g + r * C, *g1 = g0 + C, *g2 = g1 + C, *g3 = g2 + C;
    for (size_t c = 0; c < C; c++) db[c] += (g0[c] + g1[c]) + (g2[c] + g3[c]);
  }
  for (; r < rows; r++)
    for (size_t c = 0; c < C; c++) db[c] += g[r * C + c];
}

static void cbpr_pool_train(float *restrict out, uint8_t *restrict win, float *restrict xwin,
                            const float *restrict y, const float *restrict mean,
                            const float *restrict invstd, const float *restrict gamma,
                            const float *restrict beta, size_t B, size_t H, size_t W,
                            size_t C) {
  const size_t PH = H / 2, PW = W / 2;
  for (size_t b = 0; b < B; b++)
    for (size_t ph = 0; ph < PH; ph++)
      for (size_t pw = 0; pw < PW; pw++) {
        const float *y0 = y + ((b * H + 2 * ph) * W + 2 * pw) * C;
        const float *y1 = y0 + C, *y2 = y0 + W * C, *y3 = y2 + C;
        const size_t po = ((b * PH + ph) * PW + pw) * C;
        for (size_t c = 0; c < C; c++) {
          float x0 = (y0[c] - mean[c]) * invstd[c], x1 = (y1[c] - mean[c]) * invstd[c];
          float x2 = (y2[c] - mean[c]) * invstd[c], x3 = (y3[c] - mean[c]) * invstd[c];
          float v0 = x0 * gamma[c] + beta[c], v1 = x1 * gamma[c] + beta[c];
          float v2 = x2 * gamma[c] + beta[c], v3 = x3 * gamma[c] + beta[c];
          /* kdp_maxpool_forward's scan: strictly larger or NaN wins */
          float m = v0, xm = x0;
          int k = 0, t = (v1 > m) | (v1 != v1);
          m = t ? v1 : m;
          xm = t ? x1 : xm;
          k = t ? 1 : k;
          t = (v2 > m) | (v2 != v2);
          m = t ? v2 : m;
          xm = t ? x2 : xm;
          k = t ? 2 : k;
          t = (v3 > m) | (v3 != v3);
          m = t ? v3 : m;
          xm = t ? x3 : xm;
          k = t ? 3 : k;
          out[po + c] = m > 0.0f ? m : 0.0f;
          xwin[po + c] = xm;
          win[po + c] = (uint8_t)(k | (m > 0.0f ? KDP_WIN_RELU : 0));
        }
      }
}

static void cbpr_pool_eval(float *restrict out, const float *restrict y,
                           const float *restrict scale, const float *restrict shift, size_t B,
                           size_t H, size_t W, size_t C) {
  const size_t PH = H / 2, PW = W / 2;
  for (size_t b = 0; b < B; b++)
    for (size_t ph = 0; ph < PH; ph++)
      for (size_t pw = 0; pw < PW; pw++) {
        const float *y0 = y + ((b * H + 2 * ph) * W + 2 * pw) * C;
        const float *y1 = y0 + C, *y2 = y0 + W * C, *y3 = y2 + C;
        float *o = out + ((b * PH + ph) * PW + pw) * C;
        for (size_t c = 0; c < C; c++) {
          float v0 = y0[c] * scale[c] + shift[c], v1 = y1[c] * scale[c] + shift[c];
          float v2 = y2[c] * scale[c] + shift[c], v3 = y3[c] * scale[c] + shift[c];
          float m = v0;
          m = (v1 > m) | (v1 != v1) ? v1 : m;
          m = (v2 > m) | (v2 != v2) ? v2 : m;
          m = (v3 > m) | (v3 != v3) ? v3 : m;
          o[c] = m > 0.0f ? m : 0.0f;
        }
      }
}

void kdp_conv_bn_pool_relu_forward(float *out, uint8_t *win, float *xwin, float *y, float *mean,
                                   float *invstd, float *run_mean, float *run_var,
                                   const float *in, const float *w, const float *b,
                                   const float *gamma, const float *beta, float *scratch,
                                   const kdp_conv_shape *s, int train, float momentum,
                                   float eps) {
  const size_t B = s->B, C = s->Cout, ohw = s->OH * s->OW;
  if (B == 0 || ohw == 0 || C == 0) return;
  const size_t nb = conv_loop_chunk(s), pohw = (s->OH / 2) * (s->OW / 2);
  double *sum = kdp_xcalloc(3 * C, sizeof(double)), *sq = sum + C, *sh = sum + 2 * C;
  float *scale = NULL, *shift = NULL;
  if (!train) {
    scale = kdp_xmalloc(2 * C * sizeof(float));
    shift = scale + C;
    bn_eval_coefs(scale, shift, gamma, beta, run_mean, run_var, C, eps);
  }
  for (size_t b0 = 0; b0 < B; b0 += nb) {
    size_t n = B - b0 < nb ? B - b0 : nb;
    float *yc = y + b0 * ohw * C;
    conv_forward_chunk(y, in, w, scratch, b0, n, s);
    if (b) add_bias_rows(yc, b, n * ohw, C);
    if (!train) {
      /* eval: normalise, pool and relu the chunk while its GEMM output is in cache */
      cbpr_pool_eval(out + b0 * pohw * C, yc, scale, shift, n, s->OH, s->OW, C);
      continue;
    }
    /* the statistics of kdp_bn_forward_train, summed while the chunk is in cache */
    if (b0 == 0)
      for (size_t c = 0; c < C; c++) sh[c] = (double)y[c];
    bn_stats_rows(sum, sq, yc, sh, n * ohw, C);
  }
  if (train) {
    bn_finish_stats(mean, invstd, run_mean, run_var, sum, sq, sh, B * ohw, C, momentum, eps);
    cbpr_pool_train(out, win, xwin, y, mean, invstd, gamma, beta, B, s->OH, s->OW, C);
  }
  free(scale);
  free(sum);
}

/* sums over the pooled positions: the relu'd pool gradient only reaches the winners; gc (4 * C
   floats) holds four rows of it, so that both loops vectorise */
static void cbpr_bwd_sums(double *restrict sg, double *restrict sb, float *restrict gc,
                          const float *restrict dout, const uint8_t *restrict win,
                          const float *restrict xwin, size_t NP, size_t C) {
  for (size_t n = 0; n < NP; n += 4) {
    const size_t rows = NP - n < 4 ? NP - n : 4;
    const float *g = dout + n * C;
    const uint8_t *o = win + n * C;
    for (size_t c = 0; c < rows * C; c++) gc[c] = (o[c] & KDP_WIN_RELU) ? g[c] : 0.0f;
    bn_bwd_sums(sg, sb, gc, xwin + n * C, rows, C); /* same summation order as batchnorm's */
  }
}

/* dy (nb x H x W x C) = k1 * dbn - k2 - k3 * xhat, with xhat recomputed from y and dbn nonzero
   only at the winners of windows whose pooled output passed the relu (win = k | KDP_WIN_RELU) */
static void cbpr_dy(float *restrict dy, const float *restrict y, const float *restrict dout,
                    const uint8_t *restrict win,
                    const float *restrict k1, const float *restrict k2, const float *restrict k3,
                    const float *restrict mean, const float *restrict invstd, size_t nb, size_t H,
                    size_t W, size_t C) {
  const size_t PH = H / 2, PW = W / 2;
  for (size_t b = 0; b < nb; b++)
    for (size_t h = 0; h < H; h++)
      for (size_t w = 0; w < W; w++) {
        const size_t r = ((b * H + h) * W + w) * C;
        if (h / 2 < PH && w / 2 < PW) {
          const size_t po = ((b * PH + h / 2) * PW + w / 2) * C;
          const int k = (int)((h & 1) * 2 + (w & 1));
          for (size_t c = 0; c < C; c++) {
            float xh = (y[r + c] - mean[c]) * invstd[c];
            float gv = k1[c] * dout[po + c]; /* unconditional loads: the loop vectorises */
            int hit = (int)win[po + c] == (k | KDP_WIN_RELU);
            float t = hit ? gv : 0.0f;
            dy[r + c] = t - k2[c] - k3[c] * xh;
          }
        } else {
          for (size_t c = 0; c < C; c++) {
            float xh = (y[r + c] - mean[c]) * invstd[c];
            dy[r + c] = 0.0f - k2[c] - k3[c] * xh;
          }
        }
      }
}

void kdp_conv_bn_pool_relu_backward(float *din, int din_set, float *dw, float *db, float *dgamma,
                                    float *dbeta, const float *dout, const float *out,
                                    const uint8_t *win, const float *xwin, const float *y,
                                    const float *mean, const float *invstd, const float *in,
                                    const float *w, const float *gamma, float *scratch,
                                    const kdp_conv_shape *s) {
  const size_t B = s->B, C = s->Cout, OH = s->OH, OW = s->OW, ohw = OH * OW;
  const size_t pp = (OH / 2) * (OW / 2), kkc = s->K * s->K * s->Cin;
  const size_t in_per = s->H * s->W * s->Cin;
  if (B == 0 || ohw == 0 || C == 0) return;
  double *sg = kdp_xcalloc(2 * C, sizeof(double)), *sb = sg + C;
  float *k = kdp_xmalloc(7 * C * sizeof(float)); /* k1, k2, k3, 4 rows of cbpr_bwd_sums */
  float *k1 = k, *k2 = k + C, *k3 = k + 2 * C;
  (void)out; /* the relu's mask is in win */
  cbpr_bwd_sums(sg, sb, k + 3 * C, dout, win, xwin, B * pp, C);
  if (dgamma)
    for (size_t c = 0; c < C; c++) dgamma[c] += (float)sg[c];
  if (dbeta)
    for (size_t c = 0; c < C; c++) dbeta[c] += (float)sb[c];
  bn_bwd_coefs(k1, k2, k3, sg, sb, invstd, gamma, B * ohw, C);
  const size_t nb = conv_loop_chunk(s);
  const int pointwise = conv_is_pointwise(s);
  float *dy = scratch, *col = dy + nb * ohw * C, *dcol = col + nb * ohw * kkc;
  for (size_t b0 = 0; b0 < B; b0 += nb) {
    size_t n = B - b0 < nb ? B - b0 : nb;
    const int M = (int)(n * ohw);
    cbpr_dy(dy, y + b0 * ohw * C, dout + b0 * pp * C, win + b0 * pp * C, k1, k2, k3, mean,
            invstd, n, OH, OW, C);
    if (db) col_sums4(db, dy, n * ohw, C);
    if (kkc == 0) continue;
    const float *x = in + b0 * in_per;
    if (dw) {
      if (!pointwise) {
        im2col(col, x, n, s);
        x = col;
      }
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)C, (int)kkc, M, 1.0f, dy, (int)C,
                  x, (int)kkc, 1.0f, dw, (int)kkc);
    }
    if (din) {
      float *d = din + b0 * in_per;
      if (pointwise) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)C, 1.0f, dy,
                    (int)C, w, (int)kkc, din_set ? 0.0f : 1.0f, d, (int)kkc);
      } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)C, 1.0f, dy,
                    (int)C, w, (int)kkc, 0.0f, dcol, (int)kkc);
        /* the chunk's samples own this part of din: zero it while it is about to be touched */
        if (din_set) memset(d, 0, n * in_per * sizeof(float));
        col2im_add(d, dcol, n, s);
      }
    }
  }
  free(k);
  free(sg);
}
