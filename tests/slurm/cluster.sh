#!/usr/bin/env bash
# tests/slurm/cluster.sh: a throw-away one-node Slurm cluster (slurm-wlm + munge, as root) that lives
# entirely in one directory: its own munge key and socket, slurm.conf (from slurm.conf.in beside
# this file), state, spool, logs and free ports. Used by tests/test_slurm.sh; also handy by hand:
#
#   tests/slurm/cluster.sh up /tmp/sl     # prints the SLURM_CONF to export
#   SLURM_CONF=/tmp/sl/slurm.conf sbatch --ntasks=2 launch/kdpeers.sbatch ...
#   tests/slurm/cluster.sh down /tmp/sl   # cancels the jobs, stops the daemons (DIR is kept)
#
# Sourced, it defines slurm_up DIR and slurm_down DIR; slurm_up returns nonzero and leaves the
# reason in $slurm_why when the cluster cannot be started.
# KDP_SLURM_CRED_EXPIRE (default 10): seconds a requeued job waits before it may start again.
# slurm_cpus (a shell variable of the sourcing script; default: the machine's cores, at least 2):
# the CPUs the node claims.

slurm_why=""
slurm_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# a TCP port nobody listens on (and not $1)
slurm_free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 30000))
    [ "$p" = "${1:-}" ] && continue
    if command -v ss >/dev/null; then
      ss -Htan "( sport = :$p )" 2>/dev/null | grep -q . && continue
    fi
    echo "$p"
    return 0
  done
  return 1
}

# wait up to $1 seconds for the command in "$@" (after $1) to succeed
slurm_poll() {
  local t="$1"
  shift
  local end=$((SECONDS + t))
  while [ "$SECONDS" -lt "$end" ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

slurm_munge_works() { munge -S "$1" -n 2>/dev/null | unmunge -S "$1" >/dev/null 2>&1; }

slurm_up() {
  local d="$1" p1 p2 node cpus sock
  for b in munged mungekey munge slurmctld slurmd sbatch srun scontrol; do
    if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then
      slurm_why="$b is not installed (Debian: apt-get install slurm-wlm munge)"
      return 1
    fi
  done
  export PATH="$PATH:/usr/sbin"
  mkdir -p "$d"/{munge,state,spool,run,log,work,tmp} || { slurm_why="cannot create $d"; return 1; }
  # munged wants a socket directory everybody may enter, and a private key
  chmod 755 "$d" "$d/munge"
  sock="$d/munge/munge.socket"
  if mungekey --create --keyfile="$d/munge/munge.key" >/dev/null 2>&1 &&
    munged --socket="$sock" --key-file="$d/munge/munge.key" --pid-file="$d/munge/munged.pid" \
      --log-file="$d/munge/munged.log" --seed-file="$d/munge/munged.seed" >/dev/null 2>"$d/munge/start.err" &&
    slurm_poll 10 slurm_munge_works "$sock"; then
    cat "$d/munge/munged.pid" >"$d/run/munged.bgpid"
  else
    # fall back to a munged the machine already runs (default socket)
    sock=/run/munge/munge.socket.2
    if ! slurm_munge_works "$sock"; then
      slurm_why="cannot start munged: $(cat "$d/munge/start.err" 2>/dev/null) $(tail -n 3 "$d/munge/munged.log" 2>/dev/null)"
      return 1
    fi
  fi
  if ! p1=$(slurm_free_port) || ! p2=$(slurm_free_port "$p1"); then
    slurm_why="no free TCP port"
    return 1
  fi
  node=$(hostname -s)
  cpus="${slurm_cpus:-$(nproc)}"
  [ "$cpus" -ge 2 ] || cpus=2 # SlurmdParameters=config_overrides lets the node claim more
  mkdir -p "$d/spool/$node"
  : >"$d/plugstack.conf"
  sed -e "s|@DIR@|$d|g; s|@CTLD_PORT@|$p1|; s|@SLURMD_PORT@|$p2|; s|@MUNGE_SOCKET@|$sock|" \
    -e "s|@NODE@|$node|g; s|@CPUS@|$cpus|; s|@CRED_EXPIRE@|${KDP_SLURM_CRED_EXPIRE:-10}|" \
    "$slurm_here/slurm.conf.in" >"$d/slurm.conf"
  export SLURM_CONF="$d/slurm.conf"
  slurmctld -D >"$d/log/slurmctld.out" 2>&1 &
  echo $! >"$d/run/slurmctld.bgpid"
  if ! slurm_poll 20 scontrol ping; then
    slurm_why="slurmctld did not come up: $(tail -n 5 "$d/log/slurmctld.out")"
    return 1
  fi
  slurmd -D -N "$node" >"$d/log/slurmd.out" 2>&1 &
  echo $! >"$d/run/slurmd.bgpid"
  if ! slurm_poll 30 bash -c 'sinfo -h -o %T | grep -qx idle'; then
    slurm_why="slurmd did not register: $(tail -n 5 "$d/log/slurmd.out"); sinfo: $(sinfo -h -o '%T %E' 2>&1)"
    return 1
  fi
  return 0
}

# processes started by this cluster: they carry its SLURM_CONF in their environment
slurm_strays() {
  local conf="$1/slurm.conf" e p
  for e in /proc/[0-9]*/environ; do
    p=${e#/proc/}
    p=${p%/environ}
    [ "$p" = "$$" ] && continue
    [ "$p" = "${BASHPID:-}" ] && continue
    tr '\0' '\n' 2>/dev/null <"$e" | grep -qx "SLURM_CONF=$conf" && echo "$p"
  done
}

slurm_down() {
  local d="$1" f p
  export SLURM_CONF="$d/slurm.conf"
  if [ -f "$d/run/slurmctld.bgpid" ] && scontrol ping >/dev/null 2>&1; then
    for j in $(squeue -h -o %i 2>/dev/null); do scancel "$j" 2>/dev/null; done
    # shellcheck disable=SC2016
    slurm_poll 15 bash -c '[ -z "$(squeue -h -t R,CG -o %i)" ]'
  fi
  for f in slurmd slurmctld munged; do
    [ -f "$d/run/$f.bgpid" ] || continue
    p=$(cat "$d/run/$f.bgpid")
    kill "$p" 2>/dev/null
    for _ in $(seq 1 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null
    rm -f "$d/run/$f.bgpid"
  done
  # job steps whose daemons are gone
  for p in $(slurm_strays "$d"); do kill -9 "$p" 2>/dev/null; done
  return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    up)
      [ -n "${2:-}" ] || { echo "usage: $0 up|down DIR" >&2; exit 2; }
      mkdir -p "$2"
      d="$(cd "$2" && pwd)"
      if slurm_up "$d"; then
        echo "export SLURM_CONF=$d/slurm.conf"
      else
        echo "cluster.sh: $slurm_why" >&2
        slurm_down "$d"
        exit 1
      fi
      ;;
    down)
      [ -d "${2:-}" ] || { echo "usage: $0 up|down DIR" >&2; exit 2; }
      slurm_down "$(cd "$2" && pwd)"
      ;;
    *)
      echo "usage: $0 up|down DIR" >&2
      exit 2
      ;;
  esac
fi
