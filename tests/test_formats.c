/* test_formats.c: check suite "formats": NumPy .npy datasets (fixtures written by np.save, see
   tests/gen_npy.py, plus damaged copies) and image folders (PNG files written here by libpng). */
#include <check.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/data.h"
#include "kdpeers/infer.h"
#include "testutil.h"

static char *tmp;

static void setup(void) { tmp = kdp_test_tmpdir(); }

static void teardown(void) {
  char cmd[4200];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
  if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
  free(tmp);
}

#define assert_has(msg, needle)                                                                  \
  ck_assert_msg(strstr((msg), (needle)) != NULL, "message \"%s\" lacks \"%s\"", (msg), (needle))

static const char *fixture(const char *name) {
  static char buf[64][4096]; /* a ring: earlier results stay valid for a while */
  static int k;
  char rel[256];
  snprintf(rel, sizeof rel, "tests/data/npy/%s", name);
  k = (k + 1) % 64;
  snprintf(buf[k], sizeof buf[k], "%s", kdp_test_src_path(rel));
  return buf[k];
}

static uint8_t px(size_t i, size_t y, size_t x, size_t c) {
  return (uint8_t)((i * 20 + y * 5 + x + c * 7) % 256);
}

/* ---- npy ---- */

START_TEST(test_npy_gray_u8) {
  const char *imgs[] = {"gray_u8.npy", "gray_u8_v2.npy"};
  const char *labs[] = {"labels_i64.npy", "labels_u1.npy", "labels_i2.npy"};
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 3; b++) {
      kdp_dataset ds;
      kdp_error err = {{0}};
      ck_assert_msg(kdp_npy_load(&ds, fixture(imgs[a]), fixture(labs[b]), &err) == 0, "%s %s: %s",
                    imgs[a], labs[b], err.msg);
      ck_assert_uint_eq(ds.n, 6);
      ck_assert_uint_eq(ds.H, 4);
      ck_assert_uint_eq(ds.W, 5);
      ck_assert_uint_eq(ds.C, 1);
      ck_assert_uint_eq(kdp_dataset_elem(&ds), 1);
      ck_assert_uint_eq(ds.n_classes, 5);
      ck_assert_ptr_nonnull(ds.map); /* memory-mapped, not copied */
      for (size_t i = 0; i < 6; i++) {
        ck_assert_uint_eq(ds.labels[i], (i * 3) % 5);
        for (size_t y = 0; y < 4; y++)
          for (size_t x = 0; x < 5; x++) ck_assert_uint_eq(ds.images[(i * 4 + y) * 5 + x], px(i, y, x, 0));
      }
      kdp_dataset_free(&ds);
    }
}
END_TEST

START_TEST(test_npy_rgb_f32) {
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_npy_load(&ds, fixture("rgb_f32.npy"), fixture("labels_u1.npy"), &err) == 0,
                "%s", err.msg);
  ck_assert_uint_eq(ds.C, 3);
  ck_assert_uint_eq(kdp_dataset_elem(&ds), 4);
  /* float32 values are used as they are: normalised (v - mean) / std */
  float mean[3] = {0.1f, 0.2f, 0.3f}, std[3] = {0.5f, 0.25f, 2.0f}, x[6 * 60];
  int32_t y[6];
  kdp_dataset_get(&ds, 0, 6, mean, std, x, y);
  for (size_t i = 0; i < 6; i++)
    for (size_t p = 0; p < 20; p++)
      for (size_t c = 0; c < 3; c++) {
        float v = (float)((double)px(i, p / 5, p % 5, c) / 255.0);
        ck_assert_float_eq_tol(x[(i * 20 + p) * 3 + c], (v - mean[c]) / std[c], 1e-6);
      }
  kdp_dataset_free(&ds);
}
END_TEST

