/* model.c: models as a list of ops over activation buffers, built from arch strings (the zoo). */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/nn.h"
#include "par.h"

#define MAX_OPS 512
#define MAX_ACTS 513
#define MAX_TENSORS 1024
#define NONE ((size_t)-1)

/* One activation: per-sample shape H x W x C (dense tensors have H = W = 1). */
typedef struct act {
  size_t H, W, C;
  float *val;      /* max_batch x H x W x C; the input activation points at the caller's x */
  float *grad;     /* same size; NULL for the input */
  int last_reader; /* index of the last op that reads it (backward zeroes grad before that op) */
  int borrowed;    /* eval-only models: val is another activation's memory (freed there) */
} act;

typedef struct op {
  kdp_op_kind kind;
  int in, in2, out;     /* activation ids (in2 for ADD) */
  size_t w, b;          /* param offsets or NONE (BN: w = gamma, b = beta) */
  size_t wn, bn;        /* their sizes (floats; grad_ready_plan) */
  size_t rm, rv;        /* BN running mean / var offsets in buffers */
  size_t K, stride, pad;
  float p;              /* dropout probability */
  kdp_conv_shape cs;    /* conv: B filled per call */
  float *xhat, *invstd; /* BN caches */
  float *mask;          /* dropout */
  int32_t *argmax;      /* maxpool */
  size_t fan_in;
  int fused;            /* > 0: first op of a fused block of that many ops; -1: inside one */
  uint8_t *win;         /* fused block: max-pool winners, their xhat, the batch mean */
  float *xwin, *mean;
  float *pack, *pbias;  /* frozen eval-only models: packed weights, folded bias (fused blocks) */
} op;

typedef struct tensor {
  char name[64];
  size_t off, size, fan_in;
  int kind; /* 0 weight/bias (uniform init), 1 BN gamma (ones), 2 BN beta (zeros) */
  int owned; /* an op's w or b (its backward writes the gradient) */
  size_t ndim, dims[4]; /* PyTorch's shape; conv weights (Cout, Cin, K, K), stored Cout,K,K,Cin */
} tensor;

struct kdp_model {
  char arch[KDP_STR_ARCH];
  kdp_input_shape in;
  size_t max_batch, B;
  op ops[MAX_OPS];
  int n_ops;
  act acts[MAX_ACTS];
  int n_acts;
  tensor tensors[MAX_TENSORS];
  size_t n_tensors, n_params, n_buffers;
  char buffer_names[MAX_TENSORS / 2][64];
  size_t buffer_offs[MAX_TENSORS / 2], n_buffer_tensors;
  float *params, *grads, *buffers;
  float *scratch;
  size_t scratch_floats;
  int feature_act, logits_act;
  int naive, last_train;
  int infer;                  /* built by kdp_model_create_infer: eval forward only */
  int frozen;                 /* kdp_model_freeze: the ops' packs are current */
  double flops;
  int build_failed;
  /* backward: after op i (a fused block: its first op), grads[grad_ready[i], n_params) are final
     for the pass; the hook hears of it (kdp_model_set_backward_hook) */
  size_t grad_ready[MAX_OPS];
  kdp_backward_hook hook;
  void *hook_ctx;
};

/* ---------------- building ---------------- */

/* build_failed values: a layer that does not fit its input or too many ops (1), sizes beyond
   2^44 values (2) */
#define BUILD_TOO_LARGE 2
#define MAX_VALUES ((size_t)1 << 44)

/* a * b for tensor sizes; marks the model too large instead of overflowing */
static size_t mul_size(kdp_model *m, size_t a, size_t b) {
  size_t r;
  if (__builtin_mul_overflow(a, b, &r) || r > MAX_VALUES) {
    m->build_failed = BUILD_TOO_LARGE;
    return 1;
  }
  return r;
}

static int new_act(kdp_model *m, size_t H, size_t W, size_t C) {
  if (m->n_acts >= MAX_ACTS) {
    m->build_failed = 1;
    return 0;
  }
  act *a = &m->acts[m->n_acts];
  memset(a, 0, sizeof *a);
  a->H = H;
  a->W = W;
  a->C = C;
  a->last_reader = -1;
  if (mul_size(m, mul_size(m, H, W), C) == 1 && m->build_failed == BUILD_TOO_LARGE) {
    a->H = a->W = a->C = 1; /* keeps later size arithmetic finite; the build fails anyway */
  }
  return m->n_acts++;
}

static op *new_op(kdp_model *m, kdp_op_kind kind, int in) {
  if (m->n_ops >= MAX_OPS) {
    m->build_failed = 1;
    return &m->ops[MAX_OPS - 1];
  }
  op *o = &m->ops[m->n_ops];
  memset(o, 0, sizeof *o);
  o->kind = kind;
  o->in = in;
  o->in2 = -1;
  o->w = o->b = o->rm = o->rv = NONE;
  m->acts[in].last_reader = m->n_ops;
  m->n_ops++;
  return o;
}

static size_t add_tensor(kdp_model *m, const char *prefix, const char *suffix, size_t size,
                         size_t fan_in, int kind) {
  if (m->n_tensors >= MAX_TENSORS) {
    m->build_failed = 1;
    return 0;
  }
  tensor *t = &m->tensors[m->n_tensors++];
  snprintf(t->name, sizeof t->name, "%s%s%s", prefix, *prefix ? "." : "", suffix);
  t->off = m->n_params;
  t->size = size;
  t->fan_in = fan_in;
  t->kind = kind;
  t->ndim = 1;
  t->dims[0] = size;
  if (__builtin_add_overflow(m->n_params, size, &m->n_params) || m->n_params > MAX_VALUES)
    m->build_failed = BUILD_TOO_LARGE;
  return t->off;
}

/* PyTorch's shape of the tensor added last (a 1-D tensor of its size unless set here) */
static void last_tensor_dims(kdp_model *m, size_t ndim, size_t d0, size_t d1, size_t d2,
                             size_t d3) {
  if (m->build_failed || m->n_tensors == 0) return;
  tensor *t = &m->tensors[m->n_tensors - 1];
  t->ndim = ndim;
  t->dims[0] = d0;
  t->dims[1] = d1;
  t->dims[2] = d2;
  t->dims[3] = d3;
}

static size_t add_buffer(kdp_model *m, const char *prefix, const char *suffix, size_t size) {
  size_t k = m->n_buffer_tensors;
  if (k >= MAX_TENSORS / 2) {
    m->build_failed = 1;
    return 0;
  }
  snprintf(m->buffer_names[k], sizeof m->buffer_names[k], "%s.%s", prefix, suffix);
  m->buffer_offs[k] = m->n_buffers;
  m->n_buffer_tensors++;
  m->n_buffers += size;
  return m->buffer_offs[k];
}

static int b_conv(kdp_model *m, int in, size_t cout, size_t k, size_t stride, size_t pad,
                  int bias, const char *name) {
  act *a = &m->acts[in];
  kdp_conv_shape cs = {.B = 1, .H = a->H, .W = a->W, .Cin = a->C, .Cout = cout, .K = k,
                       .stride = stride, .pad = pad};
  kdp_conv_shape_init(&cs);
  if (cs.OH == 0 || cs.OW == 0 || a->H + 2 * pad < k || a->W + 2 * pad < k) {
    m->build_failed = 1;
    return in;
  }
  int out = new_act(m, cs.OH, cs.OW, cout);
  op *o = new_op(m, KDP_OP_CONV, in);
  o->out = out;
  o->cs = cs;
  o->fan_in = a->C * k * k;
  o->w = add_tensor(m, name, "weight", mul_size(m, mul_size(m, cout, k * k), a->C), o->fan_in, 0);
  last_tensor_dims(m, 4, cout, a->C, k, k);
  if (bias) o->b = add_tensor(m, name, "bias", cout, o->fan_in, 0);
  m->flops += 2.0 * (double)(cs.OH * cs.OW * cout) * (double)o->fan_in;
  return out;
}

static int b_dense(kdp_model *m, int in, size_t outd, const char *name) {
  act *a = &m->acts[in];
  size_t ind = a->H * a->W * a->C;
  int out = new_act(m, 1, 1, outd);
  op *o = new_op(m, KDP_OP_DENSE, in);
  o->out = out;
  o->fan_in = ind;
  o->w = add_tensor(m, name, "weight", mul_size(m, outd, ind), ind, 0);
  last_tensor_dims(m, 2, outd, ind, 0, 0);
  o->b = add_tensor(m, name, "bias", outd, ind, 0);
  m->flops += 2.0 * (double)ind * (double)outd;
  return out;
}

