/* idx.c: IDX image/label files (MNIST, Fashion-MNIST), raw or gzip, read through zlib with checked
   headers, plus the dataset operations every format shares (free, subset, label noise). */
#include "kdpeers/data.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <zlib.h>

#define IDX_MAGIC_IMAGES 0x00000803u
#define IDX_MAGIC_LABELS 0x00000801u
#define IDX_N_CLASSES 10
#define IDX_MAX_SIDE 16384u                   /* images larger than this per side are refused */
#define IDX_MAX_BYTES ((uint64_t)1 << 35)     /* 32 GiB of pixels */
#define IDX_CHUNK ((size_t)1 << 24)           /* 16 MiB per gzread call */

static uint32_t be32(const uint8_t *p) {
  return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

/* Why a read came up short: the system error, a damaged gzip stream (zlib's message without the
   path it prefixes), or simply the end of the file. Writes into buf. */
static const char *gz_why(gzFile f, const char *path, char *buf, size_t len) {
  int zerr = 0;
  const char *m = gzerror(f, &zerr);
  size_t pl = strlen(path);
  if (m && strncmp(m, path, pl) == 0 && strncmp(m + pl, ": ", 2) == 0) m += pl + 2;
  if (zerr == Z_ERRNO)
    snprintf(buf, len, "%s", strerror(errno));
  else if (zerr == Z_OK)
    snprintf(buf, len, "the file ends early");
  else
    snprintf(buf, len, "the gzip stream is truncated or corrupt: %s", m ? m : "zlib error");
  return buf;
}

static int gz_open(gzFile *out, const char *path, const char *what, kdp_error *err) {
  errno = 0;
  gzFile f = gzopen(path, "rb");
  if (!f)
    return kdp_fail(err, KDP_EIO, "cannot open %s file %s: %s", what, path,
                    errno ? strerror(errno) : "zlib could not allocate its state");
  gzbuffer(f, 1u << 20);
  *out = f;
  return 0;
}

/* Reads exactly n bytes, in large chunks. Returns the number of bytes read (< n on a short file or
   error). */
static size_t gz_read_all(gzFile f, uint8_t *dst, size_t n) {
  size_t got = 0;
  while (got < n) {
    size_t want = n - got < IDX_CHUNK ? n - got : IDX_CHUNK;
    int r = gzread(f, dst + got, (unsigned)want);
    if (r <= 0) break;
    got += (size_t)r;
  }
  return got;
}

/* After the data: a gzip stream must end cleanly (zlib checks its CRC and length there), so a cut
   or corrupted download is caught even when the pixels themselves were all recovered. Extra
   bytes after the data are tolerated. */
static int gz_check_end(gzFile f, const char *path, kdp_error *err) {
  if (gzdirect(f)) return 0;
  uint8_t extra[1];
  int r = gzread(f, extra, 1), zerr = Z_OK;
  gzerror(f, &zerr);
  if (r < 0 || zerr != Z_OK) {
    char why[256];
    return kdp_fail(err, KDP_EIO, "%s: after the data, %s; re-download the file", path,
                    gz_why(f, path, why, sizeof why));
  }
  return 0;
}

static const char *magic_name(uint32_t m) {
  switch (m) {
    case IDX_MAGIC_IMAGES: return " (an IDX images file)";
    case IDX_MAGIC_LABELS: return " (an IDX labels file)";
    case 0x03080000u: return " (IDX images written little-endian?)";
    case 0x01080000u: return " (IDX labels written little-endian?)";
    default: break;
  }
  if ((m >> 16) == 0x1f8b) return " (a gzip header inside gzip: the file is compressed twice)";
  if ((m >> 24) == '<') return " (looks like HTML: a failed download?)";
  if ((m >> 8) == 0x504b03) return " (a zip archive: unzip it first)";
  return "";
}

/* Reads the magic of an IDX file and checks it; hints when the images/labels roles look swapped. */
static int idx_check_magic(gzFile f, const char *path, uint32_t want, kdp_error *err) {
  uint8_t h[4];
  char why[256];
  size_t got = gz_read_all(f, h, 4);
  if (got < 4)
    return kdp_fail(err, KDP_EIO, "%s: %s while reading the 4-byte IDX magic (got %zu bytes)",
                    path, gz_why(f, path, why, sizeof why), got);
  uint32_t m = be32(h);
  if (m == want) return 0;
  const char *kind = want == IDX_MAGIC_IMAGES ? "images" : "labels";
  const char *hint = "";
  if (want == IDX_MAGIC_IMAGES && m == IDX_MAGIC_LABELS)
    hint = "; this is a labels file: are the images and labels paths swapped?";
  else if (want == IDX_MAGIC_LABELS && m == IDX_MAGIC_IMAGES)
    hint = "; this is an images file: are the images and labels paths swapped?";
  else if ((m & 0xffffff00u) == 0x00000800u)
    hint = "; an IDX file of another kind (kdpeers reads 3-d uint8 images and 1-d uint8 labels)";
  return kdp_fail(err, KDP_EFORMAT,
                  "%s: wrong IDX magic 0x%08x%s, expected 0x%08x for IDX %s (uint8, %s)%s", path,
                  (unsigned)m, magic_name(m), (unsigned)want, kind,
                  want == IDX_MAGIC_IMAGES ? "n x rows x cols" : "n", hint);
}

/* Returns the size of path if it is a plain file read directly (no gzip), else -1. */
static long long raw_size(gzFile f, const char *path) {
  if (!gzdirect(f)) return -1;
  struct stat st;
  if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) return -1;
  return (long long)st.st_size;
}

