/* stall.c: the stall check. A rank that stops making progress (stopped, hung, swapping) leaves
   the others waiting in a collective forever. Two parts watch for that:

   - A watchdog thread on every rank (no MPI calls: the MPI library is used by the training
     thread only) reads which collective the training thread waits in (kdp_dist.waiting_in, set
     around every blocking collective) and for how long. On rank 0, after run.stall_warn_seconds
     it warns, makes /healthz answer 503 and sets kdpeers_stalled; after
     run.stall_abort_seconds it ends the job (exit 1). The other ranks end it a little later when
     rank 0 did not (rank 0 may be the stalled one).
   - The step's agreement point is a non-blocking allreduce the training thread tests in a loop
     (kdp_dist_step_sync), calling the wait hook below: a rank that has waited there a quarter of
     the warning time (at most 1 s) tells rank 0 so, and rank 0 lists the ranks that have not
     told it: the late ranks, named in the warning. Waiting anywhere else, rank 0 cannot name
     them (the others cannot report from inside a blocking collective) and says where it waits.

   While no rank is late neither part does anything but read two atomics every 0.1 s. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "train_internal.h"

#define TICK_SECONDS 0.1
/* the other ranks end the job this much after rank 0 would have */
#define ABORT_GRACE_SECONDS 10.0
#define MAX_NAMED 16

typedef struct stall {
  kdp_trainer *t; /* the watchdog reads only cfg, d's atomics and tty, set before it starts */
  double warn, abort_after, report_after;
  pthread_t thread;
  atomic_int running;
  /* the late ranks at the agreement point, found by the training thread (wait hook) */
  pthread_mutex_t mu;
  char late[256];       /* "rank 1", "ranks 1, 3" ("" = not known) */
  uint_fast64_t late_wait; /* d->waits of the wait they were found in */
  long long late_step;
  double next_check;    /* the hook's next look for them (seconds waited) */
  unsigned char *arrived;
} stall;

/* ---- the training thread: the wait hook at the agreement point ---- */

static void on_wait(void *ctx, kdp_dist *d, double waited, int done) {
  stall *s = ctx;
  if (done) {
    s->next_check = 0;
    return;
  }
  if (d->world_rank != 0) {
    if (waited >= s->report_after) kdp_dist_report_waiting(d);
    return;
  }
  if (waited < s->next_check) return;
  s->next_check = waited + 0.25;
  int n = kdp_dist_waiting_ranks(d, s->arrived), named = 0;
  char late[sizeof s->late] = "";
  size_t used = n ? (size_t)snprintf(late, sizeof late, "rank%s", n == 1 ? "" : "s") : 0;
  for (int r = 0; n && r < d->world_size && used < sizeof late; r++) {
    if (s->arrived[r]) continue;
    if (named++ == MAX_NAMED) {
      snprintf(late + used, sizeof late - used, " and %d more", n - MAX_NAMED);
      break;
    }
    used += (size_t)snprintf(late + used, sizeof late - used, "%s %d", named > 1 ? "," : "", r);
  }
  pthread_mutex_lock(&s->mu);
  memcpy(s->late, late, sizeof late);
  s->late_wait = atomic_load_explicit(&d->waits, memory_order_relaxed);
  s->late_step = (long long)s->t->step + 1;
  pthread_mutex_unlock(&s->mu);
}

/* ---- the watchdog thread ---- */

static const char *cr(const kdp_trainer *t) { return t->tty > 0 ? "\r\033[K" : ""; }

/* What rank 0 knows about a wait of `waited` seconds in `where` (wait number `wait`). */
static void describe(stall *s, const char *where, uint_fast64_t wait, double waited, char *out,
                     size_t n) {
  char late[sizeof s->late];
  long long step;
  pthread_mutex_lock(&s->mu);
  int known = s->late_wait == wait && s->late[0];
  memcpy(late, s->late, sizeof late);
  step = s->late_step;
  pthread_mutex_unlock(&s->mu);
  if (known)
    snprintf(out, n, "%s %s not reached the agreement point of step %lld after %.0f s", late,
             strncmp(late, "ranks", 5) == 0 ? "have" : "has", step, waited);
  else if (strcmp(where, KDP_DIST_AGREEMENT) == 0)
    snprintf(out, n, "ranks late at %s by %.0f s", where, waited);
  else
    snprintf(out, n, "rank 0 waits in %s for %.0f s: some rank makes no progress (kdpeers names "
                     "the late ranks only at a step's agreement point)",
             where, waited);
}

