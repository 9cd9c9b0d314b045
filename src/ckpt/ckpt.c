/* ckpt.c: checkpoint files (msgpack + crc32, temp file + rename) and step directories. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kdpeers/ckpt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <msgpack.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <zlib.h>

#define TRAILER_NAME "crc32"
#define TRAILER_LEN 12 /* a5 "crc32" 07 ce xx xx xx xx */
#define MANIFEST_NAME "MANIFEST.kdpc"
#define MANIFEST_MAX_BYTES ((size_t)16 << 20)
#define MAX_PEERS 100000

static const uint8_t k_magic_enc[8] = {0xa7, 'K', 'D', 'P', 'C', 'K', 'P', 'T'};
static const uint8_t k_trailer_head[8] = {0xa5, 'c', 'r', 'c', '3', '2', KDP_CKPT_TAG_CRC32, 0xce};

static int host_is_le(void) {
  const uint16_t one = 1;
  return *(const uint8_t *)&one == 1;
}

static uint32_t bswap32(uint32_t x) {
  return (x >> 24) | ((x >> 8) & 0xff00u) | ((x << 8) & 0xff0000u) | (x << 24);
}

const char *kdp_ckpt_type_name(int type) {
  switch (type) {
    case KDP_CKPT_I64: return "i64";
    case KDP_CKPT_U64: return "u64";
    case KDP_CKPT_F64: return "f64";
    case KDP_CKPT_STR: return "str";
    case KDP_CKPT_BIN: return "bin";
    case KDP_CKPT_F32: return "f32";
    default: return "?";
  }
}

/* ---- name index: open addressing over indices into a caller-owned array of names ---- */
typedef struct name_index {
  size_t *slot; /* index + 1, 0 = empty */
  size_t cap;   /* power of two */
  size_t n;
} name_index;

static uint64_t hash_name(const char *s, size_t len) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
  return h;
}

/* Position of name in the index: the slot that holds it, or the empty slot where it goes. */
static size_t index_probe(const name_index *ix, char *const *names, const char *name,
                          size_t len) {
  size_t mask = ix->cap - 1, i = (size_t)hash_name(name, len) & mask;
  while (ix->slot[i]) {
    const char *s = names[ix->slot[i] - 1];
    if (strlen(s) == len && memcmp(s, name, len) == 0) return i;
    i = (i + 1) & mask;
  }
  return i;
}

/* Index of name, or SIZE_MAX. */
static size_t index_find(const name_index *ix, char *const *names, const char *name) {
  if (!ix->cap) return SIZE_MAX;
  size_t p = index_probe(ix, names, name, strlen(name));
  return ix->slot[p] ? ix->slot[p] - 1 : SIZE_MAX;
}

/* Adds names[id]; returns 0, or 1 if the name is already present. */
static int index_add(name_index *ix, char *const *names, size_t id) {
  if (2 * (ix->n + 1) > ix->cap) {
    size_t ncap = ix->cap ? 2 * ix->cap : 16;
    size_t *ns = kdp_xcalloc(ncap, sizeof *ns);
    name_index nx = {ns, ncap, 0};
    for (size_t i = 0; i < ix->cap; i++)
      if (ix->slot[i]) {
        const char *s = names[ix->slot[i] - 1];
        nx.slot[index_probe(&nx, names, s, strlen(s))] = ix->slot[i];
        nx.n++;
      }
    free(ix->slot);
    *ix = nx;
  }
  const char *s = names[id];
  size_t p = index_probe(ix, names, s, strlen(s));
  if (ix->slot[p]) return 1;
  ix->slot[p] = id + 1;
  ix->n++;
  return 0;
}

/* ---- writer ---- */
struct kdp_ckpt_writer {
  FILE *f;
  char *final_path;
  char *tmp_path;
  msgpack_packer pk;
  uint32_t crc;     /* running crc32 of every byte written */
  uint64_t nbytes;
  int werrno;       /* errno of the first failed write */
  int failed;       /* first error code, 0 while healthy */
  char first_msg[KDP_ERRLEN];
  char **names;
  size_t n_names, cap_names;
  name_index index;
};

static int write_cb(void *data, const char *buf, size_t len) {
  kdp_ckpt_writer *w = data;
  if (len == 0) return 0;
  errno = 0;
  if (fwrite(buf, 1, len, w->f) != len) {
    w->werrno = errno ? errno : EIO;
    return -1;
  }
  w->crc = (uint32_t)crc32_z(w->crc, (const Bytef *)buf, len);
  w->nbytes += len;
  return 0;
}

/* Records the first failure (so later calls repeat it) and returns it. */
static int w_fail(kdp_ckpt_writer *w, kdp_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int w_fail(kdp_ckpt_writer *w, kdp_error *err, int code, const char *fmt, ...) {
  if (!w->failed) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->first_msg, sizeof w->first_msg, fmt, ap);
    va_end(ap);
    w->failed = code;
  }
  return kdp_fail(err, w->failed, "%s", w->first_msg);
}

/* Checks a msgpack pack call. */
static int w_check(kdp_ckpt_writer *w, int rc, const char *what, kdp_error *err) {
  if (rc == 0) return 0;
  return w_fail(w, err, KDP_EIO, "checkpoint %s: cannot write %s: %s (check free disk space)",
                w->tmp_path, what, strerror(w->werrno ? w->werrno : EIO));
}

static char *xstrdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *p = kdp_xmalloc(n);
  memcpy(p, s, n);
  return p;
}

int kdp_ckpt_mkdirs(const char *path, kdp_error *err) {
  if (!path || !*path) return kdp_fail(err, KDP_EINVAL, "mkdir: empty directory path");
  char *p = xstrdup(path);
  size_t n = strlen(p);
  int rc = 0;
  for (size_t i = 1; i <= n && rc == 0; i++) {
    if (p[i] != '/' && p[i] != '\0') continue;
    if (p[i - 1] == '/') continue; /* "a//b" */
    char c = p[i];
    p[i] = '\0';
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
      rc = kdp_fail(err, KDP_EIO, "cannot create directory %s: %s", p, strerror(errno));
    } else {
      struct stat st;
      if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
        rc = kdp_fail(err, KDP_EIO, "cannot create directory %s: a file of that name exists", p);
    }
    p[i] = c;
  }
  free(p);
  return rc;
}

/* Directory part of path ("." if none), malloc'ed. */
static char *dir_of(const char *path) {
  const char *slash = strrchr(path, '/');
  if (!slash) return xstrdup(".");
  if (slash == path) return xstrdup("/");
  size_t n = (size_t)(slash - path);
  char *d = kdp_xmalloc(n + 1);
  memcpy(d, path, n);
  d[n] = '\0';
  return d;
}

static int valid_kind(const char *kind) {
  if (!kind) return 0;
  size_t n = strlen(kind);
  if (n == 0 || n > KDP_CKPT_MAX_KIND) return 0;
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)kind[i] < 0x20 || kind[i] == 0x7f) return 0;
  return 1;
}

