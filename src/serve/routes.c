/* routes.c: the endpoints: /metrics, /status, /healthz, /control and /predict (JSON via json-c,
   msgpack via msgpack-c), the dashboard (/, /assets/, /history), token check, and the prediction
   reply formats. */
#include <json-c/json.h>
#include <math.h>
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "serve_internal.h"

/* ---- auth ---- */

static int authorized(kdp_http_conn *c) {
  const kdp_srv_core *core = c->core;
  if (!core->token) return 1;
  const char *v = c->hdr[KDP_HDR_AUTH];
  size_t n = c->hdr_len[KDP_HDR_AUTH];
  if (c->hdr_overflow[KDP_HDR_AUTH] || n < 7 || strncasecmp(v, "Bearer ", 7) != 0) {
    v = "";
    n = 0;
  } else {
    v += 7;
    n -= 7;
    while (n && *v == ' ') v++, n--;
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
  }
  return kdp_server_secret_equal(v, n, core->token);
}

/* ---- GET endpoints ---- */

static void metric_head(kdp_buf *b, const char *name, const char *type, const char *help) {
  kdp_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One unlabelled sample with its HELP and TYPE lines; fmt formats the value. */
static void metric(kdp_buf *b, const char *name, const char *type, const char *help,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void metric(kdp_buf *b, const char *name, const char *type, const char *help,
                   const char *fmt, ...) {
  metric_head(b, name, type, help);
  char v[64];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(v, sizeof v, fmt, ap);
  va_end(ap);
  kdp_buf_printf(b, "%s %s\n", name, v);
}

static void route_metrics(kdp_http_conn *c) {
  kdp_srv_core *core = c->core;
  kdp_buf b = {0};
  kdp_server_stats st;
  uint64_t(*by_path)[600] = kdp_xmalloc(sizeof core->by_path);
  pthread_mutex_lock(&core->mu);
  if (core->metrics) kdp_buf_put(&b, core->metrics, strlen(core->metrics));
  st = core->st;
  memcpy(by_path, core->by_path, sizeof core->by_path);
  int cmds = core->cmd_count, preds = core->pending_predicts;
  double pub = core->publish_time;
  int stalled = core->unhealthy[0] != 0;
  pthread_mutex_unlock(&core->mu);
  if (b.len && b.p[b.len - 1] != '\n') kdp_buf_put(&b, "\n", 1);

  metric_head(&b, "kdpeers_http_requests_total", "counter",
              "HTTP requests answered by the rank-0 server, by path and status code.");
  for (int p = 0; p < KDP_NPATHS; p++)
    for (int code = 100; code < 600; code++)
      if (by_path[p][code])
        kdp_buf_printf(&b, "kdpeers_http_requests_total{path=\"%s\",code=\"%d\"} %llu\n",
                       kdp_path_names[p], code, (unsigned long long)by_path[p][code]);
  free(by_path);
  metric(&b, "kdpeers_stalled", "gauge",
         "1 while ranks of the job are late by run.stall_warn_seconds (/healthz says which).",
         "%d", stalled);
  metric(&b, "kdpeers_server_connections_open", "gauge", "HTTP connections open now.",
         "%d", st.connections_open);
  metric(&b, "kdpeers_server_connections_total", "counter", "HTTP connections accepted.",
         "%llu", (unsigned long long)st.connections_total);
  metric(&b, "kdpeers_server_connections_rejected_total", "counter",
         "Connections refused with 503: the pool was full and none could be closed.",
         "%llu", (unsigned long long)st.connections_rejected);
  metric(&b, "kdpeers_server_timeouts_total", "counter",
         "Connections closed because the client was idle or too slow.",
         "%llu", (unsigned long long)st.timeouts);
  metric(&b, "kdpeers_server_connections_evicted_total", "counter",
         "Connections closed to make room for a new one (the least recently active first).",
         "%llu", (unsigned long long)st.connections_evicted);
  metric(&b, "kdpeers_server_body_bytes", "gauge",
         "Request body bytes buffered now, all connections together.",
         "%zu", st.body_bytes);
  metric(&b, "kdpeers_server_bodies_refused_total", "counter",
         "Requests refused with 503 because buffered bodies would exceed max_body_total.",
         "%llu", (unsigned long long)st.bodies_refused);
  metric(&b, "kdpeers_server_sent_bytes_total", "counter",
         "Response bytes queued for sending (headers and bodies).",
         "%llu", (unsigned long long)st.bytes_sent);
  metric(&b, "kdpeers_server_loop_lag_seconds", "gauge",
         "How late the server loop's 100 ms timer last fired.",
         "%.6f", st.loop_lag_seconds);
  metric(&b, "kdpeers_server_loop_lag_max_seconds", "gauge",
         "Largest lateness of the server loop's 100 ms timer so far.",
         "%.6f", st.loop_lag_max_seconds);
  metric(&b, "kdpeers_server_commands_pending", "gauge", "Control commands queued for the trainer.",
         "%d", cmds);
  metric(&b, "kdpeers_server_predict_pending", "gauge",
         "Prediction requests waiting for the trainer.",
         "%d", preds);
  metric(&b, "kdpeers_server_predict_requests_total", "counter",
         "Prediction requests handed to the trainer.",
         "%llu", (unsigned long long)st.predict_queued);
  metric(&b, "kdpeers_server_last_publish_age_seconds", "gauge",
         "Seconds since the trainer last published metrics (-1 = never).",
         "%.3f", pub > 0 ? kdp_now() - pub : -1.0);
  kdp_http_respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len, NULL, 0);
  kdp_buf_free(&b);
}

static void route_status(kdp_http_conn *c) {
  kdp_buf b = {0};
  pthread_mutex_lock(&c->core->mu);
  const char *s = c->core->status ? c->core->status : "{}";
  kdp_buf_put(&b, s, strlen(s));
  pthread_mutex_unlock(&c->core->mu);
  kdp_buf_put(&b, "\n", 1);
  kdp_http_respond(c, 200, "application/json", b.p, b.len, NULL, 0);
  kdp_buf_free(&b);
}

static void route_healthz(kdp_http_conn *c) {
  char why[sizeof c->core->unhealthy];
  pthread_mutex_lock(&c->core->mu);
  double pub = c->core->publish_time;
  memcpy(why, c->core->unhealthy, sizeof why);
  pthread_mutex_unlock(&c->core->mu);
  kdp_buf b = {0};
  if (why[0]) { /* the trainer says it is stuck (kdp_server_set_health) */
    kdp_buf_printf(&b, "{\"status\":\"unhealthy\",\"reason\":\"%s\"}\n", why);
    kdp_http_respond(c, 503, "application/json", b.p, b.len, NULL, 0);
    kdp_buf_free(&b);
    return;
  }
  if (pub > 0)
    kdp_buf_printf(&b, "{\"status\":\"ok\",\"last_publish_age_seconds\":%.3f}\n", kdp_now() - pub);
  else
    kdp_buf_printf(&b, "{\"status\":\"ok\",\"last_publish_age_seconds\":null}\n");
  kdp_http_respond(c, 200, "application/json", b.p, b.len, NULL, 0);
  kdp_buf_free(&b);
}

/* ---- the dashboard ---- */

/* The page loads only its own files and talks only to this server; nothing inline runs. */
#define PAGE_HEADERS                                                                              \
  "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "            \
  "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "              \
  "frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n" \
  "X-Frame-Options: DENY\r\n"

static size_t url_path_len(const kdp_http_conn *c) {
  size_t n = 0;
  while (n < c->url_len && c->url[n] != '?' && c->url[n] != '#') n++;
  return n;
}

static void route_asset(kdp_http_conn *c) {
  const kdp_asset *a = kdp_asset_find(c->url, url_path_len(c));
  if (!a) {
    kdp_http_error(c, 404, 0, "no such file (the dashboard is at /)");
    return;
  }
  kdp_http_respond(c, 200, a->ctype, (const char *)a->data, a->len, PAGE_HEADERS, 0);
}

/* The value of query parameter name ("since") as a whole number: 1 and *out if present and
   valid, 0 if absent, -1 if malformed. */
static int query_u64(const kdp_http_conn *c, const char *name, uint64_t *out) {
  size_t i = url_path_len(c), k = strlen(name);
  if (i >= c->url_len || c->url[i] != '?') return 0;
  i++;
  while (i < c->url_len && c->url[i] != '#') {
    size_t end = i;
    while (end < c->url_len && c->url[end] != '&' && c->url[end] != '#') end++;
    if (end - i > k && memcmp(c->url + i, name, k) == 0 && c->url[i + k] == '=') {
      uint64_t v = 0;
      size_t j = i + k + 1;
      if (j == end || end - j > 19) return -1;
      for (; j < end; j++) {
        if (c->url[j] < '0' || c->url[j] > '9') return -1;
        v = v * 10 + (uint64_t)(c->url[j] - '0');
      }
      *out = v;
      return 1;
    }
    i = end < c->url_len && c->url[end] == '&' ? end + 1 : end;
  }
  return 0;
}

static void route_history(kdp_http_conn *c) {
  uint64_t since = 0;
  if (query_u64(c, "since", &since) < 0) {
    kdp_http_error(c, 400, 0, "since must be a whole number (the \"seq\" of the last reply)");
    return;
  }
  kdp_buf b = {0};
  kdp_core_hist_render(c->core, since, &b);
  kdp_http_respond(c, 200, "application/json", b.p, b.len, NULL, 0);
  kdp_buf_free(&b);
}

/* ---- JSON bodies ---- */

/* Parses the body as one JSON object; on failure answers 400 and returns NULL. */
static json_object *parse_json_object(kdp_http_conn *c) {
  if (c->body.len == 0) {
    kdp_http_error(c, 400, 0, "empty body: expected a JSON object");
    return NULL;
  }
  json_tokener *tok = json_tokener_new_ex(16);
  if (!tok) {
    kdp_http_error(c, 500, 0, "out of memory");
    return NULL;
  }
  json_tokener_set_flags(tok, JSON_TOKENER_STRICT);
  json_object *obj = json_tokener_parse_ex(tok, c->body.p, (int)c->body.len);
  enum json_tokener_error e = json_tokener_get_error(tok);
  size_t end = json_tokener_get_parse_end(tok);
  json_tokener_free(tok);
  if (!obj || e != json_tokener_success) {
    json_object_put(obj);
    kdp_http_error(c, 400, 0, "invalid JSON: %s",
                   e == json_tokener_continue ? "truncated" : json_tokener_error_desc(e));
    return NULL;
  }
  while (end < c->body.len && strchr(" \t\r\n", c->body.p[end]) && c->body.p[end]) end++;
  if (end < c->body.len) {
    json_object_put(obj);
    kdp_http_error(c, 400, 0, "invalid JSON: trailing data after the object");
    return NULL;
  }
  if (!json_object_is_type(obj, json_type_object)) {
    json_object_put(obj);
    kdp_http_error(c, 400, 0, "expected a JSON object");
    return NULL;
  }
  return obj;
}

static int json_number(json_object *v, double *out) {
  if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
    return 0;
  *out = json_object_get_double(v);
  return 1;
}

static void route_control(kdp_http_conn *c) {
  json_object *obj = parse_json_object(c);
  if (!obj) return;
  kdp_command cmd = {0};
  int n = 0;
  struct json_object_iterator it = json_object_iter_begin(obj), end = json_object_iter_end(obj);
  for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
    const char *k = json_object_iter_peek_name(&it);
    json_object *v = json_object_iter_peek_value(&it);
    if (strcmp(k, "action") == 0) {
      static const char *const names[] = {"checkpoint", "stop", "pause", "resume"};
      const char *a = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : NULL;
      cmd.action = KDP_ACTION_NONE;
      for (int i = 0; a && i < 4; i++)
        if (strcmp(a, names[i]) == 0) cmd.action = (kdp_action)(KDP_ACTION_CHECKPOINT + i);
      if (cmd.action == KDP_ACTION_NONE) {
        json_object_put(obj);
        kdp_http_error(c, 400, 0,
                       "\"action\" must be one of \"checkpoint\", \"stop\", \"pause\", \"resume\"");
        return;
      }
      n++;
      continue;
    }
    double *dst = NULL;
    int *flag = NULL;
    if (strcmp(k, "lr_scale") == 0) dst = &cmd.lr_scale, flag = &cmd.has_lr_scale;
    else if (strcmp(k, "temperature") == 0) dst = &cmd.temperature, flag = &cmd.has_temperature;
    else if (strcmp(k, "kd_weight") == 0) dst = &cmd.kd_weight, flag = &cmd.has_kd_weight;
    if (!dst) {
      kdp_http_error(c, 400, 0,
                     "unknown field \"%.40s\" (expected action, lr_scale, temperature, kd_weight)",
                     k);
      json_object_put(obj);
      return;
    }
    double x;
    if (!json_number(v, &x) || !isfinite(x) || x <= 0) {
      kdp_http_error(c, 400, 0, "\"%s\" must be a finite number > 0", k);
      json_object_put(obj);
      return;
    }
    int ci = dst == &cmd.lr_scale      ? KDP_CONTROL_LR_SCALE
             : dst == &cmd.temperature ? KDP_CONTROL_TEMPERATURE
                                       : KDP_CONTROL_KD_WEIGHT;
    const kdp_range *r = &c->core->opt.control_range[ci];
    if (r->flags && !kdp_range_contains(r, x)) {
      char rt[96], xs[32];
      kdp_range_text(r, rt, sizeof rt);
      kdp_fmt_double(x, xs, sizeof xs);
      const char *note = c->core->opt.control_note[ci];
      kdp_http_error(c, 400, 0, "\"%s\" = %s is out of range: expected a value %s%s%s%s%s", k, xs,
                     (r->flags & KDP_RANGE_LO) && (r->flags & KDP_RANGE_HI) ? "in " : "", rt,
                     note ? " (" : "", note ? note : "", note ? ")" : "");
      json_object_put(obj);
      return;
    }
    *dst = x;
    *flag = 1;
    n++;
  }
  json_object_put(obj);
  if (n == 0) {
    kdp_http_error(c, 400, 0, "nothing to do: give \"action\" and/or lr_scale, temperature, "
                              "kd_weight");
    return;
  }
  int64_t id = kdp_core_push_command(c->core, &cmd);
  if (id < 0) {
    kdp_http_error(c, 503, 0, "command queue full: the trainer has not polled recently");
    return;
  }
  kdp_buf b = {0};
  kdp_buf_printf(&b, "{\"accepted\":true,\"id\":%lld}\n", (long long)id);
  kdp_http_respond(c, 202, "application/json", b.p, b.len, NULL, 0);
  kdp_buf_free(&b);
}

