/* kd.c: the ops table, the cohort (spec, module arenas, scratch) and the checked entry points
   the trainer calls; the single-process reference objective. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_internal.h"

/* ---------------------------------------------------------------- the table */

static const kdp_method_ops *const table[KDP_METHOD_END] = {
    [KDP_METHOD_INDEPENDENT] = &kdp_independent_ops,
    [KDP_METHOD_DML] = &kdp_dml_ops,
    [KDP_METHOD_CODISTILL] = &kdp_codistill_ops,
    [KDP_METHOD_AVG] = &kdp_avg_ops,
    [KDP_METHOD_ONE] = &kdp_one_ops,
    [KDP_METHOD_FFL] = &kdp_ffl_ops,
    [KDP_METHOD_OKDDIP] = &kdp_okddip_ops,
    [KDP_METHOD_KDCL] = &kdp_kdcl_ops,
    [KDP_METHOD_PCL] = &kdp_pcl_ops,
    [KDP_METHOD_MCL] = &kdp_mcl_ops,
    [KDP_METHOD_SWITOKD] = &kdp_switokd_ops,
};

const kdp_method_ops *kdp_method_ops_of(kdp_method m) {
  return (int)m >= 0 && m < KDP_METHOD_END ? table[m] : NULL;
}

const char *kdp_method_at(size_t i) { return i < KDP_METHOD_COUNT ? table[i]->name : NULL; }

const char *kdp_method_name(kdp_method m) {
  const kdp_method_ops *o = kdp_method_ops_of(m);
  return o ? o->name : "unknown";
}

/* name among the table's first `end` entries */
static int parse_upto(int end, const char *name, kdp_method *out, kdp_error *err) {
  char list[256] = "";
  size_t used = 0;
  for (int k = 0; k < end; k++) {
    if (!table[k]) continue;
    if (name && strcmp(name, table[k]->name) == 0) {
      *out = (kdp_method)k;
      return 0;
    }
    used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", k ? ", " : "",
                             table[k]->name);
  }
  return kdp_fail(err, KDP_EINVAL, "kd.method: unknown method '%s'; expected one of %s",
                  name ? name : "(null)", list);
}

int kdp_method_parse(const char *name, kdp_method *out, kdp_error *err) {
  return parse_upto(KDP_METHOD_COUNT, name, out, err);
}

int kdp_method_parse_staged(const char *name, kdp_method *out, kdp_error *err) {
  return parse_upto(KDP_METHOD_END, name, out, err);
}

/* ---------------------------------------------------------------- the cohort */

void *kdp_cohort_alloc(kdp_cohort *c, size_t bytes) {
  if (c->n_allocs == c->cap_allocs) {
    c->cap_allocs = c->cap_allocs ? 2 * c->cap_allocs : 32;
    void **a = realloc(c->allocs, c->cap_allocs * sizeof *a);
    if (!a) {
      fprintf(stderr, "kdpeers: out of memory (kd scratch)\n");
      exit(1);
    }
    c->allocs = a;
  }
  void *p = kdp_falloc((bytes + sizeof(float) - 1) / sizeof(float));
  c->allocs[c->n_allocs++] = p;
  return p;
}

float *kdp_cohort_falloc(kdp_cohort *c, size_t n) { return kdp_cohort_alloc(c, n * sizeof(float)); }
void *kdp_cohort_state(kdp_cohort *c) { return c->state; }
void kdp_cohort_set_state(kdp_cohort *c, void *state) { c->state = state; }

size_t kdp_cohort_module_n_buffer_ranges(const kdp_cohort *c) { return c->n_binit; }

int kdp_cohort_module_buffer_range(const kdp_cohort *c, size_t i, size_t *off, size_t *n,
                                   kdp_split *split) {
  if (i >= c->n_binit) return -1;
  *off = c->binit[i].off;
  *n = c->binit[i].n;
  *split = c->binit[i].split;
  return 0;
}

