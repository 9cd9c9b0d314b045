/* plot.c: learning curves: reads run.dir/metrics.jsonl (json-c) and writes an SVG of test
   accuracy and loss against epoch for every peer, the ensemble and the teacher. */
#include <errno.h>
#include <json-c/json.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/tools.h"

#define MAX_SERIES 72
#define MAX_POINTS 4096

typedef struct series {
  char name[32];
  size_t n;
  double epoch[MAX_POINTS], acc[MAX_POINTS], loss[MAX_POINTS];
} series;

static series *find_series(series *s, size_t *ns, const char *name) {
  for (size_t i = 0; i < *ns; i++)
    if (strcmp(s[i].name, name) == 0) return &s[i];
  if (*ns == MAX_SERIES) return NULL;
  series *x = &s[(*ns)++];
  memset(x, 0, sizeof *x);
  snprintf(x->name, sizeof x->name, "%s", name);
  return x;
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

/* colours: peers in blues/greens, the ensemble black, the teacher red */
static const char *colour(const char *name, size_t i) {
  static const char *pal[] = {"#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#8c564b",
                              "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#98df8a"};
  if (strcmp(name, "ensemble") == 0) return "#000000";
  if (strncmp(name, "peer", 4) != 0) return "#d62728";
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
    else
      fputc(*s, f);
  }
}

/* one panel: x = epoch, y = acc (in %) or loss */
static void panel(FILE *f, const series *s, size_t ns, int which, double x0, double y0, double w,
                  double h, double emax, const char *title) {
  double lo = INFINITY, hi = -INFINITY;
  for (size_t i = 0; i < ns; i++)
    for (size_t k = 0; k < s[i].n; k++) {
      double v = which ? s[i].loss[k] : 100.0 * s[i].acc[k];
      if (!isfinite(v)) continue;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  if (!(lo <= hi)) lo = 0, hi = 1;
  if (hi - lo < 1e-9) lo -= 0.5, hi += 0.5;
  double pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  fprintf(f, "<g font-family=\"sans-serif\" font-size=\"12\">\n");
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" font-size=\"14\" font-weight=\"bold\">", x0, y0 - 10);
  escape(f, title);
  fputs("</text>\n", f);
  fprintf(f, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"none\" stroke=\"#444\"/>\n",
          x0, y0, w, h);
  for (int g = 0; g <= 5; g++) { /* y grid and labels */
    double v = lo + (hi - lo) * g / 5.0, y = y0 + h - h * g / 5.0;
    fprintf(f, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>\n", x0, y,
            x0 + w, y);
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n", x0 - 6, y + 4,
            which ? 3 : 1, v);
  }
  for (int g = 0; g <= 5; g++) { /* x labels */
    double e = emax * g / 5.0, x = x0 + w * g / 5.0;
    fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.3g</text>\n", x, y0 + h + 16,
            e);
  }
  fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">epoch</text>\n", x0 + w / 2,
          y0 + h + 34);
  for (size_t i = 0; i < ns; i++) {
    const char *c = colour(s[i].name, i);
    int bold = strncmp(s[i].name, "peer", 4) != 0;
    fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"%s\" points=\"", c,
            bold ? "2.5" : "1.5");
    for (size_t k = 0; k < s[i].n; k++) {
      double v = which ? s[i].loss[k] : 100.0 * s[i].acc[k];
      if (!isfinite(v)) continue;
      double x = x0 + w * (emax > 0 ? s[i].epoch[k] / emax : 0), y = y0 + h - h * (v - lo) / (hi - lo);
      fprintf(f, "%.1f,%.1f ", x, y);
    }
    fputs("\"/>\n", f);
    for (size_t k = 0; k < s[i].n; k++) {
      double v = which ? s[i].loss[k] : 100.0 * s[i].acc[k];
      if (!isfinite(v)) continue;
      double x = x0 + w * (emax > 0 ? s[i].epoch[k] / emax : 0), y = y0 + h - h * (v - lo) / (hi - lo);
      fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"2.5\" fill=\"%s\"/>\n", x, y, c);
    }
  }
  fputs("</g>\n", f);
}

