/* history.c: the dashboard's history: series of points grouped into charts and a ring of events,
   kept by the server for GET /history?since=SEQ (the trainer adds to it, the loop thread renders
   what a client has not seen yet). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "serve_internal.h"

#define MIN_POINTS_CAP 8

void kdp_core_hist_init(kdp_srv_core *core) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  snprintf(core->hist.run_id, sizeof core->hist.run_id, "%lld.%09ld-%ld", (long long)ts.tv_sec,
           ts.tv_nsec, (long)getpid());
  if (core->opt.history_points < MIN_POINTS_CAP) core->opt.history_points = MIN_POINTS_CAP;
}

void kdp_core_hist_free(kdp_srv_core *core) {
  kdp_history *h = &core->hist;
  for (int i = 0; i < h->ns; i++) {
    free(h->s[i].x);
    free(h->s[i].y);
    free(h->s[i].seq);
  }
  h->ns = 0;
}

/* copies s into a fixed buffer, cut at a UTF-8 character boundary */
static void copy_name(char *dst, size_t n, const char *s) {
  size_t len = strlen(s ? s : "");
  if (len >= n) {
    len = n - 1;
    while (len > 0 && ((unsigned char)s[len] & 0xC0) == 0x80) len--; /* a continuation byte */
  }
  if (len) memcpy(dst, s, len);
  dst[len] = 0;
}

void kdp_core_hist_chart(kdp_srv_core *core, const char *id, const char *title, const char *unit,
                         int stacked) {
  kdp_history *h = &core->hist;
  char cid[KDP_HIST_NAME];
  copy_name(cid, sizeof cid, id);
  pthread_mutex_lock(&core->mu);
  int i = 0;
  while (i < h->nc && strcmp(h->charts[i].id, cid) != 0) i++;
  if (i < KDP_HIST_MAX_CHARTS) {
    kdp_hist_chart *c = &h->charts[i];
    memcpy(c->id, cid, sizeof cid);
    copy_name(c->title, sizeof c->title, title && title[0] ? title : cid);
    copy_name(c->unit, sizeof c->unit, unit);
    c->stacked = stacked != 0;
    if (i == h->nc) h->nc++;
  }
  pthread_mutex_unlock(&core->mu);
}

static void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n);
  if (!q) {
    fprintf(stderr, "kdpeers: server out of memory (%zu bytes)\n", n);
    abort();
  }
  return q;
}

/* Halves a full series: keeps the points at even indices and the last one. */
static void decimate(kdp_hist_series *s) {
  size_t k = 0;
  for (size_t i = 0; i < s->n; i += 2, k++) {
    s->x[k] = s->x[i];
    s->y[k] = s->y[i];
    s->seq[k] = s->seq[i];
  }
  if (s->n % 2 == 0) { /* the last point sits at an odd index */
    s->x[k] = s->x[s->n - 1];
    s->y[k] = s->y[s->n - 1];
    s->seq[k] = s->seq[s->n - 1];
    k++;
  }
  s->n = k;
}

void kdp_core_hist_add(kdp_srv_core *core, const char *chart, const char *name, double x,
                       double y) {
  kdp_history *h = &core->hist;
  char cid[KDP_HIST_NAME], nm[KDP_HIST_NAME];
  copy_name(cid, sizeof cid, chart);
  copy_name(nm, sizeof nm, name);
  pthread_mutex_lock(&core->mu);
  int i = 0;
  while (i < h->ns && !(strcmp(h->s[i].name, nm) == 0 && strcmp(h->s[i].chart, cid) == 0)) i++;
  if (i == KDP_HIST_MAX_SERIES) {
    h->dropped++;
    pthread_mutex_unlock(&core->mu);
    return;
  }
  kdp_hist_series *s = &h->s[i];
  if (i == h->ns) {
    memset(s, 0, sizeof *s);
    memcpy(s->chart, cid, sizeof cid);
    memcpy(s->name, nm, sizeof nm);
    h->ns++;
  }
  size_t cap = (size_t)core->opt.history_points;
  if (s->n == cap) decimate(s);
  if (s->n == s->cap) { /* grows by doubling up to cap: a short run keeps little */
    size_t nc = s->cap ? 2 * s->cap : 64;
    if (nc > cap) nc = cap;
    s->x = xrealloc(s->x, nc * sizeof *s->x);
    s->y = xrealloc(s->y, nc * sizeof *s->y);
    s->seq = xrealloc(s->seq, nc * sizeof *s->seq);
    s->cap = nc;
  }
  s->x[s->n] = x;
  s->y[s->n] = y;
  s->seq[s->n] = ++h->seq;
  s->n++;
  pthread_mutex_unlock(&core->mu);
}

