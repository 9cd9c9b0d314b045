#!/usr/bin/env bash
# The live server on rank 0, driven with curl against real training runs under mpirun: every
# endpoint and control action, predictions equal an offline evaluation of the same weights,
# promtool accepts /metrics, malformed requests get the right codes, the token is enforced.
# Usage: tests/test_live.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "test_live: $tool is missing (launch/setup installs it)"; exit 77; }
done
# A started run must outlast every check made against it (each is ended by a stop command):
# 200 epochs of this model took about 10 s on a quiet machine, shorter than the checks before the
# first pause, so the run had ended when the test paused it; 5,000 epochs train for minutes.
start() { # start DIR ARGS...: a long run in the background; sets $addr
  local dir="$1"; shift
  serve_bg "$dir" timeout "$run_limit" mpirun -np 2 --oversubscribe --bind-to none "$exe" \
    -s run.progress=plain -s run.dir="$dir" -s run.epochs=5000 -s data.subset=4096 \
    -s data.test_subset=500 -s "model.arch=mlp(64)" -s run.log_every=10 "$@"
}
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
status_field() { curl -s "$addr/status" | jq -r "$1"; }
metric() { curl -s "$addr/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }
# conditions for wait_until (tests/lib.sh): is FIELD VALUE (/status's FIELD is VALUE), past FIELD N
# (/status's FIELD is a number above N), metric_past NAME N (/metrics' NAME is above N)
is() { [ "$(status_field "$1")" = "$2" ]; }
past() { [ "$(status_field "$1")" -gt "$2" ] 2>/dev/null; }
metric_past() { awk -v a="$(metric "$1")" -v b="$2" 'BEGIN { exit !(a != "" && a + 0 > b + 0) }'; }
# the client of issue 10: two pipelined GET /healthz, then close before reading (N times); the
# server's replies go to a closed socket (EPIPE, and SIGPIPE unless it is blocked or ignored)
pipelined_close() {
  ( trap '' PIPE # this shell's own writes to a dead server must not end the test
    for _ in $(seq 1 "$1"); do
      exec {fd}<>"/dev/tcp/127.0.0.1/${addr##*:}" || exit 1
      printf 'GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n' >&"$fd"
      exec {fd}>&-
    done ) 2>/dev/null
}
# pid of the process listening on $addr (rank 0)
listener_pid() { ss -Hltnp "sport = :${addr##*:}" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2; }
# images of the test set as a /predict JSON body: json_images N FILE
json_images() {
  gzip -dc /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz | tail -c +17 | head -c $(($1 * 784)) |
    od -An -tu1 -v | tr -s ' \n' ' ' |
    awk -v n="$1" '{ printf "{\"inputs\":["; for (i = 0; i < n; i++) { printf "%s[", (i ? "," : ""); for (j = 1; j <= 784; j++) printf "%s%s", (j > 1 ? "," : ""), $(i * 784 + j); printf "]" } printf "]}" }' >"$2"
}

# ---------- a dml run: endpoints, control, predictions ----------
r="$tmp/run"
start "$r" -s kd.method=one
expect "the server address is written to run.dir/server.addr" test -n "$addr"
expect "GET /healthz is 200" test "$(code "$addr/healthz")" = 200
wait_until past .progress.step 20
expect "GET /status reports progress" test "$(status_field .progress.step)" -gt 0
expect "GET /status reports the config" test "$(status_field .config.method)" = one
expect "GET /status has both peers' losses" test "$(curl -s "$addr/status" | jq '.peers | length')" = 2
curl -s "$addr/metrics" >"$tmp/metrics.txt"
expect "GET /metrics has per-peer losses" grep -q '^kdpeers_loss_ce{peer="1"}' "$tmp/metrics.txt"
expect "GET /metrics has the step-time histogram" grep -q '^kdpeers_step_duration_seconds_bucket{le="+Inf"}' "$tmp/metrics.txt"
expect "GET /metrics has loop health" grep -q '^kdpeers_server_loop_lag_seconds' "$tmp/metrics.txt"
if command -v promtool >/dev/null; then
  promtool check metrics <"$tmp/metrics.txt" >"$tmp/promtool.out" 2>&1
  expect "promtool check metrics accepts /metrics" test $? = 0
else
  bad "promtool is missing (launch/setup installs Debian's prometheus package)"
fi
# Prometheus conventions: counters for what accumulates, _ratio accuracies, info metrics
for m in kdpeers_steps_total kdpeers_samples_total; do
  expect "GET /metrics: $m is a counter" grep -q "^# TYPE $m counter\$" "$tmp/metrics.txt"
done
for m in kdpeers_learning_rate kdpeers_train_accuracy_ratio kdpeers_test_accuracy_ratio kdpeers_last_checkpoint_timestamp_seconds; do
  expect "GET /metrics: $m is a gauge" grep -q "^# TYPE $m gauge\$" "$tmp/metrics.txt"
done
expect "GET /metrics: the old accuracy names stay for one release, marked deprecated" \
  grep -q '^# HELP kdpeers_test_accuracy Deprecated (removed after 0.2): kdpeers_test_accuracy_ratio' "$tmp/metrics.txt"
read -r version git_hash < <("$exe" --version | sed -n '1s/^kdpeers \([^ ]*\) (git \(.*\))$/\1 \2/p')
expect "kdpeers_build_info names the version and git commit of kdpeers --version ($version, $git_hash)" \
  grep -qF "kdpeers_build_info{version=\"$version\",git_hash=\"$git_hash\",mpi=\"Open MPI" "$tmp/metrics.txt"
expect "kdpeers_run_info names run.dir, method and architectures" \
  grep -qF "kdpeers_run_info{run_dir=\"$r\",method=\"one\",arch=\"mlp(64)\",peer_archs=\"mlp(64) mlp(64)\",peers=\"2\",ranks=\"2\"" "$tmp/metrics.txt"
s1=$(metric kdpeers_steps_total); wait_until metric_past kdpeers_steps_total "$s1"; s2=$(metric kdpeers_steps_total)
expect "kdpeers_steps_total grows while training ($s1 -> $s2)" test "$s2" -gt "$s1"
# run.dir/prometheus.json: a file_sd target next to server.addr
sd="$r/prometheus.json"
expect "run.dir/prometheus.json names this server as a Prometheus target" \
  test "$(jq -r '.[0].targets[0]' "$sd" 2>/dev/null)" = "${addr#http://}"
expect "  ...with the run's labels" \
  test "$(jq -r '.[0].labels | [.run_dir, .method] | @tsv' "$sd")" = "$(printf '%s\tone' "$r")"
# the dashboard: the page, and its data
expect "GET / is the dashboard page" bash -c "curl -s '$addr/' | grep -q '<script src=\"/assets/dashboard.js\"'"
curl -s "$addr/history" >"$tmp/h0.json"
expect "GET /history declares the page's charts in order" \
  test "$(jq -c '[.charts[].id]' "$tmp/h0.json")" = '["test_accuracy","train_loss","kd_loss","test_loss","train_accuracy","learning_rate","throughput","time_split","diversity"]'
expect "  ...and holds both peers' training losses" \
  test "$(jq '[.series[] | select(.chart == "train_loss") | .name] | sort == ["peer0","peer1"]' "$tmp/h0.json")" = true
expect "  ...the learning rate, steps/s and the time split" \
  test "$(jq -c '[.series[] | select(.chart == "learning_rate" or .chart == "throughput" or .chart == "time_split") | .name] | sort' "$tmp/h0.json")" = '["allreduce","compute","exchange","lr","steps/s","wait"]'
expect "  ...each step's shares of the time split summing to 1" \
  jq -e '[.series[] | select(.chart == "time_split") | .y] | transpose | all(add > 0.999 and add < 1.001)' "$tmp/h0.json" >/dev/null
seq0=$(jq .seq "$tmp/h0.json")
newer() { curl -s "$addr/history?since=$seq0" >"$tmp/h1.json" && jq -e '[.series[] | select(.chart == "train_loss" and .name == "peer0")] | length > 0' "$tmp/h1.json" >/dev/null; }
wait_until newer
expect "GET /history?since=SEQ answers only newer points" \
  jq -e --argjson s "$seq0" '.seq > $s and (.series | length > 0)' "$tmp/h1.json" >/dev/null
expect "  ...none already sent (every x is past the last reply's)" \
  jq -e --slurpfile a "$tmp/h0.json" '[.series[] | select(.chart == "train_loss" and .name == "peer0") | .x[0]][0] > ([$a[0].series[] | select(.chart == "train_loss" and .name == "peer0") | .x[-1]][0])' "$tmp/h1.json" >/dev/null
curl -s -I "$addr/metrics" | tr -d '\r' >"$tmp/head.txt"
expect "HEAD /metrics is 200 like GET (not 405)" grep -q '^HTTP/1.1 200 ' "$tmp/head.txt"
expect "  ...with GET's headers (Content-Length of the text)" grep -qiE '^content-length: [0-9]{4,}$' "$tmp/head.txt"

# ---------- hostile clients while training: the run goes on ----------
pipelined_close 100
sleep 0.5
expect "100 clients closing before reading two pipelined replies: rank 0 lives" kill -0 "$last_pid"
expect "  ...and /healthz is 200" test "$(code "$addr/healthz")" = 200
out=$(curl -s -X POST "$addr/control" -d '{"lr_scale":1e308}' -w ' %{http_code}')
expect "/control lr_scale 1e308 is refused with 400" test "${out##* }" = 400
expect "  ...naming the range" grep -q 'out of range: expected a value in (0, 200\] (optim.lr x lr_scale must stay within optim.lr' <<<"$out"
expect "  ...and the run is not told to change" test "$(status_field .progress.lr_scale)" = 1
# 64 slow clients fill the pool (server.max_connections = 64) with requests they never finish
slow=()
for _ in $(seq 1 64); do
  exec {fd}<>"/dev/tcp/127.0.0.1/${addr##*:}" && printf 'GET /heal' >&"$fd" && slow+=("$fd")
done
codes=""
for _ in $(seq 1 5); do codes+="$(code "$addr/healthz") $(code "$addr/metrics") "; done
expect "64 slowloris connections: /healthz and /metrics stay 200 (got: $codes)" test -z "$(tr ' ' '\n' <<<"$codes" | grep -v '^200$' | grep .)"
for fd in "${slow[@]}"; do exec {fd}>&-; done
expect "  ...a slow one was evicted to make room" test "$(metric kdpeers_server_connections_evicted_total)" -ge 1
# 60 clients each sending a 15.9 MiB body at once: buffered bodies stay within max_body_total
p0=$(listener_pid)
rss0=$(awk '/^VmRSS/ { print $2 }' "/proc/$p0/status")
size=16672358
head -c "$size" /dev/zero >"$tmp/zeros"
flood=()
for _ in $(seq 1 60); do
  { printf 'POST /predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n' "$size"; cat "$tmp/zeros"; } \
    2>/dev/null >"/dev/tcp/127.0.0.1/${addr##*:}" &
  flood+=($!)
done
wait "${flood[@]}" 2>/dev/null
hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$p0/status")
rm -f "$tmp/zeros"
if [ -z "${KDP_SANITIZER_RUN:-}" ]; then
  expect "60 x 15.9 MiB bodies: rank 0 grew by $(((hwm - rss0) / 1024)) MiB at most (< 200 MiB; max_body_total 64 MiB)" test $((hwm - rss0)) -lt 204800
else # the sanitizers' allocators keep freed memory in quarantine: RSS says nothing here
  ok "60 x 15.9 MiB bodies: rank 0 grew by $(((hwm - rss0) / 1024)) MiB (not checked under $KDP_SANITIZER_RUN)"
fi
expect "  ...the bodies over the cap were refused" test "$(metric kdpeers_server_bodies_refused_total)" -gt 0
expect "  ...and the run goes on" test "$(code "$addr/healthz")" = 200
# 4 clients posting 256 images each, one request after another: predictions take at most
# server.predict_share (default 0.25) of the training loop's time. Over a window of W seconds the
# budget allows share x W, plus what it saved up (share x 1 s), plus the request that starts with
# budget left and runs into debt; /metrics is published every 0.5 s, which blurs each end of
# the window by up to 0.5 s of predicting at the budget's rate:
#   bound = (share x (W + 1 + 2 x 0.5) + mean request time) / W
json_images 256 "$tmp/p256.json"
loaders=()
for _ in 1 2 3 4; do
  curl -s -o /dev/null -X POST -H 'Expect:' --data @"$tmp/p256.json" "$addr/predict?seq=[1-100000]" &
  loaders+=($!)
done
sleep 1.5
ps1=$(metric kdpeers_predict_seconds_total) n1=$(metric kdpeers_predictions_total) w1=$(date +%s.%N)
sleep 4
ps2=$(metric kdpeers_predict_seconds_total) n2=$(metric kdpeers_predictions_total) w2=$(date +%s.%N)
kill "${loaders[@]}" 2>/dev/null
wait "${loaders[@]}" 2>/dev/null
read -r share bound < <(awk -v a="$ps1" -v b="$ps2" -v s="$w1" -v e="$w2" -v n1="$n1" -v n2="$n2" \
  'BEGIN { w = e - s; m = n2 > n1 ? (b - a) / (n2 - n1) : 0; printf "%.3f %.3f", (b - a) / w, (0.25 * (w + 2) + m) / w }')
expect "4 clients x 256 images: predictions took $share of the wall time (bound $bound for predict_share 0.25)" \
  awk -v x="$share" -v b="$bound" 'BEGIN { exit !(x <= b) }'
expect "  ...and were answered ($((n2 - n1)) in 4 s)" test $((n2 - n1)) -gt 0
deferred=$(metric kdpeers_predict_deferred_total)
expect "  ...the budget deferred some ($deferred), or the load never reached it" \
  awk -v d="$deferred" -v x="$share" 'BEGIN { exit !(d > 0 || x < 0.2) }'

# pause, then predictions are served by the paused peers
expect "POST /control pause is accepted (202)" test "$(code -X POST "$addr/control" -d '{"action":"pause"}')" = 202
wait_until is .progress.paused true
expect "/status says paused" test "$(status_field .progress.paused)" = true
s1=$(status_field .progress.step); sleep 0.5; s2=$(status_field .progress.step)
expect "no steps while paused ($s1 = $s2)" test "$s1" = "$s2"
curl -s "$addr/metrics" >"$tmp/paused.txt"
pm() { awk -v k="$1" '$1 == k { print $2 }' "$tmp/paused.txt"; }
expect "kdpeers_samples_total = kdpeers_steps_total x batch 128 ($(pm kdpeers_samples_total))" \
  test "$(pm kdpeers_samples_total)" = $(($(pm kdpeers_steps_total) * 128))
lr_log=$(jq -r 'select(.event == "train") | .lr' "$r/metrics.jsonl" | tail -1)
expect "kdpeers_learning_rate ($(pm kdpeers_learning_rate)) is the last logged step's lr ($lr_log)" \
  awk -v a="$(pm kdpeers_learning_rate)" -v b="$lr_log" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b > 0 && d <= 1e-5 * b) }'
