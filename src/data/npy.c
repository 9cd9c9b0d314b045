/* npy.c: NumPy .npy arrays (format 1.0, 2.0, 3.0) as a dataset: the header's dict literal parsed by
   its documented grammar, the image payload memory-mapped, labels of any integer dtype. */
#include "kdpeers/data.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define NPY_MAGIC "\x93NUMPY"
#define NPY_MAX_SIDE 16384u
#define NPY_MAX_HEADER ((size_t)1 << 20) /* far above any real header (NumPy pads to 64 bytes) */

/* ---- the header: {'descr': '<f4', 'fortran_order': False, 'shape': (60000, 28, 28), } ---- */

typedef struct cursor {
  const char *p, *end;
} cursor;

static void skip_ws(cursor *c) {
  while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int eat(cursor *c, char ch) {
  skip_ws(c);
  if (c->p < c->end && *c->p == ch) {
    c->p++;
    return 1;
  }
  return 0;
}

/* a Python string literal in single or double quotes, without escapes (NumPy writes none) */
static int read_str(cursor *c, char *out, size_t n) {
  skip_ws(c);
  if (c->p >= c->end || (*c->p != '\'' && *c->p != '"')) return -1;
  char q = *c->p++;
  size_t len = 0;
  while (c->p < c->end && *c->p != q) {
    if (*c->p == '\\' || len + 1 >= n) return -1;
    out[len++] = *c->p++;
  }
  if (c->p >= c->end) return -1;
  c->p++;
  out[len] = 0;
  return 0;
}

/* a tuple of non-negative integers: "()", "(5,)", "(5, 28, 28)"; Python ints may carry an 'L' */
static int read_shape(cursor *c, size_t *shape, size_t *ndim) {
  *ndim = 0;
  if (!eat(c, '(')) return -1;
  for (;;) {
    if (eat(c, ')')) return 0;
    skip_ws(c);
    if (c->p >= c->end || !isdigit((unsigned char)*c->p) || *ndim >= 8) return -1;
    size_t v = 0;
    while (c->p < c->end && isdigit((unsigned char)*c->p)) {
      if (v > ((size_t)1 << 48)) return -1;
      v = v * 10 + (size_t)(*c->p++ - '0');
    }
    if (c->p < c->end && *c->p == 'L') c->p++;
    shape[(*ndim)++] = v;
    if (eat(c, ',')) continue;
    if (eat(c, ')')) return *ndim == 1 ? -1 : 0; /* "(5)" is an int, not a tuple */
    return -1;
  }
}

static int header_fail(kdp_error *err, const char *path, const char *what) {
  return kdp_fail(err, KDP_EFORMAT,
                  "%s: malformed .npy header: %s (expected a dict like {'descr': '<f4', "
                  "'fortran_order': False, 'shape': (N, H, W), })",
                  path, what);
}

int kdp_npy_parse_header(const uint8_t *buf, size_t len, const char *path, kdp_npy_header *h,
                         kdp_error *err) {
  memset(h, 0, sizeof *h);
  if (len < 10 || memcmp(buf, NPY_MAGIC, 6) != 0) {
    const char *hint = "";
    if (len >= 4 && (buf[0] == 0 && buf[1] == 0 && buf[2] == 8))
      hint = " (this is an IDX file: set data.format = idx)";
    else if (len >= 2 && buf[0] == 0x1f && buf[1] == 0x8b)
      hint = " (a gzip file: gunzip it first)";
    else if (len >= 4 && memcmp(buf, "PK\x03\x04", 4) == 0)
      hint = " (a zip archive: an .npz? save each array with np.save instead)";
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: not a NumPy .npy file: expected the magic \\x93NUMPY at the start%s", path,
                    hint);
  }
  unsigned major = buf[6], minor = buf[7];
  size_t hlen, start;
  if (major == 1) {
    hlen = (size_t)buf[8] | (size_t)buf[9] << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (len < 12)
      return kdp_fail(err, KDP_EIO, "%s: truncated: the .npy header ends after %zu bytes", path,
                      len);
    hlen = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
    start = 12;
  } else {
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: .npy format version %u.%u is not known (kdpeers reads 1.0, 2.0 and 3.0)",
                    path, major, minor);
  }
  if (hlen > NPY_MAX_HEADER)
    return kdp_fail(err, KDP_EFORMAT, "%s: the .npy header claims %zu bytes", path, hlen);
  if (start + hlen > len)
    return kdp_fail(err, KDP_EIO,
                    "%s: truncated: the .npy header needs %zu bytes, the file holds %zu", path,
                    start + hlen, len);
  cursor c = {(const char *)buf + start, (const char *)buf + start + hlen};
  for (const char *q = c.p; q < c.end; q++)
    if (*q == 0) return header_fail(err, path, "a NUL byte inside it");
  int have_descr = 0, have_order = 0, have_shape = 0;
  if (!eat(&c, '{')) return header_fail(err, path, "it does not start with '{'");
  for (;;) {
    if (eat(&c, '}')) break;
    char key[32];
    if (read_str(&c, key, sizeof key) != 0) return header_fail(err, path, "a key is not a string");
    if (!eat(&c, ':')) return header_fail(err, path, "':' missing after a key");
    if (strcmp(key, "descr") == 0 && !have_descr) {
      if (read_str(&c, h->descr, sizeof h->descr) != 0)
        return header_fail(err, path,
                           "'descr' is not a simple dtype string (structured arrays are not "
                           "images)");
      have_descr = 1;
    } else if (strcmp(key, "fortran_order") == 0 && !have_order) {
      skip_ws(&c);
      if ((size_t)(c.end - c.p) >= 4 && memcmp(c.p, "True", 4) == 0) {
        h->fortran_order = 1;
        c.p += 4;
      } else if ((size_t)(c.end - c.p) >= 5 && memcmp(c.p, "False", 5) == 0) {
        c.p += 5;
      } else {
        return header_fail(err, path, "'fortran_order' is neither True nor False");
      }
      have_order = 1;
    } else if (strcmp(key, "shape") == 0 && !have_shape) {
      if (read_shape(&c, h->shape, &h->ndim) != 0)
        return header_fail(err, path, "'shape' is not a tuple of at most 8 integers");
      have_shape = 1;
    } else {
      return header_fail(err, path, "an unknown or repeated key");
    }
    if (eat(&c, ',')) continue;
    if (eat(&c, '}')) break;
    return header_fail(err, path, "',' or '}' missing after a value");
  }
  if (!have_descr || !have_order || !have_shape)
    return header_fail(err, path, "it lacks one of 'descr', 'fortran_order' and 'shape'");
  skip_ws(&c);
  if (c.p != c.end) return header_fail(err, path, "characters after the closing '}'");
  h->data_offset = start + hlen;
  return 0;
}

