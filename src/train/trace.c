/* trace.c: run.timeline = true records the phases of every step and writes a Chrome trace
   (chrome://tracing, Perfetto) per rank: run.dir/timeline-rankNNN.json. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "train_internal.h"

#define TRACE_CAP (1u << 20) /* events kept; later ones are counted as dropped */

struct kdp_trace {
  struct {
    const char *name;
    double t0, t1;
  } *ev;
  size_t n, dropped;
  double origin;
};

void kdp_trace_start(kdp_trainer *t) {
  if (!t->cfg->timeline) return;
  kdp_trace *tr = kdp_xcalloc(1, sizeof *tr);
  tr->ev = kdp_xcalloc(TRACE_CAP, sizeof *tr->ev);
  tr->origin = kdp_now();
  t->trace = tr;
}

void kdp_trace_mark(kdp_trainer *t, const char *name, double t0, double t1) {
  kdp_trace *tr = t->trace;
  if (!tr) return;
  if (tr->n == TRACE_CAP) {
    tr->dropped++;
    return;
  }
  tr->ev[tr->n].name = name;
  tr->ev[tr->n].t0 = t0;
  tr->ev[tr->n].t1 = t1;
  tr->n++;
}

int kdp_trace_finish(kdp_trainer *t, kdp_error *err) {
  kdp_trace *tr = t->trace;
  if (!tr) return 0;
  char path[KDP_PATH + 64];
  snprintf(path, sizeof path, "%s/timeline-rank%03d.json", t->cfg->dir, t->d->world_rank);
  FILE *f = fopen(path, "w");
  int rc = 0;
  if (!f) {
    rc = kdp_fail(err, KDP_EIO, "cannot write the timeline '%s': %s", path, strerror(errno));
  } else {
    /* complete events ("X"), microseconds; pid = rank so ranks line up in one view */
    fprintf(f, "{\"displayTimeUnit\":\"ms\",\"otherData\":{\"rank\":%d,\"peer\":%d,\"dropped\":%zu},"
               "\"traceEvents\":[\n",
            t->d->world_rank, t->d->peer, tr->dropped);
    fprintf(f, "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":%d,\"args\":{\"name\":\"rank %d "
               "(peer %d)\"}}",
            t->d->world_rank, t->d->world_rank, t->d->peer);
    for (size_t i = 0; i < tr->n; i++)
      fprintf(f, ",\n{\"name\":\"%s\",\"ph\":\"X\",\"pid\":%d,\"tid\":0,\"ts\":%.3f,\"dur\":%.3f}",
              tr->ev[i].name, t->d->world_rank, (tr->ev[i].t0 - tr->origin) * 1e6,
              (tr->ev[i].t1 - tr->ev[i].t0) * 1e6);
    fputs("\n]}\n", f);
    if (fclose(f) != 0) rc = kdp_fail(err, KDP_EIO, "cannot write the timeline '%s'", path);
  }
  free(tr->ev);
  free(tr);
  t->trace = NULL;
  return rc;
}