acc_log=$(jq -r 'select(.event == "eval" and .model == "peer0") | .acc' "$r/metrics.jsonl" | tail -1)
expect "kdpeers_test_accuracy_ratio of peer0 is the last evaluation's ($acc_log)" \
  awk -v a="$(pm 'kdpeers_test_accuracy_ratio{model="peer0"}')" -v b="$acc_log" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-6) }'
expect "  ...and the deprecated kdpeers_test_accuracy says the same" \
  test "$(pm 'kdpeers_test_accuracy{model="peer0"}')" = "$(pm 'kdpeers_test_accuracy_ratio{model="peer0"}')"
expect "kdpeers_last_checkpoint_timestamp_seconds is 0 before any checkpoint" test "$(pm kdpeers_last_checkpoint_timestamp_seconds)" = 0.000
t_before=$(date +%s.%N)
n=4
{ printf '\x00\x00\x08\x03\x00\x00\x00\x04\x00\x00\x00\x1c\x00\x00\x00\x1c'
  gzip -dc /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz | tail -c +17 | head -c $((n * 784)); } >"$tmp/imgs.idx"
tail -c +17 "$tmp/imgs.idx" | od -An -tu1 -v | tr -s ' \n' ' ' |
  awk -v n="$n" '{ printf "{\"inputs\":["; for (i = 0; i < n; i++) { printf "%s[", (i ? "," : ""); for (j = 1; j <= 784; j++) printf "%s%s", (j > 1 ? "," : ""), $(i * 784 + j); printf "]" } printf "]}" }' >"$tmp/pred.json"