int kdp_ckpt_writer_open(kdp_ckpt_writer **wp, const char *final_path, const char *kind,
                         kdp_error *err) {
  if (!wp) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_writer_open: NULL writer pointer");
  *wp = NULL;
  if (!final_path || !*final_path)
    return kdp_fail(err, KDP_EINVAL, "checkpoint writer: empty path");
  if (!valid_kind(kind))
    return kdp_fail(err, KDP_EINVAL,
                    "checkpoint %s: kind must be 1..%d printable characters (\"peer\", "
                    "\"manifest\", \"model\")",
                    final_path, KDP_CKPT_MAX_KIND);
  char *dir = dir_of(final_path);
  int rc = kdp_ckpt_mkdirs(dir, err);
  free(dir);
  if (rc) return rc;

  kdp_ckpt_writer *w = kdp_xcalloc(1, sizeof *w);
  w->final_path = xstrdup(final_path);
  size_t tn = strlen(final_path) + 32;
  w->tmp_path = kdp_xmalloc(tn);
  snprintf(w->tmp_path, tn, "%s.tmp.%ld", final_path, (long)getpid());
  int fd = open(w->tmp_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: cannot create %s: %s", final_path, w->tmp_path,
                  strerror(errno));
    free(w->final_path);
    free(w->tmp_path);
    free(w);
    return rc;
  }
  w->f = fdopen(fd, "wb");
  if (!w->f) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: fdopen: %s", w->tmp_path, strerror(errno));
    close(fd);
    unlink(w->tmp_path);
    free(w->final_path);
    free(w->tmp_path);
    free(w);
    return rc;
  }
  w->crc = (uint32_t)crc32(0L, Z_NULL, 0);
  msgpack_packer_init(&w->pk, w, write_cb);
  if ((rc = w_check(w, msgpack_pack_str_with_body(&w->pk, KDP_CKPT_MAGIC, 7), "header", err)) ||
      (rc = w_check(w, msgpack_pack_unsigned_int(&w->pk, KDP_CKPT_FORMAT_VERSION), "header",
                    err)) ||
      (rc = w_check(w, msgpack_pack_str_with_body(&w->pk, kind, strlen(kind)), "header", err))) {
    kdp_ckpt_writer_abort(w);
    return rc;
  }
  *wp = w;
  return 0;
}

const char *kdp_ckpt_writer_tmp_path(const kdp_ckpt_writer *w) { return w ? w->tmp_path : NULL; }

static void writer_free(kdp_ckpt_writer *w) {
  for (size_t i = 0; i < w->n_names; i++) free(w->names[i]);
  free(w->names);
  free(w->index.slot);
  free(w->final_path);
  free(w->tmp_path);
  free(w);
}

void kdp_ckpt_writer_abort(kdp_ckpt_writer *w) {
  if (!w) return;
  if (w->f) fclose(w->f); /* the file is discarded: its close status does not matter */
  w->f = NULL;
  unlink(w->tmp_path);
  writer_free(w);
}

/* Validates and registers name, then writes "str name, uint tag". */
static int put_head(kdp_ckpt_writer *w, const char *name, int tag, kdp_error *err) {
  if (!w) return kdp_fail(err, KDP_EINVAL, "checkpoint put: NULL writer");
  if (w->failed) return kdp_fail(err, w->failed, "%s", w->first_msg);
  if (!name) return w_fail(w, err, KDP_EINVAL, "checkpoint %s: NULL entry name", w->final_path);
  size_t len = strlen(name);
  if (len == 0 || len > KDP_CKPT_MAX_NAME)
    return w_fail(w, err, KDP_EINVAL, "checkpoint %s: entry name must be 1..%d bytes, got %zu",
                  w->final_path, KDP_CKPT_MAX_NAME, len);
  if (strcmp(name, TRAILER_NAME) == 0)
    return w_fail(w, err, KDP_EINVAL,
                  "checkpoint %s: entry name \"" TRAILER_NAME "\" is reserved for the checksum",
                  w->final_path);
  if (w->n_names == w->cap_names) {
    w->cap_names = w->cap_names ? 2 * w->cap_names : 16;
    char **nn = realloc(w->names, w->cap_names * sizeof *nn);
    if (!nn) return w_fail(w, err, KDP_ENOMEM, "checkpoint %s: out of memory", w->final_path);
    w->names = nn;
  }
  w->names[w->n_names] = xstrdup(name);
  if (index_add(&w->index, w->names, w->n_names)) {
    free(w->names[w->n_names]);
    return w_fail(w, err, KDP_EINVAL, "checkpoint %s: entry '%s' written twice", w->final_path,
                  name);
  }
  w->n_names++;
  int rc;
  if ((rc = w_check(w, msgpack_pack_str_with_body(&w->pk, name, len), name, err))) return rc;
  return w_check(w, msgpack_pack_unsigned_int(&w->pk, (unsigned)tag), name, err);
}

int kdp_ckpt_put_i64(kdp_ckpt_writer *w, const char *name, int64_t v, kdp_error *err) {
  int rc = put_head(w, name, KDP_CKPT_I64, err);
  return rc ? rc : w_check(w, msgpack_pack_int64(&w->pk, v), name, err);
}

int kdp_ckpt_put_u64(kdp_ckpt_writer *w, const char *name, uint64_t v, kdp_error *err) {
  int rc = put_head(w, name, KDP_CKPT_U64, err);
  return rc ? rc : w_check(w, msgpack_pack_uint64(&w->pk, v), name, err);
}

int kdp_ckpt_put_f64(kdp_ckpt_writer *w, const char *name, double v, kdp_error *err) {
  int rc = put_head(w, name, KDP_CKPT_F64, err);
  return rc ? rc : w_check(w, msgpack_pack_double(&w->pk, v), name, err);
}

int kdp_ckpt_put_str(kdp_ckpt_writer *w, const char *name, const char *s, kdp_error *err) {
  if (w && !w->failed && !s)
    return w_fail(w, err, KDP_EINVAL, "checkpoint %s: NULL string for entry '%s'", w->final_path,
                  name ? name : "?");
  size_t len = s ? strlen(s) : 0;
  if (w && !w->failed && len > UINT32_MAX)
    return w_fail(w, err, KDP_EINVAL, "checkpoint %s: string '%s' too long", w->final_path, name);
  int rc = put_head(w, name, KDP_CKPT_STR, err);
  return rc ? rc : w_check(w, msgpack_pack_str_with_body(&w->pk, s, len), name, err);
}

int kdp_ckpt_put_bin(kdp_ckpt_writer *w, const char *name, const void *data, size_t len,
                     kdp_error *err) {
  if (w && !w->failed) {
    if (!data && len)
      return w_fail(w, err, KDP_EINVAL, "checkpoint %s: NULL data for entry '%s'", w->final_path,
                    name ? name : "?");
    if (len > UINT32_MAX)
      return w_fail(w, err, KDP_EINVAL,
                    "checkpoint %s: entry '%s' has %zu bytes, at most %" PRIu32 " fit in one entry",
                    w->final_path, name ? name : "?", len, UINT32_MAX);
  }
  int rc = put_head(w, name, KDP_CKPT_BIN, err);
  if (rc) return rc;
  if ((rc = w_check(w, msgpack_pack_bin(&w->pk, len), name, err))) return rc;
  return w_check(w, msgpack_pack_bin_body(&w->pk, data, len), name, err);
}

