/* test_serve.c: the HTTP server driven over real loopback sockets by a small blocking client:
   endpoints, status codes, keep-alive, token, control queue, predict round trips (JSON and
   msgpack) with a fake trainer thread, limits, timeouts, slow clients and clean stop. */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <msgpack.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/config.h"
#include "kdpeers/serve.h"
#include "kdpeers/train.h"
#include "../src/serve/serve_internal.h" /* kdp_fmt_g7 */
#include "../src/train/train_internal.h" /* the last evaluation's table (/metrics, /status) */
#include "testutil.h"

/* ---- a tiny blocking HTTP/1.1 client ---- */

typedef struct client {
  int fd;
  char buf[1 << 20];
  size_t len;
} client;

typedef struct resp {
  int status;
  char head[8192];
  char *body;
  size_t body_len;
} resp;

static client *cl_open(int port) {
  client *c = calloc(1, sizeof *c);
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  ck_assert_int_ge(c->fd, 0);
  struct timeval tv = {5, 0}; /* never hang a test */
  setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ck_assert_msg(connect(c->fd, (struct sockaddr *)&a, sizeof a) == 0, "connect: %s",
                strerror(errno));
  return c;
}

static void cl_close(client *c) {
  close(c->fd);
  free(c);
}

static int cl_send(client *c, const void *data, size_t n) {
  const char *p = data;
  while (n) {
    ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Reads more bytes; 0 on EOF, -1 on error/timeout. */
static ssize_t cl_fill(client *c) {
  if (c->len == sizeof c->buf) return -1;
  ssize_t r = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
  if (r > 0) c->len += (size_t)r;
  return r;
}

static void resp_free(resp *r) {
  free(r->body);
  r->body = NULL;
}

/* Reads one response (skipping 100 Continue); 0 ok, -1 if the connection ended first. */
static int cl_read(client *c, resp *r) {
  memset(r, 0, sizeof *r);
  for (;;) {
    char *end = NULL;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4)))
      if (cl_fill(c) <= 0) return -1;
    size_t hlen = (size_t)(end - c->buf) + 4;
    ck_assert_uint_lt(hlen, sizeof r->head);
    memcpy(r->head, c->buf, hlen);
    r->head[hlen] = 0;
    ck_assert_msg(sscanf(r->head, "HTTP/1.1 %d", &r->status) == 1, "bad status line: %s", r->head);
    memmove(c->buf, c->buf + hlen, c->len - hlen);
    c->len -= hlen;
    if (r->status == 100) continue;
    const char *cl = strcasestr(r->head, "\r\nContent-Length:");
    ck_assert_msg(cl != NULL, "no Content-Length in %s", r->head);
    size_t n = strtoul(cl + 17, NULL, 10);
    while (c->len < n)
      if (cl_fill(c) <= 0) return -1;
    r->body = malloc(n + 1);
    memcpy(r->body, c->buf, n);
    r->body[n] = 0;
    r->body_len = n;
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    return 0;
  }
}

/* 1 if the server closed the connection (EOF or reset) within the receive timeout. */
static int cl_sees_eof(client *c) {
  for (;;) {
    ssize_t r = cl_fill(c);
    if (r == 0) return 1;
    if (r < 0) return errno == ECONNRESET;
  }
}

/* One request on a fresh connection. */
static int req1(int port, const char *raw, size_t n, resp *r) {
  client *c = cl_open(port);
  ck_assert_int_eq(cl_send(c, raw, n), 0);
  int rc = cl_read(c, r);
  cl_close(c);
  return rc;
}

static int get(int port, const char *path, resp *r) {
  char raw[512];
  int n = snprintf(raw, sizeof raw, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path);
  return req1(port, raw, (size_t)n, r);
}

/* GET (or HEAD: method) with an optional Authorization header value */
static int get_as(int port, const char *method, const char *path, const char *auth, resp *r) {
  char raw[1024];
  int n = snprintf(raw, sizeof raw, "%s %s HTTP/1.1\r\nHost: t\r\n%s%s%s\r\n", method, path,
                   auth ? "Authorization: " : "", auth ? auth : "", auth ? "\r\n" : "");
  if (strcmp(method, "HEAD") != 0) return req1(port, raw, (size_t)n, r);
  /* HEAD: the headers alone (their Content-Length is GET's) */
  client *c = cl_open(port);
  ck_assert_int_eq(cl_send(c, raw, (size_t)n), 0);
  memset(r, 0, sizeof *r);
  char *end = NULL;
  int rc = 0;
  while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4)))
    if (cl_fill(c) <= 0) {
      rc = -1;
      break;
    }
  if (rc == 0) {
    size_t hlen = (size_t)(end - c->buf) + 4;
    ck_assert_uint_lt(hlen, sizeof r->head);
    memcpy(r->head, c->buf, hlen);
    ck_assert_int_eq(sscanf(r->head, "HTTP/1.1 %d", &r->status), 1);
    ck_assert_uint_eq(c->len, hlen); /* no body after the headers */
  }
  cl_close(c);
  return rc;
}

static int post(int port, const char *path, const char *auth, const char *ctype, const void *body,
                size_t len, resp *r) {
  char raw[8192];
  int n = snprintf(raw, sizeof raw,
                   "POST %s HTTP/1.1\r\nHost: t\r\n%s%s%s%s%s%sContent-Length: %zu\r\n\r\n", path,
                   auth ? "Authorization: " : "", auth ? auth : "", auth ? "\r\n" : "",
                   ctype ? "Content-Type: " : "", ctype ? ctype : "", ctype ? "\r\n" : "", len);
  ck_assert(len + (size_t)n < sizeof raw);
  memcpy(raw + n, body, len);
  return req1(port, raw, (size_t)n + len, r);
}

/* The "error" message of a JSON error body, decoded (static buffer). */
static const char *err_msg(const resp *r) {
  static char msg[1024];
  json_object *o = json_tokener_parse(r->body), *e;
  ck_assert_msg(o && json_object_object_get_ex(o, "error", &e), "not an error body: %s", r->body);
  snprintf(msg, sizeof msg, "%s", json_object_get_string(e));
  json_object_put(o);
  return msg;
}

/* ---- server helpers ---- */

enum { DIM = 4, P = 2, C = 3 };

static kdp_server *start(kdp_server_options *o) {
  kdp_server *s = NULL;
  kdp_error err = {{0}};
  int rc = kdp_server_start(&s, o, &err);
  ck_assert_msg(rc == 0, "server start failed: %s", err.msg);
  ck_assert_int_gt(kdp_server_port(s), 0);
  return s;
}

static void opts(kdp_server_options *o) {
  kdp_server_options_defaults(o);
  o->port = 0;
  o->quiet = 1;
  o->input_dim = DIM;
  o->max_predict = 8;
}

static double now_s(void) { return kdp_now(); }

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ---- core ---- */