/* ---- /predict ---- */

#define PRED_ERR_LEN 200

static int pixel_ok(double v) { return isfinite(v) && v >= 0 && v <= 255; }

/* Fills p->pub.x row i from a JSON array; returns 0 or writes err. */
static int json_row(json_object *row, int i, int dim, float *x, char *err) {
  if (!json_object_is_type(row, json_type_array)) {
    snprintf(err, PRED_ERR_LEN, "input %d is not an array of numbers", i);
    return -1;
  }
  size_t len = json_object_array_length(row);
  if (len != (size_t)dim) {
    snprintf(err, PRED_ERR_LEN, "input %d has %zu values, expected input_dim = %d", i, len, dim);
    return -1;
  }
  for (int j = 0; j < dim; j++) {
    double v;
    if (!json_number(json_object_array_get_idx(row, (size_t)j), &v) || !pixel_ok(v)) {
      snprintf(err, PRED_ERR_LEN,
               "input %d value %d must be a number in [0, 255] (raw pixel values)", i, j);
      return -1;
    }
    x[(size_t)j] = (float)v;
  }
  return 0;
}

static kdp_predict_priv *predict_from_json(kdp_http_conn *c, char *err) {
  const kdp_server_options *o = &c->core->opt;
  /* Bound the work json-c will do before it builds one object per number. */
  size_t commas = 0;
  for (size_t i = 0; i < c->body.len; i++) commas += c->body.p[i] == ',';
  if (commas > (size_t)o->max_predict * ((size_t)o->input_dim + 1) + 16) {
    snprintf(err, PRED_ERR_LEN, "too many values: at most %d inputs of %d values",
             o->max_predict, o->input_dim);
    return NULL;
  }
  json_object *obj = parse_json_object(c);
  if (!obj) return NULL; /* already answered */
  json_object *inputs = NULL, *input = NULL;
  struct json_object_iterator it = json_object_iter_begin(obj), end = json_object_iter_end(obj);
  for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
    const char *k = json_object_iter_peek_name(&it);
    if (strcmp(k, "inputs") == 0) inputs = json_object_iter_peek_value(&it);
    else if (strcmp(k, "input") == 0) input = json_object_iter_peek_value(&it);
    else {
      snprintf(err, PRED_ERR_LEN, "unknown field \"%.40s\" (expected \"inputs\" or \"input\")", k);
      json_object_put(obj);
      return NULL;
    }
  }
  kdp_predict_priv *p = NULL;
  if ((inputs != NULL) == (input != NULL)) {
    snprintf(err, PRED_ERR_LEN, "give exactly one of \"inputs\" (array of arrays) or \"input\"");
  } else if (input) {
    p = kdp_core_new_predict(1, o->input_dim);
    if (json_row(input, 0, o->input_dim, p->pub.x, err) != 0) goto fail;
  } else if (!json_object_is_type(inputs, json_type_array)) {
    snprintf(err, PRED_ERR_LEN, "\"inputs\" must be an array of arrays");
  } else {
    size_t n = json_object_array_length(inputs);
    if (n == 0 || n > (size_t)o->max_predict) {
      snprintf(err, PRED_ERR_LEN, "\"inputs\" has %zu entries: expected 1 to %d", n,
               o->max_predict);
    } else {
      p = kdp_core_new_predict((int)n, o->input_dim);
      for (size_t i = 0; i < n; i++)
        if (json_row(json_object_array_get_idx(inputs, i), (int)i, o->input_dim,
                     p->pub.x + i * (size_t)o->input_dim, err) != 0)
          goto fail;
    }
  }
  json_object_put(obj);
  return p;
