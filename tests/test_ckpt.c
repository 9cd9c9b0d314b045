/* test_ckpt.c: checkpoint files (round trip, corruption, truncation, caps) and step directories
   (manifest, find_latest, prune, atomic commit). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "../src/train/train_internal.h" /* kdp_ckpt_compare_configs */
#include "kdpeers/ckpt.h"
#include "kdpeers/config.h"
#include "testutil.h"

/* ---- helpers ---- */
static int rm_cb(const char *p, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(p);
}
static void rm_rf(const char *dir) { nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

static int exists(const char *p) {
  struct stat st;
  return stat(p, &st) == 0;
}

static long long file_size(const char *p) {
  struct stat st;
  ck_assert_msg(stat(p, &st) == 0, "stat %s: %s", p, strerror(errno));
  return (long long)st.st_size;
}

static uint8_t *slurp(const char *p, size_t *len) {
  return (uint8_t *)kdp_test_read_file(p, len);
}

static void spit(const char *p, const void *b, size_t n) {
  FILE *f = fopen(p, "wb");
  ck_assert_msg(f != NULL, "create %s", p);
  ck_assert(fwrite(b, 1, n, f) == n);
  ck_assert(fclose(f) == 0);
}

static size_t count_dir(const char *dir) {
  size_t n = 0;
  DIR *d = opendir(dir);
  ck_assert_msg(d != NULL, "opendir %s", dir);
  struct dirent *de;
  while ((de = readdir(d)) != NULL)
    if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) n++;
  closedir(d);
  return n;
}

