/* elastic.c: resuming a run with another cohort (kdpeers --resume-as P'): the plan (which old
   peer each new peer continues, the per-peer settings and layout), the restore of a rank's
   state from its old peer's file, the replicated module remapped to the new cohort, and the
   history of resizes (checkpoint, metrics.jsonl, /history). */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdpeers/ckpt.h"
#include "kdpeers/kd.h"
#include "kdpeers/tools.h"
#include "train_internal.h"

/* ---------------- the plan ---------------- */

static void list_text(const int *v, int n, char *buf, size_t len) {
  size_t used = 0;
  buf[0] = 0;
  for (int i = 0; i < n && used + 12 < len; i++)
    used += (size_t)snprintf(buf + used, len - used, "%s%d", i ? "," : "", v[i]);
}

/* --resume-as auto: the cohort of the checkpoint's peers (in order) and new ones that takes
   exactly the run's ranks */
static int auto_size(const kdp_config *cfg, const kdp_elastic *e, kdp_error *err) {
  int sum = 0, P = 0;
  while (sum < e->world && P < KDP_MAX_PEERS) {
    sum += P < e->old_P ? e->old_k[P] : kdp_config_peer_ranks(cfg, P);
    P++;
  }
  if (sum != e->world)
    return kdp_fail(err, KDP_EINVAL,
                    "--resume-as auto: no cohort of the checkpoint's peers in order (and new ones) "
                    "takes exactly the %d MPI ranks of this run (%d peers take %d); name one with "
                    "--resume-as P --keep ...",
                    e->world, P, sum);
  return P;
}