/* the float32 path of the batcher (crop, flip) gives what the uint8 path gives for v / 255 */
START_TEST(test_npy_float_augment_matches_u8) {
  size_t n = 6, H = 4, W = 5, C = 3, isz = H * W * C;
  uint8_t *u8 = malloc(n * isz);
  float *f32 = malloc(n * isz * sizeof(float));
  for (size_t i = 0; i < n * isz; i++) {
    u8[i] = (uint8_t)(i * 37 % 256);
    f32[i] = (float)u8[i] / 255.0f;
  }
  uint8_t lab[6] = {0, 1, 2, 0, 1, 2};
  kdp_dataset a = {.n = n, .H = H, .W = W, .C = C, .n_classes = 3, .images = u8, .labels = lab};
  kdp_dataset b = a;
  b.images = (uint8_t *)f32;
  b.elem = 4;
  kdp_batcher ba, bb;
  kdp_batcher_init(&ba, &a, 4, 7, 1, 0);
  kdp_batcher_init(&bb, &b, 4, 7, 1, 0);
  for (kdp_batcher *bt = &ba;; bt = &bb) {
    bt->augment = 1;
    bt->crop_pad = 2;
    bt->flip = 1;
    for (int c = 0; c < 3; c++) bt->mean[c] = 0.4f, bt->std[c] = 0.3f;
    if (bt == &bb) break;
  }
  float xa[4 * 60], xb[4 * 60];
  int32_t ya[4], yb[4];
  for (int step = 0; step < 6; step++) {
    size_t na = kdp_batcher_next(&ba, xa, ya), nb = kdp_batcher_next(&bb, xb, yb);
    ck_assert_uint_eq(na, nb);
    for (size_t i = 0; i < na * isz; i++) ck_assert_float_eq_tol(xa[i], xb[i], 1e-6);
    for (size_t i = 0; i < na; i++) ck_assert_int_eq(ya[i], yb[i]);
  }
  kdp_batcher_free(&ba);
  kdp_batcher_free(&bb);
  free(u8);
  free(f32);
}
END_TEST

static void expect_npy_fail(const char *img, const char *lab, int code, const char *hint) {
  kdp_dataset ds;
  kdp_error err = {{0}};
  int rc = kdp_npy_load(&ds, img, lab, &err);
  ck_assert_msg(rc == code, "%s / %s: rc %d, expected %d (%s)", img, lab, rc, code, err.msg);
  assert_has(err.msg, hint);
  ck_assert_ptr_null(ds.images);
}

/* a copy of fixture name with its first keep bytes, or with byte at set to v */
static const char *damaged(const char *name, size_t keep, long at, uint8_t v) {
  static char out[4200];
  FILE *f = fopen(fixture(name), "rb");
  ck_assert_ptr_nonnull(f);
  uint8_t buf[4096];
  size_t n = fread(buf, 1, sizeof buf, f);
  fclose(f);
  if (keep < n) n = keep;
  if (at >= 0 && (size_t)at < n) buf[at] = v;
  snprintf(out, sizeof out, "%s/damaged-%zu-%ld-%s", tmp, keep, at, name);
  f = fopen(out, "wb");
  ck_assert_uint_eq(fwrite(buf, 1, n, f), n);
  fclose(f);
  return out;
}

START_TEST(test_npy_bad_inputs) {
  const char *lab = fixture("labels_i64.npy"), *gray = fixture("gray_u8.npy");
  expect_npy_fail(damaged("gray_u8.npy", 4096, 0, 'X'), lab, KDP_EFORMAT, "not a NumPy .npy file");
  expect_npy_fail("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz", lab, KDP_EFORMAT,
                  "gzip");
  expect_npy_fail(damaged("gray_u8.npy", 240, -1, 0), lab, KDP_EIO, "truncated");
  expect_npy_fail(damaged("gray_u8.npy", 50, -1, 0), lab, KDP_EIO, "truncated");
  expect_npy_fail(damaged("gray_u8.npy", 4096, 6, 9), lab, KDP_EFORMAT, "version 9.0");
  expect_npy_fail(gray, damaged("labels_i64.npy", 170, -1, 0), KDP_EIO, "truncated");
  expect_npy_fail(fixture("fortran_u8.npy"), lab, KDP_EFORMAT, "Fortran order");
  expect_npy_fail(fixture("gray_f8.npy"), lab, KDP_EFORMAT, "dtype '<f8' are not supported");
  expect_npy_fail(fixture("rgb_be_f4.npy"), lab, KDP_EFORMAT, "dtype '>f4' are not supported");
  expect_npy_fail(fixture("chw_u8.npy"), lab, KDP_EFORMAT, "channels-first");
  expect_npy_fail(gray, fixture("labels_neg.npy"), KDP_EFORMAT, "label -1 at index 2 is out of range");
  expect_npy_fail(gray, fixture("labels_5.npy"), KDP_EFORMAT, "holds 5 labels but the images file holds 6");
  expect_npy_fail(gray, fixture("gray_u8.npy"), KDP_EFORMAT, "labels of shape 6 x 4 x 5");
  expect_npy_fail(gray, fixture("rgb_f32.npy"), KDP_EFORMAT, "labels of dtype '<f4' are not supported");
  expect_npy_fail(fixture("labels_i64.npy"), lab, KDP_EFORMAT, "images of dtype '<i8'");
  expect_npy_fail("/nonexistent.npy", lab, KDP_EIO, "/nonexistent.npy");
}
END_TEST

