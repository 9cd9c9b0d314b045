#!/usr/bin/env bash
# The inter-node path on one machine: two "hosts" made of network namespaces joined by a bridge
# (tests/netns/cluster), ONE mpirun across them with Open MPI's TCP transport, its daemons started
# through tests/netns/agent (an ssh stand-in that enters a namespace). Checks the hostfile, the
# interface selection (btl/oob_tcp_if_include), rank placement, that results equal a one-host run,
# and that a wrong interface fails instead of hanging. See docs/multinode.md.
# Needs root for `ip netns`; exits 77 (skipped) when namespaces cannot be created here.
# Usage: tests/test_multinode.sh PATH/TO/kdpeers
# shellcheck disable=SC2016 # sh -c snippets expand in the child shell, on purpose
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
exe=$(cd "$(dirname "$exe")" && pwd)/$(basename "$exe")
netns="$src/tests/netns"
tag="t$$"
A="kdpA-$tag" B="kdpB-$tag"
addrA=10.77.0.1 addrB=10.77.0.2 net=10.77.0.0/24

teardown() {
  "$netns/cluster" down "$tag" 2>/dev/null
  cleanup
}
trap teardown EXIT
trap 'exit 130' INT TERM

skip() {
  echo "multinode: SKIP: $1"
  exit 77
}
[ "$(id -u)" = 0 ] || skip "needs root to create network namespaces (ip netns add)"
command -v ip >/dev/null || skip "the 'ip' command (Debian package iproute2) is not installed"
command -v unshare >/dev/null || skip "the 'unshare' command (util-linux) is not installed"
command -v mpirun >/dev/null || skip "mpirun is not installed"
if ! "$netns/cluster" up "$tag" 2 >"$tmp/hosts" 2>"$tmp/cluster.err"; then
  skip "cannot create network namespaces, veths and a bridge here: $(tr '\n' ' ' <"$tmp/cluster.err")"
fi
if ! ip netns exec "$A" unshare --uts true 2>"$tmp/uts.err"; then
  skip "cannot create a UTS namespace inside a network namespace: $(cat "$tmp/uts.err")"
fi

export KDP_NETNS_HOSTS="$tmp/hosts" KDP_NETNS_LOG="$tmp/agent.log"
printf '%s slots=2\n%s slots=2\n' "$addrA" "$addrB" >"$tmp/hostfile"

# --- the pretend hosts ---
expect "host map lists $addrA in $A and $addrB in $B" \
  test "$(cat "$tmp/hosts")" = "$addrA $A"$'\n'"$addrB $B"
for ns in "$A" "$B"; do
  expect "$ns routes only the test subnet (nothing can leave the machine)" \
    test "$(ip -n "$ns" -4 route show | awk '{ print $1 }' | sort -u)" = "$net"
done

# mpirun NP MAP ARGS...: one mpirun started on host A (its own address is on the test subnet, and
# it has host A's hostname), TCP only (no shared-memory BTL: same-host ranks use TCP too), both
# TCP interface selections restricted to the test subnet, environment passed with -x.
# btl_if=... and limit=SECONDS (default 120) override the BTL interface and the timeout.
mpirun_mn() {
  local np="$1" map="$2"
  shift 2
  timeout "${limit:-120}" ip netns exec "$A" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$A" \
    mpirun --mca plm_rsh_agent "$netns/agent" --mca btl tcp,self \
    --mca btl_tcp_if_include "${btl_if:-$net}" --mca oob_tcp_if_include "$net" \
    --hostfile "$tmp/hostfile" --map-by "$map" --bind-to none -np "$np" \
    -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS -x OMPI_MCA_btl_vader_single_copy_mechanism "$@"
}
# where FILE CMD...: each rank appends "RANK HOSTNAME ADDRESS-OF-kdp0" to FILE, then becomes CMD
where='printf "%s %s %s\n" "$OMPI_COMM_WORLD_RANK" "$(hostname)" \
  "$(ip -o -4 addr show dev kdp0 2>/dev/null | awk "{ sub(\"/.*\", \"\", \$4); print \$4 }")" >>"$0"; exec "$@"'

# --- probe: where do the ranks land, and what do they see ---
mpirun_mn 4 node --display-map sh -c "$where" "$tmp/probe.where" \
  sh -c 'printf "env %s %s\n" "$OMPI_COMM_WORLD_RANK" "${OPENBLAS_NUM_THREADS:-unset}"' >"$tmp/probe.out" 2>&1