int kdp_elastic_plan(kdp_config *cfg, kdp_elastic *e, kdp_error *err) {
  e->step = -1;
  if (e->P < 0 && (e->n_keep || e->clone_from >= 0))
    return kdp_fail(err, KDP_EINVAL,
                    "--resume-as auto keeps the first peers and grows from seeds; --keep and "
                    "--clone-from need a peer count");
  if (e->P != -1 && (e->P < 1 || e->P > KDP_MAX_PEERS))
    return kdp_fail(err, KDP_EINVAL, "--resume-as %d: expected 1..%d peers", e->P, KDP_MAX_PEERS);
  char ini[256] = "";
  int64_t step = 0;
  int found = kdp_ckpt_find_latest(cfg->dir, &step, err);
  if (found < 0) return found;
  if (found == 0) {
    if (e->n_keep || e->clone_from >= 0)
      return kdp_fail(err, KDP_EINVAL,
                      "--resume-as: %s holds no complete checkpoint, so there are no peers to "
                      "--keep or --clone-from",
                      cfg->dir);
    return 0; /* a new run: --resume-as P' just starts P' peers (auto: the config's layout) */
  }
  int n_ranks = 0;
  int rc = kdp_tool_saved_config(cfg->dir, ini, sizeof ini, &n_ranks, err);
  if (rc != 0) return rc;
  kdp_config *old = kdp_xmalloc(sizeof *old);
  kdp_config_defaults(old);
  rc = kdp_config_load_file(old, ini, err);
  unlink(ini);
  if (rc != 0) {
    free(old);
    return rc;
  }
  /* the checkpoint's layout: peers take their ranks_per_peer in order up to its world size */
  int oldP = 0, sum = 0;
  while (sum < n_ranks && oldP < KDP_MAX_PEERS) {
    e->old_first[oldP] = sum;
    e->old_k[oldP] = kdp_config_peer_ranks(old, oldP);
    snprintf(e->old_arch[oldP], KDP_STR, "%s", kdp_config_peer_arch(old, oldP));
    sum += e->old_k[oldP++];
  }
  if (sum != n_ranks) {
    free(old);
    return kdp_fail(err, KDP_EFORMAT,
                    "--resume-as: the checkpoint at step %lld in %s/checkpoints has %d files, "
                    "which its peers' ranks_per_peer do not add up to",
                    (long long)step, cfg->dir, n_ranks);
  }
  e->step = step;
  e->old_P = oldP;
  e->old_world = n_ranks;
  if (e->P < 0) {
    int p = auto_size(cfg, e, err);
    if (p < 0) {
      free(old);
      return p;
    }
    e->P = p;
  }
  const int P = e->P;
  /* which old peer each new peer continues */
  if (e->n_keep) {
    if (P >= oldP) {
      free(old);
      return kdp_fail(err, KDP_EINVAL,
                      "--keep names the peers to keep when shrinking, but --resume-as %d does not "
                      "shrink the checkpoint's %d peers (every peer is kept when growing)",
                      P, oldP);
    }
    if (e->n_keep != P) {
      free(old);
      return kdp_fail(err, KDP_EINVAL, "--resume-as %d --keep names %d peer%s; expected %d", P,
                      e->n_keep, e->n_keep == 1 ? "" : "s", P);
    }
    for (int i = 0; i < P; i++) {
      if (e->keep[i] < 0 || e->keep[i] >= oldP) {
        free(old);
        return kdp_fail(err, KDP_EINVAL,
                        "--keep %d: the checkpoint at step %lld has peers 0..%d", e->keep[i],
                        (long long)step, oldP - 1);
      }
      for (int j = 0; j < i; j++)
        if (e->keep[j] == e->keep[i]) {
          free(old);
          return kdp_fail(err, KDP_EINVAL, "--keep names peer %d twice", e->keep[i]);
        }
    }
  }
  if (e->clone_from >= 0 && (P <= oldP || e->clone_from >= oldP)) {
    free(old);
    return P <= oldP ? kdp_fail(err, KDP_EINVAL,
                                "--clone-from copies a peer into the new peers of a grown "
                                "cohort, but --resume-as %d does not grow the checkpoint's %d "
                                "peers",
                                P, oldP)
                     : kdp_fail(err, KDP_EINVAL,
                                "--clone-from %d: the checkpoint at step %lld has peers 0..%d",
                                e->clone_from, (long long)step, oldP - 1);
  }
  if (e->clone_from >= 0 && old->peer_teacher[e->clone_from][0]) {
    const int c = e->clone_from;
    rc = kdp_fail(err, KDP_EINVAL,
                  "--clone-from %d: peer %d is a frozen teacher (peer.%d.teacher = %s), with no "
                  "optimizer state to copy; clone a trained peer, or let the new peers start "
                  "from their seeds",
                  c, c, c, old->peer_teacher[c]);
    free(old);
    return rc;
  }
  e->resized = P != oldP;
  for (int i = 0; i < P; i++) {
    e->map[i] = e->n_keep ? e->keep[i] : i < oldP ? i : -1;
    if (e->map[i] != i) e->resized = 1;
  }
  /* a frozen teacher (peer.N.teacher) stays what it is: a kept one stays frozen on its file
     wherever --keep puts it (its slot's peer.N.teacher in this run's config does not matter);
     a new peer is frozen when its own peer.N.teacher names a file. Either is built from the
     file, never cloned (kdp_elastic_source). */
  for (int i = 0; i < KDP_MAX_PEERS; i++) {
    if (i >= P)
      cfg->peer_teacher[i][0] = 0;
    else if (e->map[i] >= 0)
      snprintf(cfg->peer_teacher[i], sizeof cfg->peer_teacher[i], "%s",
               old->peer_teacher[e->map[i]]);
    e->frozen[i] = i < P && cfg->peer_teacher[i][0];
  }
  /* the new cohort's per-peer settings: a kept peer's from the checkpoint, a new peer's from
     its own peer.N.* (a clone takes its source's arch); explicit only where they differ from
     model.arch and run.ranks_per_peer, so the saved config reads like a hand-written one */
  int k[KDP_MAX_PEERS];
  char arch[KDP_MAX_PEERS][KDP_STR];
  for (int i = 0; i < P; i++) {
    int src = e->map[i] >= 0 ? e->map[i] : e->frozen[i] ? -1 : e->clone_from;
    k[i] = e->map[i] >= 0 ? e->old_k[e->map[i]] : kdp_config_peer_ranks(cfg, i);
    snprintf(arch[i], KDP_STR, "%s", src >= 0 ? e->old_arch[src] : kdp_config_peer_arch(cfg, i));
  }
  int uniform = 1;
  for (int i = 0; i < P; i++) uniform &= k[i] == cfg->ranks_per_peer;
  for (int i = 0; i < KDP_MAX_PEERS; i++) {
    cfg->peer_ranks_per_peer[i] = i < P && !uniform ? k[i] : 0;
    if (i < P && strcmp(arch[i], cfg->arch) != 0)
      snprintf(cfg->peer_arch[i], KDP_STR, "%s", arch[i]);
    else
      cfg->peer_arch[i][0] = 0;
  }
  free(old);
  return 0;
}