START_TEST(test_get_endpoints) {
  char *dir = kdp_test_tmpdir();
  char addr_file[512];
  snprintf(addr_file, sizeof addr_file, "%s/server.addr", dir);
  kdp_server_options o;
  opts(&o);
  o.addr_file = addr_file;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);

  /* address file */
  char expect[128], got[128] = "";
  snprintf(expect, sizeof expect, "http://127.0.0.1:%d", port);
  ck_assert_str_eq(kdp_server_address(s), expect);
  FILE *f = fopen(addr_file, "r");
  ck_assert_ptr_nonnull(f);
  ck_assert_ptr_nonnull(fgets(got, sizeof got, f));
  fclose(f);
  strcat(expect, "\n");
  ck_assert_str_eq(got, expect);

  resp r;
  ck_assert_int_eq(get(port, "/healthz", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"status\":\"ok\""));
  ck_assert_ptr_nonnull(strstr(r.body, "\"last_publish_age_seconds\":null"));
  resp_free(&r);
  ck_assert_int_eq(get(port, "/status", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_str_eq(r.body, "{}\n");
  resp_free(&r);

  kdp_server_publish(s, "# HELP kdpeers_train_step Steps.\n# TYPE kdpeers_train_step counter\n"
                        "kdpeers_train_step 42\n",
                     "{\"step\":42,\"epoch\":1}");
  ck_assert_int_eq(get(port, "/metrics", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: text/plain; version=0.0.4"));
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_train_step 42\n"));
  const char *names[] = {"kdpeers_http_requests_total", "kdpeers_server_connections_open",
                         "kdpeers_server_loop_lag_seconds", "kdpeers_server_sent_bytes_total"};
  for (int i = 0; i < 4; i++) {
    char line[160];
    snprintf(line, sizeof line, "# TYPE %s ", names[i]);
    ck_assert_msg(strstr(r.body, line) != NULL, "missing %s", line);
    snprintf(line, sizeof line, "# HELP %s ", names[i]);
    ck_assert_msg(strstr(r.body, line) != NULL, "missing %s", line);
  }
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/healthz\",code=\"200\"} 1\n"));
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/status\",code=\"200\"} 1\n"));
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_server_connections_open 1\n"));
  /* every sample line is "name[{labels}] value" with a kdpeers_ name and a finite number */
  char *save = NULL, *body = strdup(r.body);
  for (char *ln = strtok_r(body, "\n", &save); ln; ln = strtok_r(NULL, "\n", &save)) {
    if (ln[0] == '#') continue;
    ck_assert_msg(strncmp(ln, "kdpeers_", 8) == 0, "bad metric line: %s", ln);
    char *sp = strrchr(ln, ' ');
    ck_assert_ptr_nonnull(sp);
    char *endp;
    double v = strtod(sp + 1, &endp);
    ck_assert_msg(*endp == 0 && isfinite(v), "bad value in: %s", ln);
  }
  free(body);
  resp_free(&r);

  ck_assert_int_eq(get(port, "/status?pretty=1", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: application/json"));
  ck_assert_str_eq(r.body, "{\"step\":42,\"epoch\":1}\n");
  resp_free(&r);
  ck_assert_int_eq(get(port, "/healthz", &r), 0);
  double age = -1;
  const char *a = strstr(r.body, "\"last_publish_age_seconds\":");
  ck_assert_ptr_nonnull(a);
  age = strtod(a + 27, NULL);
  ck_assert(age >= 0 && age < 5);
  resp_free(&r);

  /* one request with curl, if the machine has it */
  if (system("command -v curl >/dev/null 2>&1") == 0) {
    char cmd[1024], out[512];
    snprintf(out, sizeof out, "%s/curl.out", dir);
    snprintf(cmd, sizeof cmd, "curl -s -m 5 -o %s -w '%%{http_code}' %s/healthz > %s/code", out,
             kdp_server_address(s), dir);
    ck_assert_int_eq(system(cmd), 0);
    char path[600], code[16] = "", text[256] = "";
    snprintf(path, sizeof path, "%s/code", dir);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(fgets(code, sizeof code, f));
    fclose(f);
    ck_assert_str_eq(code, "200");
    f = fopen(out, "r");
    ck_assert_ptr_nonnull(fgets(text, sizeof text, f));
    fclose(f);
    ck_assert_ptr_nonnull(strstr(text, "\"status\":\"ok\""));
  }
  kdp_server_stop(s);
  ck_assert_int_ne(access(addr_file, F_OK), 0); /* removed at stop */
  free(dir);
}
END_TEST

START_TEST(test_keepalive) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  client *c = cl_open(kdp_server_port(s));
  resp r;
  const char *g = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
  ck_assert_int_eq(cl_send(c, g, strlen(g)), 0);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Connection: keep-alive"));
  resp_free(&r);
  /* second request on the same socket, then two pipelined in one write */
  const char *st = "GET /status HTTP/1.1\r\nHost: t\r\n\r\n";
  ck_assert_int_eq(cl_send(c, st, strlen(st)), 0);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  const char *two = "GET /healthz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n";
  ck_assert_int_eq(cl_send(c, two, strlen(two)), 0);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 404);
  resp_free(&r);
  kdp_server_stats stt;
  kdp_server_get_stats(s, &stt);
  ck_assert_uint_eq(stt.connections_total, 1);
  ck_assert_uint_eq(stt.requests, 4);
  /* HTTP/1.0 without keep-alive: answered, then closed */
  const char *old = "GET /healthz HTTP/1.0\r\n\r\n";
  ck_assert_int_eq(cl_send(c, old, strlen(old)), 0);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Connection: close"));
  resp_free(&r);
  ck_assert(cl_sees_eof(c));
  cl_close(c);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_status_codes) {
  kdp_server_options o;
  opts(&o);
  o.max_body = 2048;
  o.max_header = 1024;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  resp r;
  ck_assert_int_eq(get(port, "/nope", &r), 0);
  ck_assert_int_eq(r.status, 404);
  ck_assert_ptr_nonnull(strstr(r.body, "\"error\""));
  resp_free(&r);
  ck_assert_int_eq(post(port, "/metrics", NULL, NULL, "", 0, &r), 0);
  ck_assert_int_eq(r.status, 405);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Allow: GET"));
  resp_free(&r);
  ck_assert_int_eq(get(port, "/control", &r), 0);
  ck_assert_int_eq(r.status, 405);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Allow: POST"));
  resp_free(&r);
  const char *bad = "BLAH /x HTTP/1.1\r\n\r\n";
  ck_assert_int_eq(req1(port, bad, strlen(bad), &r), 0);
  ck_assert_int_eq(r.status, 400);
  resp_free(&r);
  const char *bad2 = "GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n";
  ck_assert_int_eq(req1(port, bad2, strlen(bad2), &r), 0);
  ck_assert_int_eq(r.status, 400);
  resp_free(&r);

  /* 413 is sent as soon as the headers announce too large a body (no body sent at all) */
  const char *big = "POST /control HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n";
  ck_assert_int_eq(req1(port, big, strlen(big), &r), 0);
  ck_assert_int_eq(r.status, 413);
  resp_free(&r);
  /* chunked bodies are counted as they arrive */
  char raw[8192];
  int n = snprintf(raw, sizeof raw, "POST /control HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    "%x\r\n", 3000);
  memset(raw + n, 'x', 3000);
  ck_assert_int_eq(req1(port, raw, (size_t)n + 3000, &r), 0);
  ck_assert_int_eq(r.status, 413);
  resp_free(&r);

  /* 431: headers beyond max_header */
  n = snprintf(raw, sizeof raw, "GET /healthz HTTP/1.1\r\nX-Junk: ");
  memset(raw + n, 'a', 2000);
  memcpy(raw + n + 2000, "\r\n\r\n", 4);
  ck_assert_int_eq(req1(port, raw, (size_t)n + 2004, &r), 0);
  ck_assert_int_eq(r.status, 431);
  resp_free(&r);

  /* /control body errors */
  struct {
    const char *body, *needle;
  } cases[] = {
      {"", "empty body"},
      {"{\"action\":", "invalid JSON"},
      {"[1,2]", "expected a JSON object"},
      {"{\"action\":\"explode\"}", "\"action\" must be one of"},
      {"{\"action\":\"stop\",\"bogus\":1}", "unknown field \"bogus\""},
      {"{\"lr_scale\":-1}", "\"lr_scale\" must be a finite number > 0"},
      {"{\"temperature\":0}", "\"temperature\" must be"},
      {"{\"kd_weight\":\"2\"}", "\"kd_weight\" must be"},
      {"{\"lr_scale\":1e999}", "\"lr_scale\" must be"},
      {"{\"lr_scale\":NaN}", "must be a finite number"}, /* json-c reads NaN */
      {"{}", "nothing to do"},
      {"{\"action\":\"stop\"} x", "invalid JSON"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    ck_assert_int_eq(post(port, "/control", NULL, "application/json", cases[i].body,
                          strlen(cases[i].body), &r),
                     0);
    ck_assert_msg(r.status == 400, "%s -> %d", cases[i].body, r.status);
    ck_assert_msg(strstr(err_msg(&r), cases[i].needle) != NULL, "%s -> %s (wanted %s)",
                  cases[i].body, r.body, cases[i].needle);
    resp_free(&r);
  }
  kdp_command cmd;
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 0); /* nothing was enqueued */
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_eq(st.status_count[413], 2);
  ck_assert_uint_eq(st.status_count[431], 1);
  ck_assert_uint_eq(st.status_count[404], 1);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_token) {
  ck_assert_int_eq(kdp_server_secret_equal("abc", 3, "abc"), 1);
  ck_assert_int_eq(kdp_server_secret_equal("abd", 3, "abc"), 0);
  ck_assert_int_eq(kdp_server_secret_equal("ab", 2, "abc"), 0);
  ck_assert_int_eq(kdp_server_secret_equal("abcd", 4, "abc"), 0);
  ck_assert_int_eq(kdp_server_secret_equal("abcd", 3, "abc"), 1); /* length is explicit */
  ck_assert_int_eq(kdp_server_secret_equal("", 0, "abc"), 0);

  kdp_server_options o;
  opts(&o);
  o.token = "t0ken-XYZ";
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  const char *body = "{\"action\":\"checkpoint\"}";
  resp r;
  ck_assert_int_eq(post(port, "/control", NULL, NULL, body, strlen(body), &r), 0);
  ck_assert_int_eq(r.status, 401);
  ck_assert_ptr_nonnull(strcasestr(r.head, "WWW-Authenticate: Bearer"));
  ck_assert_ptr_null(strstr(r.body, "t0ken")); /* never echoed */
  resp_free(&r);
  const char *wrong[] = {"Bearer t0ken-XY", "Bearer t0ken-XYZZ", "Bearer t0ken-XYz",
                         "Basic dDBrZW4tWFla", "t0ken-XYZ"};
  for (int i = 0; i < 5; i++) {
    ck_assert_int_eq(post(port, "/control", wrong[i], NULL, body, strlen(body), &r), 0);
    ck_assert_msg(r.status == 401, "%s -> %d", wrong[i], r.status);
    resp_free(&r);
  }
  ck_assert_int_eq(post(port, "/predict", NULL, NULL, "{}", 2, &r), 0);
  ck_assert_int_eq(r.status, 401);
  resp_free(&r);
  ck_assert_int_eq(post(port, "/control", "Bearer t0ken-XYZ", NULL, body, strlen(body), &r), 0);
  ck_assert_int_eq(r.status, 202);
  resp_free(&r);
  ck_assert_int_eq(post(port, "/control", "bearer  t0ken-XYZ", NULL, body, strlen(body), &r), 0);
  ck_assert_int_eq(r.status, 202);
  resp_free(&r);
  ck_assert_int_eq(get(port, "/metrics", &r), 0); /* the scrape target stays open */
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/control\",code=\"401\"} 6\n"));
  resp_free(&r);
  /* the run's details need the token; the probe and the dashboard's files do not */
  const char *open_paths[] = {"/healthz", "/", "/assets/chart.js", "/assets/dashboard.js"};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(get(port, open_paths[i], &r), 0);
    ck_assert_msg(r.status == 200, "%s without a token -> %d", open_paths[i], r.status);
    resp_free(&r);
  }
  const char *closed[] = {"/status", "/history", "/history?since=3"};
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(get(port, closed[i], &r), 0);
    ck_assert_msg(r.status == 401, "%s without a token -> %d", closed[i], r.status);
    ck_assert_ptr_nonnull(strcasestr(r.head, "WWW-Authenticate: Bearer"));
    resp_free(&r);
    ck_assert_int_eq(get_as(port, "GET", closed[i], "Bearer t0ken-XYz", &r), 0);
    ck_assert_msg(r.status == 401, "%s with a wrong token -> %d", closed[i], r.status);
    resp_free(&r);
    ck_assert_int_eq(get_as(port, "GET", closed[i], "Bearer t0ken-XYZ", &r), 0);
    ck_assert_msg(r.status == 200, "%s with the token -> %d", closed[i], r.status);
    resp_free(&r);
    ck_assert_int_eq(get_as(port, "HEAD", closed[i], NULL, &r), 0);
    ck_assert_msg(r.status == 401, "HEAD %s without a token -> %d", closed[i], r.status);
    resp_free(&r);
  }
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_eq(st.auth_failures, 7 + 3 * 3);
  kdp_command cmd;
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 1);
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 1);
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 0);
  kdp_server_stop(s);
}
END_TEST

static uint64_t reply_id(const char *body) {
  const char *p = strstr(body, "\"id\":");
  ck_assert_ptr_nonnull(p);
  return strtoull(p + 5, NULL, 10);
}