curl -s -X POST "$addr/predict" -H 'Content-Type: application/json' --data @"$tmp/pred.json" >"$tmp/pred.out"
expect "POST /predict answers every peer, the ensemble and the gate" \
  test "$(jq -r '[(.peers | length), (.ensemble | length), .teacher.name] | @tsv' "$tmp/pred.out")" = "$(printf '2\t4\tgate')"
# a value that is not a whole number: the pixels go to the other ranks as floats, not bytes
sed 's/^{"inputs":\[\[\([0-9]*\),/{"inputs":[[\1.5,/' "$tmp/pred.json" >"$tmp/predf.json"
curl -s -X POST "$addr/predict" -H 'Content-Type: application/json' --data @"$tmp/predf.json" >"$tmp/predf.out"
expect "predict: fractional pixel values are answered (and nearly like the whole ones)" \
  jq -e --slurpfile a "$tmp/pred.out" '[.peers[0][0], $a[0].peers[0][0]] | transpose | all((.[0] - .[1]) | fabs < 0.01)' "$tmp/predf.out"
expect "predict: a bad input shape is 400" test "$(code -X POST "$addr/predict" -d '{"inputs":[[1,2,3]]}')" = 400
expect "POST /control checkpoint while paused is accepted" test "$(code -X POST "$addr/control" -d '{"action":"checkpoint"}')" = 202
wait_until is .checkpoint.last_step "$s1"
expect "the checkpoint is written at the paused step" test "$(status_field .checkpoint.last_step)" = "$s1"
wait_until metric_past kdpeers_last_checkpoint_timestamp_seconds 0 # the next publish
ts=$(metric kdpeers_last_checkpoint_timestamp_seconds)
expect "kdpeers_last_checkpoint_timestamp_seconds is the checkpoint's Unix time ($ts, asked at $t_before)" \
  awk -v t="$ts" -v a="$t_before" -v b="$(date +%s.%N)" 'BEGIN { exit !(t >= a - 0.01 && t <= b) }'
