/* layers.c: the fast layer kernels (BLAS dense and im2col conv, single-pass NHWC loops), run on
   the team of threads of par.h in fixed tasks (results independent of the thread count). */
#include "kdpeers/nn.h"

#include <cblas.h>
/* OpenBLAS's config header pulls in <complex.h>, whose I macro clashes with our size names */
#ifdef I
#undef I
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "par.h"

/* The arguments of one parallel loop body (par.h: fn(ctx, lo, hi)); each body uses the fields it
   needs. */
typedef struct la {
  float *out, *out2;
  const float *in, *in2, *g;
  const int32_t *am;
  size_t B, H, W, C, C2, K, stride, pad, OH, OW, n;
  float f;
} la;

/* ================= dense ================= */

/* tile t of out = in . w^T + b (then relu'd when `relu`): the tile's part of out starts as the
   bias rows and the GEMM adds onto it (beta = 1), which saves OpenBLAS's zeroing pass and a bias
   pass; the relu runs on the tile while it is in cache */
static void dense_fwd_tile(const kdp_gemm *g, const float *b, int relu, size_t t) {
  size_t lo, hi;
  kdp_gemm_tile_range(g, t, &lo, &hi);
  const size_t r0 = g->split_n ? 0 : lo, r1 = g->split_n ? g->M : hi;
  const size_t c0 = g->split_n ? lo : 0, c1 = g->split_n ? hi : g->N;
  if (b)
    for (size_t r = r0; r < r1; r++)
      memcpy(g->C + r * g->ldc + c0, b + c0, (c1 - c0) * sizeof(float));
  kdp_gemm_tile(g, t);
  if (relu)
    for (size_t r = r0; r < r1; r++) {
      float *o = g->C + r * g->ldc;
      for (size_t c = c0; c < c1; c++) o[c] = o[c] > 0.0f ? o[c] : 0.0f;
    }
}

typedef struct dense_fwd_ctx {
  kdp_gemm g;
  const float *b;
  int relu;
} dense_fwd_ctx;

static void dense_fwd_tiles(void *ctx, size_t lo, size_t hi) {
  const dense_fwd_ctx *c = ctx;
  for (size_t t = lo; t < hi; t++) dense_fwd_tile(&c->g, c->b, c->relu, t);
}

/* batches up to this many rows go through sgemv, row by row */
#define KDP_DENSE_GEMV_MAX 2

static void dense_forward(float *out, const float *in, const float *w, const float *b, size_t B,
                          size_t I, size_t O, int relu) {
  if (B == 0 || O == 0) return;
  if (I == 0) {
    for (size_t r = 0; r < B; r++)
      for (size_t o = 0; o < O; o++) {
        float v = b ? b[o] : 0.0f;
        out[r * O + o] = relu && !(v > 0.0f) ? 0.0f : v;
      }
    return;
  }
  if (B <= KDP_DENSE_GEMV_MAX) {
    /* a few rows (batch-1 inference): sgemm would pack all of w on every call, sgemv streams it */
    for (size_t r = 0; r < B; r++) {
      float *o_row = out + r * O;
      if (b) memcpy(o_row, b, O * sizeof(float));
      cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)O, (int)I, 1.0f, w, (int)I, in + r * I, 1,
                  b ? 1.0f : 0.0f, o_row, 1);
      if (relu)
        for (size_t o = 0; o < O; o++) o_row[o] = o_row[o] > 0.0f ? o_row[o] : 0.0f;
    }
    return;
  }
  dense_fwd_ctx c = {.g = {.ta = 0, .tb = 1, .M = B, .N = O, .K = I, .lda = I, .ldb = I,
                           .ldc = O, .A = in, .B = w, .C = out, .beta = b ? 1.0f : 0.0f},
                     .b = b, .relu = relu};
  kdp_gemm_plan(&c.g);
  kdp_par_tasks(c.g.tiles, dense_fwd_tiles, &c);
}

/* out (B x O) = in (B x I) . w^T (w: O x I) + b */
void kdp_dense_forward(float *out, const float *in, const float *w, const float *b, size_t B,
                       size_t I, size_t O) {
  dense_forward(out, in, w, b, B, I, O, 0);
}

void kdp_dense_relu_forward(float *out, const float *in, const float *w, const float *b,
                            size_t B, size_t I, size_t O) {
  dense_forward(out, in, w, b, B, I, O, 1);
}

/* db (C) += column sums of g (rows x C), row after row; set: db = the sums (the first row is
   added to 0.0f, as onto a zeroed db: the same bits, -0.0 included) */
static void col_sums(float *restrict db, const float *restrict g, size_t rows, size_t C, int set) {
  size_t r = 0;
  if (set) {
    if (rows == 0) {
      memset(db, 0, C * sizeof(float));
      return;
    }
    for (size_t c = 0; c < C; c++) db[c] = 0.0f + g[c];
    r = 1;
  }
  for (; r < rows; r++)
    for (size_t c = 0; c < C; c++) db[c] += g[r * C + c];
}

/* dout (n) = 0 where out <= 0: the relu's backward, in place */
static void relu_mask_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict d = a->out;
  const float *restrict o = a->in;
  for (size_t i = lo; i < hi; i++) d[i] = o[i] > 0.0f ? d[i] : 0.0f;
}

static void relu_mask(float *dout, const float *out, size_t n) {
  la a = {.out = dout, .in = out};
  kdp_par_elems(n, n, relu_mask_range, &a);
}

void kdp_dense_relu_backward(float *din, float *dw, float *db, float *dout, const float *out,
                             const float *in, const float *w, size_t B, size_t I, size_t O) {
  kdp_dense_relu_backward_set(din, dw, db, dout, out, in, w, B, I, O, 0);
}

void kdp_dense_relu_backward_set(float *din, float *dw, float *db, float *dout, const float *out,
                                 const float *in, const float *w, size_t B, size_t I, size_t O,
                                 unsigned set) {
  relu_mask(dout, out, B * O);
  kdp_dense_backward_set(din, dw, db, dout, in, w, B, I, O, set);
}

typedef struct dense_bwd_ctx {
  const kdp_gemm *gw, *gx;
  size_t nw, nx;
  float *db;
  const float *dout;
  size_t B, O;
  int db_set;
} dense_bwd_ctx;

static void dense_bwd_tasks(void *ctx, size_t lo, size_t hi) {
  const dense_bwd_ctx *c = ctx;
  for (size_t t = lo; t < hi; t++) {
    if (t < c->nw)
      kdp_gemm_tile(c->gw, t);
    else if (t < c->nw + c->nx)
      kdp_gemm_tile(c->gx, t - c->nw);
    else
      col_sums(c->db, c->dout, c->B, c->O, c->db_set);
  }
}

void kdp_dense_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                        const float *w, size_t B, size_t I, size_t O) {
  kdp_dense_backward_set(din, dw, db, dout, in, w, B, I, O, 0);
}

/* din (B x I) += dout . w; dw (O x I) += dout^T . in; db (O) += column sums of dout, each
   written instead (the GEMM with beta = 0) when `set` has its KDP_SET_* bit. One parallel loop
   over the tiles of both GEMMs and the bias sums. */
