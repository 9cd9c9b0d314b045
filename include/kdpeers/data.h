/* data.h: reads IDX (raw or .gz) and CIFAR binary datasets into uint8 images, and makes batches. */
#ifndef KDPEERS_DATA_H
#define KDPEERS_DATA_H

#include "kdpeers/common.h"

/* A dataset held as uint8 images in NHWC order (n x H x W x C) and uint8 labels. */
typedef struct kdp_dataset {
  size_t n, H, W, C, n_classes;
  uint8_t *images; /* n * H * W * C */
  uint8_t *labels; /* n */
  int owns;        /* 1: images/labels are malloc'ed and freed by kdp_dataset_free */
} kdp_dataset;

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
/* Position for checkpoints: the batcher is exactly restored by (epoch, pos) and aug_rng. */
void kdp_batcher_seek(kdp_batcher *b, int64_t epoch, size_t pos);

/* Converts examples [first, first+count) without shuffling or augmentation (evaluation). */
void kdp_dataset_get(const kdp_dataset *ds, size_t first, size_t count, const float *mean,
                     const float *std, float *x, int32_t *y);

#endif
