/* metrics.c: metrics.jsonl lines, the terminal progress line, log lines and the summary table. */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "kdpeers/kd.h"
#include "train_internal.h"

#define MAX_EVAL_ROWS 72

/* last eval figures for the summary table */
static struct {
  char name[32];
  double acc, loss;
} g_rows[MAX_EVAL_ROWS];
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

int kdp_metrics_open(kdp_trainer *t, int64_t truncate_at, kdp_error *err) {
  char path[KDP_PATH + 32];
  snprintf(path, sizeof path, "%s/%s", t->cfg->dir, t->serve_only ? "serve.jsonl" : "metrics.jsonl");
  /* resume: drop what was logged after the checkpoint, so the file reads as one run */
  if (truncate_at >= 0 && truncate(path, (off_t)truncate_at) != 0 && errno != ENOENT)
    return kdp_fail(err, KDP_EIO, "cannot truncate '%s' to the checkpoint's offset: %s", path,
                    strerror(errno));
  t->metrics = fopen(path, "a");
  if (!t->metrics)
    return kdp_fail(err, KDP_EIO, "cannot open '%s' for appending: %s", path, strerror(errno));
  const char *mode = t->cfg->progress;
  if (strcmp(mode, "auto") == 0)
    t->tty = isatty(STDERR_FILENO) || kdp_progress_launcher_tty();
  else
    t->tty = strcmp(mode, "bar") == 0 ? 1 : strcmp(mode, "plain") == 0 ? 0 : -1;
  g_nrows = 0;
  fprintf(t->metrics, "{\"event\":\"start\",\"peers\":%d,\"ranks\":%d,\"method\":", t->P,
          t->d->world_size);
  kdp_json_str(t->metrics, t->P > 1 ? t->cfg->method : "independent");
  fputs(",\"arch\":", t->metrics);
  kdp_json_str(t->metrics, t->cfg->arch);
  fprintf(t->metrics,
          ",\"params\":%zu,\"steps\":%lld,\"steps_per_epoch\":%lld,\"seed\":%llu,"
          "\"resumed_at\":%lld}\n",
          kdp_model_n_params(t->model), (long long)t->total_steps,
          (long long)t->steps_per_epoch, (unsigned long long)t->cfg->seed, (long long)t->step);
  fflush(t->metrics);
  return 0;
}

void kdp_metrics_event(kdp_trainer *t, const char *name, int64_t step, double value) {
  if (!t->metrics) return;
  fputs("{\"event\":", t->metrics);
  kdp_json_str(t->metrics, name);
  fprintf(t->metrics, ",\"step\":%lld,\"value\":", (long long)step);
  kdp_json_num(t->metrics, value);
  fputs("}\n", t->metrics);
  fflush(t->metrics);
}

void kdp_metrics_config_change(kdp_trainer *t, const char *key, const char *old_value,
                               const char *new_value) {
  if (!t->metrics) return;
  fputs("{\"event\":\"config_change\",\"key\":", t->metrics);
  kdp_json_str(t->metrics, key);
  fputs(",\"old\":", t->metrics);
  kdp_json_str(t->metrics, old_value);
  fputs(",\"new\":", t->metrics);
  kdp_json_str(t->metrics, new_value);
  fprintf(t->metrics, ",\"step\":%lld}\n", (long long)t->step);
  fflush(t->metrics);
}

int64_t kdp_metrics_offset(kdp_trainer *t) {
  if (!t->metrics) return -1;
  fflush(t->metrics);
  return (int64_t)ftello(t->metrics);
}

void kdp_metrics_close(kdp_trainer *t) {
  if (t->metrics) fclose(t->metrics);
  t->metrics = NULL;
}