static int b_bn(kdp_model *m, int in, const char *name) {
  act *a = &m->acts[in];
  int out = new_act(m, a->H, a->W, a->C);
  op *o = new_op(m, KDP_OP_BN, in);
  o->out = out;
  o->w = add_tensor(m, name, "weight", a->C, 0, 1);
  o->b = add_tensor(m, name, "bias", a->C, 0, 2);
  o->rm = add_buffer(m, name, "running_mean", a->C);
  o->rv = add_buffer(m, name, "running_var", a->C);
  return out;
}

static int b_simple(kdp_model *m, kdp_op_kind kind, int in) {
  act *a = &m->acts[in];
  int out;
  if (kind == KDP_OP_GAP || kind == KDP_OP_FLATTEN)
    out = new_act(m, 1, 1, kind == KDP_OP_GAP ? a->C : a->H * a->W * a->C);
  else
    out = new_act(m, a->H, a->W, a->C);
  op *o = new_op(m, kind, in);
  o->out = out;
  return out;
}

static int b_dropout(kdp_model *m, int in, float p) {
  int out = b_simple(m, KDP_OP_DROPOUT, in);
  m->ops[m->n_ops - 1].p = p;
  return out;
}

static int b_pool(kdp_model *m, kdp_op_kind kind, int in, size_t k, size_t stride, size_t pad) {
  act *a = &m->acts[in];
  if (a->H + 2 * pad < k || a->W + 2 * pad < k || stride == 0 || 2 * pad > k) {
    m->build_failed = 1;
    return in;
  }
  size_t OH = (a->H + 2 * pad - k) / stride + 1, OW = (a->W + 2 * pad - k) / stride + 1;
  int out = new_act(m, OH, OW, a->C);
  op *o = new_op(m, kind, in);
  o->out = out;
  o->K = k;
  o->stride = stride;
  o->pad = pad;
  return out;
}

static int b_add(kdp_model *m, int a, int b) {
  act *x = &m->acts[a];
  int out = new_act(m, x->H, x->W, x->C);
  op *o = new_op(m, KDP_OP_ADD, a);
  o->in2 = b;
  o->out = out;
  m->acts[b].last_reader = m->n_ops - 1;
  return out;
}

static int b_shortcut_a(kdp_model *m, int in, size_t cout, size_t stride) {
  act *a = &m->acts[in];
  size_t OH = (a->H + stride - 1) / stride, OW = (a->W + stride - 1) / stride;
  int out = new_act(m, OH, OW, cout);
  op *o = new_op(m, KDP_OP_SHORTCUT_A, in);
  o->out = out;
  o->stride = stride;
  return out;
}

/* "prefix.suffix" in buf (tensor names of blocks) */
static const char *sub(char *buf, size_t n, const char *prefix, const char *suffix) {
  snprintf(buf, n, "%s.%s", prefix, suffix);
  return buf;
}

/* CIFAR ResNet basic block (He et al. 2016, option A shortcuts). */
static int resnet_block(kdp_model *m, int x, size_t planes, size_t stride, const char *name) {
  char t[64];
  int h = b_conv(m, x, planes, 3, stride, 1, 0, sub(t, sizeof t, name, "conv1"));
  h = b_bn(m, h, sub(t, sizeof t, name, "bn1"));
  h = b_simple(m, KDP_OP_RELU, h);
  h = b_conv(m, h, planes, 3, 1, 1, 0, sub(t, sizeof t, name, "conv2"));
  h = b_bn(m, h, sub(t, sizeof t, name, "bn2"));
  int sc = x;
  if (stride != 1 || m->acts[x].C != planes) sc = b_shortcut_a(m, x, planes, stride);
  h = b_add(m, h, sc);
  return b_simple(m, KDP_OP_RELU, h);
}

static void build_resnet(kdp_model *m, int x, int depth) {
  int n = (depth - 2) / 6;
  int h = b_conv(m, x, 16, 3, 1, 1, 0, "conv1");
  h = b_bn(m, h, "bn1");
  h = b_simple(m, KDP_OP_RELU, h);
  size_t planes[3] = {16, 32, 64};
  for (int s = 0; s < 3; s++)
    for (int i = 0; i < n; i++) {
      char name[32];
      snprintf(name, sizeof name, "layer%d.%d", s + 1, i);
      h = resnet_block(m, h, planes[s], (s > 0 && i == 0) ? 2 : 1, name);
    }
  h = b_simple(m, KDP_OP_GAP, h);
  m->feature_act = h;
  m->logits_act = b_dense(m, h, m->in.n_classes, "fc");
}

/* Wide ResNet (Zagoruyko & Komodakis 2016): pre-activation blocks, 1x1 conv shortcut when the
   shape changes, applied to the block's bn-relu'd input as in the reference code. */
static void build_wrn(kdp_model *m, int x, int depth, int widen) {
  int n = (depth - 4) / 6;
  size_t widths[4] = {16, 16 * (size_t)widen, 32 * (size_t)widen, 64 * (size_t)widen};
  int h = b_conv(m, x, widths[0], 3, 1, 1, 0, "conv1");
  for (int s = 0; s < 3; s++)
    for (int i = 0; i < n; i++) {
      char name[32], t[64];
      snprintf(name, sizeof name, "block%d.layer.%d", s + 1, i);
      size_t stride = (s > 0 && i == 0) ? 2 : 1;
      size_t outc = widths[s + 1];
      int equal = m->acts[h].C == outc && stride == 1;
      int a = b_bn(m, h, sub(t, sizeof t, name, "bn1"));
      a = b_simple(m, KDP_OP_RELU, a);
      int c = b_conv(m, a, outc, 3, stride, 1, 0, sub(t, sizeof t, name, "conv1"));
      c = b_bn(m, c, sub(t, sizeof t, name, "bn2"));
      c = b_simple(m, KDP_OP_RELU, c);
      c = b_conv(m, c, outc, 3, 1, 1, 0, sub(t, sizeof t, name, "conv2"));
      int sc = h;
      if (!equal) sc = b_conv(m, a, outc, 1, stride, 0, 0, sub(t, sizeof t, name, "convShortcut"));
      h = b_add(m, c, sc);
    }
  h = b_bn(m, h, "bn1");
  h = b_simple(m, KDP_OP_RELU, h);
  h = b_simple(m, KDP_OP_GAP, h);
  m->feature_act = h;
  m->logits_act = b_dense(m, h, m->in.n_classes, "fc");
}

static void build_cnn(kdp_model *m, int x) {
  int h = b_conv(m, x, 32, 3, 1, 1, 1, "conv1");
  /* maxpool(relu(x)) = relu(maxpool(x)) exactly (relu is monotone; where relu zeroes the
     window's max no gradient flows either way), so the ReLU runs on the 4x smaller pooled map */
  h = b_bn(m, h, "bn1");
  h = b_pool(m, KDP_OP_MAXPOOL, h, 2, 2, 0);
  h = b_simple(m, KDP_OP_RELU, h);
  h = b_conv(m, h, 64, 3, 1, 1, 1, "conv2");
  h = b_bn(m, h, "bn2");
  h = b_pool(m, KDP_OP_MAXPOOL, h, 2, 2, 0);
  h = b_simple(m, KDP_OP_RELU, h);
  h = b_simple(m, KDP_OP_FLATTEN, h);
  h = b_dense(m, h, 128, "fc1");
  h = b_simple(m, KDP_OP_RELU, h);
  m->feature_act = h;
  m->logits_act = b_dense(m, h, m->in.n_classes, "fc2");
}

/* Parses a comma-separated list of integers inside "(...)"; every value must be positive except
   from index zero_from on, where 0 is allowed (conv padding). Returns count or -1. */
static int parse_int_list_z(const char *s, long *out, int max, int zero_from) {
  int n = 0;
  while (*s) {
    while (*s == ' ') s++;
    if (!isdigit((unsigned char)*s)) return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    /* sizes up to 2^40 parse; whether the model fits is the memory estimate's question */
    if (n >= max || errno == ERANGE || v < 0 || (v == 0 && n < zero_from) || v > (1L << 40))
      return -1;
    out[n++] = v;
    s = end;
    while (*s == ' ') s++;
    if (*s == ',') {
      s++;
      if (!*s) return -1;
    } else if (*s) {
      return -1;
    }
  }
  return n;
}