/* Reads exactly n bytes into a new buffer. For compressed input the size is unknown until the data
   is decompressed, so the buffer grows with what actually arrives (a corrupt header promising
   gigabytes costs no more memory than the data behind it). Returns the buffer (NULL when out of
   memory) and the count read in *got. */
static uint8_t *gz_read_alloc(gzFile f, size_t n, int known_size, size_t *got) {
  size_t cap = known_size || n < ((size_t)64 << 20) ? n : ((size_t)64 << 20);
  uint8_t *buf = malloc(cap ? cap : 1);
  *got = 0;
  if (!buf) return NULL;
  for (;;) {
    size_t r = gz_read_all(f, buf + *got, cap - *got);
    *got += r;
    if (*got < cap || cap == n) return buf; /* short read, or everything */
    size_t next = cap * 2 < n ? cap * 2 : n;
    uint8_t *nb = realloc(buf, next);
    if (!nb) {
      free(buf);
      return NULL;
    }
    buf = nb;
    cap = next;
  }
}

/* Reads the n-byte payload that follows an IDX header into a new buffer and checks that the
   stream ends there. kind ("image", "label") and desc describe the data for the messages. */
static int idx_read_payload(gzFile f, const char *path, size_t n, int known_size, const char *kind,
                            const char *desc, uint8_t **out, kdp_error *err) {
  size_t got = 0;
  char why[256];
  uint8_t *buf = gz_read_alloc(f, n, known_size, &got);
  if (!buf)
    return kdp_fail(err, KDP_ENOMEM, "%s: cannot allocate %zu bytes for the %ss", path, n, kind);
  if (got < n) {
    free(buf);
    return kdp_fail(err, KDP_EIO,
                    "%s: truncated %s data: expected %zu bytes (%s), got %zu (%s); re-download "
                    "the file",
                    path, kind, n, desc, got, gz_why(f, path, why, sizeof why));
  }
  int rc = gz_check_end(f, path, err);
  if (rc) {
    free(buf);
    return rc;
  }
  *out = buf;
  return 0;
}