int kdp_ckpt_put_f32(kdp_ckpt_writer *w, const char *name, const float *data, size_t ndim,
                     const size_t *dims, kdp_error *err) {
  size_t n = 1;
  if (w && !w->failed) {
    const char *nm = name ? name : "?";
    if (ndim > KDP_CKPT_MAX_DIMS)
      return w_fail(w, err, KDP_EINVAL, "checkpoint %s: tensor '%s' has %zu dims, at most %d",
                    w->final_path, nm, ndim, KDP_CKPT_MAX_DIMS);
    if (ndim && !dims)
      return w_fail(w, err, KDP_EINVAL, "checkpoint %s: NULL dims for tensor '%s'",
                    w->final_path, nm);
    for (size_t d = 0; d < ndim; d++) {
      if (dims[d] && n > SIZE_MAX / dims[d])
        return w_fail(w, err, KDP_EINVAL, "checkpoint %s: tensor '%s' size overflows",
                      w->final_path, nm);
      n *= dims[d];
    }
    if (n > UINT32_MAX / sizeof(float))
      return w_fail(w, err, KDP_EINVAL,
                    "checkpoint %s: tensor '%s' has %zu floats, at most %zu fit in one entry; "
                    "split it",
                    w->final_path, nm, n, (size_t)(UINT32_MAX / sizeof(float)));
    if (n && !data)
      return w_fail(w, err, KDP_EINVAL, "checkpoint %s: NULL data for tensor '%s'",
                    w->final_path, nm);
  }
  int rc = put_head(w, name, KDP_CKPT_F32, err);
  if (rc) return rc;
  if ((rc = w_check(w, msgpack_pack_unsigned_int(&w->pk, (unsigned)ndim), name, err))) return rc;
  if ((rc = w_check(w, msgpack_pack_array(&w->pk, ndim), name, err))) return rc;
  for (size_t d = 0; d < ndim; d++)
    if ((rc = w_check(w, msgpack_pack_uint64(&w->pk, (uint64_t)dims[d]), name, err))) return rc;
  size_t bytes = n * sizeof(float);
  if ((rc = w_check(w, msgpack_pack_bin(&w->pk, bytes), name, err))) return rc;
  if (host_is_le()) return w_check(w, msgpack_pack_bin_body(&w->pk, data, bytes), name, err);
  uint32_t chunk[4096];
  for (size_t i = 0; i < n; i += 4096) {
    size_t m = n - i < 4096 ? n - i : 4096;
    memcpy(chunk, data + i, m * sizeof(float));
    for (size_t j = 0; j < m; j++) chunk[j] = bswap32(chunk[j]);
    if ((rc = w_check(w, msgpack_pack_bin_body(&w->pk, chunk, m * sizeof(float)), name, err)))
      return rc;
  }
  return 0;
}

static int fsync_dir(const char *dir, kdp_error *err) {
  int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return kdp_fail(err, KDP_EIO, "cannot open directory %s: %s", dir, strerror(errno));
  int rc = 0;
  /* Some filesystems cannot fsync a directory (EINVAL): nothing more can be done there. */
  if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP)
    rc = kdp_fail(err, KDP_EIO, "cannot fsync directory %s: %s", dir, strerror(errno));
  close(fd);
  return rc;
}

int kdp_ckpt_writer_commit(kdp_ckpt_writer *w, uint32_t *file_crc, kdp_error *err) {
  if (!w) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_writer_commit: NULL writer");
  int rc = 0;
  if (w->failed) {
    rc = kdp_fail(err, w->failed, "%s", w->first_msg);
    kdp_ckpt_writer_abort(w);
    return rc;
  }
  uint32_t body_crc = w->crc;
  if ((rc = w_check(w, msgpack_pack_str_with_body(&w->pk, TRAILER_NAME, 5), "trailer", err)) ||
      (rc = w_check(w, msgpack_pack_unsigned_int(&w->pk, KDP_CKPT_TAG_CRC32), "trailer", err)) ||
      (rc = w_check(w, msgpack_pack_fix_uint32(&w->pk, body_crc), "trailer", err))) {
    kdp_ckpt_writer_abort(w);
    return rc;
  }
  if (fflush(w->f) != 0) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: cannot flush: %s (check free disk space)",
                  w->tmp_path, strerror(errno));
  } else if (fsync(fileno(w->f)) != 0) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: fsync failed: %s", w->tmp_path, strerror(errno));
  }
  int close_rc = fclose(w->f);
  w->f = NULL;
  if (!rc && close_rc != 0)
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: close failed: %s", w->tmp_path, strerror(errno));
  if (!rc && rename(w->tmp_path, w->final_path) != 0)
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: cannot rename %s onto it: %s", w->final_path,
                  w->tmp_path, strerror(errno));
  if (rc) {
    unlink(w->tmp_path);
    writer_free(w);
    return rc;
  }
  char *dir = dir_of(w->final_path);
  rc = fsync_dir(dir, err);
  free(dir);
  if (!rc && file_crc) *file_crc = w->crc;
  writer_free(w);
  return rc;
}

/* ---- reader ---- */
typedef struct ck_entry {
  int type;
  size_t ndim;
  uint64_t dims[KDP_CKPT_MAX_DIMS];
  size_t count, bytes;
  const uint8_t *data; /* BIN, F32: into ck->buf */
  const char *str;     /* STR: NUL-terminated copy in ck->strs */
  union {
    int64_t i;
    uint64_t u;
    double f;
  } v;
} ck_entry;

struct kdp_ckpt {
  uint8_t *buf;
  size_t len;
  char *strs; /* arena for NUL-terminated copies of names and strings; fits in len + 1 bytes */
  size_t strs_used;
  char label[512];
  char kind[KDP_CKPT_MAX_KIND + 1];
  unsigned version;
  uint32_t crc;
  ck_entry *e;
  char **names; /* names[i] is entry i's name */
  size_t n, cap;
  name_index index;
};

void kdp_ckpt_free(kdp_ckpt *ck) {
  if (!ck) return;
  free(ck->buf);
  free(ck->strs);
  free(ck->e);
  free(ck->names);
  free(ck->index.slot);
  free(ck);
}

/* Decodes one msgpack object that is not an array or map at *off (advanced on success only).
   KDP_EIO when the data ends inside it, KDP_EFORMAT when malformed or a container: containers
   would let a few hostile bytes ask msgpack for gigabytes. */
static int next_scalar(const kdp_ckpt *ck, size_t len, size_t *off, msgpack_unpacked *u,
                       msgpack_object *obj) {
  if (*off >= len) return KDP_EIO;
  uint8_t b = ck->buf[*off];
  if ((b >= 0x80 && b <= 0x9f) || (b >= 0xdc && b <= 0xdf)) return KDP_EFORMAT;
  size_t o = *off;
  msgpack_unpack_return r = msgpack_unpack_next(u, (const char *)ck->buf, len, &o);
  if (r == MSGPACK_UNPACK_SUCCESS || r == MSGPACK_UNPACK_EXTRA_BYTES) {
    *obj = u->data;
    *off = o;
    return 0;
  }
  if (r == MSGPACK_UNPACK_CONTINUE) return KDP_EIO;
  if (r == MSGPACK_UNPACK_NOMEM_ERROR) return KDP_ENOMEM;
  return KDP_EFORMAT;
}

/* NUL-terminated copy of a msgpack str in the arena; NULL if it contains a NUL byte. */
static const char *arena_str(kdp_ckpt *ck, const char *p, size_t n) {
  if (n && memchr(p, 0, n)) return NULL;
  char *d = ck->strs + ck->strs_used;
  if (n) memcpy(d, p, n); /* msgpack gives a NULL pointer for an empty str */
  d[n] = '\0';
  ck->strs_used += n + 1;
  return d;
}