START_TEST(test_control_commands) {
  kdp_server_options o;
  opts(&o);
  o.max_commands = 3;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  const char *bodies[] = {"{\"action\":\"checkpoint\"}",
                          "{\"lr_scale\":0.5,\"temperature\":4,\"kd_weight\":2.25}",
                          "{\"kd_weight\":1.5,\"action\":\"pause\"}"};
  uint64_t ids[3];
  resp r;
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(post(port, "/control", NULL, "application/json", bodies[i],
                          strlen(bodies[i]), &r),
                     0);
    ck_assert_int_eq(r.status, 202);
    ck_assert_ptr_nonnull(strstr(r.body, "\"accepted\":true"));
    ids[i] = reply_id(r.body);
    resp_free(&r);
  }
  ck_assert(ids[0] < ids[1] && ids[1] < ids[2]);
  /* queue full (max_commands = 3) */
  ck_assert_int_eq(post(port, "/control", NULL, NULL, bodies[0], strlen(bodies[0]), &r), 0);
  ck_assert_int_eq(r.status, 503);
  resp_free(&r);

  kdp_command c;
  ck_assert_int_eq(kdp_server_poll_command(s, &c), 1);
  ck_assert_uint_eq(c.id, ids[0]);
  ck_assert_int_eq(c.action, KDP_ACTION_CHECKPOINT);
  ck_assert(!c.has_lr_scale && !c.has_temperature && !c.has_kd_weight);
  ck_assert_int_eq(kdp_server_poll_command(s, &c), 1);
  ck_assert_uint_eq(c.id, ids[1]);
  ck_assert_int_eq(c.action, KDP_ACTION_NONE);
  ck_assert(c.has_lr_scale && c.has_temperature && c.has_kd_weight);
  ck_assert_double_eq(c.lr_scale, 0.5);
  ck_assert_double_eq(c.temperature, 4.0);
  ck_assert_double_eq(c.kd_weight, 2.25);
  ck_assert_int_eq(kdp_server_poll_command(s, &c), 1);
  ck_assert_uint_eq(c.id, ids[2]);
  ck_assert_int_eq(c.action, KDP_ACTION_PAUSE);
  ck_assert(c.has_kd_weight && !c.has_lr_scale);
  ck_assert_double_eq(c.kd_weight, 1.5);
  ck_assert_int_eq(kdp_server_poll_command(s, &c), 0);
  /* room again; every action name maps */
  const char *acts[] = {"stop", "resume"};
  kdp_action want[] = {KDP_ACTION_STOP, KDP_ACTION_RESUME};
  for (int i = 0; i < 2; i++) {
    char b[64];
    snprintf(b, sizeof b, "{\"action\":\"%s\"}", acts[i]);
    ck_assert_int_eq(post(port, "/control", NULL, NULL, b, strlen(b), &r), 0);
    ck_assert_int_eq(r.status, 202);
    resp_free(&r);
    ck_assert_int_eq(kdp_server_poll_command(s, &c), 1);
    ck_assert_int_eq(c.action, want[i]);
  }
  kdp_server_stop(s);
}
END_TEST

/* ---- predict ---- */

/* The fake trainer's model: peer k's probability of class j for input row x. */
static float fake_prob(int k, const float *x, int j) {
  float z[C], sum = 0;
  for (int c = 0; c < C; c++) {
    z[c] = expf((x[c] - x[c + 1]) / 255.0f * (float)(k + 1) + (float)c * 0.1f);
    sum += z[c];
  }
  return z[j] / sum;
}

typedef struct trainer {
  kdp_server *s;
  int n_answer;      /* requests to answer, then exit */
  int with_teacher;
  float seen[64 * DIM];
  int seen_n;
} trainer;

static void *trainer_main(void *arg) {
  trainer *t = arg;
  int done = 0;
  double t0 = now_s();
  while (done < t->n_answer && now_s() - t0 < 10) {
    kdp_predict_req *q = kdp_server_take_predict(t->s);
    if (!q) {
      sleep_ms(2);
      continue;
    }
    ck_assert_int_eq(q->input_dim, DIM);
    int n = q->n;
    if (t->seen_n + n <= 64) {
      memcpy(t->seen + (size_t)t->seen_n * DIM, q->x, (size_t)n * DIM * sizeof(float));
      t->seen_n += n;
    }
    float *peers = malloc(sizeof(float) * P * (size_t)n * C);
    float *ens = calloc((size_t)n * C, sizeof(float));
    for (int k = 0; k < P; k++)
      for (int i = 0; i < n; i++)
        for (int j = 0; j < C; j++) {
          float v = fake_prob(k, q->x + (size_t)i * DIM, j);
          peers[((size_t)k * n + i) * C + j] = v;
          ens[(size_t)i * C + j] += v / P;
        }
    kdp_predict_result res = {P, C, peers, ens, t->with_teacher ? peers : NULL, "wrn-40-2"};
    ck_assert_int_eq(kdp_server_answer_predict(t->s, q, &res), 0);
    free(peers);
    free(ens);
    done++;
  }
  return NULL;
}

static double jnum(json_object *a, size_t i) {
  return json_object_get_double(json_object_array_get_idx(a, i));
}

START_TEST(test_predict_json) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  trainer t = {.s = s, .n_answer = 2, .with_teacher = 1};
  pthread_t th;
  pthread_create(&th, NULL, trainer_main, &t);

  const char *body = "{\"inputs\":[[0,10,200,255],[12.5,0,0,3]]}";
  /* the predict request and a pipelined GET: the GET waits for the prediction */
  char raw[1024];
  int n = snprintf(raw, sizeof raw,
                   "POST /predict HTTP/1.1\r\nContent-Type: application/json\r\n"
                   "Content-Length: %zu\r\n\r\n%sGET /healthz HTTP/1.1\r\n\r\n",
                   strlen(body), body);
  client *c = cl_open(port);
  ck_assert_int_eq(cl_send(c, raw, (size_t)n), 0);
  resp r;
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: application/json"));
  json_object *root = json_tokener_parse(r.body);
  ck_assert_ptr_nonnull(root);
  json_object *v;
  ck_assert(json_object_object_get_ex(root, "n", &v) && json_object_get_int(v) == 2);
  ck_assert(json_object_object_get_ex(root, "classes", &v) && json_object_get_int(v) == C);
  const float x[2][DIM] = {{0, 10, 200, 255}, {12.5f, 0, 0, 3}};
  json_object *peers, *ens, *teacher, *labels;
  ck_assert(json_object_object_get_ex(root, "peers", &peers));
  ck_assert_uint_eq(json_object_array_length(peers), P);
  ck_assert(json_object_object_get_ex(root, "ensemble", &ens));
  ck_assert(json_object_object_get_ex(root, "teacher", &teacher));
  ck_assert(json_object_object_get_ex(root, "labels", &labels));
  json_object *tname, *tprobs, *lens;
  ck_assert(json_object_object_get_ex(teacher, "name", &tname));
  ck_assert_str_eq(json_object_get_string(tname), "wrn-40-2");
  ck_assert(json_object_object_get_ex(teacher, "probs", &tprobs));
  ck_assert(json_object_object_get_ex(labels, "ensemble", &lens));
  for (int i = 0; i < 2; i++) {
    float e[C] = {0};
    for (int k = 0; k < P; k++) {
      json_object *row = json_object_array_get_idx(json_object_array_get_idx(peers, (size_t)k),
                                                   (size_t)i);
      ck_assert_uint_eq(json_object_array_length(row), C);
      for (int j = 0; j < C; j++) {
        float want = fake_prob(k, x[i], j);
        ck_assert_msg(fabs(jnum(row, (size_t)j) - want) < 1e-6, "peer %d row %d class %d", k, i, j);
        e[j] += want / P;
      }
    }
    json_object *erow = json_object_array_get_idx(ens, (size_t)i);
    int best = 0;
    for (int j = 0; j < C; j++) {
      ck_assert(fabs(jnum(erow, (size_t)j) - e[j]) < 1e-6);
      if (e[j] > e[best]) best = j;
    }
    ck_assert_int_eq(json_object_get_int(json_object_array_get_idx(lens, (size_t)i)), best);
    json_object *trow = json_object_array_get_idx(tprobs, (size_t)i);
    ck_assert(fabs(jnum(trow, 0) - fake_prob(0, x[i], 0)) < 1e-6);
  }
  json_object_put(root);
  resp_free(&r);
  ck_assert_int_eq(cl_read(c, &r), 0); /* the pipelined GET, answered after the prediction */
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"status\":\"ok\""));
  resp_free(&r);

  /* single {"input": [...]} on the same connection */
  const char *one = "{\"input\":[1,2,3,4]}";
  n = snprintf(raw, sizeof raw, "POST /predict HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s",
               strlen(one), one);
  ck_assert_int_eq(cl_send(c, raw, (size_t)n), 0);
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"n\":1,"));
  resp_free(&r);
  cl_close(c);
  pthread_join(th, NULL);
  /* the trainer saw the raw pixel values */
  ck_assert_int_eq(t.seen_n, 3);
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < DIM; j++) ck_assert(t.seen[i * DIM + j] == x[i][j]);
  ck_assert(t.seen[2 * DIM + 3] == 4.0f);
  kdp_server_stop(s);
}
END_TEST

/* JSON bodies (parsed by json-c): the accepted forms give the right values, malformed ones 400. */
START_TEST(test_predict_json_forms) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  struct {
    const char *body;
    float x[2][DIM];
    int n;
  } ok[] = {
      {"{\"inputs\":[[0,1,2,255],[3,40,5,6]]}", {{0, 1, 2, 255}, {3, 40, 5, 6}}, 2},
      {" {\n \"inputs\" : [ [0 ,1,\t2, 255] ,\r\n[3,4,5,6] ] }\r\n", {{0, 1, 2, 255}, {3, 4, 5, 6}}, 2},
      {"{\"input\":[ 9 , 99 , 199 , 0 ]}", {{9, 99, 199, 0}}, 1},
      /* not plain: json-c parses these */
      {"{\"input\":[00,1e2,1.,2.50]}", {{0, 100, 1, 2.5f}}, 1},
      {"{\"inputs\":[[1,2,3,4.0]],\"inputs\":[[5,6,7,8]]}", {{5, 6, 7, 8}}, 1},
  };
  const int n_ok = (int)(sizeof ok / sizeof ok[0]);
  trainer t = {.s = s, .n_answer = n_ok};
  pthread_t th;
  pthread_create(&th, NULL, trainer_main, &t);
  resp r;
  int rows = 0;
  for (int i = 0; i < n_ok; i++) {
    ck_assert_int_eq(post(port, "/predict", NULL, NULL, ok[i].body, strlen(ok[i].body), &r), 0);
    ck_assert_msg(r.status == 200, "%s -> %d %s", ok[i].body, r.status, r.body);
    resp_free(&r);
    for (int k = 0; k < ok[i].n; k++, rows++)
      for (int j = 0; j < DIM; j++)
        ck_assert_msg(t.seen[rows * DIM + j] == ok[i].x[k][j], "%s: row %d value %d is %g", ok[i].body,
                      k, j, (double)t.seen[rows * DIM + j]);
  }
  pthread_join(th, NULL);
  ck_assert_int_eq(t.seen_n, rows);
  const char *bad[] = {
      "{\"input\":[1,2,3,4]}x",    "{\"input\":[1,2,3,4],}",      "{\"input\":[01,2,3,4]}",
      "{\"inputs\":[[1,2,3,4]]]}", "{\"inputs\":[[1,2,3,4],]}",   "{\"input\":[1,2,3,4,]}",
      "{\"input\":[1,2,3,1000]}",  "{\"input\":[1 2,3,4]}",       "{\"inputs\":[[1,2,3,4][5,6,7,8]]}",
      "{\"Input\":[1,2,3,4]}",     "[{\"input\":[1,2,3,4]}]",      "{\"input\":[1,2,3,4]}{}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ck_assert_int_eq(post(port, "/predict", NULL, NULL, bad[i], strlen(bad[i]), &r), 0);
    ck_assert_msg(r.status == 400, "%s -> %d", bad[i], r.status);
    resp_free(&r);
  }
  kdp_server_stop(s);
}
END_TEST

