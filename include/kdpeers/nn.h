/* nn.h: layers as forward/backward pairs on raw float buffers, models built from them, and SGD. */
#ifndef KDPEERS_NN_H
#define KDPEERS_NN_H

#include "kdpeers/common.h"

/*
 * Conventions (llm.c style):
 * - Activations are NHWC: (B x H x W x C), channel fastest. Dense tensors are (B x D).
 * - Weights use PyTorch's shapes, except conv weights which are (Cout x K x K x Cin)
 *   (PyTorch's is Cout x Cin x K x K; the golden-file script permutes).
 * - Backward functions ACCUMULATE (+=) into every gradient they write, input
 *   gradients included. A NULL input gradient means "not needed".
 * - Every BLAS path has a *_naive twin (plain loops) used by the tests.
 */

/* ---- threads ----
   Every kernel below runs on a team of n threads (kdpeers' pool, or OpenMP when built with
   -Dthreads=openmp), and OpenBLAS is set to one thread:
   kdpeers splits the GEMMs into tiles itself. Every parallel loop runs a fixed list of tasks
   (GEMM tiles, batch chunks, row blocks) whose boundaries depend on the shapes only, and partial
   sums are added in task order, so results are bitwise the same for every n (docs/threads.md).
   n < 1 means 1. Scratch sizes (kdp_conv_scratch_floats, ...) are for the current n. */
void kdp_nn_set_threads(int n);
int kdp_nn_threads(void);
/* Profile of the parallel loops: wall time inside them, and the same loops modelled at
   1, 2, 4, ..., 64 threads from their task counts (n equal tasks on p threads take ceil(n/p)
   task times). Collect it at 1 thread; time outside the loops is the serial part. */
#define KDP_NN_PROFILE_WIDTHS 7
typedef struct kdp_nn_profile {
  uint64_t loops;
  double parallel_seconds;
  double modelled_seconds[KDP_NN_PROFILE_WIDTHS];
} kdp_nn_profile;
void kdp_nn_profile_start(void);
void kdp_nn_profile_stop(kdp_nn_profile *out);

/* ---- dense: out (B x out_dim) = in (B x in_dim) . w^T + b; w (out_dim x in_dim), b or NULL ---- */
/* (no parameter is named I: complex.h, pulled in by cblas.h, defines I as a macro) */
void kdp_dense_forward(float *out, const float *in, const float *w, const float *b, size_t B,
                       size_t in_dim, size_t out_dim);
void kdp_dense_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                        const float *w, size_t B, size_t in_dim, size_t out_dim);
void kdp_dense_forward_naive(float *out, const float *in, const float *w, const float *b, size_t B,
                             size_t in_dim, size_t out_dim);
void kdp_dense_backward_naive(float *din, float *dw, float *db, const float *dout,
                              const float *in, const float *w, size_t B, size_t in_dim, size_t out_dim);
/* The same, writing instead of adding: din when set has KDP_SET_DIN, dw and db with
   KDP_SET_PARAMS (the GEMMs with beta = 0; bitwise the result of adding onto zeros), so no zeroing
   pass is needed first (kdp_model_backward_set) */
#define KDP_SET_DIN 1u
#define KDP_SET_PARAMS 2u
void kdp_dense_backward_set(float *din, float *dw, float *db, const float *dout, const float *in,
                            const float *w, size_t B, size_t in_dim, size_t out_dim, unsigned set);

/* ---- dense + relu: out = relu(in . w^T + b), the relu applied to each GEMM tile in cache ----
   backward: dout (B x out_dim) is MASKED IN PLACE (zeroed where out <= 0), then the dense
   backward runs on it (accumulating as kdp_dense_backward) */
void kdp_dense_relu_forward(float *out, const float *in, const float *w, const float *b,
                            size_t B, size_t in_dim, size_t out_dim);
void kdp_dense_relu_backward(float *din, float *dw, float *db, float *dout, const float *out,
                             const float *in, const float *w, size_t B, size_t in_dim,
                             size_t out_dim);
void kdp_dense_relu_forward_naive(float *out, const float *in, const float *w, const float *b,
                                  size_t B, size_t in_dim, size_t out_dim);
