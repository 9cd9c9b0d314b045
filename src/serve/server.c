/* server.c: the libuv side of the server: the loop thread, listening socket, per-connection
   sockets and timers, the wake-up from the training thread, loop-lag probe, start and stop. */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <unistd.h>
#include <uv.h>

#include "serve_internal.h"

#define LAG_PERIOD_MS 100
#define LINGER_MS 2000 /* after our FIN, how long a client may keep sending before a hard close */

typedef struct srv_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_shutdown_t shut;
  kdp_http_conn http;
  struct kdp_server *srv;
  struct srv_conn *prev, *next;
  int handles;        /* libuv handles not yet closed */
  int closing;        /* handles being closed */
  int draining;       /* close once the queued writes are sent */
  int shutting;       /* FIN sent, lingering */
  int reading;
  int counted;        /* counts towards connections_open */
  double since;       /* kdp_now() of the last progress: accepted, or a reply fully sent */
  size_t writes, backlog;
  char rbuf[64 * 1024];
} srv_conn;

typedef struct srv_write {
  uv_write_t req;
  srv_conn *c;
  char *buf;
  size_t len;
} srv_write;

struct kdp_server {
  kdp_srv_core *core;
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t async;
  uv_timer_t lag_timer;
  uv_thread_t thread;
  uint64_t lag_expected;
  srv_conn *conns;
  int stopping_now; /* loop thread is shutting down: writes are best-effort and immediate */
  int port;
  char address[128];
};

static void logmsg(const kdp_server *s, const char *what, int rc) {
  if (!s->core->opt.quiet) fprintf(stderr, "kdpeers server: %s: %s\n", what, uv_strerror(rc));
}

/* ---- connections ---- */

static void on_handle_closed(uv_handle_t *h) {
  srv_conn *c = h->data;
  if (--c->handles == 0) free(c);
}

static void conn_close_now(srv_conn *c) {
  if (c->closing) return;
  c->closing = 1;
  kdp_http_conn_release(&c->http);
  if (c->prev) c->prev->next = c->next;
  else c->srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  if (c->counted) {
    pthread_mutex_lock(&c->srv->core->mu);
    c->srv->core->st.connections_open--;
    pthread_mutex_unlock(&c->srv->core->mu);
  }
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  if (c->handles == 2) uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_conn_timer(uv_timer_t *t);

static void on_shutdown(uv_shutdown_t *req, int status) {
  (void)req;
  (void)status; /* the linger timer or the client's EOF closes the connection */
}

static void begin_shutdown(srv_conn *c) {
  if (c->shutting || c->closing) return;
  c->shutting = 1;
  int rc = uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown);
  if (rc == 0) rc = uv_timer_start(&c->timer, on_conn_timer, LINGER_MS, 0);
  if (rc != 0) conn_close_now(c);
}

static void on_write(uv_write_t *req, int status) {
  srv_write *w = (srv_write *)req;
  srv_conn *c = w->c;
  c->writes--;
  c->backlog -= w->len;
  free(w->buf);
  free(w);
  if (c->closing) return;
  if (status < 0) {
    conn_close_now(c);
    return;
  }
  c->since = kdp_now();
  if (c->writes == 0) {
    if (c->draining) begin_shutdown(c);
    else kdp_http_conn_drained(&c->http);
  }
}

static void io_write(kdp_http_conn *h, char *buf, size_t len) {
  srv_conn *c = h->user;
  if (c->closing || c->shutting) {
    free(buf);
    return;
  }
  if (c->srv->stopping_now) { /* best effort: the socket is closed right after */
    uv_buf_t b = uv_buf_init(buf, (unsigned)len);
    (void)uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    free(buf);
    return;
  }
  srv_write *w = kdp_xcalloc(1, sizeof *w);
  w->c = c;
  w->buf = buf;
  w->len = len;
  uv_buf_t b = uv_buf_init(buf, (unsigned)len);
  int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
  if (rc != 0) {
    free(buf);
    free(w);
    conn_close_now(c);
    return;
  }
  c->writes++;
  c->backlog += len;
}

static void io_close(kdp_http_conn *h, int now) {
  srv_conn *c = h->user;
  if (now || c->srv->stopping_now) {
    conn_close_now(c);
    return;
  }
  c->draining = 1;
  if (c->writes == 0) begin_shutdown(c);
}

static void on_conn_timer(uv_timer_t *t) {
  srv_conn *c = t->data;
  if (c->closing) return;
  if (c->shutting || c->draining) conn_close_now(c);
  else kdp_http_conn_timeout(&c->http);
}