expect "/history lists the checkpoint and the pause as events" \
  test "$(curl -s "$addr/history" | jq -c '[.events[].kind] | map(select(. == "checkpoint" or . == "control")) | unique')" = '["checkpoint","control"]'
# offline: export the checkpointed peers and predict the same images
for p in 0 1; do
  "$exe" export "$r" --peer "$p" -o "$tmp/p$p.kdpm" >/dev/null
  "$exe" predict "$tmp/p$p.kdpm" "$tmp/imgs.idx" --json | jq -r '.probs | map(tostring) | join(" ")' >"$tmp/off$p.txt"
  jq -r ".peers[$p][] | map(tostring) | join(\" \")" "$tmp/pred.out" >"$tmp/live$p.txt"
  maxd=$(paste -d' ' "$tmp/off$p.txt" "$tmp/live$p.txt" |
    awk '{ h = NF / 2; for (i = 1; i <= h; i++) { d = $i - $(i + h); if (d < 0) d = -d; if (d > m) m = d } } END { printf "%g", m + 0 }')
  expect "peer $p: live predictions equal the offline evaluation of its checkpoint (max diff $maxd)" \
    awk -v m="$maxd" 'BEGIN { exit !(m < 2e-5) }'
done
expect "POST /control resume with lr_scale, temperature and kd_weight" \
  test "$(code -X POST "$addr/control" -d '{"action":"resume","lr_scale":0.5,"temperature":2,"kd_weight":0.25}')" = 202