void kdp_dense_relu_backward_naive(float *din, float *dw, float *db, float *dout,
                                   const float *out, const float *in, const float *w, size_t B,
                                   size_t in_dim, size_t out_dim);
void kdp_dense_relu_backward_set(float *din, float *dw, float *db, float *dout, const float *out,
                                 const float *in, const float *w, size_t B, size_t in_dim,
                                 size_t out_dim, unsigned set);

/* ---- conv2d, NHWC, square kernel K, stride, zero padding pad ---- */
typedef struct kdp_conv_shape {
  size_t B, H, W, Cin, Cout, K, stride, pad;
  size_t OH, OW; /* filled by kdp_conv_shape_init */
} kdp_conv_shape;
void kdp_conv_shape_init(kdp_conv_shape *s);
/* floats of scratch the BLAS conv needs: per thread the im2col of a chunk of the batch and its
   gradient, and the weight-gradient partials of the chunks (for the current kdp_nn_threads) */
size_t kdp_conv_scratch_floats(const kdp_conv_shape *s);
/* the number of batch chunks the conv loops run as tasks (depends on the shape only) */
size_t kdp_conv_chunks(const kdp_conv_shape *s);
/* in (B x H x W x Cin), w (Cout x K x K x Cin), b (Cout) or NULL, out (B x OH x OW x Cout) */
void kdp_conv2d_forward(float *out, const float *in, const float *w, const float *b,
                        float *scratch, const kdp_conv_shape *s);
void kdp_conv2d_backward(float *din, float *dw, float *db, const float *dout, const float *in,
                         const float *w, float *scratch, const kdp_conv_shape *s);
void kdp_conv2d_forward_naive(float *out, const float *in, const float *w, const float *b,
                              const kdp_conv_shape *s);
void kdp_conv2d_backward_naive(float *din, float *dw, float *db, const float *dout,
                               const float *in, const float *w, const kdp_conv_shape *s);

/* ---- pooling, NHWC. Output size: (H + 2 pad - K) / stride + 1 ---- */
/* max pool; argmax (B x OH x OW x C) records the flat input index of each max (for backward);
   padded positions never win */
void kdp_maxpool_forward(float *out, int32_t *argmax, const float *in, size_t B, size_t H,
                         size_t W, size_t C, size_t K, size_t stride, size_t pad);
/* n_out outputs in all, B samples (an output's window lies in its own sample) */
void kdp_maxpool_backward(float *din, const float *dout, const int32_t *argmax, size_t B,
                          size_t n_out);
/* average pool, count_include_pad = true (PyTorch's default) */
void kdp_avgpool_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C,
                         size_t K, size_t stride, size_t pad);
void kdp_avgpool_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C,
                          size_t K, size_t stride, size_t pad);
/* global average pool: in (B x HW x C) -> out (B x C) */
void kdp_gap_forward(float *out, const float *in, size_t B, size_t HW, size_t C);
void kdp_gap_backward(float *din, const float *dout, size_t B, size_t HW, size_t C);

/* ---- element-wise ---- */
void kdp_relu_forward(float *out, const float *in, size_t n);
/* uses the forward OUTPUT (out > 0 <=> in > 0) */
void kdp_relu_backward(float *din, const float *dout, const float *out, size_t n);
/* inverted dropout: mask[i] is 0 or 1/(1-p); p = 0 copies */
void kdp_dropout_forward(float *out, float *mask, const float *in, size_t n, float p,
                         kdp_rng *rng);
void kdp_dropout_backward(float *din, const float *dout, const float *mask, size_t n);
/* flatten NHWC into PyTorch's NCHW order: out (B x C*H*W) with index c*H*W + h*W + w */
void kdp_flatten_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t C);
void kdp_flatten_backward(float *din, const float *dout, size_t B, size_t H, size_t W, size_t C);
/* residual add: out = a + b; backward: da += dout, db += dout */
void kdp_add_forward(float *out, const float *a, const float *b, size_t n);
void kdp_add_backward(float *da, float *db, const float *dout, size_t n);
/* CIFAR ResNet shortcut option A: out (B x OH x OW x Cout) = in[:, ::stride, ::stride, :]
   with the channels zero-padded by (Cout - Cin) / 2 on each side */
