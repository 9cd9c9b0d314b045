/* data.h: reads IDX (raw or .gz), CIFAR binary, NumPy .npy and image-folder (PNG) datasets into
   NHWC images and labels, and makes batches. */
#ifndef KDPEERS_DATA_H
#define KDPEERS_DATA_H

#include "kdpeers/common.h"

/* A dataset held as images in NHWC order (n x H x W x C) and uint8 labels. Pixel values are
   uint8 (elem 1: 0..255, scaled by 1/255 like torchvision's ToTensor) or float32 (elem 4: used
   as they are); both are then normalised by data.mean and data.std. */
typedef struct kdp_dataset {
  size_t n, H, W, C, n_classes;
  uint8_t *images; /* n * H * W * C values of elem bytes each */
  uint8_t *labels; /* n */
  int owns;        /* 1: images/labels are malloc'ed and freed by kdp_dataset_free */
  size_t elem;     /* bytes per pixel value: 1 (uint8; 0 reads as 1) or 4 (float32) */
  void *map;       /* a memory-mapped file the images point into (munmap'ed by free), or NULL */
  size_t map_len;
  char *class_names; /* "name\n" per class (image folders), malloc'ed, freed by free; or NULL */
} kdp_dataset;

/* bytes of one pixel value (1 or 4) */
static inline size_t kdp_dataset_elem(const kdp_dataset *ds) { return ds->elem == 4 ? 4 : 1; }

/* A dataset in one of the formats of data.format: "idx" (images and labels paths), "cifar10" /
   "cifar100" (images: comma-separated batch files; labels unused), "npy" (images .npy, labels
   .npy), "folder" (images: a directory with one sub-directory of PNG files per class; labels
   unused). For "folder", classes (the training set's class_names, or NULL) fixes the label of
   each class name, so a test folder's labels match the training folder's. */
int kdp_dataset_load(kdp_dataset *ds, const char *format, const char *images, const char *labels,
                     const char *classes, kdp_error *err);

/* NumPy .npy files (format 1.0, 2.0, 3.0): images uint8 or float32 of shape (n, H, W) or
   (n, H, W, C) with C 1 or 3, C order; labels of any integer dtype, shape (n,), values 0..255.
   The image payload is memory-mapped (uint8, and aligned float32). n_classes = max label + 1. */
int kdp_npy_load(kdp_dataset *ds, const char *images_path, const char *labels_path,
                 kdp_error *err);
/* Only the images of a .npy file (as kdp_npy_load; labels stay NULL): for predictions. */
int kdp_npy_load_images(kdp_dataset *ds, const char *path, kdp_error *err);
/* Decodes one PNG into out (H x W x C uint8, C 1 or 3: libpng converts any PNG to 8-bit gray or
   RGB, alpha composited onto black); fails unless it is H x W pixels (KDP_EINVAL). The one PNG
   decoder: image folders and the inputs of predictions. */
int kdp_png_read(const char *path, size_t H, size_t W, size_t C, uint8_t *out, kdp_error *err);

/* Class names (a folder dataset's sub-directories, a model file's `class_names` entry, export's
   --classes): 1..KDP_MAX_CLASS_NAME-1 bytes, no control characters and no '"'. */
#define KDP_MAX_CLASS_NAME 64
int kdp_class_name_ok(const char *s, size_t len);
/* The header of a .npy file in memory: its dtype descr ("<f4", "|u1", ...), shape (up to
   8 dims), fortran_order, and the payload offset. 0 or KDP_EFORMAT with a message naming path. */
typedef struct kdp_npy_header {
  char descr[16];
  int fortran_order;
  size_t ndim, shape[8];
  size_t data_offset;
} kdp_npy_header;
int kdp_npy_parse_header(const uint8_t *buf, size_t len, const char *path, kdp_npy_header *h,
                         kdp_error *err);
/* An image folder: ROOT/CLASS/IMAGE.png, classes in byte order of their names (or in the order
   of the given class list), every image the same size (grayscale, gray+alpha, RGB or RGBA:
   alpha is dropped; 16-bit samples are scaled to 8). At most 256 classes. */
