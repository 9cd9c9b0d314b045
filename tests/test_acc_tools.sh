#!/usr/bin/env bash
# The accuracy study's tooling without running a study: method specs (launch/acc_report.py spec),
# records made from a kdpeers metrics.jsonl with EMA copies and a validation split, the tables'
# EMA / teacher / gain columns, and bench-accuracy --dry-run's commands for the new methods and
# knobs. Standard-library Python only (no PyTorch). Usage: tests/test_acc_tools.sh PATH/TO/kdpeers
set -uo pipefail
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"
py=/usr/bin/python3
rep="$src/launch/acc_report.py"

# --- specs: canonical labels, kdpeers settings, errors ---
expect "kdcl's label names its default ensemble" test "$("$py" "$rep" spec kdcl)" = "kdcl+ensemble=naive"
expect "a plain method is its own label (old run ids unchanged)" test "$("$py" "$rep" spec dml)" = "dml"
expect "options come in a fixed order, the first of a key wins" \
  test "$("$py" "$rep" spec mcl+aug+ema=0.99+ema=0.5)" = "mcl+ema=0.99+aug"
"$py" "$rep" spec --kdpeers kdcl+ensemble=minlogit+augpp+val=1000 >"$tmp/kv"
expect "spec --kdpeers gives the config keys" grep -qx "kd.ensemble=minlogit" "$tmp/kv"
expect "augpp turns data.augment on as well" grep -qx "data.augment=true" "$tmp/kv"
expect "val is data.val_size" grep -qx "data.val_size=1000" "$tmp/kv"
"$py" "$rep" spec kdcl+ensemble=general >/dev/null 2>"$tmp/e"
expect "kdcl general without a validation split is refused" test $? = 2
"$py" "$rep" spec dml+nope=1 >/dev/null 2>&1
expect "an unknown option is refused" test $? = 2

# --- a record from a metrics.jsonl with EMA copies, a method teacher and validation lines ---
cat >"$tmp/m.jsonl" <<'J'
{"event":"eval","step":10,"epoch":1,"model":"peer0","acc":0.5,"loss":1,"val_acc":0.2,"val_loss":1}
{"event":"eval","step":10,"epoch":1,"model":"peer1","acc":0.7,"loss":1}
{"event":"eval","step":10,"epoch":1,"model":"peer0.ema","acc":0.9,"loss":1}
{"event":"eval","step":10,"epoch":1,"model":"peer1.ema","acc":0.8,"loss":1}
{"event":"eval","step":10,"epoch":1,"model":"ensemble","acc":0.65,"loss":1}
{"event":"eval","step":10,"epoch":1,"model":"pcl","acc":0.75,"loss":1}
{"event":"kdcl_weights","step":5,"weights":[0.5,0.5]}
{"event":"kdcl_weights","step":10,"weights":[0.25,0.75]}
{"event":"summary","steps":10}
J
"$py" "$rep" record --meta '{"source":"kdpeers","study":"t","run_id":"x","method":"pcl","variant":"pcl","peers":2,"seed":1,"rc":0}' \
  "$tmp/m.jsonl" >"$tmp/rec"
expect "the record is ok" test $? = 0
chk() { "$py" -c "import json,sys; r=json.load(open('$tmp/rec')); sys.exit(0 if $1 else 1)"; }
expect "mean peer leaves the EMA copies out" chk 'abs(r["mean_peer"] - 0.6) < 1e-12'
expect "EMA = mean of peerN.ema" chk 'abs(r["ema"] - 0.85) < 1e-12'
expect "pcl's teacher is recorded" chk 'r["teacher_model"] == "pcl" and r["teacher"] == 0.75'
expect "kdcl general's last fitted weights are recorded" chk 'r["kdcl_weights"] == [0.25, 0.75]'
expect "validation lines stay out of the test figures" chk 'r["final"]["peer0"] == 0.5 and r["final_val"]["peer0"] == 0.2'

# --- tables: EMA and gain columns, one row per variant ---
{
  for s in 1 2; do
    printf '{"source":"pytorch","status":"ok","study":"methods-noisy","run_id":"i%s","method":"independent","variant":"independent","arch":"m","peers":2,"seed":%s,"epochs":3,"subset":100,"label_noise":0.4,"mean_peer":0.7%s,"ensemble":0.7}\n' "$s" "$s" "$s"
    printf '{"source":"pytorch","status":"ok","study":"methods-noisy","run_id":"e%s","method":"independent","variant":"independent+ema=0.999","arch":"m","peers":2,"seed":%s,"epochs":3,"subset":100,"label_noise":0.4,"mean_peer":0.7%s,"ensemble":0.7,"ema":0.8%s}\n' "$s" "$s" "$s" "$s"
  done
} >"$tmp/r.jsonl"
"$py" "$rep" "$tmp/r.jsonl" >"$tmp/t.md"
expect "the table has PyTorch EMA and EMA gain columns" grep -q "PyTorch EMA | PyTorch EMA gain" "$tmp/t.md"
expect "the EMA variant has its own row with its gain (+10.00, paired)" \
  grep -qF '| `independent+ema=0.999` | 2 | 71.50 +- 0.71 | +0.00 +- 0.00 | 70.00 +- 0.00 | 81.50 +- 0.71 | +10.00 +- 0.00 |' "$tmp/t.md"

