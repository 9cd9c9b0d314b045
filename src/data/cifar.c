/* cifar.c: CIFAR-10/100 binary batches (raw or gzip) into one NHWC uint8 dataset. */
#include "kdpeers/data.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

#define CIFAR_SIDE 32
#define CIFAR_PLANE (CIFAR_SIDE * CIFAR_SIDE)
#define CIFAR_PIXELS (3 * CIFAR_PLANE)
#define CIFAR_CHUNK ((size_t)1 << 24)

/* zlib's description of what went wrong, without the path it prefixes. */
static const char *gz_why(gzFile f, const char *path) {
  int zerr = 0;
  const char *m = gzerror(f, &zerr);
  size_t pl = strlen(path);
  if (zerr == Z_ERRNO) return strerror(errno);
  if (!m || !*m) return "unknown zlib error";
  if (strncmp(m, path, pl) == 0 && strncmp(m + pl, ": ", 2) == 0) m += pl + 2;
  return m;
}

/* Reads a whole file (raw or gzip) into a malloc'ed buffer. */
static int read_file(const char *path, uint8_t **out, size_t *len, kdp_error *err) {
  errno = 0;
  gzFile f = gzopen(path, "rb");
  if (!f)
    return kdp_fail(err, KDP_EIO, "cannot open CIFAR file %s: %s", path,
                    errno ? strerror(errno) : "zlib could not allocate its state");
  gzbuffer(f, 1u << 20);
  struct stat st;
  size_t cap = CIFAR_CHUNK;
  if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
    cap = (size_t)st.st_size + 1; /* exact for raw files: one read reaches EOF */
  uint8_t *buf = malloc(cap);
  size_t n = 0;
  for (;;) {
    if (!buf) {
      gzclose(f);
      return kdp_fail(err, KDP_ENOMEM, "%s: out of memory reading the file (%zu bytes)", path, cap);
    }
    if (n == cap) {
      cap *= 2;
      uint8_t *nb = realloc(buf, cap);
      if (!nb) free(buf);
      buf = nb;
      continue;
    }
    size_t want = cap - n < CIFAR_CHUNK ? cap - n : CIFAR_CHUNK;
    int r = gzread(f, buf + n, (unsigned)want);
    if (r < 0) {
      int rc = kdp_fail(err, KDP_EIO, "%s: read error after %zu bytes: %s", path, n,
                        gz_why(f, path));
      free(buf);
      gzclose(f);
      return rc;
    }
    if (r == 0) break;
    n += (size_t)r;
  }
  int zerr = 0;
  gzerror(f, &zerr);
  if (zerr != Z_OK) { /* e.g. a gzip stream cut short */
    int rc = kdp_fail(err, KDP_EIO,
                      "%s: the gzip stream is truncated or corrupt (%s) after %zu bytes; "
                      "re-download the file",
                      path, gz_why(f, path), n);
    free(buf);
    gzclose(f);
    return rc;
  }
  gzclose(f);
  *out = buf;
  *len = n;
  return 0;
}

int kdp_cifar_load(kdp_dataset *ds, const char *const *paths, size_t n_files, int cifar100,
                   kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  const char *name = cifar100 ? "CIFAR-100" : "CIFAR-10";
  if (!paths || n_files == 0)
    return kdp_fail(err, KDP_EINVAL, "%s: no files given (list the binary batch files)", name);
  size_t nlab = cifar100 ? 2 : 1, rec = nlab + CIFAR_PIXELS;
  size_t other = cifar100 ? 1 + CIFAR_PIXELS : 2 + CIFAR_PIXELS;
  size_t n_classes = cifar100 ? 100 : 10;
  uint8_t *images = NULL, *labels = NULL;
  size_t n = 0, cap = 0;
  int rc = 0;
  for (size_t fi = 0; fi < n_files; fi++) {
    const char *path = paths[fi];
    uint8_t *buf = NULL;
    size_t len = 0;
    rc = read_file(path, &buf, &len, err);
    if (rc) goto fail;
    if (len == 0 || len % rec != 0) {
      const char *hint = "";
      if (len >= 2 && buf[0] == 0x80 && buf[1] <= 5)
        hint = "; this is a Python pickle: use the binary version of the dataset "
               "(cifar-*-binary.tar.gz), not the python one";
      else if (len > 0 && len % other == 0)
        hint = cifar100 ? "; its size fits CIFAR-10 records (3073 bytes): set data.format = cifar10"
                        : "; its size fits CIFAR-100 records (3074 bytes): set data.format = "
                          "cifar100";
      rc = kdp_fail(err, KDP_EFORMAT,
                    "%s: file size %zu is not a positive multiple of the %s record size %zu "
                    "(%zu label byte%s + 3072 pixels)%s",
                    path, len, name, rec, nlab, nlab > 1 ? "s" : "", hint);
      free(buf);
      goto fail;
    }
    size_t m = len / rec;
    if (n + m > cap) {
      cap = (n + m) * 2;
      uint8_t *ni = realloc(images, cap * CIFAR_PIXELS), *nl = ni ? realloc(labels, cap) : NULL;
      if (ni) images = ni;
      if (nl) labels = nl;
      if (!ni || !nl) {
        free(buf);
        rc = kdp_fail(err, KDP_ENOMEM, "%s: out of memory for %zu images", path, n + m);
        goto fail;
      }
    }
    for (size_t i = 0; i < m; i++) {
      const uint8_t *r = buf + i * rec;
      uint8_t y = r[nlab - 1];
      if (cifar100 && r[0] >= 20) {
        rc = kdp_fail(err, KDP_EFORMAT,
                      "%s: record %zu has coarse label %d, but CIFAR-100 has 20 superclasses "
                      "(0..19); is this a CIFAR-100 binary file?",
                      path, i, r[0]);
        free(buf);
        goto fail;
      }
      if (y >= n_classes) {
        rc = kdp_fail(err, KDP_EFORMAT,
                      "%s: record %zu has label %d, but %s has %zu classes (0..%zu); is "
                      "data.format right?",
                      path, i, y, name, n_classes, n_classes - 1);
        free(buf);
        goto fail;
      }
      labels[n + i] = y;
      /* CHW planes -> HWC */
      const uint8_t *R = r + nlab, *G = R + CIFAR_PLANE, *B = G + CIFAR_PLANE;
      uint8_t *dst = images + (n + i) * CIFAR_PIXELS;
      for (size_t p = 0; p < CIFAR_PLANE; p++) {
        dst[3 * p] = R[p];
        dst[3 * p + 1] = G[p];
        dst[3 * p + 2] = B[p];
      }
    }
    n += m;
    free(buf);
  }
  /* give back the slack of the geometric growth */
  if (cap > n) {
    uint8_t *ni = realloc(images, n * CIFAR_PIXELS), *nl = realloc(labels, n);
    if (ni) images = ni;
    if (nl) labels = nl;
  }
  ds->n = n;
  ds->H = CIFAR_SIDE;
  ds->W = CIFAR_SIDE;
  ds->C = 3;
  ds->n_classes = n_classes;
  ds->images = images;
  ds->labels = labels;
  ds->owns = 1;
  return 0;
fail:
  free(images);
  free(labels);
  return rc;
}