/* The reply's numbers: kdp_fmt_g7 writes exactly what printf's %.7g does. */
START_TEST(test_fmt_g7) {
  char a[32], b[32];
  size_t checked = 0;
  /* every 1999th positive float bit pattern (about a million values, 1e-45 to 3e38), and the
     negative of every 7th of those; the sanitizer builds (launch/test), where printf is ten
     times slower, take every 19999th (the release build checks them all) */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  const uint32_t stride = 19999, want = 100000;
#else
  const uint32_t stride = 1999, want = 1000000;
#endif
  for (uint32_t bits = 1; bits < 0x7f800000u; bits += stride) {
    float f;
    memcpy(&f, &bits, sizeof f);
    for (int neg = 0; neg < 2; neg++) {
      if (neg && bits % 7) continue;
      double v = neg ? -(double)f : (double)f;
      int n = kdp_fmt_g7(a, v);
      snprintf(b, sizeof b, "%.7g", v);
      ck_assert_msg(strcmp(a, b) == 0, "%.17g: %s, printf %s", v, a, b);
      ck_assert_int_eq(n, (int)strlen(b));
      checked++;
    }
  }
  /* boundaries: powers of ten, halfway cases, the switch to exponent notation, 0, -0, Inf, NaN */
  const double special[] = {0.0,         -0.0,        1.0,        0.5,         1e-4,
                            9.9999995e-5, 0.00099999995, 1.2345675, 1.23456750000001,
                            999999.95,   9999999.5,   9999999.4,  1e7,         1e-5,
                            1e-15,       9.99999999e14, 1e15,     0.1,         0.3,
                            2.0 / 3.0,   1.0 / 3.0,   123456.75,  0.000123456785,
                            INFINITY,    -INFINITY,   NAN};
  for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
    kdp_fmt_g7(a, special[i]);
    snprintf(b, sizeof b, "%.7g", special[i]);
    ck_assert_msg(strcmp(a, b) == 0, "%.17g: %s, printf %s", special[i], a, b);
  }
  /* powers of ten and their neighbours */
  for (int k = -20; k <= 20; k++) {
    double p = pow(10.0, k);
    const double around[] = {p, nextafter(p, 0), nextafter(p, INFINITY), p * 0.99999995, p * 1.00000005};
    for (int j = 0; j < 5; j++) {
      kdp_fmt_g7(a, around[j]);
      snprintf(b, sizeof b, "%.7g", around[j]);
      ck_assert_msg(strcmp(a, b) == 0, "%.17g: %s, printf %s", around[j], a, b);
    }
  }
  ck_assert_uint_gt(checked, want);
}
END_TEST

static const msgpack_object *mp_get(const msgpack_object *map, const char *key) {
  ck_assert_int_eq(map->type, MSGPACK_OBJECT_MAP);
  for (uint32_t i = 0; i < map->via.map.size; i++) {
    const msgpack_object *k = &map->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == strlen(key) &&
        memcmp(k->via.str.ptr, key, k->via.str.size) == 0)
      return &map->via.map.ptr[i].val;
  }
  ck_abort_msg("key %s missing", key);
  return NULL;
}

START_TEST(test_predict_msgpack) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  trainer t = {.s = s, .n_answer = 1, .with_teacher = 0};
  pthread_t th;
  pthread_create(&th, NULL, trainer_main, &t);
  /* {"inputs": [bin(4 pixels), [floats]]} */
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_map(&pk, 1);
  msgpack_pack_str(&pk, 6);
  msgpack_pack_str_body(&pk, "inputs", 6);
  msgpack_pack_array(&pk, 2);
  const unsigned char pix[DIM] = {255, 0, 7, 128};
  msgpack_pack_bin(&pk, DIM);
  msgpack_pack_bin_body(&pk, pix, DIM);
  msgpack_pack_array(&pk, DIM);
  const float row2[DIM] = {1.5f, 2, 250, 0};
  msgpack_pack_float(&pk, row2[0]);
  msgpack_pack_int(&pk, 2);
  msgpack_pack_double(&pk, 250);
  msgpack_pack_uint8(&pk, 0);
  resp r;
  ck_assert_int_eq(post(kdp_server_port(s), "/predict", NULL, "application/msgpack", sb.data,
                        sb.size, &r),
                   0);
  msgpack_sbuffer_destroy(&sb);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: application/msgpack"));
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  size_t off = 0;
  ck_assert_int_eq(msgpack_unpack_next(&up, r.body, r.body_len, &off), MSGPACK_UNPACK_SUCCESS);
  ck_assert_uint_eq(off, r.body_len);
  const msgpack_object *root = &up.data;
  ck_assert_uint_eq(mp_get(root, "n")->via.u64, 2);
  ck_assert_uint_eq(mp_get(root, "classes")->via.u64, C);
  ck_assert_int_eq(mp_get(root, "teacher")->type, MSGPACK_OBJECT_NIL);
  const msgpack_object *peers = mp_get(root, "peers");
  ck_assert_uint_eq(peers->via.array.size, P);
  float x[2][DIM];
  for (int j = 0; j < DIM; j++) x[0][j] = pix[j], x[1][j] = row2[j];
  for (int k = 0; k < P; k++)
    for (int i = 0; i < 2; i++) {
      const msgpack_object *row = &peers->via.array.ptr[k].via.array.ptr[i];
      ck_assert_uint_eq(row->via.array.size, C);
      for (int j = 0; j < C; j++) {
        ck_assert_int_eq(row->via.array.ptr[j].type, MSGPACK_OBJECT_FLOAT32);
        ck_assert_float_eq(row->via.array.ptr[j].via.f64, fake_prob(k, x[i], j));
      }
    }
  const msgpack_object *lab = mp_get(mp_get(root, "labels"), "ensemble");
  ck_assert_uint_eq(lab->via.array.size, 2);
  msgpack_unpacked_destroy(&up);
  resp_free(&r);
  pthread_join(th, NULL);
  ck_assert_int_eq(t.seen_n, 2);
  for (int j = 0; j < DIM; j++) ck_assert(t.seen[j] == x[0][j] && t.seen[DIM + j] == x[1][j]);
  kdp_server_stop(s);
}
END_TEST

typedef struct publisher {
  kdp_server *s;
  atomic_int stop;
  int published;
} publisher;

static void *publisher_main(void *arg) {
  publisher *p = arg;
  char m[256], st[64];
  while (!p->stop) {
    p->published++;
    snprintf(m, sizeof m, "# TYPE kdpeers_train_step counter\nkdpeers_train_step %d\n",
             p->published);
    snprintf(st, sizeof st, "{\"step\":%d}", p->published);
    kdp_server_publish(p->s, m, st);
    sleep_ms(1);
  }
  return NULL;
}

START_TEST(test_publish_while_serving) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  publisher pb = {.s = s};
  pthread_t th;
  pthread_create(&th, NULL, publisher_main, &pb);
  client *c = cl_open(port);
  int last = 0;
  for (int i = 0; i < 60; i++) {
    const char *g = (i & 1) ? "GET /metrics HTTP/1.1\r\n\r\n" : "GET /status HTTP/1.1\r\n\r\n";
    ck_assert_int_eq(cl_send(c, g, strlen(g)), 0);
    resp r;
    ck_assert_int_eq(cl_read(c, &r), 0);
    ck_assert_int_eq(r.status, 200);
    const char *p = (i & 1) ? strstr(r.body, "\nkdpeers_train_step ") : strstr(r.body, "\"step\":");
    if (p) {
      int step = atoi(p + ((i & 1) ? 20 : 7));
      ck_assert_int_ge(step, last); /* snapshots only move forward and are never torn */
      last = step;
    } else {
      ck_assert_int_eq(last, 0); /* only before the first publish */
    }
    resp_free(&r);
    sleep_ms(2);
  }
  pb.stop = 1;
  pthread_join(th, NULL);
  ck_assert_int_gt(last, 0);
  cl_close(c);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_stop_with_open_connections) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  client *idle = cl_open(port);
  client *half = cl_open(port);
  ck_assert_int_eq(cl_send(half, "GET /metr", 9), 0);
  client *waiting = cl_open(port);
  const char *body = "{\"input\":[1,2,3,4]}";
  char raw[256];
  int n = snprintf(raw, sizeof raw, "POST /predict HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(body), body);
  ck_assert_int_eq(cl_send(waiting, raw, (size_t)n), 0);
  /* wait until the prediction is queued (no trainer takes it) */
  kdp_server_stats st;
  for (int i = 0; i < 500; i++) {
    kdp_server_get_stats(s, &st);
    if (st.predict_queued == 1 && st.connections_open == 3) break;
    sleep_ms(5);
  }
  ck_assert_uint_eq(st.predict_queued, 1);
  ck_assert_int_eq(st.connections_open, 3);
  double t0 = now_s();
  kdp_server_stop(s);
  ck_assert(now_s() - t0 < 2.0);
  resp r;
  ck_assert_int_eq(cl_read(waiting, &r), 0);
  ck_assert_int_eq(r.status, 503);
  resp_free(&r);
  ck_assert(cl_sees_eof(idle));
  ck_assert(cl_sees_eof(half));
  ck_assert(cl_sees_eof(waiting));
  cl_close(idle);
  cl_close(half);
  cl_close(waiting);
}
END_TEST

