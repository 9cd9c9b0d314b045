/* stale.c: codistill's weights mode (kd.exchange = weights), a trainer-side strategy rather than
   a method of its own: the peer term is codistill's (it reads only the peers' logits, ops
   stale_ok), but the logits come from local stale copies of the other peers, refreshed every
   kd.exchange_every steps by one gather of every peer's parameters and BN statistics. It needs
   the peers' models, which kd does not know, so it lives here. */
#include <stdlib.h>
#include <string.h>

#include "kdpeers/ckpt.h"
#include "train_internal.h"

struct kdp_stale {
  size_t P, me, C;
  kdp_model *copy[KDP_DIST_MAX_PEERS]; /* the other peers' stale copies (NULL at me) */
  size_t width[KDP_DIST_MAX_PEERS];    /* every peer's params ++ buffers, in floats */
  size_t off[KDP_DIST_MAX_PEERS];
  float *mine, *all;                   /* this peer's vector; every peer's, back to back */
  float *z_all;                        /* P x Bl x C */
  float *kept;  /* after a resize, until kdp_stale_resize_finish: the kept peers' old copies */
  int keep[KDP_DIST_MAX_PEERS]; /* ...peer j's copy is in kept (1) or is its weights now (0) */
};

int kdp_stale_create(kdp_stale **out, kdp_trainer *t, kdp_error *err) {
  kdp_stale *s = kdp_xcalloc(1, sizeof *s);
  *out = s;
  s->P = (size_t)t->P;
  s->me = (size_t)t->d->peer;
  s->C = t->C;
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  size_t tot = 0;
  for (size_t j = 0; j < s->P; j++) {
    kdp_model *m = t->model;
    if (j != s->me) {
      int rc = kdp_model_create(&s->copy[j], kdp_config_peer_arch(t->cfg, (int)j), ish, t->Bl,
                                err);
      if (rc != 0) return rc;
      m = s->copy[j];
    }
    s->width[j] = kdp_model_n_params(m) + kdp_model_n_buffers(m);
    s->off[j] = tot;
    tot += s->width[j];
  }
  s->mine = kdp_falloc(s->width[s->me]);
  s->all = kdp_falloc(tot);
  s->z_all = kdp_falloc(s->P * t->Bl * t->C);
  /* each peer trains on its own disjoint shard of the training set */
  size_t n = t->train.n;
  kdp_batcher_set_shard(&t->batcher, n * s->me / s->P, n * (s->me + 1) / s->P);
  return 0;
}

void kdp_stale_free(kdp_stale *s) {
  if (!s) return;
  for (size_t j = 0; j < KDP_DIST_MAX_PEERS; j++) kdp_model_free(s->copy[j]);
  free(s->mine);
  free(s->all);
  free(s->z_all);
  free(s->kept);
  free(s);
}

/* s->all into the stale copies */
static void unpack(kdp_stale *s) {
  for (size_t j = 0; j < s->P; j++) {
    kdp_model *m = s->copy[j];
    if (!m) continue;
    size_t mp = kdp_model_n_params(m), mb = kdp_model_n_buffers(m);
    memcpy(kdp_model_params(m), s->all + s->off[j], mp * sizeof(float));
    memcpy(kdp_model_buffers(m), s->all + s->off[j] + mp, mb * sizeof(float));
  }
}

/* every peer's parameters and BN statistics into the stale copies: one "row" per peer, which
   one rank of each peer holds (its ranks hold the same weights) */
static void refresh(kdp_stale *s, kdp_trainer *t) {
  size_t np = kdp_model_n_params(t->model), nb = kdp_model_n_buffers(t->model);
  memcpy(s->mine, kdp_model_params(t->model), np * sizeof(float));
  memcpy(s->mine + np, kdp_model_buffers(t->model), nb * sizeof(float));
  size_t lo, hi;
  kdp_dist_rows(t->d, KDP_GROUP_WORLD, KDP_ROWS_OWN, 1, &lo, &hi);
  kdp_dist_gather_rows(t->d, KDP_GROUP_WORLD, KDP_ROWS_ALL, 1, s->width, hi > lo ? s->mine : NULL,
                       s->all);
  unpack(s);
}