static int parse_int_list(const char *s, long *out, int max) {
  return parse_int_list_z(s, out, max, max);
}

static int build_mlp(kdp_model *m, int x, const char *args, kdp_error *err) {
  long h[32];
  int n = parse_int_list(args, h, 32);
  if (n < 0)
    return kdp_fail(err, KDP_EINVAL,
                    "model arch 'mlp(%s)': expected a list of positive hidden sizes, e.g. "
                    "mlp(512,256)",
                    args);
  /* one channel: NHWC already is PyTorch's flatten order, so the dense layer reads the input */
  int a = m->acts[x].C == 1 ? x : b_simple(m, KDP_OP_FLATTEN, x);
  for (int i = 0; i < n; i++) {
    char name[16];
    snprintf(name, sizeof name, "fc%d", i + 1);
    a = b_dense(m, a, (size_t)h[i], name);
    a = b_simple(m, KDP_OP_RELU, a);
  }
  char name[16];
  snprintf(name, sizeof name, "fc%d", n + 1);
  m->feature_act = a;
  m->logits_act = b_dense(m, a, m->in.n_classes, name);
  return 0;
}

/* seq:conv(c,k[,s[,p]]),bn,relu,maxpool(k[,s]),avgpool(k[,s[,p]]),gap,flatten,dropout(p),dense(o)
   A final dense(n_classes) is appended unless the spec ends with dense(n_classes). */
static int build_seq(kdp_model *m, int x, const char *spec, kdp_error *err) {
  int h = x, idx = 0;
  const char *s = spec;
  int last_dense_in = -1, last_is_dense = 0;
  while (*s) {
    char item[128];
    size_t len = 0;
    int depth = 0;
    while (s[len] && (depth > 0 || s[len] != ',')) {
      if (s[len] == '(') depth++;
      if (s[len] == ')') depth--;
      len++;
    }
    if (len == 0 || len >= sizeof item || depth != 0)
      return kdp_fail(err, KDP_EINVAL, "model arch 'seq:%s': malformed item near '%.20s'", spec,
                      s);
    memcpy(item, s, len);
    item[len] = 0;
    s += len;
    if (*s == ',') s++;
    char name[16];
    snprintf(name, sizeof name, "%d", idx++);
    char *paren = strchr(item, '(');
    long a[4] = {0, 0, 0, 0};
    int na = 0;
    double pd = 0;
    if (paren) {
      size_t alen = strlen(paren + 1);
      if (alen == 0 || paren[alen] != ')')
        return kdp_fail(err, KDP_EINVAL, "model arch 'seq:%s': item '%s' lacks ')'", spec, item);
      paren[alen] = 0;
      *paren = 0;
      if (strcmp(item, "dropout") == 0) {
        char *end;
        pd = strtod(paren + 1, &end);
        if (*end || pd < 0 || pd >= 1)
          return kdp_fail(err, KDP_EINVAL,
                          "model arch 'seq:%s': dropout(p) needs 0 <= p < 1, got '%s'", spec,
                          paren + 1);
      } else {
        na = parse_int_list_z(paren + 1, a, 4, strcmp(item, "conv") == 0 ? 3 : 4);
        if (na < 0)
          return kdp_fail(err, KDP_EINVAL,
                          "model arch 'seq:%s': '%s(%s)' needs positive integer arguments", spec,
                          item, paren + 1);
      }
    }
    size_t flat = m->acts[h].H * m->acts[h].W * m->acts[h].C;
    (void)flat;
    last_is_dense = 0;
    if (strcmp(item, "conv") == 0 && na >= 2) {
      /* conv(c, k[, stride[, pad]]); pad defaults to k/2 ("same" for odd k) */
      size_t st = na >= 3 ? (size_t)a[2] : 1, pad = na >= 4 ? (size_t)a[3] : (size_t)a[1] / 2;
      h = b_conv(m, h, (size_t)a[0], (size_t)a[1], st, pad, 1, name);
    } else if (strcmp(item, "bn") == 0 && !paren) {
      h = b_bn(m, h, name);
    } else if (strcmp(item, "relu") == 0 && !paren) {
      h = b_simple(m, KDP_OP_RELU, h);
    } else if (strcmp(item, "maxpool") == 0 && na >= 1) {
      h = b_pool(m, KDP_OP_MAXPOOL, h, (size_t)a[0], na >= 2 ? (size_t)a[1] : (size_t)a[0], 0);
    } else if (strcmp(item, "avgpool") == 0 && na >= 1) {
      h = b_pool(m, KDP_OP_AVGPOOL, h, (size_t)a[0], na >= 2 ? (size_t)a[1] : (size_t)a[0],
                 na >= 3 ? (size_t)a[2] : 0);
    } else if (strcmp(item, "gap") == 0 && !paren) {
      h = b_simple(m, KDP_OP_GAP, h);
    } else if (strcmp(item, "flatten") == 0 && !paren) {
      h = b_simple(m, KDP_OP_FLATTEN, h);
    } else if (strcmp(item, "dropout") == 0 && paren) {
      h = b_dropout(m, h, (float)pd);
    } else if (strcmp(item, "dense") == 0 && na == 1) {
      if (m->acts[h].H * m->acts[h].W > 1 && m->acts[h].C > 1) h = b_simple(m, KDP_OP_FLATTEN, h);
      last_dense_in = h;
      h = b_dense(m, h, (size_t)a[0], name);
      last_is_dense = 1;
    } else {
      return kdp_fail(err, KDP_EINVAL,
                      "model arch 'seq:%s': unknown or malformed item '%s' (known: conv(c,k[,s[,p]]), "
                      "bn, relu, maxpool(k[,s]), avgpool(k[,s[,p]]), gap, flatten, dropout(p), "
                      "dense(n))",
                      spec, item);
    }
    if (m->build_failed)
      return kdp_fail(err, KDP_EINVAL,
                      "model arch 'seq:%s': item %d does not fit the %zux%zux%zu tensor it gets",
                      spec, idx - 1, m->acts[h].H, m->acts[h].W, m->acts[h].C);
  }
  if (!last_is_dense || m->acts[h].C != m->in.n_classes) {
    if (m->acts[h].H * m->acts[h].W > 1) h = b_simple(m, KDP_OP_FLATTEN, h);
    last_dense_in = h;
    char name[16];
    snprintf(name, sizeof name, "%d", idx);
    h = b_dense(m, h, m->in.n_classes, name);
  }
  m->feature_act = last_dense_in;
  m->logits_act = h;
  return 0;
}

/* conv -> bn -> maxpool(2, stride 2, pad 0) -> relu whose intermediate tensors nothing else
   reads: one kdp_conv_bn_pool_relu_* call (the cnn's blocks) */
static int fusable_block(const kdp_model *m, int i) {
  if (i + 3 >= m->n_ops) return 0;
  const op *c = &m->ops[i], *n = &m->ops[i + 1], *p = &m->ops[i + 2], *r = &m->ops[i + 3];
  if (c->kind != KDP_OP_CONV || n->kind != KDP_OP_BN || p->kind != KDP_OP_MAXPOOL ||
      r->kind != KDP_OP_RELU)
    return 0;
  if (n->in != c->out || p->in != n->out || r->in != p->out) return 0;
  if (p->K != 2 || p->stride != 2 || p->pad != 0) return 0;
  for (int k = 0; k < 3; k++) {
    int a = m->ops[i + k].out;
    if (m->acts[a].last_reader != i + k + 1 || a == m->feature_act || a == m->logits_act) return 0;
  }
  return 1;
}

/* model_alloc's allocations: counted into *bytes, and made unless dry (then NULL) */
static float *plan_floats(size_t n, int dry, double *bytes) {
  *bytes += (double)n * sizeof(float);
  return dry ? NULL : kdp_falloc(n);
}
static void *plan_bytes(size_t n, size_t sz, int dry, double *bytes) {
  *bytes += (double)n * (double)sz;
  return dry ? NULL : kdp_xcalloc(n, sz);
}

/* Eval-only models keep no gradients, and an activation's memory is handed on once its last
   reader has run (the features and logits are kept): a few buffers serve the whole net. */