/* Asserts call returns 0; the enclosing scope has a kdp_error named err. */
#define CK_OK(call)                                               \
  do {                                                            \
    int rc_ = (call);                                             \
    ck_assert_msg(rc_ == 0, "%s -> %d: %s", #call, rc_, err.msg); \
  } while (0)

/* A small file holding one entry of every type. */
static void write_small(const char *path, uint32_t *crc) {
  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  CK_OK(kdp_ckpt_put_i64(w, "i", -123456789012345LL, &err));
  CK_OK(kdp_ckpt_put_u64(w, "u", 18446744073709551615ULL, &err));
  CK_OK(kdp_ckpt_put_f64(w, "f", 3.25, &err));
  CK_OK(kdp_ckpt_put_str(w, "s", "hello checkpoint", &err));
  const uint8_t bin[5] = {0, 1, 2, 0xff, 0};
  CK_OK(kdp_ckpt_put_bin(w, "b", bin, sizeof bin, &err));
  const float t[6] = {1, -2, 3.5f, 0, 1e-30f, -7};
  const size_t dims[2] = {2, 3};
  CK_OK(kdp_ckpt_put_f32(w, "t", t, 2, dims, &err));
  CK_OK(kdp_ckpt_writer_commit(w, crc, &err));
}

/* Writes peer files and (optionally) the manifest of one step. */
static void write_step(const char *run, int64_t step, int n_peers, int manifest) {
  kdp_error err = {{0}};
  uint32_t crcs[16];
  char path[4096];
  for (int p = 0; p < n_peers; p++) {
    ck_assert_int_eq(kdp_ckpt_peer_path(run, step, p, path, sizeof path), 0);
    kdp_ckpt_writer *w;
    CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
    CK_OK(kdp_ckpt_put_i64(w, "step", step, &err));
    CK_OK(kdp_ckpt_put_i64(w, "peer", p, &err));
    float params[100];
    for (int i = 0; i < 100; i++) params[i] = (float)(step + p + i);
    size_t d = 100;
    CK_OK(kdp_ckpt_put_f32(w, "params", params, 1, &d, &err));
    CK_OK(kdp_ckpt_writer_commit(w, &crcs[p], &err));
  }
  if (manifest) CK_OK(kdp_ckpt_write_manifest(run, step, n_peers, crcs, &err));
}

static void flip_byte(const char *path, long off, uint8_t mask) {
  size_t n;
  uint8_t *b = slurp(path, &n);
  ck_assert((size_t)off < n);
  b[off] ^= mask;
  spit(path, b, n);
  free(b);
}

/* Raw file: header with version, body bytes, valid trailer (crc over header + body). */
static uint8_t *craft(unsigned version, const char *kind, const void *body, size_t body_len,
                      size_t *out_len) {
  msgpack_sbuffer sb;
  msgpack_sbuffer_init(&sb);
  msgpack_packer pk;
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_str_with_body(&pk, "KDPCKPT", 7);
  msgpack_pack_unsigned_int(&pk, version);
  msgpack_pack_str_with_body(&pk, kind, strlen(kind));
  msgpack_sbuffer_write(&sb, body, body_len);
  uint32_t crc = (uint32_t)crc32(0, (const Bytef *)sb.data, (uInt)sb.size);
  msgpack_pack_str_with_body(&pk, "crc32", 5);
  msgpack_pack_unsigned_int(&pk, 7);
  msgpack_pack_fix_uint32(&pk, crc);
  uint8_t *b = malloc(sb.size);
  memcpy(b, sb.data, sb.size);
  *out_len = sb.size;
  msgpack_sbuffer_destroy(&sb);
  return b;
}

/* ---- core ---- */
START_TEST(test_roundtrip_all_types) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/sub/dir/model.kdpc", dir); /* parents created (mkdir -p) */
  const size_t N = 1000 * 1000;
  float *big = malloc(N * sizeof *big);
  kdp_rng r;
  kdp_rng_seed(&r, 7, 1);
  for (size_t i = 0; i < N; i++) big[i] = kdp_rng_normal(&r) * 100.0f;
  big[17] = -0.0f;
  big[18] = INFINITY;
  const size_t bdims[2] = {1000, 1000};
  const size_t zdims[2] = {0, 5};
  const float scalar = 2.5f;
  uint8_t bin[300];
  for (int i = 0; i < 300; i++) bin[i] = (uint8_t)(i * 7);

  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  uint32_t commit_crc = 0;
  CK_OK(kdp_ckpt_writer_open(&w, path, "model", &err));
  CK_OK(kdp_ckpt_put_i64(w, "i.min", INT64_MIN, &err));
  CK_OK(kdp_ckpt_put_i64(w, "i.max", INT64_MAX, &err));
  CK_OK(kdp_ckpt_put_i64(w, "i.small", 5, &err));
  CK_OK(kdp_ckpt_put_u64(w, "u.max", UINT64_MAX, &err));
  CK_OK(kdp_ckpt_put_u64(w, "u.zero", 0, &err));
  CK_OK(kdp_ckpt_put_f64(w, "f.pi", 3.14159265358979311599796346854, &err));
  CK_OK(kdp_ckpt_put_f64(w, "f.negzero", -0.0, &err));
  CK_OK(kdp_ckpt_put_f64(w, "f.tiny", 4.9406564584124654e-324, &err));
  CK_OK(kdp_ckpt_put_str(w, "s.empty", "", &err));
  CK_OK(kdp_ckpt_put_str(w, "s.utf8", "r\xc3\xa9sum\xc3\xa9 \xe2\x9c\x93", &err));
  CK_OK(kdp_ckpt_put_bin(w, "b.data", bin, sizeof bin, &err));
  CK_OK(kdp_ckpt_put_bin(w, "b.empty", NULL, 0, &err));
  CK_OK(kdp_ckpt_put_f32(w, "t.big", big, 2, bdims, &err));
  CK_OK(kdp_ckpt_put_f32(w, "t.scalar", &scalar, 0, NULL, &err));
  CK_OK(kdp_ckpt_put_f32(w, "t.empty", NULL, 2, zdims, &err));
  CK_OK(kdp_ckpt_writer_commit(w, &commit_crc, &err));

  kdp_ckpt *ck = NULL;
  CK_OK(kdp_ckpt_read(path, (size_t)64 << 20, &ck, &err));
  ck_assert_str_eq(kdp_ckpt_kind(ck), "model");
  ck_assert_uint_eq(kdp_ckpt_version(ck), 1);
  ck_assert_uint_eq(kdp_ckpt_count(ck), 15);
  int64_t i64;
  uint64_t u64;
  double f64;
  const char *s;
  CK_OK(kdp_ckpt_get_i64(ck, "i.min", &i64, &err));
  ck_assert(i64 == INT64_MIN);
  CK_OK(kdp_ckpt_get_i64(ck, "i.max", &i64, &err));
  ck_assert(i64 == INT64_MAX);
  CK_OK(kdp_ckpt_get_i64(ck, "i.small", &i64, &err));
  ck_assert(i64 == 5);
  CK_OK(kdp_ckpt_get_u64(ck, "u.max", &u64, &err));
  ck_assert(u64 == UINT64_MAX);
  CK_OK(kdp_ckpt_get_u64(ck, "u.zero", &u64, &err));
  ck_assert(u64 == 0);
  CK_OK(kdp_ckpt_get_f64(ck, "f.pi", &f64, &err));
  ck_assert(f64 == 3.14159265358979311599796346854);
  CK_OK(kdp_ckpt_get_f64(ck, "f.negzero", &f64, &err));
  ck_assert(f64 == 0.0 && signbit(f64));
  CK_OK(kdp_ckpt_get_f64(ck, "f.tiny", &f64, &err));
  ck_assert(f64 == 4.9406564584124654e-324);
  CK_OK(kdp_ckpt_get_str(ck, "s.empty", &s, &err));
  ck_assert_str_eq(s, "");
  CK_OK(kdp_ckpt_get_str(ck, "s.utf8", &s, &err));
  ck_assert_str_eq(s, "r\xc3\xa9sum\xc3\xa9 \xe2\x9c\x93");
  const void *bp;
  size_t blen;
  CK_OK(kdp_ckpt_get_bin(ck, "b.data", &bp, &blen, &err));
  ck_assert_uint_eq(blen, sizeof bin);
  ck_assert(memcmp(bp, bin, sizeof bin) == 0);
  CK_OK(kdp_ckpt_get_bin(ck, "b.empty", &bp, &blen, &err));
  ck_assert_uint_eq(blen, 0);
  float *back = malloc(N * sizeof *back);
  CK_OK(kdp_ckpt_get_f32(ck, "t.big", back, N, &err));
  ck_assert(memcmp(back, big, N * sizeof *big) == 0); /* bitwise, -0 and inf included */
  float sc = 0;
  CK_OK(kdp_ckpt_get_f32(ck, "t.scalar", &sc, 1, &err));
  ck_assert(sc == 2.5f);
  CK_OK(kdp_ckpt_get_f32(ck, "t.empty", NULL, 0, &err));

  kdp_ckpt_info in;
  CK_OK(kdp_ckpt_info_of(ck, "t.big", &in, &err));
  ck_assert_int_eq(in.type, KDP_CKPT_F32);
  ck_assert_uint_eq(in.ndim, 2);
  ck_assert(in.dims[0] == 1000 && in.dims[1] == 1000);
  ck_assert_uint_eq(in.count, N);
  ck_assert_uint_eq(in.bytes, 4 * N);
  CK_OK(kdp_ckpt_info_of(ck, "t.empty", &in, &err));
  ck_assert(in.ndim == 2 && in.dims[0] == 0 && in.dims[1] == 5 && in.count == 0);
  /* iteration keeps file order */
  const char *order[] = {"i.min", "i.max", "i.small", "u.max", "u.zero", "f.pi", "f.negzero",
                         "f.tiny", "s.empty", "s.utf8", "b.data", "b.empty", "t.big", "t.scalar",
                         "t.empty"};
  for (size_t i = 0; i < 15; i++) {
    ck_assert_int_eq(kdp_ckpt_entry(ck, i, &in), 0);
    ck_assert_str_eq(in.name, order[i]);
  }
  ck_assert_int_ne(kdp_ckpt_entry(ck, 15, &in), 0);

  /* the embedded crc covers everything before the 12-byte trailer; commit returns the crc of
     the whole file, the value a manifest records */
  size_t flen;
  uint8_t *raw = slurp(path, &flen);
  uLong body = crc32(0, Z_NULL, 0), whole = crc32(0, Z_NULL, 0);
  body = crc32_z(body, raw, flen - 12);
  whole = crc32_z(whole, raw, flen);
  ck_assert_uint_eq(kdp_ckpt_crc(ck), (uint32_t)body);
  ck_assert_uint_eq(commit_crc, (uint32_t)whole);
  uint64_t fsz;
  uint32_t fcrc;
  CK_OK(kdp_ckpt_file_crc(path, &fsz, &fcrc, &err));
  ck_assert_uint_eq(fsz, flen);
  ck_assert_uint_eq(fcrc, commit_crc);
  /* the float data is stored little endian in the file */
  ck_assert_uint_eq(flen, (size_t)file_size(path));

  /* parse_buffer agrees with read */
  kdp_ckpt *ck2 = NULL;
  CK_OK(kdp_ckpt_parse_buffer(raw, flen, flen, &ck2, &err));
  ck_assert_uint_eq(kdp_ckpt_count(ck2), 15);
  ck_assert_uint_eq(kdp_ckpt_crc(ck2), kdp_ckpt_crc(ck));
  kdp_ckpt_free(ck2);

  free(raw);
  free(back);
  free(big);
  kdp_ckpt_free(ck);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_float_bytes_little_endian) {
  /* dtype and byte order are part of the format: check the bytes of a known value */
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/x.kdpc", dir);
  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  const float v[2] = {1.0f, -2.0f}; /* 0x3f800000, 0xc0000000 */
  const size_t d = 2;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  CK_OK(kdp_ckpt_put_f32(w, "v", v, 1, &d, &err));
  CK_OK(kdp_ckpt_writer_commit(w, NULL, &err));
  size_t n;
  uint8_t *b = slurp(path, &n);
  const uint8_t want[10] = {0xc4, 8, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0};
  ck_assert_msg(memmem(b, n, want, sizeof want) != NULL, "little-endian float32 bytes not found");
  free(b);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_only_tmp_before_commit) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/big.kdpc", dir);
  const size_t N = 4u << 20; /* 16 MiB of floats */
  float *x = malloc(N * sizeof *x);
  for (size_t i = 0; i < N; i++) x[i] = (float)i;
  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  const char *tmp = kdp_ckpt_writer_tmp_path(w);
  char tmpcopy[4200];
  snprintf(tmpcopy, sizeof tmpcopy, "%s", tmp);
  char want_tmp[4200];
  snprintf(want_tmp, sizeof want_tmp, "%s.tmp.%ld", path, (long)getpid());
  ck_assert_str_eq(tmpcopy, want_tmp);
  ck_assert(exists(tmpcopy));
  ck_assert(!exists(path));
  CK_OK(kdp_ckpt_put_f32(w, "x", x, 1, &N, &err));
  CK_OK(kdp_ckpt_put_i64(w, "after", 1, &err));
  /* everything written, not committed: only the temp file exists */
  ck_assert(!exists(path));
  ck_assert(exists(tmpcopy));
  ck_assert_uint_eq(count_dir(dir), 1);
  uint32_t crc;
  CK_OK(kdp_ckpt_writer_commit(w, &crc, &err));
  ck_assert(exists(path));
  ck_assert(!exists(tmpcopy));
  ck_assert_uint_eq(count_dir(dir), 1);
  ck_assert_int_gt(file_size(path), (long long)(N * 4));
  kdp_ckpt *ck;
  CK_OK(kdp_ckpt_read(path, (size_t)32 << 20, &ck, &err));
  float *y = malloc(N * sizeof *y);
  CK_OK(kdp_ckpt_get_f32(ck, "x", y, N, &err));
  ck_assert(memcmp(x, y, N * 4) == 0);
  kdp_ckpt_free(ck);
  free(x);
  free(y);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_abort_leaves_nothing) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/a.kdpc", dir);
  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  CK_OK(kdp_ckpt_put_str(w, "x", "y", &err));
  ck_assert_uint_eq(count_dir(dir), 1);
  kdp_ckpt_writer_abort(w);
  ck_assert_uint_eq(count_dir(dir), 0);
  /* a failed (poisoned) writer: commit fails and also leaves nothing */
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  CK_OK(kdp_ckpt_put_i64(w, "dup", 1, &err));
  ck_assert_int_eq(kdp_ckpt_put_i64(w, "dup", 2, &err), KDP_EINVAL);
  ck_assert_msg(strstr(err.msg, "dup") != NULL, "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_put_i64(w, "other", 2, &err), KDP_EINVAL); /* poisoned */
  ck_assert_int_ne(kdp_ckpt_writer_commit(w, NULL, &err), 0);
  ck_assert_uint_eq(count_dir(dir), 0);
  kdp_ckpt_writer_abort(NULL);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_step_paths) {
  char buf[256];
  ck_assert_int_eq(kdp_ckpt_step_dir("/r", 5, buf, sizeof buf), 0);
  ck_assert_str_eq(buf, "/r/checkpoints/step-000000000005");
  ck_assert_int_eq(kdp_ckpt_peer_path("/r", 123456789012LL, 7, buf, sizeof buf), 0);
  ck_assert_str_eq(buf, "/r/checkpoints/step-123456789012/peer-007.kdpc");
  ck_assert_int_eq(kdp_ckpt_manifest_path("run", 0, buf, sizeof buf), 0);
  ck_assert_str_eq(buf, "run/checkpoints/step-000000000000/MANIFEST.kdpc");
  ck_assert_int_eq(kdp_ckpt_step_dir("/r", 5, buf, 10), KDP_EINVAL);
  ck_assert_int_eq(kdp_ckpt_step_dir("/r", -1, buf, sizeof buf), KDP_EINVAL);
  ck_assert_int_eq(kdp_ckpt_peer_path("/r", 1, -1, buf, sizeof buf), KDP_EINVAL);
}
END_TEST