void kdp_dense_backward_set(float *din, float *dw, float *db, const float *dout, const float *in,
                            const float *w, size_t B, size_t I, size_t O, unsigned set) {
  const int pset = (set & KDP_SET_PARAMS) != 0, xset = (set & KDP_SET_DIN) != 0;
  if (B == 0 || O == 0) {
    /* nothing to add; a set gradient is zero */
    if (pset && dw) memset(dw, 0, O * I * sizeof(float));
    if (pset && db) memset(db, 0, O * sizeof(float));
    if (xset && din) memset(din, 0, B * I * sizeof(float));
    return;
  }
  kdp_gemm gw = {.ta = 1, .tb = 0, .M = O, .N = I, .K = B, .lda = O, .ldb = I, .ldc = I,
                 .A = dout, .B = in, .C = dw, .beta = pset ? 0.0f : 1.0f};
  kdp_gemm gx = {.ta = 0, .tb = 0, .M = B, .N = I, .K = O, .lda = O, .ldb = I, .ldc = I,
                 .A = dout, .B = w, .C = din, .beta = xset ? 0.0f : 1.0f};
  size_t nw = 0, nx = 0;
  if (dw && I) kdp_gemm_plan(&gw), nw = gw.tiles;
  if (din && I) kdp_gemm_plan(&gx), nx = gx.tiles;
  dense_bwd_ctx c = {&gw, &gx, nw, nx, db, dout, B, O, pset};
  kdp_par_tasks(nw + nx + (db ? 1 : 0), dense_bwd_tasks, &c);
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

/* Samples per chunk at most. Depends only on the shape and B, and never grows when B shrinks,
   so scratch sized for a batch B serves any batch <= B. */
static size_t conv_chunk(const kdp_conv_shape *s) {
  /* the output chunk counts too: with few input channels (the first conv) it is the larger */
  size_t per = conv_col_per_sample(s), per_out = s->OH * s->OW * s->Cout;
  if (per_out > per) per = per_out;
  size_t nb = per ? KDP_CONV_CHUNK_TARGET / per : s->B;
  if (nb < 1) nb = 1;
  if (nb > s->B) nb = s->B;
  return nb;
}

/* The batch in chunks (balanced, a multiple of 4 of them: par.h), the tasks of the conv loops */
static size_t conv_n_chunks(const kdp_conv_shape *s) {
  return kdp_chunk_count(s->B, conv_chunk(s));
}

size_t kdp_conv_chunks(const kdp_conv_shape *s) { return conv_n_chunks(s); }

/* Weight and bias gradients are summed per group of consecutive chunks (a group's chunks run in
   order on one thread) into the group's partial, then the partials are added in group order.
   Groups = chunks, unless the partials would pass KDP_CONV_PARTIAL_FLOATS; with one group the
   GEMMs accumulate straight into dw. */
#define KDP_CONV_PARTIAL_FLOATS ((size_t)1 << 22)
static size_t conv_groups(const kdp_conv_shape *s, size_t n_chunks) {
  size_t per = s->Cout * s->K * s->K * s->Cin + s->Cout;
  size_t g = per ? KDP_CONV_PARTIAL_FLOATS / per : n_chunks;
  if (g < 1) g = 1;
  return g < n_chunks ? g : n_chunks;
}

static size_t conv_partial_floats(const kdp_conv_shape *s) {
  size_t g = conv_groups(s, conv_n_chunks(s));
  return g > 1 ? g * (s->Cout * s->K * s->K * s->Cin + s->Cout) : 0;
}

/* one thread's scratch: a chunk's im2col matrix and its gradient (none for pointwise convs, whose
   input is its own im2col), plus `extra` floats per row of the chunk's output */
static size_t conv_thread_floats(const kdp_conv_shape *s, size_t extra) {
  size_t rows = conv_chunk(s) * s->OH * s->OW;
  return rows * ((conv_is_pointwise(s) ? 0 : 2 * s->K * s->K * s->Cin) + extra);
}

static size_t conv_scratch(const kdp_conv_shape *s, size_t extra) {
  if (s->B == 0 || s->OH == 0 || s->OW == 0) return 0;
  return conv_partial_floats(s) + (size_t)kdp_par_threads() * conv_thread_floats(s, extra);
}

size_t kdp_conv_scratch_floats(const kdp_conv_shape *s) { return conv_scratch(s, 0); }

/* widest zero-padded input row (floats) im2col_short handles */
#define KDP_IM2COL_ROW 1024

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
        if (run == 3) /* 3x3 kernels on one channel (the cnn's first conv): fixed trip count */
          for (size_t ow = 0; ow < OW; ow++) {
            const float *p = prow + ow * st * C;
            dst[ow * kkc] = p[0];
            dst[ow * kkc + 1] = p[1];
            dst[ow * kkc + 2] = p[2];
          }
        else
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
static void col2im_add(float *restrict din, const float *restrict dcol, size_t nb,
                       const kdp_conv_shape *s) {
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

/* rows of out (rows x C) = b */
static void fill_bias_rows(float *out, const float *b, size_t rows, size_t C) {
  /* the first row, then copies of the rows done so far: log2(rows) memcpy calls instead of one
     per row (the rows are short, 32-64 floats, and many: B * OH * OW) */
  if (rows == 0) return;
  memcpy(out, b, C * sizeof(float));
  for (size_t done = 1; done < rows;) {
    size_t n = done < rows - done ? done : rows - done;
    memcpy(out + done * C, out, n * C * sizeof(float));
    done += n;
  }
}

/* conv output rows of samples [b0, b0 + n), bias included (the GEMM adds onto the bias rows);
   col is the chunk's im2col scratch (unused by pointwise convs) */
static void conv_forward_chunk(float *out, const float *in, const float *w, const float *b,
                               float *col, size_t b0, size_t n, const kdp_conv_shape *s) {
  const size_t Cout = s->Cout, kkc = s->K * s->K * s->Cin, ohw = s->OH * s->OW;
  float *o = out + b0 * ohw * Cout;
  if (b) fill_bias_rows(o, b, n * ohw, Cout);
  if (kkc == 0) {
    if (!b) memset(o, 0, n * ohw * Cout * sizeof(float));
    return;
  }
  const float *x = in + b0 * s->H * s->W * s->Cin;
  if (!conv_is_pointwise(s)) {
    im2col(col, x, n, s);
    x = col;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(n * ohw), (int)Cout, (int)kkc, 1.0f,
              x, (int)kkc, w, (int)kkc, b ? 1.0f : 0.0f, o, (int)Cout);
}

/* The chunk loops of the convolutions (and of the fused block): the arguments of every kernel
   of this section, chunk c's samples, and the thread's scratch. */
typedef struct conv_ctx {
  const kdp_conv_shape *s;
  size_t n;         /* chunks */
  float *thr;       /* per-thread scratch slices of tf floats */
  size_t tf, dy_floats;
  float *out, *y, *din;
  const float *in, *w, *b, *dout, *gamma, *beta, *k1, *k2, *k3;
  float *mean, *invstd;
  const float *scale, *shift;
  uint8_t *win;
  const uint8_t *cwin;
  float *xwin;
  double *st;       /* fused forward: per chunk the statistics */
  double *shift_d;  /* fused forward: per chunk stats_block's scratch (C doubles) */
  size_t *cnt;
  int train, din_set;
  struct conv_grads *cg;
} conv_ctx;

static float *conv_thread_scratch(const conv_ctx *c) {
  return c->thr ? c->thr + (size_t)kdp_par_tid() * c->tf : NULL;
}

static void conv_fwd_chunks(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const size_t B = c->s->B;
  for (size_t k = lo; k < hi; k++) {
    size_t b0 = kdp_chunk_lo(k, B, c->n), b1 = kdp_chunk_lo(k + 1, B, c->n);
    conv_forward_chunk(c->out, c->in, c->w, c->b, conv_thread_scratch(c), b0, b1 - b0, c->s);
  }
}

void kdp_conv2d_forward(float *out, const float *in, const float *w, const float *b,
                        float *scratch, const kdp_conv_shape *s) {
  const size_t B = s->B, ohw = s->OH * s->OW;
  if (B == 0 || ohw == 0 || s->Cout == 0) return;
  conv_ctx c = {.s = s, .n = conv_n_chunks(s), .tf = conv_thread_floats(s, 0), .out = out,
                .in = in, .w = w, .b = b};
  c.thr = scratch ? scratch + conv_partial_floats(s) : NULL;
  kdp_par_tasks(c.n, conv_fwd_chunks, &c);
}

/* The input and weight gradients of one chunk from its output gradient g (n * OH * OW x Cout):
   dw (Cout x kkc) = g^T . im2col (written when first, else added), din of the chunk's samples
   += col2im(g . w) (written when din_set). col and dcol are the thread's scratch. */
static void conv_backward_chunk(float *din, int din_set, float *dw, int first, const float *g,
                                const float *in, const float *w, float *col, float *dcol,
                                size_t b0, size_t n, const kdp_conv_shape *s) {
  const size_t C = s->Cout, kkc = s->K * s->K * s->Cin, ohw = s->OH * s->OW;
  const size_t in_per = s->H * s->W * s->Cin;
  const int M = (int)(n * ohw), pointwise = conv_is_pointwise(s);
  if (kkc == 0) return;
  const float *x = in + b0 * in_per;
  if (dw) {
    if (!pointwise) {
      im2col(col, x, n, s);
      x = col;
    }
    /* zeroed here and added onto (beta = 1), not beta = 0: OpenBLAS's beta = 0 zeroes C in a
       strided pass of its own before the same add (kdp_gemm_tile does the same) */
    if (first) memset(dw, 0, C * kkc * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)C, (int)kkc, M, 1.0f, g, (int)C, x,
                (int)kkc, 1.0f, dw, (int)kkc);
  }
  if (din) {
    float *d = din + b0 * in_per;
    if (pointwise) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)C, 1.0f, g, (int)C,
                  w, (int)kkc, din_set ? 0.0f : 1.0f, d, (int)kkc);
    } else {
      memset(dcol, 0, (size_t)M * kkc * sizeof(float)); /* as dw above */
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, (int)kkc, (int)C, 1.0f, g, (int)C,
                  w, (int)kkc, 1.0f, dcol, (int)kkc);
      /* the chunk's samples own this part of din: zero it while it is about to be touched */
      if (din_set) memset(d, 0, n * in_per * sizeof(float));
      col2im_add(d, dcol, n, s);
    }
  }
}

/* dw += sum over groups of the partials (group order), likewise db; part holds per group
   nw weight floats then C bias floats */
static void add_partials_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx; /* out: dw; in: the partials, n groups of stride C floats */
  for (size_t i = lo; i < hi; i++) {
    float v = a->in[i];
    for (size_t g = 1; g < a->n; g++) v += a->in[g * a->C + i];
    a->out[i] += v;
  }
}

