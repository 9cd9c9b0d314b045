/* ckpt.h: crash-safe checkpoint files (msgpack + crc32, written to a temp file and renamed) and
   the step directories that group one file per peer under a manifest written last. */
#ifndef KDPEERS_CKPT_H
#define KDPEERS_CKPT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kdpeers/common.h"

/*
 * File format, version 1. A file is a sequence of msgpack objects (no enclosing array or map):
 *
 *   header   str "KDPCKPT", uint format version (1), str kind ("peer", "manifest", "model", ...)
 *   entry*   str name, uint type tag (enum kdp_ckpt_type), value:
 *              I64  int                      U64  uint               F64  float 64
 *              STR  str (UTF-8, no NUL)      BIN  bin (raw bytes)
 *              F32  uint ndim, array of ndim uints (dims), bin of prod(dims) float32 values,
 *                   IEEE-754 binary32, LITTLE ENDIAN, row-major (last dim fastest). The writer
 *                   and reader byte-swap on a big-endian host, so files are portable.
 *   trailer  str "crc32", uint tag 7 (KDP_CKPT_TAG_CRC32), then the crc always encoded as uint32
 *            (0xce + 4 bytes big endian): zlib crc32 of every byte before the trailer. Nothing
 *            may follow it. The trailer is therefore exactly the last 12 bytes of the file.
 *
 * Entry names are 1..255 bytes, no NUL, unique in a file; "crc32" is reserved.
 *
 * Writing is crash safe: kdp_ckpt_writer_open writes to "FINAL.tmp.<pid>", commit flushes,
 * fsyncs, renames onto FINAL and fsyncs the directory. FINAL therefore never exists half written.
 *
 * Reading loads the whole file (refusing files above a byte cap), then checks in this order:
 * magic (KDP_EFORMAT "not a kdpeers checkpoint"), version (KDP_EFORMAT "written by a newer
 * kdpeers"), trailer present (KDP_EIO "truncated"), crc (KDP_EFORMAT "checksum mismatch"), then
 * parses every entry (KDP_EFORMAT "malformed"). Hostile input cannot make it allocate more
 * than a small multiple of the file size.
 */

#define KDP_CKPT_MAGIC "KDPCKPT"
#define KDP_CKPT_FORMAT_VERSION 1
#define KDP_CKPT_MAX_DIMS 8
#define KDP_CKPT_MAX_NAME 255
#define KDP_CKPT_MAX_KIND 63
#define KDP_CKPT_TAG_CRC32 7
/* A sensible cap for kdp_ckpt_read when the caller has no better bound (4 GiB). */
#define KDP_CKPT_DEFAULT_MAX_BYTES ((size_t)4 << 30)

enum kdp_ckpt_type {
  KDP_CKPT_I64 = 1,
  KDP_CKPT_U64 = 2,
  KDP_CKPT_F64 = 3,
  KDP_CKPT_STR = 4,
  KDP_CKPT_BIN = 5,
  KDP_CKPT_F32 = 6
};
/* "i64", "u64", "f64", "str", "bin", "f32" or "?" */
const char *kdp_ckpt_type_name(int type);

/* ---- writer ---- */
typedef struct kdp_ckpt_writer kdp_ckpt_writer;

/* Creates the parent directory (mkdir -p), opens FINAL.tmp.<pid> and writes the header.
   kind: 1..63 printable bytes. On failure *w is NULL and nothing is left on disk. */
int kdp_ckpt_writer_open(kdp_ckpt_writer **w, const char *final_path, const char *kind,
                         kdp_error *err);
/* Entries. After any failure the writer is poisoned (later puts and commit fail with the first
   error); the caller then calls kdp_ckpt_writer_abort. Duplicate or invalid names fail. */
int kdp_ckpt_put_i64(kdp_ckpt_writer *w, const char *name, int64_t v, kdp_error *err);
int kdp_ckpt_put_u64(kdp_ckpt_writer *w, const char *name, uint64_t v, kdp_error *err);
int kdp_ckpt_put_f64(kdp_ckpt_writer *w, const char *name, double v, kdp_error *err);
int kdp_ckpt_put_str(kdp_ckpt_writer *w, const char *name, const char *s, kdp_error *err);
int kdp_ckpt_put_bin(kdp_ckpt_writer *w, const char *name, const void *data, size_t len,
                     kdp_error *err);
/* data holds prod(dims[0..ndim)) floats (ndim 0 = a scalar, one float); ndim <= 8. */
int kdp_ckpt_put_f32(kdp_ckpt_writer *w, const char *name, const float *data, size_t ndim,
                     const size_t *dims, kdp_error *err);
/* Writes the trailer, flushes, fsyncs, renames onto the final path, fsyncs the directory and
   frees w (success or not; on failure the temp file is removed). If file_crc is not NULL it
   receives the crc32 of the WHOLE file (trailer included): the value a manifest records for
   it (see kdp_ckpt_file_crc). */
int kdp_ckpt_writer_commit(kdp_ckpt_writer *w, uint32_t *file_crc, kdp_error *err);
/* Closes and unlinks the temp file and frees w. NULL is a no-op. */
void kdp_ckpt_writer_abort(kdp_ckpt_writer *w);
/* Path of the temp file being written (for tests and messages). */
const char *kdp_ckpt_writer_tmp_path(const kdp_ckpt_writer *w);

/* ---- reader ---- */
typedef struct kdp_ckpt kdp_ckpt;

typedef struct kdp_ckpt_info {
  const char *name;
  int type;                          /* enum kdp_ckpt_type */
  size_t ndim;                       /* F32 only */
  uint64_t dims[KDP_CKPT_MAX_DIMS];  /* F32 only */
  size_t count;                      /* F32: number of floats; STR/BIN: bytes; scalars: 1 */
  size_t bytes;                      /* payload bytes (F32: 4 * count; scalars: 8) */
} kdp_ckpt_info;