static int uint_of(const msgpack_object *o, uint64_t *v) {
  if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return 0;
  *v = o->via.u64;
  return 1;
}

static int parse_entries(kdp_ckpt *ck, size_t off, size_t end, msgpack_unpacked *u,
                         kdp_error *err) {
  const char *L = ck->label;
  while (off < end) {
    size_t at = off;
    msgpack_object o;
    int rc = next_scalar(ck, end, &off, u, &o);
    if (rc == KDP_ENOMEM) return kdp_fail(err, rc, "checkpoint %s: out of memory", L);
    if (rc || o.type != MSGPACK_OBJECT_STR || o.via.str.size == 0 ||
        o.via.str.size > KDP_CKPT_MAX_NAME)
      return kdp_fail(err, KDP_EFORMAT,
                      "checkpoint %s: malformed: expected an entry name at byte %zu", L, at);
    const char *name = arena_str(ck, o.via.str.ptr, o.via.str.size);
    if (!name)
      return kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed: NUL in entry name at byte %zu",
                      L, at);
    uint64_t tag;
    rc = next_scalar(ck, end, &off, u, &o);
    if (rc || !uint_of(&o, &tag))
      return kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed: no type tag for entry '%s'", L,
                      name);
    ck_entry e;
    memset(&e, 0, sizeof e);
    e.type = (int)(tag <= KDP_CKPT_F32 ? tag : 0);
    e.count = 1;
    e.bytes = 8;
    const char *bad = NULL;
    switch (tag) {
      case KDP_CKPT_I64:
        rc = next_scalar(ck, end, &off, u, &o);
        if (!rc && o.type == MSGPACK_OBJECT_NEGATIVE_INTEGER) e.v.i = o.via.i64;
        else if (!rc && o.type == MSGPACK_OBJECT_POSITIVE_INTEGER && o.via.u64 <= INT64_MAX)
          e.v.i = (int64_t)o.via.u64;
        else bad = "an int64";
        break;
      case KDP_CKPT_U64:
        rc = next_scalar(ck, end, &off, u, &o);
        if (rc || !uint_of(&o, &e.v.u)) bad = "a uint64";
        break;
      case KDP_CKPT_F64:
        rc = next_scalar(ck, end, &off, u, &o);
        if (!rc && o.type == MSGPACK_OBJECT_FLOAT64) e.v.f = o.via.f64;
        else bad = "a float64";
        break;
      case KDP_CKPT_STR:
        rc = next_scalar(ck, end, &off, u, &o);
        if (rc || o.type != MSGPACK_OBJECT_STR ||
            !(e.str = arena_str(ck, o.via.str.ptr, o.via.str.size)))
          bad = "a string without NUL bytes";
        else e.count = e.bytes = o.via.str.size;
        break;
      case KDP_CKPT_BIN:
        rc = next_scalar(ck, end, &off, u, &o);
        if (rc || o.type != MSGPACK_OBJECT_BIN) bad = "bytes";
        else {
          e.data = (const uint8_t *)o.via.bin.ptr;
          e.count = e.bytes = o.via.bin.size;
        }
        break;
      case KDP_CKPT_F32: {
        uint64_t ndim = 0;
        rc = next_scalar(ck, end, &off, u, &o);
        if (rc || !uint_of(&o, &ndim) || ndim > KDP_CKPT_MAX_DIMS) {
          bad = "a tensor rank (at most 8)";
          break;
        }
        /* the dims array header, decoded here so no container reaches msgpack */
        uint64_t cnt;
        if (off >= end) { bad = "a dims array"; break; }
        uint8_t b = ck->buf[off];
        if (b >= 0x90 && b <= 0x9f) {
          cnt = b & 0x0f;
          off += 1;
        } else if (b == 0xdc && end - off >= 3) {
          cnt = (uint64_t)ck->buf[off + 1] << 8 | ck->buf[off + 2];
          off += 3;
        } else if (b == 0xdd && end - off >= 5) {
          cnt = (uint64_t)ck->buf[off + 1] << 24 | (uint64_t)ck->buf[off + 2] << 16 |
                (uint64_t)ck->buf[off + 3] << 8 | ck->buf[off + 4];
          off += 5;
        } else {
          bad = "a dims array";
          break;
        }
        if (cnt != ndim) { bad = "as many dims as its rank"; break; }
        e.ndim = (size_t)ndim;
        uint64_t n = 1;
        int overflow = 0;
        for (size_t d = 0; d < e.ndim && !bad; d++) {
          rc = next_scalar(ck, end, &off, u, &o);
          if (rc || !uint_of(&o, &e.dims[d])) bad = "unsigned dims";
          else if (e.dims[d] && n > (SIZE_MAX / 4) / e.dims[d]) overflow = 1;
          else n *= e.dims[d];
        }
        if (bad) break;
        if (overflow) { bad = "a size that fits in memory"; break; }
        rc = next_scalar(ck, end, &off, u, &o);
        if (rc || o.type != MSGPACK_OBJECT_BIN) { bad = "float32 data"; break; }
        if ((uint64_t)o.via.bin.size != 4 * n) {
          bad = "4 * prod(dims) bytes of data";
          break;
        }
        e.data = (const uint8_t *)o.via.bin.ptr;
        e.count = (size_t)n;
        e.bytes = o.via.bin.size;
        break;
      }
      default:
        return kdp_fail(err, KDP_EFORMAT,
                        "checkpoint %s: entry '%s' has unknown type tag %" PRIu64
                        " (written by a newer kdpeers?)",
                        L, name, tag);
    }
    if (bad)
      return kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed: entry '%s' (%s) should hold %s",
                      L, name, kdp_ckpt_type_name(e.type), bad);
    if (ck->n == ck->cap) {
      size_t ncap = ck->cap ? 2 * ck->cap : 16;
      ck_entry *ne = realloc(ck->e, ncap * sizeof *ne);
      if (ne) ck->e = ne;
      char **nn = realloc(ck->names, ncap * sizeof *nn);
      if (nn) ck->names = nn;
      if (!ne || !nn) return kdp_fail(err, KDP_ENOMEM, "checkpoint %s: out of memory", L);
      ck->cap = ncap;
    }
    ck->e[ck->n] = e;
    ck->names[ck->n] = (char *)name;
    if (index_add(&ck->index, ck->names, ck->n))
      return kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed: entry '%s' appears twice", L,
                      name);
    ck->n++;
  }
  return 0;
}

