/* images.c: the inputs of predictions: IDX image files (raw or .gz), NumPy .npy image arrays
   (uint8 or float32), PNG files, raw uint8 pixels from a file or standard input, appended into
   one NHWC array. The file readers are the training data's (src/data: idx.c, npy.c, folder.c). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/data.h"
#include "kdpeers/infer.h"

#define MAX_INPUT_BYTES ((size_t)1 << 31)

/* appends n images of elem bytes per value (1: uint8, 4: float32) */
static int push(kdp_images *imgs, const char *path, const uint8_t *pix, size_t n, size_t elem,
                kdp_error *err) {
  if (imgs->n > 0 && kdp_images_elem(imgs) != elem)
    return kdp_fail(err, KDP_EINVAL,
                    "%s holds %s pixels but the inputs before it hold %s: uint8 and float32 "
                    "inputs cannot be mixed in one call",
                    path, elem == 4 ? "float32" : "uint8",
                    kdp_images_elem(imgs) == 4 ? "float32" : "uint8");
  imgs->elem = elem;
  size_t isz = imgs->H * imgs->W * imgs->C * elem;
  imgs->pix = kdp_xrealloc(imgs->pix, (imgs->n + n) * isz + 1);
  imgs->source_of = kdp_xrealloc(imgs->source_of, (imgs->n + n) * sizeof(size_t) + 1);
  imgs->sources = kdp_xrealloc(imgs->sources, (imgs->n_sources + 1) * sizeof(char *));
  memcpy(imgs->pix + imgs->n * isz, pix, n * isz);
  for (size_t i = 0; i < n; i++) imgs->source_of[imgs->n + i] = imgs->n_sources;
  imgs->sources[imgs->n_sources++] = strdup(path);
  imgs->n += n;
  return 0;
}

/* the whole of f (a file or standard input), at most MAX_INPUT_BYTES */
static uint8_t *slurp(FILE *f, size_t *len) {
  size_t cap = 1 << 16, n = 0;
  uint8_t *buf = kdp_xmalloc(cap);
  for (;;) {
    if (n == cap) {
      if (cap >= MAX_INPUT_BYTES) break;
      cap *= 2;
      buf = kdp_xrealloc(buf, cap);
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    if (got == 0) break;
    n += got;
  }
  *len = n;
  return buf;
}

static int append_raw(kdp_images *imgs, const char *path, const uint8_t *data, size_t len,
                      kdp_error *err) {
  size_t isz = imgs->H * imgs->W * imgs->C;
  if (len == 0 || len % isz != 0)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s holds %zu bytes of raw pixels, not a whole number of images of %zux%zux%zu "
                    "(%zu bytes each); IDX and PNG files are recognised by their content",
                    path, len, imgs->H, imgs->W, imgs->C, isz);
  return push(imgs, path, data, len / isz, 1, err);
}

/* one PNG at the model's size (the image-folder reader's decoder) */
static int append_png(kdp_images *imgs, const char *path, kdp_error *err) {
  uint8_t *pix = kdp_xmalloc(imgs->H * imgs->W * imgs->C);
  int rc = kdp_png_read(path, imgs->H, imgs->W, imgs->C, pix, err);
  if (rc == 0) rc = push(imgs, path, pix, 1, 1, err);
  free(pix);
  return rc;
}

/* a .npy image array (the npy dataset reader's): uint8 or float32, of the model's shape */
static int append_npy(kdp_images *imgs, const char *path, kdp_error *err) {
  kdp_dataset ds;
  int rc = kdp_npy_load_images(&ds, path, err);
  if (rc == 0 && (ds.H != imgs->H || ds.W != imgs->W || ds.C != imgs->C))
    rc = kdp_fail(err, KDP_EFORMAT, "%s holds %zux%zux%zu images, the model takes %zux%zux%zu",
                  path, ds.H, ds.W, ds.C, imgs->H, imgs->W, imgs->C);
  if (rc == 0 && ds.n > MAX_INPUT_BYTES / (ds.H * ds.W * ds.C * kdp_dataset_elem(&ds)))
    rc = kdp_fail(err, KDP_EFORMAT, "%s holds %zu images: more than %zu bytes", path, ds.n,
                  MAX_INPUT_BYTES);
  if (rc == 0 && ds.n > 0) rc = push(imgs, path, ds.images, ds.n, kdp_dataset_elem(&ds), err);
  kdp_dataset_free(&ds);
  return rc;
}

int kdp_images_append(kdp_images *imgs, const char *path, kdp_error *err) {
  if (strcmp(path, "-") == 0) {
    size_t len = 0;
    uint8_t *data = slurp(stdin, &len);
    int rc = append_raw(imgs, "standard input", data, len, err);
    free(data);
    return rc;
  }
  FILE *f = fopen(path, "rb");
  if (!f) return kdp_fail(err, KDP_EIO, "cannot open %s: %s", path, strerror(errno));
  uint8_t head[8] = {0};
  size_t nh = fread(head, 1, 8, f);
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  int is_png = nh == 8 && memcmp(head, png_sig, 8) == 0;
  int is_npy = nh >= 6 && memcmp(head, "\x93NUMPY", 6) == 0;
  if (is_png || is_npy) {
    fclose(f);
    return is_png ? append_png(imgs, path, err) : append_npy(imgs, path, err);
  }
  int is_idx = nh >= 4 && ((head[0] == 0x1f && head[1] == 0x8b) ||
                           (head[0] == 0 && head[1] == 0 && head[2] == 8 && head[3] == 3));
  if (is_idx) {
    fclose(f);
    uint8_t *pix = NULL;
    size_t n = 0, H = 0, W = 0;
    int rc = kdp_idx_read_images(path, &pix, &n, &H, &W, err);
    if (rc != 0) return rc;
    if (H != imgs->H || W != imgs->W || imgs->C != 1)
      rc = kdp_fail(err, KDP_EFORMAT, "%s holds %zux%zu gray images, the model takes %zux%zux%zu",
                    path, H, W, imgs->H, imgs->W, imgs->C);
    else
      rc = push(imgs, path, pix, n, 1, err);
    free(pix);
    return rc;
  }
  rewind(f);
  size_t len = 0;
  uint8_t *data = slurp(f, &len);
  fclose(f);
  int rc = append_raw(imgs, path, data, len, err);
  free(data);
  return rc;
}

void kdp_images_free(kdp_images *imgs) {
  for (size_t i = 0; i < imgs->n_sources; i++) free(imgs->sources[i]);
  free(imgs->sources);
  free(imgs->source_of);
  free(imgs->pix);
  memset(imgs, 0, sizeof *imgs);
}