/* Reads and verifies a whole file; files larger than max_bytes are refused (KDP_EIO). */
int kdp_ckpt_read(const char *path, size_t max_bytes, kdp_ckpt **ck, kdp_error *err);
/* Same checks on a buffer in memory (copied). kdp_ckpt_read and the fuzzer use it. */
int kdp_ckpt_parse_buffer(const void *buf, size_t len, size_t max_bytes, kdp_ckpt **ck,
                          kdp_error *err);
void kdp_ckpt_free(kdp_ckpt *ck);

const char *kdp_ckpt_kind(const kdp_ckpt *ck);
unsigned kdp_ckpt_version(const kdp_ckpt *ck);
uint32_t kdp_ckpt_crc(const kdp_ckpt *ck); /* the embedded (verified) crc */
int kdp_ckpt_has(const kdp_ckpt *ck, const char *name);
/* Iteration in file order: 0 <= i < kdp_ckpt_count(ck). */
size_t kdp_ckpt_count(const kdp_ckpt *ck);
int kdp_ckpt_entry(const kdp_ckpt *ck, size_t i, kdp_ckpt_info *info);
/* Entry by name; KDP_EMISMATCH if missing. */
int kdp_ckpt_info_of(const kdp_ckpt *ck, const char *name, kdp_ckpt_info *info, kdp_error *err);

/* Getters: KDP_EMISMATCH if the entry is missing, has another type or another size. */
int kdp_ckpt_get_i64(const kdp_ckpt *ck, const char *name, int64_t *out, kdp_error *err);
int kdp_ckpt_get_u64(const kdp_ckpt *ck, const char *name, uint64_t *out, kdp_error *err);
int kdp_ckpt_get_f64(const kdp_ckpt *ck, const char *name, double *out, kdp_error *err);
/* *out points into ck (NUL terminated), valid until kdp_ckpt_free. */
int kdp_ckpt_get_str(const kdp_ckpt *ck, const char *name, const char **out, kdp_error *err);
/* *data points into ck (no alignment guarantee), valid until kdp_ckpt_free. */
int kdp_ckpt_get_bin(const kdp_ckpt *ck, const char *name, const void **data, size_t *len,
                     kdp_error *err);
/* Copies exactly expected_n floats into out (host byte order). The shape is not checked, only
   the element count; use kdp_ckpt_info_of for the dims. */
int kdp_ckpt_get_f32(const kdp_ckpt *ck, const char *name, float *out, size_t expected_n,
                     kdp_error *err);

/* crc32 and size of a whole file, streaming (constant memory). */
int kdp_ckpt_file_crc(const char *path, uint64_t *size, uint32_t *crc, kdp_error *err);

/* Prints what a file holds: kind, version, size, crc status, every entry with type, shape and
   size, and the value of scalars and short strings. On error prints the message to f and
   returns the error code. Used by `kdpeers inspect FILE`. */
int kdp_ckpt_describe(const char *path, FILE *f);

/* ---- checkpoint directories ----
 *   RUN_DIR/checkpoints/step-%012lld/peer-%03d.kdpc   one per peer (kind "peer", by its rank)
 *   RUN_DIR/checkpoints/step-%012lld/MANIFEST.kdpc    kind "manifest", written LAST by rank 0:
 *       u64 "step", u64 "n_peers", and per peer i (%03d): str "peer.i.file" (basename),
 *       u64 "peer.i.size", u64 "peer.i.crc32" (whole-file crc, as from commit), str "kdpeers".
 * A checkpoint exists only once its manifest exists and every file it lists has the recorded
 * size and crc ("complete").
 */
/* mkdir -p (mode 0755); existing directories are fine, concurrent creators too. */
int kdp_ckpt_mkdirs(const char *path, kdp_error *err);
/* Path helpers: 0, or KDP_EINVAL if step/peer < 0 or buf is too small. */
int kdp_ckpt_step_dir(const char *run_dir, int64_t step, char *buf, size_t n);
int kdp_ckpt_peer_path(const char *run_dir, int64_t step, int peer, char *buf, size_t n);
int kdp_ckpt_manifest_path(const char *run_dir, int64_t step, char *buf, size_t n);
/* Rank 0, after every peer committed: records every peer file's size (stat) and crc
   (crcs[i] from peer i's commit) and writes the manifest (atomically, last). */
int kdp_ckpt_write_manifest(const char *run_dir, int64_t step, int n_peers, const uint32_t *crcs,
                            kdp_error *err);
/* Checks one step directory: 0 if complete (n_peers may be NULL), else a negative code and why. */
int kdp_ckpt_verify_step(const char *run_dir, int64_t step, int *n_peers, kdp_error *err);
/* Highest complete step: returns 1 and sets *step, 0 if there is none, negative on an error
   listing the directory. Newer incomplete or corrupt steps are skipped with a warning line on
   stderr ("kdpeers: warning: skipping checkpoint ...: why"). When checkpoints were completed (a
   step directory has a manifest) but none verifies, returns KDP_EFORMAT saying so: that is not
   "no checkpoint" (a step directory without a manifest is an interrupted first write). */
int kdp_ckpt_find_latest(const char *run_dir, int64_t *step, kdp_error *err);
/* keep >= 1. Removes every complete checkpoint but the newest `keep`, every incomplete step
   directory older than the newest complete one, and stray "*.tmp.*" files in the checkpoints
   directory and in the kept step directories. Step directories newer than the newest complete
   one are left alone (another rank may be writing them). Manifests are removed first. */
int kdp_ckpt_prune(const char *run_dir, int keep, kdp_error *err);

#endif