/* Parses ck->buf[0..len) (owned by ck). */
static int parse_owned(kdp_ckpt *ck, kdp_error *err) {
  const char *L = ck->label;
  const uint8_t *b = ck->buf;
  size_t len = ck->len;
  size_t m = len < sizeof k_magic_enc ? len : sizeof k_magic_enc;
  if (memcmp(b, k_magic_enc, m) != 0)
    return kdp_fail(err, KDP_EFORMAT, "%s: not a kdpeers checkpoint (bad magic)", L);
  if (len < sizeof k_magic_enc)
    return kdp_fail(err, KDP_EIO, "checkpoint %s: truncated (%zu bytes)", L, len);
  ck->strs = malloc(len + 1);
  if (!ck->strs) return kdp_fail(err, KDP_ENOMEM, "checkpoint %s: out of memory", L);

  msgpack_unpacked u;
  msgpack_unpacked_init(&u);
  msgpack_object o;
  size_t off = sizeof k_magic_enc;
  uint64_t version = 0;
  int rc = next_scalar(ck, len, &off, &u, &o);
  if (rc == KDP_EIO) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: truncated in the header", L);
    goto done;
  }
  if (rc || !uint_of(&o, &version) || version == 0) {
    rc = kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed header (format version)", L);
    goto done;
  }
  if (version > KDP_CKPT_FORMAT_VERSION) {
    rc = kdp_fail(err, KDP_EFORMAT,
                  "checkpoint %s: written by a newer kdpeers (format %" PRIu64
                  ", this build reads %d); upgrade kdpeers to read it",
                  L, version, KDP_CKPT_FORMAT_VERSION);
    goto done;
  }
  ck->version = (unsigned)version;
  rc = next_scalar(ck, len, &off, &u, &o);
  if (rc == KDP_EIO) {
    rc = kdp_fail(err, KDP_EIO, "checkpoint %s: truncated in the header", L);
    goto done;
  }
  if (rc || o.type != MSGPACK_OBJECT_STR || o.via.str.size == 0 ||
      o.via.str.size > KDP_CKPT_MAX_KIND || memchr(o.via.str.ptr, 0, o.via.str.size)) {
    rc = kdp_fail(err, KDP_EFORMAT, "checkpoint %s: malformed header (kind)", L);
    goto done;
  }
  memcpy(ck->kind, o.via.str.ptr, o.via.str.size);
  ck->kind[o.via.str.size] = '\0';

  if (len - off < TRAILER_LEN || memcmp(b + len - TRAILER_LEN, k_trailer_head, 8) != 0) {
    rc = kdp_fail(err, KDP_EIO,
                  "checkpoint %s: truncated (%zu bytes, no checksum trailer at the end): it was "
                  "not completely written, was cut short when copied, or has bytes appended",
                  L, len);
    goto done;
  }
  const uint8_t *t = b + len - 4;
  uint32_t stored = (uint32_t)t[0] << 24 | (uint32_t)t[1] << 16 | (uint32_t)t[2] << 8 | t[3];
  uint32_t crc = (uint32_t)crc32_z(crc32(0L, Z_NULL, 0), b, len - TRAILER_LEN);
  if (crc != stored) {
    rc = kdp_fail(err, KDP_EFORMAT,
                  "checkpoint %s: checksum mismatch: file is corrupt (stored crc32 %08" PRIx32
                  ", computed %08" PRIx32 ")",
                  L, stored, crc);
    goto done;
  }
  ck->crc = crc;
  rc = parse_entries(ck, off, len - TRAILER_LEN, &u, err);
done:
  msgpack_unpacked_destroy(&u);
  return rc;
}

static int parse_take(uint8_t *buf, size_t len, const char *label, kdp_ckpt **out,
                      kdp_error *err) {
  kdp_ckpt *ck = kdp_xcalloc(1, sizeof *ck);
  ck->buf = buf;
  ck->len = len;
  snprintf(ck->label, sizeof ck->label, "%s", label);
  int rc = parse_owned(ck, err);
  if (rc) {
    kdp_ckpt_free(ck);
    return rc;
  }
  *out = ck;
  return 0;
}

int kdp_ckpt_parse_buffer(const void *buf, size_t len, size_t max_bytes, kdp_ckpt **out,
                          kdp_error *err) {
  if (!out) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_parse_buffer: NULL output");
  *out = NULL;
  if (!buf && len) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_parse_buffer: NULL buffer");
  if (len > max_bytes)
    return kdp_fail(err, KDP_EIO,
                    "checkpoint <buffer>: %zu bytes, more than the limit of %zu bytes", len,
                    max_bytes);
  uint8_t *copy = malloc(len ? len : 1);
  if (!copy)
    return kdp_fail(err, KDP_ENOMEM, "checkpoint <buffer>: out of memory (%zu bytes)", len);
  if (len) memcpy(copy, buf, len);
  return parse_take(copy, len, "<buffer>", out, err);
}

int kdp_ckpt_read(const char *path, size_t max_bytes, kdp_ckpt **out, kdp_error *err) {
  if (!out) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_read: NULL output");
  *out = NULL;
  if (!path) return kdp_fail(err, KDP_EINVAL, "kdp_ckpt_read: NULL path");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return kdp_fail(err, KDP_EIO, "cannot open checkpoint %s: %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int rc = kdp_fail(err, KDP_EIO, "cannot stat checkpoint %s: %s", path, strerror(errno));
    close(fd);
    return rc;
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return kdp_fail(err, KDP_EIO, "checkpoint %s: not a regular file", path);
  }
  if ((uint64_t)st.st_size > (uint64_t)max_bytes) {
    close(fd);
    return kdp_fail(err, KDP_EIO,
                    "checkpoint %s is %lld bytes, more than the limit of %zu bytes; refusing to "
                    "load it (raise the limit if the file is genuine)",
                    path, (long long)st.st_size, max_bytes);
  }
  size_t len = (size_t)st.st_size;
  uint8_t *buf = malloc(len ? len : 1);
  if (!buf) {
    close(fd);
    return kdp_fail(err, KDP_ENOMEM, "checkpoint %s: out of memory (%zu bytes)", path, len);
  }
  size_t got = 0;
  while (got < len) {
    ssize_t r = read(fd, buf + got, len - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      int rc = kdp_fail(err, KDP_EIO, "cannot read checkpoint %s: %s", path, strerror(errno));
      free(buf);
      close(fd);
      return rc;
    }
    if (r == 0) break; /* shrank while reading: parse what is there (it will be "truncated") */
    got += (size_t)r;
  }
  close(fd);
  return parse_take(buf, got, path, out, err);
}

const char *kdp_ckpt_kind(const kdp_ckpt *ck) { return ck->kind; }
unsigned kdp_ckpt_version(const kdp_ckpt *ck) { return ck->version; }
uint32_t kdp_ckpt_crc(const kdp_ckpt *ck) { return ck->crc; }
size_t kdp_ckpt_count(const kdp_ckpt *ck) { return ck->n; }

int kdp_ckpt_has(const kdp_ckpt *ck, const char *name) {
  return ck && name && index_find(&ck->index, ck->names, name) != SIZE_MAX;
}

static void fill_info(const kdp_ckpt *ck, size_t i, kdp_ckpt_info *info) {
  const ck_entry *e = &ck->e[i];
  memset(info, 0, sizeof *info);
  info->name = ck->names[i];
  info->type = e->type;
  info->ndim = e->ndim;
  memcpy(info->dims, e->dims, sizeof info->dims);
  info->count = e->count;
  info->bytes = e->bytes;
}

int kdp_ckpt_entry(const kdp_ckpt *ck, size_t i, kdp_ckpt_info *info) {
  if (!ck || i >= ck->n || !info) return KDP_EINVAL;
  fill_info(ck, i, info);
  return 0;
}