size_t kdp_cohort_add_tensor(kdp_cohort *c, const char *name, size_t rows, size_t cols, int owner,
                             kdp_split row_split, kdp_split col_split) {
  if (c->n_tensors == c->cap_tensors) {
    c->cap_tensors = c->cap_tensors ? 2 * c->cap_tensors : 16;
    kdp_kd_tensor *t = realloc(c->tensors, c->cap_tensors * sizeof *t);
    if (!t) {
      fprintf(stderr, "kdpeers: out of memory (module tensors)\n");
      exit(1);
    }
    c->tensors = t;
  }
  kdp_kd_tensor *t = &c->tensors[c->n_tensors++];
  memset(t, 0, sizeof *t);
  snprintf(t->name, sizeof t->name, "%s", name);
  t->off = c->n_params;
  t->rows = rows;
  t->cols = cols;
  t->size = rows * cols;
  t->owner = owner;
  t->row_split = row_split;
  t->col_split = col_split;
  c->n_params += t->size;
  return t->off;
}

size_t kdp_cohort_add_buffers(kdp_cohort *c, size_t n, float value) {
  return kdp_cohort_add_buffers_split(c, n, value, KDP_SPLIT_NONE);
}

size_t kdp_cohort_add_buffers_split(kdp_cohort *c, size_t n, float value, kdp_split split) {
  size_t off = c->n_buffers;
  c->n_buffers += n;
  if (c->n_binit == sizeof c->binit / sizeof c->binit[0]) {
    fprintf(stderr, "kdpeers: internal error: more than %zu buffer ranges in a module\n",
            sizeof c->binit / sizeof c->binit[0]);
    exit(1);
  }
  c->binit[c->n_binit++] = (struct buffer_init){off, n, value, split};
  return off;
}

int kdp_cohort_create(kdp_cohort **out, const kdp_kd_spec *spec, size_t max_batch,
                      kdp_error *err) {
  *out = NULL;
  if (!spec) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: spec is NULL");
  kdp_kd_spec s = *spec;
  const kdp_method_ops *ops = kdp_method_ops_of(s.method);
  if (!ops)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: method %d is not a kdp_method",
                    (int)s.method);
  if (s.P < 1 || s.P > KDP_KD_MAX_PEERS)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: %zu peers; expected 1..%d", s.P,
                    KDP_KD_MAX_PEERS);
  if (s.C < 1) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: C must be >= 1");
  if (max_batch < 1) return kdp_fail(err, KDP_EINVAL, "kdp_cohort_create: max_batch must be >= 1");
  int feats = ((ops->peer_reads | ops->module_reads) & KDP_READS_FEATURES) != 0;
  if (feats)
    for (size_t j = 0; j < s.P; j++)
      if (s.dims[j] < 1)
        return kdp_fail(err, KDP_EINVAL,
                        "kdp_cohort_create: method %s reads features but peer %zu has feature "
                        "dim 0; set spec.dims[%zu]",
                        ops->name, j, j);
  kdp_cohort *c = kdp_xcalloc(1, sizeof *c);
  c->ops = ops;
  c->maxB = max_batch;
  for (size_t j = 0; j < s.P; j++) c->hoff[j + 1] = c->hoff[j] + (feats ? s.dims[j] : 0);
  c->D = c->hoff[s.P];
  c->s = s;
  int rc = ops->setup ? ops->setup(c, &c->s, err) : 0;
  if (rc != 0) {
    kdp_cohort_free(c);
    return rc;
  }
  c->params = kdp_falloc(c->n_params);
  c->grads = kdp_falloc(c->n_params);
  c->buffers = kdp_falloc(c->n_buffers);
  for (size_t r = 0; r < c->n_binit; r++)
    for (size_t k = 0; k < c->binit[r].n; k++) c->buffers[c->binit[r].off + k] = c->binit[r].value;
  if (ops->module_reads || ops->contribute) {
    c->tch = kdp_cohort_falloc(c, s.P * max_batch * s.C);
    c->dtch = kdp_cohort_falloc(c, s.P * max_batch * s.C);
    c->pq = kdp_cohort_falloc(c, max_batch * s.C);
    c->pg = kdp_cohort_falloc(c, max_batch * s.C);
  }
  *out = c;
  return 0;
}