START_TEST(test_manifest_contents) {
  char *run = kdp_test_tmpdir();
  write_step(run, 42, 3, 1);
  char mpath[4096], ppath[4096];
  kdp_ckpt_manifest_path(run, 42, mpath, sizeof mpath);
  kdp_error err = {{0}};
  kdp_ckpt *ck;
  CK_OK(kdp_ckpt_read(mpath, 1 << 20, &ck, &err));
  ck_assert_str_eq(kdp_ckpt_kind(ck), "manifest");
  uint64_t v;
  CK_OK(kdp_ckpt_get_u64(ck, "step", &v, &err));
  ck_assert(v == 42);
  CK_OK(kdp_ckpt_get_u64(ck, "n_peers", &v, &err));
  ck_assert(v == 3);
  for (int p = 0; p < 3; p++) {
    char key[64];
    const char *file;
    kdp_ckpt_peer_path(run, 42, p, ppath, sizeof ppath);
    uint64_t size;
    uint32_t crc;
    CK_OK(kdp_ckpt_file_crc(ppath, &size, &crc, &err));
    snprintf(key, sizeof key, "peer.%03d.file", p);
    CK_OK(kdp_ckpt_get_str(ck, key, &file, &err));
    ck_assert_str_eq(file, strrchr(ppath, '/') + 1);
    snprintf(key, sizeof key, "peer.%03d.size", p);
    CK_OK(kdp_ckpt_get_u64(ck, key, &v, &err));
    ck_assert(v == size && (long long)v == file_size(ppath));
    snprintf(key, sizeof key, "peer.%03d.crc32", p);
    CK_OK(kdp_ckpt_get_u64(ck, key, &v, &err));
    ck_assert(v == crc);
  }
  int np = 0;
  CK_OK(kdp_ckpt_verify_step(run, 42, &np, &err));
  ck_assert_int_eq(np, 3);
  kdp_ckpt_free(ck);
  /* a manifest for a peer that never committed is refused */
  uint32_t crcs[4] = {0};
  ck_assert_int_eq(kdp_ckpt_write_manifest(run, 42, 4, crcs, &err), KDP_EIO);
  ck_assert_msg(strstr(err.msg, "peer-003.kdpc") != NULL, "%s", err.msg);
  rm_rf(run);
  free(run);
}
END_TEST