void kdp_metrics_eval(kdp_trainer *t, int64_t step, double epoch, const char *model, double acc,
                      double loss) {
  if (t->metrics) {
    fprintf(t->metrics, "{\"event\":\"eval\",\"epoch\":%.4g,\"step\":%lld,\"model\":", epoch,
            (long long)step);
    kdp_json_str(t->metrics, model);
    fputs(",\"acc\":", t->metrics);
    kdp_json_num(t->metrics, acc);
    fputs(",\"loss\":", t->metrics);
    kdp_json_num(t->metrics, loss);
    fputs("}\n", t->metrics);
    fflush(t->metrics);
  }
  int i;
  for (i = 0; i < g_nrows; i++)
    if (strcmp(g_rows[i].name, model) == 0) break;
  if (i == g_nrows && g_nrows < MAX_EVAL_ROWS) g_nrows++;
  if (i < MAX_EVAL_ROWS) {
    snprintf(g_rows[i].name, sizeof g_rows[i].name, "%s", model);
    g_rows[i].acc = acc;
    g_rows[i].loss = loss;
  }
  if (t->tty < 0) return;
  if (t->tty) fputs("\r\033[K", stderr);
  char ts[32];
  timestamp(ts, sizeof ts);
  fprintf(stderr, "%s%seval epoch %.3g step %lld %-9s acc %.2f%% loss %.4f\n", t->tty ? "" : ts,
          t->tty ? "" : " ", epoch, (long long)step, model, 100.0 * acc, loss);
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
          t->cfg->arch, kdp_model_n_params(t->model), (long long)t->total_steps,
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
  if (t->P > 1 && strcmp(t->cfg->method, "independent") != 0) snprintf(kds, sizeof kds, " kd %.4f", kd);
  int n = snprintf(line, sizeof line,
                   "epoch %.2f %sstep %lld/%lld loss %.4f%s acc %.1f%% lr %.4g %.0f samples/s ETA %s",
                   epoch, bar, (long long)step, (long long)t->total_steps, loss, kds, 100.0 * acc,
                   lr, sps, etas);
  if (n > cols - 1 && cols > 1 && cols - 1 < (int)sizeof line) line[cols - 1] = 0;
  fprintf(stderr, "\r\033[K%s", line);
  if (step == t->total_steps) fputc('\n', stderr);
}

void kdp_progress_update(kdp_trainer *t, int64_t step, double epoch, double loss, double kd,
                         double acc, double train_seconds, double lr) {
  double sps = train_seconds > 0 ? (double)step * (double)t->Bg / train_seconds : 0;
  double eta = step > 0 ? train_seconds / (double)step * (double)(t->total_steps - step) : -1;
  if (t->metrics) {
    fprintf(t->metrics, "{\"event\":\"train\",\"epoch\":%.4g,\"step\":%lld,\"loss\":", epoch,
            (long long)step);
    kdp_json_num(t->metrics, loss);
    fputs(",\"kd\":", t->metrics);
    kdp_json_num(t->metrics, kd);
    fputs(",\"acc\":", t->metrics);
    kdp_json_num(t->metrics, acc);
    fprintf(t->metrics, ",\"lr\":%.6g,\"samples_per_second\":%.1f}\n", lr, sps);
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
  if (t->metrics) {
    fprintf(t->metrics,
            "{\"event\":\"summary\",\"steps\":%lld,\"train_seconds\":%.4f,\"steps_per_second\":%.4f,"
            "\"steps_this_run\":%lld,\"samples_per_second\":%.1f,\"compute_seconds\":%.4f,\"exchange_seconds\":%.4f,"
            "\"allreduce_seconds\":%.4f,\"wait_seconds\":%.4f,\"bytes_per_step\":%.0f,"
            "\"peak_rss_mb\":%.1f,\"rss_mb_mean\":%.1f,\"pss_mb_total\":%.1f,"
            "\"peers\":%d,\"ranks\":%d",
            (long long)s->steps, s->train_seconds, sps, (long long)s->steps_this_run,
            sps * (double)t->Bg, s->compute_seconds,
            s->exchange_seconds, s->allreduce_seconds, s->wait_seconds, s->bytes_per_step,
            s->peak_rss_mb, s->rss_mb_mean, s->pss_mb_total, t->P,
            t->d->world_size);
    for (int i = 0; i < g_nrows; i++) {
      fputs(",\"acc_", t->metrics);
      fputs(g_rows[i].name, t->metrics);
      fputs("\":", t->metrics);
      kdp_json_num(t->metrics, g_rows[i].acc);
    }
    fputs("}\n", t->metrics);
    fflush(t->metrics);
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

void kdp_metrics_control(kdp_trainer *t, uint64_t id, const char *action, double lr_scale,
                         double temperature, double kd_weight) {
  if (!t->metrics) return;
  fprintf(t->metrics, "{\"event\":\"control\",\"id\":%llu,\"step\":%lld,\"action\":",
          (unsigned long long)id, (long long)t->step);
  kdp_json_str(t->metrics, action);
  if (!isnan(lr_scale)) fprintf(t->metrics, ",\"lr_scale\":%.9g", lr_scale);
  if (!isnan(temperature)) fprintf(t->metrics, ",\"temperature\":%.9g", temperature);
  if (!isnan(kd_weight)) fprintf(t->metrics, ",\"kd_weight\":%.9g", kd_weight);
  fputs("}\n", t->metrics);
  fflush(t->metrics);
}
