/* metrics.c: metrics.jsonl lines, the terminal progress line, log lines and the summary table. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/kd.h"
#include "train_internal.h"

/* last eval figures for the summary table, /metrics and /status */
static struct {
  char name[32];
  double acc, loss;
  double val_acc, val_loss; /* data.val_size; NaN without */
} g_rows[KDP_EVAL_ROWS_MAX];
static int g_nrows;

static void timestamp(char *buf, size_t n) {
  time_t now = time(NULL);
  struct tm tm;
  localtime_r(&now, &tm);
  strftime(buf, n, "%Y-%m-%dT%H:%M:%S", &tm);
}

static void fmt_dur(char *buf, size_t n, double s) {
  if (!(s >= 0) || s > 1e7) {
    snprintf(buf, n, "--");
    return;
  }
  long v = (long)(s + 0.5);
  if (v >= 3600)
    snprintf(buf, n, "%ldh%02ldm", v / 3600, (v / 60) % 60);
  else if (v >= 60)
    snprintf(buf, n, "%ldm%02lds", v / 60, v % 60);
  else
    snprintf(buf, n, "%lds", v);
}

/* JSON string escaping for the few strings we write (names, arch, paths) */
void kdp_json_str(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      fprintf(f, "\\%c", c);
    else if (c < 0x20)
      fprintf(f, "\\u%04x", c);
    else
      fputc(c, f);
  }
  fputc('"', f);
}

/* JSON has no NaN/Inf: write null */
void kdp_json_num(FILE *f, double v) {
  if (isfinite(v))
    fprintf(f, "%.6g", v);
  else
    fputs("null", f);
}

/* ---- the file: whole lines, each with one write(2) ---- */

struct kdp_metrics_file {
  int fd;
  int64_t off;    /* its size: the end of the last whole line */
  uint64_t lost;  /* lines that could not be written */
  int torn;       /* a partial line could not be cut off: start the next one on a new line */
  int warned;
  char first_error[160];
  char path[KDP_PATH + 32];
  int64_t fault_from, fault_to; /* KDP_FAULT_METRICS_FULL (tests): a full disk for these steps */
};

void kdp_json_nums(FILE *f, const double *v, int n) {
  fputc('[', f);
  for (int i = 0; i < n; i++) {
    if (i) fputc(',', f);
    kdp_json_num(f, v[i]);
  }
  fputc(']', f);
}

static void warn_once(kdp_metrics_file *m, const char *what, int e) {
  if (m->first_error[0] == 0)
    snprintf(m->first_error, sizeof m->first_error, "%s: %s", what, strerror(e));
  if (m->warned++) return;
  fprintf(stderr,
          "\nkdpeers: WARNING: %s %s: %s. Training goes on; metrics lines that cannot be "
          "written are counted (metrics_lines_lost in the summary and in /status). This warning "
          "is printed once.\n",
          what, m->path, strerror(e));
}

/* Test hook: from step fault_from to fault_to the file may not grow more than 20 bytes past its
   end (RLIMIT_FSIZE, with SIGXFSZ ignored): the kernel writes part of a line, then fails with
   EFBIG, as a disk that fills up does. */
static int fault_window(const kdp_trainer *t, struct rlimit *saved) {
  const kdp_metrics_file *m = t->metrics;
  if (t->step < m->fault_from || t->step >= m->fault_to) return 0;
  struct rlimit lim;
  if (getrlimit(RLIMIT_FSIZE, saved) != 0) return 0;
  lim = *saved;
  lim.rlim_cur = (rlim_t)m->off + 20;
  return setrlimit(RLIMIT_FSIZE, &lim) == 0;
}

/* Appends one whole line (s ends with a newline) with as few writes as the kernel allows; a line
   that cannot be written whole is cut off again, so a later line never continues it. */
