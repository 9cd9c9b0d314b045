/* common.h: error codes, error messages, logging and the random-number streams every module shares. */
#ifndef KDPEERS_COMMON_H
#define KDPEERS_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define KDP_VERSION "0.1.0"
/* The git commit of the build ("0123456789ab", "-dirty" if modified; "unknown" outside git). */
const char *kdp_git_hash(void);

/* Error codes: functions that can fail return 0 or one of these (negative). */
enum kdp_err {
  KDP_OK = 0,
  KDP_EINVAL = -1,   /* bad argument, config value or spec string */
  KDP_EIO = -2,      /* file missing, unreadable or truncated */
  KDP_EFORMAT = -3,  /* file present but malformed (magic, counts, labels) */
  KDP_ENOMEM = -4,
  KDP_EMPI = -5,
  KDP_EMISMATCH = -6, /* ranks or files disagree */
  KDP_EDIVERGED = -7, /* NaN or Inf in a loss or the parameters */
  KDP_ESTOPPED = -8,  /* stopped on request (signal): not an error, exits KDP_EXIT_PREEMPTED */
  KDP_EBUSY = -9      /* run.dir is in use by another run (exits 2, like a usage error) */
};

/* Error message buffer: the first failing function fills it; callers print it. */
#define KDP_ERRLEN 1024
typedef struct kdp_error {
  char msg[KDP_ERRLEN];
} kdp_error;

/* Formats a message into err (may be NULL) and returns code. */
int kdp_fail(kdp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A failure the process cannot recover from (out of memory, a broken invariant): prints
   "kdpeers: peer P, step S: <message>" (the context the trainer set, when it did) and exits with
   status 1, which ends an MPI job (mpirun stops the other ranks). Never abort(): no core dump,
   and a message a user can act on. */
void kdp_die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
/* The peer and step kdp_die names (-1: none); the trainer sets them at every step. */
void kdp_die_context(int peer, int64_t step);

/* Allocation that exits through kdp_die with file:line on failure (out of memory is not
   recoverable here). */
void *kdp_xmalloc_impl(size_t n, const char *file, int line);
void *kdp_xcalloc_impl(size_t n, size_t sz, const char *file, int line);
#define kdp_xmalloc(n) kdp_xmalloc_impl((n), __FILE__, __LINE__)
#define kdp_xcalloc(n, sz) kdp_xcalloc_impl((n), (sz), __FILE__, __LINE__)
void *kdp_xrealloc_impl(void *p, size_t n, const char *file, int line);
char *kdp_xstrdup_impl(const char *s, const char *file, int line);
#define kdp_xrealloc(p, n) kdp_xrealloc_impl((p), (n), __FILE__, __LINE__)
#define kdp_xstrdup(s) kdp_xstrdup_impl((s), __FILE__, __LINE__)
/* 64-byte aligned float buffer, zeroed. Free with free(). */
float *kdp_falloc(size_t n);

/* Random streams: PCG32 (O'Neill), one independent stream per (seed, stream id). */
typedef struct kdp_rng {
  uint64_t state;
  uint64_t inc;
} kdp_rng;

void kdp_rng_seed(kdp_rng *r, uint64_t seed, uint64_t stream);
uint32_t kdp_rng_u32(kdp_rng *r);
uint32_t kdp_rng_below(kdp_rng *r, uint32_t n);  /* uniform in [0, n), unbiased */
float kdp_rng_uniform(kdp_rng *r);                /* uniform in [0, 1) */
float kdp_rng_normal(kdp_rng *r);                 /* standard normal */
/* Jumps the stream ahead by delta draws of kdp_rng_u32 in O(log delta) steps (Brown's LCG
   skip-ahead): the same state as delta calls, so blocks of a sequence can be drawn in parallel. */
void kdp_rng_advance(kdp_rng *r, uint64_t delta);

/* Stream ids, so every consumer of randomness has its own reproducible stream. */
enum kdp_stream {
  KDP_STREAM_INIT = 1,     /* + peer index * 16 */
  KDP_STREAM_SHUFFLE = 2,
  KDP_STREAM_AUGMENT = 3,  /* + rank * 16 */
  KDP_STREAM_DROPOUT = 4,  /* + rank * 16 */
  KDP_STREAM_NOISE = 5,
  KDP_STREAM_MODULE = 6,   /* replicated modules (gate, fusion, attention) */
  KDP_STREAM_EMBED = 8     /* mcl's embedding heads, + peer index * 16 (7 is main's KDP_STREAM_EMA) */
};

/* Monotonic wall clock in seconds. */
double kdp_now(void);

/* A numeric range, as config validation checks a key (kdp_config_range gives a key's). */
enum { KDP_RANGE_LO = 1, KDP_RANGE_HI = 2, KDP_RANGE_LO_EXCL = 4, KDP_RANGE_HI_EXCL = 8 };
typedef struct kdp_range {
  double lo, hi;
  unsigned flags; /* KDP_RANGE_*: which bounds apply, and whether they are excluded */
} kdp_range;
int kdp_range_contains(const kdp_range *r, double v); /* 1 if v is in r (NaN never is) */
/* "[1, 100000]", "(0, 100]", ">= 0", "> 0", or "" if unbounded. */
void kdp_range_text(const kdp_range *r, char *buf, size_t n);
/* Shortest "%.*g" that reads back to exactly v. */
void kdp_fmt_double(double v, char *buf, size_t n);

#endif
