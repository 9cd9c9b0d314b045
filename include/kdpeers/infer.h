/* infer.h: the MPI-free runtime (libkdpeers-infer): model files (.kdpm) in and out, images in
   (IDX, .npy, raw uint8, PNG), probabilities out. It links OpenBLAS, zlib, msgpack-c and libpng only. */
#ifndef KDPEERS_INFER_H
#define KDPEERS_INFER_H

#include "kdpeers/ckpt.h"
#include "kdpeers/data.h"
#include "kdpeers/nn.h"

/* Model-file formats (docs/model-format.md): 1 = one flat "params" and "buffers" vector in the
   arena's layout (kdpeers 0.1.0); 2 = one f32 entry per PyTorch state_dict tensor, named and shaped
   as PyTorch has them (conv weights (Cout, Cin, K, K)). Both are read; 2 is written. */
#define KDP_MODEL_FORMAT 2

/* A model with what it needs to run on raw pixels: its input geometry, the normalisation it was
   trained with and, when known, its class names. */
typedef struct kdp_modelfile {
  kdp_model *m;
  kdp_input_shape in;
  float mean[3], std[3];
  char label[64];     /* "model", or "peerN" for a peer of a run */
  char **class_names; /* in.n_classes names, or NULL (the file's `class_names` entry) */
  int format;         /* model-file format read (1, 2), 0 for a run's checkpoint */
  size_t max_batch;
  float *x;           /* max_batch normalised images (kdp_modelfile_predict) */
} kdp_modelfile;

/* Reads a .kdpm (format 1 or 2) and builds its model for batches of up to max_batch images. */
int kdp_modelfile_read(kdp_modelfile *mf, const char *path, size_t max_batch, kdp_error *err);
/* The same from an open checkpoint: a model file, or a run's peer checkpoint (flat "params"). */
int kdp_modelfile_from_ckpt(kdp_modelfile *mf, const kdp_ckpt *ck, const char *path,
                            size_t max_batch, kdp_error *err);
/* Writes mf as a format-2 model file; source and source_peer say where it came from. */
int kdp_modelfile_write(const kdp_modelfile *mf, const char *path, const char *source,
                        int64_t source_peer, kdp_error *err);
void kdp_modelfile_free(kdp_modelfile *mf);
/* Readers refuse a model whose plan at max_batch (parameters, activations, input) needs more than
   this many bytes; default (0) the machine's physical memory. */
void kdp_modelfile_set_memory_limit(double bytes);
/* Class names from a list separated by sep: '\n' for the `class_names` entry of model files and
   checkpoints (one name per line, the last line's newline optional), ',' for --classes. Exactly
   in.n_classes names, each a valid class name (kdp_class_name_ok); replaces any names mf had. */
int kdp_modelfile_set_class_names(kdp_modelfile *mf, const char *list, char sep, kdp_error *err);

/* Softmax probabilities (n x classes) of n images (H x W x C values each): raw uint8 pixels
   0..255 (elem 1) or float32 values on the scale of pixel / 255 (elem 4, e.g. a float32 .npy),
   normalised with the model's statistics, in chunks of max_batch. */
void kdp_modelfile_predict(kdp_modelfile *mf, const uint8_t *pix, size_t elem, size_t n,
                           float *probs);

/* ---- images ---- */
typedef struct kdp_images {
  size_t n, H, W, C;
  size_t elem;         /* bytes per value: 1 (uint8; 0 reads as 1) or 4 (float32, from a .npy) */
  uint8_t *pix;        /* n x H x W x C values of elem bytes */
  size_t n_sources;
  char **sources;      /* the file each run of images came from */
  size_t *source_of;   /* n: index into sources */
} kdp_images;

static inline size_t kdp_images_elem(const kdp_images *imgs) { return imgs->elem == 4 ? 4 : 1; }

/* Appends the images of one input to imgs (H, W, C fixed by the caller): an IDX image file (raw or
   .gz), a NumPy .npy image array (uint8 or float32, n x H x W [x C]: kdp_npy_load_images), a PNG
   (kdp_png_read: 8-bit gray or RGB, exactly H x W), raw uint8 pixels (a whole number of images),
   or "-" for raw pixels on standard input. The kind is told by content; uint8 and float32 inputs
   cannot be mixed. */
int kdp_images_append(kdp_images *imgs, const char *path, kdp_error *err);
void kdp_images_free(kdp_images *imgs);

/* `kdpeers-predict` and `kdpeers predict`: the whole command line (argv[0] is the program name
   used in messages). Returns the exit status. */
int kdp_predict_main(int argc, char **argv);

#endif