/* Entry i of name and type, or a KDP_EMISMATCH message. */
static int lookup(const kdp_ckpt *ck, const char *name, int type, size_t *idx, kdp_error *err) {
  if (!ck || !name) return kdp_fail(err, KDP_EINVAL, "checkpoint get: NULL argument");
  size_t i = index_find(&ck->index, ck->names, name);
  if (i == SIZE_MAX)
    return kdp_fail(err, KDP_EMISMATCH,
                    "checkpoint %s (kind \"%s\") has no entry '%s'; was it written by another "
                    "configuration or version?",
                    ck->label, ck->kind, name);
  if (type && ck->e[i].type != type)
    return kdp_fail(err, KDP_EMISMATCH, "checkpoint %s: entry '%s' is %s, expected %s", ck->label,
                    name, kdp_ckpt_type_name(ck->e[i].type), kdp_ckpt_type_name(type));
  *idx = i;
  return 0;
}

int kdp_ckpt_info_of(const kdp_ckpt *ck, const char *name, kdp_ckpt_info *info, kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, 0, &i, err);
  if (!rc && info) fill_info(ck, i, info);
  return rc;
}

int kdp_ckpt_get_i64(const kdp_ckpt *ck, const char *name, int64_t *out, kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_I64, &i, err);
  if (!rc) *out = ck->e[i].v.i;
  return rc;
}

int kdp_ckpt_get_u64(const kdp_ckpt *ck, const char *name, uint64_t *out, kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_U64, &i, err);
  if (!rc) *out = ck->e[i].v.u;
  return rc;
}

int kdp_ckpt_get_f64(const kdp_ckpt *ck, const char *name, double *out, kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_F64, &i, err);
  if (!rc) *out = ck->e[i].v.f;
  return rc;
}

int kdp_ckpt_get_str(const kdp_ckpt *ck, const char *name, const char **out, kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_STR, &i, err);
  if (!rc) *out = ck->e[i].str;
  return rc;
}

int kdp_ckpt_get_bin(const kdp_ckpt *ck, const char *name, const void **data, size_t *len,
                     kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_BIN, &i, err);
  if (!rc) {
    *data = ck->e[i].data;
    *len = ck->e[i].bytes;
  }
  return rc;
}

int kdp_ckpt_get_f32(const kdp_ckpt *ck, const char *name, float *out, size_t expected_n,
                     kdp_error *err) {
  size_t i;
  int rc = lookup(ck, name, KDP_CKPT_F32, &i, err);
  if (rc) return rc;
  const ck_entry *e = &ck->e[i];
  if (e->count != expected_n)
    return kdp_fail(err, KDP_EMISMATCH,
                    "checkpoint %s: tensor '%s' has %zu floats, expected %zu (the model or its "
                    "configuration differs from the one that wrote the checkpoint)",
                    ck->label, name, e->count, expected_n);
  if (expected_n && !out) return kdp_fail(err, KDP_EINVAL, "checkpoint get: NULL output buffer");
  if (expected_n) memcpy(out, e->data, e->bytes);
  if (!host_is_le()) {
    uint32_t *p = (uint32_t *)(void *)out;
    for (size_t j = 0; j < expected_n; j++) p[j] = bswap32(p[j]);
  }
  return 0;
}

int kdp_ckpt_file_crc(const char *path, uint64_t *size, uint32_t *crc, kdp_error *err) {
  FILE *f = fopen(path, "rbe");
  if (!f) return kdp_fail(err, KDP_EIO, "cannot open %s: %s", path, strerror(errno));
  uint8_t buf[1 << 16];
  uint32_t c = (uint32_t)crc32(0L, Z_NULL, 0);
  uint64_t total = 0;
  size_t r;
  while ((r = fread(buf, 1, sizeof buf, f)) > 0) {
    c = (uint32_t)crc32_z(c, buf, r);
    total += r;
  }
  int rc = 0;
  if (ferror(f)) rc = kdp_fail(err, KDP_EIO, "cannot read %s: %s", path, strerror(errno));
  fclose(f);
  if (!rc) {
    if (size) *size = total;
    if (crc) *crc = c;
  }
  return rc;
}

/* ---- describe ---- */
static void print_shape(FILE *f, const kdp_ckpt_info *in) {
  char s[160];
  size_t k = 0;
  k += (size_t)snprintf(s + k, sizeof s - k, "[");
  for (size_t d = 0; d < in->ndim && k < sizeof s; d++)
    k += (size_t)snprintf(s + k, sizeof s - k, "%s%" PRIu64, d ? "," : "", in->dims[d]);
  if (k < sizeof s) snprintf(s + k, sizeof s - k, "]");
  fprintf(f, "%-18s", s);
}

int kdp_ckpt_describe(const char *path, FILE *f) {
  kdp_error err = {{0}};
  kdp_ckpt *ck = NULL;
  int rc = kdp_ckpt_read(path, KDP_CKPT_DEFAULT_MAX_BYTES, &ck, &err);
  if (rc) {
    fprintf(f, "%s: %s\n", path, err.msg);
    return rc;
  }
  fprintf(f, "%s: kdpeers checkpoint, kind \"%s\", format %u, %zu bytes, crc32 %08" PRIx32
             " ok, %zu entries\n",
          path, ck->kind, ck->version, ck->len, ck->crc, ck->n);
  fprintf(f, "  %-32s %-4s %-18s %12s  %s\n", "name", "type", "shape", "bytes", "value");
  for (size_t i = 0; i < ck->n; i++) {
    kdp_ckpt_info in;
    fill_info(ck, i, &in);
    const ck_entry *e = &ck->e[i];
    fprintf(f, "  %-32s %-4s ", in.name, kdp_ckpt_type_name(in.type));
    if (in.type == KDP_CKPT_F32) print_shape(f, &in);
    else fprintf(f, "%-18s", in.type == KDP_CKPT_STR || in.type == KDP_CKPT_BIN ? "" : "scalar");
    fprintf(f, " %12zu  ", in.bytes);
    switch (in.type) {
      case KDP_CKPT_I64: fprintf(f, "%" PRId64, e->v.i); break;
      case KDP_CKPT_U64: fprintf(f, "%" PRIu64, e->v.u); break;
      case KDP_CKPT_F64: {
        char num[40];
        snprintf(num, sizeof num, "%.15g", e->v.f); /* shortest form that reads back exactly */
        if (strtod(num, NULL) != e->v.f) snprintf(num, sizeof num, "%.17g", e->v.f);
        fprintf(f, "%s", num);
        break;
      }
      case KDP_CKPT_STR: {
        int printable = in.bytes <= 80;
        for (size_t j = 0; j < in.bytes && printable; j++)
          if ((unsigned char)e->str[j] < 0x20 || e->str[j] == '"') printable = 0;
        if (printable) fprintf(f, "\"%s\"", e->str);
        break;
      }
      case KDP_CKPT_BIN:
        if (in.bytes <= 16)
          for (size_t j = 0; j < in.bytes; j++) fprintf(f, "%02x", e->data[j]);
        break;
      case KDP_CKPT_F32:
        if (in.count == 1) {
          float v;
          kdp_ckpt_get_f32(ck, in.name, &v, 1, NULL);
          fprintf(f, "%.9g", (double)v);
        }
        break;
      default: break;
    }
    fprintf(f, "\n");
  }
  kdp_ckpt_free(ck);
  return 0;
}

/* ---- checkpoint directories ---- */
int kdp_ckpt_step_dir(const char *run_dir, int64_t step, char *buf, size_t n) {
  if (!run_dir || !buf || step < 0) return KDP_EINVAL;
  int k = snprintf(buf, n, "%s/checkpoints/step-%012" PRId64, run_dir, step);
  return k < 0 || (size_t)k >= n ? KDP_EINVAL : 0;
}

