/* fuzz_npy.c: libFuzzer target for the .npy reader. Input: byte 0 = where the images file ends
   (in 1/256 of the rest); the rest is split into an images file and a labels file. The header
   parser also runs on the whole input. */
#include "fuzz_common.h"
#include "kdpeers/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  kdp_npy_header h;
  kdp_error err;
  if (kdp_npy_parse_header(data + 1, size - 1, "fuzz", &h, &err) == 0 &&
      (h.data_offset > size - 1 || h.ndim > 8))
    abort();
  size_t rest = size - 1, cut = rest * data[0] / 256;
  const char *img = fuzz_write(0, data + 1, cut, 0);
  const char *lab = fuzz_write(1, data + 1 + cut, rest - cut, 0);
  kdp_dataset ds;
  if (kdp_npy_load(&ds, img, lab, &err) == 0) {
    /* a loaded dataset must be usable: its first image converts, its labels are in range */
    size_t isz = ds.H * ds.W * ds.C;
    if (ds.n == 0 || ds.n_classes < 2 || ds.n_classes > 256) abort();
    if (isz <= 4096) {
      static float x[4096];
      int32_t y[1];
      float mean[3] = {0.5f, 0.5f, 0.5f}, std[3] = {0.25f, 0.25f, 0.25f};
      kdp_dataset_get(&ds, ds.n - 1, 1, mean, std, x, y);
      if (y[0] < 0 || (size_t)y[0] >= ds.n_classes) abort();
    }
    kdp_dataset_free(&ds);
  }
  return 0;
}
