/* student_tool.c: fixtures for tests/test_student.sh.
     student_tool model ARCH H W C CLASSES SEED OUT.kdpm
         a format-2 model file of ARCH with random weights AND random batchnorm statistics (so an
         exporter that drops or misplaces any tensor changes the predictions)
     student_tool png PIXELS.raw H W C N PREFIX
         the first N raw images as PREFIX-000.png ... (8-bit gray or RGB, written by libpng) */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/infer.h"

static int make_model(char **a) {
  kdp_modelfile mf;
  memset(&mf, 0, sizeof mf);
  mf.in = (kdp_input_shape){(size_t)atol(a[1]), (size_t)atol(a[2]), (size_t)atol(a[3]),
                            (size_t)atol(a[4])};
  kdp_error err;
  if (kdp_model_create(&mf.m, a[0], mf.in, 1, &err) != 0) {
    fprintf(stderr, "student_tool: %s\n", err.msg);
    return 1;
  }
  kdp_rng rng;
  kdp_rng_seed(&rng, (uint64_t)atol(a[5]), 1);
  kdp_model_init(mf.m, &rng);
  /* every 1-D tensor (biases, batchnorm gamma and beta) moved by up to 0.15; running mean
     around 0, running var in [0.5, 2] */
  float *p = kdp_model_params(mf.m), *b = kdp_model_buffers(mf.m);
  for (size_t t = 0; t < kdp_model_n_tensors(mf.m); t++) {
    size_t dims[4];
    if (kdp_model_tensor_shape(mf.m, t, dims) != 1) continue;
    for (size_t i = 0; i < kdp_model_tensor_size(mf.m, t); i++)
      p[kdp_model_tensor_offset(mf.m, t) + i] += 0.3f * (kdp_rng_uniform(&rng) - 0.5f);
  }
  for (size_t i = 0; i < kdp_model_n_buffer_tensors(mf.m); i++) {
    int var = strstr(kdp_model_buffer_name(mf.m, i), "running_var") != NULL;
    for (size_t k = 0; k < kdp_model_buffer_size(mf.m, i); k++)
      b[kdp_model_buffer_offset(mf.m, i) + k] =
          var ? 0.5f + 1.5f * kdp_rng_uniform(&rng) : 0.4f * (kdp_rng_uniform(&rng) - 0.5f);
  }
  static const float mean[3] = {0.49f, 0.48f, 0.45f}, std[3] = {0.25f, 0.24f, 0.26f};
  for (int c = 0; c < 3; c++) {
    mf.mean[c] = mean[c];
    mf.std[c] = std[c];
  }
  int rc = kdp_modelfile_write(&mf, a[6], "student_tool", 0, &err);
  if (rc != 0) fprintf(stderr, "student_tool: %s\n", err.msg);
  kdp_modelfile_free(&mf);
  return rc ? 1 : 0;
}

static int write_pngs(char **a) {
  FILE *f = fopen(a[0], "rb");
  size_t H = (size_t)atol(a[1]), W = (size_t)atol(a[2]), C = (size_t)atol(a[3]);
  size_t n = (size_t)atol(a[4]), isz = H * W * C;
  uint8_t *pix = malloc(isz);
  for (size_t i = 0; f && i < n; i++) {
    if (fread(pix, 1, isz, f) != isz) return 1;
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    im.width = (png_uint_32)W;
    im.height = (png_uint_32)H;
    im.format = C == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
    char path[4096];
    snprintf(path, sizeof path, "%s-%03zu.png", a[5], i);
    if (!png_image_write_to_file(&im, path, 0, pix, 0, NULL)) {
      fprintf(stderr, "student_tool: %s: %s\n", path, im.message);
      return 1;
    }
  }
  free(pix);
  if (f) fclose(f);
  return f ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc == 9 && strcmp(argv[1], "model") == 0) return make_model(argv + 2);
  if (argc == 8 && strcmp(argv[1], "png") == 0) return write_pngs(argv + 2);
  fprintf(stderr, "usage: see the comment at the top of tests/student_tool.c\n");
  return 2;
}
