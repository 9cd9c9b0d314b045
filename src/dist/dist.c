/* dist.c: communicators, start-up agreement and collectives. Only src/dist calls MPI. */
#include "kdpeers/dist.h"

#include <mpi.h>
#include <stdatomic.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dist_mpi.h"

static MPI_Comm *comm_box(MPI_Comm c) {
  MPI_Comm *p = kdp_xmalloc(sizeof *p);
  *p = c;
  return p;
}

int kdp_dist_init_mpi(int *argc, char ***argv, kdp_error *err) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (inited) return 0;
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
    return kdp_fail(err, KDP_EMPI, "MPI_Init_thread failed");
  if (provided < MPI_THREAD_FUNNELED)
    return kdp_fail(err, KDP_EMPI,
                    "MPI provides thread level %d, kdpeers needs MPI_THREAD_FUNNELED (%d)",
                    provided, MPI_THREAD_FUNNELED);
  /* errors come back as codes, so KDP_CHECK_MPI can say where they happened */
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  return 0;
}

void kdp_dist_finalize(void) {
  int inited = 0, fin = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&fin);
  if (inited && !fin) MPI_Finalize();
}

void kdp_dist_library_version(char *buf, size_t n) {
  char v[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0, major = 0, minor = 0;
  if (n == 0) return;
  if (MPI_Get_library_version(v, &len) != MPI_SUCCESS) len = 0;
  v[len < MPI_MAX_LIBRARY_VERSION_STRING ? len : MPI_MAX_LIBRARY_VERSION_STRING - 1] = 0;
  v[strcspn(v, "\n")] = 0;
  MPI_Get_version(&major, &minor);
  snprintf(buf, n, "%s (MPI %d.%d)", len ? v : "unknown MPI library", major, minor);
}

int kdp_dist_world_rank(void) {
  int inited = 0, r = 0;
  MPI_Initialized(&inited);
  if (inited) MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int kdp_dist_world_size(void) {
  int inited = 0, n = 1;
  MPI_Initialized(&inited);
  if (inited) MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

/* The peer communicator (ranks of one peer, by slice), the cohort communicator (split by
   cohort_color: MPI_UNDEFINED leaves a rank out) and the node communicator. */
static void make_comms(kdp_dist *d, int cohort_color) {
  MPI_Comm peer, cohort, node;
  KDP_CHECK_MPI(MPI_Comm_split(MPI_COMM_WORLD, d->peer, d->slice, &peer));
  KDP_CHECK_MPI(MPI_Comm_split(MPI_COMM_WORLD, cohort_color, d->peer, &cohort));
  KDP_CHECK_MPI(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, d->world_rank, MPI_INFO_NULL, &node));
  KDP_CHECK_MPI(MPI_Comm_rank(node, &d->local_rank));
  KDP_CHECK_MPI(MPI_Comm_size(node, &d->local_size));
  MPI_Comm report;
  KDP_CHECK_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &report));
  d->report_comm = comm_box(report);
  d->world = comm_box(MPI_COMM_WORLD);
  d->peer_comm = comm_box(peer);
  d->cohort_comm = comm_box(cohort);
  d->node_comm = comm_box(node);
}

int kdp_dist_setup(kdp_dist *d, int ranks_per_peer, kdp_error *err) {
  memset(d, 0, sizeof *d);
  KDP_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &d->world_rank));
  KDP_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &d->world_size));
  if (ranks_per_peer < 1 || d->world_size % ranks_per_peer != 0)
    return kdp_fail(err, KDP_EINVAL,
                    "run.ranks_per_peer = %d does not divide the %d MPI ranks: use -np a multiple "
                    "of %d, or set run.ranks_per_peer to a divisor of %d",
                    ranks_per_peer, d->world_size, ranks_per_peer, d->world_size);
  d->ranks_per_peer = ranks_per_peer;
  d->n_peers = d->world_size / ranks_per_peer;
  d->peer = d->world_rank / ranks_per_peer;
  d->slice = d->world_rank % ranks_per_peer;
  d->uniform = 1;
  for (int p = 0; p < d->n_peers && p < KDP_DIST_MAX_PEERS; p++) {
    d->peer_k[p] = ranks_per_peer;
    d->peer_first[p] = p * ranks_per_peer;
  }
  make_comms(d, d->slice);
  return 0;
}

/* "2+1+1 = 4" for the first m peers of ks */
static void layout_text(const int *ks, int m, char *buf, size_t n) {
  size_t used = 0;
  long sum = 0;
  buf[0] = 0;
  for (int p = 0; p < m && used + 16 < n; p++) {
    used += (size_t)snprintf(buf + used, n - used, "%s%d", p ? "+" : "", ks[p]);
    sum += ks[p];
  }
  if (used + 16 >= n) used += (size_t)snprintf(buf + used, n - used, "...");
  snprintf(buf + used, n - used, " = %ld", sum);
}

