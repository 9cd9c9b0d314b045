/* onnx.c: a model as an ONNX graph (eval mode), written with protobuf-c from the onnx.proto that
   Debian's libonnx-dev ships (generated at build time). One input, "pixels": float32 [N, C, H, W]
   raw 0..255; the graph normalises them itself; one output, "logits": [N, classes]. */
#include "kdpeers/onnx.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "onnx.pb-c.h"

/* Every allocation of one export, freed together. */
typedef struct pool {
  void **p;
  size_t n, cap;
} pool;

static void *palloc(pool *pl, size_t n) {
  if (pl->n == pl->cap) {
    pl->cap = pl->cap ? 2 * pl->cap : 256;
    pl->p = kdp_xrealloc(pl->p, pl->cap * sizeof *pl->p);
  }
  void *q = kdp_xcalloc(1, n ? n : 1);
  pl->p[pl->n++] = q;
  return q;
}

static char *pstr(pool *pl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *pstr(pool *pl, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  char *s = palloc(pl, (size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(s, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return s;
}

/* growable arrays of pointers inside the pool */
typedef struct vec {
  void **v;
  size_t n, cap;
} vec;

static void vpush(pool *pl, vec *a, void *x) {
  if (a->n == a->cap) {
    size_t cap = a->cap ? 2 * a->cap : 16;
    void **v = palloc(pl, cap * sizeof *v);
    if (a->n) memcpy(v, a->v, a->n * sizeof *v);
    a->v = v;
    a->cap = cap;
  }
  a->v[a->n++] = x;
}

typedef struct builder {
  pool pl;
  vec nodes, inits, meta;
  int n_node;
} builder;

/* ---- attributes ---- */
static Onnx__AttributeProto *attr_new(builder *b, const char *name, int type) {
  Onnx__AttributeProto *a = palloc(&b->pl, sizeof *a);
  *a = (Onnx__AttributeProto)ONNX__ATTRIBUTE_PROTO__INIT;
  a->name = pstr(&b->pl, "%s", name);
  a->has_type = 1;
  a->type = type;
  return a;
}

static Onnx__AttributeProto *attr_ints(builder *b, const char *name, const int64_t *v, size_t n) {
  Onnx__AttributeProto *a = attr_new(b, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INTS);
  a->n_ints = n;
  a->ints = palloc(&b->pl, n * sizeof(int64_t));
  memcpy(a->ints, v, n * sizeof(int64_t));
  return a;
}

static Onnx__AttributeProto *attr_int(builder *b, const char *name, int64_t v) {
  Onnx__AttributeProto *a = attr_new(b, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__INT);
  a->has_i = 1;
  a->i = v;
  return a;
}

static Onnx__AttributeProto *attr_float(builder *b, const char *name, float v) {
  Onnx__AttributeProto *a = attr_new(b, name, ONNX__ATTRIBUTE_PROTO__ATTRIBUTE_TYPE__FLOAT);
  a->has_f = 1;
  a->f = v;
  return a;
}

/* ---- nodes and initializers ---- */
/* a node op_type(inputs...) -> out; attrs is a NULL-terminated list */
static void node(builder *b, const char *op_type, const char *out, const char *const *in, size_t n_in,
                 Onnx__AttributeProto **attrs) {
  Onnx__NodeProto *nd = palloc(&b->pl, sizeof *nd);
  *nd = (Onnx__NodeProto)ONNX__NODE_PROTO__INIT;
  nd->op_type = pstr(&b->pl, "%s", op_type);
  nd->name = pstr(&b->pl, "%s_%d", op_type, b->n_node++);
  nd->n_input = n_in;
  nd->input = palloc(&b->pl, n_in * sizeof(char *));
  for (size_t i = 0; i < n_in; i++) nd->input[i] = pstr(&b->pl, "%s", in[i]);
  nd->n_output = 1;
  nd->output = palloc(&b->pl, sizeof(char *));
  nd->output[0] = pstr(&b->pl, "%s", out);
  size_t na = 0;
  while (attrs && attrs[na]) na++;
  nd->n_attribute = na;
  nd->attribute = attrs;
  vpush(&b->pl, &b->nodes, nd);
}

static Onnx__TensorProto *init_tensor(builder *b, const char *name, const size_t *dims,
                                      size_t ndim, int type) {
  Onnx__TensorProto *t = palloc(&b->pl, sizeof *t);
  *t = (Onnx__TensorProto)ONNX__TENSOR_PROTO__INIT;
  t->name = pstr(&b->pl, "%s", name);
  t->has_data_type = 1;
  t->data_type = type;
  t->n_dims = ndim;
  t->dims = palloc(&b->pl, ndim * sizeof(int64_t));
  for (size_t i = 0; i < ndim; i++) t->dims[i] = (int64_t)dims[i];
  vpush(&b->pl, &b->inits, t);
  return t;
}

static void init_f32(builder *b, const char *name, const size_t *dims, size_t ndim,
                     const float *data) {
  Onnx__TensorProto *t = init_tensor(b, name, dims, ndim, ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT);
  size_t n = 1;
  for (size_t i = 0; i < ndim; i++) n *= dims[i];
  t->n_float_data = n;
  t->float_data = palloc(&b->pl, n * sizeof(float));
  memcpy(t->float_data, data, n * sizeof(float));
}

static void init_i64(builder *b, const char *name, const int64_t *data, size_t n) {
  Onnx__TensorProto *t = init_tensor(b, name, &n, 1, ONNX__TENSOR_PROTO__DATA_TYPE__INT64);
  t->n_int64_data = n;
  t->int64_data = palloc(&b->pl, n * sizeof(int64_t));
  memcpy(t->int64_data, data, n * sizeof(int64_t));
}

/* value info: float32 tensor [N, dims...] with N symbolic */
static Onnx__ValueInfoProto *value_info(builder *b, const char *name, const size_t *dims,
                                        size_t ndim) {
  Onnx__TensorShapeProto *sh = palloc(&b->pl, sizeof *sh);
  *sh = (Onnx__TensorShapeProto)ONNX__TENSOR_SHAPE_PROTO__INIT;
  sh->n_dim = ndim + 1;
  sh->dim = palloc(&b->pl, (ndim + 1) * sizeof *sh->dim);
  for (size_t i = 0; i <= ndim; i++) {
    Onnx__TensorShapeProto__Dimension *d = palloc(&b->pl, sizeof *d);
    *d = (Onnx__TensorShapeProto__Dimension)ONNX__TENSOR_SHAPE_PROTO__DIMENSION__INIT;
    if (i == 0) {
      d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_PARAM;
      d->dim_param = pstr(&b->pl, "N");
    } else {
      d->value_case = ONNX__TENSOR_SHAPE_PROTO__DIMENSION__VALUE_DIM_VALUE;
      d->dim_value = (int64_t)dims[i - 1];
    }
    sh->dim[i] = d;
  }
  Onnx__TypeProto__Tensor *tt = palloc(&b->pl, sizeof *tt);
  *tt = (Onnx__TypeProto__Tensor)ONNX__TYPE_PROTO__TENSOR__INIT;
  tt->has_elem_type = 1;
  tt->elem_type = ONNX__TENSOR_PROTO__DATA_TYPE__FLOAT;
  tt->shape = sh;
  Onnx__TypeProto *tp = palloc(&b->pl, sizeof *tp);
  *tp = (Onnx__TypeProto)ONNX__TYPE_PROTO__INIT;
  tp->value_case = ONNX__TYPE_PROTO__VALUE_TENSOR_TYPE;
  tp->tensor_type = tt;
  Onnx__ValueInfoProto *vi = palloc(&b->pl, sizeof *vi);
  *vi = (Onnx__ValueInfoProto)ONNX__VALUE_INFO_PROTO__INIT;
  vi->name = pstr(&b->pl, "%s", name);
  vi->type = tp;
  return vi;
}

static void meta(builder *b, const char *key, const char *value) {
  Onnx__StringStringEntryProto *e = palloc(&b->pl, sizeof *e);
  *e = (Onnx__StringStringEntryProto)ONNX__STRING_STRING_ENTRY_PROTO__INIT;
  e->key = pstr(&b->pl, "%s", key);
  e->value = pstr(&b->pl, "%s", value);
  vpush(&b->pl, &b->meta, e);
}

static Onnx__AttributeProto **attrs(builder *b, size_t n) {
  return palloc(&b->pl, (n + 1) * sizeof(Onnx__AttributeProto *));
}

/* ---- the graph ---- */

/* Each activation's ONNX value: its name and whether it is [N, C, H, W] (rank 4) or [N, D]. Dense
   activations are 1 x 1 x D in kdpeers, so the two forms convert by Flatten / Reshape. */
typedef struct value {
  const char *name;
  int rank4;
} value;

static const char *as_rank(builder *b, value *v, int want4, size_t C) {
  if (v->rank4 == want4) return v->name;
  char *out = pstr(&b->pl, "%s_%s", v->name, want4 ? "4d" : "2d");
  if (want4) {
    int64_t shape[4] = {-1, (int64_t)C, 1, 1};
    char *sn = pstr(&b->pl, "%s_shape", out);
    init_i64(b, sn, shape, 4);
    const char *in[2] = {v->name, sn};
    node(b, "Reshape", out, in, 2, NULL);
  } else {
    Onnx__AttributeProto **a = attrs(b, 1);
    a[0] = attr_int(b, "axis", 1);
    node(b, "Flatten", out, &v->name, 1, a);
  }
  /* later readers of the same rank reuse the converted value */
  v->name = out;
  v->rank4 = want4;
  return out;
}

static void add_tensor_init(builder *b, const kdp_model *m, size_t t) {
  size_t dims[4], nd = kdp_model_tensor_shape(m, t, dims);
  float *tmp = kdp_falloc(kdp_model_tensor_size(m, t));
  kdp_model_tensor_to_torch(m, t, tmp);
  init_f32(b, kdp_model_tensor_name(m, t), dims, nd, tmp);
  free(tmp);
}

static void add_buffer_init(builder *b, kdp_model *m, size_t t) {
  size_t n = kdp_model_buffer_size(m, t);
  init_f32(b, kdp_model_buffer_name(m, t), &n, 1,
           kdp_model_buffers(m) + kdp_model_buffer_offset(m, t));
}

static void pool_attrs(builder *b, Onnx__AttributeProto **a, const kdp_op_info *o) {
  int64_t k[2] = {(int64_t)o->K, (int64_t)o->K}, s[2] = {(int64_t)o->stride, (int64_t)o->stride};
  int64_t p[4] = {(int64_t)o->pad, (int64_t)o->pad, (int64_t)o->pad, (int64_t)o->pad};
  a[0] = attr_ints(b, "kernel_shape", k, 2);
  a[1] = attr_ints(b, "strides", s, 2);
  a[2] = attr_ints(b, "pads", p, 4);
}

/* the nodes of one op; returns 0 or -1 for an op kind this exporter does not know */
static int emit_op(builder *b, kdp_model *m, const kdp_op_info *o, value *vals, const char *out) {
  size_t H, W, C, oH, oW, oC;
  kdp_model_act_shape(m, o->in, &H, &W, &C);
  kdp_model_act_shape(m, o->out, &oH, &oW, &oC);
  value *v = &vals[o->in];
  value *r = &vals[o->out];
  r->name = out;
  r->rank4 = v->rank4;
  switch (o->kind) {
    case KDP_OP_DENSE: {
      add_tensor_init(b, m, o->weight);
      add_tensor_init(b, m, o->bias);
      const char *in[3] = {as_rank(b, v, 0, C), kdp_model_tensor_name(m, o->weight),
                           kdp_model_tensor_name(m, o->bias)};
      Onnx__AttributeProto **a = attrs(b, 1);
      a[0] = attr_int(b, "transB", 1);
      node(b, "Gemm", out, in, 3, a);
      r->rank4 = 0;
      return 0;
    }
    case KDP_OP_CONV: {
      add_tensor_init(b, m, o->weight);
      if (o->bias != KDP_NO_TENSOR) add_tensor_init(b, m, o->bias);
      const char *in[3] = {as_rank(b, v, 1, C), kdp_model_tensor_name(m, o->weight),
                           o->bias != KDP_NO_TENSOR ? kdp_model_tensor_name(m, o->bias) : NULL};
      Onnx__AttributeProto **a = attrs(b, 3);
      pool_attrs(b, a, o);
      node(b, "Conv", out, in, o->bias != KDP_NO_TENSOR ? 3 : 2, a);
      r->rank4 = 1;
      return 0;
    }
    case KDP_OP_BN: {
      add_tensor_init(b, m, o->weight);
      add_tensor_init(b, m, o->bias);
      add_buffer_init(b, m, o->running_mean);
      add_buffer_init(b, m, o->running_var);
      const char *in[5] = {v->name, kdp_model_tensor_name(m, o->weight),
                           kdp_model_tensor_name(m, o->bias),
                           kdp_model_buffer_name(m, o->running_mean),
                           kdp_model_buffer_name(m, o->running_var)};
      Onnx__AttributeProto **a = attrs(b, 1);
      a[0] = attr_float(b, "epsilon", 1e-5f);
      node(b, "BatchNormalization", out, in, 5, a);
      return 0;
    }
    case KDP_OP_RELU:
      node(b, "Relu", out, &v->name, 1, NULL);
      return 0;
    case KDP_OP_MAXPOOL:
    case KDP_OP_AVGPOOL: {
      const char *in = as_rank(b, v, 1, C);
      Onnx__AttributeProto **a = attrs(b, 4);
      pool_attrs(b, a, o);
      if (o->kind == KDP_OP_AVGPOOL) a[3] = attr_int(b, "count_include_pad", 1);
      node(b, o->kind == KDP_OP_MAXPOOL ? "MaxPool" : "AveragePool", out, &in, 1, a);
      r->rank4 = 1;
      return 0;
    }
    case KDP_OP_GAP: {
      const char *in = as_rank(b, v, 1, C);
      node(b, "GlobalAveragePool", out, &in, 1, NULL);
      r->rank4 = 1;
      return 0;
    }
    case KDP_OP_DROPOUT: /* eval mode: the identity */
      *r = *v;
      return 0;
    case KDP_OP_FLATTEN:
      /* kdpeers flattens NHWC into NCHW order, which is ONNX Flatten of the NCHW tensor */
      r->name = as_rank(b, v, 0, C);
      r->rank4 = 0;
      return 0;
    case KDP_OP_ADD: {
      value *v2 = &vals[o->in2];
      const char *in[2] = {v->name, as_rank(b, v2, v->rank4, C)};
      node(b, "Add", out, in, 2, NULL);
      return 0;
    }
    case KDP_OP_SHORTCUT_A: {
      /* x[:, :, ::s, ::s], then zero channels: (Cout - Cin) / 2 before, the rest after */
      const char *x = as_rank(b, v, 1, C);
      if (o->stride > 1) {
        char *sl = pstr(&b->pl, "%s_sub", out), *nm[4];
        int64_t starts[2] = {0, 0}, ends[2] = {INT64_MAX, INT64_MAX}, axes[2] = {2, 3},
                steps[2] = {(int64_t)o->stride, (int64_t)o->stride};
        const int64_t *data[4] = {starts, ends, axes, steps};
        static const char *what[4] = {"starts", "ends", "axes", "steps"};
        for (int k = 0; k < 4; k++) {
          nm[k] = pstr(&b->pl, "%s_%s", sl, what[k]);
          init_i64(b, nm[k], data[k], 2);
        }
        const char *in[5] = {x, nm[0], nm[1], nm[2], nm[3]};
        node(b, "Slice", oC > C ? sl : out, in, 5, NULL);
        x = sl;
      }
      if (oC > C) {
        int64_t lo = (int64_t)(oC - C) / 2, hi = (int64_t)(oC - C) - lo;
        int64_t pads[8] = {0, lo, 0, 0, 0, hi, 0, 0};
        char *pn = pstr(&b->pl, "%s_pads", out);
        init_i64(b, pn, pads, 8);
        const char *in[2] = {x, pn};
        node(b, "Pad", out, in, 2, NULL);
      } else if (o->stride <= 1) {
        r->name = x; /* the identity */
      }
      r->rank4 = 1;
      return 0;
    }
  }
  return -1;
}

/* class names as a JSON array (they carry no quotes or control characters) */
static char *names_json(builder *b, const kdp_modelfile *mf) {
  size_t len = 3;
  for (size_t i = 0; i < mf->in.n_classes; i++) len += strlen(mf->class_names[i]) + 3;
  char *s = palloc(&b->pl, len);
  strcat(s, "[");
  for (size_t i = 0; i < mf->in.n_classes; i++) {
    if (i) strcat(s, ",");
    strcat(s, "\"");
    strcat(s, mf->class_names[i]);
    strcat(s, "\"");
  }
  strcat(s, "]");
  return s;
}

int kdp_onnx_write(const kdp_modelfile *mf, const char *path, kdp_error *err) {
  kdp_model *m = mf->m;
  builder b;
  memset(&b, 0, sizeof b);
  size_t n_acts = 1;
  for (size_t i = 0; i < kdp_model_n_ops(m); i++) {
    kdp_op_info o;
    kdp_model_op(m, i, &o);
    if ((size_t)o.out + 1 > n_acts) n_acts = (size_t)o.out + 1;
  }
  value *vals = palloc(&b.pl, n_acts * sizeof *vals);

  /* pixels -> (pixels / 255 - mean) / std, per channel, as kdpeers' batcher computes it */
  size_t C = mf->in.C, cdims[4] = {1, C, 1, 1}, one = 1;
  float scale = 255.0f, mean[3], std[3];
  for (size_t c = 0; c < C; c++) {
    mean[c] = mf->mean[c];
    std[c] = mf->std[c];
  }
  init_f32(&b, "pixel_scale", &one, 0, &scale);
  init_f32(&b, "pixel_mean", cdims, 4, mean);
  init_f32(&b, "pixel_std", cdims, 4, std);
  const char *in1[2] = {"pixels", "pixel_scale"}, *in2[2] = {"unit", "pixel_mean"},
             *in3[2] = {"centred", "pixel_std"};
  node(&b, "Div", "unit", in1, 2, NULL);
  node(&b, "Sub", "centred", in2, 2, NULL);
  node(&b, "Div", "x", in3, 2, NULL);
  vals[0] = (value){"x", 1};

  int logits = kdp_model_logits_act(m), rc = 0;
  for (size_t i = 0; i < kdp_model_n_ops(m) && rc == 0; i++) {
    kdp_op_info o;
    kdp_model_op(m, i, &o);
    const char *out = o.out == logits ? "logits" : pstr(&b.pl, "t%d", o.out);
    if (emit_op(&b, m, &o, vals, out) != 0)
      rc = kdp_fail(err, KDP_EINVAL, "ONNX export: op %zu of %s has a kind this exporter lacks",
                    i, kdp_model_arch(m));
  }
  if (rc == 0 && strcmp(vals[logits].name, "logits") != 0)
    rc = kdp_fail(err, KDP_EINVAL, "ONNX export: the logits of %s are not produced by a node",
                  kdp_model_arch(m));
  if (rc != 0) goto out;
  {
    Onnx__GraphProto g = ONNX__GRAPH_PROTO__INIT;
    g.name = pstr(&b.pl, "kdpeers %s", kdp_model_arch(m));
    g.n_node = b.nodes.n;
    g.node = (Onnx__NodeProto **)b.nodes.v;
    g.n_initializer = b.inits.n;
    g.initializer = (Onnx__TensorProto **)b.inits.v;
    size_t idims[3] = {C, mf->in.H, mf->in.W}, odims[1] = {mf->in.n_classes};
    Onnx__ValueInfoProto *gi = value_info(&b, "pixels", idims, 3);
    Onnx__ValueInfoProto *go = value_info(&b, "logits", odims, 1);
    gi->doc_string = pstr(&b.pl, "raw pixel values 0..255 (float32), N x C x H x W");
    go->doc_string = pstr(&b.pl, "class scores before softmax");
    g.n_input = g.n_output = 1;
    g.input = &gi;
    g.output = &go;

    Onnx__OperatorSetIdProto ops = ONNX__OPERATOR_SET_ID_PROTO__INIT, *opsp = &ops;
    ops.domain = pstr(&b.pl, "%s", "");
    ops.has_version = 1;
    ops.version = KDP_ONNX_OPSET;

    meta(&b, "arch", kdp_model_arch(m));
    meta(&b, "kdpeers_version", KDP_VERSION);
    meta(&b, "input", "pixels: float32 [N, C, H, W], raw values 0..255; normalised in the graph");
    char *norm = pstr(&b.pl, "mean %.9g %.9g %.9g std %.9g %.9g %.9g (of pixel/255, per channel)",
                      (double)mean[0], (double)(C > 1 ? mean[1] : 0), (double)(C > 2 ? mean[2] : 0),
                      (double)std[0], (double)(C > 1 ? std[1] : 0), (double)(C > 2 ? std[2] : 0));
    meta(&b, "normalisation", norm);
    if (mf->class_names) meta(&b, "class_names", names_json(&b, mf));

    Onnx__ModelProto model = ONNX__MODEL_PROTO__INIT;
    model.has_ir_version = 1;
    model.ir_version = KDP_ONNX_IR_VERSION;
    model.n_opset_import = 1;
    model.opset_import = &opsp;
    model.producer_name = pstr(&b.pl, "kdpeers");
    model.producer_version = pstr(&b.pl, "%s", KDP_VERSION);
    model.doc_string = pstr(&b.pl, "kdpeers student %s, eval mode", kdp_model_arch(m));
    model.graph = &g;
    model.n_metadata_props = b.meta.n;
    model.metadata_props = (Onnx__StringStringEntryProto **)b.meta.v;

    size_t len = onnx__model_proto__get_packed_size(&model);
    uint8_t *buf = kdp_xmalloc(len);
    onnx__model_proto__pack(&model, buf);
    /* written to a temp file and renamed, like every kdpeers artefact */
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len;
    if (f && fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
      rc = kdp_fail(err, KDP_EIO, "cannot write %s: %s", path, strerror(errno));
      unlink(tmp);
    }
    free(buf);
  }
out:
  for (size_t i = 0; i < b.pl.n; i++) free(b.pl.p[i]);
  free(b.pl.p);
  return rc;
}
