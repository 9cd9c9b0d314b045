/* test_data.c: check suite "data": IDX (raw and gzip) and CIFAR-10/100 readers with every error
   class, subset and label noise, and the batcher (permutations, seeding, exact resume, shards,
   normalisation, augmentation). Fixtures are written into a temp dir by the tests themselves. */
#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <zlib.h>

#include "kdpeers/data.h"
#include "testutil.h"

/* ---- fixtures ------------------------------------------------------------------------------- */

static char *tmpdir_path;
#define MAX_FILES 64
static char *made[MAX_FILES];
static int n_made;

static void setup(void) {
  tmpdir_path = kdp_test_tmpdir();
  n_made = 0;
}

static void teardown(void) {
  for (int i = 0; i < n_made; i++) {
    unlink(made[i]);
    free(made[i]);
  }
  rmdir(tmpdir_path);
  free(tmpdir_path);
}

/* Path of NAME in the temp dir (remembered for cleanup). */
static const char *tpath(const char *name) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s/%s", tmpdir_path, name);
  for (int i = 0; i < n_made; i++)
    if (strcmp(made[i], buf) == 0) return made[i];
  ck_assert_int_lt(n_made, MAX_FILES);
  made[n_made] = strdup(buf);
  return made[n_made++];
}

/* Writes bytes to NAME, gzip-compressed if gz; returns the path. */
static const char *write_bytes(const char *name, const uint8_t *b, size_t n, int gz) {
  const char *p = tpath(name);
  if (gz) {
    gzFile f = gzopen(p, "wb");
    ck_assert_msg(f != NULL, "cannot create %s", p);
    if (n) ck_assert_int_eq(gzwrite(f, b, (unsigned)n), (int)n);
    ck_assert_int_eq(gzclose(f), Z_OK);
  } else {
    FILE *f = fopen(p, "wb");
    ck_assert_msg(f != NULL, "cannot create %s", p);
    if (n) ck_assert_uint_eq(fwrite(b, 1, n, f), n);
    fclose(f);
  }
  return p;
}

static void put_be32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)(v >> 24);
  p[1] = (uint8_t)(v >> 16);
  p[2] = (uint8_t)(v >> 8);
  p[3] = (uint8_t)v;
}

/* IDX images: magic, n, H, W, then pixels. Caller frees. *len gets the full size. */
static uint8_t *idx_images(uint32_t magic, uint32_t n, uint32_t H, uint32_t W,
                           const uint8_t *pix, size_t *len) {
  size_t np = (size_t)n * H * W;
  uint8_t *b = malloc(16 + np);
  put_be32(b, magic);
  put_be32(b + 4, n);
  put_be32(b + 8, H);
  put_be32(b + 12, W);
  memcpy(b + 16, pix, np);
  *len = 16 + np;
  return b;
}

static uint8_t *idx_labels(uint32_t magic, uint32_t n, const uint8_t *lab, size_t *len) {
  uint8_t *b = malloc(8 + n);
  put_be32(b, magic);
  put_be32(b + 4, n);
  memcpy(b + 8, lab, n);
  *len = 8 + n;
  return b;
}

/* A tiny IDX pair: TN images of TH x TW, pixel (i, p) = (7 i + 3 p + 1) mod 256, label (3 i + 2)
   mod 10. */
#define TN 5
#define TH 3
#define TW 4
static uint8_t tpix[TN * TH * TW], tlab[TN];

static void make_tiny(const char *img_name, const char *lab_name, int gz, const char **ip,
                      const char **lp) {
  for (size_t i = 0; i < TN; i++) {
    tlab[i] = (uint8_t)((3 * i + 2) % 10);
    for (size_t p = 0; p < TH * TW; p++)
      tpix[i * TH * TW + p] = (uint8_t)((7 * i + 3 * p + 1) % 256);
  }
  size_t a, b;
  uint8_t *im = idx_images(0x803, TN, TH, TW, tpix, &a);
  uint8_t *lb = idx_labels(0x801, TN, tlab, &b);
  *ip = write_bytes(img_name, im, a, gz);
  *lp = write_bytes(lab_name, lb, b, gz);
  free(im);
  free(lb);
}

static void check_tiny(const kdp_dataset *ds) {
  ck_assert_uint_eq(ds->n, TN);
  ck_assert_uint_eq(ds->H, TH);
  ck_assert_uint_eq(ds->W, TW);
  ck_assert_uint_eq(ds->C, 1);
  ck_assert_uint_eq(ds->n_classes, 10);
  ck_assert_int_eq(ds->owns, 1);
  ck_assert_mem_eq(ds->images, tpix, sizeof tpix);
  ck_assert_mem_eq(ds->labels, tlab, sizeof tlab);
}

#define assert_has(msg, needle)                                                                  \
  ck_assert_msg(strstr((msg), (needle)) != NULL, "message \"%s\" lacks \"%s\"", (msg), (needle))

/* A load that must fail: code, message naming `file`, dataset left empty. */
static void expect_idx_fail(const char *ip, const char *lp, int code, const char *file,
                            const char *needle) {
  kdp_dataset ds;
  kdp_error err = {{0}};
  int rc = kdp_idx_load(&ds, ip, lp, &err);
  ck_assert_msg(rc == code, "expected code %d, got %d (%s)", code, rc, err.msg);
  assert_has(err.msg, file);
  if (needle) assert_has(err.msg, needle);
  ck_assert_ptr_null(ds.images);
  ck_assert_ptr_null(ds.labels);
  ck_assert_uint_eq(ds.n, 0);
}

/* ---- IDX core ------------------------------------------------------------------------------- */

START_TEST(test_idx_raw) {
  const char *ip, *lp;
  make_tiny("img-idx3-ubyte", "lab-idx1-ubyte", 0, &ip, &lp);
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_idx_load(&ds, ip, lp, &err) == 0, "%s", err.msg);
  check_tiny(&ds);
  kdp_dataset_free(&ds);
  ck_assert_ptr_null(ds.images);
  ck_assert_uint_eq(ds.n, 0);
}
END_TEST

START_TEST(test_idx_gz) {
  const char *ip, *lp;
  make_tiny("img-idx3-ubyte.gz", "lab-idx1-ubyte.gz", 1, &ip, &lp);
  /* the files really are compressed */
  FILE *f = fopen(ip, "rb");
  uint8_t h[2];
  ck_assert_uint_eq(fread(h, 1, 2, f), 2);
  fclose(f);
  ck_assert(h[0] == 0x1f && h[1] == 0x8b);
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_idx_load(&ds, ip, lp, &err) == 0, "%s", err.msg);
  check_tiny(&ds);
  kdp_dataset_free(&ds);
}
END_TEST