START_TEST(test_find_latest) {
  char *run = kdp_test_tmpdir();
  kdp_error err = {{0}};
  int64_t step = -1;
  /* nothing yet: no checkpoints directory at all */
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 0);
  write_step(run, 100, 2, 1);
  write_step(run, 200, 2, 1);
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 1);
  ck_assert(step == 200);
  /* 300: peer files but no manifest (crashed before rank 0 finished) */
  write_step(run, 300, 2, 0);
  /* 400: manifest, but a peer file corrupted afterwards (same size, one bit) */
  write_step(run, 400, 2, 1);
  char p[4096];
  kdp_ckpt_peer_path(run, 400, 1, p, sizeof p);
  flip_byte(p, 40, 0x04);
  /* 500: manifest but a peer file missing */
  write_step(run, 500, 2, 1);
  kdp_ckpt_peer_path(run, 500, 0, p, sizeof p);
  ck_assert(unlink(p) == 0);
  /* 600: only temp files */
  char d[4096], t[4200];
  kdp_ckpt_step_dir(run, 600, d, sizeof d);
  CK_OK(kdp_ckpt_mkdirs(d, &err));
  snprintf(t, sizeof t, "%s/peer-000.kdpc.tmp.999", d);
  spit(t, "partial", 7);
  snprintf(t, sizeof t, "%s/MANIFEST.kdpc.tmp.999", d);
  spit(t, "partial", 7);
  /* 700: the manifest itself is truncated */
  write_step(run, 700, 1, 1);
  kdp_ckpt_manifest_path(run, 700, p, sizeof p);
  ck_assert(truncate(p, file_size(p) - 3) == 0);
  /* unrelated names are ignored */
  snprintf(t, sizeof t, "%s/checkpoints/step-99999", run);
  CK_OK(kdp_ckpt_mkdirs(t, &err));
  snprintf(t, sizeof t, "%s/checkpoints/notes.txt", run);
  spit(t, "x", 1);

  step = -1;
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 1);
  ck_assert_msg(step == 200, "latest complete step is 200, got %" PRId64, step);
  kdp_error why = {{0}};
  ck_assert_int_eq(kdp_ckpt_verify_step(run, 400, NULL, &why), KDP_EFORMAT);
  ck_assert_msg(strstr(why.msg, "checksum mismatch") != NULL, "%s", why.msg);
  ck_assert_int_eq(kdp_ckpt_verify_step(run, 300, NULL, &why), KDP_EIO);
  ck_assert_msg(strstr(why.msg, "manifest") != NULL, "%s", why.msg);
  ck_assert_int_eq(kdp_ckpt_verify_step(run, 500, NULL, &why), KDP_EIO);
  ck_assert_int_eq(kdp_ckpt_verify_step(run, 700, NULL, &why), KDP_EIO);
  ck_assert_msg(strstr(why.msg, "truncated") != NULL, "%s", why.msg);
  /* once a newer complete one exists it wins */
  write_step(run, 800, 2, 1);
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 1);
  ck_assert(step == 800);
  rm_rf(run);
  free(run);
}
END_TEST

static int step_exists(const char *run, int64_t step) {
  char d[4096];
  kdp_ckpt_step_dir(run, step, d, sizeof d);
  return exists(d);
}

/* Completed checkpoints that all fail verification are an error, not "no checkpoint" (a fresh
   start there would append to the old metrics and let retention delete the step directories),
   and retention deletes none of them. */
START_TEST(test_find_latest_none_usable) {
  char *run = kdp_test_tmpdir();
  kdp_error err = {{0}};
  int64_t step = -1;
  write_step(run, 300, 2, 0); /* no manifest: an interrupted first write is "none" */
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 0);
  write_step(run, 100, 2, 1);
  char p[4096];
  kdp_ckpt_peer_path(run, 100, 1, p, sizeof p);
  flip_byte(p, 40, 0x04);
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "1 completed checkpoint but none is usable") != NULL, "%s",
                err.msg);
  ck_assert_msg(strstr(err.msg, "step 100") && strstr(err.msg, "checksum mismatch"), "%s",
                err.msg);
  ck_assert_msg(strstr(err.msg, "nothing was deleted") != NULL, "%s", err.msg);
  write_step(run, 200, 1, 1);
  kdp_ckpt_manifest_path(run, 200, p, sizeof p);
  ck_assert(truncate(p, file_size(p) - 3) == 0);
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "2 completed checkpoints") && strstr(err.msg, "step 200"), "%s",
                err.msg);
  CK_OK(kdp_ckpt_prune(run, 1, &err));
  ck_assert(step_exists(run, 100) && step_exists(run, 200) && step_exists(run, 300));
  kdp_ckpt_peer_path(run, 100, 0, p, sizeof p);
  ck_assert(exists(p)); /* the intact file of the corrupt step is still there */
  rm_rf(run);
  free(run);
}
END_TEST