/* The trainer takes a request, then stops the server without answering. */
START_TEST(test_stop_with_taken_request) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  client *c = cl_open(kdp_server_port(s));
  const char *body = "{\"input\":[1,2,3,4]}";
  char raw[256];
  int n = snprintf(raw, sizeof raw, "POST /predict HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(body), body);
  ck_assert_int_eq(cl_send(c, raw, (size_t)n), 0);
  kdp_predict_req *q = NULL;
  for (int i = 0; i < 500 && !q; i++) {
    q = kdp_server_take_predict(s);
    if (!q) sleep_ms(5);
  }
  ck_assert_ptr_nonnull(q);
  ck_assert_int_eq(q->n, 1);
  kdp_server_stop(s); /* frees q */
  resp r;
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 503);
  resp_free(&r);
  cl_close(c);
}
END_TEST

/* ---- limits ---- */

START_TEST(test_connection_cap) {
  kdp_server_options o;
  opts(&o);
  o.max_connections = 2;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  client *a = cl_open(port);
  resp r;
  const char *g = "GET /healthz HTTP/1.1\r\n\r\n";
  ck_assert_int_eq(cl_send(a, g, strlen(g)), 0);
  ck_assert_int_eq(cl_read(a, &r), 0);
  resp_free(&r);
  sleep_ms(20);
  client *b = cl_open(port);
  ck_assert_int_eq(cl_send(b, g, strlen(g)), 0);
  ck_assert_int_eq(cl_read(b, &r), 0);
  resp_free(&r);
  /* the pool is full: a newcomer is served, the connection idle the longest (a) is closed */
  client *x = cl_open(port);
  ck_assert_int_eq(cl_send(x, g, strlen(g)), 0);
  ck_assert_int_eq(cl_read(x, &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  ck_assert(cl_sees_eof(a));
  cl_close(a);
  ck_assert_int_eq(cl_send(b, g, strlen(g)), 0); /* b was more recent: still served */
  ck_assert_int_eq(cl_read(b, &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_int_eq(st.connections_open, 2);
  ck_assert_uint_eq(st.connections_evicted, 1);
  ck_assert_uint_eq(st.connections_rejected, 0);
  cl_close(b);
  cl_close(x);
  kdp_server_stop(s);
}
END_TEST

/* Slow clients fill the pool (the default 64 connections), each holding a request it never
   finishes: /healthz and /metrics must still answer 200, never 503. */
START_TEST(test_slowloris_pool) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  enum { NSLOW = 64 };
  client *slow[NSLOW];
  for (int i = 0; i < NSLOW; i++) {
    slow[i] = cl_open(port);
    ck_assert_int_eq(cl_send(slow[i], "GET /heal", 9), 0);
  }
  kdp_server_stats st;
  for (int i = 0; i < 200; i++) {
    kdp_server_get_stats(s, &st);
    if (st.connections_open == NSLOW) break;
    sleep_ms(5);
  }
  ck_assert_int_eq(st.connections_open, NSLOW);
  resp r;
  for (int i = 0; i < 20; i++) {
    ck_assert_int_eq(get(port, i % 2 ? "/metrics" : "/healthz", &r), 0);
    ck_assert_msg(r.status == 200, "request %d: %d %s", i, r.status, r.body);
    resp_free(&r);
    /* and the slow ones keep trying */
    for (int k = 0; k < NSLOW; k++) (void)send(slow[k]->fd, "t", 1, MSG_NOSIGNAL);
  }
  kdp_server_get_stats(s, &st);
  ck_assert_uint_ge(st.connections_evicted, 1);
  ck_assert_uint_eq(st.connections_rejected, 0);
  ck_assert_uint_eq(st.status_count[503], 0);
  for (int i = 0; i < NSLOW; i++) cl_close(slow[i]);
  kdp_server_stop(s);
}
END_TEST

/* A request must arrive within header_timeout, then at min_rate bytes/s on average: a slow
   client is closed long before idle_timeout, a large body at a good rate is not. */
START_TEST(test_request_deadline) {
  kdp_server_options o;
  opts(&o);
  o.idle_timeout = 30;
  o.header_timeout = 0.5;
  o.min_rate = 20000;
  o.max_body = 1 << 20;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  /* headers one byte every 50 ms: closed at about header_timeout */
  client *c = cl_open(port);
  const char *req = "GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
  double t0 = now_s(), closed_at = -1;
  for (size_t i = 0; i < strlen(req) && now_s() - t0 < 5; i++) {
    if (cl_send(c, req + i, 1) != 0) break;
    char tmp[64];
    ssize_t rr = recv(c->fd, tmp, sizeof tmp, MSG_DONTWAIT);
    if (rr == 0 || (rr < 0 && errno == ECONNRESET)) break;
    ck_assert_msg(rr < 0, "the slow client got a reply");
    sleep_ms(50);
  }
  closed_at = now_s() - t0;
  ck_assert_msg(closed_at > 0.4 && closed_at < 2.5, "slow headers closed after %.2f s", closed_at);
  cl_close(c);
  /* a body trickling at ~2 KB/s (min_rate 20 KB/s): closed soon after the grace */
  c = cl_open(port);
  const char *h = "POST /control HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
  ck_assert_int_eq(cl_send(c, h, strlen(h)), 0);
  char chunk[100];
  memset(chunk, ' ', sizeof chunk);
  t0 = now_s();
  int gone = 0;
  while (!gone && now_s() - t0 < 6) {
    if (send(c->fd, chunk, sizeof chunk, MSG_NOSIGNAL) < 0) gone = 1;
    char tmp[64];
    ssize_t rr = recv(c->fd, tmp, sizeof tmp, MSG_DONTWAIT);
    if (rr == 0 || (rr < 0 && errno == ECONNRESET)) gone = 1;
    sleep_ms(50);
  }
  closed_at = now_s() - t0;
  ck_assert_msg(gone && closed_at > 0.4 && closed_at < 3, "slow body closed after %.2f s (%d)",
                closed_at, gone);
  cl_close(c);
  /* 400 KB at ~200 KB/s (2 s, four times header_timeout): answered */
  c = cl_open(port);
  h = "POST /control HTTP/1.1\r\nContent-Length: 400002\r\n\r\n{\"action\":\"checkpoint\"}";
  ck_assert_int_eq(cl_send(c, h, strlen(h)), 0);
  char big[10000];
  memset(big, ' ', sizeof big);
  size_t sent = 23; /* the JSON above */
  while (sent < 400002) {
    size_t n = 400002 - sent < sizeof big ? 400002 - sent : sizeof big;
    ck_assert_int_eq(cl_send(c, big, n), 0);
    sent += n;
    sleep_ms(50);
  }
  resp r;
  ck_assert_int_eq(cl_read(c, &r), 0);
  ck_assert_int_eq(r.status, 202);
  resp_free(&r);
  cl_close(c);
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_eq(st.timeouts, 2);
  kdp_server_stop(s);
}
END_TEST

/* Bodies being received count against max_body_total all together: past it, 503; memory stays
   bounded however many connections send large bodies at once. */
START_TEST(test_body_total) {
  kdp_server_options o;
  opts(&o);
  o.max_body = 64 << 10;
  o.max_body_total = 200 << 10;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  enum { N = 6, LEN = 60000 };
  client *c[N];
  char *body = malloc(LEN);
  memset(body, ' ', LEN);
  memcpy(body, "{\"action\":\"pause\"}", 18);
  char h[128];
  int hn = snprintf(h, sizeof h, "POST /control HTTP/1.1\r\nContent-Length: %d\r\n\r\n", LEN);
  /* all but the last byte: each body is held by the server */
  for (int i = 0; i < N; i++) {
    c[i] = cl_open(port);
    ck_assert_int_eq(cl_send(c[i], h, (size_t)hn), 0);
    ck_assert_int_eq(cl_send(c[i], body, LEN - 1), 0);
    sleep_ms(30);
  }
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_le(st.body_bytes, (size_t)200 << 10);
  ck_assert_uint_ge(st.body_bytes, (size_t)3 * LEN);
  /* three fit (3 x 60001 bytes), the others were refused with 503 */
  resp r;
  int refused = 0;
  for (int i = 3; i < N; i++) {
    ck_assert_int_eq(cl_read(c[i], &r), 0);
    ck_assert_int_eq(r.status, 503);
    ck_assert_ptr_nonnull(strstr(err_msg(&r), "max_body_total"));
    ck_assert_ptr_nonnull(strcasestr(r.head, "Retry-After:"));
    resp_free(&r);
    refused++;
  }
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(cl_send(c[i], body + LEN - 1, 1), 0);
    ck_assert_int_eq(cl_read(c[i], &r), 0);
    ck_assert_int_eq(r.status, 202);
    resp_free(&r);
  }
  for (int i = 0; i < 200; i++) { /* the loop thread frees a body right after replying */
    kdp_server_get_stats(s, &st);
    if (st.body_bytes == 0) break;
    sleep_ms(5);
  }
  ck_assert_uint_eq(st.bodies_refused, (uint64_t)refused);
  ck_assert_uint_eq(st.body_bytes, 0); /* large buffers are given back after their request */
  /* room again */
  ck_assert_int_eq(cl_send(c[0], h, (size_t)hn), 0);
  ck_assert_int_eq(cl_send(c[0], body, LEN), 0);
  ck_assert_int_eq(cl_read(c[0], &r), 0);
  ck_assert_int_eq(r.status, 202);
  resp_free(&r);
  for (int i = 0; i < N; i++) cl_close(c[i]);
  free(body);
  kdp_server_stop(s);
}
END_TEST

/* The client of issue 10: two pipelined GET /healthz, then close without reading. The replies
   are written to a socket the client has closed (EPIPE): that must never raise SIGPIPE (this
   process does not ignore it, as a library user's may not). */
START_TEST(test_sigpipe) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  const char *two = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
  for (int i = 0; i < 200; i++) {
    client *c = cl_open(port);
    ck_assert_int_eq(cl_send(c, two, strlen(two)), 0);
    cl_close(c);
  }
  resp r;
  ck_assert_int_eq(get(port, "/healthz", &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  kdp_server_stop(s);
}
END_TEST

/* Predictions may hold at most max_connections minus a reserve: the rest stay for /healthz. */
START_TEST(test_predict_reserve) {
  kdp_server_options o;
  opts(&o);
  o.max_connections = 8; /* reserve 1 */
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  client *c[8];
  char raw[256];
  const char *body = "{\"input\":[1,2,3,4]}";
  int n = snprintf(raw, sizeof raw, "POST /predict HTTP/1.1\r\nContent-Length: %zu\r\n\r\n%s",
                   strlen(body), body);
  for (int i = 0; i < 8; i++) {
    c[i] = cl_open(port);
    ck_assert_int_eq(cl_send(c[i], raw, (size_t)n), 0);
    sleep_ms(10);
  }
  resp r;
  ck_assert_int_eq(cl_read(c[7], &r), 0); /* the 8th: nobody answers predictions here */
  ck_assert_int_eq(r.status, 503);
  ck_assert_ptr_nonnull(strstr(err_msg(&r), "retry later"));
  resp_free(&r);
  for (int i = 0; i < 5; i++) {
    ck_assert_int_eq(get(port, "/healthz", &r), 0);
    ck_assert_int_eq(r.status, 200);
    resp_free(&r);
  }
  int taken = 0;
  kdp_predict_req *q;
  while ((q = kdp_server_take_predict(s)) != NULL) {
    kdp_server_fail_predict(s, q, 503, "test");
    taken++;
  }
  ck_assert_int_eq(taken, 7);
  for (int i = 0; i < 8; i++) cl_close(c[i]);
  kdp_server_stop(s);
}
END_TEST

/* HEAD answers like GET without the body (Content-Length of the GET reply), on every GET route. */
START_TEST(test_head) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  kdp_server_publish(s, "# TYPE x gauge\nx 1\n", "{\"a\":1}");
  int port = kdp_server_port(s);
  const char *paths[] = {"/metrics", "/status", "/healthz"};
  for (int i = 0; i < 3; i++) {
    client *c = cl_open(port);
    char raw[256];
    /* HEAD then GET pipelined on one connection: the GET's reply must start right after the
       HEAD's headers (no body bytes in between) */
    int n = snprintf(raw, sizeof raw, "HEAD %s HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
                     paths[i]);
    ck_assert_int_eq(cl_send(c, raw, (size_t)n), 0);
    char *end = NULL;
    while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4))) ck_assert_int_gt(cl_fill(c), 0);
    ck_assert_msg(strncmp(c->buf, "HTTP/1.1 200 ", 13) == 0, "HEAD %s: %.40s", paths[i], c->buf);
    const char *cl = strcasestr(c->buf, "\r\nContent-Length: ");
    ck_assert_ptr_nonnull(cl);
    ck_assert_int_gt(atoi(cl + 18), 0);
    size_t hlen = (size_t)(end - c->buf) + 4;
    memmove(c->buf, c->buf + hlen, c->len - hlen);
    c->len -= hlen;
    resp r;
    ck_assert_int_eq(cl_read(c, &r), 0);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"status\":\"ok\""));
    resp_free(&r);
    cl_close(c);
  }
  resp r;
  const char *hc = "HEAD /control HTTP/1.1\r\n\r\n";
  client *c = cl_open(port);
  ck_assert_int_eq(cl_send(c, hc, strlen(hc)), 0);
  char *end = NULL;
  while (!(end = memmem(c->buf, c->len, "\r\n\r\n", 4))) ck_assert_int_gt(cl_fill(c), 0);
  ck_assert_msg(strncmp(c->buf, "HTTP/1.1 405 ", 13) == 0, "%.40s", c->buf);
  ck_assert_ptr_nonnull(strcasestr(c->buf, "Allow: POST"));
  cl_close(c);
  ck_assert_int_eq(post(port, "/metrics", NULL, NULL, "x", 1, &r), 0);
  ck_assert_int_eq(r.status, 405);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Allow: GET, HEAD"));
  resp_free(&r);
  kdp_server_stop(s);
}
END_TEST