int kdp_elastic_check_layout(const kdp_elastic *e, const kdp_config *cfg, const kdp_dist *d,
                             kdp_error *err) {
  if (d->n_peers == e->P || e->P < 0) return 0;
  char ks[512];
  size_t used = 0;
  int sum = 0;
  ks[0] = 0;
  for (int i = 0; i < e->P && used + 16 < sizeof ks; i++) {
    int k = kdp_config_peer_ranks(cfg, i);
    used += (size_t)snprintf(ks + used, sizeof ks - used, "%s%d", i ? "+" : "", k);
    sum += k;
  }
  return kdp_fail(err, KDP_EINVAL,
                  "--resume-as %d: the %d peers take %s = %d ranks (a kept peer keeps its "
                  "ranks_per_peer, a new one takes peer.N.ranks_per_peer or run.ranks_per_peer), "
                  "but this run has %d MPI ranks: start it with -np %d",
                  e->P, e->P, ks, sum, d->world_size, sum);
}

/* ---------------- the module remapped ---------------- */

/* index of entry r of a dimension of n entries split as s, in the old cohort; -1 = none */
static long map_index(kdp_split s, size_t r, size_t n_new, size_t n_old, const kdp_kd_spec *os,
                      const kdp_kd_spec *ns, const size_t *ooff, const size_t *noff,
                      const int *map) {
  if (s == KDP_SPLIT_NONE) return n_new == n_old ? (long)r : -1;
  if (s == KDP_SPLIT_PEERS) {
    if (n_new != ns->P || n_old != os->P) return -1;
    return map[r] >= 0 ? map[r] : -1;
  }
  /* features: block j of d_j columns */
  size_t j = 0;
  while (j + 1 < ns->P && noff[j + 1] <= r) j++;
  if (map[j] < 0 || os->dims[map[j]] != ns->dims[j]) return -1;
  return (long)(ooff[map[j]] + (r - noff[j]));
}

/* the old tensor new tensor t continues, or NULL */
static const kdp_kd_tensor *old_tensor(const kdp_cohort *oldc, const kdp_kd_tensor *t,
                                       const int *map) {
  char want[64];
  snprintf(want, sizeof want, "%s", t->name);
  int owner = -1;
  if (t->owner >= 0) {
    owner = map[t->owner];
    if (owner < 0) return NULL;
    /* "att.<owner>.query.weight" of the old peer */
    char key[16];
    snprintf(key, sizeof key, ".%d.", t->owner);
    const char *at = strstr(t->name, key);
    if (at)
      snprintf(want, sizeof want, "%.*s.%d.%s", (int)(at - t->name), t->name, owner,
               at + strlen(key));
  }
  for (size_t i = 0;; i++) {
    const kdp_kd_tensor *o = kdp_cohort_module_tensor(oldc, i);
    if (!o) return NULL;
    if (o->owner == owner && strcmp(o->name, want) == 0) return o;
  }
}

static void offsets(const kdp_kd_spec *s, size_t *off) {
  off[0] = 0;
  for (size_t j = 0; j < s->P; j++) off[j + 1] = off[j] + s->dims[j];
}

/* one 2-d block: rows x cols at dst + doff from src + soff, entry by entry through the splits */
static size_t remap_block(const kdp_cohort *oldc, const kdp_cohort *newc, const float *src,
                          size_t soff, size_t orows, size_t ocols, float *dst, size_t doff,
                          size_t rows, size_t cols, kdp_split rs, kdp_split cs, const int *map) {
  const kdp_kd_spec *os = kdp_cohort_spec(oldc), *ns = kdp_cohort_spec(newc);
  size_t ooff[KDP_KD_MAX_PEERS + 1], noff[KDP_KD_MAX_PEERS + 1], kept = 0;
  offsets(os, ooff);
  offsets(ns, noff);
  for (size_t r = 0; r < rows; r++) {
    long orow = map_index(rs, r, rows, orows, os, ns, ooff, noff, map);
    if (orow < 0) continue;
    for (size_t c = 0; c < cols; c++) {
      long ocol = map_index(cs, c, cols, ocols, os, ns, ooff, noff, map);
      if (ocol < 0) continue;
      dst[doff + r * cols + c] = src[soff + (size_t)orow * ocols + (size_t)ocol];
      kept++;
    }
  }
  return kept;
}

static void log_part(char *log, size_t n, const char *name, size_t kept, size_t total) {
  size_t used = strlen(log);
  if (used + 8 >= n) return;
  const char *how = kept == total ? "kept" : kept == 0 ? "rebuilt" : "peer blocks kept";
  snprintf(log + used, n - used, "%s%s %s", used ? ", " : "", name, how);
  if (kept && kept < total)
    snprintf(log + strlen(log), n - strlen(log), " (%zu/%zu)", kept, total);
}