void kdp_core_hist_event(kdp_srv_core *core, const char *kind, double x, const char *text) {
  kdp_history *h = &core->hist;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  pthread_mutex_lock(&core->mu);
  int slot = (h->ev_head + h->ev_n) % KDP_HIST_EVENTS;
  if (h->ev_n == KDP_HIST_EVENTS) h->ev_head = (h->ev_head + 1) % KDP_HIST_EVENTS;
  else h->ev_n++;
  kdp_hist_event *e = &h->ev[slot];
  e->seq = ++h->seq;
  e->x = x;
  e->unix_time = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
  copy_name(e->kind, sizeof e->kind, kind);
  copy_name(e->text, sizeof e->text, text);
  pthread_mutex_unlock(&core->mu);
}

/* ---- rendering ---- */

/* a copy of what a client has not seen, taken under the lock and formatted without it */
typedef struct snap_series {
  char chart[KDP_HIST_NAME], name[KDP_HIST_NAME];
  size_t n;
  double *x, *y;
} snap_series;

static void json_num(kdp_buf *b, double v, int g7) {
  char num[40];
  if (!isfinite(v)) {
    kdp_buf_put(b, "null", 4);
    return;
  }
  /* x values (steps) need every digit; y values 7 significant ones */
  int n = g7 ? kdp_fmt_g7(num, v) : snprintf(num, sizeof num, "%.15g", v);
  kdp_buf_put(b, num, (size_t)n);
}

static void render_charts(kdp_buf *b, const kdp_hist_chart *charts, int nc) {
  kdp_buf_put(b, "\"charts\":[", 10);
  for (int i = 0; i < nc; i++) {
    kdp_buf_put(b, i ? ",{\"id\":" : "{\"id\":", i ? 7 : 6);
    kdp_buf_json_str(b, charts[i].id);
    kdp_buf_put(b, ",\"title\":", 9);
    kdp_buf_json_str(b, charts[i].title);
    kdp_buf_put(b, ",\"unit\":", 8);
    kdp_buf_json_str(b, charts[i].unit);
    kdp_buf_printf(b, ",\"stacked\":%s}", charts[i].stacked ? "true" : "false");
  }
  kdp_buf_put(b, "]", 1);
}