/* ---- files ---- */

typedef struct npy_file {
  uint8_t *map;
  size_t len;
  kdp_npy_header h;
  size_t count; /* product of the shape */
} npy_file;

static void npy_close(npy_file *f) {
  if (f->map) munmap(f->map, f->len);
  memset(f, 0, sizeof *f);
}

static int npy_open(npy_file *f, const char *path, const char *what, kdp_error *err) {
  memset(f, 0, sizeof *f);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return kdp_fail(err, KDP_EIO, "cannot open %s file %s: %s", what, path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return kdp_fail(err, KDP_EIO, "%s file %s is not a regular file", what, path);
  }
  if (st.st_size == 0) {
    close(fd);
    return kdp_fail(err, KDP_EIO, "%s file %s is empty", what, path);
  }
  f->len = (size_t)st.st_size;
  void *m = mmap(NULL, f->len, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (m == MAP_FAILED)
    return kdp_fail(err, KDP_EIO, "cannot map %s file %s: %s", what, path, strerror(errno));
  f->map = m;
  int rc = kdp_npy_parse_header(f->map, f->len, path, &f->h, err);
  if (rc == 0 && f->h.fortran_order)
    rc = kdp_fail(err, KDP_EFORMAT,
                  "%s: the array is stored in Fortran order (fortran_order: True); save a "
                  "C-ordered copy: np.save(path, np.ascontiguousarray(a))",
                  path);
  f->count = 1;
  for (size_t i = 0; rc == 0 && i < f->h.ndim; i++)
    if (__builtin_mul_overflow(f->count, f->h.shape[i], &f->count))
      rc = kdp_fail(err, KDP_EFORMAT, "%s: the shape in the .npy header is absurdly large", path);
  if (rc != 0) npy_close(f);
  return rc;
}

/* the payload must hold count values of elem bytes */
static int npy_check_size(const npy_file *f, const char *path, size_t elem, kdp_error *err) {
  size_t need;
  if (__builtin_mul_overflow(f->count, elem, &need) || need > f->len - f->h.data_offset)
    return kdp_fail(err, KDP_EIO,
                    "%s: truncated: the header promises %zu values of %zu byte%s (%s), but only "
                    "%zu bytes follow the %zu-byte header; write the file again",
                    path, f->count, elem, elem == 1 ? "" : "s", f->h.descr,
                    f->len - f->h.data_offset, f->h.data_offset);
  return 0;
}

static void shape_text(const kdp_npy_header *h, char *buf, size_t n) {
  size_t used = 0;
  buf[0] = 0;
  for (size_t i = 0; i < h->ndim && used < n; i++) {
    int w = snprintf(buf + used, n - used, "%s%zu", i ? " x " : "", h->shape[i]);
    used += w > 0 ? (size_t)w : 0;
  }
  if (h->ndim == 0) snprintf(buf, n, "a scalar");
}

static int npy_images(npy_file *f, const char *path, size_t *elem, size_t *C, kdp_error *err) {
  const char *d = f->h.descr;
  if (strcmp(d, "|u1") == 0 || strcmp(d, "<u1") == 0 || strcmp(d, "u1") == 0)
    *elem = 1;
  else if (strcmp(d, "<f4") == 0)
    *elem = 4;
  else
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: images of dtype '%s' are not supported: kdpeers reads uint8 ('|u1', "
                    "pixels 0..255) or little-endian float32 ('<f4'); convert with "
                    "a.astype(np.uint8) or a.astype('<f4')",
                    path, d);
  char sh[128];
  shape_text(&f->h, sh, sizeof sh);
  const size_t *s = f->h.shape;
  if (f->h.ndim == 4 && (s[3] == 1 || s[3] == 3)) {
    *C = s[3];
  } else if (f->h.ndim == 3) {
    *C = 1;
  } else if (f->h.ndim == 4 && (s[1] == 1 || s[1] == 3)) {
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: images of shape %s look channels-first (N x C x H x W); kdpeers reads "
                    "N x H x W x C: save a.transpose(0, 2, 3, 1)",
                    path, sh);
  } else {
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: images of shape %s: expected N x H x W (grayscale) or N x H x W x C "
                    "with C = 1 or 3",
                    path, sh);
  }
  if (s[0] == 0 || s[1] == 0 || s[2] == 0 || s[1] > NPY_MAX_SIDE || s[2] > NPY_MAX_SIDE)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: images of shape %s: expected at least one image and 1..%u pixels per "
                    "side",
                    path, sh, NPY_MAX_SIDE);
  return npy_check_size(f, path, *elem, err);
}

