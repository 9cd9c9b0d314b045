#!/bin/sh
# Open MPI launch agent for the multi-node test: mpirun calls it like ssh ("agent [opts] HOST
# COMMAND..."); it runs COMMAND inside the network namespace that owns HOST's address (map file
# KDP_NETNS_MAP, lines "ADDRESS NAMESPACE"), in a new UTS namespace whose hostname is the
# namespace's name: two "nodes" must not share a hostname, or Open MPI treats them as one node.
while [ $# -gt 0 ]; do
  case "$1" in
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"
shift
ns=$(awk -v h="$host" '$1 == h { print $2 }' "${KDP_NETNS_MAP:?}")
[ -n "$ns" ] || { echo "agent: no namespace for host '$host'" >&2; exit 1; }
echo "agent: launching on $host in namespace $ns" >>"${KDP_NETNS_LOG:-/dev/null}"
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns; $*"