static void write_line(kdp_trainer *t, const char *s, size_t n) {
  kdp_metrics_file *m = t->metrics;
  struct rlimit saved;
  int fault = fault_window(t, &saved);
  if (m->torn && write(m->fd, "\n", 1) == 1) {
    m->off++;
    m->torn = 0;
  }
  size_t done = 0;
  int e = 0;
  while (done < n) {
    ssize_t w = write(m->fd, s + done, n - done);
    if (w > 0) {
      done += (size_t)w;
    } else if (w < 0 && errno == EINTR) {
      continue;
    } else {
      e = w < 0 ? errno : ENOSPC;
      break;
    }
  }
  if (fault) setrlimit(RLIMIT_FSIZE, &saved);
  if (done == n) {
    m->off += (int64_t)n;
    return;
  }
  m->lost++;
  if (done > 0 && ftruncate(m->fd, (off_t)m->off) != 0) {
    m->off += (int64_t)done;
    m->torn = 1;
  }
  warn_once(m, "cannot write", e);
}

/* A line is built in memory (the JSON helpers write to a FILE), then written whole. */
typedef struct line {
  FILE *f;
  char *buf;
  size_t len;
} line;

static int line_begin(kdp_trainer *t, line *l) {
  if (!t->metrics) return 0;
  l->buf = NULL;
  l->len = 0;
  l->f = open_memstream(&l->buf, &l->len);
  if (!l->f) {
    t->metrics->lost++;
    warn_once(t->metrics, "out of memory formatting a line of", ENOMEM);
  }
  return l->f != NULL;
}

static void line_end(kdp_trainer *t, line *l) {
  if (fclose(l->f) == 0 && l->len > 0) write_line(t, l->buf, l->len);
  free(l->buf);
}

/* Starts the line of a training-time event: {"event":NAME,"epoch":E,"step":S, to which the
   caller adds its fields, "}\n" and line_end. 0 (nothing to end) without a file or memory. */
static int line_event(kdp_trainer *t, line *l, const char *name, double epoch, int64_t step) {
  if (!line_begin(t, l)) return 0;
  fprintf(l->f, "{\"event\":\"%s\",\"epoch\":%.4g,\"step\":%lld", name, epoch, (long long)step);
  return 1;
}

/* ,"KEY":V (null for NaN and Inf) */
static void field_num(FILE *f, const char *key, double v) {
  fprintf(f, ",\"%s\":", key);
  kdp_json_num(f, v);
}

/* Resume: cut what was logged after the checkpoint, so the file reads as one run. A file shorter
   than the checkpoint's offset lost lines before it: keep what is there (truncate(2) would pad it
   with NUL bytes). */
static int cut_at(const char *path, int64_t at, kdp_error *err) {
  struct stat st;
  int64_t size = stat(path, &st) == 0 ? (int64_t)st.st_size : 0;
  if (size < at) {
    fprintf(stderr,
            "kdpeers: warning: %s holds %lld bytes, fewer than the %lld the checkpoint recorded: "
            "lines logged before the checkpoint are missing (a full disk, or the file was "
            "edited); keeping what is there and appending\n",
            path, (long long)size, (long long)at);
    return 0;
  }
  if (truncate(path, (off_t)at) != 0 && errno != ENOENT)
    return kdp_fail(err, KDP_EIO, "cannot truncate '%s' to the checkpoint's offset: %s", path,
                    strerror(errno));
  return 0;
}

