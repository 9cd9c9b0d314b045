/* plot.c: learning curves: reads run.dir/metrics.jsonl (json-c) of one or several runs and writes
   an SVG of test accuracy and of test and training loss against epoch for every peer, the
   ensemble and the teacher, with round tick labels. */
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/tools.h"

#define MAX_SERIES 96

typedef enum { S_EVAL, S_TRAIN } series_kind;

typedef struct series {
  char name[64];  /* "peer0", "ensemble", "train peer0"; prefixed by the run label if several */
  int run;        /* index of the run it comes from */
  series_kind kind;
  size_t n, cap;
  double *epoch, *acc, *loss; /* acc unused for S_TRAIN */
} series;

typedef struct plot {
  series s[MAX_SERIES];
  size_t ns;
  char title[512];
} plot;

static series *find_series(plot *p, int run, series_kind kind, const char *label,
                           const char *name) {
  char full[64];
  snprintf(full, sizeof full, "%s%s%s%s", label, label[0] ? " " : "", kind == S_TRAIN ? "train " : "",
           name);
  for (size_t i = 0; i < p->ns; i++)
    if (p->s[i].run == run && strcmp(p->s[i].name, full) == 0) return &p->s[i];
  if (p->ns == MAX_SERIES) return NULL;
  series *x = &p->s[p->ns++];
  memset(x, 0, sizeof *x);
  snprintf(x->name, sizeof x->name, "%s", full);
  x->run = run;
  x->kind = kind;
  return x;
}

static void series_add(series *x, double epoch, double acc, double loss) {
  /* a resumed run repeats nothing (metrics.jsonl is cut at the checkpoint), but keep the latest
     value for an epoch seen twice */
  if (x->n > 0 && fabs(x->epoch[x->n - 1] - epoch) < 1e-9) x->n--;
  if (x->n == x->cap) {
    x->cap = x->cap ? 2 * x->cap : 64;
    x->epoch = kdp_xrealloc(x->epoch, x->cap * sizeof(double));
    x->acc = kdp_xrealloc(x->acc, x->cap * sizeof(double));
    x->loss = kdp_xrealloc(x->loss, x->cap * sizeof(double));
  }
  x->epoch[x->n] = epoch;
  x->acc[x->n] = acc;
  x->loss[x->n] = loss;
  x->n++;
}

static double jnum(json_object *o, const char *key, int *ok) {
  json_object *v;
  if (!json_object_object_get_ex(o, key, &v) ||
      !(json_object_is_type(v, json_type_double) || json_object_is_type(v, json_type_int))) {
    *ok = 0;
    return 0;
  }
  return json_object_get_double(v);
}

/* colours: one palette per run; within a run peers in blues/greens, the ensemble black, the
   teacher red; training curves in a lighter shade (drawn thinner and dashed) */
static const char *colour(const series *x, size_t i) {
  static const char *pal[] = {"#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b",
                              "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a"};
  const char *base = strrchr(x->name, ' ');
  base = base ? base + 1 : x->name;
  if (x->run == 0 && strcmp(base, "ensemble") == 0) return "#000000";
  if (x->run == 0 && strncmp(base, "peer", 4) != 0) return "#d62728";
  return pal[i % (sizeof pal / sizeof pal[0])];
}

static void escape(FILE *f, const char *s) {
  for (; *s; s++) {
    if (*s == '<')
      fputs("&lt;", f);
    else if (*s == '>')
      fputs("&gt;", f);
    else if (*s == '&')
      fputs("&amp;", f);
    else if (*s == '"')
      fputs("&quot;", f);
    else
      fputc(*s, f);
  }
}

/* ---- round tick labels (Heckbert, "Nice numbers for graph labels", Graphics Gems 1990) ---- */

/* a 1, 2 or 5 times a power of ten near x: rounded, or at least x */
static double nice_number(double x, int round_it) {
  double e = floor(log10(x)), f = x / pow(10.0, e), nf;
  if (round_it)
    nf = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
  else
    nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
  return nf * pow(10.0, e);
}

typedef struct axis {
  double lo, hi, step; /* lo and hi are multiples of step */
  int decimals;        /* enough to print every tick exactly */
} axis;

void kdp_plot_nice_axis(double lo, double hi, int ticks, double *out_lo, double *out_hi,
                        double *out_step, int *decimals) {
  if (!(hi > lo)) {
    double c = isfinite(lo) ? lo : 0, w = fabs(c) > 0 ? fabs(c) * 0.1 : 1;
    lo = c - w;
    hi = c + w;
  }
  double range = nice_number(hi - lo, 0);
  double step = nice_number(range / (ticks - 1), 1);
  *out_lo = floor(lo / step + 1e-9) * step;
  *out_hi = ceil(hi / step - 1e-9) * step;
  *out_step = step;
  int d = (int)-floor(log10(step) + 1e-9);
  *decimals = d > 0 ? d : 0;
}

static axis nice_axis(double lo, double hi, int ticks) {
  axis a;
  kdp_plot_nice_axis(lo, hi, ticks, &a.lo, &a.hi, &a.step, &a.decimals);
  return a;
}