size_t kdp_elastic_remap(const kdp_cohort *oldc, const float *src, const kdp_cohort *newc,
                         float *dst, const int *map, int what, char *log, size_t log_n) {
  size_t kept = 0;
  if (log && log_n) log[0] = 0;
  if (what == 0) {
    for (size_t i = 0;; i++) {
      const kdp_kd_tensor *t = kdp_cohort_module_tensor(newc, i);
      if (!t) break;
      const kdp_kd_tensor *o = old_tensor(oldc, t, map);
      size_t k = 0;
      if (o)
        k = remap_block(oldc, newc, src, o->off, o->rows, o->cols, dst, t->off, t->rows, t->cols,
                        t->row_split, t->col_split, map);
      kept += k;
      if (log) log_part(log, log_n, t->name, k, t->size);
    }
    return kept;
  }
  /* buffers: the i-th range continues the old i-th range (the same method declares them in
     the same order) */
  size_t nr = kdp_cohort_module_n_buffer_ranges(newc);
  for (size_t i = 0; i < nr; i++) {
    size_t off, n, ooff, on;
    kdp_split s, os;
    kdp_cohort_module_buffer_range(newc, i, &off, &n, &s);
    if (kdp_cohort_module_buffer_range(oldc, i, &ooff, &on, &os) != 0 || os != s) continue;
    kept += remap_block(oldc, newc, src, ooff, on, 1, dst, off, n, 1, s, KDP_SPLIT_NONE, map);
  }
  return kept;
}

/* ---------------- the trainer's side ---------------- */

int kdp_elastic_source(const kdp_elastic *e, int peer, int slice, int *role) {
  int o = e->map[peer];
  if (o >= 0) {
    *role = KDP_ELASTIC_KEPT;
    return e->old_first[o] + (slice < e->old_k[o] ? slice : e->old_k[o] - 1);
  }
  if (e->clone_from >= 0 && !e->frozen[peer]) {
    o = e->clone_from;
    *role = KDP_ELASTIC_CLONE;
    return e->old_first[o] + (slice < e->old_k[o] ? slice : e->old_k[o] - 1);
  }
  *role = KDP_ELASTIC_NEW;
  return 0;
}

void kdp_elastic_perturb(kdp_trainer *t, const kdp_elastic *e) {
  kdp_rng rng;
  uint64_t seed = e->clone_seed ? e->clone_seed : t->cfg->seed;
  kdp_rng_seed(&rng, seed, KDP_STREAM_NOISE + 16 * (uint64_t)t->d->peer);
  float *p = kdp_model_params(t->model);
  size_t n = kdp_model_n_params(t->model);
  for (size_t k = 0; k < n; k++)
    p[k] *= (float)(1.0 + KDP_CLONE_NOISE * (2.0 * kdp_rng_uniform(&rng) - 1.0));
}

/* every old peer's feature dimension, from its architecture */
static int old_dims(kdp_trainer *t, const kdp_elastic *e, size_t *dims, kdp_error *err) {
  kdp_input_shape ish = {t->train.H, t->train.W, t->train.C, t->C};
  for (int j = 0; j < e->old_P; j++) {
    kdp_model *m = NULL;
    int rc = kdp_model_create(&m, e->old_arch[j], ish, 1, err);
    if (rc != 0) return rc;
    dims[j] = kdp_model_feature_dim(m);
    kdp_model_free(m);
  }
  return 0;
}