typedef struct slot {
  float *p;
  size_t n;
  int busy;
} slot;

static void infer_take(kdp_model *m, int a, slot *slots, size_t *n_slots, int *owner, int dry,
                       double *bytes) {
  if (a <= 0 || owner[a]) return;
  size_t need = m->max_batch * m->acts[a].H * m->acts[a].W * m->acts[a].C, best = *n_slots;
  for (size_t k = 0; k < *n_slots; k++)
    if (!slots[k].busy && slots[k].n >= need && (best == *n_slots || slots[k].n < slots[best].n))
      best = k;
  if (best == *n_slots) {
    slots[best] = (slot){plan_floats(need, dry, bytes), need, 0};
    (*n_slots)++;
  } else {
    m->acts[a].borrowed = 1; /* another activation frees it */
  }
  slots[best].busy = 1;
  owner[a] = (int)best + 1;
  m->acts[a].val = slots[best].p;
}

static void infer_alloc_acts(kdp_model *m, int dry, double *bytes) {
  slot *slots = kdp_xcalloc((size_t)m->n_acts, sizeof *slots);
  int *owner = kdp_xcalloc((size_t)m->n_acts, sizeof *owner); /* act -> slot + 1 */
  size_t n_slots = 0;
  for (int i = 0; i < m->n_ops; i++) {
    const op *o = &m->ops[i];
    int last = i, reads[3] = {o->in, o->in2, -1};
    if (o->fused != 2) infer_take(m, o->out, slots, &n_slots, owner, dry, bytes);
    if (o->fused == 2) {
      /* dense -> relu: the pre-activation is never stored */
      last = i + 1;
      infer_take(m, m->ops[last].out, slots, &n_slots, owner, dry, bytes);
    } else if (o->fused > 0) {
      /* the block writes its conv output (scratch, free afterwards) and its relu output */
      last = i + o->fused - 1;
      infer_take(m, m->ops[last].out, slots, &n_slots, owner, dry, bytes);
      reads[2] = o->out;
    }
    for (int k = 0; k < 3; k++) {
      int r = reads[k];
      if (r <= 0 || !owner[r] || r == m->feature_act || r == m->logits_act) continue;
      if (k < 2 && m->acts[r].last_reader > last) continue;
      slots[owner[r] - 1].busy = 0;
    }
    i = last;
  }
  free(owner);
  free(slots);
}

/* dense -> relu whose pre-activation nothing else reads: one kdp_dense_relu_* call (the relu
   runs on the GEMM tiles in cache, the pre-activation is never stored) */
static int fusable_dense_relu(const kdp_model *m, int i) {
  if (i + 1 >= m->n_ops) return 0;
  const op *d = &m->ops[i], *r = &m->ops[i + 1];
  if (d->kind != KDP_OP_DENSE || r->kind != KDP_OP_RELU || r->in != d->out) return 0;
  int a = d->out;
  return m->acts[a].last_reader == i + 1 && a != m->feature_act && a != m->logits_act;
}

/* Sizes the conv scratch for max_batch and the current thread count (it holds one slice per
   thread), growing it when the thread count went up since the last call. */
static size_t scratch_need(const kdp_model *m) {
  size_t need = 0;
  for (int i = 0; i < m->n_ops; i++) {
    const op *o = &m->ops[i];
    if (o->fused < 0 || o->kind != KDP_OP_CONV) continue;
    kdp_conv_shape cs = o->cs;
    cs.B = m->max_batch;
    size_t s = o->fused > 0 ? kdp_conv_bn_pool_relu_scratch_floats(&cs)
                            : kdp_conv_scratch_floats(&cs);
    if (s > need) need = s;
  }
  return need;
}

static void model_scratch(kdp_model *m) {
  size_t need = scratch_need(m);
  if (m->scratch && need <= m->scratch_floats) return;
  free(m->scratch);
  m->scratch_floats = need;
  m->scratch = kdp_falloc(need ? need : 1);
}

/* Allocates every buffer of a built model, or only counts their bytes (dry): parameters and
   gradients in mem->params, buffers, and the activations, caches and scratch of a max_batch
   batch in mem->activations. One code path, so the estimate is what creating the model takes
   (eval-only models: no gradients or caches, activations sharing memory). */
static void model_alloc(kdp_model *m, int dry, kdp_model_memory *mem) {
  size_t Bm = m->max_batch;
  double pb = 0, ab = 0;
  m->params = plan_floats(m->n_params, dry, &pb);
  m->grads = m->infer ? NULL : plan_floats(m->n_params, dry, &pb);
  m->buffers = plan_floats(m->n_buffers ? m->n_buffers : 1, dry, &pb);
  /* 1: no gradient buffer, 2: no buffers at all (tensors inside fused blocks) */
  unsigned char *skip = kdp_xcalloc((size_t)m->n_acts, 1);
  for (int i = 0; i < m->n_ops; i++)
    if (fusable_block(m, i)) {
      m->ops[i].fused = 4;
      for (int k = 1; k < 4; k++) m->ops[i + k].fused = -1;
      /* the block keeps the conv output (its val) and the relu's; nothing in between */
      skip[m->ops[i].out] = 1;
      skip[m->ops[i + 1].out] = skip[m->ops[i + 2].out] = 2;
      i += 3;
    } else if (fusable_dense_relu(m, i)) {
      m->ops[i].fused = 2;
      m->ops[i + 1].fused = -1;
      skip[m->ops[i].out] = 2; /* the pre-activation */
      i += 1;
    }
  if (m->infer)
    infer_alloc_acts(m, dry, &ab);
  else
    for (int i = 1; i < m->n_acts; i++) {
      act *a = &m->acts[i];
      size_t n = Bm * a->H * a->W * a->C;
      a->val = skip[i] < 2 ? plan_floats(n, dry, &ab) : NULL;
      a->grad = skip[i] < 1 ? plan_floats(n, dry, &ab) : NULL;
    }
  free(skip);
  for (int i = 0; i < m->n_ops; i++) {
    op *o = &m->ops[i];
    act *in = &m->acts[o->in];
    size_t n_in = Bm * in->H * in->W * in->C;
    size_t n_out = Bm * m->acts[o->out].H * m->acts[o->out].W * m->acts[o->out].C;
    if (o->fused > 0 && o->kind == KDP_OP_CONV) {
      const act *y = &m->acts[o->out], *po = &m->acts[m->ops[i + 2].out];
      size_t n_pool = Bm * po->H * po->W * po->C;
      o->win = plan_bytes(n_pool ? n_pool : 1, 1, dry, &ab);
      o->xwin = plan_floats(n_pool, dry, &ab);
      o->mean = plan_floats(y->C, dry, &ab);
      o->invstd = plan_floats(y->C, dry, &ab);
      continue;
    }
    if (o->fused != 0) continue;
    switch (o->kind) {
      case KDP_OP_BN:
        if (m->infer) break;
        o->xhat = plan_floats(n_in, dry, &ab);
        o->invstd = plan_floats(in->C, dry, &ab);
        break;
      case KDP_OP_DROPOUT:
        if (!m->infer) o->mask = plan_floats(n_in, dry, &ab);
        break;
      case KDP_OP_MAXPOOL:
        o->argmax = plan_bytes(n_out, sizeof(int32_t), dry, &ab);
        break;
      default:
        break;
    }
  }
  /* the conv scratch holds one slice per thread: sized for the current thread count */
  if (dry)
    ab += (double)(scratch_need(m) ? scratch_need(m) : 1) * sizeof(float);
  else
    model_scratch(m);
  if (mem) {
    mem->n_params = m->n_params;
    mem->params_bytes = pb;
    mem->activation_bytes = ab;
  }
}

/* grad_ready[i]: the lowest offset from which every parameter tensor belongs to an op >= i
   (written by the backward pass before it leaves op i) or to no op (its gradient stays as
   kdp_model_zero_grad left it). Tensors are laid out in build order, so this is usually op i's
   first tensor; the suffix walk also holds for a layout that is not monotonic. */
