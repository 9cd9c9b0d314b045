/* fuzz_idx.c: libFuzzer target for the IDX readers (raw and gzip). Input: byte 0 = flags
   (bit 0: gzip the images file, bit 0 xor bit 1: gzip the labels file, so 1 = both, 2 and 3 = one
   of them), byte 1 = where the images part ends (in 1/256 of the rest); the rest is split into an
   images file and a labels file. */
#include "fuzz_common.h"
#include "kdpeers/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  int gz_img = data[0] & 1, gz_lab = (data[0] ^ (data[0] >> 1)) & 1;
  size_t rest = size - 2, cut = rest * data[1] / 256;
  const char *img = fuzz_write(0, data + 2, cut, gz_img);
  const char *lab = fuzz_write(1, data + 2 + cut, rest - cut, gz_lab);
  kdp_dataset ds;
  kdp_error err;
  if (kdp_idx_load(&ds, img, lab, &err) == 0) {
    if (ds.n > 0) {
      /* a loaded dataset must be usable */
      float x[784 * 2];
      int32_t y[2];
      size_t isz = ds.H * ds.W * ds.C;
      if (isz <= 784) {
        float mean[3] = {0.5f, 0.5f, 0.5f}, std[3] = {0.25f, 0.25f, 0.25f};
        kdp_dataset_get(&ds, 0, 1, mean, std, x, y);
        if (y[0] < 0 || (size_t)y[0] >= ds.n_classes) abort();
      }
    }
    kdp_dataset_free(&ds);
  }
  return 0;
}