static int parse(const char *dict, int major, kdp_npy_header *h, kdp_error *err) {
  uint8_t buf[512];
  size_t n = strlen(dict), hdr = major == 1 ? 10 : 12;
  memcpy(buf, "\x93NUMPY", 6);
  buf[6] = (uint8_t)major;
  buf[7] = 0;
  buf[8] = (uint8_t)(n & 0xff);
  buf[9] = (uint8_t)(n >> 8);
  if (major != 1) buf[10] = buf[11] = 0;
  memcpy(buf + hdr, dict, n);
  return kdp_npy_parse_header(buf, hdr + n, "h.npy", h, err);
}

START_TEST(test_npy_header_grammar) {
  kdp_npy_header h;
  kdp_error err = {{0}};
  ck_assert_int_eq(parse("{'descr': '|u1', 'fortran_order': False, 'shape': (3, 28, 28), }    \n", 1, &h, &err), 0);
  ck_assert_str_eq(h.descr, "|u1");
  ck_assert_uint_eq(h.ndim, 3);
  ck_assert_uint_eq(h.shape[2], 28);
  ck_assert_uint_eq(h.data_offset, 10 + strlen("{'descr': '|u1', 'fortran_order': False, 'shape': (3, 28, 28), }    \n"));
  /* any key order, double quotes, no trailing comma, 1-tuples, Python 2 longs, version 3.0 */
  ck_assert_int_eq(parse("{\"shape\": (7L,), \"fortran_order\": True, \"descr\": \"<i8\"}\n", 3, &h, &err), 0);
  ck_assert_uint_eq(h.ndim, 1);
  ck_assert_uint_eq(h.shape[0], 7);
  ck_assert_int_eq(h.fortran_order, 1);
  ck_assert_int_eq(parse("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 1, &h, &err), 0);
  ck_assert_uint_eq(h.ndim, 0);
  static const char *bad[] = {
      "{'descr': '<f4', 'fortran_order': False}",                         /* no shape */
      "{'descr': '<f4', 'fortran_order': False, 'shape': (5), }",         /* an int, not a tuple */
      "{'descr': '<f4', 'fortran_order': 0, 'shape': (5,), }",            /* not a bool */
      "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), 'x': 1}",  /* unknown key */
      "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (5,)}", /* repeated */
      "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (5,)}", /* structured */
      "{'descr': '<f4', 'fortran_order': False, 'shape': (-5,)}",         /* negative */
      "{'descr': '<f4', 'fortran_order': False, 'shape': (5,)} junk",     /* after '}' */
      "'descr': '<f4'",                                                  /* no '{' */
      "{'descr': '<f4', 'fortran_order': False, 'shape': (1,2,3,4,5,6,7,8,9)}", /* > 8 dims */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    err.msg[0] = 0;
    ck_assert_msg(parse(bad[i], 1, &h, &err) == KDP_EFORMAT, "accepted: %s", bad[i]);
    assert_has(err.msg, "h.npy: malformed .npy header");
  }
  /* a header longer than the buffer is truncated, not read past */
  uint8_t b[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0xff, 0x00, '{', '}'};
  ck_assert_int_eq(kdp_npy_parse_header(b, sizeof b, "h.npy", &h, &err), KDP_EIO);
  assert_has(err.msg, "truncated");
}
END_TEST

/* ---- image folders ---- */

static void mkdirs(const char *rel) {
  char p[4200];
  snprintf(p, sizeof p, "%s/%s", tmp, rel);
  for (char *q = p + strlen(tmp) + 1; *q; q++)
    if (*q == '/') {
      *q = 0;
      mkdir(p, 0755);
      *q = '/';
    }
  mkdir(p, 0755);
}

/* a W x H PNG at tmp/rel, gray (C 1), RGB (C 3), or with alpha (C 2: gray + alpha, C 4: RGBA);
   pixel (y, x, c) = seed + 10 y + x + 50 c, alpha (alpha_of) 0 on even columns, 255 on odd ones */
static void write_png(const char *rel, unsigned W, unsigned H, int C, int seed) {
  char p[4200];
  snprintf(p, sizeof p, "%s/%s", tmp, rel);
  png_image im;
  memset(&im, 0, sizeof im);
  im.version = PNG_IMAGE_VERSION;
  im.width = W;
  im.height = H;
  static const png_uint_32 formats[5] = {0, PNG_FORMAT_GRAY, PNG_FORMAT_GA, PNG_FORMAT_RGB,
                                         PNG_FORMAT_RGBA};
  im.format = formats[C];
  uint8_t buf[64 * 64 * 4];
  for (unsigned y = 0; y < H; y++)
    for (unsigned x = 0; x < W; x++)
      for (int c = 0; c < C; c++)
        buf[(y * W + x) * C + c] = (C % 2 == 0 && c == C - 1) ? (uint8_t)(x % 2 ? 255 : 0)
                                                               : (uint8_t)(seed + 10 * y + x + 50 * c);
  ck_assert_msg(png_image_write_to_file(&im, p, 0, buf, 0, NULL), "cannot write %s: %s", p,
                im.message);
}

static void touch(const char *rel) {
  char p[4200];
  snprintf(p, sizeof p, "%s/%s", tmp, rel);
  FILE *f = fopen(p, "w");
  ck_assert_ptr_nonnull(f);
  fputs("not an image\n", f);
  fclose(f);
}

static const char *at(const char *rel) {
  static char p[4200];
  snprintf(p, sizeof p, "%s/%s", tmp, rel);
  return p;
}

START_TEST(test_folder_classes) {
  /* created out of order; hidden entries and other files are skipped */
  mkdirs("train/b_cat");
  mkdirs("train/a_dog");
  mkdirs("train/c_bird");
  mkdirs("train/.cache");
  write_png("train/b_cat/2.png", 6, 5, 1, 30);
  write_png("train/b_cat/1.png", 6, 5, 1, 20);
  write_png("train/a_dog/x.PNG", 6, 5, 1, 0);
  write_png("train/a_dog/y.png", 6, 5, 1, 1);
  write_png("train/a_dog/z.png", 6, 5, 1, 2);
  write_png("train/c_bird/only.png", 6, 5, 1, 40);
  write_png("train/.cache/skip.png", 6, 5, 1, 99);
  touch("train/a_dog/notes.txt");
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_folder_load(&ds, at("train"), NULL, &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(ds.n, 6);
  ck_assert_uint_eq(ds.H, 5);
  ck_assert_uint_eq(ds.W, 6);
  ck_assert_uint_eq(ds.C, 1);
  ck_assert_uint_eq(ds.n_classes, 3);
  ck_assert_str_eq(ds.class_names, "a_dog\nb_cat\nc_bird\n");
  static const uint8_t want_lab[6] = {0, 0, 0, 1, 1, 2};
  static const int want_seed[6] = {0, 1, 2, 20, 30, 40};
  for (size_t i = 0; i < 6; i++) {
    ck_assert_uint_eq(ds.labels[i], want_lab[i]);
    ck_assert_uint_eq(ds.images[i * 30 + 2 * 6 + 3], (uint8_t)(want_seed[i] + 23));
  }
  /* a test folder with some of the classes: labels by the training list */
  mkdirs("test/c_bird");
  mkdirs("test/a_dog");
  write_png("test/c_bird/t.png", 6, 5, 1, 7);
  write_png("test/a_dog/t.png", 6, 5, 1, 8);
  kdp_dataset te;
  ck_assert_msg(kdp_folder_load(&te, at("test"), ds.class_names, &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(te.n, 2);
  ck_assert_uint_eq(te.n_classes, 3);
  ck_assert_uint_eq(te.labels[0], 0); /* a_dog */
  ck_assert_uint_eq(te.labels[1], 2); /* c_bird */
  ck_assert_str_eq(te.class_names, ds.class_names);
  kdp_dataset_free(&te);
  /* a test class the training folder does not have */
  mkdirs("test/d_fish");
  write_png("test/d_fish/t.png", 6, 5, 1, 9);
  ck_assert_int_eq(kdp_folder_load(&te, at("test"), ds.class_names, &err), KDP_EFORMAT);
  assert_has(err.msg, "class 'd_fish' is not one of the training folder's classes");
  /* the dispatcher reads the same */
  kdp_dataset again;
  ck_assert_int_eq(kdp_dataset_load(&again, "folder", at("train"), "", NULL, &err), 0);
  ck_assert_uint_eq(again.n, 6);
  ck_assert_mem_eq(again.images, ds.images, 6 * 30);
  kdp_dataset_free(&again);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_folder_colour) {
  /* one RGB image makes the dataset RGB; gray images are expanded to three equal channels */
  mkdirs("f/a");
  mkdirs("f/b");
  write_png("f/a/1.png", 4, 3, 1, 10);
  write_png("f/b/1.png", 4, 3, 3, 20);
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_folder_load(&ds, at("f"), NULL, &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(ds.C, 3);
  for (int c = 0; c < 3; c++) {
    ck_assert_uint_eq(ds.images[(1 * 4 + 2) * 3 + c], 10 + 12);                       /* gray */
    ck_assert_uint_eq(ds.images[12 * 3 + (1 * 4 + 2) * 3 + c], (uint8_t)(20 + 12 + 50 * c)); /* RGB */
  }
  /* kdp_png_read: one file at the model's size */
  uint8_t out[4 * 3 * 3];
  ck_assert_int_eq(kdp_png_read(at("f/b/1.png"), 3, 4, 3, out, &err), 0);
  ck_assert_mem_eq(out, ds.images + 36, 36);
  ck_assert_int_eq(kdp_png_read(at("f/b/1.png"), 4, 4, 3, out, &err), KDP_EINVAL);
  assert_has(err.msg, "is 4x3 pixels, the model takes 4x4");
  kdp_dataset_free(&ds);
}
END_TEST

/* Alpha is composited onto black (the docs say so for folders and predict): a transparent pixel
   reads 0 whatever the buffer held before, an opaque one its value. Through kdp_png_read, a
   folder dataset and predict's inputs (kdp_images_append), which share that decoder. */
START_TEST(test_png_alpha_on_black) {
  mkdirs("alpha/a");
  mkdirs("alpha/b");
  write_png("alpha/a/1.png", 4, 3, 2, 40); /* gray + alpha */
  write_png("alpha/b/1.png", 4, 3, 4, 60); /* RGBA */
  kdp_error err = {{0}};
  uint8_t out[4 * 3 * 3];
  for (int C = 1; C <= 3; C += 2) {
    memset(out, 0xC8, sizeof out);
    ck_assert_msg(kdp_png_read(at("alpha/b/1.png"), 3, 4, (size_t)C, out, &err) == 0, "%s",
                  err.msg);
    for (size_t y = 0; y < 3; y++)
      for (size_t x = 0; x < 4; x++)
        for (int c = 0; c < C; c++) {
          uint8_t v = out[(y * 4 + x) * (size_t)C + (size_t)c];
          if (x % 2 == 0)
            ck_assert_msg(v == 0, "C=%d: transparent pixel (%zu,%zu) reads %u, not black", C, y,
                          x, v);
          else if (C == 3)
            ck_assert_uint_eq(v, (uint8_t)(60 + 10 * y + x + 50 * (size_t)c));
        }
  }
  kdp_dataset ds;
  ck_assert_msg(kdp_folder_load(&ds, at("alpha"), NULL, &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(ds.C, 3);
  for (size_t i = 0; i < 2; i++)
    for (size_t p = 0; p < 12; p += 2)
      for (size_t c = 0; c < 3; c++) ck_assert_uint_eq(ds.images[i * 36 + p * 3 + c], 0);
  ck_assert_uint_eq(ds.images[(1 * 4 + 1) * 3], 40 + 11); /* opaque gray: its value */
  kdp_images imgs = {.H = 3, .W = 4, .C = 3};
  ck_assert_msg(kdp_images_append(&imgs, at("alpha/b/1.png"), &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(imgs.n, 1);
  ck_assert_mem_eq(imgs.pix, ds.images + 36, 36);
  kdp_images_free(&imgs);
  kdp_dataset_free(&ds);
}
END_TEST

static void expect_folder_fail(const char *root, const char *hint) {
  kdp_dataset ds;
  kdp_error err = {{0}};
  int rc = kdp_folder_load(&ds, root, NULL, &err);
  ck_assert_msg(rc != 0, "%s: loaded", root);
  assert_has(err.msg, hint);
  ck_assert_ptr_null(ds.images);
}

START_TEST(test_folder_bad_inputs) {
  expect_folder_fail("/nonexistent-folder", "is not a directory");
  mkdirs("empty");
  expect_folder_fail(at("empty"), "has no class sub-directories");
  mkdirs("one/a");
  write_png("one/a/1.png", 4, 4, 1, 0);
  expect_folder_fail(at("one"), "has 1 class sub-directory: expected 2..256");
  mkdirs("sizes/a");
  mkdirs("sizes/b");
  write_png("sizes/a/1.png", 4, 4, 1, 0);
  write_png("sizes/b/1.png", 5, 4, 1, 0);
  expect_folder_fail(at("sizes"), "must have the same size");
  mkdirs("jpg/a");
  mkdirs("jpg/b");
  write_png("jpg/a/1.png", 4, 4, 1, 0);
  touch("jpg/b/1.jpg");
  expect_folder_fail(at("jpg"), "holds no .png files (only other files");
  mkdirs("broken/a");
  mkdirs("broken/b");
  write_png("broken/a/1.png", 4, 4, 1, 0);
  touch("broken/b/1.png");
  expect_folder_fail(at("broken"), "not a readable PNG");
  /* a directory name that cannot be a class name in the model file is refused before training */
  mkdirs("quote/a");
  mkdirs("quote/say \"b\"");
  write_png("quote/a/1.png", 4, 4, 1, 0);
  write_png("quote/say \"b\"/1.png", 4, 4, 1, 0);
  expect_folder_fail(at("quote"), "cannot name a class");
}
END_TEST

/* ---- class names: one entry, one name per line; folder names with commas survive ---- */

START_TEST(test_class_names) {
  ck_assert(kdp_class_name_ok("Ankle boot", 10));
  ck_assert(kdp_class_name_ok("a,b", 3));
  ck_assert(!kdp_class_name_ok("", 0));
  ck_assert(!kdp_class_name_ok("tab\there", 8));
  ck_assert(!kdp_class_name_ok("say \"x\"", 7));
  char longname[80];
  memset(longname, 'x', sizeof longname);
  ck_assert(kdp_class_name_ok(longname, KDP_MAX_CLASS_NAME - 1));
  ck_assert(!kdp_class_name_ok(longname, KDP_MAX_CLASS_NAME));
  /* a folder whose class names hold a comma and a space */
  mkdirs("names/red, dark");
  mkdirs("names/blue sky");
  write_png("names/red, dark/1.png", 4, 4, 1, 0);
  write_png("names/blue sky/1.png", 4, 4, 1, 9);
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_folder_load(&ds, at("names"), NULL, &err) == 0, "%s", err.msg);
  ck_assert_str_eq(ds.class_names, "blue sky\nred, dark\n");
  /* the model file's entry splits on newlines only; --classes on commas */
  kdp_modelfile mf;
  memset(&mf, 0, sizeof mf);
  mf.in = (kdp_input_shape){4, 4, 1, 2};
  ck_assert_msg(kdp_modelfile_set_class_names(&mf, ds.class_names, '\n', &err) == 0, "%s",
                err.msg);
  ck_assert_str_eq(mf.class_names[0], "blue sky");
  ck_assert_str_eq(mf.class_names[1], "red, dark");
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, ds.class_names, ',', &err), KDP_EINVAL);
  ck_assert_str_eq(mf.class_names[1], "red, dark"); /* a failed call keeps the names */
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, "cat,dog", ',', &err), 0);
  ck_assert_str_eq(mf.class_names[1], "dog");
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, "cat\ndog", '\n', &err), 0); /* no final \n */
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, "cat,dog,", ',', &err), KDP_EINVAL);
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, "cat\n\ndog\n", '\n', &err), KDP_EINVAL);
  /* written one per line, each ending in a newline, and read back */
  ck_assert_int_eq(kdp_model_create_infer(&mf.m, "mlp(3)", mf.in, 1, &err), 0);
  ck_assert_int_eq(kdp_modelfile_set_class_names(&mf, ds.class_names, '\n', &err), 0);
  ck_assert_msg(kdp_modelfile_write(&mf, at("n.kdpm"), "test", 0, &err) == 0, "%s", err.msg);
  kdp_ckpt *ck = NULL;
  const char *entry = NULL;
  ck_assert_int_eq(kdp_ckpt_read(at("n.kdpm"), KDP_CKPT_DEFAULT_MAX_BYTES, &ck, &err), 0);
  ck_assert_int_eq(kdp_ckpt_get_str(ck, "class_names", &entry, &err), 0);
  ck_assert_str_eq(entry, ds.class_names);
  kdp_ckpt_free(ck);
  kdp_modelfile back;
  ck_assert_msg(kdp_modelfile_read(&back, at("n.kdpm"), 1, &err) == 0, "%s", err.msg);
  ck_assert_str_eq(back.class_names[1], "red, dark");
  kdp_modelfile_free(&back);
  kdp_modelfile_free(&mf);
  kdp_dataset_free(&ds);
}
END_TEST