wait_until is .progress.paused false
expect "/status shows the new values" test "$(status_field '[.progress.lr_scale, .progress.temperature, .progress.kd_weight] | @tsv')" = "$(printf '0.5\t2\t0.25')"
wait_until past .progress.step "$s1"
expect "training goes on after resume" test "$(status_field .progress.step)" -gt "$s1"
# malformed requests
expect "unknown path is 404" test "$(code "$addr/nope")" = 404
expect "GET /control is 405" test "$(code "$addr/control")" = 405
expect "malformed JSON is 400" test "$(code -X POST "$addr/control" -d '{"action":')" = 400
expect "an unknown action is 400" test "$(code -X POST "$addr/control" -d '{"action":"explode"}')" = 400
expect "a negative lr_scale is 400" test "$(code -X POST "$addr/control" -d '{"lr_scale":-1}')" = 400
head -c 20000000 /dev/zero >"$tmp/big"
expect "an oversized body is 413" test "$(code -X POST "$addr/predict" --data-binary @"$tmp/big")" = 413
expect "POST /control stop" test "$(code -X POST "$addr/control" -d '{"action":"stop"}')" = 202
wait "$last_pid"
rc=$?
expect "stop checkpoints and exits 75 (got $rc)" test "$rc" = 75
expect "run.dir/prometheus.json is removed when the server stops (with server.addr)" \
  test ! -e "$r/prometheus.json" -a ! -e "$r/server.addr"
for a in pause checkpoint resume stop; do
  expect "metrics.jsonl logs the $a command" grep -q "\"event\":\"control\".*\"action\":\"$a\"" "$r/metrics.jsonl"
done
expect "metrics.jsonl logs the new lr_scale" grep -q '"action":"resume","lr_scale":0.5,"temperature":2,"kd_weight":0.25' "$r/metrics.jsonl"

# ---------- kdpeers serve: the saved run answers, alone and under mpirun ----------
for p in 0 1; do
  "$exe" export "$r" --peer "$p" -o "$tmp/s$p.kdpm" >/dev/null
  "$exe" predict "$tmp/s$p.kdpm" "$tmp/imgs.idx" --json | jq -r '.probs | map(tostring) | join(" ")' >"$tmp/soff$p.txt"