fail:
  json_object_put(obj);
  free(p->pub.x);
  free(p);
  return NULL;
}

/* Walks msgpack bytes without allocating: every container's count must fit in the bytes left
   (each element takes at least one), so msgpack-c's up-front allocations stay proportional to
   the body. Returns 0 if buf holds exactly one well-formed object of at most max_objects. */
static int msgpack_prescan(const unsigned char *buf, size_t len, size_t max_objects) {
  size_t pos = 0, need = 1, objects = 0;
  while (need > 0) {
    if (pos >= len || ++objects > max_objects) return -1;
    unsigned b = buf[pos++];
    uint64_t skip = 0, children = 0;
    int lenbytes = 0;
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
    } else if (b <= 0x8f) children = 2u * (b & 0x0f);
    else if (b <= 0x9f) children = b & 0x0f;
    else if (b <= 0xbf) skip = b & 0x1f;
    else {
      switch (b) {
      case 0xc4: case 0xd9: lenbytes = 1; break;
      case 0xc5: case 0xda: lenbytes = 2; break;
      case 0xc6: case 0xdb: lenbytes = 4; break;
      case 0xc7: lenbytes = 1; skip = 1; break; /* ext: + type byte */
      case 0xc8: lenbytes = 2; skip = 1; break;
      case 0xc9: lenbytes = 4; skip = 1; break;
      case 0xca: skip = 4; break;
      case 0xcb: skip = 8; break;
      case 0xcc: case 0xd0: skip = 1; break;
      case 0xcd: case 0xd1: skip = 2; break;
      case 0xce: case 0xd2: skip = 4; break;
      case 0xcf: case 0xd3: skip = 8; break;
      case 0xd4: skip = 2; break;
      case 0xd5: skip = 3; break;
      case 0xd6: skip = 5; break;
      case 0xd7: skip = 9; break;
      case 0xd8: skip = 17; break;
      case 0xdc: case 0xde: lenbytes = -2; break;
      case 0xdd: case 0xdf: lenbytes = -4; break;
      default: return -1; /* 0xc1 */
      }
    }
    if (lenbytes) {
      int nb = lenbytes < 0 ? -lenbytes : lenbytes;
      if (len - pos < (size_t)nb) return -1;
      uint64_t v = 0;
      for (int i = 0; i < nb; i++) v = (v << 8) | buf[pos++];
      if (lenbytes > 0) skip += v;
      else children = (b == 0xde || b == 0xdf) ? 2 * v : v;
    }
    if (skip > len - pos) return -1;
    pos += (size_t)skip;
    need--;
    if (children > len - pos || need + children > len - pos) return -1;
    need += (size_t)children;
  }
  return pos == len ? 0 : -1;
}