int kdp_dist_setup_layout(kdp_dist *d, int k, const int *peer_k, int n, kdp_error *err) {
  enum { M = KDP_DIST_MAX_PEERS };
  int last = -1; /* the highest peer with its own ranks_per_peer */
  for (int p = 0; peer_k && p < n && p < M; p++)
    if (peer_k[p] > 0) last = p;
  if (last < 0) return kdp_dist_setup(d, k, err);
  memset(d, 0, sizeof *d);
  int W = 0, r = 0;
  KDP_CHECK_MPI(MPI_Comm_size(MPI_COMM_WORLD, &W));
  KDP_CHECK_MPI(MPI_Comm_rank(MPI_COMM_WORLD, &r));
  if (k < 1) return kdp_fail(err, KDP_EINVAL, "run.ranks_per_peer = %d: expected at least 1", k);
  int ks[M];
  long S[M + 1];
  S[0] = 0;
  for (int p = 0; p < M; p++) {
    ks[p] = p < n && peer_k[p] > 0 ? peer_k[p] : k;
    S[p + 1] = S[p] + ks[p];
  }
  int P = 0;
  for (int m = last + 1; m <= M && !P; m++)
    if (S[m] == W) P = m;
  if (!P) {
    int below = 0, above = 0;
    for (int m = last + 1; m <= M; m++) {
      if (S[m] < W) below = m;
      if (S[m] > W && !above) above = m;
    }
    char a[160] = "", b[160] = "", list[360] = "", hint[96] = "";
    if (below) layout_text(ks, below, a, sizeof a);
    if (above) layout_text(ks, above, b, sizeof b);
    int one = below ? below : above;
    if (below && above)
      snprintf(list, sizeof list, "%d peers take %s ranks, %d peers take %s", below, a, above, b);
    else
      snprintf(list, sizeof list, "%d peer%s take%s %s ranks", one, one == 1 ? "" : "s",
               one == 1 ? "s" : "", below ? a : b);
    if (below && above)
      snprintf(hint, sizeof hint, "-np %ld or -np %ld", S[below], S[above]);
    else
      snprintf(hint, sizeof hint, "-np %ld", below ? S[below] : S[above]);
    return kdp_fail(err, KDP_EINVAL,
                    "the per-peer layout does not fit the %d MPI ranks: the world size must be "
                    "the sum of the peers' ranks_per_peer (peer.N.ranks_per_peer, else "
                    "run.ranks_per_peer = %d) over at least %d peer%s (peer.%d.ranks_per_peer = "
                    "%d is set): %s. Start with %s, or change the ranks_per_peer keys",
                    W, k, last + 1, last ? "s" : "", last, ks[last], list, hint);
  }
  int same = 1;
  for (int p = 1; p < P; p++) same &= ks[p] == ks[0];
  if (same) return kdp_dist_setup(d, ks[0], err); /* the uniform layout, spelled per peer */
  d->world_rank = r;
  d->world_size = W;
  d->n_peers = P;
  d->uniform = 0;
  for (int p = 0; p < P; p++) {
    d->peer_k[p] = ks[p];
    d->peer_first[p] = (int)S[p];
    if (r >= S[p] && r < S[p + 1]) {
      d->peer = p;
      d->slice = r - (int)S[p];
      d->ranks_per_peer = ks[p];
    }
  }
  /* the cohort communicator holds one rank per peer: the slice-0 ranks */
  make_comms(d, d->slice == 0 ? 0 : MPI_UNDEFINED);
  return 0;
}

#define TAG_WAITING 1

/* Rank 0: takes every report of waiting that has arrived. */
static void drain_reports(kdp_dist *d) {
  if (!d->reported) d->reported = kdp_xcalloc((size_t)d->world_size, sizeof *d->reported);
  for (;;) {
    int any = 0;
    MPI_Status st;
    KDP_CHECK_MPI(MPI_Iprobe(MPI_ANY_SOURCE, TAG_WAITING, COMM(d->report_comm), &any, &st));
    if (!any) return;
    uint64_t seq = 0;
    KDP_CHECK_MPI(MPI_Recv(&seq, 1, MPI_UINT64_T, st.MPI_SOURCE, TAG_WAITING, COMM(d->report_comm),
                           MPI_STATUS_IGNORE));
    d->reported[st.MPI_SOURCE] = seq;
  }
}