void kdp_core_hist_render(kdp_srv_core *core, uint64_t since, kdp_buf *out) {
  kdp_history *h = &core->hist;
  snap_series *ss = NULL;
  kdp_hist_event *ev = NULL;
  kdp_hist_chart charts[KDP_HIST_MAX_CHARTS];
  int ns = 0, nev = 0, nc;
  char *status = NULL, why[sizeof core->unhealthy];
  pthread_mutex_lock(&core->mu);
  uint64_t seq = h->seq, dropped = h->dropped;
  nc = h->nc;
  memcpy(charts, h->charts, (size_t)nc * sizeof *charts);
  if (h->ns) ss = kdp_xcalloc((size_t)h->ns, sizeof *ss);
  for (int i = 0; i < h->ns; i++) {
    const kdp_hist_series *s = &h->s[i];
    size_t lo = 0, hi = s->n; /* the first point newer than since (seq grows along a series) */
    while (lo < hi) {
      size_t mid = lo + (hi - lo) / 2;
      if (s->seq[mid] <= since) lo = mid + 1;
      else hi = mid;
    }
    if (lo == s->n) continue;
    snap_series *d = &ss[ns++];
    memcpy(d->chart, s->chart, sizeof d->chart);
    memcpy(d->name, s->name, sizeof d->name);
    d->n = s->n - lo;
    d->x = kdp_xmalloc(d->n * sizeof(double));
    d->y = kdp_xmalloc(d->n * sizeof(double));
    memcpy(d->x, s->x + lo, d->n * sizeof(double));
    memcpy(d->y, s->y + lo, d->n * sizeof(double));
  }
  if (h->ev_n) ev = kdp_xmalloc((size_t)h->ev_n * sizeof *ev);
  for (int i = 0; i < h->ev_n; i++) {
    const kdp_hist_event *e = &h->ev[(h->ev_head + i) % KDP_HIST_EVENTS];
    if (e->seq > since) ev[nev++] = *e;
  }
  if (core->status) {
    size_t n = strlen(core->status);
    status = kdp_xmalloc(n + 1);
    memcpy(status, core->status, n + 1);
  }
  memcpy(why, core->unhealthy, sizeof why);
  pthread_mutex_unlock(&core->mu);

  kdp_buf_put(out, "{\"run_id\":", 10);
  kdp_buf_json_str(out, h->run_id); /* set before the loop starts, never changed */
  kdp_buf_printf(out, ",\"seq\":%llu,\"since\":%llu,\"dropped_points\":%llu,",
                 (unsigned long long)seq, (unsigned long long)since,
                 (unsigned long long)dropped);
  render_charts(out, charts, nc);
  kdp_buf_put(out, ",\"series\":[", 11);
  for (int i = 0; i < ns; i++) {
    snap_series *d = &ss[i];
    kdp_buf_put(out, i ? ",{\"chart\":" : "{\"chart\":", i ? 10 : 9);
    kdp_buf_json_str(out, d->chart);
    kdp_buf_put(out, ",\"name\":", 8);
    kdp_buf_json_str(out, d->name);
    for (int axis = 0; axis < 2; axis++) {
      const double *v = axis ? d->y : d->x;
      kdp_buf_put(out, axis ? "],\"y\":[" : ",\"x\":[", axis ? 7 : 6);
      for (size_t k = 0; k < d->n; k++) {
        if (k) kdp_buf_put(out, ",", 1);
        json_num(out, v[k], axis);
      }
    }
    kdp_buf_put(out, "]}", 2);
    free(d->x);
    free(d->y);
  }
  free(ss);
  kdp_buf_put(out, "],\"events\":[", 12);
  for (int i = 0; i < nev; i++) {
    kdp_buf_printf(out, "%s{\"seq\":%llu,\"x\":", i ? "," : "", (unsigned long long)ev[i].seq);
    json_num(out, ev[i].x, 0);
    kdp_buf_printf(out, ",\"unix_time\":%.3f,\"kind\":", ev[i].unix_time);
    kdp_buf_json_str(out, ev[i].kind);
    kdp_buf_put(out, ",\"text\":", 8);
    kdp_buf_json_str(out, ev[i].text);
    kdp_buf_put(out, "}", 1);
  }
  free(ev);
  kdp_buf_put(out, "],\"status\":", 11);
  if (status) kdp_buf_put(out, status, strlen(status));
  else kdp_buf_put(out, "{}", 2);
  free(status);
  kdp_buf_put(out, ",\"health\":{\"status\":", 20);
  kdp_buf_put(out, why[0] ? "\"unhealthy\",\"reason\":" : "\"ok\"", why[0] ? 21 : 4);
  if (why[0]) kdp_buf_json_str(out, why);
  kdp_buf_put(out, "}}\n", 3);
}