static int mp_number(const msgpack_object *o, double *out) {
  switch (o->type) {
  case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return 1;
  case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return 1;
  case MSGPACK_OBJECT_FLOAT32:
  case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return 1;
  default: return 0;
  }
}

static int mp_row(const msgpack_object *row, int i, int dim, float *x, char *err) {
  if (row->type == MSGPACK_OBJECT_BIN) {
    if (row->via.bin.size != (uint32_t)dim) {
      snprintf(err, PRED_ERR_LEN, "input %d has %u bytes, expected input_dim = %d", i,
               row->via.bin.size, dim);
      return -1;
    }
    for (int j = 0; j < dim; j++) x[j] = (float)(unsigned char)row->via.bin.ptr[j];
    return 0;
  }
  if (row->type != MSGPACK_OBJECT_ARRAY) {
    snprintf(err, PRED_ERR_LEN, "input %d is neither an array of numbers nor bin", i);
    return -1;
  }
  if (row->via.array.size != (uint32_t)dim) {
    snprintf(err, PRED_ERR_LEN, "input %d has %u values, expected input_dim = %d", i,
             row->via.array.size, dim);
    return -1;
  }
  for (int j = 0; j < dim; j++) {
    double v;
    if (!mp_number(&row->via.array.ptr[j], &v) || !pixel_ok(v)) {
      snprintf(err, PRED_ERR_LEN,
               "input %d value %d must be a number in [0, 255] (raw pixel values)", i, j);
      return -1;
    }
    x[j] = (float)v;
  }
  return 0;
}