void kdp_dist_report_waiting(kdp_dist *d) {
  if (d->world_rank == 0 || d->world_size <= 1 || d->report_seq == d->sync_seq) return;
  MPI_Request *r = d->report_req;
  if (r) KDP_CHECK_MPI(MPI_Wait(r, MPI_STATUS_IGNORE)); /* the last one: sent long ago */
  else d->report_req = r = kdp_xmalloc(sizeof *r);
  d->report_seq = d->sync_seq;
  KDP_CHECK_MPI(
      MPI_Isend(&d->report_seq, 1, MPI_UINT64_T, 0, TAG_WAITING, COMM(d->report_comm), r));
}

int kdp_dist_waiting_ranks(kdp_dist *d, unsigned char *arrived) {
  drain_reports(d);
  int missing = 0;
  for (int r = 0; r < d->world_size; r++) {
    arrived[r] = r == d->world_rank || d->reported[r] == d->sync_seq;
    missing += !arrived[r];
  }
  return missing;
}

void kdp_dist_abort(kdp_dist *d, int status) {
  (void)d;
  MPI_Abort(MPI_COMM_WORLD, status);
}

void kdp_dist_free(kdp_dist *d) {
  kdp_dist_world_allreduce_finish(d);
  if (d->report_req) MPI_Wait((MPI_Request *)d->report_req, MPI_STATUS_IGNORE);
  /* reports of waits that ended before rank 0 looked (they are 8 bytes each) */
  if (d->world_rank == 0 && d->world_size > 1 && d->report_comm) drain_reports(d);
  if (d->report_comm) MPI_Comm_free(&COMM(d->report_comm));
  free(d->report_comm);
  free(d->report_req);
  free(d->reported);
  if (d->peer_comm) MPI_Comm_free(&COMM(d->peer_comm));
  if (d->cohort_comm && COMM(d->cohort_comm) != MPI_COMM_NULL) MPI_Comm_free(&COMM(d->cohort_comm));
  if (d->node_comm) MPI_Comm_free(&COMM(d->node_comm));
  free(d->xcounts);
  free(d->xbuf);
  free(d->world);
  free(d->peer_comm);
  free(d->cohort_comm);
  free(d->node_comm);
  memset(d, 0, sizeof *d);
}

int kdp_dist_agree(kdp_dist *d, const void *buf, size_t n, const char *what, kdp_error *err) {
  /* compare against rank 0's bytes */
  unsigned char *ref = kdp_xmalloc(n ? n : 1);
  if (d->world_rank == 0) memcpy(ref, buf, n);
  KDP_WAIT_MPI(d, MPI_Bcast(ref, (int)n, MPI_BYTE, 0, MPI_COMM_WORLD));
  long first = -1;
  for (size_t i = 0; i < n; i++)
    if (ref[i] != ((const unsigned char *)buf)[i]) {
      first = (long)i;
      break;
    }
  free(ref);
  /* smallest disagreeing rank, with its byte offset */
  long mine[2] = {first >= 0 ? d->world_rank : d->world_size, first};
  long all[2];
  struct {
    long v;
    int r;
  } in = {mine[0], d->world_rank}, out;
  KDP_WAIT_MPI(d, MPI_Allreduce(&in, &out, 1, MPI_LONG_INT, MPI_MINLOC, MPI_COMM_WORLD));
  if (out.v >= d->world_size) return 0;
  all[0] = out.v;
  all[1] = first;
  KDP_WAIT_MPI(d, MPI_Bcast(&all[1], 1, MPI_LONG, out.r, MPI_COMM_WORLD));
  return kdp_fail(err, KDP_EMISMATCH,
                  "ranks disagree on the %s: rank %ld differs from rank 0 (first difference at "
                  "byte %ld of %zu). Every rank must be started with the same arguments, config "
                  "files and data files",
                  what, all[0], all[1], n);
}

int kdp_dist_all_ok(kdp_dist *d, int ok) {
  int in = ok ? 1 : 0, out = 0;
  KDP_WAIT_MPI(d, MPI_Allreduce(&in, &out, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD));
  return out;
}