/* gzip is detected by content, not by the name: a gzip file without .gz, a raw one with .gz */
START_TEST(test_idx_detect_by_content) {
  const char *ip, *lp;
  make_tiny("images.raw.gz", "labels.bin", 0, &ip, &lp);
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_idx_load(&ds, ip, lp, &err) == 0, "%s", err.msg);
  check_tiny(&ds);
  kdp_dataset_free(&ds);
  make_tiny("images.bin", "labels.raw.gz", 1, &ip, &lp);
  ck_assert_msg(kdp_idx_load(&ds, ip, lp, &err) == 0, "%s", err.msg);
  check_tiny(&ds);
  kdp_dataset_free(&ds);
}
END_TEST

/* ---- IDX limits ----------------------------------------------------------------------------- */

START_TEST(test_idx_missing) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  const char *nope = tpath("does-not-exist-idx3-ubyte.gz");
  expect_idx_fail(nope, lp, KDP_EIO, nope, "No such file");
  expect_idx_fail(ip, nope, KDP_EIO, nope, "No such file");
}
END_TEST

START_TEST(test_idx_bad_magic) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  uint8_t junk[64];
  for (int i = 0; i < 64; i++) junk[i] = (uint8_t)(0x12 + i);
  const char *bad = write_bytes("junk.gz", junk, sizeof junk, 1);
  expect_idx_fail(bad, lp, KDP_EFORMAT, bad, "0x12131415");
  expect_idx_fail(bad, lp, KDP_EFORMAT, bad, "0x00000803");
  expect_idx_fail(ip, bad, KDP_EFORMAT, bad, "0x00000801");
  /* an HTML page saved instead of the dataset */
  const char *html = "<!DOCTYPE html><html>not found</html>";
  const char *hp = write_bytes("page.gz", (const uint8_t *)html, strlen(html), 0);
  expect_idx_fail(hp, lp, KDP_EFORMAT, hp, "HTML");
  /* an empty file */
  const char *ep = write_bytes("empty", junk, 0, 0);
  expect_idx_fail(ep, lp, KDP_EIO, ep, "magic");
}
END_TEST

START_TEST(test_idx_swapped) {
  const char *ip, *lp;
  make_tiny("img.gz", "lab.gz", 1, &ip, &lp);
  expect_idx_fail(lp, ip, KDP_EFORMAT, lp, "swapped");
  /* only one of the two is wrong: the labels path holds images */
  expect_idx_fail(ip, ip, KDP_EFORMAT, ip, "swapped");
  expect_idx_fail(lp, lp, KDP_EFORMAT, lp, "labels file");
}
END_TEST

START_TEST(test_idx_truncated_images) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  size_t len;
  uint8_t *im = idx_images(0x803, TN, TH, TW, tpix, &len);
  size_t cut = len - TH * TW / 2; /* half of the last image missing */
  char want[64];
  snprintf(want, sizeof want, "%d bytes", TN * TH * TW);
  const char *raw = write_bytes("trunc-images", im, cut, 0);
  expect_idx_fail(raw, lp, KDP_EIO, raw, want);
  expect_idx_fail(raw, lp, KDP_EIO, raw, "truncated");
  /* a complete gzip stream holding too few bytes */
  const char *gz = write_bytes("trunc-images.gz", im, cut, 1);
  expect_idx_fail(gz, lp, KDP_EIO, gz, want);
  char got[64];
  snprintf(got, sizeof got, "got %zu", cut - 16);
  expect_idx_fail(gz, lp, KDP_EIO, gz, got);
  /* a gzip stream cut in the middle (a partial download) */
  const char *full = write_bytes("full-images.gz", im, len, 1);
  FILE *f = fopen(full, "rb");
  uint8_t zb[4096];
  size_t zn = fread(zb, 1, sizeof zb, f);
  fclose(f);
  const char *cutgz = write_bytes("cut-images.gz", zb, zn - 12, 0);
  expect_idx_fail(cutgz, lp, KDP_EIO, cutgz, NULL);
  /* all pixels intact but the gzip CRC wrong, or the 8-byte trailer missing */
  zb[zn - 8] ^= 0x5a;
  const char *crc = write_bytes("crc-images.gz", zb, zn, 0);
  expect_idx_fail(crc, lp, KDP_EIO, crc, "gzip stream");
  const char *notrail = write_bytes("notrail-images.gz", zb, zn - 8, 0);
  expect_idx_fail(notrail, lp, KDP_EIO, notrail, "gzip stream");
  /* header itself cut */
  const char *hdr = write_bytes("hdr-images", im, 10, 0);
  expect_idx_fail(hdr, lp, KDP_EIO, hdr, "header");
  free(im);
}
END_TEST

START_TEST(test_idx_truncated_labels) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  size_t len;
  uint8_t *lb = idx_labels(0x801, TN, tlab, &len);
  const char *raw = write_bytes("trunc-labels", lb, len - 2, 0);
  expect_idx_fail(ip, raw, KDP_EIO, raw, "truncated");
  const char *gz = write_bytes("trunc-labels.gz", lb, len - 2, 1);
  char msg[64];
  snprintf(msg, sizeof msg, "expected %d bytes", TN);
  expect_idx_fail(ip, gz, KDP_EIO, gz, msg);
  free(lb);
}
END_TEST

START_TEST(test_idx_count_mismatch) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  size_t len;
  uint8_t *lb = idx_labels(0x801, TN - 1, tlab, &len);
  const char *p = write_bytes("fewer-labels", lb, len, 0);
  expect_idx_fail(ip, p, KDP_EFORMAT, p, ip);
  char msg[64];
  snprintf(msg, sizeof msg, "%d labels", TN - 1);
  expect_idx_fail(ip, p, KDP_EFORMAT, p, msg);
  free(lb);
  /* more labels than images */
  uint8_t more[TN + 2] = {0};
  lb = idx_labels(0x801, TN + 2, more, &len);
  p = write_bytes("more-labels.gz", lb, len, 1);
  snprintf(msg, sizeof msg, "%d labels", TN + 2);
  expect_idx_fail(ip, p, KDP_EFORMAT, p, msg);
  free(lb);
}
END_TEST

START_TEST(test_idx_label_range) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  uint8_t bad[TN];
  memcpy(bad, tlab, TN);
  bad[3] = 12;
  size_t len;
  uint8_t *lb = idx_labels(0x801, TN, bad, &len);
  const char *p = write_bytes("bad-labels.gz", lb, len, 1);
  expect_idx_fail(ip, p, KDP_EFORMAT, p, "label 12 at index 3");
  expect_idx_fail(ip, p, KDP_EFORMAT, p, "10 classes");
  free(lb);
  /* the first label out of range, 10, in the last position */
  memcpy(bad, tlab, TN);
  bad[TN - 1] = 10;
  lb = idx_labels(0x801, TN, bad, &len);
  p = write_bytes("bad-labels-10", lb, len, 0);
  char msg[64];
  snprintf(msg, sizeof msg, "label 10 at index %d", TN - 1);
  expect_idx_fail(ip, p, KDP_EFORMAT, p, msg);
  free(lb);
}
END_TEST

