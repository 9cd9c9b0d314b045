/* core.c: the state the loop thread shares with the training thread: the published snapshot,
   the command and prediction queues and the counters, all behind one briefly-held mutex. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve_internal.h"

const char *const kdp_path_names[KDP_NPATHS] = {
    "/metrics", "/status", "/healthz", "/control", "/predict", "/", "/history", "/assets/", "other"};

/* ---- buffers ---- */

void kdp_buf_reserve(kdp_buf *b, size_t cap) {
  if (cap <= b->cap) return;
  char *p = realloc(b->p, cap);
  if (!p) {
    kdp_die("server out of memory (%zu bytes)", cap);
  }
  b->p = p;
  b->cap = cap;
}

void kdp_buf_put(kdp_buf *b, const void *d, size_t n) {
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1) cap *= 2;
    kdp_buf_reserve(b, cap);
  }
  if (n) memcpy(b->p + b->len, d, n);
  b->len += n;
  b->p[b->len] = 0;
}

void kdp_buf_printf(kdp_buf *b, const char *fmt, ...) {
  char small[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(small, sizeof small, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n < sizeof small) {
    kdp_buf_put(b, small, (size_t)n);
    return;
  }
  kdp_buf_put(b, NULL, 0); /* ensure allocated */
  char *tmp = kdp_xmalloc((size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(tmp, (size_t)n + 1, fmt, ap);
  va_end(ap);
  kdp_buf_put(b, tmp, (size_t)n);
  free(tmp);
}

void kdp_buf_json_str(kdp_buf *b, const char *s) {
  kdp_buf_put(b, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      char e[2] = {'\\', (char)*p};
      kdp_buf_put(b, e, 2);
    } else if (*p < 0x20 || *p == 0x7f) {
      kdp_buf_printf(b, "\\u%04x", *p);
    } else {
      kdp_buf_put(b, p, 1);
    }
  }
  kdp_buf_put(b, "\"", 1);
}

void kdp_buf_free(kdp_buf *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

/* ---- core ---- */

static char *dup_or_null(const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s);
  char *d = kdp_xmalloc(n + 1);
  memcpy(d, s, n + 1);
  return d;
}

void kdp_server_options_defaults(kdp_server_options *o) {
  memset(o, 0, sizeof *o);
  o->listen = "127.0.0.1";
  o->max_body = 1u << 20;
  o->max_header = 16u << 10;
  o->max_connections = 64;
  o->idle_timeout = 30;
  o->predict_timeout = 30;
  o->max_predict = 256;
  o->max_commands = 64;
  o->max_body_total = 64u << 20;
  o->header_timeout = 10;
  o->min_rate = 65536;
  o->history_points = 2048;
}

kdp_srv_core *kdp_core_new(const kdp_server_options *o) {
  kdp_server_options d;
  kdp_server_options_defaults(&d);
  kdp_srv_core *core = kdp_xcalloc(1, sizeof *core);
  core->opt = *o;
  if (!o->listen || !o->listen[0]) core->opt.listen = d.listen;
  if (!o->max_body) core->opt.max_body = d.max_body;
  if (!o->max_header) core->opt.max_header = d.max_header;
  if (o->max_connections <= 0) core->opt.max_connections = d.max_connections;
  if (!(o->idle_timeout > 0)) core->opt.idle_timeout = d.idle_timeout;
  if (!(o->predict_timeout > 0)) core->opt.predict_timeout = d.predict_timeout;
  if (o->max_predict <= 0) core->opt.max_predict = d.max_predict;
  if (o->max_commands <= 0) core->opt.max_commands = d.max_commands;
  if (o->input_dim < 0) core->opt.input_dim = 0;
  if (!o->max_body_total) core->opt.max_body_total = d.max_body_total;
  if (core->opt.max_body_total < core->opt.max_body) core->opt.max_body_total = core->opt.max_body;
  if (!(o->header_timeout > 0)) core->opt.header_timeout = d.header_timeout;
  if (o->min_rate == 0) core->opt.min_rate = d.min_rate;
  if (o->history_points <= 0) core->opt.history_points = d.history_points;
  for (int i = 0; i < KDP_NCONTROLS; i++) {
    core->control_note[i] = (o->control_note[i] && o->control_note[i][0])
                                ? dup_or_null(o->control_note[i]) : NULL;
    core->opt.control_note[i] = core->control_note[i];
  }
  core->listen = dup_or_null(core->opt.listen);
  core->token = (o->token && o->token[0]) ? dup_or_null(o->token) : NULL;
  core->addr_file = (o->addr_file && o->addr_file[0]) ? dup_or_null(o->addr_file) : NULL;
  core->opt.listen = core->listen;
  core->opt.token = core->token;
  core->opt.addr_file = core->addr_file;
  core->token_len = core->token ? strlen(core->token) : 0;
  pthread_mutex_init(&core->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* the clock of kdp_now() */
  pthread_cond_init(&core->delivered_cv, &ca);
  pthread_condattr_destroy(&ca);
  core->cmds = kdp_xcalloc((size_t)core->opt.max_commands, sizeof *core->cmds);
  core->next_id = 1;
  kdp_core_hist_init(core);
  return core;
}

static void predict_free(kdp_predict_priv *p) {
  if (!p) return;
  free(p->pub.x);
  free(p->peers);
  free(p->ensemble);
  free(p->teacher);
  free(p->teacher_name);
  free(p);
}

static void all_unlink(kdp_srv_core *core, kdp_predict_priv *p) {
  if (p->prev_all) p->prev_all->next_all = p->next_all;
  else core->all = p->next_all;
  if (p->next_all) p->next_all->prev_all = p->prev_all;
  p->prev_all = p->next_all = NULL;
}

void kdp_core_free(kdp_srv_core *core) {
  if (!core) return;
  kdp_predict_priv *p = core->all;
  while (p) {
    kdp_predict_priv *n = p->next_all;
    predict_free(p);
    p = n;
  }
  kdp_core_hist_free(core);
  pthread_mutex_destroy(&core->mu);
  pthread_cond_destroy(&core->delivered_cv);
  free(core->metrics);
  free(core->status);
  free(core->cmds);
  if (core->token) memset(core->token, 0, core->token_len);
  free(core->token);
  free(core->listen);
  free(core->addr_file);
  for (int i = 0; i < KDP_NCONTROLS; i++) free(core->control_note[i]);
  free(core);
}

void kdp_core_publish(kdp_srv_core *core, const char *metrics, const char *status) {
  char *m = dup_or_null(metrics), *s = dup_or_null(status);
  pthread_mutex_lock(&core->mu);
  char *old_m = NULL, *old_s = NULL;
  if (m) {
    old_m = core->metrics;
    core->metrics = m;
  }
  if (s) {
    old_s = core->status;
    core->status = s;
  }
  core->publish_time = kdp_now();
  pthread_mutex_unlock(&core->mu);
  free(old_m);
  free(old_s);
}

int kdp_core_poll_command(kdp_srv_core *core, kdp_command *out) {
  int got = 0;
  pthread_mutex_lock(&core->mu);
  if (core->cmd_count > 0) {
    *out = core->cmds[core->cmd_head];
    core->cmd_head = (core->cmd_head + 1) % core->opt.max_commands;
    core->cmd_count--;
    got = 1;
  }
  pthread_mutex_unlock(&core->mu);
  return got;
}

int64_t kdp_core_push_command(kdp_srv_core *core, kdp_command *cmd) {
  int64_t id = -1;
  pthread_mutex_lock(&core->mu);
  if (core->cmd_count < core->opt.max_commands) {
    cmd->id = core->next_id++;
    core->cmds[(core->cmd_head + core->cmd_count) % core->opt.max_commands] = *cmd;
    core->cmd_count++;
    id = (int64_t)cmd->id;
  }
  pthread_mutex_unlock(&core->mu);
  return id;
}

kdp_predict_priv *kdp_core_new_predict(int n, int input_dim) {
  kdp_predict_priv *p = kdp_xcalloc(1, sizeof *p);
  p->pub.n = n;
  p->pub.input_dim = input_dim;
  p->pub.x = kdp_xmalloc((size_t)n * (size_t)input_dim * sizeof(float));
  p->pub.priv = p;
  return p;
}

int kdp_core_queue_predict(kdp_srv_core *core, kdp_predict_priv *p) {
  pthread_mutex_lock(&core->mu);
  if (core->stopping) {
    pthread_mutex_unlock(&core->mu);
    return -1;
  }
  p->pub.id = core->next_id++;
  p->state = KDP_PRED_QUEUED;
  p->next = NULL;
  if (core->pend_tail) core->pend_tail->next = p;
  else core->pend_head = p;
  core->pend_tail = p;
  p->next_all = core->all;
  if (core->all) core->all->prev_all = p;
  core->all = p;
  core->pending_predicts++;
  core->st.predict_queued++;
  pthread_mutex_unlock(&core->mu);
  return 0;
}

kdp_predict_req *kdp_core_take_predict(kdp_srv_core *core) {
  kdp_predict_priv *p = NULL;
  pthread_mutex_lock(&core->mu);
  if (core->pend_head) {
    p = core->pend_head;
    core->pend_head = p->next;
    if (!core->pend_head) core->pend_tail = NULL;
    p->next = NULL;
    p->state = KDP_PRED_TAKEN;
    core->pending_predicts--;
  }
  pthread_mutex_unlock(&core->mu);
  return p ? &p->pub : NULL;
}

static void push_done(kdp_srv_core *core, kdp_predict_priv *p) {
  pthread_mutex_lock(&core->mu);
  p->state = KDP_PRED_DONE;
  p->seq = ++core->answered;
  p->next = NULL;
  if (core->done_tail) core->done_tail->next = p;
  else core->done_head = p;
  core->done_tail = p;
  pthread_mutex_unlock(&core->mu);
  if (core->wake) core->wake(core->wake_arg);
}

static float *copy_floats(const float *src, size_t n) {
  float *d = kdp_xmalloc(n * sizeof(float));
  memcpy(d, src, n * sizeof(float));
  return d;
}

void kdp_core_fail_predict(kdp_srv_core *core, kdp_predict_req *req, int status, const char *msg) {
  if (!req) return;
  kdp_predict_priv *p = req->priv;
  p->status = (status >= 400 && status <= 599) ? status : 500;
  snprintf(p->errmsg, sizeof p->errmsg, "%s", msg ? msg : "prediction failed");
  push_done(core, p);
}

int kdp_core_answer_predict(kdp_srv_core *core, kdp_predict_req *req,
                            const kdp_predict_result *r) {
  if (!req) return KDP_EINVAL;
  kdp_predict_priv *p = req->priv;
  if (!r || r->P <= 0 || r->C <= 0 || r->P > 1024 || r->C > 100000 || !r->peers || !r->ensemble) {
    kdp_core_fail_predict(core, req, 500, "trainer returned an invalid prediction");
    return KDP_EINVAL;
  }
  size_t nc = (size_t)req->n * (size_t)r->C;
  p->P = r->P;
  p->C = r->C;
  p->peers = copy_floats(r->peers, (size_t)r->P * nc);
  p->ensemble = copy_floats(r->ensemble, nc);
  if (r->teacher) {
    p->teacher = copy_floats(r->teacher, nc);
    p->teacher_name = dup_or_null(r->teacher_name ? r->teacher_name : "teacher");
  }
  p->status = 200;
  push_done(core, p);
  return 0;
}

void kdp_core_cancel_predict(kdp_srv_core *core, kdp_predict_priv *p) {
  int drop = 0;
  pthread_mutex_lock(&core->mu);
  p->conn = NULL;
  if (p->state == KDP_PRED_QUEUED) {
    kdp_predict_priv **pp = &core->pend_head, *prev = NULL;
    while (*pp && *pp != p) {
      prev = *pp;
      pp = &(*pp)->next;
    }
    if (*pp) {
      *pp = p->next;
      if (core->pend_tail == p) core->pend_tail = prev;
      core->pending_predicts--;
    }
    all_unlink(core, p);
    drop = 1;
  }
  pthread_mutex_unlock(&core->mu);
  if (drop) predict_free(p);
}

void kdp_core_drain_done(kdp_srv_core *core) {
  pthread_mutex_lock(&core->mu);
  kdp_predict_priv *p = core->done_head;
  core->done_head = core->done_tail = NULL;
  pthread_mutex_unlock(&core->mu);
  while (p) {
    kdp_predict_priv *next = p->next;
    if (p->conn) kdp_http_conn_predict_done(p->conn, p);
    pthread_mutex_lock(&core->mu);
    all_unlink(core, p);
    if (p->seq > core->delivered) core->delivered = p->seq;
    pthread_cond_broadcast(&core->delivered_cv);
    pthread_mutex_unlock(&core->mu);
    predict_free(p);
    p = next;
  }
}

int kdp_core_wait_delivered(kdp_srv_core *core, double max_seconds) {
  double until = kdp_now() + max_seconds;
  struct timespec ts = {(time_t)until, (long)((until - (double)(time_t)until) * 1e9)};
  if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
  pthread_mutex_lock(&core->mu);
  uint64_t want = core->answered;
  int rc = 0;
  while (core->delivered < want && rc == 0)
    rc = pthread_cond_timedwait(&core->delivered_cv, &core->mu, &ts);
  int done = core->delivered >= want;
  pthread_mutex_unlock(&core->mu);
  return done;
}

void kdp_core_count(kdp_srv_core *core, int path, int status, size_t bytes) {
  if (path < 0 || path >= KDP_NPATHS) path = KDP_PATH_OTHER;
  if (status < 100 || status > 599) status = 500;
  pthread_mutex_lock(&core->mu);
  core->by_path[path][status]++;
  core->st.status_count[status]++;
  core->st.requests++;
  core->st.bytes_sent += bytes;
  if (status == 401) core->st.auth_failures++;
  pthread_mutex_unlock(&core->mu);
}

int kdp_server_secret_equal(const char *given, size_t given_len, const char *expected) {
  size_t n = strlen(expected);
  /* Runs over the expected length whatever was given; no early exit on the first difference. */
  volatile unsigned char diff = (unsigned char)(given_len != n);
  for (size_t i = 0; i < n; i++) {
    unsigned char g = i < given_len ? (unsigned char)given[i] : 0;
    diff |= (unsigned char)(g ^ (unsigned char)expected[i]);
  }
  return diff == 0;
}

size_t kdp_prom_label_value(char *out, size_t n, const char *v) {
  if (n == 0) return 0;
  size_t k = 0;
  for (const char *p = v ? v : ""; *p; p++) {
    char e = *p == '\\' ? '\\' : *p == '"' ? '"' : *p == '\n' ? 'n' : 0;
    size_t need = e ? 2 : 1;
    if (k + need >= n) { /* cut, but not inside a UTF-8 character (its bytes are copied 1:1) */
      while (k > 0 && ((unsigned char)*p & 0xC0) == 0x80) p--, k--;
      break;
    }
    if (e) {
      out[k++] = '\\';
      out[k++] = e;
    } else {
      out[k++] = *p;
    }
  }
  out[k] = 0;
  return k;
}