int kdp_dist_first_error(kdp_dist *d, int rc, kdp_error *err) {
  int in = rc != 0 ? d->world_rank : d->world_size, root = 0;
  KDP_WAIT_MPI(d, MPI_Allreduce(&in, &root, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
  if (root == d->world_size) return 0;
  struct { int code; char msg[KDP_ERRLEN]; } e = {rc, ""};
  if (d->world_rank == root && err) snprintf(e.msg, sizeof e.msg, "%s", err->msg);
  KDP_WAIT_MPI(d, MPI_Bcast(&e, (int)sizeof e, MPI_BYTE, root, MPI_COMM_WORLD));
  if (d->world_rank != root) kdp_fail(err, e.code, "rank %d: %s", root, e.msg);
  return e.code;
}

void kdp_dist_peer_allreduce(kdp_dist *d, float *buf, size_t n) {
  if (d->ranks_per_peer <= 1) return;
  double t0 = kdp_now();
  if (n)
    KDP_WAIT_MPI(d,
                 MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, COMM(d->peer_comm)));
  d->t_allreduce += kdp_now() - t0;
}

void kdp_dist_cohort_allreduce_f64(kdp_dist *d, double *buf, size_t n) {
  if (d->n_peers <= 1 || n == 0) return;
  if (d->uniform) {
    KDP_WAIT_MPI(
        d, MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, COMM(d->cohort_comm)));
    return;
  }
  /* per-peer layout: over the world, each peer counted once (its slice-0 rank) */
  if (d->slice != 0) memset(buf, 0, n * sizeof(double));
  KDP_WAIT_MPI(d, MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
}

void kdp_dist_peer_allreduce_f64(kdp_dist *d, double *buf, size_t n) {
  if (d->ranks_per_peer <= 1 || n == 0) return;
  KDP_WAIT_MPI(d,
               MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_DOUBLE, MPI_SUM, COMM(d->peer_comm)));
}

void kdp_dist_cohort_allgather(kdp_dist *d, const float *in, float *out, size_t n) {
  double t0 = kdp_now();
  if (d->n_peers <= 1) {
    memcpy(out, in, n * sizeof(float));
  } else {
    KDP_WAIT_MPI(d, MPI_Allgather(in, (int)n, MPI_FLOAT, out, (int)n, MPI_FLOAT,
                                COMM(d->cohort_comm)));
    d->bytes_exchanged += (double)n * sizeof(float) * (double)(d->n_peers - 1);
  }
  d->t_exchange += kdp_now() - t0;
}

/* ---------------------------------------------------------------- rows of a batch */

/* the group's communicator and size; this rank's member index */
static MPI_Comm group_comm(const kdp_dist *d, kdp_group g, int *size, int *me) {
  if (g == KDP_GROUP_COHORT) {
    *size = d->n_peers;
    *me = d->peer;
    return COMM(d->cohort_comm);
  }
  *size = d->world_size;
  *me = d->world_rank;
  return MPI_COMM_WORLD;
}

/* member m of group g: its peer and its own rows of a B-row batch */
static int member_rows(const kdp_dist *d, kdp_group g, int m, size_t B, size_t *lo, size_t *hi) {
  if (g == KDP_GROUP_COHORT) {
    *lo = 0;
    *hi = B;
    return m;
  }
  int p = 0;
  while (p + 1 < d->n_peers && m >= d->peer_first[p + 1]) p++;
  size_t k = (size_t)d->peer_k[p], s = (size_t)(m - d->peer_first[p]);
  *lo = B * s / k;
  *hi = B * (s + 1) / k;
  return p;
}

/* member m's target rows */
static void target_rows(const kdp_dist *d, kdp_group g, kdp_rows which, int m, size_t B,
                        size_t *lo, size_t *hi) {
  int size, me;
  (void)group_comm(d, g, &size, &me);
  if (which == KDP_ROWS_OWN) {
    member_rows(d, g, m, B, lo, hi);
  } else if (which == KDP_ROWS_BLOCK) {
    *lo = B * (size_t)m / (size_t)size;
    *hi = B * (size_t)(m + 1) / (size_t)size;
  } else {
    *lo = 0;
    *hi = B;
  }
}

void kdp_dist_rows(const kdp_dist *d, kdp_group g, kdp_rows which, size_t B, size_t *lo,
                   size_t *hi) {
  int size, me;
  (void)group_comm(d, g, &size, &me);
  target_rows(d, g, which, me, B, lo, hi);
}

static size_t overlap(size_t alo, size_t ahi, size_t blo, size_t bhi, size_t *lo) {
  *lo = alo > blo ? alo : blo;
  size_t hi = ahi < bhi ? ahi : bhi;
  return hi > *lo ? hi - *lo : 0;
}

/* counts and displacements (4 arrays of the group's size) and a receive buffer of n floats */
static int *xcounts(kdp_dist *d) {
  if (!d->xcounts) d->xcounts = kdp_xmalloc(4 * sizeof(int) * (size_t)(d->world_size + 1));
  return d->xcounts;
}
static float *xbuf(kdp_dist *d, size_t n) {
  if (n > d->xcap) {
    free(d->xbuf);
    d->xcap = n + n / 4;
    d->xbuf = kdp_falloc(d->xcap);
  }
  return d->xbuf;
}

/* Prefix sums of the widths: peer p's block of n rows starts at n * woff[p]. */
static void width_offsets(const kdp_dist *d, const size_t *width, size_t *woff) {
  woff[0] = 0;
  for (int p = 0; p < d->n_peers; p++) woff[p + 1] = woff[p] + width[p];
}

