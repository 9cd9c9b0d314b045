/* http.c: one HTTP/1.1 connection: http-parser callbacks, header/body limits, keep-alive and
   pipelining (input is held while a reply is pending), response framing. Transport-free. */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "serve_internal.h"

/* Past this many unsent bytes a connection stops parsing new requests until they drain. */
#define KDP_MAX_BACKLOG (1u << 20)
/* A body buffer larger than this is freed after its request (smaller ones are reused). */
#define KDP_KEEP_BODY (4u << 10)

static const char *reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 202: return "Accepted";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 413: return "Payload Too Large";
  case 415: return "Unsupported Media Type";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  default: return "Unknown";
  }
}

void kdp_http_respond(kdp_http_conn *c, int status, const char *ctype, const char *body,
                      size_t body_len, const char *extra_headers, int close) {
  if (c->closing) return;
  if (!c->keep_alive) close = 1;
  kdp_buf out = {0};
  kdp_buf_printf(&out,
                 "HTTP/1.1 %d %s\r\nServer: kdpeers/" KDP_VERSION
                 "\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
                 "Connection: %s\r\n%s\r\n",
                 status, reason(status), ctype, body_len, close ? "close" : "keep-alive",
                 extra_headers ? extra_headers : "");
  /* HEAD: the headers GET would send (Content-Length included), without the body */
  if (c->parser.method != HTTP_HEAD) kdp_buf_put(&out, body, body_len);
  size_t len = out.len;
  kdp_core_count(c->core, c->path, status, len);
  c->io->write(c, out.p, len);
  c->io->arm_timer(c, c->core->opt.idle_timeout);
  if (close) {
    c->closing = 1;
    c->io->close(c, 0);
  }
}

void kdp_http_error(kdp_http_conn *c, int status, int close, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  kdp_buf b = {0};
  kdp_buf_put(&b, "{\"error\":", 9);
  kdp_buf_json_str(&b, msg);
  kdp_buf_put(&b, "}\n", 2);
  const char *extra = NULL;
  if (status == 401) extra = "WWW-Authenticate: Bearer realm=\"kdpeers\"\r\n";
  if (status == 405) {
    extra = (c->path == KDP_PATH_CONTROL || c->path == KDP_PATH_PREDICT) ? "Allow: POST\r\n"
                                                                           : "Allow: GET, HEAD\r\n";
  }
  if (status == 503) extra = "Retry-After: 1\r\n";
  kdp_http_respond(c, status, "application/json", b.p, b.len, extra, close);
  kdp_buf_free(&b);
}

/* ---- parser callbacks ---- */

static kdp_http_conn *conn_of(http_parser *p) { return p->data; }

static int over_header_limit(kdp_http_conn *c, size_t n) {
  c->header_bytes += n;
  if (c->header_bytes > c->core->opt.max_header) {
    c->error_status = 431;
    c->error_msg = "request line and headers exceed the server's max_header";
    return 1;
  }
  return 0;
}

/* Seconds left before the request being read misses its deadline: it must arrive at an average
   of at least min_rate bytes/s once the grace (header_timeout, at most idle_timeout) has
   passed. The deadline only moves later as bytes arrive. */
static double request_time_left(const kdp_http_conn *c) {
  const kdp_server_options *o = &c->core->opt;
  double grace = o->header_timeout < o->idle_timeout ? o->header_timeout : o->idle_timeout;
  double deadline = c->req_start + grace;
  if (o->min_rate > 0) deadline += (double)(c->header_bytes + c->body.len) / o->min_rate;
  return deadline - kdp_now();
}

