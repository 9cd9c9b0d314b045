/* serve.h: the rank-0 HTTP server, a libuv loop on its own thread that serves the metrics and
   status the trainer publishes and queues control commands and predictions for the trainer. */
#ifndef KDPEERS_SERVE_H
#define KDPEERS_SERVE_H

#include <stddef.h>
#include <stdint.h>

#include "kdpeers/common.h"

/*
 * Threading: every function below is called from the training thread (the one that makes the
 * MPI calls). None of them blocks on the network: they take one mutex for a few microseconds
 * and, where the loop must act, wake it with uv_async_send (kdp_server_wait_delivered alone
 * waits, boundedly, for the loop thread).
 *
 * Endpoints:
 * GET routes answer HEAD too (the same headers, no body).
 *   GET  /metrics  Prometheus text 0.0.4: the trainer's last published text + the server's own.
 *   GET  /status   the trainer's last published status JSON ({} before the first publish).
 *   GET  /healthz  {"status":"ok","last_publish_age_seconds":S|null} while the loop runs;
 *                  503 {"status":"unhealthy","reason":...} while kdp_server_set_health says so.
 *   POST /control  {"action":"checkpoint"|"stop"|"pause"|"resume"} and/or any of
 *                  {"lr_scale":x,"temperature":x,"kd_weight":x} (finite, > 0, and within
 *                  options.control_range) -> 202
 *                  {"accepted":true,"id":N}; the trainer polls kdp_server_poll_command.
 *   POST /predict  JSON {"inputs":[[v,...],...]} or {"input":[v,...]}, or msgpack
 *                  (Content-Type: application/msgpack) map {"inputs": [array of numbers | bin]}.
 *                  Values are RAW PIXELS in [0, 255] (as stored in the IDX/CIFAR files, before
 *                  any normalisation; a bin input is input_dim uint8 pixels). Each input has
 *                  exactly input_dim values, at most max_predict inputs per request.
 *                  Reply (JSON, or msgpack with the same keys if the request was msgpack):
 *                  {"n":N,"classes":C,"peers":[[[p..]..]..],"ensemble":[[p..]..],
 *                   "teacher":{"name":S,"probs":[[p..]..]}|null,
 *                   "labels":{"ensemble":[k..],"teacher":[k..]}}  ("teacher" label only with one)
 *   GET  /         the dashboard page (HTML; its script and style under /assets/, and Chart.js
 *                  from Debian's libjs-chart.js as /assets/chart.js), embedded at build time.
 *   GET  /history  ?since=SEQ: {"run_id":S,"seq":N,"charts":[{"id","title","unit","stacked"}..],
 *                  "series":[{"chart","name","x":[..],"y":[..]}..] (points newer than SEQ),
 *                  "events":[{"seq","x","unix_time","kind","text"}..],"status":{/status},
 *                  "health":{"status":"ok"|"unhealthy","reason":S}}; see kdp_server_history_*.
 * With a token set, /control, /predict, /status and /history need "Authorization: Bearer TOKEN"
 * (401 otherwise); /metrics, /healthz, / and /assets/ never do (the page holds no data: it asks
 * for the token and sends it in that header).
 * Errors: 400 malformed or out of range, 401, 404 unknown path, 405 wrong method, 413 body >
 * max_body, 431 headers > max_header, 503 (with Retry-After) bodies buffered > max_body_total /
 * predictions holding all but the reserved connections / queue full / server stopping / every
 * connection busy, 504 prediction not answered within predict_timeout. Error bodies are
 * {"error":"message"}.
 * Limits: a full pool (max_connections) closes the connection that made progress least recently
 * (not one waiting for a prediction) to admit a new one; a request must arrive within
 * header_timeout and then at min_rate bytes/s on average, or it is closed; predictions may hold
 * at most max_connections - max(1, max_connections / 8) connections. A client that closes early
 * never raises SIGPIPE: the loop thread blocks it (writes fail with EPIPE).
 */

typedef struct kdp_server kdp_server;