static void conv_add_partials(float *dw, float *db, const float *part, size_t groups, size_t nw,
                              size_t C) {
  const size_t stride = nw + C;
  if (dw) {
    la a = {.out = dw, .in = part, .n = groups, .C = stride};
    kdp_par_elems(nw, nw * groups, add_partials_range, &a);
  }
  if (db)
    for (size_t c = 0; c < C; c++) {
      float v = part[nw + c];
      for (size_t g = 1; g < groups; g++) v += part[g * stride + nw + c];
      db[c] += v;
    }
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

/* Where the chunk loop of a conv backward puts its gradients: with several groups, group gi's
   partial (zeroed before its first chunk); with one, dw and db themselves. */
typedef struct conv_grads {
  float *dw, *db; /* the destinations (NULL: not wanted) */
  float *part;    /* groups > 1: groups x (nw + C) */
  size_t groups, nw;
} conv_grads;

static void conv_grads_init(conv_grads *cg, float *dw, float *db, float *part,
                            const kdp_conv_shape *s, size_t n_chunks) {
  cg->dw = dw;
  cg->db = db;
  cg->groups = conv_groups(s, n_chunks);
  cg->nw = s->Cout * s->K * s->K * s->Cin;
  cg->part = cg->groups > 1 ? part : NULL;
}

/* group gi's destinations for its chunk `first` or not; zeroes the bias partial at the start */
static void conv_grads_at(const conv_grads *cg, size_t gi, int first, float **dw, float **db,
                          int *dw_first, size_t C) {
  if (!cg->part) {
    *dw = cg->dw;
    *db = cg->db;
    *dw_first = 0;
    return;
  }
  float *p = cg->part + gi * (cg->nw + C);
  *dw = cg->dw ? p : NULL;
  *db = cg->db ? p + cg->nw : NULL;
  *dw_first = first;
  if (first && *db) memset(*db, 0, C * sizeof(float));
}

static void conv_grads_finish(const conv_grads *cg, size_t C) {
  if (cg->part) conv_add_partials(cg->dw, cg->db, cg->part, cg->groups, cg->nw, C);
}

/* groups [lo, hi) of the conv backward: each group's chunks in order */
static void conv_bwd_groups(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const kdp_conv_shape *s = c->s;
  const size_t B = s->B, C = s->Cout, ohw = s->OH * s->OW, n = c->n, G = c->cg->groups;
  float *col = conv_thread_scratch(c);
  for (size_t gi = lo; gi < hi; gi++)
    for (size_t k = gi * n / G; k < (gi + 1) * n / G; k++) {
      size_t b0 = kdp_chunk_lo(k, B, n), nb = kdp_chunk_lo(k + 1, B, n) - b0;
      const float *g = c->dout + b0 * ohw * C;
      float *gdw, *gdb;
      int first;
      conv_grads_at(c->cg, gi, k == gi * n / G, &gdw, &gdb, &first, C);
      if (gdb) col_sums4(gdb, g, nb * ohw, C);
      conv_backward_chunk(c->din, 0, gdw, first, g, c->in, c->w, col, col ? col + c->tf / 2 : NULL,
                          b0, nb, s);
    }
}

void kdp_conv2d_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                         const float *w, float *scratch, const kdp_conv_shape *s) {
  const size_t B = s->B, C = s->Cout, kkc = s->K * s->K * s->Cin, ohw = s->OH * s->OW;
  if (B == 0 || ohw == 0 || C == 0) return;
  if (kkc == 0) dw = din = NULL;
  if (!dw && !din && !db) return;
  conv_grads cg;
  conv_ctx c = {.s = s, .n = conv_n_chunks(s), .tf = conv_thread_floats(s, 0), .din = din,
                .in = in, .w = w, .dout = dout, .cg = &cg};
  conv_grads_init(&cg, dw, db, scratch, s, c.n);
  c.thr = scratch ? scratch + conv_partial_floats(s) : NULL;
  kdp_par_tasks(cg.groups, conv_bwd_groups, &c);
  conv_grads_finish(&cg, C);
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

/* output row (b, oh) of the max pool */
static void maxpool_row(float *out, int32_t *argmax, const float *in, size_t b, size_t oh,
                        size_t H, size_t W, size_t C, size_t K, size_t stride, size_t pad,
                        size_t OH, size_t OW) {
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

static void maxpool_rows(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  for (size_t q = lo; q < hi; q++)
    maxpool_row(a->out, (int32_t *)a->am, a->in, q / a->OH, q % a->OH, a->H, a->W, a->C, a->K,
                a->stride, a->pad, a->OH, a->OW);
}

void kdp_maxpool_forward(float *out, int32_t *argmax, const float *in, size_t B, size_t H,
                         size_t W, size_t C, size_t K, size_t stride, size_t pad) {
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  la a = {.out = out, .am = argmax, .in = in, .H = H, .W = W, .C = C, .K = K, .stride = stride,
          .pad = pad, .OH = OH, .OW = OW};
  kdp_par_elems(B * OH, B * OH * OW * C * K * K, maxpool_rows, &a);
}

static void maxpool_bwd_samples(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx; /* n: outputs in all */
  for (size_t b = lo; b < hi; b++)
    for (size_t i = b * a->n / a->B; i < (b + 1) * a->n / a->B; i++)
      if (a->am[i] >= 0) a->out[a->am[i]] += a->g[i];
}

/* sample by sample: overlapping windows send several outputs of one sample to one input, and
   those adds keep their order */
void kdp_maxpool_backward(float *din, const float *dout, const int32_t *argmax, size_t B,
                          size_t n_out) {
  if (!din || B == 0) return;
  la a = {.out = din, .g = dout, .am = argmax, .B = B, .n = n_out};
  kdp_par_elems(B, n_out, maxpool_bwd_samples, &a);
}

/* average pool over samples [lo, hi): forward (a->out = out) or backward (a->out = din,
   a->g = dout; sample by sample, so overlapping windows add into an input in a fixed order) */
static void avgpool_samples(void *ctx, size_t lo, size_t hi, int backward) {
  const la *a = ctx;
  const size_t H = a->H, W = a->W, C = a->C, K = a->K, stride = a->stride, pad = a->pad;
  const size_t OH = a->OH, OW = a->OW;
  const float inv = a->f;
  for (size_t b = lo; b < hi; b++)
    for (size_t oh = 0; oh < OH; oh++) {
      size_t h0, h1;
      pool_window(oh, K, stride, pad, H, &h0, &h1);
      for (size_t ow = 0; ow < OW; ow++) {
        size_t w0, w1;
        pool_window(ow, K, stride, pad, W, &w0, &w1);
        const size_t po = ((b * OH + oh) * OW + ow) * C;
        float *o = a->out + po;
        if (!backward)
          for (size_t c = 0; c < C; c++) o[c] = 0.0f;
        for (size_t h = h0; h < h1; h++)
          for (size_t w = w0; w < w1; w++) {
            const size_t pi = ((b * H + h) * W + w) * C;
            if (backward)
              for (size_t c = 0; c < C; c++) a->out[pi + c] += a->g[po + c] * inv;
            else
              for (size_t c = 0; c < C; c++) o[c] += a->in[pi + c];
          }
        if (!backward)
          for (size_t c = 0; c < C; c++) o[c] *= inv;
      }
    }
}

static void avgpool_fwd(void *ctx, size_t lo, size_t hi) { avgpool_samples(ctx, lo, hi, 0); }
static void avgpool_bwd(void *ctx, size_t lo, size_t hi) { avgpool_samples(ctx, lo, hi, 1); }

void kdp_avgpool_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C,
                         size_t K, size_t stride, size_t pad) {
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  la a = {.out = out, .in = in, .H = H, .W = W, .C = C, .K = K, .stride = stride, .pad = pad,
          .OH = OH, .OW = OW, .f = K ? 1.0f / (float)(K * K) : 0.0f};
  kdp_par_elems(B, B * OH * OW * C * K * K, avgpool_fwd, &a);
}

void kdp_avgpool_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C,
                          size_t K, size_t stride, size_t pad) {
  if (!din) return;
  const size_t OH = pool_out(H, K, stride, pad), OW = pool_out(W, K, stride, pad);
  la a = {.out = din, .g = dout, .H = H, .W = W, .C = C, .K = K, .stride = stride, .pad = pad,
          .OH = OH, .OW = OW, .f = K ? 1.0f / (float)(K * K) : 0.0f};
  kdp_par_elems(B, B * OH * OW * C * K * K, avgpool_bwd, &a);
}

static void gap_fwd_samples(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx; /* n: HW */
  const size_t HW = a->n, C = a->C;
  for (size_t b = lo; b < hi; b++) {
    float *o = a->out + b * C;
    const float *x = a->in + b * HW * C;
    for (size_t c = 0; c < C; c++) o[c] = 0.0f;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) o[c] += x[p * C + c];
    for (size_t c = 0; c < C; c++) o[c] *= a->f;
  }
}