static int on_message_begin(http_parser *p) {
  kdp_http_conn *c = conn_of(p);
  c->req_start = kdp_now();
  c->io->arm_timer(c, request_time_left(c));
  c->url_len = 0;
  c->url_overflow = 0;
  c->header_bytes = 0;
  c->field_len = 0;
  c->in_value = 0;
  c->cur_hdr = KDP_HDR_NONE;
  memset(c->hdr_len, 0, sizeof c->hdr_len);
  memset(c->hdr_overflow, 0, sizeof c->hdr_overflow);
  c->body.len = 0;
  c->error_status = 0;
  c->error_msg = NULL;
  c->path = KDP_PATH_OTHER;
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
  kdp_http_conn *c = conn_of(p);
  if (over_header_limit(c, n)) return 1;
  if (c->url_len + n >= sizeof c->url) {
    c->url_overflow = 1;
    return 0;
  }
  memcpy(c->url + c->url_len, at, n);
  c->url_len += n;
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
  kdp_http_conn *c = conn_of(p);
  if (over_header_limit(c, n)) return 1;
  if (c->in_value) {
    c->in_value = 0;
    c->field_len = 0;
  }
  if (c->field_len + n < sizeof c->field) {
    memcpy(c->field + c->field_len, at, n);
    c->field_len += n;
  } else {
    c->field_len = sizeof c->field; /* too long: matches nothing */
  }
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
  kdp_http_conn *c = conn_of(p);
  if (over_header_limit(c, n)) return 1;
  if (!c->in_value) {
    c->in_value = 1;
    c->cur_hdr = KDP_HDR_NONE;
    static const char *const names[KDP_NHDR] = {"content-type", "authorization", "expect"};
    for (int i = 0; i < KDP_NHDR; i++) {
      if (c->field_len == strlen(names[i]) && strncasecmp(c->field, names[i], c->field_len) == 0)
        c->cur_hdr = i;
    }
    if (c->cur_hdr != KDP_HDR_NONE) {
      /* a repeated header replaces the earlier one */
      c->hdr_len[c->cur_hdr] = 0;
      c->hdr_overflow[c->cur_hdr] = 0;
    }
  }
  if (c->cur_hdr == KDP_HDR_NONE) return 0;
  int h = c->cur_hdr;
  if (c->hdr_len[h] + n >= sizeof c->hdr[h]) {
    c->hdr_overflow[h] = 1;
    return 0;
  }
  memcpy(c->hdr[h] + c->hdr_len[h], at, n);
  c->hdr_len[h] += n;
  c->hdr[h][c->hdr_len[h]] = 0;
  return 0;
}

static int path_index(const char *url, size_t len) {
  size_t n = 0;
  while (n < len && url[n] != '?' && url[n] != '#') n++;
  for (int i = 0; i < KDP_PATH_OTHER; i++) {
    const char *name = kdp_path_names[i];
    size_t k = strlen(name);
    int prefix = k > 1 && name[k - 1] == '/'; /* "/assets/": the files below it */
    if ((prefix ? n > k : n == k) && memcmp(url, name, k) == 0) return i;
  }
  return KDP_PATH_OTHER;
}

static int on_headers_complete(http_parser *p) {
  kdp_http_conn *c = conn_of(p);
  c->path = c->url_overflow ? KDP_PATH_OTHER : path_index(c->url, c->url_len);
  if ((p->flags & F_CONTENTLENGTH) && p->content_length > c->core->opt.max_body) {
    c->error_status = 413;
    c->error_msg = "request body exceeds the server's max_body";
    return -1; /* stops the parser before any body byte */
  }
  if (c->hdr_len[KDP_HDR_EXPECT] && strcasecmp(c->hdr[KDP_HDR_EXPECT], "100-continue") == 0 &&
      p->http_major == 1 && p->http_minor >= 1) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    char *b = kdp_xmalloc(sizeof cont - 1);
    memcpy(b, cont, sizeof cont - 1);
    c->io->write(c, b, sizeof cont - 1);
  }
  return 0;
}

/* Grows c's body buffer to hold n more bytes, within the server-wide max_body_total (the sum
   of every connection's body buffer); 0, or -1 if that would exceed it. */