int kdp_plot_run(const char *run_dir, const char *out_path, char *why, size_t why_len) {
  char path[4096];
  snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
  FILE *in = fopen(path, "r");
  if (!in) {
    snprintf(why, why_len, "cannot read %s: %s", path, strerror(errno));
    return -1;
  }
  series *s = calloc(MAX_SERIES, sizeof *s);
  if (!s) abort();
  size_t ns = 0;
  char *line = NULL;
  size_t cap = 0;
  char title[256] = "kdpeers";
  while (getline(&line, &cap, in) > 0) {
    json_object *o = json_tokener_parse(line);
    if (!o) continue; /* a torn last line of a killed run */
    json_object *ev, *model;
    if (json_object_object_get_ex(o, "event", &ev)) {
      const char *e = json_object_get_string(ev);
      if (strcmp(e, "start") == 0) {
        json_object *m, *a, *p;
        if (json_object_object_get_ex(o, "method", &m) && json_object_object_get_ex(o, "arch", &a) &&
            json_object_object_get_ex(o, "peers", &p))
          snprintf(title, sizeof title, "%s, %d peer%s, %s", json_object_get_string(m),
                   json_object_get_int(p), json_object_get_int(p) == 1 ? "" : "s",
                   json_object_get_string(a));
      } else if (strcmp(e, "eval") == 0 && json_object_object_get_ex(o, "model", &model)) {
        int ok = 1;
        double ep = jnum(o, "epoch", &ok), acc = jnum(o, "acc", &ok), loss = jnum(o, "loss", &ok);
        series *x = find_series(s, &ns, json_object_get_string(model));
        if (ok && x && x->n < MAX_POINTS) {
          /* a resumed run repeats nothing (metrics.jsonl is cut at the checkpoint), but keep the
             latest value for an epoch seen twice */
          if (x->n > 0 && fabs(x->epoch[x->n - 1] - ep) < 1e-9) x->n--;
          x->epoch[x->n] = ep;
          x->acc[x->n] = acc;
          x->loss[x->n] = loss;
          x->n++;
        }
      }
    }
    json_object_put(o);
  }
  free(line);
  fclose(in);
  if (ns == 0) {
    snprintf(why, why_len, "%s has no eval lines yet", path);
    free(s);
    return -1;
  }
  double emax = 0;
  for (size_t i = 0; i < ns; i++)
    for (size_t k = 0; k < s[i].n; k++)
      if (s[i].epoch[k] > emax) emax = s[i].epoch[k];
  FILE *f = fopen(out_path, "w");
  if (!f) {
    snprintf(why, why_len, "cannot write %s: %s", out_path, strerror(errno));
    free(s);
    return -1;
  }
  const double W = 1080, H = 395;
  fprintf(f, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
             "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
             "viewBox=\"0 0 %.0f %.0f\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
          W, H, W, H);
  fprintf(f, "<text x=\"20\" y=\"24\" font-family=\"sans-serif\" font-size=\"16\" font-weight=\"bold\">");
  escape(f, title);
  fputs("</text>\n", f);
  panel(f, s, ns, 0, 70, 60, 340, 280, emax, "test accuracy (%)");
  panel(f, s, ns, 1, 500, 60, 340, 280, emax, "test loss");
  /* legend */
  for (size_t i = 0; i < ns; i++) {
    double y = 70 + 18.0 * (double)i;
    fprintf(f, "<line x1=\"870\" y1=\"%.1f\" x2=\"895\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n",
            y, y, colour(s[i].name, i));
    fprintf(f, "<text x=\"902\" y=\"%.1f\" font-family=\"sans-serif\" font-size=\"12\">", y + 4);
    escape(f, s[i].name);
    fprintf(f, " %.2f%%</text>\n", 100.0 * s[i].acc[s[i].n - 1]);
  }
  fputs("</svg>\n", f);
  int rc = fclose(f) == 0 ? 0 : -1;
  if (rc != 0) snprintf(why, why_len, "cannot write %s", out_path);
  free(s);
  return rc;
}