void kdp_cohort_free(kdp_cohort *c) {
  if (!c) return;
  for (size_t k = 0; k < c->n_allocs; k++) free(c->allocs[k]);
  free(c->allocs);
  free(c->params);
  free(c->grads);
  free(c->buffers);
  free(c->tensors);
  free(c);
}

const kdp_kd_spec *kdp_cohort_spec(const kdp_cohort *c) { return &c->s; }
const kdp_method_ops *kdp_cohort_ops(const kdp_cohort *c) { return c->ops; }
size_t kdp_cohort_max_batch(const kdp_cohort *c) { return c->maxB; }

void kdp_cohort_module_init(kdp_cohort *c, kdp_rng *rng) {
  if (c->ops->init) c->ops->init(c, rng);
}

size_t kdp_cohort_module_n_params(const kdp_cohort *c) { return c->n_params; }
float *kdp_cohort_module_params(kdp_cohort *c) { return c->params; }
float *kdp_cohort_module_grads(kdp_cohort *c) { return c->grads; }
void kdp_cohort_module_zero_grad(kdp_cohort *c) {
  if (c->n_params) memset(c->grads, 0, c->n_params * sizeof(float));
}

/* ---- the module's parts per peer (kdp_cohort_module_ranges) ---- */

/* a tensor of KDP_SPLIT_FEATURES columns of a module sharded by peer columns */
static int col_sharded(const kdp_cohort *c, const kdp_kd_tensor *t) {
  return c->ops->col_width && t->col_split == KDP_SPLIT_FEATURES && t->cols == c->D;
}

typedef void (*range_fn)(void *ctx, size_t lo, size_t hi);

/* fn over part's ranges of peer j, layout order (not merged) */
static void each_range(const kdp_cohort *c, kdp_module_part part, size_t j, range_fn fn,
                       void *ctx) {
  for (size_t i = 0; i < c->n_tensors; i++) {
    const kdp_kd_tensor *t = &c->tensors[i];
    if (!col_sharded(c, t)) {
      if (part == KDP_PART_SHARED) fn(ctx, t->off, t->off + t->size);
    } else if (part == KDP_PART_SHARDED) {
      fn(ctx, t->off, t->off + t->size);
    } else if (part == KDP_PART_OWN && j < c->s.P) {
      for (size_t r = 0; r < t->rows; r++) {
        size_t lo = t->off + r * t->cols + c->hoff[j];
        fn(ctx, lo, lo + c->s.dims[j]);
      }
    }
  }
}

typedef struct range_list {
  size_t *out, max, n, last_hi;
} range_list;

static void range_add(void *ctx, size_t lo, size_t hi) {
  range_list *r = ctx;
  if (hi <= lo) return;
  if (r->n && r->last_hi == lo) {
    if (r->n <= r->max) r->out[2 * (r->n - 1) + 1] = hi;
  } else {
    if (r->n < r->max) {
      r->out[2 * r->n] = lo;
      r->out[2 * r->n + 1] = hi;
    }
    r->n++;
  }
  r->last_hi = hi;
}

size_t kdp_cohort_module_ranges(const kdp_cohort *c, kdp_module_part part, size_t j,
                                size_t *lo_hi, size_t max) {
  range_list r = {lo_hi, lo_hi ? max : 0, 0, 0};
  each_range(c, part, j, range_add, &r);
  return r.n;
}

static void range_zero(void *ctx, size_t lo, size_t hi) {
  float *g = ctx;
  memset(g + lo, 0, (hi - lo) * sizeof(float));
}

void kdp_cohort_module_zero_grad_of(kdp_cohort *c, size_t j) {
  if (j >= c->s.P) {
    kdp_cohort_module_zero_grad(c);
    return;
  }
  each_range(c, KDP_PART_SHARED, j, range_zero, c->grads);
  each_range(c, KDP_PART_OWN, j, range_zero, c->grads);
}