static void io_arm_timer(kdp_http_conn *h, double seconds) {
  srv_conn *c = h->user;
  if (c->closing || c->shutting) return;
  uint64_t ms = (uint64_t)(seconds * 1000.0);
  int rc = uv_timer_start(&c->timer, on_conn_timer, ms ? ms : 1, 0);
  if (rc != 0) {
    logmsg(c->srv, "uv_timer_start", rc);
    conn_close_now(c);
  }
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  srv_conn *c = h->data;
  *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  srv_conn *c = st->data;
  if (c->closing) return;
  if (nread < 0) { /* EOF or error */
    conn_close_now(c);
    return;
  }
  if (nread == 0 || c->draining || c->shutting) return; /* discard after the last reply */
  kdp_http_conn_feed(&c->http, buf->base, (size_t)nread);
}

static void io_pause_input(kdp_http_conn *h, int pause) {
  srv_conn *c = h->user;
  if (c->closing) return;
  int rc = 0;
  if (pause && c->reading) {
    rc = uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
  } else if (!pause && !c->reading) {
    rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    c->reading = rc == 0;
  }
  if (rc != 0) {
    logmsg(c->srv, pause ? "uv_read_stop" : "uv_read_start", rc);
    conn_close_now(c);
  }
}

static size_t io_backlog(kdp_http_conn *h) { return ((srv_conn *)h->user)->backlog; }

static const kdp_http_io srv_io = {io_write, io_close, io_arm_timer, io_pause_input, io_backlog};

/* The counted connection to close for a newcomer: one already closing its side first, else the
   least recently active; none waiting for a prediction (NULL if every one is). */
static srv_conn *pick_victim(kdp_server *s, const srv_conn *newcomer) {
  srv_conn *best = NULL;
  for (srv_conn *c = s->conns; c; c = c->next) {
    if (c == newcomer || c->closing || !c->counted || c->http.pending) continue;
    if (c->shutting || c->draining) return c;
    if (!best || c->since < best->since) best = c;
  }
  return best;
}

static void on_connection(uv_stream_t *server, int status) {
  kdp_server *s = server->data;
  if (status < 0) {
    logmsg(s, "accept", status);
    return;
  }
  srv_conn *c = kdp_xcalloc(1, sizeof *c);
  c->srv = s;
  int rc = uv_tcp_init(&s->loop, &c->tcp);
  if (rc != 0) {
    logmsg(s, "uv_tcp_init", rc);
    free(c);
    return;
  }
  c->tcp.data = c;
  c->handles = 1;
  c->next = s->conns;
  if (s->conns) s->conns->prev = c;
  s->conns = c;
  kdp_http_conn_init(&c->http, s->core, &srv_io, c);
  rc = uv_accept(server, (uv_stream_t *)&c->tcp);
  if (rc == 0) {
    rc = uv_timer_init(&s->loop, &c->timer);
    if (rc == 0) {
      c->timer.data = c;
      c->handles = 2;
    }
  }
  if (rc != 0) {
    logmsg(s, "accept", rc);
    conn_close_now(c);
    return;
  }
  (void)uv_tcp_nodelay(&c->tcp, 1); /* latency only; failure is harmless */
  c->since = kdp_now();
  kdp_srv_core *core = s->core;
  pthread_mutex_lock(&core->mu);
  int full = core->st.connections_open >= core->opt.max_connections;
  pthread_mutex_unlock(&core->mu);
  /* A full pool makes room by closing the connection that made progress least recently and is
     not waiting for a prediction: a slow or idle client, never the newcomer. */
  srv_conn *victim = full ? pick_victim(s, c) : NULL;
  if (victim) {
    conn_close_now(victim);
    pthread_mutex_lock(&core->mu);
    core->st.connections_evicted++;
    pthread_mutex_unlock(&core->mu);
  }
  pthread_mutex_lock(&core->mu);
  core->st.connections_total++;
  int over = core->st.connections_open >= core->opt.max_connections;
  if (over) core->st.connections_rejected++;
  else core->st.connections_open++;
  pthread_mutex_unlock(&core->mu);
  c->counted = !over;
  if (over) {
    kdp_http_error(&c->http, 503, 1, "too many connections (server.max_connections = %d)",
                   core->opt.max_connections);
    return;
  }
  io_arm_timer(&c->http, core->opt.idle_timeout);
  if (!c->closing) io_pause_input(&c->http, 0);
}

/* ---- loop thread ---- */

