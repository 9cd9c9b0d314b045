/* dataset.c: a dataset from data.format and its paths (the one place that knows every format). */
#include "kdpeers/data.h"

#include <string.h>

/* Splits a comma-separated list of paths in place. */
static size_t split_paths(char *s, const char **out, size_t max) {
  size_t n = 0;
  for (char *tok = strtok(s, ","); tok && n < max; tok = strtok(NULL, ",")) {
    while (*tok == ' ') tok++;
    out[n++] = tok;
  }
  return n;
}

int kdp_dataset_load(kdp_dataset *ds, const char *format, const char *images, const char *labels,
                     const char *classes, kdp_error *err) {
  memset(ds, 0, sizeof *ds);
  if (strcmp(format, "idx") == 0) return kdp_idx_load(ds, images, labels, err);
  if (strcmp(format, "npy") == 0) return kdp_npy_load(ds, images, labels, err);
  if (strcmp(format, "folder") == 0) return kdp_folder_load(ds, images, classes, err);
  if (strcmp(format, "cifar10") == 0 || strcmp(format, "cifar100") == 0) {
    char buf[4096];
    const char *paths[16];
    if (strlen(images) >= sizeof buf)
      return kdp_fail(err, KDP_EINVAL, "CIFAR batch list is longer than %zu characters",
                      sizeof buf - 1);
    strcpy(buf, images);
    size_t n = split_paths(buf, paths, 16);
    return kdp_cifar_load(ds, paths, n, strcmp(format, "cifar100") == 0, err);
  }
  return kdp_fail(err, KDP_EINVAL,
                  "data.format '%s' is not known: expected idx, cifar10, cifar100, npy or folder",
                  format);
}