static void rows_alltoallv(kdp_dist *d, MPI_Comm comm, const float *in, const int *sc,
                           const int *sd, float *out, const int *rc, const int *rd, int size,
                           int me) {
  double t0 = kdp_now(), sent = 0;
  for (int m = 0; m < size; m++)
    if (m != me) sent += (double)sc[m];
  static float dummy;
  KDP_WAIT_MPI(d, MPI_Alltoallv(in ? in : &dummy, sc, sd, MPI_FLOAT, out ? out : &dummy, rc, rd,
                                MPI_FLOAT, comm));
  d->bytes_exchanged += sent * sizeof(float);
  d->t_exchange += kdp_now() - t0;
}

/* What both row exchanges start from: the group, this member's own and target rows, the
   counts and displacements to fill, the widths' prefix sums. */
typedef struct rows_plan {
  MPI_Comm comm;
  int size, me, mp; /* group size, this member, its peer */
  int *sc, *sd, *rc, *rd;
  size_t olo, ohi, tlo, thi;
  size_t woff[KDP_DIST_MAX_PEERS + 1];
} rows_plan;

static void plan_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B, const size_t *width,
                      rows_plan *x) {
  x->comm = group_comm(d, g, &x->size, &x->me);
  x->sc = xcounts(d);
  x->sd = x->sc + x->size;
  x->rc = x->sd + x->size;
  x->rd = x->rc + x->size;
  width_offsets(d, width, x->woff);
  x->mp = member_rows(d, g, x->me, B, &x->olo, &x->ohi);
  target_rows(d, g, target, x->me, B, &x->tlo, &x->thi);
}

/* the counts and displacements (floats) of a gather of one tensor's rows into x */
static void gather_counts(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                          const size_t *width, rows_plan *x) {
  const size_t nt = x->thi - x->tlo;
  for (int m = 0; m < x->size; m++) {
    size_t lo, mlo, mhi, tl, th;
    /* to m: my own rows within m's target rows */
    target_rows(d, g, target, m, B, &tl, &th);
    size_t n = overlap(x->olo, x->ohi, tl, th, &lo);
    x->sc[m] = (int)(n * width[x->mp]);
    x->sd[m] = n ? (int)((lo - x->olo) * width[x->mp]) : 0;
    /* from m: m's own rows within my target rows, into its peer's block */
    int p = member_rows(d, g, m, B, &mlo, &mhi);
    n = overlap(mlo, mhi, x->tlo, x->thi, &lo);
    x->rc[m] = (int)(n * width[p]);
    x->rd[m] = n ? (int)(nt * x->woff[p] + (lo - x->tlo) * width[p]) : 0;
  }
}

/* the counts and displacements of a scatter of one tensor's rows into x; set = 1: received in
   place, else one after the other (*total floats) */
static void scatter_counts(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                           const size_t *width, int shared, int set, rows_plan *x,
                           size_t *total) {
  const size_t nt = x->thi - x->tlo, w = width[x->mp];
  *total = 0;
  for (int m = 0; m < x->size; m++) {
    size_t lo, mlo, mhi, tl, th;
    /* to m: m's own rows within my target rows, from the block of m's peer */
    int p = member_rows(d, g, m, B, &mlo, &mhi);
    size_t n = overlap(mlo, mhi, x->tlo, x->thi, &lo);
    x->sc[m] = (int)(n * width[p]);
    x->sd[m] = n ? (int)((shared ? 0 : nt * x->woff[p]) + (lo - x->tlo) * width[p]) : 0;
    /* from m: my own rows within m's target rows, one after the other */
    target_rows(d, g, target, m, B, &tl, &th);
    n = overlap(x->olo, x->ohi, tl, th, &lo);
    x->rc[m] = (int)(n * w);
    x->rd[m] = set ? (n ? (int)((lo - x->olo) * w) : 0) : (int)*total;
    *total += n * w;
  }
}

void kdp_dist_gather_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                          const size_t *width, const float *in, float *out) {
  rows_plan x;
  plan_rows(d, g, target, B, width, &x);
  gather_counts(d, g, target, B, width, &x);
  rows_alltoallv(d, x.comm, in, x.sc, x.sd, out, x.rc, x.rd, x.size, x.me);
}

/* set = 1 (targets that partition the batch: each of my rows comes from one sender): received
   straight into out; else into a buffer, added into out in rank order */
