# Sourced by kdpeers' scripts: lets Open MPI run as root (containers, CI) and keeps OpenBLAS to
# one thread per rank unless the caller chose otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Loopback-only machines: keep Open MPI from probing other interfaces.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

# Benchmarks only (launch/bench-speed, bench-dml, bench-torch-configs): the environment both sides
# of a side-by-side comparison run in. kdp_bench_env CORETYPE MALLOC
#   CORETYPE  env: keep OPENBLAS_CORETYPE as the caller's environment has it; auto: unset it, so
#             OpenBLAS picks its kernels for this CPU (what a user on a cluster node gets); NAME:
#             set it (e.g. Haswell).
#   MALLOC    tuned: glibc's malloc keeps freed blocks of up to 32 MiB in its heap instead of
#             unmapping them (PyTorch allocates its temporaries per step; each mmap/munmap costs
#             page faults, 3x PyTorch's mlp step on this machine: bench/torch-baseline.md); default:
#             glibc's defaults. kdpeers allocates at start-up and is indifferent.
kdp_bench_malloc_tunables=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
kdp_bench_env() {
  case "$1" in
    env) ;;
    auto) unset OPENBLAS_CORETYPE ;;
    [A-Za-z]*) export OPENBLAS_CORETYPE="$1" ;;
    *) echo "kdp_bench_env: bad coretype '$1' (env, auto or an OpenBLAS core name)" >&2; return 2 ;;
  esac
  case "$2" in
    tuned) export GLIBC_TUNABLES="$kdp_bench_malloc_tunables" ;;
    default) unset GLIBC_TUNABLES ;;
    *) echo "kdp_bench_env: bad malloc '$2' (tuned or default)" >&2; return 2 ;;
  esac
}
