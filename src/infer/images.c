/* images.c: the inputs of predictions: IDX image files (raw or .gz), PNG files (libpng), raw
   uint8 pixels from a file or standard input, appended into one NHWC uint8 array. */
#include <errno.h>
#include <png.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/data.h"
#include "kdpeers/infer.h"

#define MAX_INPUT_BYTES ((size_t)1 << 31)

static void push(kdp_images *imgs, const char *path, const uint8_t *pix, size_t n) {
  size_t isz = imgs->H * imgs->W * imgs->C;
  imgs->pix = realloc(imgs->pix, (imgs->n + n) * isz + 1);
  imgs->source_of = realloc(imgs->source_of, (imgs->n + n) * sizeof(size_t) + 1);
  imgs->sources = realloc(imgs->sources, (imgs->n_sources + 1) * sizeof(char *));
  if (!imgs->pix || !imgs->source_of || !imgs->sources) abort();
  memcpy(imgs->pix + imgs->n * isz, pix, n * isz);
  for (size_t i = 0; i < n; i++) imgs->source_of[imgs->n + i] = imgs->n_sources;
  imgs->sources[imgs->n_sources++] = strdup(path);
  imgs->n += n;
}

/* the whole of f (a file or standard input), at most MAX_INPUT_BYTES */
static uint8_t *slurp(FILE *f, size_t *len) {
  size_t cap = 1 << 16, n = 0;
  uint8_t *buf = kdp_xmalloc(cap);
  for (;;) {
    if (n == cap) {
      if (cap >= MAX_INPUT_BYTES) break;
      cap *= 2;
      buf = realloc(buf, cap);
      if (!buf) abort();
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
  push(imgs, path, data, len / isz);
  return 0;
}

static int append_png(kdp_images *imgs, const char *path, const uint8_t *data, size_t len,
                      kdp_error *err) {
  png_image im;
  memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&im, data, len))
    return kdp_fail(err, KDP_EFORMAT, "%s: not a readable PNG (%s)", path, im.message);
  if (im.width != imgs->W || im.height != imgs->H) {
    png_image_free(&im);
    return kdp_fail(err, KDP_EFORMAT, "%s is %ux%u pixels, the model takes %zux%zu (W x H)", path,
                    im.width, im.height, imgs->W, imgs->H);
  }
  /* libpng converts any PNG to 8-bit gray or RGB (no alpha: composited on black) */
  im.format = imgs->C == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
  uint8_t *pix = kdp_xmalloc(PNG_IMAGE_SIZE(im));
  png_color black = {0, 0, 0};
  int ok = png_image_finish_read(&im, &black, pix, 0, NULL);
  int rc = 0;
  if (!ok)
    rc = kdp_fail(err, KDP_EFORMAT, "%s: cannot decode the PNG (%s)", path, im.message);
  else
    push(imgs, path, pix, 1);
  png_image_free(&im);
  free(pix);
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
      push(imgs, path, pix, n);
    free(pix);
    return rc;
  }
  rewind(f);
  size_t len = 0;
  uint8_t *data = slurp(f, &len);
  fclose(f);
  int rc = is_png ? append_png(imgs, path, data, len, err) : append_raw(imgs, path, data, len, err);
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