void kdp_shortcut_a_forward(float *out, const float *in, size_t B, size_t H, size_t W, size_t Cin,
                            size_t Cout, size_t stride);
void kdp_shortcut_a_backward(float *din, const float *dout, size_t B, size_t H, size_t W,
                             size_t Cin, size_t Cout, size_t stride);

/* ---- batchnorm over N rows of C channels (N = B*H*W for NHWC, B for dense) ---- */
/* train: normalises with batch statistics, stores xhat (N x C) and invstd (C) for backward,
   updates running stats like PyTorch (momentum, unbiased variance for running_var) */
void kdp_bn_forward_train(float *out, float *xhat, float *invstd, float *run_mean,
                          float *run_var, const float *in, const float *gamma, const float *beta,
                          size_t N, size_t C, float momentum, float eps);
void kdp_bn_forward_eval(float *out, const float *in, const float *gamma, const float *beta,
                         const float *run_mean, const float *run_var, size_t N, size_t C,
                         float eps);
void kdp_bn_backward(float *din, float *dgamma, float *dbeta, const float *dout,
                     const float *xhat, const float *invstd, const float *gamma, size_t N,
                     size_t C);
/* as kdp_bn_backward, but din is WRITTEN (=), not accumulated: the model uses it where the
   batchnorm is the first to produce din's gradient, which saves zeroing the buffer */
void kdp_bn_backward_set(float *din, float *dgamma, float *dbeta, const float *dout,
                         const float *xhat, const float *invstd, const float *gamma, size_t N,
                         size_t C);
/* The same batchnorm in pieces, for rows spread over several processes (kd's replicated modules
   shard their batch by rows): the sums of each piece are added up by the caller before they are
   finished. Sums are ACCUMULATED, in double, of (x - shift) per channel; shift (C) must be the
   same everywhere (e.g. the running mean). Total is the row count of the whole batch. */
void kdp_bn_stats_rows(double *sum, double *sq, const float *in, const double *shift, size_t N,
                       size_t C);
/* mean, invstd (C) of the whole batch from its sums; updates the running stats like PyTorch */
void kdp_bn_stats_finish(float *mean, float *invstd, float *run_mean, float *run_var,
                         const double *sum, const double *sq, const double *shift, size_t total,
                         size_t C, float momentum, float eps);
/* out = gamma * xhat + beta, xhat = (in - mean) * invstd, for N rows */
void kdp_bn_normalize(float *out, float *xhat, const float *in, const float *mean,
                      const float *invstd, const float *gamma, const float *beta, size_t N,
                      size_t C);
/* backward: sg += sum dout*xhat, sb += sum dout over N rows (the whole batch's sums are
   dgamma and dbeta); then din += gamma*invstd/total * (total*dout - sb - xhat*sg) */
void kdp_bn_backward_sums(double *sg, double *sb, const float *dout, const float *xhat, size_t N,
                          size_t C);
void kdp_bn_backward_rows(float *din, const float *dout, const float *xhat, const double *sg,
                          const double *sb, const float *invstd, const float *gamma,
                          size_t total, size_t N, size_t C);

/* ---- fused conv -> batchnorm -> max-pool 2x2 stride 2 -> relu (the cnn's blocks) ----
   y (B x OH x OW x Cout) receives the conv output (bias added) and is kept for backward;
   out (B x OH/2 x OW/2 x Cout) = relu(maxpool(bn(y))). Train mode normalises with the batch
   statistics (mean, invstd: Cout), updates the running stats, and records per pooled element
   the window position of the max (win: 0..3, row-major; | KDP_WIN_RELU where the output passed
   the relu) and its normalised value (xwin); eval mode uses the running stats and writes none of
   these. Results match the unfused layers up to the order of the batchnorm sums. */