int kdp_metrics_open(kdp_trainer *t, int64_t truncate_at, kdp_error *err) {
  kdp_metrics_file *m = kdp_xcalloc(1, sizeof *m);
  snprintf(m->path, sizeof m->path, "%s/%s", t->cfg->dir,
           t->serve_only ? "serve.jsonl" : "metrics.jsonl");
  int rc = truncate_at >= 0 ? cut_at(m->path, truncate_at, err) : 0;
  m->fd = rc == 0 ? open(m->path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644) : -1;
  if (rc == 0 && m->fd < 0)
    rc = kdp_fail(err, KDP_EIO, "cannot open '%s' for appending: %s", m->path, strerror(errno));
  if (rc != 0) {
    free(m);
    return rc;
  }
  struct stat st;
  m->off = fstat(m->fd, &st) == 0 ? (int64_t)st.st_size : 0;
  char last = '\n';
  if (m->off > 0 && pread(m->fd, &last, 1, (off_t)m->off - 1) == 1 && last != '\n')
    m->torn = 1; /* a line cut short by an earlier run: ours start on a line of their own */
  const char *fault = getenv("KDP_FAULT_METRICS_FULL");
  m->fault_from = m->fault_to = -1;
  if (fault) {
    long long a = -1, b = -1;
    if (sscanf(fault, "%lld-%lld", &a, &b) == 2) {
      m->fault_from = a;
      m->fault_to = b;
    }
  }
  t->metrics = m;
  switch ((kdp_progress_mode)t->cfg->progress_id) {
  case KDP_PROGRESS_AUTO: t->tty = isatty(STDERR_FILENO) || kdp_progress_launcher_tty(); break;
  case KDP_PROGRESS_BAR: t->tty = 1; break;
  case KDP_PROGRESS_PLAIN: t->tty = 0; break;
  default: t->tty = -1; break;
  }
  g_nrows = 0;
  line l;
  if (!line_begin(t, &l)) return 0;
  fprintf(l.f, "{\"event\":\"start\",\"peers\":%d,\"ranks\":%d,\"method\":", t->P,
          t->d->world_size);
  kdp_json_str(l.f, t->P > 1 ? t->cfg->method : "independent");
  fputs(",\"arch\":", l.f);
  kdp_json_str(l.f, t->cfg->arch);
  fprintf(l.f,
          ",\"params\":%zu,\"steps\":%lld,\"steps_per_epoch\":%lld,\"seed\":%llu,"
          "\"resumed_at\":%lld}\n",
          kdp_model_n_params(t->model) + kdp_embed_n_params(t), (long long)t->total_steps,
          (long long)t->steps_per_epoch, (unsigned long long)t->cfg->seed, (long long)t->step);
  line_end(t, &l);
  return 0;
}

uint64_t kdp_metrics_lost(const kdp_trainer *t) { return t->metrics ? t->metrics->lost : 0; }

void kdp_metrics_event(kdp_trainer *t, const char *name, int64_t step, double value) {
  char text[96];
  if (strcmp(name, "checkpoint") == 0) snprintf(text, sizeof text, "written in %.2f s", value);
  else if (strcmp(name, "rollback") == 0) snprintf(text, sizeof text, "lr scale now %g", value);
  else if (strcmp(name, "stop") == 0) snprintf(text, sizeof text, "checkpointed and stopped");
  else snprintf(text, sizeof text, "%g", value);
  kdp_live_event(t, name, step, text);
  line l;
  if (!line_begin(t, &l)) return;
  fputs("{\"event\":", l.f);
  kdp_json_str(l.f, name);
  fprintf(l.f, ",\"step\":%lld", (long long)step);
  field_num(l.f, "value", value);
  fputs("}\n", l.f);
  line_end(t, &l);
}

void kdp_metrics_line(kdp_trainer *t, const char *json) {
  line l;
  if (!line_begin(t, &l)) return;
  fputs(json, l.f);
  line_end(t, &l);
}

void kdp_metrics_config_change(kdp_trainer *t, const char *key, const char *old_value,
                               const char *new_value) {
  line l;
  if (!line_begin(t, &l)) return;
  fputs("{\"event\":\"config_change\",\"key\":", l.f);
  kdp_json_str(l.f, key);
  fputs(",\"old\":", l.f);
  kdp_json_str(l.f, old_value);
  fputs(",\"new\":", l.f);
  kdp_json_str(l.f, new_value);
  fprintf(l.f, ",\"step\":%lld}\n", (long long)t->step);
  line_end(t, &l);
}

int64_t kdp_metrics_offset(kdp_trainer *t) {
  kdp_metrics_file *m = t->metrics;
  if (!m) return -1;
  /* the checkpoint records this offset: what lies before it should be on disk */
  if (fsync(m->fd) != 0 && errno != EINVAL) warn_once(m, "cannot sync", errno);
  return m->off;
}