size_t kdp_cohort_module_n_buffers(const kdp_cohort *c) { return c->n_buffers; }
float *kdp_cohort_module_buffers(kdp_cohort *c) { return c->buffers; }
size_t kdp_cohort_module_n_tensors(const kdp_cohort *c) { return c->n_tensors; }
const kdp_kd_tensor *kdp_cohort_module_tensor(const kdp_cohort *c, size_t i) {
  return i < c->n_tensors ? &c->tensors[i] : NULL;
}

size_t kdp_cohort_feature_offset(const kdp_cohort *c, size_t j, size_t n) {
  return n * c->hoff[j < c->s.P ? j : c->s.P];
}
size_t kdp_cohort_feature_floats(const kdp_cohort *c, size_t n) { return n * c->D; }
size_t kdp_cohort_embed_dim(const kdp_cohort *c) {
  return (c->ops->peer_reads & KDP_READS_EMBEDDINGS) ? c->s.embed_dim : 0;
}
static unsigned grads_of(const kdp_cohort *c) { return c->ops->grads ? c->ops->grads(c) : 0; }
int kdp_cohort_teacher_grad(const kdp_cohort *c) { return (grads_of(c) & KDP_GRAD_TEACHER) != 0; }
int kdp_cohort_feature_grads(const kdp_cohort *c) { return (grads_of(c) & KDP_GRAD_FEATURES) != 0; }
int kdp_cohort_logit_grads(const kdp_cohort *c) { return (grads_of(c) & KDP_GRAD_LOGITS) != 0; }
size_t kdp_cohort_teacher_floats(const kdp_cohort *c, size_t n) {
  if (!c->ops->module_reads) return 0;
  return (c->ops->teacher_per_peer ? c->s.P : 1) * n * c->s.C;
}

/* ---------------------------------------------------------------- input checks */

/* n rows of labels y (and logits z unless z_needed is 0) with temperature T and KD weight */
static int check_rows(const kdp_cohort *c, int z_needed, const float *z, const int32_t *y, size_t n,
                      float T, float weight, const char *fn, kdp_error *err) {
  if (n > c->maxB)
    return kdp_fail(err, KDP_EINVAL, "%s: batch %zu outside 1..%zu (max_batch of the cohort)", fn,
                    n, c->maxB);
  if (n && ((z_needed && !z) || !y))
    return kdp_fail(err, KDP_EINVAL, "%s: batch, logits z and labels y are required", fn);
  if (!(T > 0.0f) || !isfinite(T))
    return kdp_fail(err, KDP_EINVAL, "%s: temperature %g must be finite and > 0", fn, (double)T);
  if (!(weight >= 0.0f) || !isfinite(weight))
    return kdp_fail(err, KDP_EINVAL, "%s: KD weight %g must be finite and >= 0", fn,
                    (double)weight);
  for (size_t b = 0; b < n; b++)
    if (y[b] < 0 || (size_t)y[b] >= c->s.C)
      return kdp_fail(err, KDP_EINVAL, "%s: label y[%zu] = %d outside [0, %zu)", fn, b,
                      (int)y[b], c->s.C);
  return 0;
}

static int check_block(const kdp_cohort *c, const kdp_kd_rows *blk, const char *fn,
                       kdp_error *err) {
  if (!blk) return kdp_fail(err, KDP_EINVAL, "%s: rows are required", fn);
  unsigned r = c->ops->module_reads;
  if (!r) return kdp_fail(err, KDP_EINVAL, "%s: method %s has no module", fn, c->ops->name);
  int rc = check_rows(c, (r & KDP_READS_LOGITS) != 0, blk->z, blk->y, blk->n, blk->T,
                      blk->weight, fn, err);
  if (rc) return rc;
  if (blk->n && (r & KDP_READS_FEATURES) && !blk->h && !(blk->part && c->ops->col_width))
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the peers' features h", fn,
                    c->ops->name);
  if (blk->n && blk->part && !blk->dpart)
    return kdp_fail(err, KDP_EINVAL, "%s: partial products (part) come with their gradient "
                    "(dpart)", fn);
  return 0;
}