static int body_reserve(kdp_http_conn *c, size_t n) {
  kdp_buf *b = &c->body;
  size_t need = b->len + n + 1;
  if (need <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need) cap *= 2;
  /* no more than a declared Content-Length needs (http-parser has already taken this chunk off
     content_length: it holds what is still to come) */
  if (c->parser.flags & F_CONTENTLENGTH) {
    uint64_t total = (uint64_t)need + c->parser.content_length;
    if (total < cap) cap = (size_t)total;
  }
  kdp_srv_core *core = c->core;
  pthread_mutex_lock(&core->mu);
  int ok = core->st.body_bytes - b->cap + cap <= core->opt.max_body_total;
  if (ok) core->st.body_bytes = core->st.body_bytes - b->cap + cap;
  else core->st.bodies_refused++;
  pthread_mutex_unlock(&core->mu);
  if (!ok) return -1;
  kdp_buf_reserve(b, cap);
  return 0;
}

/* Frees c's body buffer and gives its bytes back to max_body_total. */
static void body_release(kdp_http_conn *c) {
  if (c->body.cap) {
    pthread_mutex_lock(&c->core->mu);
    c->core->st.body_bytes -= c->body.cap;
    pthread_mutex_unlock(&c->core->mu);
  }
  kdp_buf_free(&c->body);
}

static int on_body(http_parser *p, const char *at, size_t n) {
  kdp_http_conn *c = conn_of(p);
  if (c->body.len + n > c->core->opt.max_body) {
    c->error_status = 413;
    c->error_msg = "request body exceeds the server's max_body";
    return 1;
  }
  if (body_reserve(c, n) != 0) {
    c->error_status = 503;
    c->error_msg = "server busy: the request bodies being received exceed server.max_body_total; "
                   "retry later";
    return 1;
  }
  kdp_buf_put(&c->body, at, n);
  return 0;
}

static int on_message_complete(http_parser *p) {
  kdp_http_conn *c = conn_of(p);
  c->req_start = 0;
  c->keep_alive = http_should_keep_alive(p) && !p->upgrade;
  if (p->method == HTTP_CONNECT) c->keep_alive = 0;
  http_parser_pause(p, 1); /* kdp_http_conn_feed routes it, then resumes */
  return 0;
}

static const http_parser_settings settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- connection ---- */

void kdp_http_conn_set_pending(kdp_http_conn *c, kdp_predict_priv *p) {
  c->core->predicting += (p != NULL) - (c->pending != NULL);
  c->pending = p;
}

void kdp_http_conn_init(kdp_http_conn *c, kdp_srv_core *core, const kdp_http_io *io, void *user) {
  memset(c, 0, sizeof *c);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  c->core = core;
  c->io = io;
  c->user = user;
  c->keep_alive = 1;
  c->path = KDP_PATH_OTHER;
}

static void hold(kdp_http_conn *c, const char *data, size_t len) {
  if (!len) return;
  char *h = kdp_xrealloc(c->held, c->held_len + len);
  memcpy(h + c->held_len, data, len);
  c->held = h;
  c->held_len += len;
}

static void parse_failed(kdp_http_conn *c, enum http_errno e) {
  c->keep_alive = 0;
  body_release(c); /* the connection only lingers now */
  if (c->error_status) {
    kdp_http_error(c, c->error_status, 1, "%s", c->error_msg ? c->error_msg : "bad request");
  } else if (e == HPE_HEADER_OVERFLOW) {
    kdp_http_error(c, 431, 1, "request headers too large");
  } else {
    kdp_http_error(c, 400, 1, "malformed HTTP request: %s", http_errno_description(e));
  }
}