void kdp_metrics_close(kdp_trainer *t) {
  kdp_metrics_file *m = t->metrics;
  if (!m) return;
  if (close(m->fd) != 0) warn_once(m, "cannot close", errno);
  if (m->lost)
    fprintf(stderr, "kdpeers: WARNING: %llu line%s of %s could not be written (first error: %s)\n",
            (unsigned long long)m->lost, m->lost == 1 ? "" : "s", m->path, m->first_error);
  free(m);
  t->metrics = NULL;
}

void kdp_metrics_eval(kdp_trainer *t, int64_t step, double epoch, const char *model, double acc,
                      double loss) {
  kdp_metrics_eval_val(t, step, epoch, model, acc, loss, NAN, NAN);
}

/* the model's validation accuracy into t->val_table, which a new evaluation step starts over */
static void val_record(kdp_trainer *t, int64_t step, const char *model, double acc) {
  if (!t->val_table || t->val_step != step) {
    free(t->val_table);
    t->val_table = kdp_xcalloc(1, 1);
    t->val_step = step;
  }
  size_t n = strlen(t->val_table), add = strlen(model) + 32;
  t->val_table = kdp_xrealloc(t->val_table, n + add);
  snprintf(t->val_table + n, add, "%s %.9g\n", model, acc);
}

void kdp_metrics_set_last_eval(const char *model, double acc, double loss, double val_acc,
                               double val_loss) {
  int i;
  for (i = 0; i < g_nrows; i++)
    if (strcmp(g_rows[i].name, model) == 0) break;
  if (i == g_nrows && g_nrows < KDP_EVAL_ROWS_MAX) g_nrows++;
  if (i < KDP_EVAL_ROWS_MAX) {
    snprintf(g_rows[i].name, sizeof g_rows[i].name, "%s", model);
    g_rows[i].acc = acc;
    g_rows[i].loss = loss;
    g_rows[i].val_acc = val_acc;
    g_rows[i].val_loss = val_loss;
  }
}

void kdp_metrics_eval_val(kdp_trainer *t, int64_t step, double epoch, const char *model,
                          double acc, double loss, double val_acc, double val_loss) {
  const int has_val = !isnan(val_acc);
  line l;
  if (line_event(t, &l, "eval", epoch, step)) {
    fputs(",\"model\":", l.f);
    kdp_json_str(l.f, model);
    field_num(l.f, "acc", acc);
    field_num(l.f, "loss", loss);
    if (has_val) {
      field_num(l.f, "val_acc", val_acc);
      field_num(l.f, "val_loss", val_loss);
    }
    fputs("}\n", l.f);
    line_end(t, &l);
  }
  kdp_live_eval(t, step, model, acc, loss);
  if (has_val) {
    kdp_live_series(t, "val_accuracy", model, step, val_acc);
    val_record(t, step, model, val_acc);
  }
  kdp_metrics_set_last_eval(model, acc, loss, val_acc, val_loss);
  if (t->tty < 0) return;
  if (t->tty) fputs("\r\033[K", stderr);
  char ts[32];
  timestamp(ts, sizeof ts);
  char vs[48] = "";
  if (has_val) snprintf(vs, sizeof vs, " val acc %.2f%%", 100.0 * val_acc);
  fprintf(stderr, "%s%seval epoch %.3g step %lld %-9s acc %.2f%% loss %.4f%s\n", t->tty ? "" : ts,
          t->tty ? "" : " ", epoch, (long long)step, model, 100.0 * acc, loss, vs);
}

/* the last evaluation's diversity, for /metrics and /status */
static struct {
  int have, n_churn;
  double kl, disagreement, churn[KDP_MAX_PEERS];
} g_div;