static void grad_ready_plan(kdp_model *m) {
  size_t nt = m->n_tensors;
  int *owner = kdp_xmalloc((nt ? nt : 1) * sizeof *owner);
  for (size_t t = 0; t < nt; t++) owner[t] = MAX_OPS; /* no op writes it */
  for (int i = 0; i < m->n_ops; i++) {
    op *o = &m->ops[i];
    size_t offs[2] = {o->w, o->b}, *sizes[2] = {&o->wn, &o->bn};
    for (int k = 0; k < 2; k++) {
      *sizes[k] = 0;
      for (size_t t = 0; offs[k] != NONE && t < nt; t++)
        if (m->tensors[t].off == offs[k]) owner[t] = i, *sizes[k] = m->tensors[t].size;
    }
  }
  for (size_t t = 0; t < nt; t++) m->tensors[t].owned = owner[t] < MAX_OPS;
  for (int i = 0; i < m->n_ops; i++) {
    size_t t = nt;
    while (t > 0 && owner[t - 1] >= i) t--;
    m->grad_ready[i] = t < nt ? m->tensors[t].off : m->n_params;
  }
  free(owner);
}

void kdp_model_set_backward_hook(kdp_model *m, kdp_backward_hook fn, void *ctx) {
  m->hook = fn;
  m->hook_ctx = ctx;
}

size_t kdp_model_grad_marks(const kdp_model *m, size_t *marks, size_t max) {
  size_t n = 0, last = m->n_params;
  for (int i = m->n_ops - 1; i >= 0; i--) {
    if (m->ops[i].fused < 0 || m->grad_ready[i] >= last) continue;
    last = m->grad_ready[i];
    if (n < max) marks[n] = last;
    n++;
  }
  return n;
}

/* Builds the graph of arch (no buffers yet); infer: an eval-only model. */
static int model_build(kdp_model **out, const char *arch, kdp_input_shape in, size_t max_batch,
                       int infer, kdp_error *err) {
  *out = NULL;
  if (!arch || strlen(arch) >= KDP_STR_ARCH)
    return kdp_fail(err, KDP_EINVAL, "model arch is empty or longer than %d characters",
                    KDP_STR_ARCH - 1);
  if (in.H == 0 || in.W == 0 || in.C == 0 || in.n_classes < 2 || max_batch == 0)
    return kdp_fail(err, KDP_EINVAL,
                    "model '%s': bad input shape %zux%zux%zu, %zu classes, batch %zu", arch, in.H,
                    in.W, in.C, in.n_classes, max_batch);
  kdp_model *m = kdp_xcalloc(1, sizeof *m);
  snprintf(m->arch, sizeof m->arch, "%s", arch);
  m->in = in;
  m->max_batch = max_batch;
  m->infer = infer;
  m->feature_act = m->logits_act = -1;
  int x = new_act(m, in.H, in.W, in.C);
  int rc = 0;
  size_t alen = strlen(arch);
  int depth = 0, widen = 0;
  char tail;
  if (strncmp(arch, "mlp(", 4) == 0 && arch[alen - 1] == ')') {
    char args[KDP_STR_ARCH];
    snprintf(args, sizeof args, "%.*s", (int)(alen - 5), arch + 4);
    rc = build_mlp(m, x, args, err);
  } else if (strcmp(arch, "cnn") == 0) {
    build_cnn(m, x);
  } else if (sscanf(arch, "resnet%d%c", &depth, &tail) == 1) {
    if (depth < 8 || (depth - 2) % 6 != 0)
      rc = kdp_fail(err, KDP_EINVAL,
                    "model arch '%s': CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110)", arch);
    else
      build_resnet(m, x, depth);
  } else if (sscanf(arch, "wrn%d_%d%c", &depth, &widen, &tail) == 2) {
    if (depth < 10 || (depth - 4) % 6 != 0 || widen < 1 || widen > 16)
      rc = kdp_fail(err, KDP_EINVAL,
                    "model arch '%s': wide ResNet needs depth 6n+4 (10, 16, 22, 28, 40) and "
                    "width 1..16, e.g. wrn16_2",
                    arch);
    else
      build_wrn(m, x, depth, widen);
  } else if (strncmp(arch, "seq:", 4) == 0 && arch[4]) {
    rc = build_seq(m, x, arch + 4, err);
  } else {
    rc = kdp_fail(err, KDP_EINVAL,
                  "unknown model arch '%s': expected mlp(h1,h2,...), cnn, resnet20|32|56|110, "
                  "wrnD_K (e.g. wrn16_2) or seq:SPEC",
                  arch);
  }
  if (rc == 0 && m->build_failed == BUILD_TOO_LARGE)
    rc = kdp_fail(err, KDP_EINVAL,
                  "model arch '%s' on %zux%zux%zu inputs is too large: a layer would hold more "
                  "than 2^44 values",
                  arch, in.H, in.W, in.C);
  else if (rc == 0 && m->build_failed)
    rc = kdp_fail(err, KDP_EINVAL,
                  "model arch '%s' does not fit %zux%zux%zu inputs (a layer's output would be "
                  "empty) or has too many layers",
                  arch, in.H, in.W, in.C);
  if (rc != 0) {
    free(m);
    return rc;
  }
  grad_ready_plan(m);
  *out = m;
  return 0;
}

int kdp_model_create(kdp_model **out, const char *arch, kdp_input_shape in, size_t max_batch,
                     kdp_error *err) {
  int rc = model_build(out, arch, in, max_batch, 0, err);
  if (rc == 0) model_alloc(*out, 0, NULL);
  return rc;
}

int kdp_model_create_infer(kdp_model **out, const char *arch, kdp_input_shape in,
                           size_t max_batch, kdp_error *err) {
  int rc = model_build(out, arch, in, max_batch, 1, err);
  if (rc == 0) model_alloc(*out, 0, NULL);
  return rc;
}

static int model_plan(const char *arch, kdp_input_shape in, size_t max_batch, int infer,
                      kdp_model_memory *mem, kdp_error *err) {
  kdp_model *m = NULL;
  memset(mem, 0, sizeof *mem);
  int rc = model_build(&m, arch, in, max_batch, infer, err);
  if (rc != 0) return rc;
  model_alloc(m, 1, mem);
  mem->n_buffers = m->n_buffers;
  mem->feature_dim = kdp_model_feature_dim(m);
  free(m);
  return 0;
}

int kdp_model_plan(const char *arch, kdp_input_shape in, size_t max_batch, kdp_model_memory *mem,
                   kdp_error *err) {
  return model_plan(arch, in, max_batch, 0, mem, err);
}

int kdp_model_plan_infer(const char *arch, kdp_input_shape in, size_t max_batch,
                         kdp_model_memory *mem, kdp_error *err) {
  return model_plan(arch, in, max_batch, 1, mem, err);
}

void kdp_model_free(kdp_model *m) {
  if (!m) return;
  for (int i = 1; i < m->n_acts; i++) {
    if (!m->acts[i].borrowed) free(m->acts[i].val);
    free(m->acts[i].grad);
  }
  for (int i = 0; i < m->n_ops; i++) {
    free(m->ops[i].xhat);
    free(m->ops[i].invstd);
    free(m->ops[i].mask);
    free(m->ops[i].argmax);
    free(m->ops[i].win);
    free(m->ops[i].xwin);
    free(m->ops[i].mean);
    free(m->ops[i].pack);
    free(m->ops[i].pbias);
  }
  free(m->params);
  free(m->grads);
  free(m->buffers);
  free(m->scratch);
  free(m);
}

void kdp_model_init(kdp_model *m, kdp_rng *rng) {
  for (size_t t = 0; t < m->n_tensors; t++) {
    tensor *ts = &m->tensors[t];
    float *p = m->params + ts->off;
    if (ts->kind == 1) {
      for (size_t i = 0; i < ts->size; i++) p[i] = 1.0f;
    } else if (ts->kind == 2) {
      memset(p, 0, ts->size * sizeof(float));
    } else {
      float bound = 1.0f / sqrtf((float)ts->fan_in);
      for (size_t i = 0; i < ts->size; i++) p[i] = (2.0f * kdp_rng_uniform(rng) - 1.0f) * bound;
    }
  }
  for (int i = 0; i < m->n_ops; i++) {
    op *o = &m->ops[i];
    if (o->kind != KDP_OP_BN) continue;
    size_t C = m->acts[o->in].C;
    for (size_t c = 0; c < C; c++) {
      m->buffers[o->rm + c] = 0.0f;
      m->buffers[o->rv + c] = 1.0f;
    }
  }
  if (m->grads) memset(m->grads, 0, m->n_params * sizeof(float));
}

