/* pingpong.c: kdp-pingpong, the latency-bandwidth constants of the MPI operations kdpeers uses.
 * Times MPI_Allgather, MPI_Allreduce (float sum), MPI_Reduce_scatter_block (float sum),
 * MPI_Alltoall (the row exchanges of kdpeers' pipeline are all-to-alls) and a point-to-point
 * ping-pong (ranks 0 and 1) over message sizes, then fits t = alpha + beta * bytes
 * by least squares over the sizes.
 *
 * Usage: mpirun -np P kdp-pingpong [--min BYTES] [--max BYTES] [--factor F] [--reps R]
 *                                  [--seconds S] [--ops LIST] [--json FILE] [--label TEXT]
 *   --min/--max  message sizes from min to max, multiplied by F each time (default 8 .. 16 MiB, F 4;
 *                max is always included)
 *   --reps R     timed batches per size (default 7); the batch time is the slowest rank's
 *   --seconds S  target duration of one batch (default 0.02) at 2 us + 1 ns/B per operation
 *                (at least 3 operations per batch)
 *   --ops LIST   comma-separated subset of allgather,allreduce,reduce_scatter,alltoall,pingpong
 *                (default all)
 *   --json FILE  append one JSON object (every point and the fits) to FILE
 *   --label TEXT free text stored in the JSON (e.g. the transport)
 *
 * What "bytes" means (the quantity in the fit and in bench/cost-model.md):
 *   allgather       bytes each rank contributes (it receives (P-1) times that)
 *   allreduce       size of the vector being reduced (floats * 4)
 *   reduce_scatter  size of the whole input vector (P blocks; each rank keeps one block)
 *   alltoall        size of the whole send vector (P blocks; block j goes to rank j, so each
 *                   rank sends (P-1)/P of it and receives as much)
 *   pingpong        one message; the time is half a round trip
 * Fits: "ols" minimises the absolute squared error (dominated by the large sizes, so alpha can
 * come out poor or even negative); "rel" minimises the relative squared error ((fit - t) / t)^2,
 * which weighs small and large sizes alike. Both are fitted on the median and on the best batch.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIZES 64
#define N_OPS 5

enum { OP_ALLGATHER, OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLTOALL, OP_PINGPONG };
static const char *const op_names[N_OPS] = {"allgather", "allreduce", "reduce_scatter",
                                            "alltoall", "pingpong"};

typedef struct point {
  size_t bytes;
  long iters;
  double t_median, t_best; /* seconds per operation */
} point;

typedef struct fit {
  double alpha, beta;
} fit;

static int rank, nranks;

static void die(const char *msg) {
  if (rank == 0) fprintf(stderr, "kdp-pingpong: %s\n", msg);
  MPI_Abort(MPI_COMM_WORLD, 2);
  exit(2);
}

/* Actual bytes moved for a requested size (rounded to whole floats / whole blocks). */
static size_t op_bytes(int op, size_t want) {
  if (op == OP_ALLREDUCE) return want < 4 ? 4 : want / 4 * 4;
  if (op == OP_REDUCE_SCATTER || op == OP_ALLTOALL) {
    size_t per = want / 4 / (size_t)nranks;
    if (per < 1) per = 1;
    return per * 4 * (size_t)nranks;
  }
  return want < 1 ? 1 : want;
}