size_t kdp_cohort_col_width(const kdp_cohort *c) {
  return c->ops->col_width ? c->ops->col_width(c) : 0;
}

static int check_col(const kdp_cohort *c, size_t j, const float *h, size_t n, const float *buf,
                     const char *fn, kdp_error *err) {
  if (!c->ops->col_width)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s has no module sharded by peer columns", fn,
                    c->ops->name);
  if (j >= c->s.P)
    return kdp_fail(err, KDP_EINVAL, "%s: peer %zu outside 0..%zu", fn, j, c->s.P - 1);
  if (n > c->maxB)
    return kdp_fail(err, KDP_EINVAL, "%s: %zu rows outside 0..%zu", fn, n, c->maxB);
  if (n && (!h || !buf)) return kdp_fail(err, KDP_EINVAL, "%s: h and the partials are required", fn);
  return 0;
}

int kdp_cohort_col_forward(kdp_cohort *c, size_t j, const float *h, size_t n, float *part,
                           kdp_error *err) {
  int rc = check_col(c, j, h, n, part, "kdp_cohort_col_forward", err);
  if (rc == 0 && n) c->ops->col_forward(c, j, h, n, part);
  return rc;
}

int kdp_cohort_col_backward(kdp_cohort *c, size_t j, const float *h, size_t n, const float *dpart,
                            float *dh, kdp_error *err) {
  int rc = check_col(c, j, h, n, dpart, "kdp_cohort_col_backward", err);
  if (rc == 0 && n && !dh) rc = kdp_fail(err, KDP_EINVAL, "kdp_cohort_col_backward: dh is required");
  if (rc == 0 && n) c->ops->col_backward(c, j, h, n, dpart, dh);
  return rc;
}

/* ---------------------------------------------------------------- entry points */

int kdp_cohort_module_forward(kdp_cohort *c, const kdp_kd_rows *blk, const kdp_kd_reduce *red,
                              float *teacher, kdp_error *err) {
  int rc = check_block(c, blk, "kdp_cohort_module_forward", err);
  if (rc) return rc;
  if (blk->n && !teacher)
    return kdp_fail(err, KDP_EINVAL, "kdp_cohort_module_forward: teacher is required");
  c->ops->forward(c, blk, 1, red, teacher);
  return 0;
}

int kdp_cohort_peer_loss(kdp_cohort *c, size_t i, const kdp_kd_peer_in *in, float *dz,
                         float *dteacher, kdp_kd_losses *out, kdp_error *err) {
  const char *fn = "kdp_cohort_peer_loss";
  if (!in) return kdp_fail(err, KDP_EINVAL, "%s: input is required", fn);
  if (i >= c->s.P)
    return kdp_fail(err, KDP_EINVAL, "%s: peer %zu outside 0..%zu", fn, i, c->s.P - 1);
  int rc = check_rows(c, 1, in->z, in->y, in->n, in->T, in->weight, fn, err);
  if (rc) return rc;
  if (in->n && !dz) return kdp_fail(err, KDP_EINVAL, "%s: dz (n x C) is required", fn);
  if (in->n && (c->ops->peer_reads & KDP_READS_LOGITS) && !in->z_all)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs every peer's logits (z_all)", fn,
                    c->ops->name);
  if (in->n && (c->ops->module_reads || c->ops->contribute) && !in->teacher)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs its teacher (in->teacher)", fn,
                    c->ops->name);
  if (in->n && (c->ops->peer_reads & KDP_READS_EMA_LOGITS) && !in->z_ema)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs every peer's mean teacher's logits "
                    "(z_ema)", fn, c->ops->name);
  if (in->n && (c->ops->peer_reads & KDP_READS_EMBEDDINGS) && (!in->v_all || !in->dv_all))
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs every peer's embeddings (v_all) and "
                    "their gradients (dv_all)", fn, c->ops->name);
  if (in->n && kdp_cohort_teacher_grad(c) && !dteacher)
    return kdp_fail(err, KDP_EINVAL,
                    "%s: method %s returns teacher gradients; dteacher is required", fn,
                    c->ops->name);
  kdp_kd_losses o;
  memset(&o, 0, sizeof o);
  if (in->n) c->ops->peer_loss(c, i, in, dz, dteacher, &o);
  if (out) *out = o;
  return 0;
}