void kdp_metrics_diversity(kdp_trainer *t, int64_t step, double epoch, double kl,
                           double disagreement, const double *churn, int P) {
  line l;
  if (line_event(t, &l, "diversity", epoch, step)) {
    field_num(l.f, "kl", kl);
    field_num(l.f, "disagreement", disagreement);
    if (churn) {
      fputs(",\"churn\":", l.f);
      kdp_json_nums(l.f, churn, P);
    }
    fputs("}\n", l.f);
    line_end(t, &l);
  }
  kdp_live_series(t, "diversity", "kl", step, kl);
  kdp_live_series(t, "diversity", "disagreement", step, disagreement);
  kdp_metrics_set_last_diversity(kl, disagreement, churn, P);
  for (int p = 0; p < g_div.n_churn; p++) {
    char name[32];
    snprintf(name, sizeof name, "churn.peer%d", p);
    kdp_live_series(t, "diversity", name, step, churn[p]);
  }
}

void kdp_metrics_set_last_diversity(double kl, double disagreement, const double *churn, int P) {
  g_div.have = 1;
  g_div.kl = kl;
  g_div.disagreement = disagreement;
  g_div.n_churn = churn ? (P < KDP_MAX_PEERS ? P : KDP_MAX_PEERS) : 0;
  for (int p = 0; p < g_div.n_churn; p++) g_div.churn[p] = churn[p];
}

int kdp_metrics_last_diversity(double *kl, double *disagreement, double *churn, int *n_churn) {
  if (!g_div.have) return 0;
  *kl = g_div.kl;
  *disagreement = g_div.disagreement;
  *n_churn = g_div.n_churn;
  for (int p = 0; p < g_div.n_churn; p++) churn[p] = g_div.churn[p];
  return 1;
}

/* switokd's last finished epoch, for /metrics and /status */
static struct {
  int have;
  double fraction, epoch;
} g_sw;

void kdp_metrics_switokd(kdp_trainer *t, int64_t step, double epoch, int64_t expert,
                         int64_t steps) {
  double f = steps > 0 ? (double)expert / (double)steps : 0.0;
  line l;
  if (line_event(t, &l, "switokd", epoch, step)) {
    fprintf(l.f, ",\"expert_steps\":%lld,\"steps\":%lld", (long long)expert, (long long)steps);
    field_num(l.f, "expert_fraction", f);
    fputs("}\n", l.f);
    line_end(t, &l);
  }
  kdp_live_series(t, "switokd", "expert_fraction", step, f);
  kdp_metrics_set_last_switokd(f, epoch);
}

void kdp_metrics_set_last_switokd(double fraction, double epoch) {
  g_sw.have = 1;
  g_sw.fraction = fraction;
  g_sw.epoch = epoch;
}

int kdp_metrics_last_switokd(double *fraction, double *epoch) {
  if (!g_sw.have) return 0;
  *fraction = g_sw.fraction;
  *epoch = g_sw.epoch;
  return 1;
}

void kdp_progress_start(kdp_trainer *t, double load_seconds) {
  if (t->tty < 0) return;
  char ts[32];
  timestamp(ts, sizeof ts);
  fprintf(stderr,
          "%s kdpeers %s: %d peer%s x %d rank%s, method %s, arch %s (%zu params), %lld steps "
          "(%lld/epoch), batch %zu, data loaded in %.2fs\n",
          ts, KDP_VERSION, t->P, t->P == 1 ? "" : "s", t->d->ranks_per_peer,
          t->d->ranks_per_peer == 1 ? "" : "s", t->P > 1 ? t->cfg->method : "independent",
          t->cfg->arch, kdp_model_n_params(t->model) + kdp_embed_n_params(t),
          (long long)t->total_steps,
          (long long)t->steps_per_epoch, t->Bg, load_seconds);
  if (!t->d->uniform) {
    char ks[256] = "";
    size_t used = 0;
    for (int p = 0; p < t->P && used + 8 < sizeof ks; p++)
      used += (size_t)snprintf(ks + used, sizeof ks - used, "%s%d", p ? "+" : "", t->d->peer_k[p]);
    fprintf(stderr, "%s kdpeers: per-peer layout: %d ranks = %s ranks per peer (peer 0 first)\n",
            ts, t->d->world_size, ks);
  }
  t->t_start = kdp_now();
}

int kdp_progress_launcher_tty(void) {
  const char *c = getenv("KDP_TTY_COLUMNS");
  return c && atoi(c) > 0;
}