rc=$?
expect "probe: one mpirun over both hosts exits 0 (exit $rc)" test "$rc" = 0
[ "$rc" = 0 ] || tail -n 20 "$tmp/probe.out" | sed 's/^/    /'
expect "probe: --map-by node puts ranks 0,2 on $A ($addrA) and 1,3 on $B ($addrB)" \
  test "$(sort -n "$tmp/probe.where")" = "0 $A $addrA"$'\n'"1 $B $addrB"$'\n'"2 $A $addrA"$'\n'"3 $B $addrB"
expect "probe: the agent launched exactly one daemon, on $addrB in $B (mpirun itself is host A)" \
  test "$(awk '{ print $1, $2 }' "$tmp/agent.log" 2>/dev/null)" = "$addrB $B"
subnet_args() { grep "oob_tcp_if_include \"$net\"" "$tmp/agent.log" | grep -q "btl_tcp_if_include \"$net\""; }
expect "probe: the daemon on $B was told the test subnet for oob and btl" subnet_args
expect "probe: -x carries OPENBLAS_NUM_THREADS=1 to every rank (the agent starts with a clean env)" \
  test "$(grep -c '^env [0-3] 1$' "$tmp/probe.out")" = 4
expect "probe: --display-map shows 2 processes on each host" \
  test "$(grep -c 'Data for node: .*Num procs: 2' "$tmp/probe.out")" -ge 2

# --- kdpeers across the hosts, compared with the same job on one host ---
job=(-s kd.method=dml -s data.subset=1024 -s data.test_subset=500 -s run.epochs=1
  -s "model.arch=mlp(32)" -s run.progress=plain -s server.enabled=false)
evals() { grep '"event":"eval"' "$1/metrics.jsonl" 2>/dev/null; }
summary_ranks() { grep '"event":"summary"' "$1/metrics.jsonl" 2>/dev/null | sed -n 's/.*"ranks":\([0-9]*\).*/\1/p'; }
wire_bytes() { # bytes received + sent on host B's interface (everything to and from B crosses it)
  ip -n "$B" -s -j link show dev kdp0 | sed 's/.*"rx":{"bytes":\([0-9]*\).*"tx":{"bytes":\([0-9]*\).*/\1 \2/' |
    awk '{ print $1 + $2 }'
}
declare -A single=()
for layout in "2 node" "4 node" "4 slot"; do
  read -r np map <<<"$layout"
  name="np$np-$map" d="$tmp/mn-np$np-$map"
  : >"$d.where"
  b0=$(wire_bytes)
  mpirun_mn "$np" "$map" sh -c "$where" "$d.where" "$exe" "${job[@]}" -s run.dir="$d" >"$d.out" 2>&1
  rc=$?
  b1=$(wire_bytes)
  expect "$name: kdpeers across $A and $B exits 0 (exit $rc)" test "$rc" = 0
  [ "$rc" = 0 ] || tail -n 20 "$d.out" | sed 's/^/    /'
  for ((p = 0; p < np; p++)); do
    expect "$name: eval line for peer$p" grep -q "\"model\":\"peer$p\"" "$d/metrics.jsonl"
  done
  expect "$name: summary reports \"ranks\":$np" test "$(summary_ranks "$d")" = "$np"
  case "$map" in
    node) want=$(for ((r = 0; r < np; r++)); do
      if ((r % 2 == 0)); then echo "$r $A $addrA"; else echo "$r $B $addrB"; fi
    done) ;;
    slot) want=$(for ((r = 0; r < np; r++)); do
      if ((r < 2)); then echo "$r $A $addrA"; else echo "$r $B $addrB"; fi
    done) ;;
  esac
  expect "$name: every kdpeers rank ran where --map-by $map puts it ($(sort -n "$d.where" | awk '{ printf "%s%s@%s", (NR > 1 ? " " : ""), $1, $2 }'))" \
    test "$(sort -n "$d.where")" = "$want"
  # Rank 0 (host A) exchanges logits with peers on host B in every layout here: at least half of its
  # exchange volume (summary: steps x bytes_per_step) must have crossed B's link.
  vol=$(grep '"event":"summary"' "$d/metrics.jsonl" 2>/dev/null |
    sed -n 's/.*"steps":\([0-9]*\),.*"bytes_per_step":\([0-9]*\).*/\1 \2/p' | awk '{ print $1 * $2 }')
  expect "$name: $((b1 - b0)) bytes crossed host B's link (rank 0 exchanged ${vol:-?} bytes)" \
    test -n "$vol" -a "$((b1 - b0))" -ge "$((${vol:-0} / 2))" -a "${vol:-0}" -gt 0
  if [ -z "${single[$np]:-}" ]; then
    s="$tmp/single-np$np"
    timeout 120 mpirun -np "$np" --oversubscribe --bind-to none "$exe" "${job[@]}" -s run.dir="$s" \
      >"$s.out" 2>&1
    expect "np$np on one host (plain mpirun) exits 0" test "$?" = 0
    single[$np]="$s"
  fi
  expect "$name: eval lines equal the same job on one host, exactly" \
    test -n "$(evals "$d")" -a "$(evals "$d")" = "$(evals "${single[$np]}")"