const float *kdp_stale_logits(kdp_stale *s, kdp_trainer *t, int64_t step, const float *x,
                              const float *z, size_t n) {
  if (step % t->cfg->exchange_every == 0) refresh(s, t);
  const size_t nc = n * s->C;
  for (size_t j = 0; j < s->P; j++) {
    const float *zj = j == s->me ? z : n ? kdp_model_forward(s->copy[j], x, n, 0, NULL) : NULL;
    if (nc) memcpy(s->z_all + j * nc, zj, nc * sizeof(float));
  }
  return s->z_all;
}

static size_t total(const kdp_stale *s) { return s->off[s->P - 1] + s->width[s->P - 1]; }

int kdp_stale_save(kdp_stale *s, kdp_ckpt_writer *w, kdp_error *err) {
  size_t tot = total(s);
  return kdp_ckpt_put_f32(w, "codistill.stale", s->all, 1, &tot, err);
}

int kdp_stale_load(kdp_stale *s, const kdp_ckpt *ck, kdp_error *err) {
  int rc = kdp_ckpt_get_f32(ck, "codistill.stale", s->all, total(s), err);
  if (rc == 0) unpack(s);
  return rc;
}

/* ---- a resized cohort (--resume-as): the stale copies of the new cohort ----
   A kept peer's copy is the one the old cohort held (all ranks held the same, taken at the
   last exchange), so its staleness carries over; a new peer's (from its seed, or a clone) is
   its weights at the resume, as if exchanged then. */
int kdp_stale_load_resized(kdp_stale *s, kdp_trainer *t, const kdp_elastic *e,
                           const kdp_ckpt *ck, kdp_error *err) {
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  size_t ow[KDP_MAX_PEERS], ooff[KDP_MAX_PEERS], otot = 0;
  for (int j = 0; j < e->old_P; j++) {
    kdp_model *m = NULL;
    int rc = kdp_model_create(&m, e->old_arch[j], ish, 1, err);
    if (rc != 0) return rc;
    ow[j] = kdp_model_n_params(m) + kdp_model_n_buffers(m);
    kdp_model_free(m);
    ooff[j] = otot;
    otot += ow[j];
  }
  /* a checkpoint of one peer (independent) holds no copies: every peer's is its weights now */
  int has = kdp_ckpt_has(ck, "codistill.stale");
  float *old = kdp_falloc(otot);
  int rc = has ? kdp_ckpt_get_f32(ck, "codistill.stale", old, otot, err) : 0;
  free(s->kept);
  s->kept = kdp_falloc(total(s));
  for (size_t i = 0; i < s->P && rc == 0; i++) {
    int o = e->map[i];
    s->keep[i] = has && o >= 0;
    if (!s->keep[i]) continue;
    if (ow[o] != s->width[i]) {
      rc = kdp_fail(err, KDP_EFORMAT,
                    "codistill.stale: old peer %d's copy holds %zu values; new peer %zu has %zu",
                    o, ow[o], i, s->width[i]);
      break;
    }
    memcpy(s->kept + s->off[i], old + ooff[o], ow[o] * sizeof(float));
  }
  free(old);
  if (rc == 0 && t->is_root) {
    char kept[256] = "", fresh[256] = "";
    for (size_t i = 0; i < s->P; i++) {
      char *l = s->keep[i] ? kept : fresh;
      size_t u = strlen(l);
      if (u + 8 < sizeof kept) snprintf(l + u, sizeof kept - u, "%s%zu", u ? "," : "", i);
    }
    fprintf(stderr,
            "kdpeers: resize %d -> %zu peers: codistill's stale copies (kd.exchange = weights) "
            "of peer%s %s kept as of the last exchange, of peer%s %s taken from their weights "
            "now; each peer's shard of the training set is recut for %zu peers\n",
            e->old_P, s->P, strchr(kept, ',') ? "s" : "", kept[0] ? kept : "(none)",
            strchr(fresh, ',') ? "s" : "", fresh[0] ? fresh : "(none)", s->P);
  }
  return rc;
}

void kdp_stale_resize_finish(kdp_stale *s, kdp_trainer *t) {
  if (!s || !s->kept) return;
  refresh(s, t); /* every peer's weights now (collective) */
  for (size_t i = 0; i < s->P; i++)
    if (s->keep[i])
      memcpy(s->all + s->off[i], s->kept + s->off[i], s->width[i] * sizeof(float));
  unpack(s);
  free(s->kept);
  s->kept = NULL;
}