typedef struct kdp_server_options {
  const char *listen;      /* numeric IPv4/IPv6 address or "localhost"; default "127.0.0.1" */
  int port;                /* 0 = any free port */
  const char *token;       /* NULL or "" = no auth (then only loopback addresses may be bound) */
  const char *addr_file;   /* if set, "http://HOST:PORT\n" is written there (e.g. run.dir/server.addr) */
  size_t max_body;         /* bytes; default 1 MiB */
  size_t max_header;       /* bytes of request line + headers; default 16 KiB */
  int max_connections;     /* concurrent; default 64 */
  double idle_timeout;     /* seconds a client has to send a whole request; default 30 */
  double predict_timeout;  /* seconds a prediction may wait for the trainer; default 30 */
  int input_dim;           /* values per predict input; 0 = /predict answers 503 */
  int max_predict;         /* inputs per predict request; default 256 */
  int max_commands;        /* queued control commands; default 64 */
  int quiet;               /* 1 = no log lines on stderr */
  size_t max_body_total;   /* request body bytes buffered by all connections; default 64 MiB */
  double header_timeout;   /* seconds to send a request line and headers; default 10 */
  double min_rate;         /* bytes/s a request must average once header_timeout has passed
                              (default 65536; < 0 = no minimum) */
  /* Bounds of the /control values (KDP_CONTROL_*), e.g. the config ranges of kd.temperature;
     flags = 0: any finite value > 0. note (may be NULL) ends the error message. */
  kdp_range control_range[3];
  const char *control_note[3];
  int history_points;      /* points kept per /history series; default 2048 */
} kdp_server_options;

/* Longest chart id, chart title or series name of the history (with the NUL). */
#define KDP_HIST_NAME 48

/* The /control values, in the order of control_range. */
enum { KDP_CONTROL_LR_SCALE, KDP_CONTROL_TEMPERATURE, KDP_CONTROL_KD_WEIGHT, KDP_NCONTROLS };

void kdp_server_options_defaults(kdp_server_options *o);

/* Binds, writes addr_file and starts the loop thread. Refuses a non-loopback address without a
   token. On failure *out is NULL and err says why. */
int kdp_server_start(kdp_server **out, const kdp_server_options *o, kdp_error *err);
/* Answers pending predictions with 503, closes every connection, joins the thread, frees s.
   Requests taken with kdp_server_take_predict and not yet answered become invalid. NULL is ok. */
void kdp_server_stop(kdp_server *s);
/* "http://HOST:PORT" actually bound (port resolved when options.port was 0). */
const char *kdp_server_address(const kdp_server *s);
int kdp_server_port(const kdp_server *s);

/* Replaces the published snapshot (both strings are copied; a NULL one keeps its old value).
   metrics_text must be Prometheus text format 0.0.4 ending in a newline. */
void kdp_server_publish(kdp_server *s, const char *metrics_text, const char *status_json);

/* reason != NULL and not "": /healthz answers 503 {"status":"unhealthy","reason":REASON} until it
   is called again with NULL (e.g. while ranks of the job are stalled). */
void kdp_server_set_health(kdp_server *s, const char *reason);

/* The dashboard's history (GET /history). A chart is a group of series drawn together: id, title
   (shown above it), unit ("ratio": shown as %, "share": stacked fractions of 1, else free text
   for the axis) and stacked. Charts appear on the page in the order declared; a series whose
   chart was never declared gets a chart of its own, titled by its id, after them. Series are
   created on their first point (at most 256 series; names are cut at KDP_HIST_NAME - 1 bytes).
   x is the step; y may be NaN or Inf (a gap). Events (checkpoint, control, rollback, ...) are
   listed on the page and marked on the charts at their x. */
void kdp_server_history_chart(kdp_server *s, const char *id, const char *title, const char *unit,
                              int stacked);
void kdp_server_history_add(kdp_server *s, const char *chart, const char *name, double x,
                            double y);
void kdp_server_history_event(kdp_server *s, const char *kind, double x, const char *text);