size_t kdp_model_n_params(const kdp_model *m) { return m->n_params; }
float *kdp_model_params(kdp_model *m) {
  m->frozen = 0; /* the caller may change the weights */
  return m->params;
}
float *kdp_model_grads(kdp_model *m) { return m->grads; }
float *kdp_model_swap_grads(kdp_model *m, float *g) {
  float *old = m->grads;
  if (old && g) memcpy(g, old, m->n_params * sizeof(float));
  m->grads = g;
  return old;
}
float *kdp_model_swap_params(kdp_model *m, float *p) {
  float *old = m->params;
  if (old && p) memcpy(p, old, m->n_params * sizeof(float));
  m->params = p;
  m->frozen = 0; /* (packed weights, if any, are repacked from the arena) */
  return old;
}
size_t kdp_model_n_buffers(const kdp_model *m) { return m->n_buffers; }
float *kdp_model_buffers(kdp_model *m) {
  m->frozen = 0;
  return m->buffers;
}
size_t kdp_model_n_tensors(const kdp_model *m) { return m->n_tensors; }
const char *kdp_model_tensor_name(const kdp_model *m, size_t i) { return m->tensors[i].name; }
size_t kdp_model_tensor_offset(const kdp_model *m, size_t i) { return m->tensors[i].off; }
size_t kdp_model_tensor_size(const kdp_model *m, size_t i) { return m->tensors[i].size; }
size_t kdp_model_n_buffer_tensors(const kdp_model *m) { return m->n_buffer_tensors; }
const char *kdp_model_buffer_name(const kdp_model *m, size_t i) { return m->buffer_names[i]; }
size_t kdp_model_buffer_offset(const kdp_model *m, size_t i) { return m->buffer_offs[i]; }
size_t kdp_model_feature_dim(const kdp_model *m) {
  const act *a = &m->acts[m->feature_act];
  return a->H * a->W * a->C;
}
size_t kdp_model_n_classes(const kdp_model *m) { return m->in.n_classes; }
double kdp_model_flops_per_sample(const kdp_model *m) { return m->flops; }
const char *kdp_model_arch(const kdp_model *m) { return m->arch; }
void kdp_model_set_naive(kdp_model *m, int naive) {
  m->naive = naive;
  if (naive) m->frozen = 0; /* the naive kernels are the reference: no packs */
}

size_t kdp_model_tensor_shape(const kdp_model *m, size_t i, size_t dims[4]) {
  const tensor *t = &m->tensors[i];
  for (size_t k = 0; k < 4; k++) dims[k] = k < t->ndim ? t->dims[k] : 1;
  return t->ndim;
}

size_t kdp_model_buffer_size(const kdp_model *m, size_t i) {
  size_t end = i + 1 < m->n_buffer_tensors ? m->buffer_offs[i + 1] : m->n_buffers;
  return end - m->buffer_offs[i];
}

/* conv weights: kdpeers (Cout, K, K, Cin) <-> PyTorch (Cout, Cin, K, K); everything else is
   already in PyTorch's layout */
static void tensor_permute(const tensor *t, float *dst, const float *src, int to_torch) {
  if (t->ndim != 4) {
    memcpy(dst, src, t->size * sizeof(float));
    return;
  }
  size_t O = t->dims[0], Ci = t->dims[1], KK = t->dims[2] * t->dims[3];
  for (size_t o = 0; o < O; o++)
    for (size_t c = 0; c < Ci; c++)
      for (size_t k = 0; k < KK; k++) {
        size_t ours = (o * KK + k) * Ci + c, theirs = (o * Ci + c) * KK + k;
        if (to_torch)
          dst[theirs] = src[ours];
        else
          dst[ours] = src[theirs];
      }
}

void kdp_model_tensor_to_torch(const kdp_model *m, size_t i, float *dst) {
  const tensor *t = &m->tensors[i];
  tensor_permute(t, dst, m->params + t->off, 1);
}

void kdp_model_tensor_from_torch(kdp_model *m, size_t i, const float *src) {
  const tensor *t = &m->tensors[i];
  m->frozen = 0;
  tensor_permute(t, m->params + t->off, src, 0);
}

static size_t tensor_at(const kdp_model *m, size_t off) {
  if (off == NONE) return KDP_NO_TENSOR;
  for (size_t t = 0; t < m->n_tensors; t++)
    if (m->tensors[t].off == off) return t;
  return KDP_NO_TENSOR;
}

static size_t buffer_at(const kdp_model *m, size_t off) {
  if (off == NONE) return KDP_NO_TENSOR;
  for (size_t t = 0; t < m->n_buffer_tensors; t++)
    if (m->buffer_offs[t] == off) return t;
  return KDP_NO_TENSOR;
}

size_t kdp_model_n_ops(const kdp_model *m) { return (size_t)m->n_ops; }

void kdp_model_op(const kdp_model *m, size_t i, kdp_op_info *info) {
  const op *o = &m->ops[i];
  memset(info, 0, sizeof *info);
  info->kind = o->kind;
  info->in = o->in;
  info->in2 = o->in2;
  info->out = o->out;
  info->weight = tensor_at(m, o->w);
  info->bias = tensor_at(m, o->b);
  info->running_mean = buffer_at(m, o->rm);
  info->running_var = buffer_at(m, o->rv);
  if (o->kind == KDP_OP_CONV) {
    info->K = o->cs.K;
    info->stride = o->cs.stride;
    info->pad = o->cs.pad;
  } else {
    info->K = o->K;
    info->stride = o->stride;
    info->pad = o->pad;
  }
  info->p = o->p;
}

void kdp_model_act_shape(const kdp_model *m, int id, size_t *H, size_t *W, size_t *C) {
  const act *a = &m->acts[id];
  *H = a->H;
  *W = a->W;
  *C = a->C;
}

int kdp_model_logits_act(const kdp_model *m) { return m->logits_act; }

static const char *op_name(kdp_op_kind k) {
  static const char *names[] = {"dense", "conv", "bn", "relu", "maxpool", "avgpool",
                                "gap", "dropout", "flatten", "add", "shortcut_a"};
  return names[k];
}

void kdp_model_describe(const kdp_model *m, FILE *f) {
  fprintf(f, "model %s: %zu params, %zu buffers, %.1f MFLOP/sample forward, features %zu\n",
          m->arch, m->n_params, m->n_buffers, m->flops * 1e-6, kdp_model_feature_dim(m));
  for (int i = 0; i < m->n_ops; i++) {
    const op *o = &m->ops[i];
    const act *a = &m->acts[o->in], *b = &m->acts[o->out];
    fprintf(f, "  %3d %-10s %zux%zux%zu -> %zux%zux%zu", i, op_name(o->kind), a->H, a->W, a->C,
            b->H, b->W, b->C);
    if (o->kind == KDP_OP_CONV)
      fprintf(f, "  k%zu s%zu p%zu", o->cs.K, o->cs.stride, o->cs.pad);
    if (o->kind == KDP_OP_MAXPOOL || o->kind == KDP_OP_AVGPOOL)
      fprintf(f, "  k%zu s%zu p%zu", o->K, o->stride, o->pad);
    if (o->kind == KDP_OP_DROPOUT) fprintf(f, "  p=%g", (double)o->p);
    if (o->fused > 0) fprintf(f, "  (fused with the next %d ops)", o->fused - 1);
    fputc('\n', f);
  }
}

/* ---------------- forward / backward ---------------- */

static size_t act_n(const kdp_model *m, int id, size_t B) {
  const act *a = &m->acts[id];
  return B * a->H * a->W * a->C;
}

/* the fused conv -> bn -> maxpool -> relu block starting at op i */
static void block_forward(kdp_model *m, int i, size_t B, int train, float mom, float eps) {
  op *c = &m->ops[i];
  const op *n = &m->ops[i + 1];
  float *out = m->acts[m->ops[i + 3].out].val, *y = m->acts[c->out].val;
  const float *in = m->acts[c->in].val, *w = m->params + c->w;
  const float *bias = c->b != NONE ? m->params + c->b : NULL;
  const float *gamma = m->params + n->w, *beta = m->params + n->b;
  float *rm = m->buffers + n->rm, *rv = m->buffers + n->rv;
  c->cs.B = B;
  if (m->frozen && !train && c->pack)
    kdp_conv_pool_relu_forward_packed(out, in, c->pack, c->pbias, m->scratch, &c->cs);
  else if (m->naive)
    kdp_conv_bn_pool_relu_forward_naive(out, c->win, c->xwin, y, c->mean, c->invstd, rm, rv, in,
                                        w, bias, gamma, beta, &c->cs, train, mom, eps);
  else
    kdp_conv_bn_pool_relu_forward(out, c->win, c->xwin, y, c->mean, c->invstd, rm, rv, in, w,
                                  bias, gamma, beta, m->scratch, &c->cs, train, mom, eps);
}