/* the value of point k of a series in a panel (acc in %, or loss) */
static double value(const series *x, size_t k, int which) {
  return which ? x->loss[k] : 100.0 * x->acc[k];
}

/* one panel: x = epoch, y = test accuracy in % (which 0) or loss (which 1: test and train) */
static void panel(FILE *f, const plot *p, int which, double x0, double y0, double w, double h,
                  axis ax, const char *title) {
  double lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < p->ns; i++) {
    if (p->s[i].kind == S_TRAIN && !which) continue;
    for (size_t k = 0; k < p->s[i].n; k++) {
      double v = value(&p->s[i], k, which);
      if (!isfinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  if (!(lo <= hi)) lo = 0, hi = 1;
  axis ay = nice_axis(lo, hi, 6);
  fprintf(f, "<g font-family=\"sans-serif\" font-size=\"12\">\n");
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" font-weight=\"bold\">", x0, y0 - 10);
  escape(f, title);
  fputs("</text>\n", f);
  fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n",
          x0, y0, w, h);
  const char *pname = which ? "loss" : "acc";
  for (double v = ay.lo; v <= ay.hi + ay.step * 1e-6; v += ay.step) { /* y grid and labels */
    double y = y0 + h - h * (v - ay.lo) / (ay.hi - ay.lo);
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, y,
            x0 + w, y);
    fprintf(f, "<text class=\"tick-y\" data-panel=\"%s\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n",
            pname, x0 - 6, y + 4, ay.decimals, fabs(v) < ay.step * 1e-6 ? 0.0 : v);
  }
  for (double e = ax.lo; e <= ax.hi + ax.step * 1e-6; e += ax.step) { /* x labels */
    double x = x0 + w * (e - ax.lo) / (ax.hi - ax.lo);
    fprintf(f, "<text class=\"tick-x\" data-panel=\"%s\" x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.*f</text>\n",
            pname, x, y0 + h + 16, ax.decimals, e);
  }
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">epoch</text>\n", x0 + w / 2,
          y0 + h + 34);
  for (size_t i = 0; i < p->ns; i++) {
    const series *x = &p->s[i];
    if (x->kind == S_TRAIN && !which) continue;
    const char *c = colour(x, i);
    const char *base = strrchr(x->name, ' ');
    base = base ? base + 1 : x->name;
    int bold = x->kind == S_EVAL && strncmp(base, "peer", 4) != 0;
    const char *cls = x->kind == S_TRAIN ? "train-loss" : which ? "eval-loss" : "eval-acc";
    fprintf(f, "<polyline class=\"%s\" data-series=\"", cls);
    escape(f, x->name);
    fprintf(f, "\" fill=\"none\" stroke=\"%s\" stroke-width=\"%s\"%s points=\"", c,
            x->kind == S_TRAIN ? "1" : bold ? "2.5" : "1.5",
            x->kind == S_TRAIN ? " stroke-opacity=\"0.6\" stroke-dasharray=\"4 2\"" : "");
    for (size_t k = 0; k < x->n; k++) {
      double v = value(x, k, which);
      if (!isfinite(v)) continue;
      double px = x0 + w * (x->epoch[k] - ax.lo) / (ax.hi - ax.lo),
             py = y0 + h - h * (v - ay.lo) / (ay.hi - ay.lo);
      fprintf(f, "%.1f,%.1f ", px, py);
    }
    fputs("\"/>\n", f);
    if (x->kind == S_TRAIN) continue;
    for (size_t k = 0; k < x->n; k++) { /* evaluations are points: a single one still shows */
      double v = value(x, k, which);
      if (!isfinite(v)) continue;
      double px = x0 + w * (x->epoch[k] - ax.lo) / (ax.hi - ax.lo),
             py = y0 + h - h * (v - ay.lo) / (ay.hi - ay.lo);
      fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", px, py, c);
    }
  }
  fputs("</g>\n", f);
}