void kdp_gap_forward(float *out, const float *in, size_t B, size_t HW, size_t C) {
  la a = {.out = out, .in = in, .n = HW, .C = C, .f = HW ? 1.0f / (float)HW : 0.0f};
  kdp_par_elems(B, B * HW * C, gap_fwd_samples, &a);
}

static void gap_bwd_samples(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  const size_t HW = a->n, C = a->C;
  for (size_t b = lo; b < hi; b++) {
    const float *g = a->g + b * C;
    float *d = a->out + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) d[p * C + c] += g[c] * a->f;
  }
}

void kdp_gap_backward(float *din, const float *dout, size_t B, size_t HW, size_t C) {
  if (!din) return;
  la a = {.out = din, .g = dout, .n = HW, .C = C, .f = HW ? 1.0f / (float)HW : 0.0f};
  kdp_par_elems(B, B * HW * C, gap_bwd_samples, &a);
}

/* ================= element-wise ================= */

static void relu_fwd_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict o = a->out;
  const float *restrict x = a->in;
  for (size_t i = lo; i < hi; i++) o[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void kdp_relu_forward(float *out, const float *in, size_t n) {
  la a = {.out = out, .in = in};
  kdp_par_elems(n, n, relu_fwd_range, &a);
}

static void relu_bwd_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict d = a->out;
  const float *restrict g = a->g, *restrict o = a->in;
  for (size_t i = lo; i < hi; i++) d[i] += o[i] > 0.0f ? g[i] : 0.0f;
}

void kdp_relu_backward(float *din, const float *dout, const float *out, size_t n) {
  if (!din) return;
  la a = {.out = din, .g = dout, .in = out};
  kdp_par_elems(n, n, relu_bwd_range, &a);
}

/* The mask is drawn in blocks of KDP_DROPOUT_BLOCK elements; block k starts from the stream
   jumped ahead by k * KDP_DROPOUT_BLOCK draws (kdp_rng_advance), which is exactly where the
   serial loop would be: the mask is the same for every thread count. */
#define KDP_DROPOUT_BLOCK 4096
typedef struct dropout_ctx {
  float *out, *mask;
  const float *in;
  size_t n;
  float p, keep;
  kdp_rng start;
} dropout_ctx;

static void dropout_blocks(void *ctx, size_t lo, size_t hi) {
  const dropout_ctx *c = ctx;
  for (size_t k = lo; k < hi; k++) {
    kdp_rng r = c->start;
    kdp_rng_advance(&r, (uint64_t)k * KDP_DROPOUT_BLOCK);
    size_t end = (k + 1) * KDP_DROPOUT_BLOCK < c->n ? (k + 1) * KDP_DROPOUT_BLOCK : c->n;
    for (size_t i = k * KDP_DROPOUT_BLOCK; i < end; i++) {
      c->mask[i] = kdp_rng_uniform(&r) < c->p ? 0.0f : c->keep;
      c->out[i] = c->in[i] * c->mask[i];
    }
  }
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
  dropout_ctx c = {out, mask, in, n, p, 1.0f / (1.0f - p), *rng};
  kdp_par_elems((n + KDP_DROPOUT_BLOCK - 1) / KDP_DROPOUT_BLOCK, n, dropout_blocks, &c);
  kdp_rng_advance(rng, n);
}

static void dropout_bwd_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict d = a->out;
  const float *restrict g = a->g, *restrict m = a->in;
  for (size_t i = lo; i < hi; i++) d[i] += g[i] * m[i];
}

void kdp_dropout_backward(float *din, const float *dout, const float *mask, size_t n) {
  if (!din) return;
  la a = {.out = din, .g = dout, .in = mask};
  kdp_par_elems(n, n, dropout_bwd_range, &a);
}

/* NHWC (HW x C per sample) -> NCHW (C x HW), i.e. a transpose per sample. */
static void flatten_fwd_samples(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx; /* n: HW */
  const size_t HW = a->n, C = a->C;
  for (size_t b = lo; b < hi; b++) {
    const float *x = a->in + b * HW * C;
    float *o = a->out + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) o[c * HW + p] = x[p * C + c];
  }
}

void kdp_flatten_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C) {
  la a = {.out = out, .in = in, .n = H * W, .C = C};
  kdp_par_elems(B, B * H * W * C, flatten_fwd_samples, &a);
}

static void flatten_bwd_samples(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  const size_t HW = a->n, C = a->C;
  for (size_t b = lo; b < hi; b++) {
    const float *g = a->g + b * HW * C;
    float *d = a->out + b * HW * C;
    for (size_t p = 0; p < HW; p++)
      for (size_t c = 0; c < C; c++) d[p * C + c] += g[c * HW + p];
  }
}

void kdp_flatten_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C) {
  if (!din) return;
  la a = {.out = din, .g = dout, .n = H * W, .C = C};
  kdp_par_elems(B, B * H * W * C, flatten_bwd_samples, &a);
}

static void add_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict o = a->out;
  const float *restrict x = a->in, *restrict y = a->in2;
  for (size_t i = lo; i < hi; i++) o[i] = x[i] + y[i];
}

void kdp_add_forward(float *out, const float *a, const float *b, size_t n) {
  la c = {.out = out, .in = a, .in2 = b};
  kdp_par_elems(n, n, add_range, &c);
}

static void add_into_range(void *ctx, size_t lo, size_t hi) {
  const la *a = ctx;
  float *restrict o = a->out;
  const float *restrict g = a->g;
  for (size_t i = lo; i < hi; i++) o[i] += g[i];
}

void kdp_add_backward(float *da, float *db, const float *dout, size_t n) {
  la a = {.out = da, .g = dout}, b = {.out = db, .g = dout};
  if (da) kdp_par_elems(n, n, add_into_range, &a);
  if (db) kdp_par_elems(n, n, add_into_range, &b);
}

/* Output spatial size of x[:, ::stride, ::stride]: ceil(H / stride). */
static size_t sub_size(size_t H, size_t stride) {
  size_t st = stride ? stride : 1;
  return H ? (H - 1) / st + 1 : 0;
}

/* option-A shortcut, forward (a->out set) or backward (a->out = din, a->g = dout) */
static void shortcut_samples(void *ctx, size_t lo, size_t hi, int backward) {
  const la *a = ctx; /* C: Cin, C2: Cout */
  const size_t H = a->H, W = a->W, Cin = a->C, Cout = a->C2, st = a->stride ? a->stride : 1;
  const size_t OH = sub_size(H, a->stride), OW = sub_size(W, a->stride);
  const size_t pl = Cout > Cin ? (Cout - Cin) / 2 : 0;
  const size_t nc = Cin < Cout - pl ? Cin : Cout - pl;
  for (size_t b = lo; b < hi; b++)
    for (size_t oh = 0; oh < OH; oh++)
      for (size_t ow = 0; ow < OW; ow++) {
        const size_t o = ((b * OH + oh) * OW + ow) * Cout;
        const size_t x = ((b * H + oh * st) * W + ow * st) * Cin;
        if (backward) {
          for (size_t c = 0; c < nc; c++) a->out[x + c] += a->g[o + pl + c];
          continue;
        }
        for (size_t c = 0; c < pl; c++) a->out[o + c] = 0.0f;
        for (size_t c = 0; c < nc; c++) a->out[o + pl + c] = a->in[x + c];
        for (size_t c = pl + nc; c < Cout; c++) a->out[o + c] = 0.0f;
      }
}

static void shortcut_fwd(void *ctx, size_t lo, size_t hi) { shortcut_samples(ctx, lo, hi, 0); }
static void shortcut_bwd(void *ctx, size_t lo, size_t hi) { shortcut_samples(ctx, lo, hi, 1); }

void kdp_shortcut_a_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t Cin,
                            size_t Cout, size_t stride) {
  la a = {.out = out, .in = in, .H = H, .W = W, .C = Cin, .C2 = Cout, .stride = stride};
  kdp_par_elems(B, B * H * W * Cout / (stride ? stride * stride : 1), shortcut_fwd, &a);
}

void kdp_shortcut_a_backward(float *din, const float *dout, size_t B, size_t H, size_t W,
                             size_t Cin, size_t Cout, size_t stride) {
  if (!din) return;
  la a = {.out = din, .g = dout, .H = H, .W = W, .C = Cin, .C2 = Cout, .stride = stride};
  kdp_par_elems(B, B * H * W * Cout / (stride ? stride * stride : 1), shortcut_bwd, &a);
}

/* ================= batchnorm ================= */

/* Row loops of batchnorm as helpers with restrict parameters, so gcc vectorises the channel
   loop without runtime alias checks. */
/* The per-channel sums of (x - shift), in double: one loop for the layer's batch statistics
   (stats_block: shifted by a block's first row) and for batchnorm in pieces, rows spread over
   processes (the kd modules, kdp_bn_stats_rows: shifted by the running mean), whose sums are
   added over the blocks and the processes, then finished once; the shift keeps the
   sum-of-squares cancellation small. The rows are taken four at a time, so the running sums
   (which live in memory) see one dependent add per four rows instead of one per row. */
