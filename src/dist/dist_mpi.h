/* dist_mpi.h: src/dist's own helpers around MPI calls (not part of the public API). */
#ifndef KDPEERS_DIST_MPI_H
#define KDPEERS_DIST_MPI_H

#include <mpi.h>
#include <stdatomic.h>
#include <stdio.h>

#include "kdpeers/dist.h"

#define KDP_CHECK_MPI(call)                                                                    \
  do {                                                                                         \
    int rc_ = (call);                                                                          \
    if (rc_ != MPI_SUCCESS) {                                                                  \
      char s_[MPI_MAX_ERROR_STRING];                                                           \
      int l_ = 0;                                                                              \
      MPI_Error_string(rc_, s_, &l_);                                                          \
      fprintf(stderr, "kdpeers: MPI call failed at %s:%d: %s: %s\n", __FILE__, __LINE__, #call, \
              s_);                                                                             \
      MPI_Abort(MPI_COMM_WORLD, 3);                                                            \
    }                                                                                          \
  } while (0)

#define COMM(p) (*(MPI_Comm *)(p))

/* A blocking collective: while it runs, d says so (for the stall check's watchdog thread, which
   reads it without MPI): two atomic stores, nothing else. */
#define KDP_WAIT_MPI(d, call)                                                                  \
  do {                                                                                         \
    atomic_fetch_add_explicit(&(d)->waits, 1, memory_order_relaxed);                           \
    atomic_store_explicit(&(d)->waiting_in, __func__, memory_order_release);                  \
    KDP_CHECK_MPI(call);                                                                       \
    atomic_store_explicit(&(d)->waiting_in, NULL, memory_order_release);                      \
  } while (0)

#endif