/* the width of the terminal the bar is drawn on: rank 0's own, or the launcher's */
static int term_columns(void) {
  struct winsize ws;
  if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  const char *c = getenv("KDP_TTY_COLUMNS");
  int v = c ? atoi(c) : 0;
  return v > 0 ? v : 80;
}

/* the bar: one line redrawn in place, cut to the terminal's width (a wrapped line could not be
   redrawn); the distillation loss only for methods that have one */
static void progress_bar(kdp_trainer *t, int64_t step, double epoch, double loss, double kd,
                         double acc, double lr, double sps, const char *etas) {
  int cols = term_columns();
  int width = cols >= 110 ? 20 : cols >= 90 ? 10 : 0;
  int fill = t->total_steps > 0 ? (int)((double)width * (double)step / (double)t->total_steps) : 0;
  char bar[40] = "", line[512], kds[32] = "";
  if (width > 0) {
    bar[0] = '[';
    for (int i = 0; i < width; i++) bar[1 + i] = i < fill ? '#' : '.';
    memcpy(bar + 1 + width, "] ", 3);
  }
  if (kdp_metrics_distils(t)) snprintf(kds, sizeof kds, " kd %.4f", kd);
  int n = snprintf(line, sizeof line,
                   "epoch %.2f %sstep %lld/%lld loss %.4f%s acc %.1f%% lr %.4g %.0f samples/s ETA %s",
                   epoch, bar, (long long)step, (long long)t->total_steps, loss, kds, 100.0 * acc,
                   lr, sps, etas);
  if (n > cols - 1 && cols > 1 && cols - 1 < (int)sizeof line) line[cols - 1] = 0;
  fprintf(stderr, "\r\033[K%s", line);
  if (step == t->total_steps) fputc('\n', stderr);
}

int kdp_metrics_distils(const kdp_trainer *t) {
  return t->P > 1 && t->ops != kdp_method_ops_of(KDP_METHOD_INDEPENDENT);
}

void kdp_progress_update(kdp_trainer *t, int64_t step, double epoch, double loss, double kd,
                         double acc, double train_seconds, double lr) {
  kdp_live_progress(t, step, lr);
  double sps = train_seconds > 0 ? (double)step * (double)t->Bg / train_seconds : 0;
  double eta = step > 0 ? train_seconds / (double)step * (double)(t->total_steps - step) : -1;
  line l;
  if (line_event(t, &l, "train", epoch, step)) {
    field_num(l.f, "loss", loss);
    field_num(l.f, "kd", kd);
    if (t->embed) field_num(l.f, "contrast", t->log_contrast);
    field_num(l.f, "acc", acc);
    fprintf(l.f, ",\"lr\":%.6g,\"samples_per_second\":%.1f}\n", lr, sps);
    line_end(t, &l);
  }
  if (t->tty < 0) return;
  char etas[32];
  fmt_dur(etas, sizeof etas, eta);
  if (t->tty) {
    progress_bar(t, step, epoch, loss, kd, acc, lr, sps, etas);
  } else {
    char ts[32];
    timestamp(ts, sizeof ts);
    fprintf(stderr,
            "%s epoch %.2f step %lld/%lld loss %.4f kd %.4f acc %.2f%% lr %.4g %.0f samples/s ETA "
            "%s\n",
            ts, epoch, (long long)step, (long long)t->total_steps, loss, kd, 100.0 * acc, lr, sps,
            etas);
  }
  fflush(stderr);
}

