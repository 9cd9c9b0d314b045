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

/* element-wise, on the team of threads (par.h) */
void kdp_sgd_step(kdp_sgd *o, float *restrict p, const float *restrict g, float lr) {
  const float mu = o->momentum, wd = o->weight_decay;
  float *restrict buf = o->buf;
  const size_t n = o->n;
  const int nesterov = o->nesterov, first = o->n_steps == 0;
  const int nt = kdp_par_team(n);
  double t0 = kdp_par_tic();
  if (mu == 0.0f) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) p[i] -= lr * (g[i] + wd * p[i]);
  } else if (first) {
    /* PyTorch: the momentum buffer starts as a copy of the first gradient */
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      buf[i] = d;
      p[i] -= lr * (nesterov ? d + mu * d : d);
    }
  } else if (nesterov) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      float b = mu * buf[i] + d;
      buf[i] = b;
      p[i] -= lr * (d + mu * b);
    }
  } else {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (size_t i = 0; i < n; i++) {
      float d = g[i] + wd * p[i];
      float b = mu * buf[i] + d;
      buf[i] = b;
      p[i] -= lr * b;
    }
  }
  kdp_par_toc(t0, n);
  o->n_steps++;
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