START_TEST(test_idx_absurd_dims) {
  const char *ip, *lp;
  make_tiny("i", "l", 0, &ip, &lp);
  uint8_t h[16];
  put_be32(h, 0x803);
  put_be32(h + 4, TN);
  put_be32(h + 8, 0);
  put_be32(h + 12, TW);
  const char *p = write_bytes("zero-h", h, 16, 0);
  expect_idx_fail(p, lp, KDP_EFORMAT, p, "absurd");
  put_be32(h + 8, 100000);
  p = write_bytes("huge-h", h, 16, 0);
  expect_idx_fail(p, lp, KDP_EFORMAT, p, "100000");
  put_be32(h + 4, 0xffffffffu);
  put_be32(h + 8, 4096);
  put_be32(h + 12, 4096);
  p = write_bytes("huge-n.gz", h, 16, 1);
  expect_idx_fail(p, lp, KDP_EFORMAT, p, "absurd");
  /* raw file whose header promises far more than the file holds: refused before allocating */
  put_be32(h + 4, 100000);
  put_be32(h + 8, 1000);
  put_be32(h + 12, 100);
  p = write_bytes("big-promise", h, 16, 0);
  expect_idx_fail(p, lp, KDP_EIO, p, "truncated");
}
END_TEST

/* ---- CIFAR ---------------------------------------------------------------------------------- */

/* Record r of a synthetic CIFAR file: pixel (c, y, x) = (31 r + 101 c + 7 y + 3 x) mod 256. */
static uint8_t cifar_px(size_t r, size_t c, size_t y, size_t x) {
  return (uint8_t)((r * 31 + c * 101 + y * 7 + x * 3) % 256);
}

static const char *write_cifar(const char *name, size_t first, size_t m, int c100, int gz,
                               int bad_label_at) {
  size_t nl = c100 ? 2 : 1, rec = nl + 3072;
  uint8_t *b = malloc(m * rec);
  for (size_t i = 0; i < m; i++) {
    size_t r = first + i;
    uint8_t *p = b + i * rec;
    if (c100) {
      p[0] = (uint8_t)(r % 20);
      p[1] = (uint8_t)((r * 7) % 100);
    } else {
      p[0] = (uint8_t)((r * 3) % 10);
    }
    if ((int)i == bad_label_at) p[nl - 1] = c100 ? 100 : 10;
    for (size_t c = 0; c < 3; c++)
      for (size_t y = 0; y < 32; y++)
        for (size_t x = 0; x < 32; x++) p[nl + c * 1024 + y * 32 + x] = cifar_px(r, c, y, x);
  }
  const char *path = write_bytes(name, b, m * rec, gz);
  free(b);
  return path;
}

static void check_cifar(const kdp_dataset *ds, size_t n, int c100) {
  ck_assert_uint_eq(ds->n, n);
  ck_assert_uint_eq(ds->H, 32);
  ck_assert_uint_eq(ds->W, 32);
  ck_assert_uint_eq(ds->C, 3);
  ck_assert_uint_eq(ds->n_classes, c100 ? 100 : 10);
  for (size_t r = 0; r < n; r++) {
    ck_assert_uint_eq(ds->labels[r], c100 ? (r * 7) % 100 : (r * 3) % 10);
    for (size_t y = 0; y < 32; y++)
      for (size_t x = 0; x < 32; x++)
        for (size_t c = 0; c < 3; c++)
          ck_assert_msg(ds->images[((r * 32 + y) * 32 + x) * 3 + c] == cifar_px(r, c, y, x),
                        "record %zu pixel (y %zu, x %zu, c %zu)", r, y, x, c);
  }
  /* one known pixel spelled out: record 1, channel 2 (blue), row 5, column 9 */
  ck_assert_uint_eq(ds->images[((1 * 32 + 5) * 32 + 9) * 3 + 2],
                    (uint8_t)((1 * 31 + 2 * 101 + 5 * 7 + 9 * 3) % 256));
}

START_TEST(test_cifar10) {
  const char *p[2] = {write_cifar("data_batch_1.bin", 0, 3, 0, 0, -1),
                      write_cifar("data_batch_2.bin.gz", 3, 2, 0, 1, -1)};
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_cifar_load(&ds, p, 2, 0, &err) == 0, "%s", err.msg);
  check_cifar(&ds, 5, 0);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_cifar100) {
  const char *p[1] = {write_cifar("train.bin", 0, 4, 1, 0, -1)};
  kdp_dataset ds;
  kdp_error err = {{0}};
  ck_assert_msg(kdp_cifar_load(&ds, p, 1, 1, &err) == 0, "%s", err.msg);
  check_cifar(&ds, 4, 1);
  kdp_dataset_free(&ds);
}
END_TEST

static void expect_cifar_fail(const char *const *p, size_t nf, int c100, int code,
                              const char *file, const char *needle) {
  kdp_dataset ds;
  kdp_error err = {{0}};
  int rc = kdp_cifar_load(&ds, p, nf, c100, &err);
  ck_assert_msg(rc == code, "expected code %d, got %d (%s)", code, rc, err.msg);
  if (file) assert_has(err.msg, file);
  if (needle) assert_has(err.msg, needle);
  ck_assert_ptr_null(ds.images);
  ck_assert_uint_eq(ds.n, 0);
}

START_TEST(test_cifar_limits) {
  const char *good = write_cifar("good.bin", 0, 2, 0, 0, -1);
  /* size not a multiple of the record size */
  uint8_t junk[3073 + 100];
  memset(junk, 1, sizeof junk);
  const char *odd = write_bytes("odd.bin", junk, sizeof junk, 0);
  const char *p1[2] = {good, odd};
  expect_cifar_fail(p1, 2, 0, KDP_EFORMAT, odd, "3173");
  expect_cifar_fail(p1, 2, 0, KDP_EFORMAT, odd, "3073");
  /* a CIFAR-100 file read as CIFAR-10, and the other way round: the hint names the format */
  const char *c100 = write_cifar("c100.bin", 0, 3, 1, 0, -1);
  expect_cifar_fail(&c100, 1, 0, KDP_EFORMAT, c100, "fits CIFAR-100 records");
  expect_cifar_fail(&good, 1, 1, KDP_EFORMAT, good, "fits CIFAR-10 records");
  /* label out of range */
  const char *bad = write_cifar("badlab.bin", 0, 3, 0, 0, 1);
  expect_cifar_fail(&bad, 1, 0, KDP_EFORMAT, bad, "record 1 has label 10");
  const char *bad100 = write_cifar("badlab100.bin.gz", 0, 3, 1, 1, 2);
  expect_cifar_fail(&bad100, 1, 1, KDP_EFORMAT, bad100, "record 2 has label 100");
  /* missing file, named even when it is not the first */
  const char *nope = tpath("data_batch_9.bin");
  const char *p2[2] = {good, nope};
  expect_cifar_fail(p2, 2, 0, KDP_EIO, nope, "No such file");
  /* a gzip file cut short (a partial download) */
  const char *gzc = write_cifar("gz.bin.gz", 0, 3, 0, 1, -1);
  FILE *f = fopen(gzc, "rb");
  uint8_t zb[8192];
  size_t zn = fread(zb, 1, sizeof zb, f);
  fclose(f);
  ck_assert_uint_lt(zn, sizeof zb);
  const char *cut = write_bytes("cut.bin.gz", zb, zn - 6, 0);
  expect_cifar_fail(&cut, 1, 0, KDP_EIO, cut, "gzip stream");
  /* empty file, no files */
  const char *empty = write_bytes("empty.bin", junk, 0, 0);
  expect_cifar_fail(&empty, 1, 0, KDP_EFORMAT, empty, NULL);
  expect_cifar_fail(p1, 0, 0, KDP_EINVAL, NULL, "no files");
}
END_TEST