/* labels: any integer dtype of 1, 2, 4 or 8 bytes, little-endian; values 0..255 */
static int npy_labels(npy_file *f, const char *path, size_t n_images, uint8_t **out,
                      size_t *n_classes, kdp_error *err) {
  const char *d = f->h.descr;
  size_t len = strlen(d);
  char kind = len == 3 ? d[1] : 0, order = len == 3 ? d[0] : 0;
  size_t bytes = len == 3 && d[2] >= '1' && d[2] <= '8' ? (size_t)(d[2] - '0') : 0;
  int ok = (kind == 'i' || kind == 'u') && (bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8) &&
           (order == '<' || (order == '|' && bytes == 1));
  if (!ok)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: labels of dtype '%s' are not supported: expected integers (e.g. '|u1', "
                    "'<i8'), little-endian; convert with y.astype(np.int64)",
                    path, d);
  char sh[128];
  shape_text(&f->h, sh, sizeof sh);
  if (!(f->h.ndim == 1 || (f->h.ndim == 2 && f->h.shape[1] == 1)))
    return kdp_fail(err, KDP_EFORMAT,
                    "%s: labels of shape %s: expected one integer label per image (shape (N,))",
                    path, sh);
  if (f->h.shape[0] != n_images)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s holds %zu labels but the images file holds %zu images: the two files must "
                    "describe the same examples",
                    path, f->h.shape[0], n_images);
  int rc = npy_check_size(f, path, bytes, err);
  if (rc) return rc;
  const uint8_t *p = f->map + f->h.data_offset;
  uint8_t *lab = kdp_xmalloc(n_images ? n_images : 1);
  size_t maxl = 0;
  for (size_t i = 0; i < n_images; i++) {
    uint64_t u = 0;
    for (size_t b = 0; b < bytes; b++) u |= (uint64_t)p[i * bytes + b] << (8 * b);
    int64_t v = (int64_t)u;
    if (kind == 'i' && bytes < 8 && (u >> (8 * bytes - 1)) & 1) v = (int64_t)(u | ~0ull << (8 * bytes));
    if (v < 0 || v > 255) {
      free(lab);
      return kdp_fail(err, KDP_EFORMAT,
                      "%s: label %lld at index %zu is out of range: kdpeers reads class labels "
                      "0..255",
                      path, (long long)v, i);
    }
    lab[i] = (uint8_t)v;
    if ((size_t)v > maxl) maxl = (size_t)v;
  }
  *out = lab;
  *n_classes = maxl + 1 < 2 ? 2 : maxl + 1;
  return 0;
}