static void on_lag_timer(uv_timer_t *t) {
  kdp_server *s = t->data;
  uint64_t now = uv_hrtime();
  double lag = now > s->lag_expected ? (double)(now - s->lag_expected) * 1e-9 : 0.0;
  s->lag_expected = now + (uint64_t)LAG_PERIOD_MS * 1000000u;
  pthread_mutex_lock(&s->core->mu);
  s->core->st.loop_lag_seconds = lag;
  if (lag > s->core->st.loop_lag_max_seconds) s->core->st.loop_lag_max_seconds = lag;
  pthread_mutex_unlock(&s->core->mu);
}

static void on_plain_closed(uv_handle_t *h) { (void)h; }

static void begin_stop(kdp_server *s) {
  s->stopping_now = 1;
  while (s->conns) { /* each call unlinks the head */
    srv_conn *c = s->conns;
    kdp_http_conn_shutdown(&c->http); /* 503 to a pending prediction */
    conn_close_now(c);
  }
  uv_close((uv_handle_t *)&s->listener, on_plain_closed);
  uv_close((uv_handle_t *)&s->lag_timer, on_plain_closed);
  uv_close((uv_handle_t *)&s->async, on_plain_closed);
}

static void on_async(uv_async_t *a) {
  kdp_server *s = a->data;
  kdp_core_drain_done(s->core); /* sends coalesce: drain everything each time */
  pthread_mutex_lock(&s->core->mu);
  int stop = s->core->stopping;
  pthread_mutex_unlock(&s->core->mu);
  if (stop && !s->stopping_now) begin_stop(s);
}

static void wake(void *arg) {
  kdp_server *s = arg;
  int rc = uv_async_send(&s->async);
  if (rc != 0) logmsg(s, "uv_async_send", rc);
}

/* Linux 6.12+ (EEVDF) lets any SCHED_OTHER thread ask for a shorter time slice (sched_attr's
   sched_runtime, at least 0.1 ms, no privilege needed), and a waking thread with a shorter slice
   preempts the running one instead of waiting up to a full slice (1-3 ms) for it. The loop
   thread sleeps almost always and runs for microseconds: with every core busy training, it can
   then read a request or send a reply without waiting for a busy rank's slice to end (64-image
   /predict median here 4.1-4.9 ms without, 2.8-3.0 ms with). Older kernels ignore sched_runtime for
   SCHED_OTHER; policy and nice are kept as they are; failure is harmless. */
static void short_time_slice(void) {
#ifdef SYS_sched_setattr
  struct {
    uint32_t size, policy;
    uint64_t flags;
    int32_t nice;
    uint32_t priority;
    uint64_t runtime, deadline, period;
  } a;
  memset(&a, 0, sizeof a);
  if (syscall(SYS_sched_getattr, 0, &a, (unsigned)sizeof a, 0) != 0) return;
  if (a.policy != 0 /* SCHED_OTHER */) return;
  a.size = (uint32_t)sizeof a;
  a.flags = 0;
  a.runtime = 100000; /* ns */
  (void)syscall(SYS_sched_setattr, 0, &a, 0);
#endif
}

static void loop_main(void *arg) {
  kdp_server *s = arg;
  /* A write to a socket the client has closed raises SIGPIPE in the writing thread, and libuv
     writes with plain write(2): blocked here, the signal stays pending on this thread and the
     write fails with EPIPE instead of killing the process (main() also ignores SIGPIPE). */
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, NULL);
#ifdef PR_SET_NAME
  (void)prctl(PR_SET_NAME, "kdp-server", 0, 0, 0); /* in top -H and /proc/PID/task/TID/comm */
#endif
  short_time_slice();
  int rc = uv_run(&s->loop, UV_RUN_DEFAULT);
  (void)rc; /* returns once every handle is closed (after begin_stop) */
}

/* ---- public API ---- */

static int resolve_listen(const char *listen, int port, struct sockaddr_storage *ss,
                          int *loopback, kdp_error *err) {
  char host[64];
  if (strcmp(listen, "localhost") == 0) listen = "127.0.0.1";
  size_t n = strlen(listen);
  if (n >= sizeof host)
    return kdp_fail(err, KDP_EINVAL, "server.listen '%.80s' is too long", listen);
  memcpy(host, listen, n + 1);
  if (host[0] == '[' && n > 2 && host[n - 1] == ']') {
    memmove(host, host + 1, n - 2);
    host[n - 2] = 0;
  }
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
  if (uv_ip4_addr(host, port, a4) == 0) {
    *loopback = (ntohl(a4->sin_addr.s_addr) >> 24) == 127;
    return 0;
  }
  if (uv_ip6_addr(host, port, a6) == 0) {
    static const unsigned char lo6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
    *loopback = memcmp(&a6->sin6_addr, lo6, 16) == 0;
    return 0;
  }
  return kdp_fail(err, KDP_EINVAL,
                  "server.listen '%s' is not a numeric IPv4/IPv6 address (e.g. 127.0.0.1, ::1, "
                  "0.0.0.0)",
                  listen);
}