static void scatter_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B, const size_t *width,
                         int shared, const float *in, float *out, int set) {
  rows_plan x;
  plan_rows(d, g, target, B, width, &x);
  const size_t w = width[x.mp];
  size_t total;
  scatter_counts(d, g, target, B, width, shared, set, &x, &total);
  if (set) {
    rows_alltoallv(d, x.comm, in, x.sc, x.sd, out, x.rc, x.rd, x.size, x.me);
    return;
  }
  float *recv = xbuf(d, total ? total : 1);
  rows_alltoallv(d, x.comm, in, x.sc, x.sd, recv, x.rc, x.rd, x.size, x.me);
  /* add each sender's rows into mine, in rank order */
  for (int m = 0; m < x.size; m++) {
    size_t lo, tl, th;
    target_rows(d, g, target, m, B, &tl, &th);
    size_t n = overlap(x.olo, x.ohi, tl, th, &lo);
    float *o = out + (lo - x.olo) * w;
    const float *r = recv + x.rd[m];
    for (size_t k = 0; k < n * w; k++) o[k] += r[k];
  }
}

void kdp_dist_scatter_rows(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                           const size_t *width, int shared, const float *in, float *out) {
  scatter_rows(d, g, target, B, width, shared, in, out, 0);
}

void kdp_dist_scatter_rows_set(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                               const size_t *width, int shared, const float *in, float *out) {
  if (target != KDP_ROWS_BLOCK) { /* several senders may hold a row: they add up */
    size_t lo, hi;
    kdp_dist_rows(d, g, KDP_ROWS_OWN, B, &lo, &hi);
    memset(out, 0, (hi - lo) * width[d->peer] * sizeof(float));
  }
  scatter_rows(d, g, target, B, width, shared, in, out, target == KDP_ROWS_BLOCK);
}

/* member m's part of nf fields' exchange as one datatype: field f's cnt[f][m] floats at
   base[f] + dsp[f][m] (cnt, dsp: the fields' count arrays of the group's size, 4 per field:
   sc, sd, rc, rd; which = 0 send, 2 receive). MPI_FLOAT with *count = 0 when m gets nothing. */
static MPI_Datatype field_type(const int *cnt, int size, size_t nf, const float *const *base,
                               int m, int which, int *count) {
  MPI_Aint disp[KDP_DIST_MAX_FIELDS];
  int len[KDP_DIST_MAX_FIELDS], nb = 0;
  for (size_t f = 0; f < nf; f++) {
    const int *c = cnt + (4 * f + (size_t)which) * (size_t)size;
    if (!c[m]) continue;
    KDP_CHECK_MPI(MPI_Get_address(base[f] + c[size + m], &disp[nb]));
    len[nb++] = c[m];
  }
  *count = nb ? 1 : 0;
  if (!nb) return MPI_FLOAT;
  MPI_Datatype t;
  KDP_CHECK_MPI(MPI_Type_create_hindexed(nb, len, disp, MPI_FLOAT, &t));
  KDP_CHECK_MPI(MPI_Type_commit(&t));
  return t;
}

/* nf fields' rows in one MPI_Alltoallw (absolute addresses, MPI_BOTTOM): member m receives in
   one message what nf exchanges with these counts would send it */
static void fields_alltoallw(kdp_dist *d, const rows_plan *x, const int *cnt, size_t nf,
                             const float *const *in, float *const *out) {
  const int size = x->size;
  int *sc = kdp_xcalloc(4 * (size_t)size, sizeof(int)), *sd = sc + size, *rc = sd + size,
      *rd = rc + size;
  MPI_Datatype *st = kdp_xcalloc(2 * (size_t)size, sizeof(MPI_Datatype)), *rt = st + size;
  double t0 = kdp_now(), sent = 0;
  for (int m = 0; m < size; m++) {
    st[m] = field_type(cnt, size, nf, in, m, 0, &sc[m]);
    rt[m] = field_type(cnt, size, nf, (const float *const *)out, m, 2, &rc[m]);
    for (size_t f = 0; f < nf && m != x->me; f++) sent += (double)cnt[4 * f * (size_t)size + (size_t)m];
  }
  KDP_WAIT_MPI(d, MPI_Alltoallw(MPI_BOTTOM, sc, sd, st, MPI_BOTTOM, rc, rd, rt, x->comm));
  d->bytes_exchanged += sent * sizeof(float);
  d->t_exchange += kdp_now() - t0;
  for (int m = 0; m < size; m++) {
    if (sc[m]) MPI_Type_free(&st[m]);
    if (rc[m]) MPI_Type_free(&rt[m]);
  }
  free(st);
  free(sc);
}

/* the counts of n floats sent whole to every other member, received as member-ordered blocks */
static void whole_counts(size_t n, rows_plan *x) {
  for (int m = 0; m < x->size; m++) {
    x->sc[m] = x->rc[m] = m == x->me ? 0 : (int)n;
    x->sd[m] = 0;
    x->rd[m] = (int)((size_t)m * n);
  }
}

/* the fields' counts, each as its one-tensor exchange computes them (gather: 1, else a scatter
   to target BLOCK, set), into cnt (4 x size per field), then one exchange of them all */