done
rm -f "$r/server.addr"
before=$(md5sum <"$r/metrics.jsonl")
serve_bg "$r" "$exe" serve "$r"
spid=$last_pid
curl -s -X POST "$addr/predict" --data @"$tmp/pred.json" >"$tmp/serve1.json"
pipelined_close 100
sleep 0.3
expect "serve (alone): 100 clients closing before reading two pipelined replies, it lives" kill -0 "$spid"
for p in 0 1; do
  jq -r ".peers[$p][] | map(tostring) | join(\" \")" "$tmp/serve1.json" >"$tmp/slive$p.txt"
  maxd=$(paste -d' ' "$tmp/soff$p.txt" "$tmp/slive$p.txt" |
    awk '{ h = NF / 2; for (i = 1; i <= h; i++) { d = $i - $(i + h); if (d < 0) d = -d; if (d > m) m = d } } END { printf "%g", m + 0 }')
  expect "serve (alone): peer $p answers like its exported model (max diff $maxd)" awk -v m="$maxd" 'BEGIN { exit !(m < 2e-5) }'
done
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
wait "$spid"
expect "serve (alone) stops on the stop command (exit $?)" test $? = 0
rm -f "$r/server.addr"
serve_bg "$r" timeout "$run_limit" mpirun -np 2 --oversubscribe --bind-to none "$exe" serve "$r" -s run.progress=plain
spid=$last_pid
curl -s -X POST "$addr/predict" --data @"$tmp/pred.json" >"$tmp/serve2.json"
pipelined_close 50
sleep 0.3
expect "serve (mpirun -np 2): clients closing before reading, it lives" kill -0 "$spid"
expect "serve (mpirun -np 2): answers with the gate teacher" test "$(jq -r .teacher.name "$tmp/serve2.json")" = gate
expect "serve (mpirun -np 2): peers agree with the alone server" \
  test "$(jq -c .peers "$tmp/serve2.json")" = "$(jq -c .peers "$tmp/serve1.json")"
curl -s "$addr/history" >"$tmp/serve-h.json"
n_eval=$(jq -r 'select(.event == "eval" and .model == "peer0") | .step' "$r/metrics.jsonl" | wc -l)
n_hist=$(jq '[.series[] | select(.chart == "test_accuracy" and .name == "peer0") | .x[]] | length' "$tmp/serve-h.json")
expect "serve (mpirun): /history starts with the run's evaluations from metrics.jsonl ($n_hist of $n_eval of peer0)" \
  test "$n_hist" = "$n_eval"
