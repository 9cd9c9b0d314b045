/* optim.c: SGD with momentum/Nesterov/weight decay (PyTorch semantics) and lr schedules. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/nn.h"
#include "par.h"

void kdp_sgd_init(kdp_sgd *o, size_t n, float momentum, float weight_decay, int nesterov) {
  memset(o, 0, sizeof *o);
  o->n = n;
  o->momentum = momentum;
  o->weight_decay = weight_decay;
  o->nesterov = nesterov;
  o->buf = kdp_falloc(n);
}

void kdp_sgd_free(kdp_sgd *o) {
  free(o->buf);
  o->buf = NULL;
}

typedef struct sgd_ctx {
  const kdp_sgd *o;
  float *p;
  const float *g;
  float lr;
  size_t base; /* the range's first element */
} sgd_ctx;

void kdp_sgd_apply(const kdp_sgd *o, float *restrict p, float *restrict buf,
                   const float *restrict g, float lr, size_t n) {
  const float mu = o->momentum, wd = o->weight_decay;
  if (mu == 0.0f) {
    for (size_t i = 0; i < n; i++) p[i] -= lr * (g[i] + wd * p[i]);
  } else if (o->n_steps == 0) {
    /* PyTorch: the momentum buffer starts as a copy of the first gradient */
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      buf[i] = d;
      p[i] -= lr * (o->nesterov ? d + mu * d : d);
    }
  } else if (o->nesterov) {
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      float b = mu * buf[i] + d;
      buf[i] = b;
      p[i] -= lr * (d + mu * b);
    }
  } else {
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      float b = mu * buf[i] + d;
      buf[i] = b;
      p[i] -= lr * b;
    }
  }
}

static void sgd_range(void *ctx, size_t lo, size_t hi) {
  const sgd_ctx *c = ctx;
  lo += c->base;
  hi += c->base;
  kdp_sgd_apply(c->o, c->p + lo, c->o->buf + lo, c->g + lo, c->lr, hi - lo);
}

/* element-wise, on the team of threads (par.h); the items depend on hi - lo only */
void kdp_sgd_update(kdp_sgd *o, float *p, const float *g, float lr, size_t lo, size_t hi) {
  sgd_ctx c = {o, p, g, lr, lo};
  kdp_par_elems(hi - lo, hi - lo, sgd_range, &c);
}

void kdp_sgd_step_ranges(kdp_sgd *o, float *p, const float *g, float lr, const size_t *lo_hi,
                         size_t n) {
  for (size_t k = 0; k < n; k++) kdp_sgd_update(o, p, g, lr, lo_hi[2 * k], lo_hi[2 * k + 1]);
  o->n_steps++;
}

typedef struct fused_sgd {
  kdp_sgd *o;
  float *p;
  const float *g;
  float lr;
  size_t done; /* [done, n) have taken their step */
} fused_sgd;

static void fused_ready(void *ctx, size_t ready) {
  fused_sgd *f = ctx;
  if (ready >= f->done) return;
  kdp_sgd_update(f->o, f->p, f->g, f->lr, ready, f->done);
  f->done = ready;
}

void kdp_model_backward_sgd(kdp_model *m, const float *dlogits, const float *dfeatures, kdp_sgd *o,
                            float lr) {
  if (o->n != kdp_model_n_params(m))
    kdp_die("internal error: an optimizer of %zu values for a model of %zu parameters", o->n,
            kdp_model_n_params(m));
  fused_sgd f = {o, kdp_model_params(m), kdp_model_grads(m), lr, o->n};
  kdp_model_backward_set_each(m, dlogits, dfeatures, fused_ready, &f);
  fused_ready(&f, 0); /* what became final only at the end */
  o->n_steps++;
}

void kdp_sgd_step(kdp_sgd *o, float *p, const float *g, float lr) {
  const size_t all[2] = {0, o->n};
  kdp_sgd_step_ranges(o, p, g, lr, all, 1);
}

double kdp_schedule_lr(const kdp_schedule *s, int64_t step) {
  double lr = s->base_lr;
  int64_t warm = (int64_t)llround(s->warmup_epochs * (double)s->steps_per_epoch);
  if (warm > 0 && step < warm) return lr * (double)(step + 1) / (double)warm;
  switch (s->kind) {
    case KDP_SCHEDULE_CONSTANT:
      return lr;
    case KDP_SCHEDULE_COSINE: {
      /* CosineAnnealingLR(T_max = steps after warm-up, eta_min = 0), stepped every step */
      int64_t T = s->total_steps - warm;
      if (T <= 0) return lr;
      double t = (double)(step - warm);
      if (t > (double)T) t = (double)T;
      return 0.5 * lr * (1.0 + cos(M_PI * t / (double)T));
    }
    case KDP_SCHEDULE_MULTISTEP: {
      /* MultiStepLR with milestones in epochs: lr * gamma^(milestones passed) */
      double epoch = s->steps_per_epoch > 0 ? (double)step / (double)s->steps_per_epoch : 0;
      for (int i = 0; i < s->n_milestones; i++)
        if (epoch >= s->milestones[i] - 1e-9) lr *= s->gamma;
      return lr;
    }
  }
  return lr;
}
