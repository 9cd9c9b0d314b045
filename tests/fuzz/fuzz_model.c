/* fuzz_model.c: libFuzzer target for the model-file reader: the checkpoint parser, then a model
   built from the file's arch string and shape (which fuzzes the arch parser too) and its weights
   loaded. Input: the .kdpm file bytes. Shapes are bounded so no input can ask for huge models. */
#include <string.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/nn.h"

/* every number in the arch string at most 512 (hidden sizes, channels), so models stay small */
static int small_numbers(const char *s) {
  long v = 0;
  for (; *s; s++) {
    if (*s >= '0' && *s <= '9') {
      v = v * 10 + (*s - '0');
      if (v > 512) return 0;
    } else {
      v = 0;
    }
  }
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kdp_ckpt *ck = NULL;
  kdp_error err;
  if (kdp_ckpt_parse_buffer(data, size, 1 << 20, &ck, &err) != 0) return 0;
  const char *arch = NULL;
  int64_t h = 0, w = 0, c = 0, classes = 0;
  if (kdp_ckpt_get_str(ck, "arch", &arch, &err) == 0 && kdp_ckpt_get_i64(ck, "input_h", &h, &err) == 0 &&
      kdp_ckpt_get_i64(ck, "input_w", &w, &err) == 0 && kdp_ckpt_get_i64(ck, "input_c", &c, &err) == 0 &&
      kdp_ckpt_get_i64(ck, "classes", &classes, &err) == 0 && h >= 1 && h <= 32 && w >= 1 &&
      w <= 32 && c >= 1 && c <= 3 && classes >= 2 && classes <= 100 && strlen(arch) < 64 && small_numbers(arch) &&
      strstr(arch, "wrn") == NULL && strstr(arch, "resnet1") == NULL) {
    kdp_input_shape in = {(size_t)h, (size_t)w, (size_t)c, (size_t)classes};
    kdp_model *m = NULL;
    /* small models only: mlp hidden sizes and seq channels are capped by the 64-char arch */
    if (kdp_model_create(&m, arch, in, 2, &err) == 0) {
      if (kdp_model_n_params(m) < (1u << 22)) {
        if (kdp_ckpt_get_f32(ck, "params", kdp_model_params(m), kdp_model_n_params(m), &err) == 0) {
          float x[32 * 32 * 3 * 2] = {0};
          const float *z = kdp_model_forward(m, x, 2, 0, NULL);
          (void)z;
        }
      }
      kdp_model_free(m);
    }
  }
  kdp_ckpt_free(ck);
  return 0;
}