static void run_op(int op, size_t bytes, long iters, char *a, char *b) {
  for (long i = 0; i < iters; i++) {
    switch (op) {
    case OP_ALLGATHER:
      MPI_Allgather(a, (int)bytes, MPI_BYTE, b, (int)bytes, MPI_BYTE, MPI_COMM_WORLD);
      break;
    case OP_ALLREDUCE:
      MPI_Allreduce(a, b, (int)(bytes / 4), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      break;
    case OP_REDUCE_SCATTER:
      MPI_Reduce_scatter_block(a, b, (int)(bytes / 4 / (size_t)nranks), MPI_FLOAT, MPI_SUM,
                               MPI_COMM_WORLD);
      break;
    case OP_ALLTOALL:
      MPI_Alltoall(a, (int)(bytes / (size_t)nranks), MPI_BYTE, b, (int)(bytes / (size_t)nranks),
                   MPI_BYTE, MPI_COMM_WORLD);
      break;
    case OP_PINGPONG:
      if (rank == 0) {
        MPI_Send(a, (int)bytes, MPI_BYTE, 1, 7, MPI_COMM_WORLD);
        MPI_Recv(b, (int)bytes, MPI_BYTE, 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
      } else if (rank == 1) {
        MPI_Recv(b, (int)bytes, MPI_BYTE, 0, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Send(a, (int)bytes, MPI_BYTE, 0, 7, MPI_COMM_WORLD);
      }
      break;
    }
  }
}

/* Seconds for `iters` operations, the slowest rank's. */
static double timed(int op, size_t bytes, long iters, char *a, char *b) {
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = MPI_Wtime();
  run_op(op, bytes, iters, a, b);
  double t = MPI_Wtime() - t0, tmax = 0;
  MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return tmax;
}

static int cmp_double(const void *x, const void *y) {
  double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

static void measure(int op, size_t bytes, int reps, double seconds, char *a, char *b, point *p) {
  run_op(op, bytes, 2, a, b); /* warm-up: connections, buffers */
  /* iterations from a pessimistic a-priori estimate (2 us + 1 ns/B), not from a probe: on a
     loaded machine one descheduled probe would size the batch wrongly */
  double est = 2e-6 + 1e-9 * (double)bytes;
  long iters = (long)(seconds / est);
  if (iters < 3) iters = 3;
  if (iters > (1L << 20)) iters = 1L << 20;
  double ts[64];
  if (reps > 64) reps = 64;
  for (int r = 0; r < reps; r++) ts[r] = timed(op, bytes, iters, a, b) / (double)iters;
  qsort(ts, (size_t)reps, sizeof ts[0], cmp_double);
  p->bytes = bytes;
  p->iters = iters;
  p->t_best = ts[0];
  p->t_median = reps % 2 ? ts[reps / 2] : 0.5 * (ts[reps / 2 - 1] + ts[reps / 2]);
  if (op == OP_PINGPONG) { /* a round trip is two messages */
    p->t_best *= 0.5;
    p->t_median *= 0.5;
  }
}

/* Weighted least squares of t = alpha + beta * x with weights w (2x2 normal equations). */
static fit wls(const point *p, int n, int use_best, int relative) {
  double sw = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (int i = 0; i < n; i++) {
    double x = (double)p[i].bytes, y = use_best ? p[i].t_best : p[i].t_median;
    double w = relative ? 1.0 / (y * y) : 1.0;
    sw += w;
    sx += w * x;
    sy += w * y;
    sxx += w * x * x;
    sxy += w * x * y;
  }
  fit f = {0, 0};
  double det = sw * sxx - sx * sx;
  if (det == 0) return f;
  f.beta = (sw * sxy - sx * sy) / det;
  f.alpha = (sy - f.beta * sx) / sw;
  return f;
}

static int parse_size(const char *s, size_t *out) {
  char *end = NULL;
  double v = strtod(s, &end);
  if (end == s || v < 1) return -1;
  if (*end == 'k' || *end == 'K') v *= 1024, end++;
  else if (*end == 'm' || *end == 'M') v *= 1024 * 1024, end++;
  if (*end) return -1;
  *out = (size_t)v;
  return 0;
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &nranks);
  size_t lo = 8, hi = 16u << 20;
  double factor = 4, seconds = 0.02;
  int reps = 7, want[N_OPS] = {1, 1, 1, 1, 1};
  const char *json = NULL, *label = "";
  for (int i = 1; i < argc; i++) {
    const char *o = argv[i];
    if (strcmp(o, "-h") == 0 || strcmp(o, "--help") == 0) {
      if (rank == 0)
        printf("usage: mpirun -np P kdp-pingpong [--min BYTES] [--max BYTES] [--factor F] "
               "[--reps R] [--seconds S] [--ops allgather,allreduce,reduce_scatter,alltoall,pingpong] "
               "[--json FILE] [--label TEXT]\n");
      MPI_Finalize();
      return 0;
    }
    if (i + 1 >= argc) die("every option takes a value (see --help)");
    const char *v = argv[++i];
    if (strcmp(o, "--min") == 0) {
      if (parse_size(v, &lo) != 0) die("--min expects a size in bytes (k/M suffix allowed)");
    } else if (strcmp(o, "--max") == 0) {
      if (parse_size(v, &hi) != 0) die("--max expects a size in bytes (k/M suffix allowed)");
    } else if (strcmp(o, "--factor") == 0) {
      factor = atof(v);
      if (!(factor > 1)) die("--factor must be > 1");
    } else if (strcmp(o, "--reps") == 0) {
      reps = atoi(v);
      if (reps < 1 || reps > 64) die("--reps must be in 1..64");
    } else if (strcmp(o, "--seconds") == 0) {
      seconds = atof(v);
      if (!(seconds > 0)) die("--seconds must be > 0");
    } else if (strcmp(o, "--ops") == 0) {
      memset(want, 0, sizeof want);
      char buf[256];
      snprintf(buf, sizeof buf, "%s", v);
      for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        int found = 0;
        for (int k = 0; k < N_OPS; k++)
          if (strcmp(tok, op_names[k]) == 0) want[k] = found = 1;
        if (!found) die("--ops: unknown operation (allgather, allreduce, reduce_scatter, alltoall, pingpong)");
      }
    } else if (strcmp(o, "--json") == 0) {
      json = v;
    } else if (strcmp(o, "--label") == 0) {
      label = v;
    } else {
      die("unknown option (see --help)");
    }
  }
  if (lo > hi) die("--min is larger than --max");
  if (nranks < 2) die("needs at least 2 ranks");
  size_t sizes[MAX_SIZES];
  int ns = 0;
  for (double s = (double)lo; s < (double)hi && ns < MAX_SIZES - 1; s *= factor)
    sizes[ns++] = (size_t)s;
  sizes[ns++] = hi;
  /* buffers: allgather receives P x max; reduce_scatter reads max */
  size_t cap = (hi + 4 * (size_t)nranks) * (size_t)nranks;
  char *a = malloc(cap), *b = malloc(cap);
  if (!a || !b) die("out of memory");
  for (size_t i = 0; i < cap / 4; i++) ((float *)a)[i] = 1.0f, ((float *)b)[i] = 0.0f;

  FILE *jf = NULL;
  if (rank == 0 && json) {
    jf = fopen(json, "a");
    if (!jf) die("cannot open the --json file");
    fprintf(jf, "{\"ranks\":%d,\"label\":\"%s\",\"reps\":%d,\"seconds_per_batch\":%g,\"ops\":[",
            nranks, label, reps, seconds);
  }
  if (rank == 0)
    printf("# kdp-pingpong: %d ranks%s%s; seconds per operation (median and best of %d "
           "batches, slowest rank)\n",
           nranks, *label ? ", " : "", label, reps);
  int first_op = 1;
  for (int op = 0; op < N_OPS; op++) {
    if (!want[op]) continue;
    point pts[MAX_SIZES];
    int n = 0;
    size_t last = 0;
    for (int i = 0; i < ns; i++) {
      size_t by = op_bytes(op, sizes[i]);
      if (by == last) continue;
      last = by;
      measure(op, by, reps, seconds, a, b, &pts[n]);
      if (rank == 0)
        printf("%-15s %10zu B  %8ld iters  median %.3e s  best %.3e s  (%.1f MB/s)\n",
               op_names[op], by, pts[n].iters, pts[n].t_median, pts[n].t_best,
               (double)by / pts[n].t_median / 1e6);
      n++;
    }
    fit om = wls(pts, n, 0, 0), ob = wls(pts, n, 1, 0), rm = wls(pts, n, 0, 1),
        rb = wls(pts, n, 1, 1);
    if (rank == 0) {
      printf("%-15s fit rel/median: alpha %.3e s, beta %.3e s/B (%.0f MB/s); ols/median: "
             "alpha %.3e s, beta %.3e s/B\n",
             op_names[op], rm.alpha, rm.beta, rm.beta > 0 ? 1e-6 / rm.beta : 0.0, om.alpha,
             om.beta);
      if (jf) {
        fprintf(jf, "%s{\"op\":\"%s\",\"points\":[", first_op ? "" : ",", op_names[op]);
        for (int i = 0; i < n; i++)
          fprintf(jf, "%s{\"bytes\":%zu,\"iters\":%ld,\"t_median\":%.6e,\"t_best\":%.6e}",
                  i ? "," : "", pts[i].bytes, pts[i].iters, pts[i].t_median, pts[i].t_best);
        fprintf(jf,
                "],\"fit\":{\"rel_median\":{\"alpha\":%.6e,\"beta\":%.6e},"
                "\"rel_best\":{\"alpha\":%.6e,\"beta\":%.6e},"
                "\"ols_median\":{\"alpha\":%.6e,\"beta\":%.6e},"
                "\"ols_best\":{\"alpha\":%.6e,\"beta\":%.6e}}}",
                rm.alpha, rm.beta, rb.alpha, rb.beta, om.alpha, om.beta, ob.alpha, ob.beta);
      }
    }
    first_op = 0;
  }
  if (jf) {
    fprintf(jf, "]}\n");
    fclose(jf);
  }
  free(a);
  free(b);
  MPI_Finalize();
  return 0;
}
