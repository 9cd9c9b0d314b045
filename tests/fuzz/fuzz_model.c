/* fuzz_model.c: libFuzzer target for model files (.kdpm, formats 1 and 2): the checkpoint parser,
   the model-file reader (kdp_modelfile_from_ckpt: the arch string and shape against the weights'
   plan, the flat vectors of format 1 or the named tensors of format 2, class names) and a
   prediction with whatever loaded. Two kinds of input:
   - a file: the bytes (byte-level mutations of the committed seeds, which the real writers made:
     tests/fuzz/corpus/model, tests/fuzz/make-model-corpus.sh). Their crc32 trailer (the last 12
     bytes) is re-stamped, so mutations reach the entries (fuzz_ckpt fuzzes the checksum check).
   - 0xff, then a field mutation of a format-2 file that kdp_modelfile_write made at start-up:
     byte 1 = how (mod 9), byte 2 = which seed (SEEDS), byte 3 = which entry (mod the entry
     count, so every field of every seed is reachable), the rest the payload. The entry is
     dropped, renamed, retyped, given another value (a tensor another shape or NaN, infinite or
     huge values) or duplicated; the file is rewritten with the checkpoint writer (to /dev/shm)
     and read back with kdp_modelfile_read.
   The reader must load the file or refuse it with a message; it must never crash, leak or ask
   for more memory than the fuzzer's limit (kdp_modelfile_set_memory_limit). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/infer.h"
#include "kdpeers/nn.h"

#define MAX_BATCH 2
#define MEMORY_LIMIT ((size_t)256 << 20)

/* ---- the reader on a parsed file ---- */

static void read_and_predict(const kdp_ckpt *ck) {
  kdp_modelfile mf;
  kdp_error err;
  if (kdp_modelfile_from_ckpt(&mf, ck, "fuzz", MAX_BATCH, &err) != 0) {
    if (!memchr(err.msg, 0, sizeof err.msg) || !err.msg[0]) abort(); /* a message, terminated */
    if (getenv("KDP_FUZZ_VERBOSE")) fprintf(stderr, "fuzz_model: refused: %s\n", err.msg);
    return;
  }
  if (getenv("KDP_FUZZ_VERBOSE"))
    fprintf(stderr, "fuzz_model: loaded %s (format %d)\n", kdp_model_arch(mf.m), mf.format);
  if (!mf.m || mf.in.n_classes < 2) abort();
  size_t isz = mf.in.H * mf.in.W * mf.in.C, C = mf.in.n_classes;
  uint8_t *pix = malloc(MAX_BATCH * isz);
  float *p = malloc(MAX_BATCH * C * sizeof(float));
  if (!pix || !p) abort();
  for (size_t i = 0; i < MAX_BATCH * isz; i++) pix[i] = (uint8_t)(i * 37);
  kdp_modelfile_predict(&mf, pix, 1, MAX_BATCH, p);
  /* and through the packed kernels (kdpeers-predict's default; a no-op without AVX-512) */
  kdp_model_freeze(mf.m, 1);
  kdp_modelfile_predict(&mf, pix, 1, MAX_BATCH, p);
  volatile float sink = p[0] + p[MAX_BATCH * C - 1];
  (void)sink;
  if (mf.class_names)
    for (size_t k = 0; k < C; k++)
      if (!mf.class_names[k] || !mf.class_names[k][0]) abort();
  free(p);
  free(pix);
  kdp_modelfile_free(&mf);
}

static void raw_input(const uint8_t *data, size_t size) {
  uint8_t *buf = malloc(size ? size : 1);
  if (!buf) return;
  if (size) memcpy(buf, data, size);
  if (size >= 12) {
    static const uint8_t head[8] = {0xa5, 'c', 'r', 'c', '3', '2', KDP_CKPT_TAG_CRC32, 0xce};
    uint32_t crc = (uint32_t)crc32_z(crc32(0L, Z_NULL, 0), buf, size - 12);
    memcpy(buf + size - 12, head, 8);
    for (int i = 0; i < 4; i++) buf[size - 4 + i] = (uint8_t)(crc >> (24 - 8 * i));
  }
  kdp_ckpt *ck = NULL;
  kdp_error err;
  int rc = kdp_ckpt_parse_buffer(buf, size, 1 << 20, &ck, &err);
  free(buf); /* the parsed checkpoint owns its own copy */
  if (rc != 0) return;
  read_and_predict(ck);
  kdp_ckpt_free(ck);
}

/* ---- field mutations of files the real writer made ---- */

