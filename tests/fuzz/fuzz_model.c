/* fuzz_model.c: libFuzzer target for the model-file reader: the checkpoint parser, then a model
   built from the file's arch string and shape (which fuzzes the arch parser too) and its weights
   loaded. Input: the .kdpm file bytes. Their crc32 trailer (the last 12 bytes) is re-stamped, so
   mutations reach the entries and the arch parser (fuzz_ckpt fuzzes the checksum check itself).
   Shapes are bounded so no input can ask for huge models. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/nn.h"

/* every number in the arch string at most 256 (hidden sizes, channels), so models stay small */
static int small_numbers(const char *s) {
  long v = 0;
  for (; *s; s++) {
    if (*s >= '0' && *s <= '9') {
      v = v * 10 + (*s - '0');
      if (v > 256) return 0;
    } else {
      v = 0;
    }
  }
  return 1;
}

/* the zoo's deep nets only in small versions: resnetD up to 56, wrnD_K up to wrn16_2 */
static int small_zoo(const char *arch) {
  int d = 0, k = 0;
  if (sscanf(arch, "resnet%d", &d) == 1) return d <= 56;
  if (sscanf(arch, "wrn%d_%d", &d, &k) >= 1) return d <= 16 && k <= 2;
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  uint8_t *buf = malloc(size ? size : 1);
  if (!buf) return 0;
  if (size) memcpy(buf, data, size);
  if (size >= 12) {
    static const uint8_t head[8] = {0xa5, 'c', 'r', 'c', '3', '2', KDP_CKPT_TAG_CRC32, 0xce};
    uint32_t crc = (uint32_t)crc32_z(crc32(0L, Z_NULL, 0), buf, size - 12);
    memcpy(buf + size - 12, head, 8);
    for (int i = 0; i < 4; i++) buf[size - 4 + i] = (uint8_t)(crc >> (24 - 8 * i));
  }
  kdp_ckpt *ck = NULL;
  kdp_error err;
  int rc = kdp_ckpt_parse_buffer(buf, size, 1 << 20, &ck, &err);
  free(buf); /* the parsed checkpoint owns its own copy */
  if (rc != 0) return 0;
  const char *arch = NULL;
  int64_t h = 0, w = 0, c = 0, classes = 0;
  int ok = kdp_ckpt_get_str(ck, "arch", &arch, &err) == 0 &&
           kdp_ckpt_get_i64(ck, "input_h", &h, &err) == 0 &&
           kdp_ckpt_get_i64(ck, "input_w", &w, &err) == 0 &&
           kdp_ckpt_get_i64(ck, "input_c", &c, &err) == 0 &&
           kdp_ckpt_get_i64(ck, "classes", &classes, &err) == 0;
  if (ok && h >= 1 && h <= 32 && w >= 1 && w <= 32 && c >= 1 && c <= 3 && classes >= 2 &&
      classes <= 100 && strlen(arch) < 96 && small_numbers(arch) && small_zoo(arch)) {
    kdp_input_shape in = {(size_t)h, (size_t)w, (size_t)c, (size_t)classes};
    kdp_model *m = NULL;
    /* small models only: sizes <= 256 and at most 96 characters bound what create allocates */
    if (kdp_model_create(&m, arch, in, 2, &err) == 0) {
      /* as tools.c's model_from_ckpt: params, then buffers (batchnorm statistics), then use it */
      if (kdp_model_n_params(m) <= (1u << 20) &&
          kdp_ckpt_get_f32(ck, "params", kdp_model_params(m), kdp_model_n_params(m), &err) == 0 &&
          kdp_ckpt_get_f32(ck, "buffers", kdp_model_buffers(m), kdp_model_n_buffers(m),
                           &err) == 0) {
        float x[32 * 32 * 3 * 2] = {0};
        const float *z = kdp_model_forward(m, x, 2, 0, NULL);
        if (!z) abort();
        volatile float sink = z[0] + z[2 * in.n_classes - 1]; /* logits are B x n_classes */
        (void)sink;
      }
      kdp_model_free(m);
    }
  }
  kdp_ckpt_free(ck);
  return 0;
}