int kdp_cohort_module_backward(kdp_cohort *c, const kdp_kd_rows *blk, const float *dteacher,
                               const kdp_kd_reduce *red, float *dz, float *dh, double *module_loss,
                               kdp_error *err) {
  const char *fn = "kdp_cohort_module_backward";
  int rc = check_block(c, blk, fn, err);
  if (rc) return rc;
  if (blk->n && kdp_cohort_logit_grads(c) && !dz)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s returns logit gradients; dz (P x n x C) is required",
                    fn, c->ops->name);
  if (blk->n && kdp_cohort_feature_grads(c) && !dh && !blk->part)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s returns feature gradients; dh is required",
                    fn, c->ops->name);
  if (blk->n && kdp_cohort_teacher_grad(c) && !dteacher)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the teachers' gradients", fn,
                    c->ops->name);
  double L = c->ops->backward(c, blk, dteacher, red, dz, dh);
  if (module_loss) *module_loss = L;
  return 0;
}

int kdp_cohort_teacher_eval_rows(kdp_cohort *c, const kdp_kd_rows *blk, float *teacher,
                                 kdp_error *err) {
  const char *fn = "kdp_cohort_teacher_eval";
  if (!blk || !blk->z || !teacher)
    return kdp_fail(err, KDP_EINVAL, "%s: z and teacher are required", fn);
  if (blk->n < 1 || blk->n > c->maxB)
    return kdp_fail(err, KDP_EINVAL, "%s: batch %zu outside 1..%zu", fn, blk->n, c->maxB);
  if (c->ops->teacher && (c->ops->module_reads & KDP_READS_FEATURES) && !blk->h)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs features h", fn, c->ops->name);
  if (c->ops->teacher_eval)
    c->ops->teacher_eval(c, blk, teacher);
  else if (c->ops->teacher)
    c->ops->forward(c, blk, 0, NULL, teacher);
  else
    kdp_ensemble_logprob(teacher, blk->z, c->s.P, blk->n, c->s.C);
  return 0;
}

int kdp_cohort_teacher_eval(kdp_cohort *c, const float *z, const float *h, size_t B,
                            float *teacher, kdp_error *err) {
  kdp_kd_rows blk = {.z = z, .h = h, .n = B, .T = 1.0f, .scale = 1.0f};
  return kdp_cohort_teacher_eval_rows(c, &blk, teacher, err);
}

/* ---------------------------------------------------------------- reduced teachers */

kdp_reduce_op kdp_cohort_teacher_reduce_op(const kdp_cohort *c) {
  return c->ops->reduce_op ? c->ops->reduce_op(c) : KDP_REDUCE_SUM;
}

int kdp_cohort_teacher_contribution(const kdp_cohort *c, size_t j, const float *z,
                                    const int32_t *y, size_t n, float *out, kdp_error *err) {
  const char *fn = "kdp_cohort_teacher_contribution";
  if (!c->ops->contribute)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s has no reduced teacher", fn, c->ops->name);
  if (j >= c->s.P)
    return kdp_fail(err, KDP_EINVAL, "%s: peer %zu outside 0..%zu", fn, j, c->s.P - 1);
  if (n && (!z || !out))
    return kdp_fail(err, KDP_EINVAL, "%s: z and out (n x C) are required", fn);
  c->ops->contribute(c, j, z, y, n, out);
  return 0;
}

