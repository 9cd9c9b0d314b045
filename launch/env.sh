# Sourced by kdpeers' scripts: lets Open MPI run as root (containers, CI) and keeps OpenBLAS to
# one thread per rank unless the caller chose otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Loopback-only machines: keep Open MPI from probing other interfaces.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
