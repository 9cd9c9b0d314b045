/* serve_internal.h: the pieces of the server below the libuv layer: the state shared with the
   training thread (core.c), one HTTP connection's parser (http.c) and the endpoints (routes.c).
   None of them touches libuv, so the fuzzer and tests can drive them from a buffer. */
#ifndef KDPEERS_SERVE_INTERNAL_H
#define KDPEERS_SERVE_INTERNAL_H

#include <http_parser.h>
#include <pthread.h>
#include <stdarg.h>

#include "kdpeers/serve.h"

/* Growable byte buffer (p is malloc'd, NUL-terminated when non-empty). */
typedef struct kdp_buf {
  char *p;
  size_t len, cap;
} kdp_buf;
void kdp_buf_put(kdp_buf *b, const void *d, size_t n);
void kdp_buf_printf(kdp_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void kdp_buf_json_str(kdp_buf *b, const char *s); /* quoted, escaped JSON string */
void kdp_buf_free(kdp_buf *b);
void kdp_buf_reserve(kdp_buf *b, size_t cap); /* capacity at least cap (exactly, if it grows) */

/* Paths, for the per-path request counters. */
enum { KDP_PATH_METRICS, KDP_PATH_STATUS, KDP_PATH_HEALTHZ, KDP_PATH_CONTROL, KDP_PATH_PREDICT,
       KDP_PATH_OTHER, KDP_NPATHS };
extern const char *const kdp_path_names[KDP_NPATHS];

typedef struct kdp_http_conn kdp_http_conn;

/* A prediction request as the server tracks it. Lists and state are guarded by core->mu;
   conn is touched by the loop thread only; the arrays by whoever owns the request. */
enum { KDP_PRED_QUEUED, KDP_PRED_TAKEN, KDP_PRED_DONE };
typedef struct kdp_predict_priv {
  kdp_predict_req pub;
  int state;
  kdp_http_conn *conn;                 /* NULL once the client is gone */
  struct kdp_predict_priv *next;       /* pending or done list */
  struct kdp_predict_priv *prev_all, *next_all;
  uint64_t seq;                        /* order of answering (core->answered) */
  int status;                          /* 200, or an error status */
  char errmsg[160];
  int P, C;
  float *peers, *ensemble, *teacher;   /* copies of the answer */
  char *teacher_name;
} kdp_predict_priv;

/* State shared by the loop thread and the training thread. */
typedef struct kdp_srv_core {
  kdp_server_options opt; /* string members point at the copies below */
  char *listen, *token, *addr_file, *control_note[KDP_NCONTROLS];
  size_t token_len;
  pthread_mutex_t mu;
  /* --- guarded by mu --- */
  char *metrics; /* last published snapshot */
  char *status;
  double publish_time; /* kdp_now() of the last publish, 0 = never */
  char unhealthy[256]; /* why /healthz answers 503 ("" = healthy; kdp_server_set_health) */
  kdp_command *cmds;   /* ring of opt.max_commands */
  int cmd_head, cmd_count;
  uint64_t next_id;
  kdp_predict_priv *pend_head, *pend_tail;
  kdp_predict_priv *done_head, *done_tail;
  kdp_predict_priv *all; /* every live request */
  int pending_predicts;
  uint64_t answered, delivered; /* predictions answered by the trainer / handed to their socket */
  pthread_cond_t delivered_cv;  /* signalled when delivered grows */
  int stopping;
  kdp_server_stats st;
  uint64_t by_path[KDP_NPATHS][600];
  /* --- loop thread only --- */
  int predicting; /* connections waiting for a prediction */
  /* --- set before the loop starts --- */
  void (*wake)(void *arg); /* asks the loop to run kdp_core_drain_done (may be NULL) */
  void *wake_arg;
} kdp_srv_core;

/* Copies o (with defaults for zero fields) into a fresh core. */
kdp_srv_core *kdp_core_new(const kdp_server_options *o);
void kdp_core_free(kdp_srv_core *core); /* frees every request still alive */
void kdp_core_publish(kdp_srv_core *core, const char *metrics, const char *status);
int kdp_core_poll_command(kdp_srv_core *core, kdp_command *out);
/* Appends cmd (id assigned, returned); -1 if the queue is full. */
int64_t kdp_core_push_command(kdp_srv_core *core, kdp_command *cmd);
kdp_predict_priv *kdp_core_new_predict(int n, int input_dim);
/* Queues p for the trainer; -1 (p untouched) while stopping. */
int kdp_core_queue_predict(kdp_srv_core *core, kdp_predict_priv *p);
kdp_predict_req *kdp_core_take_predict(kdp_srv_core *core);
int kdp_core_answer_predict(kdp_srv_core *core, kdp_predict_req *req,
                            const kdp_predict_result *r);
void kdp_core_fail_predict(kdp_srv_core *core, kdp_predict_req *req, int status, const char *msg);
/* Client gone or timed out: a queued request is dropped, a taken one is freed when answered. */
void kdp_core_cancel_predict(kdp_srv_core *core, kdp_predict_priv *p);
/* Loop thread: delivers answered requests to their connections and frees them. */
void kdp_core_drain_done(kdp_srv_core *core);
/* Waits until every prediction answered so far is delivered, at most max_seconds; 1 if so. */
int kdp_core_wait_delivered(kdp_srv_core *core, double max_seconds);
/* Counts one response. */
void kdp_core_count(kdp_srv_core *core, int path, int status, size_t bytes);

/* What a connection needs from its transport (libuv in server.c, a buffer in the fuzzer). */
typedef struct kdp_http_io {
  void (*write)(kdp_http_conn *c, char *buf, size_t len); /* takes ownership of buf */
  void (*close)(kdp_http_conn *c, int now); /* now=0: after the queued writes are sent */
  void (*arm_timer)(kdp_http_conn *c, double seconds);
  void (*pause_input)(kdp_http_conn *c, int pause);
  size_t (*backlog)(kdp_http_conn *c); /* bytes queued but not yet sent */
} kdp_http_io;

/* Interesting request headers are kept; the rest are only counted. */
enum { KDP_HDR_NONE = -1, KDP_HDR_CTYPE, KDP_HDR_AUTH, KDP_HDR_EXPECT, KDP_NHDR };

struct kdp_http_conn {
  http_parser parser;
  kdp_srv_core *core;
  const kdp_http_io *io;
  void *user;
  /* the request being read */
  char url[1024];
  size_t url_len;
  int url_overflow;
  size_t header_bytes;
  char field[32];
  size_t field_len;
  int in_value;  /* last callback was a header value */
  int cur_hdr;   /* KDP_HDR_* the value belongs to */
  char hdr[KDP_NHDR][1024];
  size_t hdr_len[KDP_NHDR];
  int hdr_overflow[KDP_NHDR];
  kdp_buf body;
  int error_status; /* set by a callback that stops the parser */
  const char *error_msg;
  int keep_alive;
  int path; /* KDP_PATH_* */
  double req_start; /* kdp_now() at the request's first byte; 0 between requests */
  /* connection state */
  int closing;
  int paused;   /* input held: waiting for a prediction or for writes to drain */
  char *held;   /* received bytes not parsed yet while paused */
  size_t held_len;
  kdp_predict_priv *pending;
};

void kdp_http_conn_init(kdp_http_conn *c, kdp_srv_core *core, const kdp_http_io *io, void *user);
/* Feeds received bytes (parses, routes, replies through io). */
void kdp_http_conn_feed(kdp_http_conn *c, const char *data, size_t len);
/* The transport sent everything queued: new request window, resume if held for backpressure. */
void kdp_http_conn_drained(kdp_http_conn *c);
/* The connection timer fired: 504 if a prediction is pending, else close. */
void kdp_http_conn_timeout(kdp_http_conn *c);
/* The server is stopping: 503 to a pending prediction, then close. */
void kdp_http_conn_shutdown(kdp_http_conn *c);
/* The transport is closing: drop pending work and buffers. */
void kdp_http_conn_release(kdp_http_conn *c);
/* Sets (p) or clears (NULL) the prediction this connection waits for (counts core->predicting). */
void kdp_http_conn_set_pending(kdp_http_conn *c, kdp_predict_priv *p);
/* A prediction for this connection is answered (called by kdp_core_drain_done). */
void kdp_http_conn_predict_done(kdp_http_conn *c, kdp_predict_priv *p);
/* Sends a complete response (close=1 adds Connection: close and closes after it). */
void kdp_http_respond(kdp_http_conn *c, int status, const char *ctype, const char *body,
                      size_t body_len, const char *extra_headers, int close);
void kdp_http_error(kdp_http_conn *c, int status, int close, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* routes.c: answers a complete request (path, method, headers, body are in c). */
void kdp_route(kdp_http_conn *c);
/* Writes v as printf's "%.7g" does (NUL-terminated, at most 16 bytes with the NUL); returns the
   length. Finite values between 1e-15 and 1e15 in magnitude take a fast path (one multiplication
   by an exact power of ten), the rest and the rare value the fast path cannot round with
   certainty go to snprintf. */
int kdp_fmt_g7(char *out, double v);
/* Formats the reply to an answered prediction (JSON or msgpack per p->pub.msgpack). */
void kdp_format_predict(const kdp_predict_priv *p, kdp_buf *out);

#endif