static int step_file(const char *run_dir, int64_t step, const char *base, char *buf, size_t n) {
  if (!run_dir || !buf || step < 0) return KDP_EINVAL;
  int k = snprintf(buf, n, "%s/checkpoints/step-%012" PRId64 "/%s", run_dir, step, base);
  return k < 0 || (size_t)k >= n ? KDP_EINVAL : 0;
}

int kdp_ckpt_peer_path(const char *run_dir, int64_t step, int peer, char *buf, size_t n) {
  if (peer < 0 || peer >= MAX_PEERS) return KDP_EINVAL;
  char base[32];
  snprintf(base, sizeof base, "peer-%03d.kdpc", peer);
  return step_file(run_dir, step, base, buf, n);
}

int kdp_ckpt_manifest_path(const char *run_dir, int64_t step, char *buf, size_t n) {
  return step_file(run_dir, step, MANIFEST_NAME, buf, n);
}

int kdp_ckpt_write_manifest(const char *run_dir, int64_t step, int n_peers, const uint32_t *crcs,
                            kdp_error *err) {
  if (!run_dir || step < 0 || n_peers < 1 || n_peers > MAX_PEERS || !crcs)
    return kdp_fail(err, KDP_EINVAL,
                    "checkpoint manifest: bad arguments (step %" PRId64 ", %d peers)", step,
                    n_peers);
  char path[4096], mpath[4096];
  if (kdp_ckpt_manifest_path(run_dir, step, mpath, sizeof mpath))
    return kdp_fail(err, KDP_EINVAL, "checkpoint manifest: run directory path too long");
  uint64_t *sizes = kdp_xcalloc((size_t)n_peers, sizeof *sizes);
  int rc = 0;
  for (int i = 0; i < n_peers && !rc; i++) {
    struct stat st;
    kdp_ckpt_peer_path(run_dir, step, i, path, sizeof path);
    if (stat(path, &st) != 0)
      rc = kdp_fail(err, KDP_EIO,
                    "checkpoint manifest: peer file %s: %s (did every rank commit its file "
                    "before rank 0 wrote the manifest?)",
                    path, strerror(errno));
    else sizes[i] = (uint64_t)st.st_size;
  }
  kdp_ckpt_writer *w = NULL;
  if (!rc) rc = kdp_ckpt_writer_open(&w, mpath, "manifest", err);
  if (!rc) rc = kdp_ckpt_put_u64(w, "step", (uint64_t)step, err);
  if (!rc) rc = kdp_ckpt_put_u64(w, "n_peers", (uint64_t)n_peers, err);
  if (!rc) rc = kdp_ckpt_put_str(w, "kdpeers", KDP_VERSION, err);
  for (int i = 0; i < n_peers && !rc; i++) {
    char key[64], base[32];
    snprintf(base, sizeof base, "peer-%03d.kdpc", i);
    snprintf(key, sizeof key, "peer.%03d.file", i);
    rc = kdp_ckpt_put_str(w, key, base, err);
    snprintf(key, sizeof key, "peer.%03d.size", i);
    if (!rc) rc = kdp_ckpt_put_u64(w, key, sizes[i], err);
    snprintf(key, sizeof key, "peer.%03d.crc32", i);
    if (!rc) rc = kdp_ckpt_put_u64(w, key, crcs[i], err);
  }
  free(sizes);
  if (rc) {
    kdp_ckpt_writer_abort(w);
    return rc;
  }
  return kdp_ckpt_writer_commit(w, NULL, err);
}

int kdp_ckpt_verify_step(const char *run_dir, int64_t step, int *n_peers_out, kdp_error *err) {
  char mpath[4096], path[4096];
  if (kdp_ckpt_manifest_path(run_dir, step, mpath, sizeof mpath))
    return kdp_fail(err, KDP_EINVAL, "checkpoint: bad run directory or step %" PRId64, step);
  struct stat st;
  if (stat(mpath, &st) != 0)
    return kdp_fail(err, KDP_EIO, "no manifest %s (the checkpoint was not completed)", mpath);
  kdp_ckpt *ck = NULL;
  int rc = kdp_ckpt_read(mpath, MANIFEST_MAX_BYTES, &ck, err);
  if (rc) return rc;
  uint64_t mstep = 0, np = 0;
  if (strcmp(ck->kind, "manifest") != 0)
    rc = kdp_fail(err, KDP_EFORMAT, "%s: kind \"%s\", expected \"manifest\"", mpath, ck->kind);
  if (!rc) rc = kdp_ckpt_get_u64(ck, "step", &mstep, err);
  if (!rc) rc = kdp_ckpt_get_u64(ck, "n_peers", &np, err);
  if (!rc && mstep != (uint64_t)step)
    rc = kdp_fail(err, KDP_EMISMATCH, "%s: manifest is for step %" PRIu64 ", not %" PRId64, mpath,
                  mstep, step);
  if (!rc && (np < 1 || np > MAX_PEERS))
    rc = kdp_fail(err, KDP_EFORMAT, "%s: bad peer count %" PRIu64, mpath, np);
  for (uint64_t i = 0; i < np && !rc; i++) {
    char key[64], base[32];
    const char *file;
    uint64_t want_size, want_crc, size;
    uint32_t crc;
    snprintf(base, sizeof base, "peer-%03d.kdpc", (int)i);
    snprintf(key, sizeof key, "peer.%03d.file", (int)i);
    if ((rc = kdp_ckpt_get_str(ck, key, &file, err))) break;
    if (strcmp(file, base) != 0) {
      rc = kdp_fail(err, KDP_EFORMAT, "%s: %s is \"%s\", expected \"%s\"", mpath, key, file, base);
      break;
    }
    snprintf(key, sizeof key, "peer.%03d.size", (int)i);
    if ((rc = kdp_ckpt_get_u64(ck, key, &want_size, err))) break;
    snprintf(key, sizeof key, "peer.%03d.crc32", (int)i);
    if ((rc = kdp_ckpt_get_u64(ck, key, &want_crc, err))) break;
    kdp_ckpt_peer_path(run_dir, step, (int)i, path, sizeof path);
    if (stat(path, &st) != 0) {
      rc = kdp_fail(err, KDP_EIO, "peer file %s listed in the manifest is missing: %s", path,
                    strerror(errno));
      break;
    }
    if ((uint64_t)st.st_size != want_size) {
      rc = kdp_fail(err, KDP_EMISMATCH, "peer file %s is %lld bytes, the manifest says %" PRIu64,
                    path, (long long)st.st_size, want_size);
      break;
    }
    if ((rc = kdp_ckpt_file_crc(path, &size, &crc, err))) break;
    if (size != want_size || crc != want_crc)
      rc = kdp_fail(err, KDP_EFORMAT,
                    "peer file %s: checksum mismatch: file is corrupt (crc32 %08" PRIx32
                    ", manifest says %08" PRIx64 ")",
                    path, crc, want_crc);
  }
  if (!rc && n_peers_out) *n_peers_out = (int)np;
  kdp_ckpt_free(ck);
  return rc;
}

/* Steps of RUN_DIR/checkpoints/step-* directories, sorted newest first. */
static int cmp_desc(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? 1 : x > y ? -1 : 0;
}