void kdp_http_conn_feed(kdp_http_conn *c, const char *data, size_t len) {
  if (c->closing || !len) return;
  if (c->paused) {
    hold(c, data, len);
    return;
  }
  while (len > 0 && !c->closing) {
    size_t n = http_parser_execute(&c->parser, &settings, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_PAUSED) {
      http_parser_pause(&c->parser, 0);
      data += n;
      len -= n;
      kdp_route(c);
      if (c->body.cap > KDP_KEEP_BODY) body_release(c); /* routes are done with it */
      if (c->closing) return;
      if (!c->paused && c->io->backlog(c) > KDP_MAX_BACKLOG) {
        c->paused = 1; /* resumed by kdp_http_conn_drained */
        c->io->pause_input(c, 1);
      }
      if (c->paused) {
        hold(c, data, len);
        return;
      }
      continue;
    }
    if (e != HPE_OK || n != len) {
      parse_failed(c, e == HPE_OK ? HPE_UNKNOWN : e);
      return;
    }
    break;
  }
}

static void resume(kdp_http_conn *c) {
  c->paused = 0;
  char *h = c->held;
  size_t n = c->held_len;
  c->held = NULL;
  c->held_len = 0;
  if (h) {
    kdp_http_conn_feed(c, h, n);
    free(h);
  }
  if (!c->closing && !c->paused) c->io->pause_input(c, 0);
}

void kdp_http_conn_drained(kdp_http_conn *c) {
  if (c->closing || c->pending) return; /* a pending prediction keeps its own deadline */
  double left = c->req_start > 0 ? request_time_left(c) : c->core->opt.idle_timeout;
  c->io->arm_timer(c, left > 0.001 ? left : 0.001);
  if (c->paused) resume(c);
}

void kdp_http_conn_timeout(kdp_http_conn *c) {
  if (c->closing) return;
  if (!c->pending && c->req_start > 0) {
    double left = request_time_left(c); /* bytes arrived since the timer was armed */
    if (left > 0) {
      c->io->arm_timer(c, left);
      return;
    }
  }
  if (c->pending) {
    kdp_core_cancel_predict(c->core, c->pending);
    kdp_http_conn_set_pending(c, NULL);
    c->path = KDP_PATH_PREDICT;
    kdp_http_error(c, 504, 1, "the trainer did not answer within %g s",
                   c->core->opt.predict_timeout);
    return;
  }
  pthread_mutex_lock(&c->core->mu);
  c->core->st.timeouts++;
  pthread_mutex_unlock(&c->core->mu);
  c->closing = 1;
  c->io->close(c, 1); /* idle, slow or not reading: no reply */
}

void kdp_http_conn_shutdown(kdp_http_conn *c) {
  if (c->closing) return;
  if (c->pending) {
    kdp_core_cancel_predict(c->core, c->pending);
    kdp_http_conn_set_pending(c, NULL);
    c->path = KDP_PATH_PREDICT;
    kdp_http_error(c, 503, 1, "server stopping: the trainer has ended");
    return;
  }
  c->closing = 1;
  c->io->close(c, 0);
}

void kdp_http_conn_release(kdp_http_conn *c) {
  c->closing = 1;
  if (c->pending) {
    kdp_core_cancel_predict(c->core, c->pending);
    kdp_http_conn_set_pending(c, NULL);
  }
  body_release(c);
  free(c->held);
  c->held = NULL;
  c->held_len = 0;
}

void kdp_http_conn_predict_done(kdp_http_conn *c, kdp_predict_priv *p) {
  if (c->pending != p || c->closing) return;
  kdp_http_conn_set_pending(c, NULL);
  c->path = KDP_PATH_PREDICT;
  if (p->status != 200) {
    kdp_http_error(c, p->status, 0, "%s", p->errmsg);
  } else {
    kdp_buf out = {0};
    kdp_format_predict(p, &out);
    kdp_http_respond(c, 200, p->pub.msgpack ? "application/msgpack" : "application/json",
                     out.p ? out.p : "", out.len, NULL, 0);
    kdp_buf_free(&out);
  }
  if (!c->closing) resume(c);
}