static const struct {
  const char *arch;
  size_t H, W, C, classes;
  const char *names;
} SEEDS[] = {
    {"mlp(8)", 6, 6, 1, 3, NULL},
    {"seq:conv(4,3,1,1),bn,maxpool(2),relu,flatten,dense(5)", 6, 6, 2, 5, "a\nb b\nc\nd\ne\n"},
    {"cnn", 8, 8, 1, 10, NULL},
    {"seq:conv(3,3,2,1),bn,relu,avgpool(2),gap,dense(4),bn,dropout(0.5),relu", 7, 5, 3, 2, NULL},
    {"resnet8", 8, 8, 3, 4, "x\ny\nz\nw\n"},
    {"wrn10_1", 4, 4, 3, 2, NULL},
};
#define N_SEEDS (sizeof SEEDS / sizeof SEEDS[0])
static kdp_ckpt *seeds[N_SEEDS];
static char dir[64];

static void make_seeds(void) {
  snprintf(dir, sizeof dir, "/dev/shm/kdpfuzz-model-%ld", (long)getpid());
  kdp_error err;
  if (kdp_ckpt_mkdirs(dir, &err) != 0) abort();
  for (size_t s = 0; s < N_SEEDS; s++) {
    kdp_modelfile mf;
    memset(&mf, 0, sizeof mf);
    mf.in = (kdp_input_shape){SEEDS[s].H, SEEDS[s].W, SEEDS[s].C, SEEDS[s].classes};
    if (kdp_model_create(&mf.m, SEEDS[s].arch, mf.in, 1, &err) != 0) abort();
    kdp_rng rng;
    kdp_rng_seed(&rng, 7 + s, 1);
    kdp_model_init(mf.m, &rng);
    float *b = kdp_model_buffers(mf.m);
    for (size_t i = 0; i < kdp_model_n_buffers(mf.m); i++) b[i] = 0.5f + (float)(i % 3);
    for (int c = 0; c < 3; c++) {
      mf.mean[c] = 0.5f;
      mf.std[c] = 0.25f;
    }
    if (SEEDS[s].names && kdp_modelfile_set_class_names(&mf, SEEDS[s].names, '\n', &err) != 0)
      abort();
    char path[128];
    snprintf(path, sizeof path, "%s/seed%zu.kdpm", dir, s);
    if (kdp_modelfile_write(&mf, path, "fuzz", 0, &err) != 0) abort();
    kdp_modelfile_free(&mf);
    if (kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &seeds[s], &err) != 0) abort();
    unlink(path);
  }
}

/* payload reader: the fuzzer's bytes after the header, zeros past the end */
typedef struct pay {
  const uint8_t *p;
  size_t n, at;
} pay;
static uint64_t take(pay *y, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v = v << 8 | (y->at < y->n ? y->p[y->at++] : 0);
  return v;
}
/* a string from the payload: a length byte, then that many bytes (NUL-free, at most 200) */
static void take_str(pay *y, char *out, size_t cap) {
  size_t len = (size_t)take(y, 1) % 201, k = 0;
  if (len >= cap) len = cap - 1;
  for (size_t i = 0; i < len; i++) {
    char c = (char)take(y, 1);
    if (c) out[k++] = c;
  }
  out[k] = 0;
}

/* interesting integers: the payload picks one, or gives its own */
static int64_t take_int(pay *y) {
  static const int64_t special[] = {0, 1, 2, 3, -1, 4096, 4097, 100000, 100001, INT64_MAX,
                                    INT64_MIN, 1LL << 32, 255, 28, 9};
  uint8_t k = (uint8_t)take(y, 1);
  if (k < 2 * (sizeof special / sizeof special[0])) return special[k / 2];
  return (int64_t)take(y, 8);
}