static int list_steps(const char *run_dir, int64_t **steps, size_t *n, kdp_error *err) {
  *steps = NULL;
  *n = 0;
  if (!run_dir) return kdp_fail(err, KDP_EINVAL, "checkpoint: NULL run directory");
  char dir[4096];
  int k = snprintf(dir, sizeof dir, "%s/checkpoints", run_dir);
  if (k < 0 || (size_t)k >= sizeof dir)
    return kdp_fail(err, KDP_EINVAL, "checkpoint: run directory path too long");
  DIR *d = opendir(dir);
  if (!d) {
    if (errno == ENOENT) return 0;
    return kdp_fail(err, KDP_EIO, "cannot list %s: %s", dir, strerror(errno));
  }
  size_t cap = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    const char *s = de->d_name;
    if (strncmp(s, "step-", 5) != 0) continue;
    size_t nd = strlen(s + 5);
    if (nd < 12 || nd > 18 || strspn(s + 5, "0123456789") != nd) continue;
    int64_t step = strtoll(s + 5, NULL, 10);
    char canon[64], full[4400];
    snprintf(canon, sizeof canon, "step-%012" PRId64, step);
    if (strcmp(canon, s) != 0) continue;
    snprintf(full, sizeof full, "%s/%s", dir, s);
    struct stat st;
    if (lstat(full, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    if (*n == cap) {
      cap = cap ? 2 * cap : 16;
      int64_t *ns = realloc(*steps, cap * sizeof *ns);
      if (!ns) {
        closedir(d);
        free(*steps);
        *steps = NULL;
        return kdp_fail(err, KDP_ENOMEM, "out of memory listing %s", dir);
      }
      *steps = ns;
    }
    (*steps)[(*n)++] = step;
  }
  closedir(d);
  if (*n) qsort(*steps, *n, sizeof **steps, cmp_desc);
  return 0;
}

int kdp_ckpt_find_latest(const char *run_dir, int64_t *step, kdp_error *err) {
  int64_t *steps;
  size_t n;
  int rc = list_steps(run_dir, &steps, &n, err);
  if (rc) return rc;
  int found = 0, unusable = 0; /* unusable: published (a manifest) but failing verification */
  int64_t newest_bad = -1;
  kdp_error newest_why = {{0}};
  for (size_t i = 0; i < n && !found; i++) {
    kdp_error why = {{0}};
    if (kdp_ckpt_verify_step(run_dir, steps[i], NULL, &why) == 0) {
      if (step) *step = steps[i];
      found = 1;
    } else {
      char dir[4096], mpath[4096];
      struct stat st;
      kdp_ckpt_step_dir(run_dir, steps[i], dir, sizeof dir);
      kdp_ckpt_manifest_path(run_dir, steps[i], mpath, sizeof mpath);
      if (stat(mpath, &st) == 0 && unusable++ == 0) {
        newest_bad = steps[i];
        newest_why = why;
      }
      fprintf(stderr, "kdpeers: warning: skipping checkpoint %s: %s\n", dir, why.msg);
    }
  }
  free(steps);
  if (!found && unusable)
    return kdp_fail(err, KDP_EFORMAT,
                    "%s/checkpoints holds %d completed checkpoint%s but none is usable (the "
                    "newest, step %" PRId64 ": %s); nothing was deleted",
                    run_dir, unusable, unusable == 1 ? "" : "s", newest_bad, newest_why.msg);
  return found;
}

static int is_tmp_name(const char *s) { return strstr(s, ".tmp.") != NULL; }

/* rm -rf path (no symlinks followed). */
static int remove_tree(const char *path, kdp_error *err) {
  struct stat st;
  if (lstat(path, &st) != 0)
    return errno == ENOENT ? 0
                           : kdp_fail(err, KDP_EIO, "cannot stat %s: %s", path, strerror(errno));
  if (!S_ISDIR(st.st_mode)) {
    if (unlink(path) != 0 && errno != ENOENT)
      return kdp_fail(err, KDP_EIO, "cannot remove %s: %s", path, strerror(errno));
    return 0;
  }
  DIR *d = opendir(path);
  if (!d) return kdp_fail(err, KDP_EIO, "cannot list %s: %s", path, strerror(errno));
  int rc = 0;
  struct dirent *de;
  size_t pl = strlen(path);
  while (!rc && (de = readdir(d)) != NULL) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    size_t cl = pl + 1 + strlen(de->d_name) + 1;
    char *child = kdp_xmalloc(cl);
    snprintf(child, cl, "%s/%s", path, de->d_name);
    rc = remove_tree(child, err);
    free(child);
  }
  closedir(d);
  if (!rc && rmdir(path) != 0 && errno != ENOENT)
    rc = kdp_fail(err, KDP_EIO, "cannot remove directory %s: %s", path, strerror(errno));
  return rc;
}

/* Removes *.tmp.* regular files directly in dir. */
static int remove_tmp_files(const char *dir, kdp_error *err) {
  DIR *d = opendir(dir);
  if (!d) return errno == ENOENT ? 0 : kdp_fail(err, KDP_EIO, "cannot list %s: %s", dir,
                                                  strerror(errno));
  int rc = 0;
  struct dirent *de;
  while (!rc && (de = readdir(d)) != NULL) {
    if (!is_tmp_name(de->d_name)) continue;
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    struct stat st;
    if (lstat(path, &st) != 0 || S_ISDIR(st.st_mode)) continue;
    if (unlink(path) != 0 && errno != ENOENT)
      rc = kdp_fail(err, KDP_EIO, "cannot remove %s: %s", path, strerror(errno));
  }
  closedir(d);
  return rc;
}

static int remove_step(const char *run_dir, int64_t step, kdp_error *err) {
  char dir[4096], mpath[4096];
  kdp_ckpt_step_dir(run_dir, step, dir, sizeof dir);
  kdp_ckpt_manifest_path(run_dir, step, mpath, sizeof mpath);
  /* un-publish first: a half-removed checkpoint must not look complete */
  if (unlink(mpath) != 0 && errno != ENOENT)
    return kdp_fail(err, KDP_EIO, "cannot remove %s: %s", mpath, strerror(errno));
  return remove_tree(dir, err);
}

int kdp_ckpt_prune(const char *run_dir, int keep, kdp_error *err) {
  if (keep < 1)
    return kdp_fail(err, KDP_EINVAL, "checkpoint prune: keep must be >= 1, got %d", keep);
  int64_t *steps;
  size_t n;
  int rc = list_steps(run_dir, &steps, &n, err);
  if (rc) return rc;
  int kept = 0;
  for (size_t i = 0; i < n && !rc; i++) {
    char dir[4096];
    kdp_ckpt_step_dir(run_dir, steps[i], dir, sizeof dir);
    if (kept >= keep) {
      rc = remove_step(run_dir, steps[i], err); /* older than the kept ones: complete or not */
      continue;
    }
    int complete = kdp_ckpt_verify_step(run_dir, steps[i], NULL, NULL) == 0;
    if (complete) {
      kept++;
      rc = remove_tmp_files(dir, err);
    } else if (kept > 0) {
      rc = remove_step(run_dir, steps[i], err); /* incomplete and older than a complete one */
    }
    /* incomplete and newer than every complete one: maybe being written, left alone */
  }
  free(steps);
  if (!rc) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/checkpoints", run_dir);
    rc = remove_tmp_files(dir, err);
  }
  return rc;
}
