#!/usr/bin/env bash
# Multi-node, on one machine: two "hosts" are network namespaces joined by a bridge (in a third
# namespace) on a private subnet that exists only inside them. One mpirun spans both with Open MPI's
# TCP transport, a hostfile, btl/oob_tcp_if_include and a launch agent that enters each namespace;
# the result must equal the same job on one host. Usage: tests/test_multinode.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
if ! ip netns add "kdpprobe$$" 2>/dev/null; then
  echo "multinode: cannot create network namespaces here (needs root and iproute2): skipped"
  exit 77
fi
ip netns del "kdpprobe$$"
id=$$
A="kdpA$id" B="kdpB$id" S="kdpS$id"
net="10.77.$((id % 200 + 20))"
teardown() {
  for ns in "$A" "$B" "$S"; do ip netns del "$ns" 2>/dev/null; done
  cleanup
}
trap teardown EXIT
ip netns add "$A" && ip netns add "$B" && ip netns add "$S" &&
  ip -n "$S" link add br0 type bridge && ip -n "$S" link set br0 up
for x in A B; do
  ns=$A
  [ "$x" = B ] && ns=$B
  ip link add "v$x$id" type veth peer name "s$x$id"
  ip link set "v$x$id" netns "$ns"
  ip link set "s$x$id" netns "$S"
  ip -n "$S" link set "s$x$id" master br0
  ip -n "$S" link set "s$x$id" up
  ip -n "$ns" link set "v$x$id" up
  ip -n "$ns" link set lo up
done
ip -n "$A" addr add "$net.1/24" dev "vA$id"
ip -n "$B" addr add "$net.2/24" dev "vB$id"
printf '%s %s\n%s %s\n' "$net.1" "$A" "$net.2" "$B" >"$tmp/map"
export KDP_NETNS_MAP="$tmp/map" KDP_NETNS_LOG="$tmp/agent.log"
agent="$src/tests/netns/agent.sh"
# mpirun runs on "host" A: in namespace A, with A's own hostname (see agent.sh)
# shellcheck disable=SC2016
on_a() { ip netns exec "$A" unshare --uts sh -c 'hostname "$0"; exec "$@"' "$A" "$@"; }
mpi=(--mca plm_rsh_agent "$agent" --mca btl "tcp,self" --mca btl_tcp_if_include "$net.0/24"
  --mca oob_tcp_if_include "$net.0/24" -x KDP_NETNS_MAP -x KDP_NETNS_LOG -x OMPI_ALLOW_RUN_AS_ROOT
  -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM -x OPENBLAS_NUM_THREADS -x OMPI_MCA_btl_vader_single_copy_mechanism)
job=(-s data.subset=1024 -s data.test_subset=500 -s run.epochs=1 -s "model.arch=mlp(32)" -s kd.method=dml
  -s run.progress=plain -s server.enabled=false)

# placement: where do ranks land?
printf '%s slots=1\n%s slots=1\n' "$net.1" "$net.2" >"$tmp/hosts1"
on_a timeout 60 mpirun --hostfile "$tmp/hosts1" -np 2 --map-by node "${mpi[@]}" \
  sh -c 'ip -o -4 addr show | grep -o "inet [0-9.]*" | grep -v 127.0.0.1' >"$tmp/where" 2>&1
expect "one rank runs in each namespace ($(tr '\n' ' ' <"$tmp/where"))" \
  test "$(sort "$tmp/where" | tr '\n' ' ')" = "inet $net.1 inet $net.2 "
expect "the launch agent entered namespace B" grep -q "namespace $B" "$tmp/agent.log"
on_a timeout 60 mpirun --hostfile "$tmp/hosts1" -np 2 --map-by node "${mpi[@]}" hostname >"$tmp/names" 2>&1
expect "each host has its own hostname ($(tr '\n' ' ' <"$tmp/names"))" test "$(sort -u "$tmp/names" | wc -l)" = 2

for np in 2 4; do
  slots=$((np / 2))
  printf '%s slots=%d\n%s slots=%d\n' "$net.1" "$slots" "$net.2" "$slots" >"$tmp/hosts"
  d="$tmp/multi$np"
  on_a timeout 180 mpirun --hostfile "$tmp/hosts" -np "$np" --map-by node "${mpi[@]}" \
    "$exe" "${job[@]}" -s run.dir="$d" >"$d.out" 2>&1
  rc=$?
  expect "-np $np across two namespaces over TCP exits 0 (got $rc)" test "$rc" = 0
  [ "$rc" = 0 ] || tail -n 15 "$d.out"
  expect "-np $np: the summary counts $np ranks" grep -q "\"ranks\":$np" "$d/metrics.jsonl"
  for p in $(seq 0 $((np - 1))); do
    expect "-np $np: eval line for peer$p" grep -q "\"model\":\"peer$p\"" "$d/metrics.jsonl"
  done
  # the same job on one host (shared memory): identical results
  s="$tmp/single$np"
  timeout 180 mpirun -np "$np" --oversubscribe --bind-to none "$exe" "${job[@]}" -s run.dir="$s" >"$s.out" 2>&1
  expect "-np $np: results equal the single-host run exactly" cmp -s \
    <(grep '"event":"eval"' "$d/metrics.jsonl") <(grep '"event":"eval"' "$s/metrics.jsonl")
done

# a wrong interface fails within a timeout instead of hanging
t0=$(date +%s)
on_a timeout 90 mpirun --hostfile "$tmp/hosts1" -np 2 --map-by node --mca plm_rsh_agent "$agent" \
  --mca btl "tcp,self" --mca btl_tcp_if_include nosuchif0 --mca oob_tcp_if_include "$net.0/24" \
  -x KDP_NETNS_MAP -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
  "$exe" "${job[@]}" -s run.dir="$tmp/bad" >"$tmp/bad.out" 2>&1
rc=$?
t1=$(date +%s)
expect "a wrong btl_tcp_if_include fails (exit $rc) instead of hanging (took $((t1 - t0)) s)" \
  test "$rc" != 0 -a "$rc" != 124 -a "$rc" != 127

finish multinode