static void fields_exchange(kdp_dist *d, kdp_group g, kdp_rows target, size_t B, int gather,
                            const kdp_rows_field *f, size_t nf) {
  if (nf > KDP_DIST_MAX_FIELDS) {
    fprintf(stderr, "kdpeers: %zu fields in one row exchange (at most %d)\n", nf,
            KDP_DIST_MAX_FIELDS);
    MPI_Abort(MPI_COMM_WORLD, 3);
  }
  rows_plan x;
  const float *in[KDP_DIST_MAX_FIELDS];
  float *out[KDP_DIST_MAX_FIELDS];
  int *cnt = NULL;
  static const size_t no_width[KDP_DIST_MAX_PEERS];
  for (size_t k = 0; k < nf; k++) {
    size_t total;
    plan_rows(d, g, target, B, f[k].whole ? no_width : f[k].width, &x);
    if (f[k].whole)
      whole_counts(f[k].whole, &x);
    else if (gather)
      gather_counts(d, g, target, B, f[k].width, &x);
    else
      scatter_counts(d, g, target, B, f[k].width, f[k].shared, 1, &x, &total);
    if (nf == 1) { /* one tensor: the plain exchange */
      rows_alltoallv(d, x.comm, f[0].in, x.sc, x.sd, f[0].out, x.rc, x.rd, x.size, x.me);
      return;
    }
    if (!cnt) cnt = kdp_xmalloc(4 * nf * (size_t)x.size * sizeof(int));
    memcpy(cnt + 4 * k * (size_t)x.size, x.sc, 4 * (size_t)x.size * sizeof(int));
    in[k] = f[k].in;
    out[k] = f[k].out;
  }
  if (nf) fields_alltoallw(d, &x, cnt, nf, in, out);
  free(cnt);
}

void kdp_dist_gather_rows_fields(kdp_dist *d, kdp_group g, kdp_rows target, size_t B,
                                 const kdp_rows_field *f, size_t nf) {
  fields_exchange(d, g, target, B, 1, f, nf);
}

void kdp_dist_scatter_blocks_fields(kdp_dist *d, kdp_group g, size_t B, const kdp_rows_field *f,
                                    size_t nf) {
  fields_exchange(d, g, KDP_ROWS_BLOCK, B, 0, f, nf);
}

/* in-place allreduce of n values over group g */
static void group_allreduce(kdp_dist *d, kdp_group g, void *buf, size_t n, MPI_Datatype type,
                            MPI_Op op) {
  int size, me;
  MPI_Comm comm = group_comm(d, g, &size, &me);
  if (size <= 1 || n == 0) return;
  double t0 = kdp_now();
  KDP_WAIT_MPI(d, MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, type, op, comm));
  d->t_exchange += kdp_now() - t0;
}

void kdp_dist_group_sum_f64(kdp_dist *d, kdp_group g, double *buf, size_t n) {
  group_allreduce(d, g, buf, n, MPI_DOUBLE, MPI_SUM);
}

void kdp_dist_group_min(kdp_dist *d, kdp_group g, float *buf, size_t n) {
  group_allreduce(d, g, buf, n, MPI_FLOAT, MPI_MIN);
}

void kdp_dist_reduce_rows(kdp_dist *d, size_t B, size_t width, kdp_dist_op op, float *rows) {
  const MPI_Op mop = op == KDP_DIST_MIN ? MPI_MIN : MPI_SUM;
  size_t lo, hi;
  kdp_dist_rows(d, KDP_GROUP_WORLD, KDP_ROWS_OWN, B, &lo, &hi);
  if (d->uniform) {
    group_allreduce(d, KDP_GROUP_COHORT, rows, (hi - lo) * width, MPI_FLOAT, mop);
    return;
  }
  float *all = xbuf(d, B * width + 1);
  const float id = op == KDP_DIST_MIN ? INFINITY : 0.0f;
  for (size_t k = 0; k < B * width; k++) all[k] = id;
  if (hi > lo) memcpy(all + lo * width, rows, (hi - lo) * width * sizeof(float));
  group_allreduce(d, KDP_GROUP_WORLD, all, B * width, MPI_FLOAT, mop);
  if (hi > lo) memcpy(rows, all + lo * width, (hi - lo) * width * sizeof(float));
}

void kdp_dist_world_allreduce(kdp_dist *d, float *buf, size_t n) {
  if (d->world_size <= 1 || n == 0) return;
  double t0 = kdp_now();
  KDP_WAIT_MPI(d, MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD));
  d->t_allreduce += kdp_now() - t0;
}