/* /control values within their config ranges, as the trainer sets them up
   (kdp_train_server_options): {"lr_scale": 1e308} is refused, naming the range. */
START_TEST(test_control_bounds) {
  kdp_config cfg;
  kdp_config_defaults(&cfg);
  cfg.lr = 0.05;
  kdp_server_options o;
  kdp_server_strings str;
  kdp_train_server_options(&cfg, &o, &str);
  o.port = 0;
  o.quiet = 1;
  o.addr_file = NULL;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  struct {
    const char *body, *needle;
  } bad[] = {
      {"{\"lr_scale\":1e308}", "\"lr_scale\" = 1e+308 is out of range: expected a value in (0, 200] "
                              "(optim.lr x lr_scale must stay within optim.lr's range [0, 10]; "
                              "optim.lr = 0.05)"},
      {"{\"lr_scale\":200.5}", "(0, 200]"},
      {"{\"temperature\":100.01}", "expected a value in (0, 100] (the range of kd.temperature)"},
      {"{\"kd_weight\":1e6}", "expected a value in [0, 1000] (the range of kd.weight)"},
      {"{\"action\":\"resume\",\"kd_weight\":1001}", "kd.weight"},
  };
  resp r;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ck_assert_int_eq(post(port, "/control", NULL, NULL, bad[i].body, strlen(bad[i].body), &r), 0);
    ck_assert_msg(r.status == 400, "%s -> %d", bad[i].body, r.status);
    ck_assert_msg(strstr(err_msg(&r), bad[i].needle) != NULL, "%s -> %s (wanted %s)", bad[i].body,
                  err_msg(&r), bad[i].needle);
    resp_free(&r);
  }
  kdp_command cmd;
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 0); /* nothing was queued */
  const char *good = "{\"lr_scale\":200,\"temperature\":100,\"kd_weight\":1000}";
  ck_assert_int_eq(post(port, "/control", NULL, NULL, good, strlen(good), &r), 0);
  ck_assert_int_eq(r.status, 202);
  resp_free(&r);
  ck_assert_int_eq(kdp_server_poll_command(s, &cmd), 1);
  ck_assert_double_eq(cmd.lr_scale, 200);
  ck_assert_double_eq(cmd.temperature, 100);
  ck_assert_double_eq(cmd.kd_weight, 1000);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_idle_timeout) {
  kdp_server_options o;
  opts(&o);
  o.idle_timeout = 0.4;
  kdp_server *s = start(&o);
  client *c = cl_open(kdp_server_port(s));
  /* one request, then silence: closed about idle_timeout after the reply */
  const char *g = "GET /healthz HTTP/1.1\r\n\r\n";
  ck_assert_int_eq(cl_send(c, g, strlen(g)), 0);
  resp r;
  ck_assert_int_eq(cl_read(c, &r), 0);
  resp_free(&r);
  double t0 = now_s();
  ck_assert(cl_sees_eof(c));
  double dt = now_s() - t0;
  ck_assert_msg(dt > 0.3 && dt < 2.5, "closed after %.2f s", dt);
  cl_close(c);
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_eq(st.timeouts, 1);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_slowloris) {
  kdp_server_options o;
  opts(&o);
  o.idle_timeout = 0.6;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  client *slow = cl_open(port);
  struct timeval tv = {0, 50000};
  setsockopt(slow->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  const char *req = "GET /healthz HTTP/1.1\r\nX-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"
                    "X-B: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n\r\n";
  size_t sent = 0, served = 0;
  double t0 = now_s(), closed_at = -1;
  /* one header byte every 20 ms (the whole request would take ~2.5 s) while another client is
     served normally */
  while (now_s() - t0 < 3.0 && sent < strlen(req)) {
    if (cl_send(slow, req + sent, 1) != 0) {
      closed_at = now_s() - t0;
      break;
    }
    sent++;
    char tmp[64];
    ssize_t rr = recv(slow->fd, tmp, sizeof tmp, MSG_DONTWAIT);
    if (rr == 0 || (rr < 0 && errno == ECONNRESET)) {
      closed_at = now_s() - t0;
      break;
    }
    ck_assert_msg(rr < 0, "the slow client got a reply");
    resp r;
    ck_assert_int_eq(get(port, "/healthz", &r), 0);
    ck_assert_int_eq(r.status, 200);
    resp_free(&r);
    served++;
    sleep_ms(20);
  }
  ck_assert_msg(closed_at > 0.4 && closed_at < 2.0, "slow client closed at %.2f s", closed_at);
  ck_assert_uint_lt(sent, strlen(req));
  ck_assert_uint_gt(served, 5);
  cl_close(slow);
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_ge(st.timeouts, 1);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_predict_limits) {
  kdp_server_options o;
  opts(&o);
  o.max_predict = 2;
  o.predict_timeout = 0.3;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  struct {
    const char *body, *needle;
  } cases[] = {
      {"{\"inputs\":[[1,2,3]]}", "input 0 has 3 values, expected input_dim = 4"},
      {"{\"inputs\":[[1,2,3,4],[1,2,3,4,5]]}", "input 1 has 5 values"},
      {"{\"inputs\":[[1,2,3,4],[1,2,3,4],[1,2,3,4]]}", "expected 1 to 2"},
      {"{\"inputs\":[]}", "expected 1 to 2"},
      {"{\"input\":[1,2,3,256]}", "[0, 255]"},
      {"{\"input\":[1,2,-1,4]}", "[0, 255]"},
      {"{\"input\":[1,2,\"3\",4]}", "[0, 255]"},
      {"{\"input\":[1,2,3,4],\"inputs\":[[1,2,3,4]]}", "exactly one of"},
      {"{\"pixels\":[1,2,3,4]}", "unknown field \"pixels\""},
      {"{\"input\":[1,2,3,4]", "invalid JSON"},
  };
  resp r;
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    ck_assert_int_eq(post(port, "/predict", NULL, NULL, cases[i].body, strlen(cases[i].body), &r),
                     0);
    ck_assert_msg(r.status == 400, "%s -> %d", cases[i].body, r.status);
    ck_assert_msg(strstr(err_msg(&r), cases[i].needle) != NULL, "%s -> %s", cases[i].body,
                  r.body);
    resp_free(&r);
  }
  /* msgpack: garbage, wrong dims, and an array header claiming 4 billion elements */
  const char *mp_cases[] = {"\xc1", "\x81\xa6inputs\x91\xc4\x03\x01\x02\x03",
                            "\x81\xa6inputs\xdd\xff\xff\xff\xff\x01",
                            "\x81\xa5input\x94\x01\x02\x03\xa1x"};
  const size_t mp_len[] = {1, 13, 14, 13};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(post(port, "/predict", NULL, "application/msgpack", mp_cases[i], mp_len[i],
                          &r),
                     0);
    ck_assert_msg(r.status == 400, "msgpack case %d -> %d", i, r.status);
    resp_free(&r);
  }
  /* nobody answers: 504 after predict_timeout */
  double t0 = now_s();
  ck_assert_int_eq(post(port, "/predict", NULL, NULL, "{\"input\":[1,2,3,4]}", 19, &r), 0);
  ck_assert_int_eq(r.status, 504);
  ck_assert(now_s() - t0 > 0.25);
  resp_free(&r);
  ck_assert_ptr_null(kdp_server_take_predict(s)); /* the timed-out request was withdrawn */
  kdp_server_stats st;
  kdp_server_get_stats(s, &st);
  ck_assert_uint_eq(st.status_count[504], 1);
  ck_assert_uint_eq(st.predict_queued, 1);
  kdp_server_stop(s);

  /* no input_dim: predictions unavailable */
  opts(&o);
  o.input_dim = 0;
  s = start(&o);
  ck_assert_int_eq(post(kdp_server_port(s), "/predict", NULL, NULL, "{\"input\":[1]}", 13, &r), 0);
  ck_assert_int_eq(r.status, 503);
  resp_free(&r);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_listen_rules) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = NULL;
  kdp_error err = {{0}};
  o.listen = "0.0.0.0";
  ck_assert_int_eq(kdp_server_start(&s, &o, &err), KDP_EINVAL);
  ck_assert_ptr_null(s);
  ck_assert_ptr_nonnull(strstr(err.msg, "server.token"));
  o.listen = "not-an-address";
  ck_assert_int_eq(kdp_server_start(&s, &o, &err), KDP_EINVAL);
  ck_assert_ptr_nonnull(strstr(err.msg, "numeric"));
  o.listen = "localhost";
  s = start(&o);
  ck_assert_ptr_nonnull(strstr(kdp_server_address(s), "http://127.0.0.1:"));
  /* the same port twice: a clear error, no crash */
  kdp_server_options o2 = o;
  o2.port = kdp_server_port(s);
  kdp_server *s2 = NULL;
  ck_assert_int_eq(kdp_server_start(&s2, &o2, &err), KDP_EIO);
  ck_assert_ptr_null(s2);
  ck_assert_ptr_nonnull(strstr(err.msg, "address already in use"));
  kdp_server_stop(s);
  /* a token lets a non-loopback address start (we only ever talk to it over loopback) */
  o.listen = "0.0.0.0";
  o.token = "secret";
  s = start(&o);
  resp r;
  ck_assert_int_eq(get(kdp_server_port(s), "/healthz", &r), 0);
  ck_assert_int_eq(r.status, 200);
  resp_free(&r);
  kdp_server_stop(s);
  kdp_server_stop(NULL);
}
END_TEST