static void block_backward(kdp_model *m, int i, float *din, int set) {
  op *c = &m->ops[i];
  const op *n = &m->ops[i + 1];
  const act *r = &m->acts[m->ops[i + 3].out];
  const float *y = m->acts[c->out].val, *in = m->acts[c->in].val, *w = m->params + c->w;
  float *db = c->b != NONE ? m->grads + c->b : NULL;
  float *dgamma = m->grads + n->w, *dbeta = m->grads + n->b;
  const float *gamma = m->params + n->w;
  if (m->naive)
    kdp_conv_bn_pool_relu_backward_naive(din, set, m->grads + c->w, db, dgamma, dbeta, r->grad,
                                         r->val, c->win, c->xwin, y, c->mean, c->invstd, in, w,
                                         gamma, &c->cs);
  else
    kdp_conv_bn_pool_relu_backward(din, set, m->grads + c->w, db, dgamma, dbeta, r->grad, r->val,
                                   c->win, c->xwin, y, c->mean, c->invstd, in, w, gamma,
                                   m->scratch, &c->cs);
}

int kdp_model_freeze(kdp_model *m, int on) {
  m->frozen = 0;
  if (!on || !m->infer || m->naive || !kdp_packed_available()) return 0;
  const float bn_eps = 1e-5f; /* kdp_model_forward's */
  for (int i = 0; i < m->n_ops; i++) {
    op *o = &m->ops[i];
    if (o->fused < 0) continue;
    if (o->kind == KDP_OP_DENSE) {
      const act *a = &m->acts[o->in];
      const size_t nI = a->H * a->W * a->C, nO = m->acts[o->out].C;
      if (!o->pack) o->pack = kdp_falloc(kdp_pack_floats(nO, nI));
      kdp_pack_weights(o->pack, m->params + o->w, NULL, nO, nI);
    } else if (o->kind == KDP_OP_CONV && o->fused > 0 && kdp_conv_packed_fits(&o->cs)) {
      const op *n = &m->ops[i + 1];
      const size_t C = o->cs.Cout, kkc = o->cs.K * o->cs.K * o->cs.Cin;
      if (!o->pack) o->pack = kdp_falloc(kdp_pack_floats(C, kkc));
      if (!o->pbias) o->pbias = kdp_falloc(C);
      kdp_bn_fold_pack(o->pack, o->pbias, m->params + o->w,
                       o->b != NONE ? m->params + o->b : NULL, m->params + n->w,
                       m->params + n->b, m->buffers + n->rm, m->buffers + n->rv, C, kkc, bn_eps);
    }
  }
  m->frozen = 1;
  return 1;
}

/* the fused dense -> relu starting at op i */
static void dense_relu_forward(kdp_model *m, int i, size_t B) {
  const op *d = &m->ops[i];
  const act *a = &m->acts[d->in];
  float *out = m->acts[m->ops[i + 1].out].val;
  const size_t nI = a->H * a->W * a->C, nO = m->acts[d->out].C;
  if (m->frozen)
    kdp_dense_forward_packed(out, a->val, d->pack, m->params + d->b, B, nI, nO, 1);
  else
    (m->naive ? kdp_dense_relu_forward_naive : kdp_dense_relu_forward)(
        out, a->val, m->params + d->w, m->params + d->b, B, nI, nO);
}

/* set: KDP_SET_* (the fast kernel only; the naive one adds, onto gradients zeroed before) */
static void dense_relu_backward(kdp_model *m, int i, float *din, size_t B, unsigned set) {
  const op *d = &m->ops[i];
  const act *a = &m->acts[d->in], *r = &m->acts[m->ops[i + 1].out];
  const size_t nI = a->H * a->W * a->C, nO = m->acts[d->out].C;
  if (m->naive)
    kdp_dense_relu_backward_naive(din, m->grads + d->w, m->grads + d->b, r->grad, r->val, a->val,
                                  m->params + d->w, B, nI, nO);
  else
    kdp_dense_relu_backward_set(din, m->grads + d->w, m->grads + d->b, r->grad, r->val, a->val,
                                m->params + d->w, B, nI, nO, set);
}

const float *kdp_model_forward(kdp_model *m, const float *x, size_t B, int train, kdp_rng *rng) {
  if (B > m->max_batch) {
    kdp_die("internal error: a forward pass of %zu rows, but model %s takes at most %zu", B,
            m->arch, m->max_batch);
  }
  if (train && m->infer) {
    kdp_die("internal error: train-mode forward pass on the eval-only model %s", m->arch);
  }
  m->B = B;
  m->last_train = train;
  model_scratch(m);
  m->acts[0].val = (float *)x;
  const float bn_eps = 1e-5f, bn_mom = 0.1f;
  for (int i = 0; i < m->n_ops; i++) {
    op *o = &m->ops[i];
    if (o->fused < 0) continue;
    if (o->fused > 0) {
      if (o->kind == KDP_OP_DENSE)
        dense_relu_forward(m, i, B);
      else
        block_forward(m, i, B, train, bn_mom, bn_eps);
      continue;
    }
    act *a = &m->acts[o->in];
    float *out = m->acts[o->out].val;
    const float *in = a->val;
    size_t n_in = act_n(m, o->in, B);
    switch (o->kind) {
      case KDP_OP_DENSE: {
        size_t nI = a->H * a->W * a->C, nO = m->acts[o->out].C;
        if (m->frozen)
          kdp_dense_forward_packed(out, in, o->pack, m->params + o->b, B, nI, nO, 0);
        else if (m->naive)
          kdp_dense_forward_naive(out, in, m->params + o->w, m->params + o->b, B, nI, nO);
        else
          kdp_dense_forward(out, in, m->params + o->w, m->params + o->b, B, nI, nO);
        break;
      }
      case KDP_OP_CONV: {
        o->cs.B = B;
        const float *bias = o->b != NONE ? m->params + o->b : NULL;
        if (m->naive)
          kdp_conv2d_forward_naive(out, in, m->params + o->w, bias, &o->cs);
        else
          kdp_conv2d_forward(out, in, m->params + o->w, bias, m->scratch, &o->cs);
        break;
      }
      case KDP_OP_BN:
        if (train)
          kdp_bn_forward_train(out, o->xhat, o->invstd, m->buffers + o->rm, m->buffers + o->rv,
                               in, m->params + o->w, m->params + o->b, B * a->H * a->W, a->C,
                               bn_mom, bn_eps);
        else
          kdp_bn_forward_eval(out, in, m->params + o->w, m->params + o->b, m->buffers + o->rm,
                              m->buffers + o->rv, B * a->H * a->W, a->C, bn_eps);
        break;
      case KDP_OP_RELU:
        kdp_relu_forward(out, in, n_in);
        break;
      case KDP_OP_MAXPOOL:
        kdp_maxpool_forward(out, o->argmax, in, B, a->H, a->W, a->C, o->K, o->stride, o->pad);
        break;
      case KDP_OP_AVGPOOL:
        kdp_avgpool_forward(out, in, B, a->H, a->W, a->C, o->K, o->stride, o->pad);
        break;
      case KDP_OP_GAP:
        kdp_gap_forward(out, in, B, a->H * a->W, a->C);
        break;
      case KDP_OP_DROPOUT:
        if (train && o->p > 0)
          kdp_dropout_forward(out, o->mask, in, n_in, o->p, rng);
        else
          memcpy(out, in, n_in * sizeof(float));
        break;
      case KDP_OP_FLATTEN:
        kdp_flatten_forward(out, in, B, a->H, a->W, a->C);
        break;
      case KDP_OP_ADD:
        kdp_add_forward(out, in, m->acts[o->in2].val, n_in);
        break;
      case KDP_OP_SHORTCUT_A:
        kdp_shortcut_a_forward(out, in, B, a->H, a->W, a->C, m->acts[o->out].C, o->stride);
        break;
    }
  }
  return m->acts[m->logits_act].val;
}