int kdp_idx_read_images(const char *path, uint8_t **out, size_t *n, size_t *H, size_t *W,
                        kdp_error *err) {
  gzFile f = NULL;
  int rc = gz_open(&f, path, "IDX images", err);
  if (rc) return rc;
  rc = idx_check_magic(f, path, IDX_MAGIC_IMAGES, err);
  if (rc) goto fail;
  uint8_t h[12];
  char why[256];
  size_t got = gz_read_all(f, h, 12);
  if (got < 12) {
    rc = kdp_fail(err, KDP_EIO,
                  "%s: truncated header: expected 12 bytes of dimensions after the magic, got %zu "
                  "(%s)",
                  path, got, gz_why(f, path, why, sizeof why));
    goto fail;
  }
  uint64_t nn = be32(h), hh = be32(h + 4), ww = be32(h + 8);
  if (nn == 0 || hh == 0 || ww == 0 || hh > IDX_MAX_SIDE || ww > IDX_MAX_SIDE ||
      nn * hh * ww > IDX_MAX_BYTES) {
    rc = kdp_fail(err, KDP_EFORMAT,
                  "%s: absurd image dimensions n=%llu x %llu x %llu in the IDX header (expected "
                  "n >= 1 and 1..%u pixels per side, at most %llu bytes in all); the header is "
                  "corrupt or this is not an image file",
                  path, (unsigned long long)nn, (unsigned long long)hh, (unsigned long long)ww,
                  IDX_MAX_SIDE, (unsigned long long)IDX_MAX_BYTES);
    goto fail;
  }
  size_t bytes = (size_t)(nn * hh * ww);
  long long fsz = raw_size(f, path);
  if (fsz >= 0 && (unsigned long long)fsz < 16 + (unsigned long long)bytes) {
    rc = kdp_fail(err, KDP_EIO,
                  "%s: truncated: the header promises %llu images of %llux%llu (%zu bytes of "
                  "pixels) but only %lld bytes follow the 16-byte header; re-download the file",
                  path, (unsigned long long)nn, (unsigned long long)hh, (unsigned long long)ww,
                  bytes, fsz - 16);
    goto fail;
  }
  char desc[96];
  snprintf(desc, sizeof desc, "%llu images of %llux%llu", (unsigned long long)nn,
           (unsigned long long)hh, (unsigned long long)ww);
  uint8_t *buf = NULL;
  rc = idx_read_payload(f, path, bytes, fsz >= 0, "image", desc, &buf, err);
  if (rc) goto fail;
  gzclose(f);
  *out = buf;
  *n = (size_t)nn;
  *H = (size_t)hh;
  *W = (size_t)ww;
  return 0;
fail:
  gzclose(f);
  return rc;
}

static int idx_read_labels(const char *path, uint8_t **out, size_t *n, kdp_error *err) {
  gzFile f = NULL;
  int rc = gz_open(&f, path, "IDX labels", err);
  if (rc) return rc;
  rc = idx_check_magic(f, path, IDX_MAGIC_LABELS, err);
  if (rc) goto fail;
  uint8_t h[4];
  char why[256];
  size_t got = gz_read_all(f, h, 4);
  if (got < 4) {
    rc = kdp_fail(err, KDP_EIO,
                  "%s: truncated header: expected 4 bytes of count after the magic, got %zu (%s)",
                  path, got, gz_why(f, path, why, sizeof why));
    goto fail;
  }
  uint64_t nn = be32(h);
  if (nn == 0) {
    rc = kdp_fail(err, KDP_EFORMAT, "%s: the IDX labels header says it holds 0 labels", path);
    goto fail;
  }
  long long fsz = raw_size(f, path);
  if (fsz >= 0 && (unsigned long long)fsz < 8 + nn) {
    rc = kdp_fail(err, KDP_EIO,
                  "%s: truncated: the header promises %llu labels but only %lld bytes follow the "
                  "8-byte header; re-download the file",
                  path, (unsigned long long)nn, fsz - 8);
    goto fail;
  }
  uint8_t *buf = NULL;
  rc = idx_read_payload(f, path, (size_t)nn, fsz >= 0, "label", "one per label", &buf, err);
  if (rc) goto fail;
  gzclose(f);
  *out = buf;
  *n = (size_t)nn;
  return 0;
fail:
  gzclose(f);
  return rc;
}

