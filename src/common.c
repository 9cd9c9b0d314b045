/* common.c: error formatting, checked allocation, PCG32 random streams, clock. */
#define _POSIX_C_SOURCE 200809L
#include "kdpeers/common.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int kdp_fail(kdp_error *err, int code, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
  }
  return code;
}

static int g_die_peer = -1;
static int64_t g_die_step = -1;

void kdp_die_context(int peer, int64_t step) {
  g_die_peer = peer;
  g_die_step = step;
}

void kdp_die(const char *fmt, ...) {
  char msg[KDP_ERRLEN];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (g_die_peer >= 0 && g_die_step >= 0)
    fprintf(stderr, "kdpeers: peer %d, step %lld: %s\n", g_die_peer, (long long)g_die_step, msg);
  else if (g_die_peer >= 0)
    fprintf(stderr, "kdpeers: peer %d: %s\n", g_die_peer, msg);
  else
    fprintf(stderr, "kdpeers: %s\n", msg);
  fflush(stderr);
  exit(1);
}

void *kdp_xmalloc_impl(size_t n, const char *file, int line) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    kdp_die("out of memory allocating %zu bytes at %s:%d", n, file, line);
  }
  return p;
}

void *kdp_xcalloc_impl(size_t n, size_t sz, const char *file, int line) {
  void *p = calloc(n ? n : 1, sz ? sz : 1);
  if (!p) {
    kdp_die("out of memory allocating %zu x %zu bytes at %s:%d", n, sz, file, line);
  }
  return p;
}

void *kdp_xrealloc_impl(void *p, size_t n, const char *file, int line) {
  void *q = realloc(p, n ? n : 1);
  if (!q) kdp_die("out of memory reallocating %zu bytes at %s:%d", n, file, line);
  return q;
}

char *kdp_xstrdup_impl(const char *s, const char *file, int line) {
  size_t n = strlen(s) + 1;
  char *c = kdp_xmalloc_impl(n, file, line);
  memcpy(c, s, n);
  return c;
}

float *kdp_falloc(size_t n) {
  size_t bytes = (n * sizeof(float) + 63) & ~(size_t)63;
  void *p = NULL;
  if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) {
    kdp_die("out of memory allocating %zu floats", n);
  }
  memset(p, 0, bytes ? bytes : 64);
  return p;
}

void kdp_rng_seed(kdp_rng *r, uint64_t seed, uint64_t stream) {
  r->state = 0;
  r->inc = (stream << 1u) | 1u;
  (void)kdp_rng_u32(r);
  r->state += seed;
  (void)kdp_rng_u32(r);
}

uint32_t kdp_rng_u32(kdp_rng *r) {
  uint64_t old = r->state;
  r->state = old * 6364136223846793005ULL + r->inc;
  uint32_t xorshifted = (uint32_t)(((old >> 18u) ^ old) >> 27u);
  uint32_t rot = (uint32_t)(old >> 59u);
  return (xorshifted >> rot) | (xorshifted << ((-rot) & 31));
}

uint32_t kdp_rng_below(kdp_rng *r, uint32_t n) {
  if (n <= 1) return 0;
  uint32_t threshold = (uint32_t)(-n) % n;
  for (;;) {
    uint32_t v = kdp_rng_u32(r);
    if (v >= threshold) return v % n;
  }
}

void kdp_rng_advance(kdp_rng *r, uint64_t delta) {
  /* state' = mult^delta * state + inc * (mult^(delta-1) + ... + 1), by squaring */
  uint64_t mult = 6364136223846793005ULL, plus = r->inc, acc_mult = 1, acc_plus = 0;
  while (delta > 0) {
    if (delta & 1) {
      acc_mult *= mult;
      acc_plus = acc_plus * mult + plus;
    }
    plus = (mult + 1) * plus;
    mult *= mult;
    delta >>= 1;
  }
  r->state = acc_mult * r->state + acc_plus;
}

float kdp_rng_uniform(kdp_rng *r) { return (float)(kdp_rng_u32(r) >> 8) * (1.0f / 16777216.0f); }

float kdp_rng_normal(kdp_rng *r) {
  /* Box-Muller; u1 in (0, 1] so log is finite. */
  float u1 = 1.0f - kdp_rng_uniform(r);
  float u2 = kdp_rng_uniform(r);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
}

double kdp_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int kdp_range_contains(const kdp_range *r, double v) {
  if (v != v) return 0;
  if (r->flags & KDP_RANGE_LO) {
    if ((r->flags & KDP_RANGE_LO_EXCL) ? !(v > r->lo) : !(v >= r->lo)) return 0;
  }
  if (r->flags & KDP_RANGE_HI) {
    if ((r->flags & KDP_RANGE_HI_EXCL) ? !(v < r->hi) : !(v <= r->hi)) return 0;
  }
  return 1;
}

void kdp_fmt_double(double v, char *buf, size_t n) {
  if (v == floor(v) && fabs(v) < 1e15) { /* whole numbers as written: 60, not 6e+01 */
    snprintf(buf, n, "%.0f", v);
    return;
  }
  for (int p = 1; p <= 17; p++) {
    snprintf(buf, n, "%.*g", p, v);
    if (strtod(buf, NULL) == v) return;
  }
}

void kdp_range_text(const kdp_range *r, char *buf, size_t n) {
  char a[32], b[32];
  kdp_fmt_double(r->lo, a, sizeof a);
  kdp_fmt_double(r->hi, b, sizeof b);
  unsigned f = r->flags;
  if ((f & KDP_RANGE_LO) && (f & KDP_RANGE_HI))
    snprintf(buf, n, "%c%s, %s%c", (f & KDP_RANGE_LO_EXCL) ? '(' : '[', a, b,
             (f & KDP_RANGE_HI_EXCL) ? ')' : ']');
  else if (f & KDP_RANGE_LO)
    snprintf(buf, n, "%s %s", (f & KDP_RANGE_LO_EXCL) ? ">" : ">=", a);
  else if (f & KDP_RANGE_HI)
    snprintf(buf, n, "%s %s", (f & KDP_RANGE_HI_EXCL) ? "<" : "<=", b);
  else if (n)
    buf[0] = 0;
}