/* resolve_listen, and a non-loopback address needs a token */
static int check_listen(const char *listen, int port, const char *token,
                        struct sockaddr_storage *ss, kdp_error *err) {
  int loopback = 0;
  int rc = resolve_listen(listen, port, ss, &loopback, err);
  if (rc == 0 && !loopback && !(token && token[0]))
    rc = kdp_fail(err, KDP_EINVAL,
                  "refusing to listen on non-loopback address %s without server.token: anyone "
                  "who reaches it could stop the run; set server.token or use 127.0.0.1",
                  listen);
  return rc;
}

static int write_addr_file(const char *path, const char *address, kdp_error *err) {
  char tmp[4096];
  if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp)
    return kdp_fail(err, KDP_EINVAL, "server addr_file path too long: %.80s...", path);
  FILE *f = fopen(tmp, "w");
  if (!f) return kdp_fail(err, KDP_EIO, "cannot write '%s': %s", tmp, strerror(errno));
  int ok = fprintf(f, "%s\n", address) > 0;
  ok = (fclose(f) == 0) && ok;
  if (!ok || rename(tmp, path) != 0) {
    remove(tmp);
    return kdp_fail(err, KDP_EIO, "cannot write '%s': %s", path, strerror(errno));
  }
  return 0;
}

/* Closes whatever start() managed to open and frees s. */
static void abort_start(kdp_server *s, int loop_ok) {
  if (loop_ok) {
    /* a handle's loop pointer is set by its init call */
    if (s->listener.loop && !uv_is_closing((uv_handle_t *)&s->listener))
      uv_close((uv_handle_t *)&s->listener, on_plain_closed);
    if (s->lag_timer.loop && !uv_is_closing((uv_handle_t *)&s->lag_timer))
      uv_close((uv_handle_t *)&s->lag_timer, on_plain_closed);
    if (s->async.loop && !uv_is_closing((uv_handle_t *)&s->async))
      uv_close((uv_handle_t *)&s->async, on_plain_closed);
    (void)uv_run(&s->loop, UV_RUN_DEFAULT);
    (void)uv_loop_close(&s->loop);
  }
  kdp_core_free(s->core);
  free(s);
}

#define UVCHECK(call, what)                                                                    \
  do {                                                                                         \
    int rc_ = (call);                                                                          \
    if (rc_ != 0) {                                                                            \
      kdp_fail(err, KDP_EIO, "server: %s failed for %s:%d: %s", what, core->opt.listen,         \
               o->port, uv_strerror(rc_));                                                     \
      abort_start(s, 1);                                                                       \
      return KDP_EIO;                                                                          \
    }                                                                                          \
  } while (0)

int kdp_server_start(kdp_server **out, const kdp_server_options *o, kdp_error *err) {
  *out = NULL;
  if (o->port < 0 || o->port > 65535)
    return kdp_fail(err, KDP_EINVAL, "server.port %d is out of range (0..65535, 0 = any)", o->port);
  kdp_srv_core *core = kdp_core_new(o);
  struct sockaddr_storage ss;
  int rc = check_listen(core->opt.listen, o->port, core->token, &ss, err);
  if (rc != 0) {
    kdp_core_free(core);
    return rc;
  }
  kdp_server *s = kdp_xcalloc(1, sizeof *s);
  s->core = core;
  rc = uv_loop_init(&s->loop);
  if (rc != 0) {
    kdp_fail(err, KDP_EIO, "server: uv_loop_init: %s", uv_strerror(rc));
    abort_start(s, 0);
    return KDP_EIO;
  }
  UVCHECK(uv_tcp_init(&s->loop, &s->listener), "uv_tcp_init");
  s->listener.data = s;
  UVCHECK(uv_tcp_bind(&s->listener, (const struct sockaddr *)&ss, 0), "bind");
  UVCHECK(uv_listen((uv_stream_t *)&s->listener, 128, on_connection), "listen");
  struct sockaddr_storage bound;
  int len = sizeof bound;
  UVCHECK(uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len), "getsockname");
  char host[64] = "";
  if (bound.ss_family == AF_INET6) {
    UVCHECK(uv_ip6_name((struct sockaddr_in6 *)&bound, host, sizeof host), "uv_ip6_name");
    s->port = ntohs(((struct sockaddr_in6 *)&bound)->sin6_port);
    snprintf(s->address, sizeof s->address, "http://[%s]:%d", host, s->port);
  } else {
    UVCHECK(uv_ip4_name((struct sockaddr_in *)&bound, host, sizeof host), "uv_ip4_name");
    s->port = ntohs(((struct sockaddr_in *)&bound)->sin_port);
    snprintf(s->address, sizeof s->address, "http://%s:%d", host, s->port);
  }
  UVCHECK(uv_async_init(&s->loop, &s->async, on_async), "uv_async_init");
  s->async.data = s;
  UVCHECK(uv_timer_init(&s->loop, &s->lag_timer), "uv_timer_init");
  s->lag_timer.data = s;
  s->lag_expected = uv_hrtime() + (uint64_t)LAG_PERIOD_MS * 1000000u;
  UVCHECK(uv_timer_start(&s->lag_timer, on_lag_timer, LAG_PERIOD_MS, LAG_PERIOD_MS),
          "uv_timer_start");
  if (core->addr_file && write_addr_file(core->addr_file, s->address, err) != 0) {
    abort_start(s, 1);
    return KDP_EIO;
  }
  core->wake = wake;
  core->wake_arg = s;
  UVCHECK(uv_thread_create(&s->thread, loop_main, s), "uv_thread_create");
  if (!core->opt.quiet)
    fprintf(stderr, "kdpeers server: listening on %s%s\n", s->address,
            core->token ? " (token required for /control and /predict)" : "");
  *out = s;
  return 0;
}

