/* fuzz_cifar.c: libFuzzer target for the CIFAR-10/100 binary readers. Input: byte 0 = flags
   (bit 0: CIFAR-100, bit 1: split into two files), the rest is the file content. */
#include "fuzz_common.h"
#include "kdpeers/data.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int c100 = data[0] & 1, two = (data[0] >> 1) & 1;
  size_t rest = size - 1, cut = two ? rest / 2 : rest;
  const char *paths[2] = {fuzz_write(0, data + 1, cut, 0), NULL};
  if (two) paths[1] = fuzz_write(1, data + 1 + cut, rest - cut, 0);
  kdp_dataset ds;
  kdp_error err;
  if (kdp_cifar_load(&ds, paths, two ? 2 : 1, c100, &err) == 0) {
    for (size_t i = 0; i < ds.n; i++)
      if (ds.labels[i] >= ds.n_classes) abort();
    kdp_dataset_free(&ds);
  }
  return 0;
}