static void end_job(stall *s, const char *where, uint_fast64_t wait, double waited) {
  kdp_trainer *t = s->t;
  char what[512];
  if (t->d->world_rank == 0) {
    describe(s, where, wait, waited, what, sizeof what);
    fprintf(stderr,
            "%skdpeers: %s; run.stall_abort_seconds = %g: ending the job (exit 1). Rerunning "
            "resumes from the newest checkpoint\n",
            cr(t), what, s->abort_after);
    kdp_rundir_release_now();
  } else {
    fprintf(stderr,
            "kdpeers: rank %d has waited in %s for %.0f s, longer than run.stall_abort_seconds = "
            "%g, and rank 0 did not end the job (it may be the stalled one): ending it (exit 1)\n",
            t->d->world_rank, where, waited, s->abort_after);
  }
  fflush(stderr);
  /* the training thread is inside MPI: this thread may not call it; mpirun ends the others */
  _exit(1);
}

static void *watchdog(void *arg) {
  stall *s = arg;
  kdp_trainer *t = s->t;
  kdp_dist *d = t->d;
  int root = d->world_rank == 0, warned = 0;
  uint_fast64_t wait = 0;
  double waited = 0, last = kdp_now(), next_note = 0;
  const struct timespec tick = {0, (long)(TICK_SECONDS * 1e9)};
  while (atomic_load(&s->running)) {
    nanosleep(&tick, NULL);
    double now = kdp_now(), gap = now - last;
    last = now;
    const char *where = atomic_load_explicit(&d->waiting_in, memory_order_acquire);
    uint_fast64_t w = atomic_load_explicit(&d->waits, memory_order_relaxed);
    if (!where || w != wait) { /* not waiting, or a new wait: the last one ended */
      if (warned)
        fprintf(stderr, "%skdpeers: the late ranks caught up after %.0f s; training goes on\n",
                cr(t), waited);
      if (warned) kdp_live_stalled(t, NULL);
      warned = 0;
      waited = 0;
      next_note = 0;
      wait = where ? w : 0;
      continue;
    }
    /* a longer gap is this process not running (stopped, suspended): not the others' lateness */
    waited += gap < 0.5 ? gap : 0.5;
    if (s->abort_after > 0 && waited >= s->abort_after + (root ? 0 : ABORT_GRACE_SECONDS))
      end_job(s, where, wait, waited);
    if (!root || s->warn <= 0 || waited < s->warn || waited < next_note) continue;
    char what[512];
    describe(s, where, wait, waited, what, sizeof what);
    if (!warned)
      fprintf(stderr,
              "%skdpeers: WARNING: %s (run.stall_warn_seconds = %g): /healthz answers 503 and "
              "kdpeers_stalled is 1 until the job moves on%s\n",
              cr(t), what, s->warn,
              s->abort_after > 0 ? "; it ends at run.stall_abort_seconds" : "");
    warned = 1;
    kdp_live_stalled(t, what);
    next_note = waited + 1.0; /* keep the reason's seconds and names current */
  }
  if (warned) kdp_live_stalled(t, NULL);
  return NULL;
}

void kdp_stall_start(kdp_trainer *t) {
  const kdp_config *c = t->cfg;
  double base = c->stall_warn_seconds > 0 ? c->stall_warn_seconds : c->stall_abort_seconds;
  if (base <= 0 || t->d->world_size <= 1) return;
  stall *s = kdp_xcalloc(1, sizeof *s);
  s->t = t;
  s->warn = c->stall_warn_seconds;
  s->abort_after = c->stall_abort_seconds;
  s->report_after = base / 4 < 1.0 ? base / 4 : 1.0;
  s->arrived = kdp_xcalloc((size_t)t->d->world_size, 1);
  pthread_mutex_init(&s->mu, NULL);
  atomic_store(&s->running, 1);
  if (pthread_create(&s->thread, NULL, watchdog, s) != 0) {
    fprintf(stderr, "kdpeers: warning: no stall check (cannot start its thread)\n");
    pthread_mutex_destroy(&s->mu);
    free(s->arrived);
    free(s);
    return;
  }
  t->d->wait_ctx = s;
  t->d->on_wait = on_wait;
}

void kdp_stall_stop(kdp_trainer *t) {
  stall *s = t->d->wait_ctx;
  if (t->d->on_wait != on_wait || !s) return;
  t->d->on_wait = NULL;
  t->d->wait_ctx = NULL;
  atomic_store(&s->running, 0);
  pthread_join(s->thread, NULL);
  pthread_mutex_destroy(&s->mu);
  free(s->arrived);
  free(s);
}