/* ---- subset and label noise ----------------------------------------------------------------- */

static kdp_dataset synth(size_t n, size_t H, size_t W, size_t C, size_t n_classes, uint64_t seed) {
  kdp_dataset ds = {0};
  ds.n = n;
  ds.H = H;
  ds.W = W;
  ds.C = C;
  ds.n_classes = n_classes;
  ds.images = malloc(n * H * W * C + 1);
  ds.labels = malloc(n + 1);
  ds.owns = 1;
  kdp_rng r;
  kdp_rng_seed(&r, seed, 99);
  for (size_t i = 0; i < n * H * W * C; i++) ds.images[i] = (uint8_t)kdp_rng_u32(&r);
  for (size_t i = 0; i < n; i++) ds.labels[i] = (uint8_t)(i % n_classes);
  return ds;
}

START_TEST(test_subset) {
  kdp_dataset ds = synth(50, 2, 2, 1, 10, 1);
  kdp_dataset_subset(&ds, 0);
  ck_assert_uint_eq(ds.n, 50);
  kdp_dataset_subset(&ds, 80);
  ck_assert_uint_eq(ds.n, 50);
  kdp_dataset_subset(&ds, 20);
  ck_assert_uint_eq(ds.n, 20);
  ck_assert_uint_eq(ds.labels[19], 9);
  kdp_dataset_free(&ds);
}
END_TEST

/* Exactly round(frac n) positions are re-drawn: two datasets that differ at every position get the
   same positions and the same new labels, so they agree exactly at the re-drawn positions. */
START_TEST(test_noise_exact_count) {
  const size_t n = 1001;
  const double fracs[] = {0.0, 0.1, 0.37, 0.5, 1.0};
  for (size_t t = 0; t < sizeof fracs / sizeof *fracs; t++) {
    kdp_dataset a = synth(n, 1, 1, 1, 10, 2), b = synth(n, 1, 1, 1, 10, 2);
    memset(a.labels, 0, n);
    memset(b.labels, 1, n);
    size_t ca = kdp_dataset_label_noise(&a, fracs[t], 1234);
    size_t cb = kdp_dataset_label_noise(&b, fracs[t], 1234);
    size_t agree = 0, changed_a = 0, changed_b = 0;
    for (size_t i = 0; i < n; i++) {
      agree += a.labels[i] == b.labels[i];
      changed_a += a.labels[i] != 0;
      changed_b += b.labels[i] != 1;
      ck_assert_uint_lt(a.labels[i], 10);
    }
    ck_assert_uint_eq(agree, (size_t)llround(fracs[t] * (double)n));
    ck_assert_uint_eq(ca, changed_a);
    ck_assert_uint_eq(cb, changed_b);
    kdp_dataset_free(&a);
    kdp_dataset_free(&b);
  }
}
END_TEST

START_TEST(test_noise_deterministic) {
  kdp_dataset a = synth(500, 1, 1, 1, 10, 3), b = synth(500, 1, 1, 1, 10, 3),
              c = synth(500, 1, 1, 1, 10, 3);
  size_t ca = kdp_dataset_label_noise(&a, 0.4, 77);
  size_t cb = kdp_dataset_label_noise(&b, 0.4, 77);
  kdp_dataset_label_noise(&c, 0.4, 78);
  ck_assert_uint_eq(ca, cb);
  ck_assert_mem_eq(a.labels, b.labels, 500);
  ck_assert_int_ne(memcmp(a.labels, c.labels, 500), 0);
  kdp_dataset_free(&a);
  kdp_dataset_free(&b);
  kdp_dataset_free(&c);
}
END_TEST

/* Symmetric noise changes about frac (1 - 1/C) of the labels, and the new labels are uniform. */
START_TEST(test_noise_fraction) {
  const size_t n = 50000, C = 10;
  const double frac = 0.3;
  kdp_dataset ds = synth(n, 1, 1, 1, C, 4);
  uint8_t *old = malloc(n);
  memcpy(old, ds.labels, n);
  size_t changed = kdp_dataset_label_noise(&ds, frac, 5);
  size_t k = (size_t)llround(frac * (double)n), diff = 0;
  size_t hist[10] = {0};
  for (size_t i = 0; i < n; i++) {
    diff += ds.labels[i] != old[i];
    hist[ds.labels[i]]++;
  }
  ck_assert_uint_eq(changed, diff);
  /* each of the k re-drawn labels changes with probability 1 - 1/C: binomial mean and spread */
  double mean = (double)k * (1.0 - 1.0 / (double)C);
  double sd = sqrt((double)k * (1.0 / (double)C) * (1.0 - 1.0 / (double)C));
  ck_assert_msg(fabs((double)changed - mean) < 5 * sd, "changed %zu, expected %.0f +- %.1f",
                changed, mean, sd);
  /* labels were balanced and the noise is uniform, so classes stay balanced (multinomial spread) */
  for (size_t c = 0; c < C; c++)
    ck_assert_msg(fabs((double)hist[c] - (double)n / C) < 5 * sqrt(2.0 * (double)k * 0.09),
                  "class %zu has %zu labels", c, hist[c]);
  free(old);
  kdp_dataset_free(&ds);
}
END_TEST

/* ---- batcher -------------------------------------------------------------------------------- */

/* A dataset whose example i stores i in its two pixels (low byte, high byte), label i % 10. */
static kdp_dataset index_ds(size_t n) {
  kdp_dataset ds = synth(n, 1, 2, 1, 10, 6);
  for (size_t i = 0; i < n; i++) {
    ds.images[2 * i] = (uint8_t)(i & 255);
    ds.images[2 * i + 1] = (uint8_t)(i >> 8);
  }
  return ds;
}

/* Decodes the example indices of a batch produced with mean 0, std 1. */
static void decode(const float *x, const int32_t *y, size_t count, size_t *idx) {
  for (size_t i = 0; i < count; i++) {
    long lo = lrintf(x[2 * i] * 255.0f), hi = lrintf(x[2 * i + 1] * 255.0f);
    idx[i] = (size_t)(lo + 256 * hi);
    ck_assert_int_eq(y[i], (int32_t)(idx[i] % 10));
  }
}