/* the contributions combined in peer order; tmp (n x C) is scratch */
static void reduce_teacher(const kdp_cohort *c, const float *z_all, const int32_t *y, size_t n,
                           float *out, float *tmp) {
  const size_t C = c->s.C, m = n * C;
  const int mn = kdp_cohort_teacher_reduce_op(c) == KDP_REDUCE_MIN;
  c->ops->contribute(c, 0, z_all, y, n, out);
  for (size_t j = 1; j < c->s.P; j++) {
    c->ops->contribute(c, j, z_all + j * m, y, n, tmp);
    for (size_t k = 0; k < m; k++)
      out[k] = mn ? (tmp[k] < out[k] ? tmp[k] : out[k]) : out[k] + tmp[k];
  }
}

int kdp_cohort_reduced_teacher(const kdp_cohort *c, const float *z_all, const int32_t *y,
                               size_t n, float *out, kdp_error *err) {
  const char *fn = "kdp_cohort_reduced_teacher";
  if (!c->ops->contribute)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s has no reduced teacher", fn, c->ops->name);
  if (n > c->maxB) return kdp_fail(err, KDP_EINVAL, "%s: %zu rows > max_batch %zu", fn, n, c->maxB);
  if (n && (!z_all || !out))
    return kdp_fail(err, KDP_EINVAL, "%s: z_all and out are required", fn);
  if (n) reduce_teacher(c, z_all, y, n, out, c->pg);
  return 0;
}

/* ---------------------------------------------------------------- the reference */

/* the whole-batch input of kdp_cohort_objective / kdp_cohort_step */
static int check_batch(const kdp_cohort *c, const kdp_kd_batch *in, const float *dz,
                       const float *dh, const char *fn, kdp_error *err) {
  const kdp_method_ops *o = c->ops;
  if (!in || !in->z || !in->y)
    return kdp_fail(err, KDP_EINVAL, "%s: batch, logits z and labels y are required", fn);
  if (in->B < 1)
    return kdp_fail(err, KDP_EINVAL, "%s: batch %zu outside 1..%zu", fn, in->B, c->maxB);
  int rc = check_rows(c, 1, in->z, in->y, in->B, in->T, in->weight, fn, err);
  if (rc) return rc;
  if (!dz) return kdp_fail(err, KDP_EINVAL, "%s: dz (P x B x C) is required", fn);
  if ((o->module_reads & KDP_READS_FEATURES) && !in->h)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the peers' features h", fn, o->name);
  if (kdp_cohort_feature_grads(c) && !dh)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s returns feature gradients; dh is required",
                    fn, o->name);
  if ((o->peer_reads & KDP_READS_EMA_LOGITS) && !in->z_ema)
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the mean teachers' logits z_ema", fn,
                    o->name);
  if ((o->peer_reads & KDP_READS_EMBEDDINGS) && (!in->v || !in->dv))
    return kdp_fail(err, KDP_EINVAL, "%s: method %s needs the embeddings v and their gradient dv",
                    fn, o->name);
  return 0;
}

/* the module's forward on the whole batch (train mode) or the reduced teacher, into c->tch */
static void batch_teachers(kdp_cohort *c, const kdp_kd_batch *in, const kdp_kd_rows *blk) {
  const kdp_method_ops *o = c->ops;
  if (o->module_reads) {
    o->forward(c, blk, 1, NULL, c->tch);
    memset(c->dtch, 0, c->s.P * in->B * c->s.C * sizeof(float));
  } else if (o->contribute) {
    reduce_teacher(c, in->z, in->y, in->B, c->tch, c->pg);
  }
}