done

# --- run.grad_sum = shm with one peer's 2 ranks on the two hosts: no shared window can join them,
# so the peer falls back to the allreduce (and says so); on 2 ranks the sum is a + b either way,
# so the result equals the one-host run, which sums through the window ---
kjob=("${job[@]}" -s kd.method=independent -s run.ranks_per_peer=2 -s run.grad_sum=shm -s run.max_steps=8)
d="$tmp/mn-shm" s="$tmp/single-shm"
mpirun_mn 2 node "$exe" "${kjob[@]}" -s run.dir="$d" >"$d.out" 2>&1
rc=$?
expect "grad_sum = shm, one peer over both hosts: exits 0 (exit $rc)" test "$rc" = 0
expect "grad_sum = shm, one peer over both hosts: it says it sums with the allreduce" \
  grep -q "not all on one node: summing its gradients with the allreduce" "$d.out"
timeout 120 mpirun -np 2 --oversubscribe --bind-to none "$exe" "${kjob[@]}" -s run.dir="$s" >"$s.out" 2>&1
expect "grad_sum = shm, one peer on one host (plain mpirun) exits 0" test "$?" = 0
expect "grad_sum = shm on one host: the window, no fall-back" test "$(grep -c "not all on one node" "$s.out")" = 0
expect "grad_sum = shm: the fall-back over two hosts gives exactly the one-host run's eval lines" \
  test -n "$(evals "$d")" -a "$(evals "$d")" = "$(evals "$s")"

# --- negative: the agent refuses hosts that are not in its map (it never reaches anything else) ---
printf '%s slots=1\n10.77.0.99 slots=1\n' "$addrA" >"$tmp/hostfile.unknown"
start=$SECONDS
timeout 60 ip netns exec "$A" mpirun --mca plm_rsh_agent "$netns/agent" --mca btl tcp,self \
  --mca btl_tcp_if_include "$net" --mca oob_tcp_if_include "$net" --hostfile "$tmp/hostfile.unknown" \
  --map-by node -np 2 true >"$tmp/unknown.out" 2>&1
rc=$?
expect "a host missing from the agent's map fails fast (exit $rc in $((SECONDS - start)) s)" \
  test "$rc" != 0 -a "$rc" != 124
expect "the agent says why it refused" grep -q "agent: host '10.77.0.99' is not in" "$tmp/unknown.out"

# --- negative: a btl_tcp_if_include naming no interface fails, and does not hang ---
start=$SECONDS
btl_if=kdpnosuch0 limit=60 mpirun_mn 2 node "$exe" "${job[@]}" -s run.dir="$tmp/bad" >"$tmp/bad.out" 2>&1
rc=$?
expect "btl_tcp_if_include=kdpnosuch0 fails within the timeout (exit $rc after $((SECONDS - start)) s; 124 = hung)" \
  test "$rc" != 0 -a "$rc" != 124
# Open MPI 4.1.4 sometimes crashes in this error path (SIGSEGV in 1 s, seen once in ~10 runs) before
# it prints its message. The job still failed fast (checked above); for the message, one retry.
if ! grep -q "unable to reach each other" "$tmp/bad.out" && [ "$rc" = 139 ]; then
  echo "    note: Open MPI crashed (exit 139) before its message; retrying once"
  btl_if=kdpnosuch0 limit=60 mpirun_mn 2 node "$exe" "${job[@]}" -s run.dir="$tmp/bad2" >"$tmp/bad.out" 2>&1
  rc=$?
fi
expect "btl_tcp_if_include=kdpnosuch0: Open MPI says the ranks cannot reach each other" \
  grep -q "unable to reach each other" "$tmp/bad.out"
if [ "$rc" = 0 ] || [ "$rc" = 124 ]; then tail -n 20 "$tmp/bad.out" | sed 's/^/    /'; fi
# A subnet that matches no interface is NOT fatal in Open MPI 4.1: it warns, ignores the value and
# uses every interface (here only kdp0 exists). Only the warning is checked; docs/multinode.md says
# to look for it.
btl_if=10.77.99.0/24 limit=60 mpirun_mn 2 node "$exe" "${job[@]}" -s run.dir="$tmp/typo" >"$tmp/typo.out" 2>&1
expect "btl_tcp_if_include=10.77.99.0/24 (no such subnet): Open MPI warns that no interface matches" \
  grep -q "Did not find interface matching this subnet" "$tmp/typo.out"

finish multinode
