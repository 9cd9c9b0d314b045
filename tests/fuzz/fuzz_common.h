/* fuzz_common.h: helpers for the libFuzzer targets whose readers take file paths. The input is
   written to in-memory files (memfd_create, opened by the readers as /proc/self/fd/N) that are
   overwritten on every iteration: nothing touches the disk, nothing is left behind, and there is
   no per-iteration file system cost (truncating a real file on ext4 flushes it: ~7 ms). */
#ifndef KDPEERS_FUZZ_COMMON_H
#define KDPEERS_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#define FUZZ_MAX_FILES 4

/* writes all n bytes at offset 0 of fd after truncating it; aborts on a harness failure */
static inline void fuzz_put(int fd, const uint8_t *data, size_t n) {
  if (ftruncate(fd, 0) != 0) abort();
  size_t done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, data + done, n - done, (off_t)done);
    if (w <= 0) abort();
    done += (size_t)w;
  }
}

/* writes data to in-memory file k (gzip-compressed when gz); returns a path that opens it */
static inline const char *fuzz_write(int k, const uint8_t *data, size_t n, int gz) {
  static int fds[FUZZ_MAX_FILES] = {-1, -1, -1, -1};
  static char paths[FUZZ_MAX_FILES][64];
  if (k < 0 || k >= FUZZ_MAX_FILES) abort();
  if (fds[k] < 0) {
    fds[k] = memfd_create("kdpfuzz", 0);
    if (fds[k] < 0) abort();
    snprintf(paths[k], sizeof paths[k], "/proc/self/fd/%d", fds[k]);
  }
  if (!gz) {
    fuzz_put(fds[k], data, n);
    return paths[k];
  }
  /* a gzip stream (windowBits 15 + 16), as gzwrite would produce, built in memory */
  z_stream zs = {0};
  if (deflateInit2(&zs, 1, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK) abort();
  size_t cap = deflateBound(&zs, (uLong)n) + 32;
  uint8_t *out = malloc(cap);
  if (!out) abort();
  zs.next_in = (Bytef *)data;
  zs.avail_in = (uInt)n;
  zs.next_out = out;
  zs.avail_out = (uInt)cap;
  if (deflate(&zs, Z_FINISH) != Z_STREAM_END) abort();
  fuzz_put(fds[k], out, cap - zs.avail_out);
  deflateEnd(&zs);
  free(out);
  return paths[k];
}

#endif