#define KDP_WIN_RELU 4
size_t kdp_conv_bn_pool_relu_scratch_floats(const kdp_conv_shape *s);
void kdp_conv_bn_pool_relu_forward(float *out, uint8_t *win, float *xwin, float *y, float *mean,
                                   float *invstd, float *run_mean, float *run_var,
                                   const float *in, const float *w, const float *b,
                                   const float *gamma, const float *beta, float *scratch,
                                   const kdp_conv_shape *s, int train, float momentum, float eps);
/* from dout (the gradient of out): accumulates into dw, db, dgamma, dbeta and din (written
   instead when din_set); out is only read by the naive twin (the fast one reads win) */
void kdp_conv_bn_pool_relu_backward(float *din, int din_set, float *dw, float *db, float *dgamma,
                                    float *dbeta, const float *dout, const float *out,
                                    const uint8_t *win, const float *xwin, const float *y,
                                    const float *mean, const float *invstd, const float *in,
                                    const float *w, const float *gamma, float *scratch,
                                    const kdp_conv_shape *s);
/* the same from the unfused naive conv and the batchnorm, max-pool and relu layers */
void kdp_conv_bn_pool_relu_forward_naive(float *out, uint8_t *win, float *xwin, float *y,
                                         float *mean, float *invstd, float *run_mean,
                                         float *run_var, const float *in, const float *w,
                                         const float *b, const float *gamma, const float *beta,
                                         const kdp_conv_shape *s, int train, float momentum,
                                         float eps);
void kdp_conv_bn_pool_relu_backward_naive(float *din, int din_set, float *dw, float *db,
                                          float *dgamma, float *dbeta, const float *dout,
                                          const float *out, const uint8_t *win,
                                          const float *xwin, const float *y, const float *mean,
                                          const float *invstd, const float *in, const float *w,
                                          const float *gamma, const kdp_conv_shape *s);

/* ================= models ================= */

/* The op kinds a model is built from. */
typedef enum kdp_op_kind {
  KDP_OP_DENSE,
  KDP_OP_CONV,
  KDP_OP_BN,
  KDP_OP_RELU,
  KDP_OP_MAXPOOL,
  KDP_OP_AVGPOOL,
  KDP_OP_GAP,
  KDP_OP_DROPOUT,
  KDP_OP_FLATTEN,
  KDP_OP_ADD,       /* residual add of two earlier tensors */
  KDP_OP_SHORTCUT_A /* option-A shortcut (subsample + zero channel pad) */
} kdp_op_kind;

typedef struct kdp_model kdp_model;
#define KDP_STR_ARCH 256

/* Input geometry of the data a model is built for. */
typedef struct kdp_input_shape {
  size_t H, W, C, n_classes;
} kdp_input_shape;

/*
 * Builds a model from an architecture string:
 *   mlp(h1,h2,...)          flatten, dense+relu per hidden size, dense -> classes
 *   cnn                     the Fashion-MNIST CNN of the README
 *   resnet20|32|56|110      CIFAR ResNets, option-A shortcuts
 *   wrn16_2, wrnD_K         wide ResNets (pre-activation, 1x1 conv shortcuts)
 *   seq:SPEC                sequential spec, e.g. "seq:conv(16,3,1,1),bn,relu,gap,dense(10)"
 * max_batch bounds the batch passed to forward. Returns 0 or a negative code with err set.
 */
int kdp_model_create(kdp_model **out, const char *arch, kdp_input_shape in, size_t max_batch,
                     kdp_error *err);
/* The same for eval-mode forward passes only (kdp_model_forward with train = 0; backward aborts):
   no gradients or batchnorm caches, and activation memory reused once an activation is dead, so
   only the features and logits stay valid after a forward. For inference (libkdpeers-infer). */
int kdp_model_create_infer(kdp_model **out, const char *arch, kdp_input_shape in,
                           size_t max_batch, kdp_error *err);
void kdp_model_free(kdp_model *m);

