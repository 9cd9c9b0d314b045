/* testutil.c: golden-file reader and comparison helpers for the check suites. */
#include "testutil.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

TCase *kdp_test_case(const char *name) {
  TCase *tc = tcase_create(name);
  tcase_set_timeout(tc, KDP_CASE_TIMEOUT);
  return tc;
}

const char *kdp_test_src_path(const char *rel) {
  static char buf[4096];
  const char *root = getenv("KDP_SOURCE_ROOT");
  snprintf(buf, sizeof buf, "%s/%s", root ? root : ".", rel);
  return buf;
}

static uint32_t rd_u32(FILE *f, const char *path) {
  uint8_t b[4];
  if (fread(b, 1, 4, f) != 4) ck_abort_msg("golden %s: truncated", path);
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

kdp_golden *kdp_golden_load(const char *name) {
  char rel[512];
  snprintf(rel, sizeof rel, "tests/%s", name);
  const char *path = kdp_test_src_path(rel);
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "cannot open golden file %s (set KDP_SOURCE_ROOT)", path);
  char magic[8];
  ck_assert_msg(fread(magic, 1, 8, f) == 8 && memcmp(magic, "KDPGOLD1", 8) == 0,
                "golden %s: bad magic", path);
  kdp_golden *g = calloc(1, sizeof *g);
  g->n = rd_u32(f, path);
  g->recs = calloc(g->n, sizeof *g->recs);
  for (size_t i = 0; i < g->n; i++) {
    kdp_golden_rec *r = &g->recs[i];
    uint32_t len = rd_u32(f, path);
    ck_assert_msg(len < sizeof r->name, "golden %s: name too long", path);
    ck_assert_msg(fread(r->name, 1, len, f) == len, "golden %s: truncated name", path);
    r->name[len] = 0;
    r->ndim = rd_u32(f, path);
    ck_assert_msg(r->ndim <= 8, "golden %s: %s has %u dims", path, r->name, r->ndim);
    r->n = 1;
    for (uint32_t d = 0; d < r->ndim; d++) {
      r->dims[d] = rd_u32(f, path);
      r->n *= r->dims[d];
    }
    r->data = malloc((r->n ? r->n : 1) * sizeof(float));
    ck_assert_msg(fread(r->data, sizeof(float), r->n, f) == r->n, "golden %s: %s truncated", path,
                  r->name);
  }
  fclose(f);
  return g;
}

void kdp_golden_free(kdp_golden *g) {
  if (!g) return;
  for (size_t i = 0; i < g->n; i++) free(g->recs[i].data);
  free(g->recs);
  free(g);
}

const kdp_golden_rec *kdp_golden_find(const kdp_golden *g, const char *name) {
  for (size_t i = 0; i < g->n; i++)
    if (strcmp(g->recs[i].name, name) == 0) return &g->recs[i];
  return NULL;
}

const kdp_golden_rec *kdp_golden_get(const kdp_golden *g, const char *name) {
  const kdp_golden_rec *r = kdp_golden_find(g, name);
  ck_assert_msg(r != NULL, "golden record '%s' missing", name);
  return r;
}

double kdp_test_maxerr(const float *a, const float *b, size_t n, double atol, double rtol,
                       size_t *worst) {
  double m = 0;
  size_t w = 0;
  for (size_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - (double)b[i]) / (atol + rtol * fabs((double)b[i]));
    if (!(e <= m)) { /* also catches NaN */
      m = isnan(e) ? INFINITY : e;
      w = i;
    }
  }
  if (worst) *worst = w;
  return m;
}

void kdp_test_assert_close(const char *what, const float *a, const float *b, size_t n, double atol,
                           double rtol) {
  size_t w = 0;
  double e = kdp_test_maxerr(a, b, n, atol, rtol, &w);
  ck_assert_msg(e <= 1.0,
                "%s: mismatch at index %zu of %zu: got %.8g, expected %.8g (atol %g, rtol %g)",
                what, w, n, (double)a[w], (double)b[w], atol, rtol);
}

char *kdp_test_tmpdir(void) {
  char *p = strdup("/tmp/kdptest.XXXXXX");
  ck_assert_msg(mkdtemp(p) != NULL, "mkdtemp failed");
  return p;
}

char *kdp_test_read_file(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  ck_assert_msg(f != NULL, "cannot open %s (set KDP_SOURCE_ROOT?)", path);
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = malloc((size_t)n + 1);
  ck_assert_msg(b && fread(b, 1, (size_t)n, f) == (size_t)n, "cannot read %s", path);
  b[n] = 0;
  fclose(f);
  if (len) *len = (size_t)n;
  return b;
}