START_TEST(test_prune) {
  char *run = kdp_test_tmpdir();
  kdp_error err = {{0}};
  for (int64_t s = 100; s <= 600; s += 100) write_step(run, s, 2, 1);
  write_step(run, 350, 2, 0); /* incomplete, older than the newest complete */
  write_step(run, 700, 2, 0); /* incomplete, newer: maybe being written right now */
  char t[4200], d[4096];
  kdp_ckpt_step_dir(run, 700, d, sizeof d);
  snprintf(t, sizeof t, "%s/peer-001.kdpc.tmp.4242", d);
  spit(t, "in progress", 11);
  kdp_ckpt_step_dir(run, 600, d, sizeof d);
  char stray600[4200], stray_top[4200];
  snprintf(stray600, sizeof stray600, "%s/peer-000.kdpc.tmp.77", d);
  spit(stray600, "stray", 5);
  snprintf(stray_top, sizeof stray_top, "%s/checkpoints/x.tmp.1", run);
  spit(stray_top, "stray", 5);

  CK_OK(kdp_ckpt_prune(run, 2, &err));
  for (int64_t s = 100; s <= 400; s += 100)
    ck_assert_msg(!step_exists(run, s), "step %" PRId64 " should be pruned", s);
  ck_assert(!step_exists(run, 350));
  ck_assert(step_exists(run, 500) && step_exists(run, 600) && step_exists(run, 700));
  ck_assert(!exists(stray600));
  ck_assert(!exists(stray_top));
  ck_assert(exists(t)); /* the newer in-progress step is untouched */
  int np;
  CK_OK(kdp_ckpt_verify_step(run, 500, &np, &err));
  CK_OK(kdp_ckpt_verify_step(run, 600, &np, &err));
  char cdir[4200];
  snprintf(cdir, sizeof cdir, "%s/checkpoints", run);
  ck_assert_uint_eq(count_dir(cdir), 3);
  int64_t step;
  ck_assert_int_eq(kdp_ckpt_find_latest(run, &step, &err), 1);
  ck_assert(step == 600);

  /* a corrupt checkpoint does not count as one of the kept ones */
  write_step(run, 800, 2, 1);
  char p[4096];
  kdp_ckpt_peer_path(run, 600, 0, p, sizeof p);
  flip_byte(p, 30, 0x01);
  CK_OK(kdp_ckpt_prune(run, 2, &err));
  ck_assert(step_exists(run, 800) && step_exists(run, 500));
  ck_assert(!step_exists(run, 600));
  ck_assert(!step_exists(run, 700)); /* now older than the newest complete (800) */
  ck_assert_uint_eq(count_dir(cdir), 2);

  CK_OK(kdp_ckpt_prune(run, 1, &err));
  ck_assert_uint_eq(count_dir(cdir), 1);
  ck_assert(step_exists(run, 800));
  ck_assert_int_eq(kdp_ckpt_prune(run, 0, &err), KDP_EINVAL);
  /* a run directory without checkpoints is fine */
  char *empty = kdp_test_tmpdir();
  CK_OK(kdp_ckpt_prune(empty, 3, &err));
  rm_rf(empty);
  free(empty);
  rm_rf(run);
  free(run);
}
END_TEST

START_TEST(test_describe) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/d.kdpc", dir);
  write_small(path, NULL);
  char *out = NULL;
  size_t outlen = 0;
  FILE *f = open_memstream(&out, &outlen);
  ck_assert_int_eq(kdp_ckpt_describe(path, f), 0);
  fclose(f);
  ck_assert_msg(strstr(out, "kind \"peer\"") && strstr(out, "format 1") && strstr(out, " ok"),
                "%s", out);
  ck_assert_msg(strstr(out, "-123456789012345") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "18446744073709551615") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "\"hello checkpoint\"") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "[2,3]") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "000102ff00") != NULL, "%s", out); /* short bin as hex */
  ck_assert_msg(strstr(out, " 3.25\n") != NULL, "%s", out);
  ck_assert_msg(strstr(out, "6 entries") != NULL, "%s", out);
  free(out);
  /* a broken file: the error is printed and returned */
  flip_byte(path, 20, 0x80);
  f = open_memstream(&out, &outlen);
  ck_assert_int_eq(kdp_ckpt_describe(path, f), KDP_EFORMAT);
  fclose(f);
  ck_assert_msg(strstr(out, "checksum mismatch") != NULL, "%s", out);
  free(out);
  rm_rf(dir);
  free(dir);
}
END_TEST