/* ---- the dashboard ---- */

START_TEST(test_dashboard_files) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  resp r;
  ck_assert_int_eq(get(port, "/", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: text/html; charset=utf-8"));
  /* nothing inline runs, and the page talks to this server only */
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Security-Policy: default-src 'none'; script-src 'self'"));
  ck_assert_ptr_nonnull(strcasestr(r.head, "connect-src 'self'"));
  ck_assert_ptr_nonnull(strcasestr(r.head, "X-Content-Type-Options: nosniff"));
  ck_assert_ptr_nonnull(strstr(r.body, "<script src=\"/assets/chart.js\""));
  ck_assert_ptr_nonnull(strstr(r.body, "<script src=\"/assets/dashboard.js\""));
  ck_assert_ptr_null(strstr(r.body, "<script>")); /* no inline script the policy would block */
  ck_assert_ptr_null(strstr(r.body, "style=\""));
  resp_free(&r);
  /* /assets/chart.js is the file Debian's libjs-chart.js installs, byte for byte */
  const char *chartjs = getenv("KDP_CHARTJS");
  ck_assert_msg(chartjs != NULL, "KDP_CHARTJS (set by meson test) names the embedded Chart.js");
  size_t n;
  char *want = kdp_test_read_file(chartjs, &n);
  ck_assert_int_eq(get(port, "/assets/chart.js", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: text/javascript"));
  ck_assert_uint_eq(r.body_len, n);
  ck_assert_int_eq(memcmp(r.body, want, n), 0);
  ck_assert_ptr_nonnull(strstr(r.body, "Chart.js v"));
  resp_free(&r);
  free(want);
  ck_assert_int_eq(get_as(port, "HEAD", "/assets/chart.js", NULL, &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_uint_eq(strtoul(strcasestr(r.head, "\r\nContent-Length:") + 17, NULL, 10), n);
  ck_assert_uint_eq(r.body_len, 0);
  resp_free(&r);
  const struct {
    const char *path, *ctype;
  } files[] = {{"/assets/dashboard.js", "text/javascript"}, {"/assets/dashboard.css", "text/css"},
               {"/?x=1", "text/html"}};
  for (int i = 0; i < 3; i++) {
    ck_assert_int_eq(get(port, files[i].path, &r), 0);
    ck_assert_msg(r.status == 200 && strcasestr(r.head, files[i].ctype) && r.body_len > 100,
                  "%s: %d", files[i].path, r.status);
    resp_free(&r);
  }
  const char *missing[] = {"/assets/", "/assets/nope.js", "/assets/chart.js/x", "/index.htm"};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(get(port, missing[i], &r), 0);
    ck_assert_msg(r.status == 404, "%s -> %d", missing[i], r.status);
    resp_free(&r);
  }
  ck_assert_int_eq(post(port, "/", NULL, NULL, "x", 1, &r), 0);
  ck_assert_int_eq(r.status, 405);
  resp_free(&r);
  ck_assert_int_eq(get(port, "/metrics", &r), 0);
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/\",code=\"200\"} 2\n"));
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/assets/\",code=\"200\"} 4\n"));
  ck_assert_ptr_nonnull(strstr(r.body, "kdpeers_http_requests_total{path=\"/assets/\",code=\"404\"} 2\n"));
  resp_free(&r);
  kdp_server_stop(s);
}
END_TEST

/* GET /history?since=SEQ as parsed JSON (the test fails on a status other than 200) */
static json_object *history(int port, uint64_t since) {
  char path[64];
  snprintf(path, sizeof path, "/history?since=%llu", (unsigned long long)since);
  resp r;
  ck_assert_int_eq(get(port, path, &r), 0);
  ck_assert_msg(r.status == 200, "%s -> %d", path, r.status);
  ck_assert_ptr_nonnull(strcasestr(r.head, "Content-Type: application/json"));
  json_object *o = json_tokener_parse(r.body);
  ck_assert_msg(o != NULL, "not JSON: %.300s", r.body);
  resp_free(&r);
  return o;
}

static json_object *jget(json_object *o, const char *key) {
  json_object *v = NULL;
  ck_assert_msg(json_object_object_get_ex(o, key, &v), "no \"%s\"", key);
  return v;
}

/* the series (chart, name) of a /history reply, or NULL */
static json_object *hseries(json_object *h, const char *chart, const char *name) {
  json_object *a = jget(h, "series");
  for (size_t i = 0; i < json_object_array_length(a); i++) {
    json_object *s = json_object_array_get_idx(a, i);
    if (strcmp(json_object_get_string(jget(s, "chart")), chart) == 0 &&
        strcmp(json_object_get_string(jget(s, "name")), name) == 0)
      return s;
  }
  return NULL;
}