int kdp_elastic_load_module(kdp_trainer *t, const kdp_elastic *e, const kdp_ckpt *ck,
                            kdp_error *err) {
  kdp_cohort *nc = t->cohort;
  size_t n = kdp_cohort_module_n_params(nc), nb = kdp_cohort_module_n_buffers(nc);
  if (!n) return 0;
  kdp_method m = (kdp_method)t->cfg->method_id;
  if (e->old_P < 2 || !kdp_ckpt_has(ck, "module.params")) {
    if (t->is_root)
      fprintf(stderr, "kdpeers: resize %d -> %d peers: %s's module rebuilt (the checkpoint "
                      "has none)\n", e->old_P, e->P, t->ops->name);
    return 0;
  }
  kdp_kd_spec spec = *kdp_cohort_spec(nc);
  spec.method = m;
  spec.P = (size_t)e->old_P;
  spec.leader = t->cfg->leader;
  spec.fusion_dim = (size_t)t->cfg->fusion_dim;
  spec.proj_dim = 0;
  int rc = old_dims(t, e, spec.dims, err);
  kdp_cohort *oc = NULL;
  if (rc == 0) rc = kdp_cohort_create(&oc, &spec, 1, err);
  if (rc != 0) return rc;
  size_t on = kdp_cohort_module_n_params(oc), onb = kdp_cohort_module_n_buffers(oc);
  float *omom = kdp_falloc(on ? on : 1);
  int64_t steps = 0;
  rc = kdp_ckpt_get_f32(ck, "module.params", kdp_cohort_module_params(oc), on, err);
  if (rc == 0) rc = kdp_ckpt_get_f32(ck, "module.momentum", omom, on, err);
  if (rc == 0) rc = kdp_ckpt_get_i64(ck, "module.opt_steps", &steps, err);
  if (rc == 0 && onb)
    rc = kdp_ckpt_get_f32(ck, "module.buffers", kdp_cohort_module_buffers(oc), onb, err);
  if (rc == 0) {
    char log[1024];
    /* the fresh module's values (kdp_distill_init) stay where nothing carries over; momentum
       starts at zero there */
    memset(t->mopt.buf, 0, n * sizeof(float));
    size_t kp = kdp_elastic_remap(oc, kdp_cohort_module_params(oc), nc,
                                  kdp_cohort_module_params(nc), e->map, 0, log, sizeof log);
    kdp_elastic_remap(oc, omom, nc, t->mopt.buf, e->map, 0, NULL, 0);
    if (nb) kdp_elastic_remap(oc, kdp_cohort_module_buffers(oc), nc,
                              kdp_cohort_module_buffers(nc), e->map, 1, NULL, 0);
    t->mopt.n_steps = steps;
    if (t->is_root)
      fprintf(stderr,
              "kdpeers: resize %d -> %d peers: %s's module (its shape depends on the peers) "
              "remapped, %zu of %zu values carried over from the surviving peers' blocks, the "
              "rest initialised as a fresh module: %s\n",
              e->old_P, e->P, t->ops->name, kp, n, log);
  }
  free(omom);
  kdp_cohort_free(oc);
  return rc;
}

/* the history entry of this resize, JSON: {"step":S,"from":P,"to":P',"kept":[...],...} */
static void entry(const kdp_trainer *t, const kdp_elastic *e, char *buf, size_t n) {
  int kept[KDP_MAX_PEERS], fresh[KDP_MAX_PEERS], nk = 0, nf = 0;
  for (int i = 0; i < e->P; i++) {
    if (e->map[i] >= 0)
      kept[nk++] = e->map[i];
    else
      fresh[nf++] = i;
  }
  char a[512], b[512];
  list_text(kept, nk, a, sizeof a);
  list_text(fresh, nf, b, sizeof b);
  snprintf(buf, n,
           "{\"step\":%lld,\"from\":%d,\"to\":%d,\"kept\":[%s],\"new\":[%s],\"clone_from\":%d,"
           "\"ranks\":%d}",
           (long long)e->step, e->old_P, e->P, a, b, e->clone_from, t->d->world_size);
}

void kdp_elastic_record(kdp_trainer *t, const kdp_elastic *e) {
  char one[1400];
  entry(t, e, one, sizeof one);
  const char *old = t->resizes ? t->resizes : "[]";
  size_t len = strlen(old) + strlen(one) + 4;
  char *all = kdp_xmalloc(len);
  size_t ol = strlen(old);
  /* "[...]" + one entry */
  if (ol >= 2 && strcmp(old, "[]") != 0)
    snprintf(all, len, "%.*s,%s]", (int)(ol - 1), old, one);
  else
    snprintf(all, len, "[%s]", one);
  free(t->resizes);
  t->resizes = all;
}

void kdp_elastic_announce(kdp_trainer *t, const kdp_elastic *e) {
  char one[1400], line[1500], text[256];
  entry(t, e, one, sizeof one);
  snprintf(line, sizeof line, "{\"event\":\"resize\",%s\n", one + 1);
  kdp_metrics_line(t, line);
  int kept[KDP_MAX_PEERS], nk = 0;
  for (int i = 0; i < e->P; i++)
    if (e->map[i] >= 0) kept[nk++] = e->map[i];
  char a[256];
  list_text(kept, nk, a, sizeof a);
  snprintf(text, sizeof text, "%d -> %d peers (kept %s%s)", e->old_P, e->P, a,
           e->P > e->old_P ? (e->clone_from >= 0 ? ", new ones cloned" : ", new ones from their seeds")
                           : "");
  kdp_live_event(t, "resize", e->step, text);
}