/* What kdp_model_create would allocate for (arch, in, max_batch), without allocating it. */
typedef struct kdp_model_memory {
  size_t n_params, n_buffers, feature_dim;
  double params_bytes;     /* parameters, gradients and buffers (BN running statistics) */
  double activation_bytes; /* activations, their gradients, layer caches and scratch */
} kdp_model_memory;
/* ---- eval-only models: weights packed once for an AVX-512 kernel (src/nn/layers.c) ----
   kdp_packed_available: the CPU has AVX-512 (else the packed kernels must not be called).
   kdp_pack_weights packs W (N x K row-major, row n scaled by scale[n] when scale) into
   kdp_pack_floats(N, K) floats (64-byte aligned); kdp_bn_fold_pack packs a conv's weights with the
   following eval-mode batchnorm folded in (bias: N floats, b may be NULL). */
#define KDP_PACK_NR 32
int kdp_packed_available(void);
size_t kdp_pack_floats(size_t N, size_t K);
void kdp_pack_weights(float *P, const float *W, const float *scale, size_t N, size_t K);
void kdp_bn_fold_pack(float *P, float *bias, const float *w, const float *b, const float *gamma,
                      const float *beta, const float *run_mean, const float *run_var, size_t N,
                      size_t K, float eps);
/* out (B x n_out) = in (B x n_in) . W^T + b (relu'd when relu), W packed */
void kdp_dense_forward_packed(float *out, const float *in, const float *P, const float *b,
                              size_t B, size_t n_in, size_t n_out, int relu);
/* the fused block in eval mode with the batchnorm folded into P and bias (kdp_bn_fold_pack):
   out = relu(maxpool(conv(in))); scratch as kdp_conv_bn_pool_relu_scratch_floats */
void kdp_conv_pool_relu_forward_packed(float *out, const float *in, const float *P,
                                       const float *bias, float *scratch,
                                       const kdp_conv_shape *s);
/* whether the scratch holds what kdp_conv_pool_relu_forward_packed needs for shape s */
int kdp_conv_packed_fits(const kdp_conv_shape *s);

int kdp_model_plan(const char *arch, kdp_input_shape in, size_t max_batch, kdp_model_memory *mem,
                   kdp_error *err);
/* The same for kdp_model_create_infer (no gradients or caches, shared activation memory). */
int kdp_model_plan_infer(const char *arch, kdp_input_shape in, size_t max_batch,
                         kdp_model_memory *mem, kdp_error *err);

/* Eval-only models (kdp_model_create_infer) whose parameters and buffers are loaded: packs the
   dense and fused-block weights once (batchnorm folded into the convs) for the AVX-512 kernels,
   which later forwards use. Returns 1 when packed, 0 when not (a training model, or no AVX-512:
   forwards keep the OpenBLAS path); on = 0 goes back to the OpenBLAS path. kdp_model_params,
   kdp_model_buffers and kdp_model_tensor_from_torch drop the packs (the weights may change):
   freeze again after. */
int kdp_model_freeze(kdp_model *m, int on);

/* PyTorch default init: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); BN gamma=1, beta=0,
   running mean 0, var 1. */
void kdp_model_init(kdp_model *m, kdp_rng *rng);

/* The arena: n_params floats; grads and optimizer state use the same layout. */
size_t kdp_model_n_params(const kdp_model *m);
float *kdp_model_params(kdp_model *m);
float *kdp_model_grads(kdp_model *m);
/* Makes g (n_params floats, 64-byte aligned, owned by the caller) the gradient arena, with the
   current gradients copied in; returns the previous arena (swap it back before freeing g). Used
   to place the gradients in memory shared by a peer's ranks (src/dist/buckets.c). */
float *kdp_model_swap_grads(kdp_model *m, float *g);
/* The same for the parameter arena (the values copied in; the previous arena returned). */
float *kdp_model_swap_params(kdp_model *m, float *p);
/* Non-trained state (BN running mean/var), contiguous too (for checkpoints and allreduce). */
size_t kdp_model_n_buffers(const kdp_model *m);
float *kdp_model_buffers(kdp_model *m);

/* Named views into the arena, in creation order (e.g. "conv1.weight", "fc2.bias"). */
size_t kdp_model_n_tensors(const kdp_model *m);
const char *kdp_model_tensor_name(const kdp_model *m, size_t i);
size_t kdp_model_tensor_offset(const kdp_model *m, size_t i);
size_t kdp_model_tensor_size(const kdp_model *m, size_t i);
/* Named views into the buffers (BN running stats), e.g. "bn1.running_mean". */
size_t kdp_model_n_buffer_tensors(const kdp_model *m);
const char *kdp_model_buffer_name(const kdp_model *m, size_t i);
size_t kdp_model_buffer_offset(const kdp_model *m, size_t i);