/* Writes v escaped for a Prometheus label value (to go between double quotes: backslash, double
   quote and newline escaped as the text format 0.0.4 asks) into out, NUL-terminated, cut to fit
   n bytes but never inside an escape or a UTF-8 character. Returns the length written. */
size_t kdp_prom_label_value(char *out, size_t n, const char *v);

/* Control commands, in arrival order. */
typedef enum kdp_action {
  KDP_ACTION_NONE = 0,
  KDP_ACTION_CHECKPOINT,
  KDP_ACTION_STOP,
  KDP_ACTION_PAUSE,
  KDP_ACTION_RESUME
} kdp_action;

typedef struct kdp_command {
  uint64_t id;          /* as returned to the client */
  kdp_action action;    /* KDP_ACTION_NONE when the command only sets values */
  int has_lr_scale, has_temperature, has_kd_weight;
  double lr_scale, temperature, kd_weight;
} kdp_command;

/* Returns 1 and fills out if a command was dequeued, 0 if none. */
int kdp_server_poll_command(kdp_server *s, kdp_command *out);

/* A prediction request. The training thread owns it from take to answer. */
typedef struct kdp_predict_req {
  uint64_t id;
  int n;           /* inputs */
  int input_dim;
  float *x;        /* n x input_dim raw pixel values in [0, 255] */
  int msgpack;     /* reply format (informational) */
  struct kdp_predict_priv *priv; /* server-private */
} kdp_predict_req;

typedef struct kdp_predict_result {
  int P;                     /* peers */
  int C;                     /* classes */
  const float *peers;        /* P x n x C probabilities */
  const float *ensemble;     /* n x C */
  const float *teacher;      /* n x C, or NULL */
  const char *teacher_name;  /* NULL if no teacher */
} kdp_predict_result;

/* Predictions waiting for kdp_server_take_predict. */
int kdp_server_predict_waiting(kdp_server *s);
/* Next pending prediction (NULL if none). Must be answered (or failed) exactly once. */
kdp_predict_req *kdp_server_take_predict(kdp_server *s);
/* Copies r, then the loop formats and sends the reply; req is invalid after the call. Returns
   KDP_EINVAL (and answers 500) if r does not fit req. */
int kdp_server_answer_predict(kdp_server *s, kdp_predict_req *req, const kdp_predict_result *r);
/* Answers req with an error status (e.g. 503) and message; req is invalid after the call. */
void kdp_server_fail_predict(kdp_server *s, kdp_predict_req *req, int status, const char *msg);
/* Blocks until the loop thread has formatted every prediction answered so far and handed it to
   its socket, or max_seconds passed; returns 1 if it has. The one call here that waits for the
   loop: a trainer on a machine with no idle core gives the loop its core this way, instead of
   leaving the reply until the scheduler gets round to the loop thread. */
int kdp_server_wait_delivered(kdp_server *s, double max_seconds);

typedef struct kdp_server_stats {
  uint64_t requests;            /* complete requests answered, any status */
  uint64_t connections_total;   /* accepted, including rejected ones */
  uint64_t connections_rejected;/* 503: pool full, every connection waiting for a prediction */
  uint64_t timeouts;            /* connections closed by the idle/slow-client timer */
  uint64_t connections_evicted; /* closed to make room for a new one (pool full) */
  uint64_t bodies_refused;      /* 503: buffered bodies would exceed max_body_total */
  size_t body_bytes;            /* request body bytes buffered now (all connections) */
  uint64_t auth_failures;       /* 401 */
  uint64_t bytes_sent;
  uint64_t predict_queued;
  int connections_open;
  double loop_lag_seconds;      /* last measured lateness of the 100 ms timer */
  double loop_lag_max_seconds;
  uint64_t status_count[600];   /* responses by HTTP status */
} kdp_server_stats;

void kdp_server_get_stats(kdp_server *s, kdp_server_stats *out);

/* Constant-time comparison of a presented secret with the expected one (time depends only on
   the expected length). Returns 1 if equal. */
int kdp_server_secret_equal(const char *given, size_t given_len, const char *expected);

#endif
