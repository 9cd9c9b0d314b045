/* testutil.h: helpers shared by the check suites: golden-file reader, temp dirs, comparisons. */
#ifndef KDPEERS_TESTUTIL_H
#define KDPEERS_TESTUTIL_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Per-case timeout of every check suite, in seconds. A last resort against a hang, never a speed
 * limit: a busy shared machine runs a case many times slower than an idle one (speed is measured
 * by the benchmark scripts under launch/, not by tests). Check multiplies it by
 * CK_TIMEOUT_MULTIPLIER (10 under launch/test's sanitizers); meson's per-test timeout
 * (tests/meson.build) still bounds the whole executable.
 */
#define KDP_CASE_TIMEOUT 240
/* tcase_create with the timeout above: the suites make every test case with it. */
TCase *kdp_test_case(const char *name);

/*
 * Golden files (written by tests/gen_*.py): "KDPGOLD1", uint32 count, then per record
 * uint32 name_len, name, uint32 ndim, uint32 dims[ndim], float32 data[prod(dims)], all little
 * endian. Integer arrays (labels) are stored as float32.
 */
typedef struct kdp_golden_rec {
  char name[128];
  uint32_t ndim;
  uint32_t dims[8];
  size_t n;
  float *data;
} kdp_golden_rec;

typedef struct kdp_golden {
  size_t n;
  kdp_golden_rec *recs;
} kdp_golden;

/* Loads tests/NAME from $KDP_SOURCE_ROOT (or the current directory). Aborts the test on error. */
kdp_golden *kdp_golden_load(const char *name);
void kdp_golden_free(kdp_golden *g);
/* Record by name; aborts (test failure) if missing. */
const kdp_golden_rec *kdp_golden_get(const kdp_golden *g, const char *name);
const kdp_golden_rec *kdp_golden_find(const kdp_golden *g, const char *name); /* NULL if missing */

/* Largest |a-b| / (atol + rtol |b|) over n; <= 1 means within tolerance. Writes the worst index. */
double kdp_test_maxerr(const float *a, const float *b, size_t n, double atol, double rtol,
                       size_t *worst);
/* Fails the current check test (ck_assert) with a message naming what and where if out of tol. */
void kdp_test_assert_close(const char *what, const float *a, const float *b, size_t n, double atol,
                           double rtol);

/* Path of a fresh temporary directory (mkdtemp), owned by the caller. */
char *kdp_test_tmpdir(void);
/* Path under $KDP_SOURCE_ROOT. Static buffer. */
const char *kdp_test_src_path(const char *rel);
/* A whole file, malloc'd and NUL-terminated; its length in *len (may be NULL). Fails the test
   if it cannot be read. */
char *kdp_test_read_file(const char *path, size_t *len);

#endif
