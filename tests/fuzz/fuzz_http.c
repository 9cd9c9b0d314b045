/* fuzz_http.c: libFuzzer target for the server's request path without sockets: raw bytes go
   through one connection's http-parser, limits, router and body parsers (JSON and msgpack), a
   fake trainer answers predictions, and every reply is checked to be a framed HTTP response.
   Build (the lead wires it into meson):
     clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iinclude -Isrc/serve \
       tests/fuzz/fuzz_http.c src/serve/core.c src/serve/http.c src/serve/routes.c \
       src/serve/history.c build/kdp_assets.c src/common.c \
       -o fuzz_http -lhttp_parser -ljson-c -lmsgpackc -lpthread -lm
     ./fuzz_http -max_total_time=30 tests/fuzz/corpus/http */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "serve_internal.h"

typedef struct fuzz_io_state {
  int closed;
  int backlogged; /* pretend writes never drain until the harness says so */
  int paused;
  size_t replies;
} fuzz_io_state;

static void fz_write(kdp_http_conn *c, char *buf, size_t len) {
  fuzz_io_state *st = c->user;
  /* Every write is a whole response (or the interim 100 Continue) with a status line. */
  if (len < 12 || memcmp(buf, "HTTP/1.1 ", 9) != 0) abort();
  if (st->closed) abort(); /* nothing may be sent after close */
  st->replies++;
  free(buf);
}
static void fz_close(kdp_http_conn *c, int now) {
  (void)now;
  ((fuzz_io_state *)c->user)->closed = 1;
}
static void fz_arm(kdp_http_conn *c, double s) {
  (void)c;
  if (!(s > 0)) abort();
}
static void fz_pause(kdp_http_conn *c, int p) { ((fuzz_io_state *)c->user)->paused = p; }
static size_t fz_backlog(kdp_http_conn *c) {
  return ((fuzz_io_state *)c->user)->backlogged ? (size_t)64 << 20 : 0;
}
static const kdp_http_io fz_io = {fz_write, fz_close, fz_arm, fz_pause, fz_backlog};

static kdp_srv_core *core;

static void fake_trainer(int answer) {
  kdp_command cmd;
  while (kdp_core_poll_command(core, &cmd)) {
  }
  kdp_predict_req *r;
  while ((r = kdp_core_take_predict(core)) != NULL) {
    if (answer) {
      enum { P = 2, C = 3 };
      size_t n = (size_t)r->n;
      float *peers = calloc(P * n * C, sizeof(float)), *ens = calloc(n * C, sizeof(float));
      for (size_t i = 0; i < P * n * C; i++) peers[i] = r->x[i % (n * (size_t)r->input_dim)];
      for (size_t i = 0; i < n * C; i++) ens[i] = 1.0f / C;
      kdp_predict_result res = {P, C, peers, ens, (r->n & 1) ? ens : NULL, "t\"q"};
      kdp_core_answer_predict(core, r, &res);
      free(peers);
      free(ens);
    } else {
      kdp_core_fail_predict(core, r, 503, "trainer ended");
    }
  }
  kdp_core_drain_done(core);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!core) {
    kdp_server_options o;
    kdp_server_options_defaults(&o);
    o.token = "s3cret";
    o.max_body = 4096;
    o.max_header = 1024;
    o.input_dim = 4;
    o.max_predict = 3;
    o.max_commands = 4;
    o.history_points = 8; /* decimation happens within a few inputs */
    core = kdp_core_new(&o);
    kdp_core_hist_chart(core, "test_accuracy", "Test \"accuracy\"", "ratio", 0);
    kdp_core_hist_event(core, "control", 3, "pause \\ \x01");
  }
  /* the trainer adds to the history between requests: GET /history renders it */
  kdp_core_hist_add(core, size & 1 ? "train_loss" : "x\"y", size & 2 ? "peer0" : "\xc3\xa9", (double)size,
                    size & 4 ? 0.5 : (double)NAN);
  if (size == 0) return 0;
  /* First byte: chunk size (so resumption across reads is exercised), write backpressure,
     trainer behaviour, timeout at the end. */
  size_t chunk = 1 + (data[0] & 31);
  int backlogged = (data[0] & 32) != 0;
  int answer = (data[0] & 64) != 0, timeout_at_end = (data[0] & 128) != 0;
  data++, size--;
  fuzz_io_state st = {0};
  st.backlogged = backlogged;
  kdp_http_conn c;
  kdp_http_conn_init(&c, core, &fz_io, &st);
  for (size_t off = 0; off < size && !c.closing; off += chunk) {
    size_t n = size - off < chunk ? size - off : chunk;
    kdp_http_conn_feed(&c, (const char *)data + off, n);
    fake_trainer(answer);
    if (!c.closing && !c.pending && c.paused) {
      st.backlogged = 0; /* the transport drained: input resumes */
      kdp_http_conn_drained(&c);
      st.backlogged = backlogged;
    }
  }
  if (timeout_at_end) kdp_http_conn_timeout(&c);
  kdp_http_conn_release(&c);
  fake_trainer(answer);
  return 0;
}
