/* fuzz_ckpt.c: libFuzzer target for the checkpoint reader (kdp_ckpt_parse_buffer + getters).
 *
 * Input: one flag byte, then the file bytes. If (flag & 1), the last 12 bytes are overwritten
 * with a valid crc32 trailer for the bytes before them, so mutations get past the checksum
 * and reach the entry parser; otherwise the bytes are parsed as they are.
 *
 * Build and run (not wired into meson):
 *   clang -g -O1 -fsanitize=fuzzer,address -Iinclude tests/fuzz/fuzz_ckpt.c src/ckpt/ckpt.c \
 *     src/common.c $(pkg-config --cflags --libs msgpack zlib) -o /tmp/fuzz_ckpt
 *   /tmp/fuzz_ckpt -max_total_time=30 -max_len=4096 tests/fuzz/corpus/ckpt
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "kdpeers/ckpt.h"

static void exercise(const kdp_ckpt *ck) {
  kdp_error err;
  volatile size_t sink = strlen(kdp_ckpt_kind(ck));
  for (size_t i = 0; i < kdp_ckpt_count(ck); i++) {
    kdp_ckpt_info in;
    if (kdp_ckpt_entry(ck, i, &in)) abort();
    if (!kdp_ckpt_has(ck, in.name)) abort(); /* every listed name must be found */
    int64_t i64;
    uint64_t u64;
    double f64;
    const char *s;
    const void *b;
    size_t bl;
    switch (in.type) {
      case KDP_CKPT_I64:
        if (kdp_ckpt_get_i64(ck, in.name, &i64, &err)) abort();
        sink += (size_t)i64;
        break;
      case KDP_CKPT_U64:
        if (kdp_ckpt_get_u64(ck, in.name, &u64, &err)) abort();
        sink += (size_t)u64;
        break;
      case KDP_CKPT_F64:
        if (kdp_ckpt_get_f64(ck, in.name, &f64, &err)) abort();
        sink += f64 > 0;
        break;
      case KDP_CKPT_STR:
        if (kdp_ckpt_get_str(ck, in.name, &s, &err)) abort();
        if (strlen(s) != in.count) abort();
        break;
      case KDP_CKPT_BIN:
        if (kdp_ckpt_get_bin(ck, in.name, &b, &bl, &err)) abort();
        if (bl != in.bytes) abort();
        if (bl) sink += ((const uint8_t *)b)[bl - 1];
        break;
      case KDP_CKPT_F32: {
        float *out = malloc(in.count ? in.count * sizeof(float) : 1);
        if (kdp_ckpt_get_f32(ck, in.name, out, in.count, &err)) abort();
        if (kdp_ckpt_get_f32(ck, in.name, out, in.count + 1, &err) != KDP_EMISMATCH) abort();
        if (in.count) sink += out[in.count - 1] > 0;
        free(out);
        break;
      }
      default: abort();
    }
    /* a wrong-type request must be refused, never misread */
    if (in.type != KDP_CKPT_I64 && kdp_ckpt_get_i64(ck, in.name, &i64, &err) != KDP_EMISMATCH)
      abort();
  }
  (void)sink;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int fix = data[0] & 1;
  size_t n = size - 1;
  uint8_t *buf = malloc(n ? n : 1);
  if (n) memcpy(buf, data + 1, n);
  if (fix && n >= 12) {
    static const uint8_t head[8] = {0xa5, 'c', 'r', 'c', '3', '2', KDP_CKPT_TAG_CRC32, 0xce};
    uint32_t crc = (uint32_t)crc32_z(crc32(0L, Z_NULL, 0), buf, n - 12);
    memcpy(buf + n - 12, head, 8);
    buf[n - 4] = (uint8_t)(crc >> 24);
    buf[n - 3] = (uint8_t)(crc >> 16);
    buf[n - 2] = (uint8_t)(crc >> 8);
    buf[n - 1] = (uint8_t)crc;
  }
  kdp_ckpt *ck = NULL;
  kdp_error err;
  int rc = kdp_ckpt_parse_buffer(buf, n, (size_t)1 << 20, &ck, &err);
  if (rc == 0) {
    exercise(ck);
    kdp_ckpt_free(ck);
  } else {
    if (ck != NULL) abort();
    if (rc != KDP_EIO && rc != KDP_EFORMAT) abort(); /* ENOMEM cannot happen at 1 MiB */
    if (!memchr(err.msg, 0, sizeof err.msg) || !err.msg[0]) abort();
  }
  free(buf);
  return 0;
}