# --- a validation split's variants take their gains against independent+val=N ---
{
  for s in 1 2; do
    for vm in "independent:independent:0.70" "independent:independent+val=100:0.68" \
              "kdcl:kdcl+ensemble=general+val=100:0.71"; do
      IFS=: read -r m v a <<<"$vm"
      printf '{"source":"kdpeers","status":"ok","study":"methods-noisy","run_id":"%s%s","method":"%s","variant":"%s","arch":"m","peers":2,"seed":%s,"epochs":3,"subset":100,"label_noise":0.4,"mean_peer":%s,"ensemble":0.7}\n' "$v" "$s" "$m" "$v" "$s" "$a"
    done
  done
} >"$tmp/v.jsonl"
"$py" "$rep" "$tmp/v.jsonl" >"$tmp/v.md"
expect "kdcl general with a split gains against independent with the same split (+3.00)" \
  grep -qF '| `kdcl+ensemble=general+val=100` | 2 | 71.00 +- 0.00 | +3.00 +- 0.00 |' "$tmp/v.md"
expect "independent with a split gains against plain independent (-2.00)" \
  grep -qF '| `independent+val=100` | 2 | 68.00 +- 0.00 | -2.00 +- 0.00 |' "$tmp/v.md"

# --- hetero: baselines of the same source (the study's own independent cohort), expert column ---
{
  for s in 1 2; do
    printf '{"source":"kdpeers","status":"ok","study":"hetero","run_id":"hi%s","method":"independent","variant":"independent","arch":"h","peers":3,"seed":%s,"epochs":5,"subset":0,"label_noise":0,"mean_peer":0.8,"ensemble":0.8,"final":{"peer0":0.9,"peer1":0.8,"peer2":0.82}}\n' "$s" "$s"
    printf '{"source":"kdpeers","status":"ok","study":"hetero","run_id":"hs%s","method":"switokd","variant":"switokd","arch":"h","peers":3,"seed":%s,"epochs":5,"subset":0,"label_noise":0,"mean_peer":0.87,"ensemble":0.9,"final":{"peer0":0.91,"peer1":0.85,"peer2":0.85},"expert_fraction":[0.5,0.3]}\n' "$s" "$s"
    printf '{"source":"pytorch","status":"ok","study":"hetero","run_id":"ps%s","method":"switokd","variant":"switokd","arch":"h","peers":3,"seed":%s,"epochs":5,"subset":0,"label_noise":0,"mean_peer":0.87,"ensemble":0.9,"final":{"peer0":0.91,"peer1":0.85,"peer2":0.85},"expert_fraction":[0.1,0.3]}\n' "$s" "$s"
  done
} >"$tmp/h.jsonl"
"$py" "$rep" "$tmp/h.jsonl" >"$tmp/h.md"
expect "hetero switokd: gains against the study's independent cnn and mlp peers, expert 40%" \
  grep -qF '| `switokd` | kdpeers | 2 | 91.00 +- 0.00 | 90.00 +- 0.00 | +1.00 +- 0.00 | 85.00 +- 0.00 | 81.00 +- 0.00 | +4.00 +- 0.00 | 90.00 +- 0.00 | 40.00 +- 0.00 |' "$tmp/h.md"
expect "hetero: a PyTorch row has no kdpeers baseline" \
  grep -qF '| `switokd` | pytorch | 2 | 91.00 +- 0.00 | - | - | 85.00 +- 0.00 | - | - | 90.00 +- 0.00 | 20.00 +- 0.00 |' "$tmp/h.md"

# --- the driver's commands ---
"$src/launch/bench-accuracy" --study methods-noisy --seeds 1 --torch --dry-run --ema-decay 0.999 \
  --methods kdcl+ensemble=minlogit,switokd >"$tmp/d" 2>&1
expect "kdpeers gets kd.ensemble and run.ema_decay" \
  grep -q -- "-s kd.method=kdcl -s kd.ensemble=minlogit -s run.ema_decay=0.999" "$tmp/d"
expect "the PyTorch reference gets the same specs" \
  grep -qF -- 'kdcl+ensemble=minlogit+ema=0.999\,switokd+ema=0.999' "$tmp/d"
"$src/launch/bench-accuracy" --study methods-noisy --seeds 1 --torch-only --dry-run --methods pcl >"$tmp/d2" 2>&1
expect "--torch-only prints no kdpeers command" sh -c "! grep -q kdpeers-local '$tmp/d2' && grep -q acc_torch.py '$tmp/d2'"
"$src/launch/bench-accuracy" --study methods-noisy --dry-run --methods nosuch >/dev/null 2>&1
expect "an unknown method is refused" test $? = 2