/* Runs one epoch; writes the order; checks it is a permutation of [lo, hi). */
static void one_epoch(kdp_batcher *b, size_t *order, size_t lo, size_t hi) {
  size_t nb = kdp_batcher_n_batches(b), got = 0;
  float x[2 * 64];
  int32_t y[64];
  ck_assert_uint_le(b->batch, 64);
  for (size_t k = 0; k < nb; k++) {
    size_t c = kdp_batcher_next(b, x, y);
    ck_assert_uint_eq(c, k + 1 < nb || b->drop_last ? b->batch : (hi - lo) - k * b->batch);
    decode(x, y, c, order + got);
    got += c;
  }
  size_t want = b->drop_last ? nb * b->batch : hi - lo;
  ck_assert_uint_eq(got, want);
  char *seen = calloc(hi, 1);
  for (size_t i = 0; i < got; i++) {
    ck_assert_msg(order[i] >= lo && order[i] < hi, "example %zu outside [%zu, %zu)", order[i], lo,
                  hi);
    ck_assert_msg(!seen[order[i]], "example %zu twice in one epoch", order[i]);
    seen[order[i]] = 1;
  }
  free(seen);
}

START_TEST(test_batcher_permutation) {
  const size_t n = 300;
  kdp_dataset ds = index_ds(n);
  kdp_batcher a, b, c;
  kdp_batcher_init(&a, &ds, 32, 42, 1, 0);
  kdp_batcher_init(&b, &ds, 32, 42, 1, 0);
  kdp_batcher_init(&c, &ds, 32, 43, 1, 0);
  ck_assert_uint_eq(kdp_batcher_n_batches(&a), 10);
  size_t oa[3][300], ob[300], oc[300];
  for (int e = 0; e < 3; e++) {
    one_epoch(&a, oa[e], 0, n);
    ck_assert_int_eq(a.epoch, e + 1);
    one_epoch(&b, ob, 0, n);
    ck_assert_mem_eq(oa[e], ob, sizeof ob); /* same seed, same order */
    one_epoch(&c, oc, 0, n);
    ck_assert_int_ne(memcmp(oa[e], oc, sizeof oc), 0); /* another seed, another order */
  }
  ck_assert_int_ne(memcmp(oa[0], oa[1], sizeof ob), 0); /* epochs differ */
  ck_assert_int_ne(memcmp(oa[1], oa[2], sizeof ob), 0);
  /* the order is shuffled, not the identity */
  size_t fixed = 0;
  for (size_t i = 0; i < n; i++) fixed += oa[0][i] == i;
  ck_assert_uint_lt(fixed, 20);
  kdp_batcher_free(&a);
  kdp_batcher_free(&b);
  kdp_batcher_free(&c);
  kdp_dataset_free(&ds);
}
END_TEST

/* The shuffle is uniform: over many epochs every example lands in every slot about equally often
   (a biased Fisher-Yates, e.g. Sattolo's cycles, never leaves an example in place). */
START_TEST(test_batcher_uniform) {
  const size_t n = 10, E = 2000;
  kdp_dataset ds = index_ds(n);
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, n, 5, 1, 0);
  size_t cnt[10][10] = {{0}}, o[10];
  for (size_t e = 0; e < E; e++) {
    one_epoch(&b, o, 0, n);
    for (size_t s = 0; s < n; s++) cnt[o[s]][s]++;
  }
  double mean = (double)E / (double)n, sd = sqrt((double)E * 0.1 * 0.9);
  for (size_t i = 0; i < n; i++)
    for (size_t s = 0; s < n; s++)
      ck_assert_msg(fabs((double)cnt[i][s] - mean) < 5 * sd,
                    "example %zu in slot %zu %zu times of %zu epochs", i, s, cnt[i][s], E);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_batcher_no_shuffle_drop_last) {
  const size_t n = 103;
  kdp_dataset ds = index_ds(n);
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, 10, 7, 0, 1);
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 10);
  size_t o[103];
  for (int e = 0; e < 2; e++) {
    one_epoch(&b, o, 0, n);
    for (size_t i = 0; i < 100; i++) ck_assert_uint_eq(o[i], i);
  }
  kdp_batcher_free(&b);
  kdp_batcher_init(&b, &ds, 10, 7, 1, 1);
  one_epoch(&b, o, 0, n); /* 100 distinct of 103, all full batches */
  one_epoch(&b, o, 0, n);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_batcher_shard) {
  const size_t n = 120;
  kdp_dataset ds = index_ds(n);
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, 16, 9, 1, 0);
  kdp_batcher_set_shard(&b, 30, 70);
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 3);
  size_t o1[40], o2[40];
  one_epoch(&b, o1, 30, 70);
  one_epoch(&b, o2, 30, 70);
  ck_assert_int_ne(memcmp(o1, o2, sizeof o1), 0);
  /* disjoint shards cover the set; a new shard starts a new epoch, also from mid-epoch */
  float xb[2 * 16];
  int32_t yb[16];
  ck_assert_uint_eq(kdp_batcher_next(&b, xb, yb), 16);
  ck_assert_uint_eq(b.pos, 16);
  int64_t e0 = b.epoch;
  kdp_batcher_set_shard(&b, 70, 500);
  ck_assert_uint_eq(b.hi, n);
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 4);
  size_t o3[50];
  one_epoch(&b, o3, 70, n);
  ck_assert_int_eq(b.epoch, e0 + 1);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}
END_TEST

/* Exact resume: snapshot (epoch, pos, aug_rng) before every step of a run with augmentation, then
   a fresh batcher seeked to a snapshot reproduces the rest of the stream bit for bit. */
static void check_seek(int drop_last) {
  const size_t n = 23, H = 4, W = 4, C = 3, B = 5, S = 30, isz = H * W * C;
  kdp_dataset ds = synth(n, H, W, C, 10, 8);
  kdp_batcher a;
  kdp_batcher_init(&a, &ds, B, 11, 1, drop_last);
  a.augment = 1;
  a.crop_pad = 1;
  a.flip = 1;
  a.mean[0] = 0.3f, a.std[0] = 0.2f;
  float *xs = calloc(S * B * isz, sizeof(float));
  int32_t ys[30 * 5];
  size_t cnt[30];
  int64_t ep[30];
  size_t pos[30];
  kdp_rng rng[30];
  for (size_t s = 0; s < S; s++) {
    ep[s] = a.epoch;
    pos[s] = a.pos;
    rng[s] = a.aug_rng;
    cnt[s] = kdp_batcher_next(&a, xs + s * B * isz, ys + s * B);
    ck_assert_uint_gt(cnt[s], 0);
  }
  const size_t at[] = {0, 1, 4, 5, 6, 13, 22, 29};
  for (size_t t = 0; t < sizeof at / sizeof *at; t++) {
    size_t k = at[t];
    kdp_batcher b;
    kdp_batcher_init(&b, &ds, B, 11, 1, drop_last);
    b.augment = 1;
    b.crop_pad = 1;
    b.flip = 1;
    b.mean[0] = 0.3f, b.std[0] = 0.2f;
    kdp_batcher_seek(&b, ep[k], pos[k]);
    b.aug_rng = rng[k];
    float x[5 * 4 * 4 * 3];
    int32_t y[5];
    for (size_t s = k; s < S; s++) {
      size_t c = kdp_batcher_next(&b, x, y);
      ck_assert_uint_eq(c, cnt[s]);
      ck_assert_msg(memcmp(x, xs + s * B * isz, c * isz * sizeof(float)) == 0,
                    "resume at step %zu: images differ at step %zu", k, s);
      ck_assert_mem_eq(y, ys + s * B, c * sizeof(int32_t));
    }
    kdp_batcher_free(&b);
  }
  free(xs);
  kdp_batcher_free(&a);
  kdp_dataset_free(&ds);
}