/* reads one run's metrics.jsonl into p; label prefixes its series when several runs overlay */
static int read_run(plot *p, int run, const char *run_dir, const char *label, char *why,
                    size_t why_len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
  FILE *in = fopen(path, "r");
  if (!in) {
    snprintf(why, why_len, "cannot read %s: %s", path, strerror(errno));
    return -1;
  }
  char *line = NULL;
  size_t cap = 0;
  int evals = 0;
  while (getline(&line, &cap, in) > 0) {
    json_object *o = json_tokener_parse(line);
    if (!o) continue; /* a torn last line of a killed run */
    json_object *ev, *model;
    if (json_object_object_get_ex(o, "event", &ev)) {
      const char *e = json_object_get_string(ev);
      if (strcmp(e, "start") == 0) {
        json_object *m, *a, *pe;
        if (json_object_object_get_ex(o, "method", &m) && json_object_object_get_ex(o, "arch", &a) &&
            json_object_object_get_ex(o, "peers", &pe)) {
          size_t used = strlen(p->title);
          if (used < sizeof p->title)
            snprintf(p->title + used, sizeof p->title - used, "%s%s%s%s, %d peer%s, %s",
                     used ? "; " : "", label, label[0] ? ": " : "", json_object_get_string(m),
                     json_object_get_int(pe), json_object_get_int(pe) == 1 ? "" : "s",
                     json_object_get_string(a));
        }
      } else if (strcmp(e, "eval") == 0 && json_object_object_get_ex(o, "model", &model)) {
        int ok = 1;
        double ep = jnum(o, "epoch", &ok), acc = jnum(o, "acc", &ok), loss = jnum(o, "loss", &ok);
        series *x = find_series(p, run, S_EVAL, label, json_object_get_string(model));
        if (ok && x) series_add(x, ep, acc, loss);
        evals++;
      } else if (strcmp(e, "train") == 0) {
        /* the training loss of peer 0 over each log window (rank 0 logs its own peer) */
        int ok = 1;
        double ep = jnum(o, "epoch", &ok), loss = jnum(o, "loss", &ok);
        series *x = find_series(p, run, S_TRAIN, label, "peer0");
        if (ok && x) series_add(x, ep, 0, loss);
      }
    }
    json_object_put(o);
  }
  free(line);
  fclose(in);
  if (evals == 0) {
    snprintf(why, why_len, "%s has no eval lines yet", path);
    return -1;
  }
  return 0;
}

/* the last path component of a run directory, for the legend */
static void run_label(const char *dir, char *out, size_t n) {
  size_t len = strlen(dir);
  while (len > 1 && dir[len - 1] == '/') len--;
  const char *start = dir;
  for (size_t i = 0; i < len; i++)
    if (dir[i] == '/') start = dir + i + 1;
  snprintf(out, n, "%.*s", (int)(len - (size_t)(start - dir)), start);
}

int kdp_plot_runs(const char *const *run_dirs, int n_runs, const char *out_path, char *why,
                  size_t why_len) {
  plot *p = kdp_xcalloc(1, sizeof *p);
  int rc = 0;
  for (int r = 0; r < n_runs && rc == 0; r++) {
    char label[64] = "";
    if (n_runs > 1) run_label(run_dirs[r], label, sizeof label);
    rc = read_run(p, r, run_dirs[r], label, why, why_len);
  }
  FILE *f = NULL;
  if (rc == 0 && !(f = fopen(out_path, "w"))) {
    snprintf(why, why_len, "cannot write %s: %s", out_path, strerror(errno));
    rc = -1;
  }
  if (rc == 0) {
    double emax = 0;
    for (size_t i = 0; i < p->ns; i++)
      for (size_t k = 0; k < p->s[i].n; k++)
        if (p->s[i].epoch[k] > emax) emax = p->s[i].epoch[k];
    axis ax = nice_axis(0, emax > 0 ? emax : 1, 6);
    size_t legend = p->ns;
    double W = 1180, H = 395; /* taller when the legend needs it */
    if (80 + 18.0 * (double)legend > H) H = 80 + 18.0 * (double)legend;
    fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
               "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
               "viewBox=\"0 0 %.0f %.0f\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            W, H, W, H);
    fprintf(f, "<text x=\"20\" y=\"24\" font-family=\"sans-serif\" font-size=\"16\" font-weight=\"bold\">");
    escape(f, p->title);
    fputs("</text>\n", f);
    panel(f, p, 0, 70, 60, 340, 280, ax, "test accuracy (%)");
    panel(f, p, 1, 500, 60, 340, 280, ax, "loss: test (solid), training (dashed)");
    for (size_t i = 0; i < p->ns; i++) { /* legend */
      const series *x = &p->s[i];
      double y = 70 + 18.0 * (double)i;
      fprintf(f, "<line x1=\"870\" y1=\"%.1f\" x2=\"895\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"%s/>\n",
              y, y, colour(x, i), x->kind == S_TRAIN ? " stroke-dasharray=\"4 2\"" : "");
      fprintf(f, "<text class=\"legend\" x=\"902\" y=\"%.1f\" font-family=\"sans-serif\" font-size=\"12\">", y + 4);
      escape(f, x->name);
      if (x->n && x->kind == S_EVAL)
        fprintf(f, " %.2f%%", 100.0 * x->acc[x->n - 1]);
      else if (x->n)
        fprintf(f, " loss %.4f", x->loss[x->n - 1]);
      fputs("</text>\n", f);
    }
    fputs("</svg>\n", f);
    if (fclose(f) != 0) {
      snprintf(why, why_len, "cannot write %s", out_path);
      rc = -1;
    }
  }
  for (size_t i = 0; i < p->ns; i++) {
    free(p->s[i].epoch);
    free(p->s[i].acc);
    free(p->s[i].loss);
  }
  free(p);
  return rc;
}

int kdp_plot_run(const char *run_dir, const char *out_path, char *why, size_t why_len) {
  return kdp_plot_runs(&run_dir, 1, out_path, why, why_len);
}