void kdp_dist_world_allreduce_start(kdp_dist *d, float *buf, size_t n) {
  kdp_dist_world_allreduce_finish(d);
  if (d->world_size <= 1 || n == 0) return;
  double t0 = kdp_now();
  d->sum_req = kdp_xmalloc(sizeof(MPI_Request));
  KDP_CHECK_MPI(MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                               (MPI_Request *)d->sum_req));
  d->t_allreduce += kdp_now() - t0;
}

void kdp_dist_world_allreduce_finish(kdp_dist *d) {
  if (!d->sum_req) return;
  double t0 = kdp_now();
  KDP_WAIT_MPI(d, MPI_Wait((MPI_Request *)d->sum_req, MPI_STATUS_IGNORE));
  free(d->sum_req);
  d->sum_req = NULL;
  d->t_allreduce += kdp_now() - t0;
}

void kdp_dist_gather_u32(kdp_dist *d, uint32_t v, uint32_t *out) {
  KDP_WAIT_MPI(d, MPI_Gather(&v, 1, MPI_UINT32_T, out, 1, MPI_UINT32_T, 0, MPI_COMM_WORLD));
}

void *kdp_dist_node_shared(kdp_dist *d, size_t bytes, void **win) {
  MPI_Win *w = kdp_xmalloc(sizeof *w);
  void *base = NULL;
  MPI_Aint size = d->local_rank == 0 ? (MPI_Aint)(bytes ? bytes : 1) : 0;
  KDP_CHECK_MPI(MPI_Win_allocate_shared(size, 1, MPI_INFO_NULL, COMM(d->node_comm), &base, w));
  MPI_Aint qsize = 0;
  int disp = 0;
  KDP_CHECK_MPI(MPI_Win_shared_query(*w, 0, &qsize, &disp, &base));
  *win = w;
  return base;
}

void kdp_dist_node_shared_free(void *win) {
  if (!win) return;
  MPI_Win_free((MPI_Win *)win);
  free(win);
}

void kdp_dist_node_bcast(kdp_dist *d, void *buf, size_t bytes) {
  KDP_WAIT_MPI(d, MPI_Bcast(buf, (int)bytes, MPI_BYTE, 0, COMM(d->node_comm)));
}

void kdp_dist_node_barrier(kdp_dist *d) { KDP_WAIT_MPI(d, MPI_Barrier(COMM(d->node_comm))); }

double kdp_dist_sum(kdp_dist *d, double v) {
  double out = v;
  KDP_WAIT_MPI(d, MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD));
  return out;
}

void kdp_dist_bcast(kdp_dist *d, void *buf, size_t bytes) {
  KDP_WAIT_MPI(d, MPI_Bcast(buf, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD));
}

/* How long to sleep between tests of an agreement point waited at for `waited` seconds: spin
   while the others are about to arrive (a sleep there would delay the step), then back off. */
static useconds_t backoff_us(double waited) {
  if (waited < 0.002) return 0;
  if (waited < 0.05) return 50;
  if (waited < 1.0) return 200;
  return 1000;
}

void kdp_dist_step_sync(kdp_dist *d, int32_t *flags, size_t n) {
  if (d->world_size <= 1) return;
  double t0 = kdp_now();
  d->sync_seq++;
  atomic_fetch_add_explicit(&d->waits, 1, memory_order_relaxed);
  atomic_store_explicit(&d->waiting_in, KDP_DIST_AGREEMENT, memory_order_release);
  MPI_Request req;
  KDP_CHECK_MPI(
      MPI_Iallreduce(MPI_IN_PLACE, flags, (int)n, MPI_INT32_T, MPI_MAX, MPI_COMM_WORLD, &req));
  int done = 0, hooked = 0;
  double last = t0, waited = 0, next_hook = KDP_DIST_WAIT_PERIOD;
  KDP_CHECK_MPI(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
  while (!done) {
    useconds_t us = backoff_us(waited);
    if (us) usleep(us);
    KDP_CHECK_MPI(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
    double now = kdp_now(), dt = now - last;
    last = now;
    /* a longer gap is this process not running (stopped, suspended): not the others' lateness */
    waited += dt < 0.5 ? dt : 0.5;
    if (!done && d->on_wait && waited >= next_hook) {
      d->on_wait(d->wait_ctx, d, waited, 0);
      hooked = 1;
      next_hook = waited + KDP_DIST_WAIT_PERIOD;
    }
  }
  atomic_store_explicit(&d->waiting_in, NULL, memory_order_release);
  if (hooked) d->on_wait(d->wait_ctx, d, waited, 1);
  d->t_wait += kdp_now() - t0;
}

double kdp_dist_max(kdp_dist *d, double v) {
  double out = v;
  KDP_WAIT_MPI(d, MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD));
  return out;
}

void kdp_dist_barrier(kdp_dist *d) {
  KDP_WAIT_MPI(d, MPI_Barrier(MPI_COMM_WORLD));
}
