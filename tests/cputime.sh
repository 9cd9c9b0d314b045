#!/usr/bin/env bash
# tests/cputime.sh CMD...: runs CMD and, when KDP_CPU_LOG names a file, appends to it one JSON line
# {"dir": DIR, "command": [CMD...], "cpu": S}, DIR the working directory (meson runs a test in
# its build directory), S the user + system seconds of CMD's whole process tree (every
# descendant that was waited for: mpirun's ranks, a script's subprocesses). launch/test gives it
# to meson test as --wrapper, so the slowest-tests list shows each test's CPU seconds beside its
# wall time: on a shared machine the wall time is mostly the load's, the CPU seconds much less so
# (docs/testing.md, Time budget). CMD's exit status is kept.
"$@"
rc=$?
if [ -n "${KDP_CPU_LOG:-}" ]; then
  # `times`: the shell's own user and system time, then its children's (XmY.YYYs each); run by
  # this shell itself (in a pipe or $(...) a subshell would report its own, empty, children)
  t="$KDP_CPU_LOG.times.$$"
  times >"$t"
  cpu=$(tail -n 1 "$t" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); s += p[1] * 60 + p[2] } printf "%.1f", s }')
  rm -f "$t"
  # (the command's words through stdin: jq would take words such as --oversubscribe for options)
  printf '%s\n' "$@" | jq -Rsc --argjson cpu "$cpu" '{dir: $dir, command: (rtrimstr("\n") | split("\n")), cpu: $cpu}' \
    --arg dir "$PWD" >>"$KDP_CPU_LOG"
fi
exit "$rc"