static kdp_predict_priv *predict_from_msgpack(kdp_http_conn *c, char *err) {
  const kdp_server_options *o = &c->core->opt;
  size_t max_objects = (size_t)o->max_predict * ((size_t)o->input_dim + 1) + 16;
  if (c->body.len == 0 ||
      msgpack_prescan((const unsigned char *)c->body.p, c->body.len, max_objects) != 0) {
    snprintf(err, PRED_ERR_LEN, "invalid msgpack body (expected one map with \"inputs\", at "
                                "most %d inputs of %d values)", o->max_predict, o->input_dim);
    return NULL;
  }
  msgpack_unpacker *up = msgpack_unpacker_new(c->body.len + 16);
  if (!up || !msgpack_unpacker_reserve_buffer(up, c->body.len)) {
    if (up) msgpack_unpacker_free(up);
    snprintf(err, PRED_ERR_LEN, "out of memory unpacking msgpack");
    return NULL;
  }
  memcpy(msgpack_unpacker_buffer(up), c->body.p, c->body.len);
  msgpack_unpacker_buffer_consumed(up, c->body.len);
  msgpack_unpacked res;
  msgpack_unpacked_init(&res);
  kdp_predict_priv *p = NULL;
  if (msgpack_unpacker_next(up, &res) != MSGPACK_UNPACK_SUCCESS ||
      res.data.type != MSGPACK_OBJECT_MAP) {
    snprintf(err, PRED_ERR_LEN, "invalid msgpack body: expected a map with \"inputs\"");
    goto done;
  }
  const msgpack_object *inputs = NULL, *input = NULL;
  const msgpack_object_map *m = &res.data.via.map;
  for (uint32_t i = 0; i < m->size; i++) {
    const msgpack_object *k = &m->ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == 6 &&
        memcmp(k->via.str.ptr, "inputs", 6) == 0)
      inputs = &m->ptr[i].val;
    else if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == 5 &&
             memcmp(k->via.str.ptr, "input", 5) == 0)
      input = &m->ptr[i].val;
    else {
      snprintf(err, PRED_ERR_LEN, "unknown key in msgpack map (expected \"inputs\" or \"input\")");
      goto done;
    }
  }
  if ((inputs != NULL) == (input != NULL)) {
    snprintf(err, PRED_ERR_LEN, "give exactly one of \"inputs\" or \"input\"");
  } else if (input) {
    p = kdp_core_new_predict(1, o->input_dim);
    if (mp_row(input, 0, o->input_dim, p->pub.x, err) != 0) goto bad;
  } else if (inputs->type != MSGPACK_OBJECT_ARRAY) {
    snprintf(err, PRED_ERR_LEN, "\"inputs\" must be an array");
  } else {
    uint32_t n = inputs->via.array.size;
    if (n == 0 || n > (uint32_t)o->max_predict) {
      snprintf(err, PRED_ERR_LEN, "\"inputs\" has %u entries: expected 1 to %d", n,
               o->max_predict);
    } else {
      p = kdp_core_new_predict((int)n, o->input_dim);
      for (uint32_t i = 0; i < n; i++)
        if (mp_row(&inputs->via.array.ptr[i], (int)i, o->input_dim,
                   p->pub.x + (size_t)i * (size_t)o->input_dim, err) != 0)
          goto bad;
    }
  }
  goto done;