void kdp_server_stop(kdp_server *s) {
  if (!s) return;
  pthread_mutex_lock(&s->core->mu);
  s->core->stopping = 1;
  pthread_mutex_unlock(&s->core->mu);
  wake(s);
  int rc = uv_thread_join(&s->thread);
  if (rc != 0) logmsg(s, "uv_thread_join", rc);
  rc = uv_loop_close(&s->loop);
  if (rc != 0) logmsg(s, "uv_loop_close (a handle was left open)", rc);
  if (s->core->addr_file) remove(s->core->addr_file);
  kdp_core_free(s->core);
  free(s);
}

const char *kdp_server_address(const kdp_server *s) { return s ? s->address : ""; }
int kdp_server_port(const kdp_server *s) { return s ? s->port : 0; }

void kdp_server_publish(kdp_server *s, const char *metrics_text, const char *status_json) {
  kdp_core_publish(s->core, metrics_text, status_json);
}

void kdp_server_set_health(kdp_server *s, const char *reason) {
  pthread_mutex_lock(&s->core->mu);
  /* the reason goes into a JSON string as it is: keep it plain text */
  size_t n = 0;
  for (const char *p = reason ? reason : ""; *p && n + 1 < sizeof s->core->unhealthy; p++)
    s->core->unhealthy[n++] = *p == '"' || *p == '\\' || (unsigned char)*p < 0x20 ? ' ' : *p;
  s->core->unhealthy[n] = 0;
  pthread_mutex_unlock(&s->core->mu);
}

int kdp_server_poll_command(kdp_server *s, kdp_command *out) {
  return kdp_core_poll_command(s->core, out);
}

kdp_predict_req *kdp_server_take_predict(kdp_server *s) { return kdp_core_take_predict(s->core); }

int kdp_server_predict_waiting(kdp_server *s) {
  pthread_mutex_lock(&s->core->mu);
  int n = s->core->pending_predicts;
  pthread_mutex_unlock(&s->core->mu);
  return n;
}

int kdp_server_answer_predict(kdp_server *s, kdp_predict_req *req, const kdp_predict_result *r) {
  return kdp_core_answer_predict(s->core, req, r);
}

void kdp_server_fail_predict(kdp_server *s, kdp_predict_req *req, int status, const char *msg) {
  kdp_core_fail_predict(s->core, req, status, msg);
}

int kdp_server_wait_delivered(kdp_server *s, double max_seconds) {
  return kdp_core_wait_delivered(s->core, max_seconds);
}

void kdp_server_get_stats(kdp_server *s, kdp_server_stats *out) {
  pthread_mutex_lock(&s->core->mu);
  *out = s->core->st;
  pthread_mutex_unlock(&s->core->mu);
}

void kdp_server_history_chart(kdp_server *s, const char *id, const char *title, const char *unit,
                              int stacked) {
  kdp_core_hist_chart(s->core, id, title, unit, stacked);
}

void kdp_server_history_add(kdp_server *s, const char *chart, const char *name, double x,
                            double y) {
  kdp_core_hist_add(s->core, chart, name, x, y);
}

void kdp_server_history_event(kdp_server *s, const char *kind, double x, const char *text) {
  kdp_core_hist_event(s->core, kind, x, text);
}