START_TEST(test_history) {
  kdp_server_options o;
  opts(&o);
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  json_object *h = history(port, 0);
  ck_assert_int_eq(json_object_get_int64(jget(h, "seq")), 0);
  ck_assert_uint_eq(json_object_array_length(jget(h, "series")), 0);
  ck_assert_uint_eq(json_object_array_length(jget(h, "events")), 0);
  ck_assert_uint_eq(json_object_array_length(jget(h, "charts")), 0);
  ck_assert_str_eq(json_object_get_string(jget(jget(h, "health"), "status")), "ok");
  ck_assert_int_eq(json_object_object_length(jget(h, "status")), 0);
  const char *run_id = json_object_get_string(jget(h, "run_id"));
  ck_assert_uint_gt(strlen(run_id), 5);
  char run_id0[64];
  snprintf(run_id0, sizeof run_id0, "%s", run_id);
  json_object_put(h);

  kdp_server_history_chart(s, "acc", "Test \"accuracy\"", "ratio", 0);
  kdp_server_history_chart(s, "split", "Split", "share", 1);
  kdp_server_history_chart(s, "acc", "Test accuracy", "ratio", 0); /* again: retitled, not added */
  kdp_server_history_add(s, "acc", "peer0", 1, 0.5);
  kdp_server_history_add(s, "acc", "peer0", 2, 0.625);
  kdp_server_history_add(s, "acc", "peer0", 3, NAN);                 /* seq 3 */
  kdp_server_history_add(s, "later", "a\"b\\c", 12345678901.0, -1e-9); /* seq 4: undeclared */
  kdp_server_history_event(s, "checkpoint", 3, "written in \"0.1\" s");  /* seq 5 */
  kdp_server_publish(s, "x 1\n", "{\"progress\":{\"step\":3}}");
  kdp_server_set_health(s, "rank 1 is late");
  h = history(port, 0);
  ck_assert_int_eq(json_object_get_int64(jget(h, "seq")), 5);
  json_object *charts = jget(h, "charts");
  ck_assert_uint_eq(json_object_array_length(charts), 2);
  json_object *c0 = json_object_array_get_idx(charts, 0);
  ck_assert_str_eq(json_object_get_string(jget(c0, "id")), "acc");
  ck_assert_str_eq(json_object_get_string(jget(c0, "title")), "Test accuracy");
  ck_assert_str_eq(json_object_get_string(jget(c0, "unit")), "ratio");
  ck_assert_int_eq(json_object_get_boolean(jget(json_object_array_get_idx(charts, 1), "stacked")), 1);
  json_object *p0 = hseries(h, "acc", "peer0");
  ck_assert_ptr_nonnull(p0);
  json_object *x = jget(p0, "x"), *y = jget(p0, "y");
  ck_assert_uint_eq(json_object_array_length(x), 3);
  ck_assert_int_eq(json_object_get_int(json_object_array_get_idx(x, 2)), 3);
  ck_assert_double_eq(json_object_get_double(json_object_array_get_idx(y, 1)), 0.625);
  ck_assert(json_object_array_get_idx(y, 2) == NULL); /* NaN is null: a gap */
  json_object *l = hseries(h, "later", "a\"b\\c");
  ck_assert_ptr_nonnull(l);
  /* a step needs every digit, not 7 */
  ck_assert_int_eq(json_object_get_int64(json_object_array_get_idx(jget(l, "x"), 0)), 12345678901LL);
  ck_assert_double_eq_tol(json_object_get_double(json_object_array_get_idx(jget(l, "y"), 0)), -1e-9, 1e-16);
  json_object *ev = jget(h, "events");
  ck_assert_uint_eq(json_object_array_length(ev), 1);
  json_object *e0 = json_object_array_get_idx(ev, 0);
  ck_assert_str_eq(json_object_get_string(jget(e0, "kind")), "checkpoint");
  ck_assert_str_eq(json_object_get_string(jget(e0, "text")), "written in \"0.1\" s");
  ck_assert_int_eq(json_object_get_int(jget(e0, "x")), 3);
  ck_assert_double_gt(json_object_get_double(jget(e0, "unix_time")), 1.6e9);
  ck_assert_int_eq(json_object_get_int(jget(jget(jget(h, "status"), "progress"), "step")), 3);
  json_object *hl = jget(h, "health");
  ck_assert_str_eq(json_object_get_string(jget(hl, "status")), "unhealthy");
  ck_assert_str_eq(json_object_get_string(jget(hl, "reason")), "rank 1 is late");
  ck_assert_str_eq(json_object_get_string(jget(h, "run_id")), run_id0);
  json_object_put(h);

  /* only what is newer than since */
  h = history(port, 3);
  ck_assert_ptr_null(hseries(h, "acc", "peer0"));
  ck_assert_ptr_nonnull(hseries(h, "later", "a\"b\\c"));
  ck_assert_uint_eq(json_object_array_length(jget(h, "events")), 1);
  ck_assert_uint_eq(json_object_array_length(jget(h, "charts")), 2); /* always: they are small */
  json_object_put(h);
  h = history(port, 2);
  json_object *p = hseries(h, "acc", "peer0");
  ck_assert_ptr_nonnull(p);
  ck_assert_uint_eq(json_object_array_length(jget(p, "x")), 1);
  json_object_put(h);
  h = history(port, 5);
  ck_assert_uint_eq(json_object_array_length(jget(h, "series")), 0);
  ck_assert_uint_eq(json_object_array_length(jget(h, "events")), 0);
  json_object_put(h);

  resp r;
  const char *bad[] = {"/history?since=x", "/history?since=", "/history?since=-1",
                       "/history?since=123456789012345678901"};
  for (int i = 0; i < 4; i++) {
    ck_assert_int_eq(get(port, bad[i], &r), 0);
    ck_assert_msg(r.status == 400, "%s -> %d", bad[i], r.status);
    resp_free(&r);
  }
  ck_assert_int_eq(get(port, "/history?x=1&since=4&y", &r), 0);
  ck_assert_int_eq(r.status, 200);
  ck_assert_ptr_nonnull(strstr(r.body, "\"since\":4,"));
  resp_free(&r);
  kdp_server_stop(s);

  /* another server: another run_id (the page starts over) */
  s = start(&o);
  h = history(kdp_server_port(s), 0);
  ck_assert_str_ne(json_object_get_string(jget(h, "run_id")), run_id0);
  json_object_put(h);
  kdp_server_stop(s);
}
END_TEST

/* A full series keeps its first and newest points and at most history_points; names are cut
   without splitting a UTF-8 character; past 256 series points are counted, not kept. */
START_TEST(test_history_limits) {
  kdp_server_options o;
  opts(&o);
  o.history_points = 8;
  kdp_server *s = start(&o);
  int port = kdp_server_port(s);
  for (int i = 1; i <= 1000; i++) kdp_server_history_add(s, "c", "s", i, i * 0.5);
  json_object *h = history(port, 0);
  json_object *x = jget(hseries(h, "c", "s"), "x");
  size_t n = json_object_array_length(x);
  ck_assert_uint_le(n, 8);
  ck_assert_uint_ge(n, 4);
  ck_assert_int_eq(json_object_get_int(json_object_array_get_idx(x, 0)), 1);
  ck_assert_int_eq(json_object_get_int(json_object_array_get_idx(x, n - 1)), 1000);
  for (size_t i = 1; i < n; i++)
    ck_assert_int_lt(json_object_get_int(json_object_array_get_idx(x, i - 1)),
                     json_object_get_int(json_object_array_get_idx(x, i)));
  json_object_put(h);
  /* a 60-byte name of 2-byte characters: cut to whole characters within 47 bytes */
  char longname[128] = "";
  for (int i = 0; i < 30; i++) strcat(longname, "\xc3\xa9");
  kdp_server_history_add(s, "c", longname, 1, 1);
  h = history(port, 1000);
  json_object *a = jget(h, "series");
  ck_assert_uint_eq(json_object_array_length(a), 1);
  const char *cut = json_object_get_string(jget(json_object_array_get_idx(a, 0), "name"));
  ck_assert_uint_eq(strlen(cut), 46);
  ck_assert_int_eq(memcmp(cut, longname, 46), 0);
  json_object_put(h);
  for (int i = 0; i < 300; i++) {
    char name[16];
    snprintf(name, sizeof name, "s%d", i);
    kdp_server_history_add(s, "many", name, 1, i);
  }
  h = history(port, 0);
  ck_assert_uint_eq(json_object_array_length(jget(h, "series")), 256);
  ck_assert_int_eq(json_object_get_int(jget(h, "dropped_points")), 300 - 254);
  json_object_put(h);
  kdp_server_stop(s);
}
END_TEST

START_TEST(test_prom_label_value) {
  char out[64];
  ck_assert_uint_eq(kdp_prom_label_value(out, sizeof out, "a\"b\\c\nd/e f"), 14);
  ck_assert_str_eq(out, "a\\\"b\\\\c\\nd/e f");
  /* cut to fit, never inside an escape or a UTF-8 character */
  ck_assert_uint_eq(kdp_prom_label_value(out, 4, "ab\"c"), 2);
  ck_assert_str_eq(out, "ab");
  ck_assert_uint_eq(kdp_prom_label_value(out, 4, "a\xc3\xa9\xc3\xa9"), 3);
  ck_assert_str_eq(out, "a\xc3\xa9");
  ck_assert_uint_eq(kdp_prom_label_value(out, 3, "a\xc3\xa9"), 1);
  ck_assert_str_eq(out, "a");
  ck_assert_uint_eq(kdp_prom_label_value(out, sizeof out, NULL), 0);
  ck_assert_str_eq(out, "");
}
END_TEST

/* /metrics and /status list every model of the last evaluation: at the most peers, each with
   an EMA copy, and the cohort's ensemble and students' mean, none is dropped (the table once held
   72 rows: beyond about 32 peers with EMA copies the last peerN.ema rows were lost) */
START_TEST(test_eval_rows_all_models) {
  kdp_trainer *t = kdp_xcalloc(1, sizeof *t);
  t->tty = -1; /* no terminal lines */
  enum { P = KDP_MAX_PEERS };
  char name[32];
  for (int p = 0; p < P; p++) {
    snprintf(name, sizeof name, "peer%d", p);
    kdp_metrics_eval_val(t, 10, 1.0, name, 0.5 + 1e-3 * p, 1.0, 0.4, 1.1);
    snprintf(name, sizeof name, "peer%d.ema", p);
    kdp_metrics_eval_val(t, 10, 1.0, name, 0.6 + 1e-3 * p, 0.9, 0.45, 1.05);
  }
  kdp_metrics_eval(t, 10, 1.0, "students", 0.55, 0.95);
  kdp_metrics_eval_val(t, 10, 1.0, "ensemble", 0.7, 0.8, 0.5, 1.0);
  const char *names[KDP_EVAL_ROWS_MAX];
  double accs[KDP_EVAL_ROWS_MAX], losses[KDP_EVAL_ROWS_MAX];
  int n = kdp_metrics_last_evals(names, accs, losses, KDP_EVAL_ROWS_MAX);
  ck_assert_int_eq(n, 2 * P + 2);
  snprintf(name, sizeof name, "peer%d.ema", P - 1);
  ck_assert_str_eq(names[2 * P - 1], name);
  ck_assert_double_eq_tol(accs[2 * P - 1], 0.6 + 1e-3 * (P - 1), 1e-12);
  ck_assert_str_eq(names[2 * P + 1], "ensemble");
  n = kdp_metrics_last_val(names, accs, losses, KDP_EVAL_ROWS_MAX); /* students: no val */
  ck_assert_int_eq(n, 2 * P + 1);
  ck_assert_str_eq(names[2 * P - 1], name);
  ck_assert_double_eq_tol(losses[2 * P - 1], 1.05, 1e-12);
  free(t->val_table);
  free(t);
}
END_TEST

static Suite *serve_suite(void) {
  Suite *s = suite_create("serve");
  TCase *core = kdp_test_case("core");
  tcase_add_test(core, test_get_endpoints);
  tcase_add_test(core, test_keepalive);
  tcase_add_test(core, test_status_codes);
  tcase_add_test(core, test_token);
  tcase_add_test(core, test_control_commands);
  tcase_add_test(core, test_predict_json);
  tcase_add_test(core, test_predict_json_forms);
  tcase_add_test(core, test_fmt_g7);
  tcase_add_test(core, test_predict_msgpack);
  tcase_add_test(core, test_publish_while_serving);
  tcase_add_test(core, test_stop_with_open_connections);
  tcase_add_test(core, test_stop_with_taken_request);
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_test(lim, test_connection_cap);
  tcase_add_test(lim, test_slowloris_pool);
  tcase_add_test(lim, test_request_deadline);
  tcase_add_test(lim, test_body_total);
  tcase_add_test(lim, test_sigpipe);
  tcase_add_test(lim, test_predict_reserve);
  tcase_add_test(core, test_head);
  tcase_add_test(core, test_dashboard_files);
  tcase_add_test(core, test_history);
  tcase_add_test(core, test_history_limits);
  tcase_add_test(core, test_prom_label_value);
  tcase_add_test(core, test_control_bounds);
  tcase_add_test(lim, test_idle_timeout);
  tcase_add_test(lim, test_slowloris);
  tcase_add_test(lim, test_predict_limits);
  tcase_add_test(lim, test_listen_rules);
  tcase_add_test(lim, test_eval_rows_all_models);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(serve_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