/* ---- limits ---- */
START_TEST(test_flipped_bits) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/s.kdpc", dir);
  write_small(path, NULL);
  size_t n;
  uint8_t *good = slurp(path, &n);
  const size_t header_end = 8 + 1 + 5; /* magic, version 1, "peer" */
  kdp_ckpt *ck = NULL;
  kdp_error err = {{0}};
  CK_OK(kdp_ckpt_parse_buffer(good, n, n, &ck, &err));
  kdp_ckpt_free(ck);
  uint8_t *b = malloc(n);
  const uint8_t masks[3] = {0x01, 0x10, 0x80};
  for (size_t off = 0; off < n; off++)
    for (int m = 0; m < 3; m++) {
      memcpy(b, good, n);
      b[off] ^= masks[m];
      ck = NULL;
      int rc = kdp_ckpt_parse_buffer(b, n, n, &ck, &err);
      ck_assert_msg(rc == KDP_EFORMAT || rc == KDP_EIO, "flip at %zu mask %02x -> rc %d", off,
                    masks[m], rc);
      ck_assert(ck == NULL);
      if (off >= header_end && off < n - 12)
        ck_assert_msg(strstr(err.msg, "checksum mismatch: file is corrupt") != NULL,
                      "flip at %zu: %s", off, err.msg);
    }
  free(b);
  free(good);

  /* the same through kdp_ckpt_read on a large file, flipping inside the float data */
  snprintf(path, sizeof path, "%s/big.kdpc", dir);
  const size_t N = 1 << 18;
  float *x = calloc(N, sizeof *x);
  kdp_ckpt_writer *w;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  CK_OK(kdp_ckpt_put_f32(w, "x", x, 1, &N, &err));
  CK_OK(kdp_ckpt_writer_commit(w, NULL, &err));
  long long sz = file_size(path);
  const long offs[4] = {100, (long)(sz / 2), (long)(sz - 13), 30};
  for (int i = 0; i < 4; i++) {
    flip_byte(path, offs[i], 0x20);
    ck_assert_int_eq(kdp_ckpt_read(path, 1 << 24, &ck, &err), KDP_EFORMAT);
    ck_assert_msg(strstr(err.msg, "checksum mismatch") && strstr(err.msg, path), "%s", err.msg);
    flip_byte(path, offs[i], 0x20); /* restore */
    CK_OK(kdp_ckpt_read(path, 1 << 24, &ck, &err));
    kdp_ckpt_free(ck);
  }
  free(x);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_truncation) {
  char *dir = kdp_test_tmpdir();
  char path[4096], cut[4200];
  snprintf(path, sizeof path, "%s/s.kdpc", dir);
  snprintf(cut, sizeof cut, "%s/cut.kdpc", dir);
  write_small(path, NULL);
  size_t n;
  uint8_t *good = slurp(path, &n);
  kdp_error err = {{0}};
  kdp_ckpt *ck;
  for (size_t len = 0; len < n; len++) {
    ck = NULL;
    int rc = kdp_ckpt_parse_buffer(good, len, n, &ck, &err);
    ck_assert_msg(rc == KDP_EIO, "cut at %zu of %zu -> rc %d (%s)", len, n, rc, err.msg);
    ck_assert_msg(strstr(err.msg, "truncated") != NULL, "cut at %zu: %s", len, err.msg);
    ck_assert(ck == NULL);
  }
  /* from a file too, at a few lengths, and with the path in the message */
  for (size_t len = 0; len < n; len += 7) {
    spit(cut, good, len);
    ck_assert_int_eq(kdp_ckpt_read(cut, 1 << 20, &ck, &err), KDP_EIO);
    ck_assert_msg(strstr(err.msg, cut) != NULL, "%s", err.msg);
  }
  /* bytes appended after the trailer are refused too */
  uint8_t *longer = malloc(n + 3);
  memcpy(longer, good, n);
  memcpy(longer + n, "abc", 3);
  ck_assert_int_ne(kdp_ckpt_parse_buffer(longer, n + 3, n + 3, &ck, &err), 0);
  free(longer);
  free(good);
  snprintf(path, sizeof path, "%s/missing.kdpc", dir);
  ck_assert_int_eq(kdp_ckpt_read(path, 1 << 20, &ck, &err), KDP_EIO);
  ck_assert_msg(strstr(err.msg, path) && strstr(err.msg, strerror(ENOENT)), "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_read(dir, 1 << 20, &ck, &err), KDP_EIO); /* a directory */
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_wrong_magic_and_version) {
  kdp_error err = {{0}};
  kdp_ckpt *ck = NULL;
  const char *text = "hello, this is a text file\n";
  ck_assert_int_eq(kdp_ckpt_parse_buffer(text, strlen(text), 1024, &ck, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "not a kdpeers checkpoint") != NULL, "%s", err.msg);
  size_t n;
  uint8_t *b = craft(1, "peer", NULL, 0, &n);
  CK_OK(kdp_ckpt_parse_buffer(b, n, n, &ck, &err)); /* an empty checkpoint is valid */
  ck_assert_uint_eq(kdp_ckpt_count(ck), 0);
  kdp_ckpt_free(ck);
  b[7] = 'X'; /* KDPCKPX */
  ck_assert_int_eq(kdp_ckpt_parse_buffer(b, n, n, &ck, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "not a kdpeers checkpoint") != NULL, "%s", err.msg);
  free(b);
  b = craft(2, "peer", NULL, 0, &n);
  ck_assert_int_eq(kdp_ckpt_parse_buffer(b, n, n, &ck, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "written by a newer kdpeers (format 2, this build reads 1)"),
                "%s", err.msg);
  free(b);
  b = craft(300000, "peer", NULL, 0, &n);
  ck_assert_int_eq(kdp_ckpt_parse_buffer(b, n, n, &ck, &err), KDP_EFORMAT);
  ck_assert_msg(strstr(err.msg, "format 300000, this build reads 1"), "%s", err.msg);
  free(b);
  b = craft(0, "peer", NULL, 0, &n);
  ck_assert_int_eq(kdp_ckpt_parse_buffer(b, n, n, &ck, &err), KDP_EFORMAT);
  free(b);
}
END_TEST

START_TEST(test_size_cap) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/s.kdpc", dir);
  write_small(path, NULL);
  size_t n = (size_t)file_size(path);
  kdp_error err = {{0}};
  kdp_ckpt *ck = NULL;
  ck_assert_int_eq(kdp_ckpt_read(path, n - 1, &ck, &err), KDP_EIO);
  char want[64];
  snprintf(want, sizeof want, "is %zu bytes", n);
  ck_assert_msg(strstr(err.msg, want) && strstr(err.msg, "limit") && strstr(err.msg, path), "%s",
                err.msg);
  ck_assert(ck == NULL);
  CK_OK(kdp_ckpt_read(path, n, &ck, &err));
  kdp_ckpt_free(ck);
  size_t len;
  uint8_t *b = slurp(path, &len);
  ck_assert_int_eq(kdp_ckpt_parse_buffer(b, len, len - 1, &ck, &err), KDP_EIO);
  ck_assert_msg(strstr(err.msg, "limit") != NULL, "%s", err.msg);
  free(b);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_missing_and_mismatched_entries) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/s.kdpc", dir);
  write_small(path, NULL);
  kdp_error err = {{0}};
  kdp_ckpt *ck;
  CK_OK(kdp_ckpt_read(path, 1 << 20, &ck, &err));
  int64_t i;
  uint64_t u;
  double f;
  const char *s;
  const void *bp;
  size_t bl;
  float t[7];
  ck_assert(kdp_ckpt_has(ck, "t") && !kdp_ckpt_has(ck, "nope") && !kdp_ckpt_has(ck, "crc32"));
  ck_assert_int_eq(kdp_ckpt_get_i64(ck, "nope", &i, &err), KDP_EMISMATCH);
  ck_assert_msg(strstr(err.msg, "'nope'") && strstr(err.msg, path), "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_get_u64(ck, "i", &u, &err), KDP_EMISMATCH);
  ck_assert_msg(strstr(err.msg, "is i64, expected u64"), "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_get_f64(ck, "s", &f, &err), KDP_EMISMATCH);
  ck_assert_int_eq(kdp_ckpt_get_str(ck, "b", &s, &err), KDP_EMISMATCH);
  ck_assert_int_eq(kdp_ckpt_get_bin(ck, "t", &bp, &bl, &err), KDP_EMISMATCH);
  ck_assert_int_eq(kdp_ckpt_get_f32(ck, "b", t, 5, &err), KDP_EMISMATCH);
  ck_assert_int_eq(kdp_ckpt_get_f32(ck, "t", t, 7, &err), KDP_EMISMATCH);
  ck_assert_msg(strstr(err.msg, "'t'") && strstr(err.msg, "6 floats") &&
                    strstr(err.msg, "expected 7"),
                "%s", err.msg);
  ck_assert_int_eq(kdp_ckpt_get_f32(ck, "t", t, 5, &err), KDP_EMISMATCH);
  CK_OK(kdp_ckpt_get_f32(ck, "t", t, 6, &err));
  ck_assert(t[2] == 3.5f && t[5] == -7.0f);
  kdp_ckpt_free(ck);
  rm_rf(dir);
  free(dir);
}
END_TEST

START_TEST(test_writer_misuse) {
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/w.kdpc", dir);
  kdp_error err = {{0}};
  kdp_ckpt_writer *w = (kdp_ckpt_writer *)1;
  ck_assert_int_eq(kdp_ckpt_writer_open(&w, path, "", &err), KDP_EINVAL);
  ck_assert(w == NULL);
  ck_assert_int_eq(kdp_ckpt_writer_open(&w, "", "peer", &err), KDP_EINVAL);
  /* parent "directory" is a regular file */
  char blocker[4200], under[4300];
  snprintf(blocker, sizeof blocker, "%s/file", dir);
  spit(blocker, "x", 1);
  snprintf(under, sizeof under, "%s/sub/c.kdpc", blocker);
  ck_assert_int_eq(kdp_ckpt_writer_open(&w, under, "peer", &err), KDP_EIO);
  ck_assert_msg(strstr(err.msg, blocker) != NULL, "%s", err.msg);
  const char *bad_names[] = {"", "crc32"};
  for (int k = 0; k < 2; k++) {
    CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
    ck_assert_int_eq(kdp_ckpt_put_i64(w, bad_names[k], 1, &err), KDP_EINVAL);
    kdp_ckpt_writer_abort(w);
  }
  char longname[300];
  memset(longname, 'a', 256);
  longname[256] = 0;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  ck_assert_int_eq(kdp_ckpt_put_u64(w, longname, 1, &err), KDP_EINVAL);
  kdp_ckpt_writer_abort(w);
  size_t dims[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  float one = 1;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  ck_assert_int_eq(kdp_ckpt_put_f32(w, "t", &one, 9, dims, &err), KDP_EINVAL);
  kdp_ckpt_writer_abort(w);
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  ck_assert_int_eq(kdp_ckpt_put_str(w, "s", NULL, &err), KDP_EINVAL);
  ck_assert_int_ne(kdp_ckpt_writer_commit(w, NULL, &err), 0);
  ck_assert(!exists(path));
  ck_assert_uint_eq(count_dir(dir), 1); /* just the blocker file */
  rm_rf(dir);
  free(dir);
}
END_TEST

/* Bodies that are well-formed msgpack with a valid crc but break the entry grammar. */
START_TEST(test_malformed_bodies) {
  struct {
    const char *what;
    const char *body;
    size_t len;
    const char *needle;
  } cases[] = {
      {"duplicate", "\xa1x\x01\x05\xa1x\x01\x06", 8, "appears twice"},
      {"unknown tag", "\xa1x\x09\x05", 4, "unknown type tag 9"},
      {"tag 7 in body", "\xa1x\x07\x05", 4, "unknown type tag 7"},
      {"name is a map", "\x81\xa1x\x01", 4, "entry name"},
      {"name is an int", "\x05\x01\x05", 3, "entry name"},
      {"empty name", "\xa0\x01\x05", 3, "entry name"},
      {"NUL in name", "\xa2x\x00\x01\x05", 5, "NUL"},
      {"i64 holds str", "\xa1x\x01\xa1y", 5, "int64"},
      {"u64 negative", "\xa1x\x02\xff", 4, "uint64"},
      {"f64 holds f32", "\xa1x\x03\xca\x3f\x80\x00\x00", 8, "float64"},
      {"str holds NUL", "\xa1x\x04\xa2y\x00", 6, "NUL"},
      {"bin holds str", "\xa1x\x05\xa1y", 5, "bytes"},
      {"f32 rank 9", "\xa1x\x06\x09", 4, "rank"},
      {"f32 dims count != rank", "\xa1x\x06\x02\x91\x01\xc4\x04\0\0\0\0", 12, "dims"},
      {"f32 huge dims array", "\xa1x\x06\x02\xdd\xff\xff\xff\xff", 9, "dims"},
      {"f32 nested array dim", "\xa1x\x06\x01\x91\xdd\xff\xff\xff\xff", 10, "dims"},
      {"f32 data size", "\xa1x\x06\x01\x91\x02\xc4\x04\0\0\0\0", 12, "4 * prod(dims)"},
      {"f32 overflow", "\xa1x\x06\x02\x92\xcf\xff\xff\xff\xff\xff\xff\xff\xff\xcf\xff\xff\xff\xff"
                       "\xff\xff\xff\xff\xc4\x00", 25, "fits"},
      {"entry cut by trailer", "\xa1x\x05\xc4\x10", 5, "bytes"},
      {"no value", "\xa1x\x01", 3, "int64"},
      {"huge map as name", "\xdf\xff\xff\xff\xff", 5, "entry name"},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    size_t n;
    uint8_t *b = craft(1, "peer", cases[k].body, cases[k].len, &n);
    kdp_error err = {{0}};
    kdp_ckpt *ck = NULL;
    int rc = kdp_ckpt_parse_buffer(b, n, n, &ck, &err);
    ck_assert_msg(rc == KDP_EFORMAT, "%s: rc %d (%s)", cases[k].what, rc, err.msg);
    ck_assert_msg(strstr(err.msg, cases[k].needle) != NULL, "%s: '%s' not in: %s", cases[k].what,
                  cases[k].needle, err.msg);
    ck_assert(ck == NULL);
    free(b);
  }
  /* a valid hand-made body parses (the grammar above is not over-strict) */
  size_t n;
  uint8_t *b = craft(1, "peer", "\xa1x\x06\x01\x91\x01\xc4\x04\x00\x00\x80\x3f", 12, &n);
  kdp_error err = {{0}};
  kdp_ckpt *ck = NULL;
  CK_OK(kdp_ckpt_parse_buffer(b, n, n, &ck, &err));
  float v = 0;
  CK_OK(kdp_ckpt_get_f32(ck, "x", &v, 1, &err));
  ck_assert(v == 1.0f);
  kdp_ckpt_free(ck);
  free(b);
}
END_TEST

START_TEST(test_many_entries) {
  /* many names: the index must stay correct through its growth */
  char *dir = kdp_test_tmpdir();
  char path[4096];
  snprintf(path, sizeof path, "%s/many.kdpc", dir);
  kdp_error err = {{0}};
  kdp_ckpt_writer *w;
  CK_OK(kdp_ckpt_writer_open(&w, path, "peer", &err));
  for (int i = 0; i < 5000; i++) {
    char name[32];
    snprintf(name, sizeof name, "layer.%d.w", i);
    CK_OK(kdp_ckpt_put_i64(w, name, (int64_t)i * 3, &err));
  }
  CK_OK(kdp_ckpt_writer_commit(w, NULL, &err));
  kdp_ckpt *ck;
  CK_OK(kdp_ckpt_read(path, 1 << 20, &ck, &err));
  ck_assert_uint_eq(kdp_ckpt_count(ck), 5000);
  for (int i = 4999; i >= 0; i -= 7) {
    char name[32];
    int64_t v;
    snprintf(name, sizeof name, "layer.%d.w", i);
    CK_OK(kdp_ckpt_get_i64(ck, name, &v, &err));
    ck_assert(v == (int64_t)i * 3);
  }
  ck_assert(!kdp_ckpt_has(ck, "layer.5000.w"));
  kdp_ckpt_free(ck);
  rm_rf(dir);
  free(dir);
}
END_TEST

/* ---- the checkpoint's config against this run's (resume) ---- */
static char *defaults_text(const char *set) {
  kdp_config c;
  kdp_error err = {0};
  kdp_config_defaults(&c);
  if (set) ck_assert_msg(kdp_config_set(&c, set, &err) == 0, "%s", err.msg);
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  kdp_config_print(&c, f);
  fclose(f);
  return buf;
}
/* the text without the line "KEY = ..." of section [SECTION]'s key (as an older kdpeers wrote it) */
static char *without_line(const char *text, const char *line_start) {
  char *out = strdup(text), *p = strstr(out, line_start);
  ck_assert_msg(p != NULL, "no line '%s'", line_start);
  char *e = strchr(p, '\n');
  memmove(p, e + 1, strlen(e + 1) + 1);
  return out;
}

START_TEST(test_config_predating_a_key) {
  kdp_trainer *t = kdp_xcalloc(1, sizeof *t);
  kdp_config *cfg = kdp_xcalloc(1, sizeof *cfg);
  kdp_config_defaults(cfg);
  t->cfg = cfg;
  t->is_root = 1;
  kdp_error err = {0};
  char *now = defaults_text(NULL);
  /* the same config: nothing to say */
  ck_assert_int_eq(kdp_ckpt_compare_configs(t, now, now, &err), 0);
  ck_assert_int_eq((int)t->n_changes, 0);
  /* a checkpoint written before run.grad_sum existed, this run at its default: resumes, logged */
  char *old = without_line(now, "grad_sum = ");
  ck_assert_int_eq(kdp_ckpt_compare_configs(t, old, now, &err), 0);
  ck_assert_int_eq((int)t->n_changes, 1);
  ck_assert_str_eq(t->changes[0].key, "run.grad_sum");
  ck_assert_str_eq(t->changes[0].new_value, "auto");
  ck_assert_ptr_nonnull(strstr(t->changes[0].old_value, "predates"));
  /* ...but this run setting the new key to something else is a change, refused without the flag */
  t->n_changes = 0;
  char *now2 = defaults_text("run.grad_sum=allreduce");
  ck_assert_int_ne(kdp_ckpt_compare_configs(t, old, now2, &err), 0);
  ck_assert_ptr_nonnull(strstr(err.msg, "run.grad_sum"));
  ck_assert_ptr_nonnull(strstr(err.msg, "--allow-config-change"));
  /* and a key the checkpoint has, at another value than this run's default, still is refused */
  char *lr = defaults_text("optim.lr=0.01");
  err = (kdp_error){0};
  ck_assert_int_ne(kdp_ckpt_compare_configs(t, lr, now, &err), 0);
  ck_assert_ptr_nonnull(strstr(err.msg, "optim.lr"));
  free(lr);
  free(now2);
  free(old);
  free(now);
  free(cfg);
  free(t);
}
END_TEST

static Suite *ckpt_suite(void) {
  Suite *s = suite_create("ckpt");
  TCase *core = kdp_test_case("core");
  tcase_add_test(core, test_roundtrip_all_types);
  tcase_add_test(core, test_float_bytes_little_endian);
  tcase_add_test(core, test_only_tmp_before_commit);
  tcase_add_test(core, test_abort_leaves_nothing);
  tcase_add_test(core, test_step_paths);
  tcase_add_test(core, test_manifest_contents);
  tcase_add_test(core, test_find_latest);
  tcase_add_test(core, test_find_latest_none_usable);
  tcase_add_test(core, test_prune);
  tcase_add_test(core, test_describe);
  tcase_add_test(core, test_many_entries);
  tcase_add_test(core, test_config_predating_a_key);
  suite_add_tcase(s, core);
  TCase *lim = kdp_test_case("limits");
  tcase_add_test(lim, test_flipped_bits);
  tcase_add_test(lim, test_truncation);
  tcase_add_test(lim, test_wrong_magic_and_version);
  tcase_add_test(lim, test_size_cap);
  tcase_add_test(lim, test_missing_and_mismatched_entries);
  tcase_add_test(lim, test_writer_misuse);
  tcase_add_test(lim, test_malformed_bodies);
  suite_add_tcase(s, lim);
  return s;
}

int main(void) {
  SRunner *sr = srunner_create(ckpt_suite());
  srunner_run_all(sr, CK_NORMAL);
  int failed = srunner_ntests_failed(sr);
  srunner_free(sr);
  return failed ? 1 : 0;
}