void kdp_bn_stats_rows(double *restrict sum, double *restrict sq, const float *restrict in,
                       const double *restrict shift, size_t N, size_t C) {
  size_t n = 0;
  for (; n + 4 <= N; n += 4) {
    const float *x0 = in + n * C, *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
    for (size_t c = 0; c < C; c++) {
      double d0 = (double)x0[c] - shift[c], d1 = (double)x1[c] - shift[c];
      double d2 = (double)x2[c] - shift[c], d3 = (double)x3[c] - shift[c];
      sum[c] += (d0 + d1) + (d2 + d3);
      sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; n < N; n++) {
    const float *x = in + n * C;
    for (size_t c = 0; c < C; c++) {
      double d = (double)x[c] - shift[c];
      sum[c] += d;
      sq[c] += d * d;
    }
  }
}

/* fn(ctx, k, r0, nr) for every fixed row block k = rows [r0, r0 + nr) of N rows of C floats
   (par.h), on the team */
typedef void (*rows_fn)(const void *ctx, size_t k, size_t r0, size_t nr);

typedef struct rows_ctx {
  rows_fn fn;
  const void *ctx;
  size_t N, rows;
} rows_ctx;

static void rows_blocks(void *ctx, size_t lo, size_t hi) {
  const rows_ctx *c = ctx;
  for (size_t k = lo; k < hi; k++)
    c->fn(c->ctx, k, k * c->rows, c->N - k * c->rows < c->rows ? c->N - k * c->rows : c->rows);
}

static void rows_parallel(size_t N, size_t C, rows_fn fn, const void *ctx) {
  rows_ctx c = {fn, ctx, N, kdp_row_block_rows(N, C)};
  const size_t nblk = (N + c.rows - 1) / c.rows;
  kdp_par_for(nblk, nblk, kdp_par_team_tasks(N * C >= KDP_PAR_MIN_WORK ? nblk : 1), rows_blocks,
              &c);
}

/* Mean and sum of squared deviations (m2) per channel of one block of rows (x: rows x C), from
   sums shifted by the block's first row (which keeps the cancellation of the squares small);
   shift: C doubles of scratch for it. */
static void stats_block(double *mean, double *m2, double *shift, const float *x, size_t rows,
                        size_t C) {
  memset(mean, 0, C * sizeof(double));
  memset(m2, 0, C * sizeof(double));
  if (rows == 0) return;
  for (size_t c = 0; c < C; c++) shift[c] = (double)x[c];
  kdp_bn_stats_rows(mean, m2, x, shift, rows, C);
  for (size_t c = 0; c < C; c++) {
    double s = mean[c];
    mean[c] = (double)x[c] + s / (double)rows;
    m2[c] -= s * s / (double)rows;
    if (m2[c] < 0) m2[c] = 0;
  }
}

/* Folds a block's statistics (nb rows; part = mean then m2) into the running ones (n rows so
   far), Chan, Golub and LeVeque's pairwise update. */
static void stats_merge(double *mean, double *m2, double n, const double *part, double nb,
                        size_t C) {
  if (nb == 0) return;
  if (n == 0) {
    memcpy(mean, part, C * sizeof(double));
    memcpy(m2, part + C, C * sizeof(double));
    return;
  }
  const double tot = n + nb, f = nb / tot, g = n * nb / tot;
  for (size_t c = 0; c < C; c++) {
    double d = part[c] - mean[c];
    mean[c] += d * f;
    m2[c] += part[C + c] + d * d * g;
  }
}

/* mean and m2 of n_blocks consecutive blocks of `rows` rows each (the last one shorter; N rows in
   all) whose statistics are in part (n_blocks x [mean C, m2 C]), merged in block order */
static void stats_merge_all(double *mean, double *m2, const double *part, size_t n_blocks,
                            const size_t *rows, size_t C) {
  double n = 0;
  for (size_t k = 0; k < n_blocks; k++) {
    stats_merge(mean, m2, n, part + k * 2 * C, (double)rows[k], C);
    n += (double)rows[k];
  }
}

typedef struct stats_ctx {
  const float *in;
  double *part;  /* per block: mean then m2 */
  double *shift; /* per block: C doubles of stats_block's scratch */
  size_t *cnt, C;
} stats_ctx;

static void stats_rows(const void *ctx, size_t k, size_t r0, size_t nr) {
  const stats_ctx *c = ctx;
  c->cnt[k] = nr;
  stats_block(c->part + k * 2 * c->C, c->part + k * 2 * c->C + c->C, c->shift + k * c->C,
              c->in + r0 * c->C, nr, c->C);
}

/* mean and m2 of in (N x C), in the fixed row blocks of par.h, on the team */
static void bn_batch_stats(double *mean, double *m2, const float *in, size_t N, size_t C) {
  const size_t nblk = kdp_row_blocks(N, C);
  stats_ctx sc = {in, kdp_xmalloc(nblk * 3 * C * sizeof(double)), NULL,
                  kdp_xmalloc(nblk * sizeof(size_t)), C};
  sc.shift = sc.part + nblk * 2 * C;
  rows_parallel(N, C, stats_rows, &sc);
  stats_merge_all(mean, m2, sc.part, nblk, sc.cnt, C);
  free(sc.cnt);
  free(sc.part);
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

/* float mean and invstd from the double mean and m2 of N rows; updates the running stats like
   PyTorch (unbiased variance for running_var) */
static void bn_finish_stats(float *mean, float *invstd, float *run_mean, float *run_var,
                            const double *mu, const double *m2, size_t N, size_t C,
                            float momentum, float eps) {
  for (size_t c = 0; c < C; c++) {
    double var = m2[c] / (double)N;
    if (var < 0) var = 0;
    mean[c] = (float)mu[c];
    invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
    if (run_mean) run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * (float)mu[c];
    if (run_var) {
      double unb = N > 1 ? m2[c] / (double)(N - 1) : var;
      run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (float)unb;
    }
  }
}

/* the row loops of the batchnorm passes: norm (train forward), eval, din */
typedef struct bn_rows_ctx {
  float *out, *xhat;
  const float *in, *a, *b, *gamma, *beta, *k3;
  size_t C;
  int set;
} bn_rows_ctx;

static void bn_norm_block(const void *ctx, size_t k, size_t r0, size_t nr) {
  const bn_rows_ctx *c = ctx;
  const size_t o = r0 * c->C;
  (void)k;
  bn_norm_rows(c->out + o, c->xhat + o, c->in + o, c->a, c->b, c->gamma, c->beta, nr, c->C);
}

void kdp_bn_forward_train(float *out, float *xhat, float *invstd, float *run_mean,
                          float *run_var, const float *in, const float *gamma, const float *beta,
                          size_t N, size_t C, float momentum, float eps) {
  if (C == 0) return;
  if (N == 0) {
    for (size_t c = 0; c < C; c++) invstd[c] = 1.0f / sqrtf(1.0f + eps);
    return;
  }
  double *st = kdp_xmalloc(2 * C * sizeof(double));
  float *mean = kdp_xmalloc(C * sizeof(float));
  bn_batch_stats(st, st + C, in, N, C);
  bn_finish_stats(mean, invstd, run_mean, run_var, st, st + C, N, C, momentum, eps);
  bn_rows_ctx rc = {.out = out, .xhat = xhat, .in = in, .a = mean, .b = invstd, .gamma = gamma,
                    .beta = beta, .C = C};
  rows_parallel(N, C, bn_norm_block, &rc);
  free(mean);
  free(st);
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

static void bn_eval_rows(float *restrict out, const float *restrict in,
                         const float *restrict scale, const float *restrict shift, size_t N,
                         size_t C) {
  for (size_t n = 0; n < N; n++) {
    const float *x = in + n * C;
    float *o = out + n * C;
    for (size_t c = 0; c < C; c++) o[c] = x[c] * scale[c] + shift[c];
  }
}

static void bn_eval_block(const void *ctx, size_t k, size_t r0, size_t nr) {
  const bn_rows_ctx *c = ctx;
  (void)k;
  bn_eval_rows(c->out + r0 * c->C, c->in + r0 * c->C, c->a, c->b, nr, c->C);
}

void kdp_bn_forward_eval(float *out, const float *in, const float *gamma, const float *beta,
                         const float *run_mean, const float *run_var, size_t N, size_t C,
                         float eps) {
  if (C == 0) return;
  float *scale = kdp_xmalloc(2 * C * sizeof(float)), *shift = scale + C;
  bn_eval_coefs(scale, shift, gamma, beta, run_mean, run_var, C, eps);
  bn_rows_ctx rc = {.out = out, .in = in, .a = scale, .b = shift, .C = C};
  rows_parallel(N, C, bn_eval_block, &rc);
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

/* The sums of the batchnorm backward over N rows (sg: sum of dout * xhat, sb: sum of dout) in the
   fixed row blocks of par.h: block k adds rows [r0, r0 + nr) into its own zeroed partial
   (2C doubles: sg then sb), the partials are added into sg and sb in block order.
   The fused block's masked sums use the same blocks through `fn`. */
typedef void (*bwd_sums_fn)(double *sg, double *sb, size_t r0, size_t nr, const void *ctx);

typedef struct sums_ctx {
  bwd_sums_fn fn;
  const void *ctx;
  double *part;
  size_t C;
} sums_ctx;

static void sums_block(const void *ctx, size_t k, size_t r0, size_t nr) {
  const sums_ctx *c = ctx;
  c->fn(c->part + k * 2 * c->C, c->part + k * 2 * c->C + c->C, r0, nr, c->ctx);
}

static void bwd_sums_blocked(double *sg, double *sb, size_t N, size_t C, bwd_sums_fn fn,
                             const void *ctx) {
  const size_t nblk = kdp_row_blocks(N, C);
  sums_ctx sc = {fn, ctx, kdp_xcalloc(nblk * 2 * C, sizeof(double)), C};
  rows_parallel(N, C, sums_block, &sc);
  for (size_t k = 0; k < nblk; k++)
    for (size_t c = 0; c < C; c++) {
      sg[c] += sc.part[k * 2 * C + c];
      sb[c] += sc.part[k * 2 * C + C + c];
    }
  free(sc.part);
}

/* din = k1 * dout - k2 - k3 * xhat (set) or += that, per channel */
static void bn_bwd_din(float *restrict din, const float *restrict dout,
                       const float *restrict xhat, const float *restrict k1,
                       const float *restrict k2, const float *restrict k3, size_t N, size_t C,
                       int set) {
  for (size_t n = 0; n < N; n++) {
    const float *g = dout + n * C, *xh = xhat + n * C;
    float *d = din + n * C;
    if (set)
      for (size_t c = 0; c < C; c++) d[c] = k1[c] * g[c] - k2[c] - k3[c] * xh[c];
    else
      for (size_t c = 0; c < C; c++) d[c] += k1[c] * g[c] - k2[c] - k3[c] * xh[c];
  }
}

typedef struct bn_sums_ctx {
  const float *dout, *xhat;
  size_t C;
} bn_sums_ctx;

static void bn_sums_block(double *sg, double *sb, size_t r0, size_t nr, const void *ctx) {
  const bn_sums_ctx *c = ctx;
  bn_bwd_sums(sg, sb, c->dout + r0 * c->C, c->xhat + r0 * c->C, nr, c->C);
}

static void bn_din_block(const void *ctx, size_t k, size_t r0, size_t nr) {
  const bn_rows_ctx *c = ctx;
  const size_t o = r0 * c->C;
  (void)k;
  bn_bwd_din(c->out + o, c->in + o, c->xhat + o, c->a, c->b, c->k3, nr, c->C, c->set);
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
  bn_sums_ctx sc = {dout, xhat, C};
  bwd_sums_blocked(sg, sb, N, C, bn_sums_block, &sc);
  if (dgamma)
    for (size_t c = 0; c < C; c++) dgamma[c] += (float)sg[c];
  if (dbeta)
    for (size_t c = 0; c < C; c++) dbeta[c] += (float)sb[c];
  if (din) {
    float *k = kdp_xmalloc(3 * C * sizeof(float));
    bn_bwd_coefs(k, k + C, k + 2 * C, sg, sb, invstd, gamma, N, C);
    bn_rows_ctx rc = {.out = din, .xhat = (float *)xhat, .in = dout, .a = k, .b = k + C,
                      .k3 = k + 2 * C, .C = C, .set = set};
    rows_parallel(N, C, bn_din_block, &rc);
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

void kdp_bn_stats_finish(float *mean, float *invstd, float *run_mean, float *run_var,
                         const double *sum, const double *sq, const double *shift, size_t total,
                         size_t C, float momentum, float eps) {
  const size_t N = total ? total : 1;
  const double invN = 1.0 / (double)N;
  for (size_t c = 0; c < C; c++) {
    double m = sum[c] * invN;
    double var = sq[c] * invN - m * m;
    if (var < 0) var = 0;
    double mu = shift[c] + m;
    mean[c] = (float)mu;
    invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
    if (run_mean) run_mean[c] = (1.0f - momentum) * run_mean[c] + momentum * (float)mu;
    if (run_var) {
      double unb = N > 1 ? var * (double)N / (double)(N - 1) : var;
      run_var[c] = (1.0f - momentum) * run_var[c] + momentum * (float)unb;
    }
  }
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
  bn_bwd_din(din, dout, xhat, k, k + C, k + 2 * C, N, C, 0);
  free(k);
}

/* ================= fused conv -> batchnorm -> 2x2 max-pool -> relu ================= */

/* One sweep over the conv output per direction instead of five: batch statistics are summed
   chunk by chunk while the GEMM output is in cache, the normalised map is never stored (only the
   pooled, relu'd output, each window's winner and its xhat), and backward builds the conv output
   gradient chunk by chunk in scratch (it is 3/4 zeros from the pool, so it is cheap to recompute)
   right before that chunk's GEMMs. Each chunk is a task of the team; the chunks' statistics and
   gradient partials are merged in chunk order. */

size_t kdp_conv_bn_pool_relu_scratch_floats(const kdp_conv_shape *s) {
  return conv_scratch(s, s->Cout); /* + the chunk's conv output gradient per thread */
}

/* pooled row (b, ph) of the train forward */
static void cbpr_pool_train(float *restrict out, uint8_t *restrict win, float *restrict xwin,
                            const float *restrict y, const float *restrict mean,
                            const float *restrict invstd, const float *restrict gamma,
                            const float *restrict beta, size_t b, size_t ph, size_t H, size_t W,
                            size_t C) {
  const size_t PH = H / 2, PW = W / 2;
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

/* pooled row (b, ph) of the eval forward */
static void cbpr_pool_eval(float *restrict out, const float *restrict y,
                           const float *restrict scale, const float *restrict shift, size_t b,
                           size_t ph, size_t H, size_t W, size_t C) {
  const size_t PH = H / 2, PW = W / 2;
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

static void cbpr_fwd_chunks(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const size_t B = c->s->B, C = c->s->Cout, ohw = c->s->OH * c->s->OW, PH = c->s->OH / 2;
  for (size_t k = lo; k < hi; k++) {
    size_t b0 = kdp_chunk_lo(k, B, c->n), nb = kdp_chunk_lo(k + 1, B, c->n) - b0;
    conv_forward_chunk(c->y, c->in, c->w, c->b, conv_thread_scratch(c) + c->dy_floats, b0, nb,
                       c->s);
    c->cnt[k] = nb * ohw;
    /* the statistics of kdp_bn_forward_train, summed while the chunk is in cache; in eval mode
       (running statistics, known before the conv) the chunk is normalised, pooled and relu'd
       right away instead */
    if (c->train)
      stats_block(c->st + k * 2 * C, c->st + k * 2 * C + C, c->shift_d + k * C,
                  c->y + b0 * ohw * C, c->cnt[k], C);
    else
      for (size_t q = b0 * PH; q < (b0 + nb) * PH; q++)
        cbpr_pool_eval(c->out, c->y, c->scale, c->shift, q / PH, q % PH, c->s->OH, c->s->OW, C);
  }
}

/* pooled rows q = (b, ph) in [lo, hi) of the train forward (after the batch statistics) */
static void cbpr_pool_rows(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const size_t PH = c->s->OH / 2, OH = c->s->OH, OW = c->s->OW, C = c->s->Cout;
  for (size_t q = lo; q < hi; q++)
    cbpr_pool_train(c->out, c->win, c->xwin, c->y, c->mean, c->invstd, c->gamma, c->beta, q / PH,
                    q % PH, OH, OW, C);
}

void kdp_conv_bn_pool_relu_forward(float *out, uint8_t *win, float *xwin, float *y, float *mean,
                                   float *invstd, float *run_mean, float *run_var,
                                   const float *in, const float *w, const float *b,
                                   const float *gamma, const float *beta, float *scratch,
                                   const kdp_conv_shape *s, int train, float momentum,
                                   float eps) {
  const size_t B = s->B, C = s->Cout, ohw = s->OH * s->OW, PH = s->OH / 2;
  if (B == 0 || ohw == 0 || C == 0) return;
  const size_t n = conv_n_chunks(s);
  conv_ctx c = {.s = s, .n = n, .tf = conv_thread_floats(s, C), .y = y, .in = in, .w = w, .b = b,
                .train = train, .out = out, .win = win, .xwin = xwin, .mean = mean,
                .invstd = invstd, .gamma = gamma, .beta = beta};
  c.dy_floats = conv_chunk(s) * ohw * C; /* the backward's part of a thread's scratch */
  c.thr = scratch + conv_partial_floats(s);
  /* per chunk: mean, m2; then the merged mean, m2; then per chunk stats_block's shift */
  double *st = c.st = kdp_xmalloc((3 * n + 2) * C * sizeof(double));
  c.shift_d = st + (n + 1) * 2 * C;
  size_t *cnt = c.cnt = kdp_xmalloc(n * sizeof(size_t));
  float *scale = NULL;
  if (!train) {
    scale = kdp_xmalloc(2 * C * sizeof(float));
    bn_eval_coefs(scale, scale + C, gamma, beta, run_mean, run_var, C, eps);
    c.scale = scale;
    c.shift = scale + C;
  }
  kdp_par_tasks(n, cbpr_fwd_chunks, &c);
  if (train) {
    double *mu = st + n * 2 * C;
    stats_merge_all(mu, mu + C, st, n, cnt, C);
    bn_finish_stats(mean, invstd, run_mean, run_var, mu, mu + C, B * ohw, C, momentum, eps);
    kdp_par_elems(B * PH, B * ohw * C, cbpr_pool_rows, &c);
  }
  free(scale);
  free(cnt);
  free(st);
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

typedef struct cbpr_sums_ctx {
  const float *dout, *xwin;
  const uint8_t *win;
  size_t C;
} cbpr_sums_ctx;

static void cbpr_sums_block(double *sg, double *sb, size_t r0, size_t nr, const void *ctx) {
  const cbpr_sums_ctx *c = ctx;
  float *gc = kdp_xmalloc(4 * c->C * sizeof(float));
  cbpr_bwd_sums(sg, sb, gc, c->dout + r0 * c->C, c->win + r0 * c->C, c->xwin + r0 * c->C, nr,
                c->C);
  free(gc);
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
          const int32_t want = (int32_t)((h & 1) * 2 + (w & 1)) | KDP_WIN_RELU;
          for (size_t c = 0; c < C; c++) {
            float xh = (y[r + c] - mean[c]) * invstd[c];
            /* gv where this position won its window and passed the relu, else +0: the select as
               a bit mask, which gcc vectorises without AVX-512 (a ?: here it does not) */
            union {
              float f;
              int32_t i;
            } gv = {k1[c] * dout[po + c]};
            gv.i &= -(int32_t)((int32_t)win[po + c] == want);
            dy[r + c] = gv.f - k2[c] - k3[c] * xh;
          }
        } else {
          for (size_t c = 0; c < C; c++) {
            float xh = (y[r + c] - mean[c]) * invstd[c];
            dy[r + c] = 0.0f - k2[c] - k3[c] * xh;
          }
        }
      }
}

/* groups [lo, hi) of the fused backward: each group's chunks in order */
static void cbpr_bwd_groups(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const kdp_conv_shape *s = c->s;
  const size_t B = s->B, C = s->Cout, OH = s->OH, OW = s->OW, ohw = OH * OW;
  const size_t pp = (OH / 2) * (OW / 2), n = c->n, G = c->cg->groups;
  float *dy = conv_thread_scratch(c), *col = dy + c->dy_floats;
  float *dcol = col + (c->tf - c->dy_floats) / 2;
  for (size_t gi = lo; gi < hi; gi++)
    for (size_t k = gi * n / G; k < (gi + 1) * n / G; k++) {
      size_t b0 = kdp_chunk_lo(k, B, n), nb = kdp_chunk_lo(k + 1, B, n) - b0;
      cbpr_dy(dy, c->y + b0 * ohw * C, c->dout + b0 * pp * C, c->cwin + b0 * pp * C, c->k1, c->k2,
              c->k3, c->mean, c->invstd, nb, OH, OW, C);
      float *gdw, *gdb;
      int first;
      conv_grads_at(c->cg, gi, k == gi * n / G, &gdw, &gdb, &first, C);
      if (gdb) col_sums4(gdb, dy, nb * ohw, C);
      conv_backward_chunk(c->din, c->din_set, gdw, first, dy, c->in, c->w, col, dcol, b0, nb, s);
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
  if (B == 0 || ohw == 0 || C == 0) return;
  (void)out; /* the relu's mask is in win */
  double *sg = kdp_xcalloc(2 * C, sizeof(double)), *sb = sg + C;
  cbpr_sums_ctx sc = {dout, xwin, win, C};
  bwd_sums_blocked(sg, sb, B * pp, C, cbpr_sums_block, &sc);
  if (dgamma)
    for (size_t c = 0; c < C; c++) dgamma[c] += (float)sg[c];
  if (dbeta)
    for (size_t c = 0; c < C; c++) dbeta[c] += (float)sb[c];
  float *k = kdp_xmalloc(3 * C * sizeof(float));
  float *k1 = k, *k2 = k + C, *k3 = k + 2 * C;
  bn_bwd_coefs(k1, k2, k3, sg, sb, invstd, gamma, B * ohw, C);
  if (kkc == 0) dw = din = NULL;
  conv_grads cg;
  conv_ctx c = {.s = s, .n = conv_n_chunks(s), .tf = conv_thread_floats(s, C), .din = din,
                .din_set = din_set, .y = (float *)y, .dout = dout, .cwin = win, .k1 = k1,
                .k2 = k2, .k3 = k3, .mean = (float *)mean, .invstd = (float *)invstd, .in = in,
                .w = w, .cg = &cg};
  c.dy_floats = conv_chunk(s) * ohw * C;
  conv_grads_init(&cg, dw, db, scratch, s, c.n);
  c.thr = scratch + conv_partial_floats(s);
  kdp_par_tasks(cg.groups, cbpr_bwd_groups, &c);
  conv_grads_finish(&cg, C);
  free(k);
  free(sg);
}

/* ================= eval-only models: packed weights, batchnorm folded ================= */

/* An eval-only model's weights are final once loaded, so they are laid out once for the kernel
   below (as ONNX Runtime's MLAS pre-packs constant weights at session creation): W (N x K,
   row-major: dense [out, in], conv [Cout, kh, kw, Cin]) as panels of KDP_PACK_NR output columns,
   panel p holding W[p * NR + j][k] at [k][j] (zero past N). The kernel keeps PK_MR rows x NR
   columns of the output in 16-float AVX-512 registers across the whole of K and reads the input
   rows in place (no packing of the activations). Every output element is the same chain of
   fused multiply-adds (bias, then k = 0 .. K-1) whichever thread or tile computes it, so results
   do not depend on the thread count. Only on CPUs with AVX-512 (kdp_packed_available); elsewhere
   models keep the OpenBLAS path. */
#define PK_MR 8

int kdp_packed_available(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
#else
  return 0;
#endif
}

size_t kdp_pack_floats(size_t N, size_t K) {
  return (N + KDP_PACK_NR - 1) / KDP_PACK_NR * KDP_PACK_NR * K;
}

void kdp_pack_weights(float *P, const float *W, const float *scale, size_t N, size_t K) {
  const size_t panels = (N + KDP_PACK_NR - 1) / KDP_PACK_NR;
  for (size_t p = 0; p < panels; p++)
    for (size_t j = 0; j < KDP_PACK_NR; j++) {
      const size_t n = p * KDP_PACK_NR + j;
      float *dst = P + p * K * KDP_PACK_NR + j;
      for (size_t k = 0; k < K; k++)
        dst[k * KDP_PACK_NR] = n >= N ? 0.0f : scale ? W[n * K + k] * scale[n] : W[n * K + k];
    }
}

void kdp_bn_fold_pack(float *P, float *bias, const float *w, const float *b, const float *gamma,
                      const float *beta, const float *run_mean, const float *run_var, size_t N,
                      size_t K, float eps) {
  float *scale = kdp_xmalloc(2 * (N ? N : 1) * sizeof(float)), *shift = scale + N;
  bn_eval_coefs(scale, shift, gamma, beta, run_mean, run_var, N, eps);
  kdp_pack_weights(P, w, scale, N, K);
  for (size_t n = 0; n < N; n++) bias[n] = (b ? b[n] : 0.0f) * scale[n] + shift[n];
  free(scale);
}

/* Where the kernel reads row q of A (the GEMM's M x K left operand): A(q, ko * run + j) =
   base[(q / ow) * sh + (q % ow) * sw + ko * ks + j], ko < nko, j < run. A dense layer's input is
   rows of K (ow 1, sh lda, nko 1, run K); a convolution reads its (zero-padded) input image in
   place, an implicit im2col: output pixel (oh, ow)'s window is K rows of K * Cin floats, ks apart. */
typedef struct pk_a {
  const float *base;
  size_t ow, sh, sw, nko, run, ks;
} pk_a;

static inline const float *pk_row(const pk_a *a, size_t q) {
  return a->base + (q / a->ow) * a->sh + (q % a->ow) * a->sw;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* mr (<= PK_MR) rows q0.. of one panel: C[r][0..ncols) = bias + sum_k A[q0 + r][k] P[k][.],
   relu'd */
__attribute__((target("avx512f"), always_inline)) static inline void pk_rows(
    float *C, size_t ldc, const pk_a *A, size_t q0, const float *P, const float *bias, int relu,
    __mmask16 m0, __mmask16 m1, const int mr) {
  __m512 c0[PK_MR], c1[PK_MR];
  const float *row[PK_MR];
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < mr; r++) {
    c0[r] = b0;
    c1[r] = b1;
    row[r] = pk_row(A, q0 + (size_t)r);
  }
  const size_t run = A->run;
  for (size_t ko = 0; ko < A->nko; ko++) {
    const float *Pk = P + ko * run * KDP_PACK_NR;
    for (size_t j = 0; j < run; j++) {
      const __m512 w0 = _mm512_load_ps(Pk + j * KDP_PACK_NR);
      const __m512 w1 = _mm512_load_ps(Pk + j * KDP_PACK_NR + 16);
      for (int r = 0; r < mr; r++) {
        const __m512 a = _mm512_set1_ps(row[r][j]);
        c0[r] = _mm512_fmadd_ps(a, w0, c0[r]);
        c1[r] = _mm512_fmadd_ps(a, w1, c1[r]);
      }
    }
    for (int r = 0; r < mr; r++) row[r] += A->ks;
  }
  const __m512 z = _mm512_setzero_ps();
  for (int r = 0; r < mr; r++) {
    /* max(x, 0) returns 0 for NaN, as the relu layer's x > 0 ? x : 0 */
    if (relu) {
      c0[r] = _mm512_max_ps(c0[r], z);
      c1[r] = _mm512_max_ps(c1[r], z);
    }
    _mm512_mask_storeu_ps(C + (size_t)r * ldc, m0, c0[r]);
    _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16, m1, c1[r]);
  }
}

/* all M rows of one panel of ncols (<= NR) output columns */
__attribute__((target("avx512f"))) static void pk_panel(float *C, size_t ldc, const pk_a *A,
                                                        size_t M, const float *P,
                                                        const float *bias, int relu,
                                                        size_t ncols) {
  const __mmask16 m0 = ncols >= 16 ? 0xffff : (__mmask16)((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? 0xffff : ncols > 16 ? (__mmask16)((1u << (ncols - 16)) - 1) : 0;
  size_t q = 0;
  for (; q + PK_MR <= M; q += PK_MR) pk_rows(C + q * ldc, ldc, A, q, P, bias, relu, m0, m1, PK_MR);
  C += q * ldc;
  switch (M - q) {
    case 7: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 7); break;
    case 6: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 6); break;
    case 5: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 5); break;
    case 4: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 4); break;
    case 3: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 3); break;
    case 2: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 2); break;
    case 1: pk_rows(C, ldc, A, q, P, bias, relu, m0, m1, 1); break;
    default: break;
  }
}
#else
static void pk_panel(float *C, size_t ldc, const pk_a *A, size_t M, const float *P,
                     const float *bias, int relu, size_t ncols) {
  (void)C, (void)ldc, (void)A, (void)M, (void)P, (void)bias, (void)relu, (void)ncols;
  abort(); /* kdp_packed_available() is 0: never called */
}
#endif

/* panels [p0, p1) of out (M x N, ldc) = A (M x K) . W^T + bias, relu'd when relu */
static void packed_gemm(float *out, size_t ldc, const pk_a *A, size_t M, const float *P,
                        size_t N, const float *bias, int relu, size_t p0, size_t p1) {
  const size_t K = A->nko * A->run;
  for (size_t p = p0; p < p1; p++) {
    const size_t c0 = p * KDP_PACK_NR, nc = N - c0 < KDP_PACK_NR ? N - c0 : KDP_PACK_NR;
    pk_panel(out + c0, ldc, A, M, P + p * K * KDP_PACK_NR, bias ? bias + c0 : NULL, relu, nc);
  }
}

typedef struct packed_ctx {
  float *out;
  const float *P, *bias;
  pk_a a;
  size_t B, O;
  int relu;
} packed_ctx;

static void dense_packed_panels(void *ctx, size_t lo, size_t hi) {
  const packed_ctx *c = ctx;
  packed_gemm(c->out, c->O, &c->a, c->B, c->P, c->O, c->bias, c->relu, lo, hi);
}

void kdp_dense_forward_packed(float *out, const float *in, const float *P, const float *b,
                              size_t B, size_t n_in, size_t n_out, int relu) {
  if (B == 0 || n_out == 0) return;
  packed_ctx c = {.out = out, .P = P, .bias = b, .B = B, .O = n_out, .relu = relu,
                  .a = {.base = in, .ow = 1, .sh = n_in, .sw = 0, .nko = 1, .run = n_in}};
  kdp_par_tasks((n_out + KDP_PACK_NR - 1) / KDP_PACK_NR, dense_packed_panels, &c);
}

/* one sample's pooled, relu'd rows from its conv output y (OH x OW x C, batchnorm folded in):
   kdp_maxpool_forward's scan (strictly larger or NaN wins), then the relu */
static void pool_relu_sample(float *restrict out, const float *restrict y, size_t OH, size_t OW,
                             size_t C) {
  const size_t PH = OH / 2, PW = OW / 2;
  for (size_t ph = 0; ph < PH; ph++)
    for (size_t pw = 0; pw < PW; pw++) {
      const float *y0 = y + (2 * ph * OW + 2 * pw) * C;
      const float *y1 = y0 + C, *y2 = y0 + OW * C, *y3 = y2 + C;
      float *o = out + (ph * PW + pw) * C;
      for (size_t c = 0; c < C; c++) {
        float m = y0[c];
        m = (y1[c] > m) | (y1[c] != y1[c]) ? y1[c] : m;
        m = (y2[c] > m) | (y2[c] != y2[c]) ? y2[c] : m;
        m = (y3[c] > m) | (y3[c] != y3[c]) ? y3[c] : m;
        o[c] = m > 0.0f ? m : 0.0f;
      }
    }
}

/* floats of one sample's zero-padded input image (none without padding: read in place) */
static size_t padded_floats(const kdp_conv_shape *s) {
  return s->pad ? (s->H + 2 * s->pad) * (s->W + 2 * s->pad) * s->Cin : 0;
}

/* A thread's scratch slice (conv_thread_floats(s, Cout), sized for the train forward) must hold a
   sample's conv output and padded image; it has rows * (2 K K Cin + Cout) floats, rows >= OH OW
   (1 sample per chunk at least: checked for B = 1, the smallest). */
int kdp_conv_packed_fits(const kdp_conv_shape *s) {
  kdp_conv_shape one = *s;
  one.B = 1;
  return s->OH * s->OW * s->Cout + padded_floats(s) <= conv_thread_floats(&one, s->Cout);
}

/* the samples of chunks [lo, hi), one at a time: the packed GEMM straight from the sample's
   zero-padded image (an implicit im2col) into the thread's scratch, then pool and relu while that
   sample's conv output is in cache */
static void cpr_packed_chunks(void *ctx, size_t lo, size_t hi) {
  const conv_ctx *c = ctx;
  const kdp_conv_shape *s = c->s;
  const size_t B = s->B, C = s->Cout, ohw = s->OH * s->OW, Ci = s->Cin, pad = s->pad;
  const size_t Wp = s->W + 2 * pad, in_per = s->H * s->W * Ci;
  const size_t out_per = (s->OH / 2) * (s->OW / 2) * C;
  float *y = conv_thread_scratch(c), *xp = y + ohw * C;
  pk_a a = {.base = xp, .ow = s->OW, .sh = s->stride * Wp * Ci, .sw = s->stride * Ci,
            .nko = s->K, .run = s->K * Ci, .ks = Wp * Ci};
  for (size_t k = lo; k < hi; k++)
    for (size_t b = kdp_chunk_lo(k, B, c->n); b < kdp_chunk_lo(k + 1, B, c->n); b++) {
      const float *x = c->in + b * in_per;
      if (pad == 0) {
        a.base = x;
      } else {
        /* the padding rows and columns stay zero: only the interior is written per sample */
        for (size_t h = 0; h < s->H; h++)
          memcpy(xp + ((h + pad) * Wp + pad) * Ci, x + h * s->W * Ci, s->W * Ci * sizeof(float));
      }
      packed_gemm(y, C, &a, ohw, c->w, C, c->b, 0, 0, (C + KDP_PACK_NR - 1) / KDP_PACK_NR);
      pool_relu_sample(c->out + b * out_per, y, s->OH, s->OW, C);
    }
}

void kdp_conv_pool_relu_forward_packed(float *out, const float *in, const float *P,
                                       const float *bias, float *scratch,
                                       const kdp_conv_shape *s) {
  if (s->B == 0 || s->OH * s->OW == 0 || s->Cout == 0) return;
  conv_ctx c = {.s = s, .n = conv_n_chunks(s), .tf = conv_thread_floats(s, s->Cout), .out = out,
                .in = in, .w = P, .b = bias};
  if (!kdp_conv_packed_fits(s)) abort(); /* kdp_model_freeze packs only blocks that fit */
  c.thr = scratch + conv_partial_floats(s);
  /* the padding of every thread's image is zeroed once per call */
  for (int t = 0; t < kdp_par_threads(); t++)
    memset(c.thr + (size_t)t * c.tf + s->OH * s->OW * s->Cout, 0,
           padded_floats(s) * sizeof(float));
  kdp_par_tasks(c.n, cpr_packed_chunks, &c);
}