bad:
  free(p->pub.x);
  free(p);
  p = NULL;
done:
  msgpack_unpacked_destroy(&res);
  msgpack_unpacker_free(up);
  if (p) p->pub.msgpack = 1;
  return p;
}

static void route_predict(kdp_http_conn *c) {
  const kdp_server_options *o = &c->core->opt;
  if (o->input_dim <= 0) {
    kdp_http_error(c, 503, 0, "predictions are not available in this run");
    return;
  }
  /* a share of the connections is kept for everything else (/healthz above all) */
  int reserve = o->max_connections / 8 > 1 ? o->max_connections / 8 : 1;
  if (c->core->predicting >= o->max_connections - reserve) {
    kdp_http_error(c, 503, 0, "%d predictions are waiting already (server.max_connections = %d "
                              "keeps %d connections for other requests); retry later",
                   c->core->predicting, o->max_connections, reserve);
    return;
  }
  char err[PRED_ERR_LEN] = "";
  const char *ct = c->hdr[KDP_HDR_CTYPE];
  int is_mp = c->hdr_len[KDP_HDR_CTYPE] && (strncasecmp(ct, "application/msgpack", 19) == 0 ||
                                            strncasecmp(ct, "application/x-msgpack", 21) == 0);
  kdp_predict_priv *p = is_mp ? predict_from_msgpack(c, err) : predict_from_json(c, err);
  if (!p) {
    if (err[0]) kdp_http_error(c, 400, 0, "%s", err); /* else already answered */
    return;
  }
  if (kdp_core_queue_predict(c->core, p) != 0) {
    free(p->pub.x);
    free(p);
    kdp_http_error(c, 503, 0, "server stopping");
    return;
  }
  p->conn = c;
  kdp_http_conn_set_pending(c, p);
  c->paused = 1; /* later requests on this connection wait for the answer */
  c->io->pause_input(c, 1);
  c->io->arm_timer(c, o->predict_timeout);
}

