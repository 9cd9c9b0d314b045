/* collbench.c: kdp-collbench, under mpirun -np 2: the gradient allreduce of one peer on 2 ranks,
 * timed alone (no training step around it), the ways src/dist/buckets.c could run it: one
 * blocking MPI_Allreduce of the whole vector (run.bucket_kb = 0); two buckets as MPI_Iallreduce
 * (the build before 2026-12-07 evening); the last layers' bucket as MPI_Iallreduce and the first
 * layer's as one blocking MPI_Allreduce (now); reduce-scatter and allgather (a sharded optimizer
 * step); and a memcpy of the vector for scale. Every repetition starts at a barrier; a time is
 * the slower rank's; reported: min, p10 and median over the repetitions (docs/threads.md).
 *
 * Usage: mpirun -np 2 kdp-collbench [--n FLOATS] [--first FLOATS] [--reps N]
 *   defaults: mlp(512,256)'s 535818 gradients, of which its first layer's 401920, 300 reps
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

enum { W_BLOCKING, W_NBC2, W_NBC_BLOCKING, W_IALL, W_REDSCAT, W_ALLGATHER, W_MEMCPY, W_N };
static const char *const NAME[W_N] = {
    "one blocking allreduce (bucket_kb = 0)", "2 buckets, both MPI_Iallreduce (before)",
    "2 buckets, first layer's blocking (now)", "one MPI_Iallreduce of everything",
    "reduce-scatter", "allgather (the weights' halves)", "memcpy of the vector"};

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, size;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  long n = 535818, first = 401920, reps = 300;
  for (int i = 1; i + 1 < argc; i += 2) {
    long v = strtol(argv[i + 1], NULL, 10);
    if (!strcmp(argv[i], "--n")) n = v;
    else if (!strcmp(argv[i], "--first")) first = v;
    else if (!strcmp(argv[i], "--reps")) reps = v;
  }
  if (size != 2 || n < 2 || first < 1 || first >= n || reps < 1) {
    if (!rank) fprintf(stderr, "usage: mpirun -np 2 kdp-collbench [--n N] [--first F < N] [--reps R]\n");
    MPI_Finalize();
    return 2;
  }
  float *a = malloc((size_t)n * sizeof *a), *c = malloc((size_t)n * sizeof *c);
  int cnt[2] = {(int)(n / 2), (int)(n - n / 2)}, dsp[2] = {0, (int)(n / 2)};
  double *t = malloc((size_t)W_N * (size_t)reps * sizeof *t);
  for (long k = 0; k < reps; k++)
    for (int w = 0; w < W_N; w++) {
      for (long i = 0; i < n; i++) a[i] = (float)(i % 1000) * 1e-3f + (float)rank;
      MPI_Barrier(MPI_COMM_WORLD);
      double t0 = MPI_Wtime();
      MPI_Request q[2];
      switch (w) {
        case W_BLOCKING:
          MPI_Allreduce(MPI_IN_PLACE, a, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
          break;
        case W_NBC2:
        case W_NBC_BLOCKING:
          MPI_Iallreduce(MPI_IN_PLACE, a + first, (int)(n - first), MPI_FLOAT, MPI_SUM,
                         MPI_COMM_WORLD, &q[0]);
          if (w == W_NBC2) {
            MPI_Iallreduce(MPI_IN_PLACE, a, (int)first, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &q[1]);
            MPI_Waitall(2, q, MPI_STATUSES_IGNORE);
          } else {
            MPI_Allreduce(MPI_IN_PLACE, a, (int)first, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            MPI_Wait(&q[0], MPI_STATUS_IGNORE);
          }
          break;
        case W_IALL:
          MPI_Iallreduce(MPI_IN_PLACE, a, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, &q[0]);
          MPI_Wait(&q[0], MPI_STATUS_IGNORE);
          break;
        case W_REDSCAT:
          MPI_Reduce_scatter(a, c, cnt, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
          break;
        case W_ALLGATHER:
          MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, a, cnt, dsp, MPI_FLOAT, MPI_COMM_WORLD);
          break;
        case W_MEMCPY:
          memcpy(c, a, (size_t)n * sizeof *a);
          break;
      }
      double dt = MPI_Wtime() - t0, slow;
      MPI_Allreduce(&dt, &slow, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      t[(size_t)w * (size_t)reps + (size_t)k] = slow;
    }
  if (!rank) {
    printf("kdp-collbench: 2 ranks, %ld floats (first layer %ld), %ld repetitions\n", n, first,
           reps);
    for (int w = 0; w < W_N; w++) {
      double *v = t + (size_t)w * (size_t)reps;
      qsort(v, (size_t)reps, sizeof *v, cmp_double);
      printf("%-42s min %.3f  p10 %.3f  median %.3f ms\n", NAME[w], 1e3 * v[0],
             1e3 * v[reps / 10], 1e3 * v[reps / 2]);
    }
  }
  free(a), free(c), free(t);
  MPI_Finalize();
  return 0;
}