size_t kdp_model_feature_dim(const kdp_model *m); /* d of the pooled penultimate features */
size_t kdp_model_n_classes(const kdp_model *m);
double kdp_model_flops_per_sample(const kdp_model *m); /* forward multiply-adds x 2 */
const char *kdp_model_arch(const kdp_model *m);
/* one line per op, for --print-model and logs */
void kdp_model_describe(const kdp_model *m, FILE *f);

/* PyTorch's view of the tensors (the state_dict of the reference models in launch/kdpm2torch.py):
   shape of tensor i in dims (unused trailing dims 1), returns ndim; conv weights are
   (Cout, Cin, K, K) there, (Cout, K, K, Cin) in the arena, so the copies permute them. */
size_t kdp_model_tensor_shape(const kdp_model *m, size_t i, size_t dims[4]);
void kdp_model_tensor_to_torch(const kdp_model *m, size_t i, float *dst);
void kdp_model_tensor_from_torch(kdp_model *m, size_t i, const float *src);
size_t kdp_model_buffer_size(const kdp_model *m, size_t i); /* floats of buffer tensor i */

/* A read-only view of the graph (ONNX export, model files). Activation 0 is the input; every op
   reads in (and in2 for ADD) and writes out; activation shapes are per sample H x W x C (dense
   tensors 1 x 1 x D). Ops are in execution order; fused blocks are listed as their parts. */
#define KDP_NO_TENSOR ((size_t)-1)
typedef struct kdp_op_info {
  kdp_op_kind kind;
  int in, in2, out;
  size_t weight, bias;               /* tensor indices (BN: gamma, beta) or KDP_NO_TENSOR */
  size_t running_mean, running_var;  /* buffer tensor indices (BN) or KDP_NO_TENSOR */
  size_t K, stride, pad;             /* conv and pools; SHORTCUT_A: stride */
  float p;                           /* dropout */
} kdp_op_info;
size_t kdp_model_n_ops(const kdp_model *m);
void kdp_model_op(const kdp_model *m, size_t i, kdp_op_info *info);
void kdp_model_act_shape(const kdp_model *m, int id, size_t *H, size_t *W, size_t *C);
int kdp_model_logits_act(const kdp_model *m);

/* Use the naive (non-BLAS) kernels, for tests. */
void kdp_model_set_naive(kdp_model *m, int naive);

/*
 * Forward pass on x (B x H x W x C floats, already normalised). train != 0 uses batch statistics
 * and dropout (rng required then). Returns the logits (B x n_classes), valid until the next call.
 * The pooled features (B x feature_dim) are at kdp_model_features().
 */
const float *kdp_model_forward(kdp_model *m, const float *x, size_t B, int train, kdp_rng *rng);
const float *kdp_model_features(const kdp_model *m);
/* Backward from dlogits (B x n_classes) and optionally dfeatures (B x feature_dim, may be NULL),
   for the last forward (which must have been train mode). ACCUMULATES into the grads. */
void kdp_model_backward(kdp_model *m, const float *dlogits, const float *dfeatures);
/* The same, but the pass WRITES the gradients (every parameter's gradient is this pass's, whatever
   the grads held before): the step's kdp_model_zero_grad + kdp_model_backward without the zeroing
   pass, with bitwise the same gradients. Dense layers write through their GEMMs (beta = 0) and
   bias sums; every other op zeroes its own gradient just before its backward. */
void kdp_model_backward_set(kdp_model *m, const float *dlogits, const float *dfeatures);
void kdp_model_zero_grad(kdp_model *m);
/* Called by kdp_model_backward on the calling thread after each layer (an op, or a fused block),
   in backward order, with `ready`: grads[ready, n_params) are final for this pass (no later
   layer writes them). ready never grows within a pass and is 0 after the layer holding the
   first tensor. For overlapping the gradient allreduce with the backward pass (src/dist's
   buckets); NULL removes the hook. */