int kdp_folder_load(kdp_dataset *ds, const char *root, const char *classes, kdp_error *err);

/* IDX images (magic 0x00000803) and labels (0x00000801), raw or gzip (detected by content).
   Checks magic, truncation, that counts agree, and labels < n_classes (10). */
int kdp_idx_load(kdp_dataset *ds, const char *images_path, const char *labels_path,
                 kdp_error *err);
/* Only the images of an IDX image file (raw or .gz): *out (n x H x W, malloc'ed). */
int kdp_idx_read_images(const char *path, uint8_t **out, size_t *n, size_t *H, size_t *W,
                        kdp_error *err);
/* CIFAR binary batches: n_files paths; cifar100 = 1 reads <coarse><fine><3072> records and keeps
   the fine label (100 classes), else <label><3072> (10 classes). Pixels become NHWC. */
int kdp_cifar_load(kdp_dataset *ds, const char *const *paths, size_t n_files, int cifar100,
                   kdp_error *err);
void kdp_dataset_free(kdp_dataset *ds);

/* Keep only the first n examples (n = 0 or n >= ds->n keeps all). */
void kdp_dataset_subset(kdp_dataset *ds, size_t n);
/* Replace round(frac * n) labels, at positions chosen by a stream seeded with noise_seed, by
   labels drawn uniformly from all classes (symmetric noise; a drawn label may equal the old one).
   Deterministic in (noise_seed, n). Returns how many labels actually changed. */
size_t kdp_dataset_label_noise(kdp_dataset *ds, double frac, uint64_t noise_seed);

/* Batcher: an epoch-wise shuffled order, the same on every peer for the same seed. */
typedef struct kdp_batcher {
  const kdp_dataset *ds;
  size_t batch;      /* batch size */
  size_t *order;     /* permutation of [lo, hi) of the current epoch */
  size_t lo, hi;     /* the shard of the dataset this batcher walks */
  size_t pos;        /* position in order */
  int64_t epoch;     /* epochs started */
  uint64_t seed;
  int shuffle, drop_last;
  float mean[3], std[3];
  int augment;       /* random crop with padding `crop_pad`, and horizontal flip */
  size_t crop_pad;
  int flip;
  kdp_rng aug_rng;
} kdp_batcher;

/* shuffle: per-epoch permutation from (seed, epoch). drop_last: skip a final partial batch. */
void kdp_batcher_init(kdp_batcher *b, const kdp_dataset *ds, size_t batch, uint64_t seed,
                      int shuffle, int drop_last);
/* Restrict to examples [lo, hi) (codistill's disjoint shards). */
void kdp_batcher_set_shard(kdp_batcher *b, size_t lo, size_t hi);
void kdp_batcher_free(kdp_batcher *b);
/* Batches per epoch. */
size_t kdp_batcher_n_batches(const kdp_batcher *b);
/* Fills x ((count) x H x W x C floats, normalised (v/255 - mean) / std, augmented if enabled) and
   y (count labels) with the next batch; starts a new epoch when the current one is done.
   Returns the batch size (the last batch may be smaller unless drop_last). */
size_t kdp_batcher_next(kdp_batcher *b, float *x, int32_t *y);
/* The same, converting only rows [lo, hi) of the batch (at x + row * H * W * C; the other rows of
   x are left alone) and every label: a rank of a peer on k ranks converts its own rows only. The
   batcher's state (position, augmentation draws) moves as with kdp_batcher_next. */
size_t kdp_batcher_next_rows(kdp_batcher *b, float *x, int32_t *y, size_t lo, size_t hi);
/* The size of the batch the next call returns (starts a new epoch when the current one is done,
   as that call would: calling it first changes nothing). */
size_t kdp_batcher_peek(kdp_batcher *b);
/* Position for checkpoints: the batcher is exactly restored by (epoch, pos) and aug_rng. */
void kdp_batcher_seek(kdp_batcher *b, int64_t epoch, size_t pos);

/* Converts examples [first, first+count) without shuffling or augmentation (evaluation). */
void kdp_dataset_get(const kdp_dataset *ds, size_t first, size_t count, const float *mean,
                     const float *std, float *x, int32_t *y);

#endif