void kdp_metrics_summary(kdp_trainer *t, const kdp_summary *s) {
  double sps = s->train_seconds > 0 ? (double)s->steps / s->train_seconds : 0;
  line l;
  if (line_begin(t, &l)) {
    fprintf(l.f,
            "{\"event\":\"summary\",\"steps\":%lld,\"train_seconds\":%.4f,\"steps_per_second\":%.4f,"
            "\"steps_this_run\":%lld,\"samples_per_second\":%.1f,\"compute_seconds\":%.4f,\"exchange_seconds\":%.4f,"
            "\"allreduce_seconds\":%.4f,\"wait_seconds\":%.4f,\"bytes_per_step\":%.0f,"
            "\"peak_rss_mb\":%.1f,\"rss_mb_mean\":%.1f,\"pss_mb_total\":%.1f,"
            "\"peers\":%d,\"ranks\":%d,\"metrics_lines_lost\":%llu",
            (long long)s->steps, s->train_seconds, sps, (long long)s->steps_this_run,
            sps * (double)t->Bg, s->compute_seconds,
            s->exchange_seconds, s->allreduce_seconds, s->wait_seconds, s->bytes_per_step,
            s->peak_rss_mb, s->rss_mb_mean, s->pss_mb_total, t->P,
            t->d->world_size, (unsigned long long)t->metrics->lost);
    for (int i = 0; i < g_nrows; i++) {
      char key[48];
      snprintf(key, sizeof key, "acc_%.31s", g_rows[i].name); /* a name holds at most 31 */
      field_num(l.f, key, g_rows[i].acc);
    }
    fputs("}\n", l.f);
    line_end(t, &l);
  }
  if (t->tty < 0) return;
  fprintf(stderr, "\n  %-10s %9s %9s\n", "model", "test acc", "loss");
  for (int i = 0; i < g_nrows; i++)
    fprintf(stderr, "  %-10s %8.2f%% %9.4f\n", g_rows[i].name, 100.0 * g_rows[i].acc,
            g_rows[i].loss);
  fprintf(stderr,
          "  %lld steps in %.1fs train time: %.2f steps/s, %.0f samples/s; compute %.1fs, "
          "exchange %.2fs, allreduce %.2fs, waiting %.2fs; peak RSS %.0f MB\n"
          "  metrics: %s/metrics.jsonl\n",
          (long long)s->steps, s->train_seconds, sps, sps * (double)t->Bg, s->compute_seconds,
          s->exchange_seconds, s->allreduce_seconds, s->wait_seconds, s->peak_rss_mb, t->cfg->dir);
}

int kdp_metrics_last_evals(const char **names, double *accs, double *losses, int max) {
  int n = g_nrows < max ? g_nrows : max;
  for (int i = 0; i < n; i++) {
    names[i] = g_rows[i].name;
    accs[i] = g_rows[i].acc;
    losses[i] = g_rows[i].loss;
  }
  return n;
}

int kdp_metrics_last_val(const char **names, double *accs, double *losses, int max) {
  int n = 0;
  for (int i = 0; i < g_nrows && n < max; i++)
    if (!isnan(g_rows[i].val_acc)) {
      names[n] = g_rows[i].name;
      accs[n] = g_rows[i].val_acc;
      losses[n++] = g_rows[i].val_loss;
    }
  return n;
}

void kdp_metrics_control(kdp_trainer *t, uint64_t id, const char *action, double lr_scale,
                         double temperature, double kd_weight) {
  char text[160];
  int n = snprintf(text, sizeof text, "%s", action);
  if (!isnan(lr_scale)) n += snprintf(text + n, sizeof text - (size_t)n, ", lr scale %g", lr_scale);
  if (!isnan(temperature))
    n += snprintf(text + n, sizeof text - (size_t)n, ", T %g", temperature);
  if (!isnan(kd_weight)) snprintf(text + n, sizeof text - (size_t)n, ", kd weight %g", kd_weight);
  kdp_live_event(t, "control", t->step, text);
  line l;
  if (!line_begin(t, &l)) return;
  fprintf(l.f, "{\"event\":\"control\",\"id\":%llu,\"step\":%lld,\"action\":",
          (unsigned long long)id, (long long)t->step);
  kdp_json_str(l.f, action);
  if (!isnan(lr_scale)) fprintf(l.f, ",\"lr_scale\":%.9g", lr_scale);
  if (!isnan(temperature)) fprintf(l.f, ",\"temperature\":%.9g", temperature);
  if (!isnan(kd_weight)) fprintf(l.f, ",\"kd_weight\":%.9g", kd_weight);
  fputs("}\n", l.f);
  line_end(t, &l);
}