/* peer i's term on the whole batch */
static void batch_peer_loss(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz,
                            kdp_kd_losses *L) {
  const kdp_method_ops *o = c->ops;
  const size_t n = in->B * c->s.C, ti = o->teacher_per_peer ? i * n : 0;
  kdp_kd_peer_in pin = {.z = in->z + i * n,
                        .z_all = in->z,
                        .teacher = (o->module_reads || o->contribute) ? c->tch + ti : NULL,
                        .y = in->y,
                        .n = in->B,
                        .T = in->T,
                        .weight = in->weight,
                        .scale = 1.0f,
                        .burn_in = in->burn_in,
                        .z_ema = in->z_ema,
                        .v_all = in->v,
                        .dv_all = in->dv,
                        .expert = in->expert};
  memset(L, 0, sizeof *L);
  o->peer_loss(c, i, &pin, dz + i * n, kdp_cohort_teacher_grad(c) ? c->dtch + ti : NULL, L);
}

/* the method's teacher on the whole batch after batch_teachers */
static size_t batch_teacher_out(kdp_cohort *c, const kdp_kd_batch *in, const kdp_kd_rows *blk,
                                float *t) {
  const kdp_method_ops *o = c->ops;
  const size_t B = in->B, C = c->s.C;
  if (o->module_reads && !o->teacher_per_peer)
    memcpy(t, c->tch, B * C * sizeof(float));
  else if (o->teacher_eval)
    o->teacher_eval(c, blk, t);
  else
    kdp_ensemble_logprob(t, in->z, c->s.P, B, C);
  return kdp_count_hits(t, in->y, B, C);
}

int kdp_cohort_objective(kdp_cohort *c, const kdp_kd_batch *in, float *dz, float *dh,
                         float *teacher, kdp_kd_losses *per_peer, double *total,
                         kdp_error *err) {
  int rc = check_batch(c, in, dz, dh, "kdp_cohort_objective", err);
  if (rc) return rc;
  const kdp_method_ops *o = c->ops;
  const size_t P = c->s.P;
  const int tgrad = kdp_cohort_teacher_grad(c);
  kdp_kd_rows blk = {.z = in->z, .h = in->h, .y = in->y, .n = in->B, .T = in->T,
                     .weight = in->weight, .scale = 1.0f};
  batch_teachers(c, in, &blk);
  kdp_kd_losses L[KDP_KD_MAX_PEERS];
  double J = 0.0;
  for (size_t i = 0; i < P; i++) {
    batch_peer_loss(c, i, in, dz, &L[i]);
    J += L[i].loss;
  }
  double Lm = o->module_reads ? o->backward(c, &blk, tgrad ? c->dtch : NULL, NULL, dz, dh) : 0.0;
  J += Lm;
  size_t th = teacher ? batch_teacher_out(c, in, &blk, teacher) : 0;
  for (size_t i = 0; i < P; i++) {
    L[i].module_loss = Lm;
    L[i].teacher_correct = th;
    if (per_peer) per_peer[i] = L[i];
  }
  if (total) *total = J;
  return 0;
}

int kdp_cohort_step(kdp_cohort *c, size_t i, const kdp_kd_batch *in, float *dz, float *dh,
                    float *teacher, kdp_kd_losses *out, kdp_error *err) {
  const char *fn = "kdp_cohort_step";
  int rc = check_batch(c, in, dz, dh, fn, err);
  if (rc) return rc;
  if (i >= c->s.P)
    return kdp_fail(err, KDP_EINVAL, "%s: peer %zu outside 0..%zu", fn, i, c->s.P - 1);
  const kdp_method_ops *o = c->ops;
  const size_t P = c->s.P;
  const int tgrad = kdp_cohort_teacher_grad(c);
  kdp_kd_rows blk = {.z = in->z, .h = in->h, .y = in->y, .n = in->B, .T = in->T,
                     .weight = in->weight, .scale = 1.0f / (float)P};
  batch_teachers(c, in, &blk);
  kdp_kd_losses L;
  batch_peer_loss(c, i, in, dz, &L);
  double Lm = o->module_reads ? o->backward(c, &blk, tgrad ? c->dtch : NULL, NULL, dz, dh) : 0.0;
  L.module_loss = Lm * (double)P;
  if (teacher) L.teacher_correct = batch_teacher_out(c, in, &blk, teacher);
  if (out) *out = L;
  return 0;
}