void kdp_route(kdp_http_conn *c) {
  int m = c->parser.method;
  switch (c->path) {
  case KDP_PATH_METRICS:
  case KDP_PATH_STATUS:
  case KDP_PATH_HEALTHZ:
  case KDP_PATH_HISTORY:
  case KDP_PATH_ROOT:
  case KDP_PATH_ASSETS:
    if (m != HTTP_GET && m != HTTP_HEAD) {
      kdp_http_error(c, 405, 0, "%s only answers GET and HEAD", kdp_path_names[c->path]);
      return;
    }
    /* the run's details need the token; the probes, the scrape target and the page do not */
    if ((c->path == KDP_PATH_STATUS || c->path == KDP_PATH_HISTORY) && !authorized(c)) {
      kdp_http_error(c, 401, 0, "missing or wrong \"Authorization: Bearer\" token");
      return;
    }
    if (c->path == KDP_PATH_METRICS) route_metrics(c);
    else if (c->path == KDP_PATH_STATUS) route_status(c);
    else if (c->path == KDP_PATH_HEALTHZ) route_healthz(c);
    else if (c->path == KDP_PATH_HISTORY) route_history(c);
    else route_asset(c);
    return;
  case KDP_PATH_CONTROL:
  case KDP_PATH_PREDICT:
    if (m != HTTP_POST) {
      kdp_http_error(c, 405, 0, "%s only answers POST", kdp_path_names[c->path]);
      return;
    }
    if (!authorized(c)) {
      kdp_http_error(c, 401, 0, "missing or wrong \"Authorization: Bearer\" token");
      return;
    }
    if (c->path == KDP_PATH_CONTROL) route_control(c);
    else route_predict(c);
    return;
  default:
    kdp_http_error(c, 404, 0, "no such endpoint (try /, /metrics, /status, /history, /healthz, "
                              "/control, /predict)");
  }
}

/* ---- prediction replies ---- */

static int argmax(const float *row, int C) {
  int k = 0;
  for (int j = 1; j < C; j++)
    if (row[j] > row[k]) k = j;
  return k;
}

int kdp_fmt_g7(char *out, double v) {
  static const double p10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
  double a = fabs(v);
  if (!(a >= 1e-15 && a < 1e15)) return snprintf(out, 16, "%.7g", v); /* 0, NaN, Inf, extremes */
  /* m = a * 10^(6-e) in [1e6, 1e7): the 7 significant digits before rounding. |6-e| <= 22, so
     the power is exact and m is a * 10^(6-e) correctly rounded (relative error < 2^-53) */
  int e = (int)floor(log10(a));
  double m = 0;
  for (int tries = 0; tries < 3; tries++) {
    int k = 6 - e;
    m = k >= 0 ? a * p10[k] : a / p10[-k];
    if (m < 1e6) e--;
    else if (m >= 1e7) e++;
    else break;
  }
  double f = floor(m), frac = m - f;
  /* 1e-6 is far above m's possible error (< 2e-9): outside it the rounding is certain */
  if (!(m >= 1e6 && m < 1e7) || fabs(frac - 0.5) < 1e-6) return snprintf(out, 16, "%.7g", v);
  unsigned long r = (unsigned long)f + (frac > 0.5);
  if (r == 10000000UL) r = 1000000UL, e++;
  char d[7];
  for (int i = 6; i >= 0; i--) d[i] = (char)('0' + r % 10), r /= 10;
  int nd = 7;
  while (nd > 1 && d[nd - 1] == '0') nd--; /* %g drops trailing zeros */
  char *o = out;
  if (v < 0) *o++ = '-';
  if (e >= -4 && e < 7) { /* fixed notation */
    if (e >= 0) {
      for (int i = 0; i <= e; i++) *o++ = i < nd ? d[i] : '0';
      if (nd > e + 1) {
        *o++ = '.';
        for (int i = e + 1; i < nd; i++) *o++ = d[i];
      }
    } else {
      *o++ = '0';
      *o++ = '.';
      for (int i = 0; i < -e - 1; i++) *o++ = '0';
      for (int i = 0; i < nd; i++) *o++ = d[i];
    }
  } else { /* d.dddddde[+-]XX */
    *o++ = d[0];
    if (nd > 1) {
      *o++ = '.';
      for (int i = 1; i < nd; i++) *o++ = d[i];
    }
    *o++ = 'e';
    *o++ = e < 0 ? '-' : '+';
    int x = e < 0 ? -e : e;
    *o++ = (char)('0' + x / 10);
    *o++ = (char)('0' + x % 10);
  }
  *o = 0;
  return (int)(o - out);
}

