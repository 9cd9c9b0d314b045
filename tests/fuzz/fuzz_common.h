/* fuzz_common.h: helpers for the libFuzzer targets whose readers take file paths: the input is
   written to per-process temporary files that are overwritten on every iteration. */
#ifndef KDPEERS_FUZZ_COMMON_H
#define KDPEERS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <zlib.h>

/* path for temporary file number k of this process */
static inline const char *fuzz_path(int k, const char *suffix) {
  static char paths[4][128];
  snprintf(paths[k], sizeof paths[k], "/tmp/kdpfuzz-%d-%d%s", (int)getpid(), k, suffix);
  return paths[k];
}

/* writes data to file k (gzip-compressed when gz); returns the path */
static inline const char *fuzz_write(int k, const uint8_t *data, size_t n, int gz) {
  const char *p = fuzz_path(k, gz ? ".gz" : "");
  if (gz) {
    gzFile f = gzopen(p, "wb");
    if (!f) abort();
    if (n) gzwrite(f, data, (unsigned)n);
    gzclose(f);
  } else {
    FILE *f = fopen(p, "wb");
    if (!f) abort();
    if (n) fwrite(data, 1, n, f);
    fclose(f);
  }
  return p;
}

#endif