/* copies entry `e` of ck into w, with mutation `how` when e == victim */
static int put_entry(kdp_ckpt_writer *w, const kdp_ckpt *ck, const kdp_ckpt_info *in, int mutate,
                     int how, pay *y, kdp_error *err) {
  char name[KDP_CKPT_MAX_NAME + 1];
  snprintf(name, sizeof name, "%s", in->name);
  int type = in->type;
  if (mutate) switch (how) {
      case 0: return 0; /* drop it */
      case 1: take_str(y, name, sizeof name); if (!name[0]) return 0; break; /* rename */
      case 2: type = KDP_CKPT_I64; break;                                    /* retype */
      case 3: type = KDP_CKPT_U64; break;
      case 4: type = KDP_CKPT_F64; break;
      case 5: type = KDP_CKPT_STR; break;
      case 6: type = KDP_CKPT_F32; break;
      default: break; /* 7: the same type, another value; 8: the same again (a duplicate) */
    }
  int fresh = mutate && how >= 2 && how <= 7;
  switch (type) {
    case KDP_CKPT_I64: {
      int64_t v = 0;
      if (fresh) v = take_int(y);
      else kdp_ckpt_get_i64(ck, in->name, &v, err);
      return kdp_ckpt_put_i64(w, name, v, err);
    }
    case KDP_CKPT_U64: {
      uint64_t v = 0;
      if (fresh) v = (uint64_t)take_int(y);
      else kdp_ckpt_get_u64(ck, in->name, &v, err);
      return kdp_ckpt_put_u64(w, name, v, err);
    }
    case KDP_CKPT_F64: {
      static const double special[] = {0.0, -0.0, 1e-300, -1.0, 1e308, NAN, INFINITY, -INFINITY};
      double v = 0;
      if (fresh) {
        uint8_t k = (uint8_t)take(y, 1);
        uint64_t bits = take(y, 8);
        if (k < 16) v = special[k / 2];
        else memcpy(&v, &bits, sizeof v);
      } else {
        kdp_ckpt_get_f64(ck, in->name, &v, err);
      }
      return kdp_ckpt_put_f64(w, name, v, err);
    }
    case KDP_CKPT_STR: {
      char s[256];
      const char *v = "";
      if (fresh) {
        take_str(y, s, sizeof s);
        v = s;
      } else {
        kdp_ckpt_get_str(ck, in->name, &v, err);
      }
      return kdp_ckpt_put_str(w, name, v, err);
    }
    case KDP_CKPT_BIN: {
      const void *b = NULL;
      size_t len = 0;
      kdp_ckpt_get_bin(ck, in->name, &b, &len, err);
      return kdp_ckpt_put_bin(w, name, b, len, err);
    }
    case KDP_CKPT_F32: {
      size_t nd = in->type == KDP_CKPT_F32 ? in->ndim : 1, dims[KDP_CKPT_MAX_DIMS];
      size_t count = in->type == KDP_CKPT_F32 ? in->count : 1;
      for (size_t k = 0; k < nd; k++) dims[k] = in->type == KDP_CKPT_F32 ? (size_t)in->dims[k] : 1;
      if (fresh) {
        /* another shape (the payload's ndim and dims, at most 1 << 16 values) or the same shape
           with special values (NaN, infinities, huge) at the payload's places */
        if (take(y, 1) & 1) {
          nd = (size_t)take(y, 1) % 5;
          count = 1;
          for (size_t k = 0; k < nd; k++) {
            dims[k] = (size_t)take(y, 2) % 300;
            count *= dims[k];
          }
          if (count > (1u << 16)) count = 0, nd = 1, dims[0] = 0;
        }
      }
      float *v = calloc(count ? count : 1, sizeof(float));
      if (!v) abort();
      if (in->type == KDP_CKPT_F32 && count == in->count) kdp_ckpt_get_f32(ck, in->name, v, count, err);
      if (fresh && count) {
        static const float special[] = {NAN, INFINITY, -INFINITY, 3e38f, -0.0f, 1e-45f};
        for (int k = 0; k < 4; k++) v[take(y, 2) % count] = special[take(y, 1) % 6];
      }
      int rc = kdp_ckpt_put_f32(w, name, v, nd, dims, err);
      free(v);
      return rc;
    }
    default: return 0;
  }
}

static void field_input(const uint8_t *data, size_t size) {
  if (size < 3) return;
  const kdp_ckpt *ck = seeds[data[1] % N_SEEDS];
  size_t n = kdp_ckpt_count(ck), victim = data[2] % n;
  int how = data[0] % 9;
  pay y = {data + 3, size - 3, 0};
  char path[128];
  snprintf(path, sizeof path, "%s/m.kdpm", dir);
  kdp_ckpt_writer *w = NULL;
  kdp_error err;
  int rc = kdp_ckpt_writer_open(&w, path, kdp_ckpt_kind(ck), &err);
  for (size_t i = 0; i < n && rc == 0; i++) {
    kdp_ckpt_info in;
    if (kdp_ckpt_entry(ck, i, &in) != 0) abort();
    rc = put_entry(w, ck, &in, i == victim, how, &y, &err);
    if (rc == 0 && i == victim && how == 8) rc = put_entry(w, ck, &in, 0, how, &y, &err);
  }
  if (rc != 0) { /* the writer refused the entry (e.g. a duplicate name): nothing to read */
    kdp_ckpt_writer_abort(w);
    return;
  }
  if (kdp_ckpt_writer_commit(w, NULL, &err) != 0) return;
  kdp_modelfile mf;
  if (kdp_modelfile_read(&mf, path, MAX_BATCH, &err) == 0) {
    kdp_modelfile_free(&mf);
    kdp_ckpt *back = NULL;
    if (kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &back, &err) != 0) abort();
    read_and_predict(back);
    kdp_ckpt_free(back);
  } else if (!err.msg[0]) {
    abort();
  } else if (getenv("KDP_FUZZ_VERBOSE")) {
    fprintf(stderr, "fuzz_model: field mutation %d of entry %zu: refused: %s\n", how, victim,
            err.msg);
  }
  unlink(path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!seeds[0]) {
    kdp_modelfile_set_memory_limit((double)MEMORY_LIMIT);
    make_seeds();
  }
  if (size >= 1 && data[0] == 0xff)
    field_input(data + 1, size - 1);
  else
    raw_input(data, size);
  return 0;
}
