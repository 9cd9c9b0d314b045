/* frozen.c: a frozen peer (peer.N.teacher = FILE.kdpm): a trained model that takes part in the
   cohort forward only, never updated. Its ranks build their model from the file (its arch, its
   weights and batchnorm statistics), run every forward in eval mode (running statistics, no
   dropout), and skip the backward pass and the optimizer step (step.c). Checkpoints record the
   file's path and crc32 and a resume refuses a file that changed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/infer.h"
#include "train_internal.h"

/* crc32 of a whole file (zlib) as "%08x", 0 or an error */
static int file_crc(const char *path, char *out, size_t n, kdp_error *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return kdp_fail(err, KDP_EIO, "cannot open %s", path);
  unsigned char buf[1 << 16];
  uLong crc = crc32(0L, Z_NULL, 0);
  size_t got;
  while ((got = fread(buf, 1, sizeof buf, f)) > 0) crc = crc32(crc, buf, (uInt)got);
  int bad = ferror(f);
  fclose(f);
  if (bad) return kdp_fail(err, KDP_EIO, "cannot read %s", path);
  snprintf(out, n, "%08lx", (unsigned long)crc);
  return 0;
}

/* peer p's model file, read, with its arch checked against peer.N.arch (when set) */
static int read_teacher(const kdp_config *cfg, int p, kdp_modelfile *mf, kdp_error *err) {
  const char *path = cfg->peer_teacher[p];
  int rc = kdp_modelfile_read(mf, path, 1, err);
  if (rc != 0) {
    kdp_error e2 = *err;
    return kdp_fail(err, KDP_EINVAL, "config peer.%d.teacher: %s", p, e2.msg);
  }
  const char *arch = kdp_model_arch(mf->m);
  if (cfg->peer_arch[p][0] && strcmp(cfg->peer_arch[p], arch) != 0)
    rc = kdp_fail(err, KDP_EINVAL,
                  "config peer.%d.arch = %s, but peer.%d.teacher = %s holds a model of arch %s "
                  "(leave peer.%d.arch empty or set it to %s)",
                  p, cfg->peer_arch[p], p, path, arch, p, arch);
  else if (strlen(arch) >= sizeof cfg->peer_arch[p])
    rc = kdp_fail(err, KDP_EINVAL, "config peer.%d.teacher: arch %.40s... is too long", p, arch);
  if (rc != 0) kdp_modelfile_free(mf);
  return rc;
}

int kdp_frozen_model(kdp_trainer *t, kdp_input_shape ish, size_t max_batch, kdp_error *err) {
  const kdp_config *cfg = t->cfg;
  const int p = t->d->peer;
  const char *path = cfg->peer_teacher[p];
  kdp_modelfile mf;
  int rc = read_teacher(cfg, p, &mf, err);
  if (rc != 0) return rc;
  const char *arch = kdp_model_arch(mf.m);
  if (mf.in.H != ish.H || mf.in.W != ish.W || mf.in.C != ish.C || mf.in.n_classes != ish.n_classes)
    rc = kdp_fail(err, KDP_EMISMATCH,
                  "peer.%d.teacher = %s takes %zux%zux%zu images in %zu classes; this run's data "
                  "are %zux%zux%zu in %zu classes",
                  p, path, mf.in.H, mf.in.W, mf.in.C, mf.in.n_classes, ish.H, ish.W, ish.C,
                  ish.n_classes);
  for (int c = 0; rc == 0 && c < (ish.C == 1 ? 1 : 3); c++)
    if (mf.mean[c] != t->mean[c] || mf.std[c] != t->std[c])
      rc = kdp_fail(err, KDP_EMISMATCH,
                    "peer.%d.teacher = %s was trained on data normalised with mean %g std %g "
                    "(channel %d); this run uses data.mean %g, data.std %g: set the same "
                    "normalisation",
                    p, path, (double)mf.mean[c], (double)mf.std[c], c, (double)t->mean[c],
                    (double)t->std[c]);
  if (rc == 0) rc = kdp_model_create(&t->model, arch, ish, max_batch, err);
  if (rc == 0 && (kdp_model_n_params(t->model) != kdp_model_n_params(mf.m) ||
                  kdp_model_n_buffers(t->model) != kdp_model_n_buffers(mf.m)))
    rc = kdp_fail(err, KDP_EFORMAT, "peer.%d.teacher = %s: its %s does not build as trained", p,
                  path, arch);
  if (rc == 0) {
    memcpy(kdp_model_params(t->model), kdp_model_params(mf.m),
           kdp_model_n_params(mf.m) * sizeof(float));
    memcpy(kdp_model_buffers(t->model), kdp_model_buffers(mf.m),
           kdp_model_n_buffers(mf.m) * sizeof(float));
    rc = file_crc(path, t->frozen_crc, sizeof t->frozen_crc, err);
  }
  kdp_modelfile_free(&mf);
  if (rc == 0) t->frozen = 1;
  return rc;
}

int kdp_frozen_resolve_arch(kdp_config *cfg, kdp_error *err) {
  for (int p = 0; p < KDP_MAX_PEERS; p++) {
    if (!cfg->peer_teacher[p][0]) continue;
    kdp_modelfile mf;
    int rc = read_teacher(cfg, p, &mf, err);
    if (rc != 0) return rc;
    snprintf(cfg->peer_arch[p], sizeof cfg->peer_arch[p], "%s", kdp_model_arch(mf.m));
    kdp_modelfile_free(&mf);
  }
  return 0;
}

int kdp_frozen_check_cohort(const kdp_config *cfg, int P, kdp_error *err) {
  for (int p = P; p < KDP_MAX_PEERS; p++)
    if (cfg->peer_teacher[p][0])
      return kdp_fail(err, KDP_EINVAL,
                      "peer.%d.teacher = %s names no peer of this cohort of %d peers (peers 0..%d)",
                      p, cfg->peer_teacher[p], P, P - 1);
  int frozen = 0;
  for (int p = 0; p < P; p++) frozen += cfg->peer_teacher[p][0] != 0;
  if (frozen == P)
    return kdp_fail(err, KDP_EINVAL,
                    "every peer is a frozen teacher (peer.N.teacher): nothing would train");
  return 0;
}

int kdp_frozen_save(kdp_trainer *t, kdp_ckpt_writer *w, kdp_error *err) {
  if (!t->frozen) return 0;
  int rc = kdp_ckpt_put_str(w, "frozen.teacher", t->cfg->peer_teacher[t->d->peer], err);
  if (rc == 0) rc = kdp_ckpt_put_str(w, "frozen.crc32", t->frozen_crc, err);
  return rc;
}

int kdp_frozen_load(kdp_trainer *t, const kdp_ckpt *ck, kdp_error *err) {
  if (!t->frozen) return 0;
  const char *crc = NULL;
  int rc = kdp_ckpt_get_str(ck, "frozen.crc32", &crc, err);
  if (rc != 0) return rc;
  if (strcmp(crc, t->frozen_crc) != 0)
    return kdp_fail(err, KDP_EMISMATCH,
                    "peer.%d.teacher = %s changed since the checkpoint (crc32 %s, now %s): put the "
                    "original file back, or start over with --fresh",
                    t->d->peer, t->cfg->peer_teacher[t->d->peer], crc, t->frozen_crc);
  return 0;
}