START_TEST(test_batcher_seek) {
  check_seek(0);
  check_seek(1);
}
END_TEST

/* kdp_batcher_next_rows: rows [lo, hi) and every label bitwise as kdp_batcher_next gives them,
   the other rows untouched, and the batcher's state (position, augmentation stream) the same
   after every batch: plain and augmented, a partial last batch, an empty range */
START_TEST(test_batcher_rows) {
  const size_t n = 23, H = 4, W = 4, C = 3, B = 5, isz = H * W * C;
  kdp_dataset ds = synth(n, H, W, C, 10, 9);
  for (int aug = 0; aug < 2; aug++) {
    kdp_batcher a, b;
    kdp_batcher_init(&a, &ds, B, 12, 1, 0);
    kdp_batcher_init(&b, &ds, B, 12, 1, 0);
    a.augment = b.augment = aug;
    a.crop_pad = b.crop_pad = 1;
    a.flip = b.flip = 1;
    a.mean[0] = b.mean[0] = 0.3f, a.std[0] = b.std[0] = 0.2f;
    for (size_t s = 0; s < 20; s++) {
      float xa[5 * 48], xb[5 * 48];
      int32_t ya[5], yb[5];
      size_t lo = s % 4, hi = lo + s % 3; /* hi may pass the batch's end */
      for (size_t k = 0; k < B * isz; k++) xb[k] = -7.0f;
      size_t peek = kdp_batcher_peek(&b);
      size_t ca = kdp_batcher_next(&a, xa, ya), cb = kdp_batcher_next_rows(&b, xb, yb, lo, hi);
      ck_assert_uint_eq(ca, cb);
      ck_assert_uint_eq(peek, cb);
      ck_assert_mem_eq(ya, yb, ca * sizeof(int32_t));
      for (size_t r = 0; r < B; r++) {
        int mine = r >= lo && r < hi && r < ca;
        for (size_t k = 0; k < isz; k++)
          ck_assert_msg(mine ? memcmp(&xa[r * isz + k], &xb[r * isz + k], sizeof(float)) == 0
                             : xb[r * isz + k] == -7.0f,
                        "augment %d, batch %zu, row %zu", aug, s, r);
      }
      ck_assert_int_eq(a.epoch, b.epoch);
      ck_assert_uint_eq(a.pos, b.pos);
      ck_assert_uint_eq(kdp_rng_u32(&a.aug_rng), kdp_rng_u32(&b.aug_rng));
    }
    kdp_batcher_free(&a);
    kdp_batcher_free(&b);
  }
  kdp_dataset_free(&ds);
}
END_TEST

/* one channel: every pixel value gives torchvision's float32 (u / 255 - mean) / std exactly (the
   batcher computes it per pixel instead of from the table the other paths use) */
START_TEST(test_normalise_gray) {
  const size_t n = 4, H = 8, W = 8, isz = H * W;
  kdp_dataset ds = synth(n, H, W, 1, 10, 3);
  for (size_t i = 0; i < n * isz; i++) ds.images[i] = (uint8_t)(i & 255);
  const float mean = 0.2860f, sd = 0.3530f;
  float *x = calloc(n * isz, sizeof(float)), *xa = calloc(n * isz, sizeof(float));
  int32_t y[4];
  kdp_dataset_get(&ds, 0, n, &mean, &sd, x, y);
  for (size_t i = 0; i < n * isz; i++) {
    float want = ((float)ds.images[i] / 255.0f - mean) / sd;
    ck_assert_msg(memcmp(&x[i], &want, sizeof want) == 0, "pixel %u: %.9g, float32 gives %.9g",
                  ds.images[i], (double)x[i], (double)want);
  }
  /* the augmenting path (table lookups) agrees bitwise where it copies (flip only, no crop) */
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, n, 1, 0, 0);
  b.mean[0] = mean;
  b.std[0] = sd;
  b.augment = 1;
  b.flip = 1;
  b.crop_pad = 0;
  ck_assert_uint_eq(kdp_batcher_next(&b, xa, y), n);
  for (size_t i = 0; i < n; i++)
    for (size_t r = 0; r < H; r++)
      for (size_t c = 0; c < W; c++) {
        const float *row = x + i * isz + r * W;
        float a = xa[i * isz + r * W + c];
        ck_assert_msg(a == row[c] || a == row[W - 1 - c],
                      "image %zu (%zu, %zu): %g is neither the pixel nor its mirror", i, r, c,
                      (double)a);
      }
  kdp_batcher_free(&b);
  free(x);
  free(xa);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_normalise) {
  const size_t n = 7, H = 3, W = 5, C = 3, isz = H * W * C;
  kdp_dataset ds = synth(n, H, W, C, 10, 9);
  ds.images[0] = 0;
  ds.images[1] = 255;
  const float mean[3] = {0.4914f, 0.4822f, 0.4465f}, std[3] = {0.2470f, 0.2435f, 0.2616f};
  float *want = calloc(n * isz, sizeof(float)), *plain = calloc(n * isz, sizeof(float));
  for (size_t i = 0; i < n * isz; i++) {
    size_t c = i % C;
    want[i] = (float)(((double)ds.images[i] / 255.0 - mean[c]) / std[c]);
    plain[i] = (float)((double)ds.images[i] / 255.0);
  }
  float *x = calloc(n * isz, sizeof(float));
  int32_t y[7];
  kdp_dataset_get(&ds, 0, n, mean, std, x, y);
  kdp_test_assert_close("dataset_get", x, want, n * isz, 1e-6, 1e-6);
  for (size_t i = 0; i < n; i++) ck_assert_int_eq(y[i], (int32_t)ds.labels[i]);
  kdp_dataset_get(&ds, 2, 3, NULL, NULL, x, y);
  kdp_test_assert_close("dataset_get no norm", x, plain + 2 * isz, 3 * isz, 1e-7, 1e-6);
  ck_assert_int_eq(y[0], (int32_t)ds.labels[2]);
  /* the batcher without shuffling gives the same values */
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, n, 1, 0, 0);
  for (int c = 0; c < 3; c++) {
    ck_assert(b.mean[c] == 0.0f && b.std[c] == 1.0f && !b.augment);
    b.mean[c] = mean[c];
    b.std[c] = std[c];
  }
  memset(x, 0, n * isz * sizeof(float));
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), n);
  kdp_test_assert_close("batcher", x, want, n * isz, 1e-6, 1e-6);
  kdp_batcher_free(&b);
  free(x);
  free(want);
  free(plain);
  kdp_dataset_free(&ds);
}
END_TEST