int kdp_idx_load(kdp_dataset *ds, const char *images_path, const char *labels_path,
                 kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  if (!images_path || !*images_path || !labels_path || !*labels_path)
    return kdp_fail(err, KDP_EINVAL,
                    "IDX dataset needs both an images path and a labels path (got images '%s', "
                    "labels '%s')",
                    images_path ? images_path : "", labels_path ? labels_path : "");
  uint8_t *img = NULL, *lab = NULL;
  size_t n = 0, H = 0, W = 0, nl = 0;
  int rc = kdp_idx_read_images(images_path, &img, &n, &H, &W, err);
  if (rc == KDP_EFORMAT) {
    /* if the labels path holds images, say the two are swapped */
    gzFile f = NULL;
    if (gz_open(&f, labels_path, "IDX labels", NULL) == 0) {
      uint8_t h[4];
      if (gz_read_all(f, h, 4) == 4 && be32(h) == IDX_MAGIC_IMAGES && err) {
        size_t len = strlen(err->msg);
        snprintf(err->msg + len, sizeof err->msg - len,
                 " (and the labels path %s holds images: the two paths are swapped)",
                 labels_path);
      }
      gzclose(f);
    }
  }
  if (rc) return rc;
  rc = idx_read_labels(labels_path, &lab, &nl, err);
  if (rc) {
    free(img);
    return rc;
  }
  if (nl != n) {
    free(img);
    free(lab);
    return kdp_fail(err, KDP_EFORMAT,
                    "%s holds %zu images but %s holds %zu labels: the two files must come from "
                    "the same split (train or t10k)",
                    images_path, n, labels_path, nl);
  }
  for (size_t i = 0; i < n; i++) {
    if (lab[i] >= IDX_N_CLASSES) {
      int v = lab[i];
      free(img);
      free(lab);
      return kdp_fail(err, KDP_EFORMAT,
                      "%s: label %d at index %zu is out of range: IDX datasets have %d classes "
                      "(labels 0..%d)",
                      labels_path, v, i, IDX_N_CLASSES, IDX_N_CLASSES - 1);
    }
  }
  ds->n = n;
  ds->H = H;
  ds->W = W;
  ds->C = 1;
  ds->n_classes = IDX_N_CLASSES;
  ds->images = img;
  ds->labels = lab;
  ds->owns = 1;
  return 0;
}

void kdp_dataset_free(kdp_dataset *ds) {
  if (!ds) return;
  if (ds->owns) {
    if (!ds->map) free(ds->images);
    free(ds->labels);
  }
  if (ds->map) munmap(ds->map, ds->map_len);
  free(ds->class_names);
  memset(ds, 0, sizeof *ds);
}

void kdp_dataset_subset(kdp_dataset *ds, size_t n) {
  if (n == 0 || n >= ds->n) return;
  ds->n = n;
}

size_t kdp_dataset_label_noise(kdp_dataset *ds, double frac, uint64_t noise_seed) {
  size_t n = ds->n;
  if (n == 0 || ds->n_classes == 0 || !(frac > 0)) return 0;
  if (frac > 1) frac = 1;
  size_t k = (size_t)llround(frac * (double)n);
  if (k > n) k = n;
  size_t *idx = kdp_xmalloc(n * sizeof *idx);
  for (size_t i = 0; i < n; i++) idx[i] = i;
  kdp_rng r;
  kdp_rng_seed(&r, noise_seed, KDP_STREAM_NOISE);
  size_t changed = 0;
  /* partial Fisher-Yates: idx[0..k) becomes a uniform random k-subset, each re-drawn once */
  for (size_t i = 0; i < k; i++) {
    size_t j = i + (size_t)kdp_rng_below(&r, (uint32_t)(n - i));
    size_t t = idx[i];
    idx[i] = idx[j];
    idx[j] = t;
    uint8_t y = (uint8_t)kdp_rng_below(&r, (uint32_t)ds->n_classes);
    if (ds->labels[idx[i]] != y) changed++;
    ds->labels[idx[i]] = y;
  }
  free(idx);
  return changed;
}