const float *kdp_model_features(const kdp_model *m) { return m->acts[m->feature_act].val; }

static void zero_range(void *ctx, size_t lo, size_t hi) {
  memset((float *)ctx + lo, 0, (hi - lo) * sizeof(float));
}

void kdp_model_zero_grad(kdp_model *m) {
  if (!m->grads) return;
  kdp_par_elems(m->n_params, m->n_params, zero_range, m->grads);
}

/* Zeroes the input gradient of op i if op i is the last reader of that activation (the first
   to write its gradient in backward order), unless that op overwrites it (*set = 1). */
static float *din_for_set(kdp_model *m, int op_idx, int act_id, size_t B, int *set) {
  act *a = &m->acts[act_id];
  int can_set = set != NULL;
  if (set) *set = 0;
  if (!a->grad) return NULL; /* the model input */
  if (a->last_reader == op_idx) {
    if (can_set)
      *set = 1;
    else
      memset(a->grad, 0, act_n(m, act_id, B) * sizeof(float));
  }
  return a->grad;
}

static float *din_for(kdp_model *m, int op_idx, int act_id, size_t B) {
  return din_for_set(m, op_idx, act_id, B, NULL);
}

/* set mode: zero the parameter gradients of ops [i, i + n) (an op, or a fused block) */
static void zero_op_grads(kdp_model *m, int i, int n) {
  for (int k = i; k < i + n; k++) {
    const op *o = &m->ops[k];
    if (o->w != NONE) memset(m->grads + o->w, 0, o->wn * sizeof(float));
    if (o->b != NONE) memset(m->grads + o->b, 0, o->bn * sizeof(float));
  }
}

/* a second hook for one pass (kdp_model_backward_set_each) */
typedef struct pass_hook {
  kdp_backward_hook fn;
  void *ctx;
} pass_hook;

/* after op i's backward: the model's hook, then the pass's */
static void op_done(kdp_model *m, int i, const pass_hook *h) {
  if (m->hook) m->hook(m->hook_ctx, m->grad_ready[i]);
  if (h) h->fn(h->ctx, m->grad_ready[i]);
}

static void model_backward(kdp_model *m, const float *dlogits, const float *dfeatures, int pset,
                           const pass_hook *h);

void kdp_model_backward(kdp_model *m, const float *dlogits, const float *dfeatures) {
  model_backward(m, dlogits, dfeatures, 0, NULL);
}

void kdp_model_backward_set(kdp_model *m, const float *dlogits, const float *dfeatures) {
  model_backward(m, dlogits, dfeatures, 1, NULL);
}

void kdp_model_backward_set_each(kdp_model *m, const float *dlogits, const float *dfeatures,
                                 kdp_backward_hook fn, void *ctx) {
  const pass_hook h = {fn, ctx};
  model_backward(m, dlogits, dfeatures, 1, &h);
}

/* pset: write the parameter gradients (kdp_model_backward_set), else add to them; h: called
   after each layer as the model's hook is */
static void model_backward(kdp_model *m, const float *dlogits, const float *dfeatures, int pset,
                           const pass_hook *h) {
  if (m->infer) {
    kdp_die("internal error: backward pass on the eval-only model %s", m->arch);
  }
  size_t B = m->B;
  model_scratch(m);
  if (pset && B == 0) {
    /* an empty batch writes nothing: its gradients are zero */
    kdp_model_zero_grad(m);
    pset = 0;
  }
  if (pset) /* tensors no op writes (none in the zoo) */
    for (size_t t = 0; t < m->n_tensors; t++)
      if (!m->tensors[t].owned)
        memset(m->grads + m->tensors[t].off, 0, m->tensors[t].size * sizeof(float));
  size_t nl = act_n(m, m->logits_act, B);
  memcpy(m->acts[m->logits_act].grad, dlogits, nl * sizeof(float));
  for (int i = m->n_ops - 1; i >= 0; i--) {
    op *o = &m->ops[i];
    if (o->fused < 0) continue;
    act *a = &m->acts[o->in];
    const float *dout = m->acts[o->out].grad;
    int oact = o->fused > 0 ? m->ops[i + o->fused - 1].out : o->out;
    if (oact == m->feature_act && dfeatures) {
      /* the features' gradient from the distillation loss joins before they are consumed */
      float *g = m->acts[oact].grad;
      size_t n = act_n(m, oact, B);
      for (size_t k = 0; k < n; k++) g[k] += dfeatures[k];
    }
    /* batchnorm, dense layers and fused blocks write their input gradient outright when they
       are the first to produce it */
    const int dense = o->kind == KDP_OP_DENSE && !m->naive;
    int set = 0, can_set = o->kind == KDP_OP_BN || dense || (o->fused > 0 && o->kind == KDP_OP_CONV);
    float *din = din_for_set(m, i, o->in, B, can_set ? &set : NULL);
    /* set mode: dense layers write their parameter gradients; every other op adds onto its
       zeroed ones */
    const unsigned dset = (set ? KDP_SET_DIN : 0u) | (pset && dense ? KDP_SET_PARAMS : 0u);
    if (pset && !dense) zero_op_grads(m, i, o->fused > 0 ? o->fused : 1);
    if (o->fused > 0) {
      if (o->kind == KDP_OP_DENSE)
        dense_relu_backward(m, i, din, B, dset);
      else
        block_backward(m, i, din, set);
      op_done(m, i, h);
      continue;
    }
    const float *in = a->val;
    size_t n_in = act_n(m, o->in, B);
    switch (o->kind) {
      case KDP_OP_DENSE: {
        size_t nI = a->H * a->W * a->C, nO = m->acts[o->out].C;
        if (m->naive)
          kdp_dense_backward_naive(din, m->grads + o->w, m->grads + o->b, dout, in,
                                   m->params + o->w, B, nI, nO);
        else
          kdp_dense_backward_set(din, m->grads + o->w, m->grads + o->b, dout, in,
                                 m->params + o->w, B, nI, nO, dset);
        break;
      }
      case KDP_OP_CONV: {
        o->cs.B = B;
        float *db = o->b != NONE ? m->grads + o->b : NULL;
        if (m->naive)
          kdp_conv2d_backward_naive(din, m->grads + o->w, db, dout, in, m->params + o->w, &o->cs);
        else
          kdp_conv2d_backward(din, m->grads + o->w, db, dout, in, m->params + o->w, m->scratch,
                              &o->cs);
        break;
      }
      case KDP_OP_BN:
        (set ? kdp_bn_backward_set : kdp_bn_backward)(din, m->grads + o->w, m->grads + o->b, dout,
                                                      o->xhat, o->invstd, m->params + o->w,
                                                      B * a->H * a->W, a->C);
        break;
      case KDP_OP_RELU:
        if (din) kdp_relu_backward(din, dout, m->acts[o->out].val, n_in);
        break;
      case KDP_OP_MAXPOOL:
        if (din) kdp_maxpool_backward(din, dout, o->argmax, B, act_n(m, o->out, B));
        break;
      case KDP_OP_AVGPOOL:
        if (din) kdp_avgpool_backward(din, dout, B, a->H, a->W, a->C, o->K, o->stride, o->pad);
        break;
      case KDP_OP_GAP:
        if (din) kdp_gap_backward(din, dout, B, a->H * a->W, a->C);
        break;
      case KDP_OP_DROPOUT:
        if (!din) break;
        if (m->last_train && o->p > 0)
          kdp_dropout_backward(din, dout, o->mask, n_in);
        else
          for (size_t k = 0; k < n_in; k++) din[k] += dout[k];
        break;
      case KDP_OP_FLATTEN:
        if (din) kdp_flatten_backward(din, dout, B, a->H, a->W, a->C);
        break;
      case KDP_OP_ADD: {
        float *din2 = din_for(m, i, o->in2, B);
        kdp_add_backward(din, din2, dout, n_in);
        break;
      }
      case KDP_OP_SHORTCUT_A:
        if (din)
          kdp_shortcut_a_backward(din, dout, B, a->H, a->W, a->C, m->acts[o->out].C, o->stride);
        break;
    }
    op_done(m, i, h);
  }
}