/* Which (oy, ox, flip) explains an augmented image? out(y, x) = src(y + oy - p, x' + ox - p) with
   x' = W-1-x if flipped, and padded pixels = the normalised 0. Returns the candidate index
   (oy * (2p+1) + ox) * 2 + flip, or -1. */
static int explain(const float *out, const uint8_t *src, size_t H, size_t W, size_t C, size_t p,
                   const float *mean, const float *std, int *padded) {
  size_t K = 2 * p + 1;
  for (size_t oy = 0; oy < K; oy++)
    for (size_t ox = 0; ox < K; ox++)
      for (int fl = 0; fl < 2; fl++) {
        int ok = 1, pads = 0;
        for (size_t y = 0; y < H && ok; y++)
          for (size_t x = 0; x < W && ok; x++)
            for (size_t c = 0; c < C && ok; c++) {
              long sy = (long)y + (long)oy - (long)p;
              long sx = (long)(fl ? W - 1 - x : x) + (long)ox - (long)p;
              double v = 0;
              if (sy >= 0 && sy < (long)H && sx >= 0 && sx < (long)W)
                v = src[((size_t)sy * W + (size_t)sx) * C + c];
              else
                pads++;
              double e = (v / 255.0 - mean[c]) / std[c];
              ok = fabs(out[(y * W + x) * C + c] - e) < 1e-5;
            }
        if (ok) {
          *padded = pads;
          return (int)((oy * K + ox) * 2 + (size_t)fl);
        }
      }
  return -1;
}

/* n copies of one image with distinct non-zero pixels, through the batcher with augmentation. */
static void run_aug(size_t pad, int flip, size_t n, int *hist, size_t nhist, int *any_pad) {
  const size_t H = 6, W = 5, C = 3;
  kdp_dataset ds = synth(n, H, W, C, 10, 10);
  for (size_t i = 0; i < n; i++)
    for (size_t p = 0; p < H * W * C; p++) ds.images[i * H * W * C + p] = (uint8_t)(10 + 2 * p);
  const float mean[3] = {0.5f, 0.25f, 0.125f}, std[3] = {0.25f, 0.5f, 2.0f};
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, n, 12, 1, 0);
  b.augment = 1;
  b.crop_pad = pad;
  b.flip = flip;
  for (int c = 0; c < 3; c++) b.mean[c] = mean[c], b.std[c] = std[c];
  float *x = calloc(n * H * W * C, sizeof(float));
  int32_t *y = calloc(n, sizeof(int32_t));
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), n);
  *any_pad = 0;
  for (size_t i = 0; i < n; i++) {
    const float *o = x + i * H * W * C;
    int padded = 0;
    int k = explain(o, ds.images, H, W, C, pad, mean, std, &padded);
    ck_assert_msg(k >= 0, "augmented image %zu is no crop/flip of the source", i);
    ck_assert_uint_lt((size_t)k, nhist);
    hist[k]++;
    /* explain() already required padded pixels to equal (0 - mean[c]) / std[c] */
    if (padded) *any_pad = 1;
  }
  free(x);
  free(y);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}

START_TEST(test_aug_flip) {
  int hist[2] = {0, 0}, any_pad;
  run_aug(0, 1, 400, hist, 2, &any_pad);
  ck_assert_int_eq(any_pad, 0);
  /* p = 0.5: binomial(400, 0.5) has sd 10 */
  ck_assert_msg(abs(hist[1] - 200) < 50, "flipped %d of 400", hist[1]);
  /* without flip nothing is mirrored */
  int h2[2] = {0, 0};
  run_aug(0, 0, 50, h2, 2, &any_pad);
  ck_assert_int_eq(h2[0], 50);
}
END_TEST

START_TEST(test_aug_crop) {
  const size_t pad = 2, K = 2 * pad + 1;
  int hist[2 * 25] = {0}, any_pad = 0;
  run_aug(pad, 0, 500, hist, 2 * K * K, &any_pad);
  ck_assert_int_eq(any_pad, 1);
  /* every offset in [0, 2 pad]^2 occurs, none flipped */
  for (size_t k = 0; k < K * K; k++) {
    ck_assert_msg(hist[2 * k] > 0, "offset (%zu, %zu) never drawn", k / K, k % K);
    ck_assert_int_eq(hist[2 * k + 1], 0);
  }
  /* crop and flip together: all 50 combinations occur */
  int h2[2 * 25] = {0};
  run_aug(pad, 1, 1000, h2, 2 * K * K, &any_pad);
  for (size_t k = 0; k < 2 * K * K; k++) ck_assert_msg(h2[k] > 0, "combination %zu never drawn", k);
}
END_TEST

/* A known image, by hand: the 1x3 image [10 20 30] flips to [30 20 10]. */
START_TEST(test_aug_known) {
  kdp_dataset ds = synth(1, 1, 3, 1, 10, 1);
  ds.images[0] = 10, ds.images[1] = 20, ds.images[2] = 30;
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, 1, 3, 0, 0);
  b.augment = 1;
  b.flip = 1;
  b.crop_pad = 0;
  int saw_flip = 0, saw_plain = 0;
  for (int t = 0; t < 64; t++) {
    float x[3];
    int32_t y;
    kdp_batcher_next(&b, x, &y);
    long v0 = lrintf(x[0] * 255), v1 = lrintf(x[1] * 255), v2 = lrintf(x[2] * 255);
    ck_assert_int_eq(v1, 20);
    if (v0 == 30 && v2 == 10) saw_flip = 1;
    else if (v0 == 10 && v2 == 30) saw_plain = 1;
    else ck_abort_msg("unexpected pixels %ld %ld %ld", v0, v1, v2);
  }
  ck_assert(saw_flip && saw_plain);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}
END_TEST

START_TEST(test_batcher_limits) {
  kdp_dataset ds = index_ds(10);
  float x[2 * 32];
  int32_t y[32];
  kdp_batcher b;
  kdp_batcher_init(&b, &ds, 16, 1, 1, 1); /* drop_last and batch > n: no batch at all */
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 0);
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), 0);
  kdp_batcher_free(&b);
  kdp_batcher_init(&b, &ds, 16, 1, 1, 0); /* one partial batch per epoch */
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 1);
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), 10);
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), 10);
  ck_assert_int_eq(b.epoch, 2);
  kdp_batcher_set_shard(&b, 5, 5); /* empty shard */
  ck_assert_uint_eq(kdp_batcher_n_batches(&b), 0);
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), 0);
  kdp_batcher_free(&b);
  kdp_batcher_init(&b, &ds, 0, 1, 1, 0);
  ck_assert_uint_eq(kdp_batcher_next(&b, x, y), 0);
  kdp_batcher_free(&b);
  kdp_dataset_free(&ds);
}
END_TEST

/* ---- the real Fashion-MNIST, when installed ------------------------------------------------- */

#define FMNIST "/usr/share/datasets/fashion-mnist"

