/* mkdata.c: writes Fashion-MNIST subsets in the other dataset formats for the integration tests
   (so they need no NumPy): .npy arrays as np.save writes them, and image folders of PNG files.
   Usage: kdp-mkdata npy DIR N_TRAIN N_TEST        DIR/{x,y,tx,ty,xf,txf}.npy
          kdp-mkdata folder DIR N_TRAIN N_TEST K   DIR/{train,test}/CLASS/NNNNN.png, classes < K */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kdpeers/data.h"

#define FM "/usr/share/datasets/fashion-mnist/"

static const char *const names[10] = {"t-shirt", "trouser", "pullover", "dress", "coat",
                                      "sandal",  "shirt",   "sneaker",  "bag",   "boot"};

/* np.save's layout: magic, version 1.0, the dict padded with spaces to a multiple of 64, '\n' */
static void npy_write(const char *dir, const char *name, const char *descr, const char *shape,
                      const void *data, size_t bytes) {
  char path[4096], dict[256];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  int n = snprintf(dict, sizeof dict, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                   descr, shape);
  size_t total = 10 + (size_t)n + 1, pad = (64 - total % 64) % 64;
  FILE *f = fopen(path, "wb");
  if (!f) {
    perror(path);
    exit(1);
  }
  size_t hl = (size_t)n + pad + 1;
  fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  fputc((int)(hl & 0xff), f);
  fputc((int)(hl >> 8), f);
  fputs(dict, f);
  for (size_t i = 0; i < pad; i++) fputc(' ', f);
  fputc('\n', f);
  if (fwrite(data, 1, bytes, f) != bytes || fclose(f) != 0) {
    perror(path);
    exit(1);
  }
}

static void write_split(const char *dir, const kdp_dataset *ds, size_t n, const char *x,
                        const char *y, const char *xf) {
  size_t isz = ds->H * ds->W;
  char shape[96];
  int64_t *lab = malloc(n * sizeof *lab);
  float *f = malloc(n * isz * sizeof *f);
  for (size_t i = 0; i < n; i++) lab[i] = ds->labels[i];
  for (size_t i = 0; i < n * isz; i++) f[i] = (float)((double)ds->images[i] / 255.0);
  snprintf(shape, sizeof shape, "(%zu, %zu, %zu)", n, ds->H, ds->W);
  npy_write(dir, x, "|u1", shape, ds->images, n * isz);
  snprintf(shape, sizeof shape, "(%zu,)", n);
  npy_write(dir, y, "<i8", shape, lab, n * sizeof *lab);
  snprintf(shape, sizeof shape, "(%zu, %zu, %zu, 1)", n, ds->H, ds->W);
  npy_write(dir, xf, "<f4", shape, f, n * isz * sizeof *f);
  free(lab);
  free(f);
}

static void write_folder(const char *dir, const char *split, const kdp_dataset *ds, size_t n,
                         size_t K) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, split);
  mkdir(path, 0755);
  for (size_t k = 0; k < K; k++) {
    snprintf(path, sizeof path, "%s/%s/%s", dir, split, names[k]);
    mkdir(path, 0755);
  }
  for (size_t i = 0, kept = 0; i < ds->n && kept < n; i++) {
    if (ds->labels[i] >= K) continue;
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    im.width = (png_uint_32)ds->W;
    im.height = (png_uint_32)ds->H;
    im.format = PNG_FORMAT_GRAY;
    snprintf(path, sizeof path, "%s/%s/%s/%05zu.png", dir, split, names[ds->labels[i]], i);
    if (!png_image_write_to_file(&im, path, 0, ds->images + i * ds->H * ds->W, 0, NULL)) {
      fprintf(stderr, "%s: %s\n", path, im.message);
      exit(1);
    }
    kept++;
  }
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: kdp-mkdata npy|folder DIR N_TRAIN N_TEST [K]\n");
    return 2;
  }
  const char *dir = argv[2];
  size_t ntr = strtoul(argv[3], NULL, 10), nte = strtoul(argv[4], NULL, 10);
  kdp_dataset tr, te;
  kdp_error err;
  if (kdp_idx_load(&tr, FM "train-images-idx3-ubyte.gz", FM "train-labels-idx1-ubyte.gz", &err) ||
      kdp_idx_load(&te, FM "t10k-images-idx3-ubyte.gz", FM "t10k-labels-idx1-ubyte.gz", &err)) {
    fprintf(stderr, "kdp-mkdata: %s\n", err.msg);
    return 1;
  }
  mkdir(dir, 0755);
  if (strcmp(argv[1], "npy") == 0) {
    write_split(dir, &tr, ntr < tr.n ? ntr : tr.n, "x.npy", "y.npy", "xf.npy");
    write_split(dir, &te, nte < te.n ? nte : te.n, "tx.npy", "ty.npy", "txf.npy");
  } else if (strcmp(argv[1], "folder") == 0 && argc == 6) {
    size_t K = strtoul(argv[5], NULL, 10);
    write_folder(dir, "train", &tr, ntr, K < 10 ? K : 10);
    write_folder(dir, "test", &te, nte, K < 10 ? K : 10);
  } else {
    fprintf(stderr, "kdp-mkdata: unknown kind '%s'\n", argv[1]);
    return 2;
  }
  kdp_dataset_free(&tr);
  kdp_dataset_free(&te);
  return 0;
}
