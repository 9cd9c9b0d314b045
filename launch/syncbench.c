/* syncbench.c: kdp-syncbench, the cost of the step's agreement point. Times steps made of a
 * simulated compute phase (rank r spins compute + r * skew microseconds, so the ranks arrive at
 * different times, as peers of different speeds do) and one agreement point, done two ways in
 * interleaved blocks:
 *   blocking  MPI_Allreduce of the KDP_SYNC_N flags (MAX), what kdpeers did before the stall check
 *   polled    kdp_dist_step_sync: MPI_Iallreduce tested in a loop (spin 2 ms, then sleeps of
 *             50 us..1 ms), with the stall check's wait hook installed (it runs only after 0.1 s)
 * and prints the median time per step of each (microseconds, slowest rank) and their ratio.
 *
 * Usage: mpirun -np P kdp-syncbench [--steps N] [--compute-us U] [--skew-us S] [--blocks B]
 *        (defaults: 2000 steps per block, 2000 us compute, 100 us skew, 7 blocks of each)
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdpeers/dist.h"

static void spin_us(double us) {
  double end = MPI_Wtime() + us * 1e-6;
  while (MPI_Wtime() < end) {
  }
}

static void hook(void *ctx, kdp_dist *d, double waited, int done) {
  (void)ctx, (void)d, (void)waited, (void)done;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  long steps = 2000, blocks = 7;
  double compute = 2000, skew = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (strcmp(argv[i], "--steps") == 0) steps = atol(argv[i + 1]);
    else if (strcmp(argv[i], "--compute-us") == 0) compute = atof(argv[i + 1]);
    else if (strcmp(argv[i], "--skew-us") == 0) skew = atof(argv[i + 1]);
    else if (strcmp(argv[i], "--blocks") == 0) blocks = atol(argv[i + 1]);
  }
  kdp_error err;
  if (kdp_dist_init_mpi(&argc, &argv, &err) != 0) return 1;
  kdp_dist d;
  if (kdp_dist_setup(&d, 1, &err) != 0) return 1;
  d.on_wait = hook;
  double *t[2] = {calloc((size_t)blocks, sizeof(double)), calloc((size_t)blocks, sizeof(double))};
  int32_t flags[8];
  double my = compute + skew * d.world_rank;
  for (long b = 0; b < blocks; b++)
    for (int v = 0; v < 2; v++) {
      kdp_dist_barrier(&d);
      double t0 = MPI_Wtime();
      for (long s = 0; s < steps; s++) {
        spin_us(my);
        memset(flags, 0, sizeof flags);
        flags[1] = (int32_t)(s & 1);
        if (v == 0)
          MPI_Allreduce(MPI_IN_PLACE, flags, 6, MPI_INT32_T, MPI_MAX, MPI_COMM_WORLD);
        else
          kdp_dist_step_sync(&d, flags, 6);
      }
      t[v][b] = kdp_dist_max(&d, (MPI_Wtime() - t0) / (double)steps * 1e6);
    }
  if (d.world_rank == 0) {
    qsort(t[0], (size_t)blocks, sizeof(double), cmp);
    qsort(t[1], (size_t)blocks, sizeof(double), cmp);
    double a = t[0][blocks / 2], p = t[1][blocks / 2];
    printf("kdp-syncbench: %d ranks, %ld steps x %ld blocks, compute %.0f us + %.0f us per rank\n",
           d.world_size, steps, blocks, compute, skew);
    printf("  us per step (median, min..max): blocking %.1f (%.1f..%.1f), polled %.1f "
           "(%.1f..%.1f); polled / blocking = %.4f\n",
           a, t[0][0], t[0][blocks - 1], p, t[1][0], t[1][blocks - 1], p / a);
  }
  free(t[0]);
  free(t[1]);
  kdp_dist_free(&d);
  kdp_dist_finalize();
  return 0;
}