int kdp_npy_load_images(kdp_dataset *ds, const char *path, kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  npy_file f;
  size_t elem = 1, C = 1;
  int rc = npy_open(&f, path, ".npy images", err);
  if (rc == 0) rc = npy_images(&f, path, &elem, &C, err);
  if (rc) {
    npy_close(&f);
    return rc;
  }
  ds->n = f.h.shape[0];
  ds->H = f.h.shape[1];
  ds->W = f.h.shape[2];
  ds->C = C;
  ds->elem = elem;
  ds->images = f.map + f.h.data_offset; /* the mapping: pages are read as batches need them */
  ds->map = f.map;
  ds->map_len = f.len;
  ds->owns = 1;
  return 0;
}

int kdp_npy_load(kdp_dataset *ds, const char *images_path, const char *labels_path,
                 kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  if (!images_path || !*images_path || !labels_path || !*labels_path)
    return kdp_fail(err, KDP_EINVAL,
                    ".npy dataset needs an images file and a labels file (got images '%s', "
                    "labels '%s')",
                    images_path ? images_path : "", labels_path ? labels_path : "");
  int rc = kdp_npy_load_images(ds, images_path, err);
  if (rc) return rc;
  npy_file fl;
  rc = npy_open(&fl, labels_path, ".npy labels", err);
  if (rc == 0) rc = npy_labels(&fl, labels_path, ds->n, &ds->labels, &ds->n_classes, err);
  npy_close(&fl);
  if (rc) kdp_dataset_free(ds);
  return rc;
}