/* ---- predictions read .npy images, uint8 or float32, through the npy dataset reader ---- */

START_TEST(test_predict_npy_inputs) {
  kdp_error err = {{0}};
  kdp_images u8 = {.H = 4, .W = 5, .C = 3}, f32 = {.H = 4, .W = 5, .C = 3};
  /* the RGB uint8 pixels of rgb_f32.npy (which holds them / 255) as raw bytes */
  uint8_t raw[6 * 60];
  for (size_t i = 0; i < 6; i++)
    for (size_t p = 0; p < 20; p++)
      for (size_t c = 0; c < 3; c++) raw[(i * 20 + p) * 3 + c] = px(i, p / 5, p % 5, c);
  FILE *f = fopen(at("rgb.raw"), "wb");
  ck_assert_ptr_nonnull(f);
  ck_assert_uint_eq(fwrite(raw, 1, sizeof raw, f), sizeof raw);
  fclose(f);
  ck_assert_msg(kdp_images_append(&u8, at("rgb.raw"), &err) == 0, "%s", err.msg);
  ck_assert_msg(kdp_images_append(&f32, fixture("rgb_f32.npy"), &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(f32.n, 6);
  ck_assert_uint_eq(kdp_images_elem(&f32), 4);
  ck_assert_uint_eq(kdp_images_elem(&u8), 1);
  /* mixing uint8 and float32, or another shape, is refused */
  ck_assert_int_eq(kdp_images_append(&f32, at("rgb.raw"), &err), KDP_EINVAL);
  assert_has(err.msg, "cannot be mixed");
  kdp_images gray = {.H = 4, .W = 5, .C = 1};
  ck_assert_msg(kdp_images_append(&gray, fixture("gray_u8.npy"), &err) == 0, "%s", err.msg);
  ck_assert_uint_eq(gray.n, 6);
  ck_assert_uint_eq(gray.pix[(2 * 4 + 1) * 5 + 3], px(2, 1, 3, 0));
  ck_assert_int_eq(kdp_images_append(&gray, fixture("rgb_f32.npy"), &err), KDP_EFORMAT);
  assert_has(err.msg, "holds 4x5x3 images, the model takes 4x5x1");
  /* a model predicts the same for the float32 array as for its uint8 pixels */
  kdp_modelfile mf;
  memset(&mf, 0, sizeof mf);
  mf.in = (kdp_input_shape){4, 5, 3, 4};
  for (int c = 0; c < 3; c++) {
    mf.mean[c] = 0.1f * (float)(c + 1);
    mf.std[c] = 0.3f + 0.1f * (float)c;
  }
  ck_assert_int_eq(kdp_model_create_infer(&mf.m, "mlp(16)", mf.in, 4, &err), 0);
  kdp_rng rng;
  kdp_rng_seed(&rng, 7, 0);
  kdp_model_init(mf.m, &rng);
  mf.max_batch = 4;
  mf.x = kdp_falloc(4 * 60);
  float pu[6 * 4], pf[6 * 4];
  kdp_modelfile_predict(&mf, u8.pix, kdp_images_elem(&u8), 6, pu);
  kdp_modelfile_predict(&mf, f32.pix, kdp_images_elem(&f32), 6, pf);
  for (size_t k = 0; k < 24; k++) ck_assert_float_eq_tol(pf[k], pu[k], 1e-6);
  float spread = 0;
  for (size_t k = 4; k < 24; k++) spread += fabsf(pu[k] - pu[k % 4]);
  ck_assert_msg(spread > 1e-4, "the images should predict differently (spread %g)", spread);
  kdp_modelfile_free(&mf);
  kdp_images_free(&gray);
  kdp_images_free(&u8);
  kdp_images_free(&f32);
}
END_TEST

/* ---- model files: the weights must fit the arch's plan before the model is allocated ---- */

static void write_bad_model(const char *path, const char *arch, int flat) {
  kdp_ckpt_writer *w = NULL;
  kdp_error err = {{0}};
  ck_assert_int_eq(kdp_ckpt_writer_open(&w, path, "model", &err), 0);
  static const char *const mn[6] = {"mean0", "mean1", "mean2", "std0", "std1", "std2"};
  int rc = kdp_ckpt_put_str(w, "arch", arch, &err);
  if (rc == 0 && !flat) rc = kdp_ckpt_put_u64(w, "model_format", 2, &err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "input_h", 28, &err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "input_w", 28, &err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "input_c", 1, &err);
  if (rc == 0) rc = kdp_ckpt_put_i64(w, "classes", 10, &err);
  for (int i = 0; i < 6 && rc == 0; i++) rc = kdp_ckpt_put_f64(w, mn[i], i < 3 ? 0 : 1, &err);
  float v[16] = {0};
  size_t n = 16;
  if (rc == 0) rc = kdp_ckpt_put_f32(w, flat ? "params" : "fc1.weight", v, 1, &n, &err);
  if (rc == 0 && flat) rc = kdp_ckpt_put_f32(w, "buffers", v, 1, &n, &err);
  ck_assert_msg(rc == 0, "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_writer_commit(w, NULL, &err), 0);
}

START_TEST(test_modelfile_plan_check) {
  /* 2.4e12 parameters (9.6 TB): refused from the plan, nothing allocated (else this aborts) */
  const char *huge = "mlp(1500000,1600000)";
  for (int flat = 0; flat <= 1; flat++) {
    write_bad_model(at("huge.kdpm"), huge, flat);
    kdp_modelfile mf;
    kdp_error err = {{0}};
    ck_assert_int_eq(kdp_modelfile_read(&mf, at("huge.kdpm"), 256, &err), KDP_EFORMAT);
    assert_has(err.msg, flat ? "holds 16 parameters, its arch 'mlp(1500000,1600000)' has"
                             : "holds 16 tensor values");
    ck_assert_ptr_null(mf.m);
  }
  /* a small mismatch is refused the same way, with the count the arch needs */
  write_bad_model(at("small.kdpm"), "seq:dense(1)", 1); /* dense(1) + dense(10): 785 + 20 */
  kdp_modelfile mf;
  kdp_error err = {{0}};
  ck_assert_int_eq(kdp_modelfile_read(&mf, at("small.kdpm"), 4, &err), KDP_EFORMAT);
  assert_has(err.msg, "its arch 'seq:dense(1)' has 805");
}
END_TEST

static Suite *formats_suite(void) {
  Suite *s = suite_create("formats");
  TCase *core = kdp_test_case("core");
  tcase_add_checked_fixture(core, setup, teardown);
  tcase_add_test(core, test_npy_gray_u8);
  tcase_add_test(core, test_npy_rgb_f32);
  tcase_add_test(core, test_npy_float_augment_matches_u8);
  tcase_add_test(core, test_npy_header_grammar);
  tcase_add_test(core, test_folder_classes);
  tcase_add_test(core, test_folder_colour);
  tcase_add_test(core, test_png_alpha_on_black);
  tcase_add_test(core, test_class_names);
  tcase_add_test(core, test_predict_npy_inputs);
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_checked_fixture(lim, setup, teardown);
  tcase_add_test(lim, test_npy_bad_inputs);
  tcase_add_test(lim, test_folder_bad_inputs);
  tcase_add_test(lim, test_modelfile_plan_check);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(formats_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