# the last evaluation is /metrics' and /status' from the first scrape, not only after the next one
last_eval() { jq -r "select(.event == \"eval\" and .model == \"$1\") | .acc" "$r/metrics.jsonl" | tail -n 1; }
last_dis=$(jq -r 'select(.event == "diversity") | .disagreement' "$r/metrics.jsonl" | tail -n 1)
curl -s "$addr/metrics" >"$tmp/serve-m.txt"
curl -s "$addr/status" >"$tmp/serve-s.json"
close() { awk -v a="$1" -v b="$2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && b != "" && d < 1e-6) }'; }
for m in peer0 peer1 ensemble; do
  expect "serve (mpirun): /metrics' test accuracy of $m is the run's last evaluation ($(last_eval $m))" \
    close "$(awk -v k="kdpeers_test_accuracy_ratio{model=\"$m\"}" '$1 == k { print $2 }' "$tmp/serve-m.txt")" "$(last_eval $m)"
  expect "  ...and /status' ($m)" close "$(jq -r ".eval.$m.acc" "$tmp/serve-s.json")" "$(last_eval $m)"
done
expect "  ...and the last diversity ($last_dis)" \
  close "$(awk '$1 == "kdpeers_diversity_disagreement" { print $2 }' "$tmp/serve-m.txt")" "$last_dis"
kinds=$(jq -c '[.events[].kind] | unique' "$tmp/serve-h.json")
expect "  ...and its events: the commands, the checkpoints, the stop, the serve ($kinds)" \
  test "$kinds" = '["checkpoint","control","serve","stop"]'
curl -s -X POST "$addr/control" -d '{"action":"stop"}' >/dev/null
wait "$spid"
expect "serve (mpirun) stops on the stop command (exit $?)" test $? = 0
expect "serving did not touch the run's metrics.jsonl" test "$(md5sum <"$r/metrics.jsonl")" = "$before"
expect "serving logged its commands to serve.jsonl" grep -q '"action":"stop"' "$r/serve.jsonl"
"$exe" serve "$tmp/nothing-here" >"$tmp/serve3.out" 2>&1
expect "serve of a directory without checkpoints fails clearly" grep -q "no complete checkpoint" "$tmp/serve3.out"

# ---------- predictions while training: answered mid-step, training unchanged ----------
# Predictions are answered at the step's agreement point, between its forward and backward
# passes, by an inference copy of each peer: the run must train exactly as without them. Under the
# sanitizers (no reference run) 500 steps answer hundreds of predictions, enough to race.
steps=1500
[ -z "${KDP_SANITIZER_RUN:-}" ] || steps=500
sanitizer_skip "the reference run without predictions" ||
  { start "$tmp/quiet" -s kd.method=one -s run.max_steps=$steps -s run.eval_every=1; wait "$last_pid"; }
start "$tmp/busy" -s kd.method=one -s run.max_steps=$steps -s run.eval_every=1
curl -s -X POST "$addr/predict" --data @"$tmp/pred.json" >"$tmp/busy.json"
expect "a prediction while training answers every peer, the ensemble and the gate" \
  test "$(jq -r '[(.peers | length), (.ensemble | length), .teacher.name, (.teacher.probs | length)] | @tsv' "$tmp/busy.json")" = "$(printf '2\t4\tgate\t4')"
expect "...with probabilities that sum to 1" \
  jq -e '[.peers[][], .ensemble[], .teacher.probs[]] | all(add > 0.9999 and add < 1.0001)' "$tmp/busy.json"
# then requests one after another on one connection until the run ends (--fail-early)
curl -s --fail-early -o /dev/null -w '%{http_code}\n' -X POST -H 'Expect:' --data @"$tmp/pred.json" \
  "$addr/predict?seq=[1-100000]" >"$tmp/busy.codes" 2>/dev/null
wait "$last_pid"
rc=$?
expect "the run answering predictions finishes (exit $rc)" test "$rc" = 0
answered=$(grep -c '^200$' "$tmp/busy.codes")
expect "predictions were answered while training ($answered)" test "$answered" -ge 20
# only the end of the run may show: a 503 ("the run is ending") and curl's failed connection
expect "...and no request failed before the run ended" \
  test "$(head -n -2 "$tmp/busy.codes" | grep -vc '^200$')" = 0
same() { jq -c 'select(.event == "train" or .event == "eval") | del(.samples_per_second)' "$1"; }
[ -n "${KDP_SANITIZER_RUN:-}" ] ||
  expect "a run answering predictions trains exactly like one that does not" \
    test "$(same "$tmp/busy/metrics.jsonl" | md5sum)" = "$(same "$tmp/quiet/metrics.jsonl" | md5sum)"

# ---------- the token ----------
r2="$tmp/tok"
KDP_SERVER_TOKEN=s3cret start "$r2" -s kd.method=dml
expect "token run: /metrics stays public" test "$(code "$addr/metrics")" = 200
expect "token run: /healthz and the page stay public" test "$(code "$addr/healthz") $(code "$addr/")" = "200 200"
expect "no token: /status and /history are 401" test "$(code "$addr/status") $(code "$addr/history")" = "401 401"
expect "right token: /status and /history are 200" \
  test "$(code -H 'Authorization: Bearer s3cret' "$addr/status") $(code -H 'Authorization: Bearer s3cret' "$addr/history")" = "200 200"
expect "no token: /control is 401" test "$(code -X POST "$addr/control" -d '{"action":"pause"}')" = 401
expect "wrong token: /control is 401" test "$(code -X POST -H 'Authorization: Bearer s3creT' "$addr/control" -d '{"action":"pause"}')" = 401
expect "no token: /predict is 401" test "$(code -X POST "$addr/predict" --data @"$tmp/pred.json")" = 401
expect "the token never appears in the output or logs" bash -c "! grep -rq s3cret '$r2.out' '$r2'"
expect "right token: stop is accepted" test "$(code -X POST -H 'Authorization: Bearer s3cret' "$addr/control" -d '{"action":"stop"}')" = 202
wait "$last_pid"
expect "the token run stops with 75" test $? = 75
"$exe" -s server.listen=0.0.0.0 -s run.dir="$tmp/open" -s run.max_steps=1 >"$tmp/open.out" 2>&1
rc=$?
expect "binding 0.0.0.0 without a token is refused (exit $rc)" test "$rc" != 0
expect "  ...with a message about the token" grep -qi "token" "$tmp/open.out"

# ---------- Prometheus scrapes the run through run.dir/prometheus.json; the Grafana panels ----------
g="$src/launch/grafana-dashboard.json"
expect "launch/grafana-dashboard.json is JSON with panels, each with a query" \
  jq -e '(.panels | length) >= 10 and all(.panels[]; (.targets | length) >= 1 and all(.targets[]; (.expr | length) > 0) and .gridPos.w > 0)' "$g" >/dev/null
expect "  ...on the Prometheus data source chosen at import" \
  jq -e 'all(.panels[]; .datasource.uid == "${datasource}") and (.__inputs[0].pluginId == "prometheus")' "$g" >/dev/null
if command -v prometheus >/dev/null && [ -z "${KDP_SANITIZER_RUN:-}" ]; then
  odd="$tmp/odd \"dir\\ x" # a quote and a backslash: label values must be escaped
  mkdir -p "$tmp/sd"
  start "$odd" -s kd.method=dml -s run.eval_every=1 -s checkpoint.every_steps=50 -s server.sd_dir="$tmp/sd"
  sdf=$(ls "$tmp/sd"/kdpeers-odd__dir__x-*.json 2>/dev/null)
  expect "server.sd_dir gets the run's target too, named after run.dir ($(basename "${sdf:-none}"))" \
    cmp -s "$odd/prometheus.json" "$sdf"
  # Prometheus globs file names only: the shared directory is what a scrape config names once
  printf '%s\n' 'global: {scrape_interval: 1s, evaluation_interval: 1s}' 'scrape_configs:' \
    '  - job_name: kdpeers' "    file_sd_configs: [{files: ['$tmp/sd/*.json'], refresh_interval: 1s}]" \
    >"$tmp/prom.yml"
  promtool check config "$tmp/prom.yml" >"$tmp/promcfg.out" 2>&1
  expect "promtool check config accepts a file_sd scrape of server.sd_dir/*.json" test $? = 0
  for _ in 1 2 3 4 5; do # a free port
    pport=$((20000 + RANDOM % 30000))
    prometheus --config.file="$tmp/prom.yml" --storage.tsdb.path="$tmp/prom-data" \
      --web.listen-address="127.0.0.1:$pport" >"$tmp/prom.out" 2>&1 &
    prom_pid=$!
    pids+=("$prom_pid")
    prom_ready() { curl -s "127.0.0.1:$pport/-/ready" >/dev/null || ! kill -0 "$prom_pid" 2>/dev/null; }
    wait_until prom_ready
    kill -0 "$prom_pid" 2>/dev/null && break
  done
  q() { curl -s --get "127.0.0.1:$pport/api/v1/query" --data-urlencode "query=$1"; }
  up() { [ "$(q 'up{job="kdpeers"}' | jq -r '.data.result[0].value[1]')" = 1 ]; }
  wait_until up
  expect "Prometheus finds the run through its prometheus.json and scrapes it (up = 1)" \
    test "$(q 'up{job="kdpeers"}' | jq -r '.data.result[0].value[1]')" = 1
  jq -r '.panels[] | .title as $t | .targets[] | [$t, .expr] | @tsv' "$g" >"$tmp/panels.tsv"
  rate_positive() {
    rate=$(q 'rate(kdpeers_steps_total[4s])' | jq -r '.data.result[0].value[1]')
    awk -v r="$rate" 'BEGIN { exit !(r > 0) }'
  }
  panels_filled() { # sets $empty: the panels whose query has no data yet
    empty=""
    while IFS=$'\t' read -r title expr; do
      e=${expr//\$__rate_interval/4s}
      e=${e//\$instance/.*}
      n=$(q "$e" | jq -r 'if .status == "success" then (.data.result | length) else "error: \(.error)" end')
      [ "$n" -ge 1 ] 2>/dev/null || empty+="[$title: $n] "
    done <"$tmp/panels.tsv"
    [ -z "$empty" ]
  }
  # a few scrapes, and an evaluation: every panel has data
  wait_until rate_positive
  wait_limit=120 wait_until panels_filled # (a broken query fails sooner)
  expect "  ...run_dir with a quote and a backslash comes back whole from kdpeers_run_info's label" \
    test "$(q kdpeers_run_info | jq -r '.data.result[0].metric.run_dir')" = "$odd"
  expect "  ...and from the target's own label" test "$(q kdpeers_steps_total | jq -r '.data.result[0].metric.run_dir')" = "$odd"
  rate_positive
  expect "  ...rate(kdpeers_steps_total[4s]) is a positive steps/s ($rate)" awk -v r="$rate" 'BEGIN { exit !(r > 0) }'
  panels_filled
  expect "every Grafana panel's query returns data from the live run ($(wc -l <"$tmp/panels.tsv") queries)${empty:+; not: $empty}" test -z "$empty"
  kill "$prom_pid" 2>/dev/null
  wait "$prom_pid" 2>/dev/null
  curl -s -o /dev/null -X POST "$addr/control" -d '{"action":"stop"}'
  wait "$last_pid"
  expect "the server.sd_dir target is removed when the run ends" test -z "$(ls "$tmp/sd")"
elif [ -n "${KDP_SANITIZER_RUN:-}" ]; then
  echo "skip - Prometheus scraping the run (a Prometheus round trip; skipped under $KDP_SANITIZER_RUN)"
else
  bad "prometheus is missing (launch/setup installs Debian's prometheus package)"
fi

finish live