/* Every gzread call of the library passes through here: tests/meson.build links this suite with
   -Wl,--wrap=gzread. The counts show how a file was read (one pass of large reads) whatever the
   machine's speed, where a time limit would only say how busy the machine was. */
int __real_gzread(gzFile f, voidp buf, unsigned len);
int __wrap_gzread(gzFile f, voidp buf, unsigned len);
static size_t gzread_calls;
static uint64_t gzread_bytes;
int __wrap_gzread(gzFile f, voidp buf, unsigned len) {
  int r = __real_gzread(f, buf, len);
  gzread_calls++;
  if (r > 0) gzread_bytes += (uint64_t)r;
  return r;
}

START_TEST(test_fashion_mnist) {
  if (access(FMNIST "/train-images-idx3-ubyte.gz", R_OK) != 0) {
    fprintf(stderr, "test_fashion_mnist: %s not installed, skipped\n", FMNIST);
    return;
  }
  const char *split[2] = {"train", "t10k"};
  const size_t want_n[2] = {60000, 10000};
  for (int s = 0; s < 2; s++) {
    char ip[256], lp[256];
    snprintf(ip, sizeof ip, FMNIST "/%s-images-idx3-ubyte.gz", split[s]);
    snprintf(lp, sizeof lp, FMNIST "/%s-labels-idx1-ubyte.gz", split[s]);
    kdp_dataset ds;
    kdp_error err = {{0}};
    gzread_calls = 0;
    gzread_bytes = 0;
    double t0 = kdp_now();
    ck_assert_msg(kdp_idx_load(&ds, ip, lp, &err) == 0, "%s", err.msg);
    double dt = kdp_now() - t0;
    fprintf(stderr, "fashion-mnist %s: %zu images loaded in %.3f s, %zu gzread calls\n", split[s],
            ds.n, dt, gzread_calls);
    ck_assert_uint_eq(ds.n, want_n[s]);
    /* one pass in large reads (what keeps loading well under a second on an idle core): every
       byte of the two files (16- and 8-byte headers, pixels, labels) decompressed exactly once,
       in a handful of calls per 16 MiB (magic, dimensions, the payload's chunks, the probe of the
       stream's end; the pixels of the training set are 45 MiB) */
    ck_assert_uint_eq(gzread_bytes, 16 + 784 * (uint64_t)ds.n + 8 + ds.n);
    const size_t chunks = (784 * ds.n >> 24) + 1;
    ck_assert_msg(gzread_calls <= 2 * chunks + 8, "%zu gzread calls for %zu chunks of 16 MiB",
                  gzread_calls, chunks);
    ck_assert_uint_eq(ds.H, 28);
    ck_assert_uint_eq(ds.W, 28);
    ck_assert_uint_eq(ds.C, 1);
    ck_assert_uint_eq(ds.n_classes, 10);
    size_t hist[10] = {0};
    for (size_t i = 0; i < ds.n; i++) hist[ds.labels[i]]++;
    for (int c = 0; c < 10; c++) ck_assert_uint_eq(hist[c], want_n[s] / 10);
    /* real images: not all black, full intensity range used */
    uint8_t mx = 0;
    for (size_t i = 0; i < 784; i++) mx = ds.images[i] > mx ? ds.images[i] : mx;
    ck_assert_uint_gt(mx, 200);
    kdp_dataset_free(&ds);
  }
}
END_TEST

/* a gzip file whose header promises ~12 GB of pixels but holds a few bytes is reported as
   truncated without first allocating what the header claims (found by fuzz_idx) */
START_TEST(test_idx_gz_huge_header) {
  /* 2 GiB address space (forked test); not under AddressSanitizer, whose shadow memory alone
     reserves terabytes of address space (the release run checks the limit) */
#if !defined(__SANITIZE_ADDRESS__)
  struct rlimit rl = {(rlim_t)2 << 30, (rlim_t)2 << 30};
  ck_assert_int_eq(setrlimit(RLIMIT_AS, &rl), 0);
#endif
  uint8_t img[16 + 64] = {0}, lab[8 + 4] = {0};
  put_be32(img, 0x803);
  put_be32(img + 4, 15000000); /* 15M images of 28x28: 11.8 GB */
  put_be32(img + 8, 28);
  put_be32(img + 12, 28);
  put_be32(lab, 0x801);
  put_be32(lab + 4, 4);
  const char *pi = write_bytes("huge-img.gz", img, sizeof img, 1);
  const char *pl = write_bytes("huge-lab.gz", lab, sizeof lab, 1);
  kdp_dataset ds;
  kdp_error err;
  int rc = kdp_idx_load(&ds, pi, pl, &err);
  ck_assert_msg(rc == KDP_EIO, "expected KDP_EIO (truncated), got %d: %s", rc, err.msg);
  ck_assert_msg(strstr(err.msg, "truncated") != NULL, "message: %s", err.msg);
}
END_TEST

static Suite *data_suite(void) {
  Suite *s = suite_create("data");
  TCase *core = kdp_test_case("core");
  tcase_add_checked_fixture(core, setup, teardown);
  tcase_add_test(core, test_idx_raw);
  tcase_add_test(core, test_idx_gz);
  tcase_add_test(core, test_idx_detect_by_content);
  tcase_add_test(core, test_cifar10);
  tcase_add_test(core, test_cifar100);
  tcase_add_test(core, test_subset);
  tcase_add_test(core, test_noise_exact_count);
  tcase_add_test(core, test_noise_deterministic);
  tcase_add_test(core, test_noise_fraction);
  tcase_add_test(core, test_batcher_permutation);
  tcase_add_test(core, test_batcher_uniform);
  tcase_add_test(core, test_batcher_no_shuffle_drop_last);
  tcase_add_test(core, test_batcher_shard);
  tcase_add_test(core, test_batcher_seek);
  tcase_add_test(core, test_normalise);
  tcase_add_test(core, test_normalise_gray);
  tcase_add_test(core, test_aug_flip);
  tcase_add_test(core, test_aug_crop);
  tcase_add_test(core, test_aug_known);
  tcase_add_test(core, test_fashion_mnist);
  suite_add_tcase(s, core);
  TCase *limits = kdp_test_case("limits");
  tcase_add_checked_fixture(limits, setup, teardown);
  tcase_add_test(limits, test_idx_missing);
  tcase_add_test(limits, test_idx_gz_huge_header);
  tcase_add_test(limits, test_idx_bad_magic);
  tcase_add_test(limits, test_idx_swapped);
  tcase_add_test(limits, test_idx_truncated_images);
  tcase_add_test(limits, test_idx_truncated_labels);
  tcase_add_test(limits, test_idx_count_mismatch);
  tcase_add_test(limits, test_idx_label_range);
  tcase_add_test(limits, test_idx_absurd_dims);
  tcase_add_test(limits, test_cifar_limits);
  tcase_add_test(limits, test_batcher_limits);
  tcase_add_test(limits, test_batcher_rows);
  suite_add_tcase(s, limits);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(data_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