typedef void (*kdp_backward_hook)(void *ctx, size_t ready);
void kdp_model_set_backward_hook(kdp_model *m, kdp_backward_hook fn, void *ctx);
/* The distinct values of ready in a backward pass, decreasing (the offsets where a layer's
   gradients begin); writes at most max, returns how many there are. */
size_t kdp_model_grad_marks(const kdp_model *m, size_t *marks, size_t max);
/* kdp_model_backward_set with a second hook for this pass only, called after the model's */
void kdp_model_backward_set_each(kdp_model *m, const float *dlogits, const float *dfeatures,
                                 kdp_backward_hook fn, void *ctx);

/* ================= optimizer ================= */

/* SGD with PyTorch's semantics: g += wd * p; buf = mu * buf + g (buf = g on the first step);
   g = nesterov ? g + mu * buf : buf; p -= lr * g. */
typedef struct kdp_sgd {
  float momentum, weight_decay;
  int nesterov;
  size_t n;
  float *buf;      /* momentum buffer, same layout as params */
  int64_t n_steps; /* steps taken */
} kdp_sgd;
void kdp_sgd_init(kdp_sgd *o, size_t n, float momentum, float weight_decay, int nesterov);
void kdp_sgd_free(kdp_sgd *o);
void kdp_sgd_step(kdp_sgd *o, float *params, const float *grads, float lr);
/* One step of the elements in n ranges [lo_hi[2k], lo_hi[2k + 1]) only (the rest of params and
   buf untouched; counted as one step): the parts of a module a rank keeps current. */
void kdp_sgd_step_ranges(kdp_sgd *o, float *params, const float *grads, float lr,
                         const size_t *lo_hi, size_t n);
/* The step of the elements [lo, hi) only, NOT counted: a caller that steps the vector in parts
   counts the step once, after the last part (o->n_steps++; kdp_model_backward_sgd does). */
void kdp_sgd_update(kdp_sgd *o, float *params, const float *grads, float lr, size_t lo, size_t hi);
/* The per-element update of kdp_sgd_step on n elements, serially, with the parameters p, the
   momentum buf and the gradients g given (all already offset to the first element), NOT counted:
   the one code every SGD path runs, so that they agree bitwise (src/dist/buckets.c's fused
   sum + step over a shared window uses it on its slice). buf unused when o->momentum == 0. */
void kdp_sgd_apply(const kdp_sgd *o, float *params, float *buf, const float *grads, float lr,
                   size_t n);
/* kdp_model_backward_set fused with kdp_sgd_step(o, params, grads, lr): each layer's parameters
   take their optimizer step right after the backward pass has made their gradients final (see
   kdp_model_set_backward_hook; for mlp(512,256) that saves no measurable cache misses:
   docs/threads.md). Bitwise the same as the two calls in
   turn (the same operations per element, and no op of the backward pass reads a parameter after
   its gradient is final); only when nothing changes the gradients in between (no sum over a
   peer's ranks, k = 1). o->n == kdp_model_n_params(m). */
void kdp_model_backward_sgd(kdp_model *m, const float *dlogits, const float *dfeatures, kdp_sgd *o,
                            float lr);

/* Learning-rate schedule. */
typedef enum kdp_schedule_kind {
  KDP_SCHEDULE_CONSTANT,
  KDP_SCHEDULE_COSINE,
  KDP_SCHEDULE_MULTISTEP
} kdp_schedule_kind;
typedef struct kdp_schedule {
  kdp_schedule_kind kind;
  double base_lr;
  int64_t total_steps;     /* cosine reaches 0 here (PyTorch CosineAnnealingLR, T_max) */
  int64_t steps_per_epoch;
  double warmup_epochs;    /* linear warm-up from 0 over these epochs */
  double gamma;            /* multistep factor */
  int n_milestones;
  double milestones[16];   /* epochs */
} kdp_schedule;
/* lr used for step `step` (0-based) */
double kdp_schedule_lr(const kdp_schedule *s, int64_t step);

#endif