static void json_matrix(kdp_buf *b, const float *m, int n, int C) {
  kdp_buf_put(b, "[", 1);
  for (int i = 0; i < n; i++) {
    kdp_buf_put(b, i ? ",[" : "[", i ? 2 : 1);
    for (int j = 0; j < C; j++) {
      float v = m[(size_t)i * (size_t)C + (size_t)j];
      char num[24];
      int len = 0;
      if (j) num[len++] = ',';
      if (isfinite(v)) len += kdp_fmt_g7(num + len, (double)v);
      else memcpy(num + len, "null", 4), len += 4;
      kdp_buf_put(b, num, (size_t)len);
    }
    kdp_buf_put(b, "]", 1);
  }
  kdp_buf_put(b, "]", 1);
}

static void json_labels(kdp_buf *b, const float *m, int n, int C) {
  kdp_buf_put(b, "[", 1);
  for (int i = 0; i < n; i++)
    kdp_buf_printf(b, i ? ",%d" : "%d", argmax(m + (size_t)i * (size_t)C, C));
  kdp_buf_put(b, "]", 1);
}

static void mp_str(msgpack_packer *pk, const char *s) {
  size_t n = strlen(s);
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s, n);
}

static void mp_matrix(msgpack_packer *pk, const float *m, int n, int C) {
  msgpack_pack_array(pk, (size_t)n);
  for (int i = 0; i < n; i++) {
    msgpack_pack_array(pk, (size_t)C);
    for (int j = 0; j < C; j++) msgpack_pack_float(pk, m[(size_t)i * (size_t)C + (size_t)j]);
  }
}

static void mp_labels(msgpack_packer *pk, const float *m, int n, int C) {
  msgpack_pack_array(pk, (size_t)n);
  for (int i = 0; i < n; i++) msgpack_pack_int(pk, argmax(m + (size_t)i * (size_t)C, C));
}

void kdp_format_predict(const kdp_predict_priv *p, kdp_buf *out) {
  int n = p->pub.n, C = p->C, P = p->P;
  size_t nc = (size_t)n * (size_t)C;
  if (!p->pub.msgpack) {
    kdp_buf_printf(out, "{\"id\":%llu,\"n\":%d,\"classes\":%d,\"peers\":[",
                   (unsigned long long)p->pub.id, n, C);
    for (int k = 0; k < P; k++) {
      if (k) kdp_buf_put(out, ",", 1);
      json_matrix(out, p->peers + (size_t)k * nc, n, C);
    }
    kdp_buf_put(out, "],\"ensemble\":", 13);
    json_matrix(out, p->ensemble, n, C);
    kdp_buf_put(out, ",\"teacher\":", 11);
    if (p->teacher) {
      kdp_buf_put(out, "{\"name\":", 8);
      kdp_buf_json_str(out, p->teacher_name);
      kdp_buf_put(out, ",\"probs\":", 9);
      json_matrix(out, p->teacher, n, C);
      kdp_buf_put(out, "}", 1);
    } else {
      kdp_buf_put(out, "null", 4);
    }
    kdp_buf_put(out, ",\"labels\":{\"ensemble\":", 22);
    json_labels(out, p->ensemble, n, C);
    if (p->teacher) {
      kdp_buf_put(out, ",\"teacher\":", 11);
      json_labels(out, p->teacher, n, C);
    }
    kdp_buf_put(out, "}}\n", 3);
    return;
  }
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_map(&pk, 7);
  mp_str(&pk, "id");
  msgpack_pack_uint64(&pk, p->pub.id);
  mp_str(&pk, "n");
  msgpack_pack_int(&pk, n);
  mp_str(&pk, "classes");
  msgpack_pack_int(&pk, C);
  mp_str(&pk, "peers");
  msgpack_pack_array(&pk, (size_t)P);
  for (int k = 0; k < P; k++) mp_matrix(&pk, p->peers + (size_t)k * nc, n, C);
  mp_str(&pk, "ensemble");
  mp_matrix(&pk, p->ensemble, n, C);
  mp_str(&pk, "teacher");
  if (p->teacher) {
    msgpack_pack_map(&pk, 2);
    mp_str(&pk, "name");
    mp_str(&pk, p->teacher_name);
    mp_str(&pk, "probs");
    mp_matrix(&pk, p->teacher, n, C);
  } else {
    msgpack_pack_nil(&pk);
  }
  mp_str(&pk, "labels");
  msgpack_pack_map(&pk, p->teacher ? 2 : 1);
  mp_str(&pk, "ensemble");
  mp_labels(&pk, p->ensemble, n, C);
  if (p->teacher) {
    mp_str(&pk, "teacher");
    mp_labels(&pk, p->teacher, n, C);
  }
  kdp_buf_put(out, sb.data, sb.size);
  msgpack_sbuffer_destroy(&sb);
}