# --- launch/diversity-report: diversity per method at the early / middle / last evaluation ---
# two methods x two seeds, three evaluations (epochs 1, 2, 3; churn from the second); dml-s1 repeats
# step 20 as a resumed run does (the last line of a step counts)
dv() { # dv DIR STEP EPOCH KL DISAGREEMENT [CHURN0,CHURN1]
  local c=""; [ -z "${6:-}" ] || c=",\"churn\":[$6]"
  echo "{\"event\":\"diversity\",\"epoch\":$3,\"step\":$2,\"kl\":$4,\"disagreement\":$5$c}" >>"$1/metrics.jsonl"
}
ev() { # ev DIR PEER0 PEER1 ENSEMBLE: the final eval lines
  local model acc
  while read -r model acc; do
    echo "{\"event\":\"eval\",\"step\":30,\"epoch\":3,\"model\":\"$model\",\"acc\":$acc,\"loss\":1}" >>"$1/metrics.jsonl"
  done <<<"peer0 $2
peer1 $3
ensemble $4"
}
dr="$tmp/div"
mkdir -p "$dr/dml-s1" "$dr/dml-s2" "$dr/independent-s1" "$dr/independent-s2"
dv "$dr/dml-s1" 10 1 0.01 0.4;  dv "$dr/dml-s1" 20 2 0.9 0.9 0.9,0.9
dv "$dr/dml-s1" 20 2 0.02 0.3 0.1,0.3; dv "$dr/dml-s1" 30 3 0.005 0.1 0.05,0.15
dv "$dr/dml-s2" 10 1 0.03 0.6;  dv "$dr/dml-s2" 20 2 0.04 0.5 0.2,0.4; dv "$dr/dml-s2" 30 3 0.007 0.2 0.1,0.1
for s in 1 2; do
  dv "$dr/independent-s$s" 10 1 0.1 0.5; dv "$dr/independent-s$s" 20 2 0.2 0.4 0.1,0.1
  dv "$dr/independent-s$s" 30 3 0.3 0.3 0.1,0.1
done
ev "$dr/dml-s1" 0.70 0.72 0.74; ev "$dr/dml-s2" 0.72 0.74 0.75
ev "$dr/independent-s1" 0.68 0.70 0.71; ev "$dr/independent-s2" 0.70 0.70 0.72
/usr/bin/python3 "$src/launch/diversity-report" --methods dml,independent "$dr" >"$tmp/dr.md" 2>&1
rc=$?
expect "diversity-report exits 0 (rc $rc: $(tail -n 1 "$tmp/dr.md"))" test "$rc" = 0
expect "diversity-report: KL at epochs 1, 2, 3, mean +- std over the seeds" \
  grep -qxF '| `dml` | 2 | 0.0200 +- 0.0141 | 0.0300 +- 0.0141 | 0.0060 +- 0.0014 |' "$tmp/dr.md"
expect "diversity-report: the columns name the epochs" \
  grep -qxF '| method | seeds | early (ep 1) | middle (ep 2) | last (ep 3) |' "$tmp/dr.md"
expect "diversity-report: disagreement in %, the resumed step's last line counts" \
  grep -qxF '| `dml` | 2 | 50.00 +- 14.14 | 40.00 +- 14.14 | 15.00 +- 7.07 |' "$tmp/dr.md"
expect "diversity-report: churn (mean over peers) from the second evaluation: early and last" \
  grep -qxF '| `dml` | 2 | 25.00 +- 7.07 | 10.00 +- 0.00 |' "$tmp/dr.md"
expect "diversity-report: mean peer, ensemble, its margin and the gains against independent by seed" \
  grep -qxF '| `dml` | 2 | 72.00 +- 1.41 | 74.50 +- 0.71 | +2.50 +- 0.71 | +2.50 +- 0.71 | +3.00 +- 0.00 |' "$tmp/dr.md"
expect "diversity-report: rows in the order asked" \
  test "$(grep -c '^| `dml`' "$tmp/dr.md"),$(grep -m 1 -o '^| `[a-z]*`' "$tmp/dr.md")" = '4,| `dml`'
want=$(/usr/bin/python3 -c 'import statistics as s; print("%+.2f" % s.correlation([0.1, 0.2, 0.3, 0.3], [0.03, 0.02, 0.02, 0.02]))')
expect "diversity-report: Pearson's r of last disagreement and ensemble margin over 4 runs ($want)" \
  grep -qF "over the 4 runs, last evaluation's diversity against ensemble - mean peer: KL r = " "$tmp/dr.md"
expect "  ...disagreement r = $want" grep -qF "; disagreement r = $want." "$tmp/dr.md"
mkdir -p "$tmp/div2" && cp -r "$dr/dml-s1" "$tmp/div2/"
/usr/bin/python3 "$src/launch/diversity-report" "$dr" "$tmp/div2" >/dev/null 2>"$tmp/dr.err"
rc=$?
expect "diversity-report refuses the same method and seed twice (two P's runs; exit $rc)" \
  bash -c "test $rc != 0 && grep -q 'dml seed 1 twice' '$tmp/dr.err'"

finish acc_tools
