#!/usr/bin/python3
"""acc_report.py: markdown tables from bench-accuracy results (standard library only).

Usage:
  acc_report.py [--include-failed] FILE.jsonl...     tables (markdown on stdout)
  acc_report.py record --meta JSON [--cmd CMD] METRICS.jsonl
                                  one results line from a run's metrics.jsonl (bench-accuracy);
                                  exit 0: ok record, 3: a "failed" record, 2: no record
  acc_report.py done --run-id ID FILE    exit 0 if FILE holds an ok record of ID
  acc_report.py brief < RECORD           one-line summary of a record
  acc_report.py spec [--kdpeers] SPEC    a method spec's canonical label (the run ids' method part),
                                  or with --kdpeers its kdpeers config settings, one KEY=VALUE a line

Method specs (bench-accuracy --methods, acc_torch.py --methods): NAME[+KEY[=VALUE]]..., e.g.
`kdcl+ensemble=minlogit`, `independent+ema=0.999`, `pcl+aug`. Keys, and the kdpeers setting each
one stands for: ensemble (kd.ensemble), ema (run.ema_decay), aug (data.augment), augpp
(data.augment_per_peer, implies data.augment), val (data.val_size), teacher (kd.teacher_peer),
tau (kd.tau), cw (kd.contrast_weight), embed (kd.embed_dim). When a key is given twice the first
wins (so bench-accuracy appends its global options after a spec's own). The label is NAME followed
by the options in the order above; a plain NAME is its own label, so older run ids are unchanged.

Tables, per study and configuration: for each method, mean +- sample std over seeds of the mean
peer accuracy, the ensemble accuracy and the method's teacher accuracy (gate, fused, leader), the
gain over `independent` (paired by seed when the seeds match), and the PyTorch reference
(launch/acc_torch.py) where present. Quick runs (--quick) get their own tables, labelled as
pipeline tests: they are not accuracy figures.
"""
import json
import os
import re
import statistics
import sys
import time

TEACHERS = ("gate", "fused", "leader", "kdcl", "pcl", "switokd")
METHOD_ORDER = ["independent", "dml", "codistill", "avg", "one", "ffl", "okddip", "kdcl", "pcl",
                "mcl", "switokd"]
ENSEMBLES = ("naive", "minlogit", "general")
# spec key -> (kdpeers config key, type); the order is the label's
SPEC_KEYS = {"ensemble": ("kd.ensemble", str), "ema": ("run.ema_decay", float),
             "aug": ("data.augment", bool), "augpp": ("data.augment_per_peer", bool),
             "val": ("data.val_size", int), "teacher": ("kd.teacher_peer", int),
             "tau": ("kd.tau", float), "cw": ("kd.contrast_weight", float),
             "embed": ("kd.embed_dim", int)}


class SpecError(ValueError):
    pass


def parse_spec(spec):
    """'kdcl+ensemble=minlogit+ema=0.999' -> ('kdcl', {'ensemble': 'minlogit', 'ema': 0.999}).
    The first occurrence of a key wins. Raises SpecError on anything unknown."""
    parts = spec.strip().split("+")
    method = parts[0]
    if method not in METHOD_ORDER:
        raise SpecError(f"unknown method '{method}' in '{spec}' (expected one of: "
                        f"{' '.join(METHOD_ORDER)})")
    opts = {}
    for p in parts[1:]:
        key, eq, val = p.partition("=")
        if key not in SPEC_KEYS:
            raise SpecError(f"unknown option '{key}' in '{spec}' (expected: {' '.join(SPEC_KEYS)})")
        if key in opts:
            continue
        typ = SPEC_KEYS[key][1]
        try:
            if typ is bool:
                if eq and val not in ("true", "false", "1", "0"):
                    raise ValueError(val)
                v = not eq or val in ("true", "1")
            elif not eq:
                raise ValueError("needs a value")
            else:
                v = typ(val)
        except ValueError as e:
            raise SpecError(f"option '{p}' in '{spec}': {e}") from None
        opts[key] = v
    if method == "kdcl":
        opts.setdefault("ensemble", "naive")
    elif "ensemble" in opts:
        raise SpecError(f"'{spec}': ensemble is a kdcl option")
    if opts.get("ensemble", "naive") not in ENSEMBLES:
        raise SpecError(f"'{spec}': ensemble must be one of {', '.join(ENSEMBLES)}")
    if opts.get("ensemble") == "general" and not opts.get("val"):
        raise SpecError(f"'{spec}': the general ensemble needs a validation split (+val=N)")
    if "ema" in opts and not 0 < opts["ema"] < 1:
        raise SpecError(f"'{spec}': ema must be in (0, 1)")
    for k in ("val", "teacher", "embed"):
        if k in opts and opts[k] < (1 if k != "teacher" else 0):
            raise SpecError(f"'{spec}': {k} out of range")
    if opts.get("augpp"):
        opts.pop("aug", None)  # augpp implies aug
    for k in [k for k, v in opts.items() if v is False]:
        del opts[k]
    return method, opts


def spec_label(method, opts):
    out = method
    for k in SPEC_KEYS:
        if k in opts:
            v = opts[k]
            out += f"+{k}" if v is True else f"+{k}={v:g}" if isinstance(v, float) else f"+{k}={v}"
    return out


def spec_kdpeers(method, opts):
    """The kdpeers config settings of a spec (KEY=VALUE strings)."""
    out = [f"kd.method={method}"]
    for k in SPEC_KEYS:
        if k not in opts:
            continue
        v = opts[k]
        if k == "augpp":
            out.append("data.augment=true")
        out.append(f"{SPEC_KEYS[k][0]}=" + ("true" if v is True else f"{v:g}" if isinstance(v, float)
                                            else str(v)))
    return out


def cmd_spec(argv):
    kd = "--kdpeers" in argv
    args = [a for a in argv if a != "--kdpeers"]
    if len(args) != 1:
        die("spec: usage: spec [--kdpeers] SPEC")
    try:
        m, o = parse_spec(args[0])
    except SpecError as e:
        die(f"spec: {e}")
    print("\n".join(spec_kdpeers(m, o)) if kd else spec_label(m, o))

TARGETS = {"mlp(512,256)": 89.5, "cnn": 92.3}  # issue 2, percent, single peer 10 epochs


def die(msg, code=2):
    print(f"acc_report: {msg}", file=sys.stderr)
    sys.exit(code)


def read_jsonl(path):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                print(f"acc_report: {path}:{n}: not JSON ({e}); line skipped", file=sys.stderr)
    return out


# ------------------------------------------------------------------ record
def cmd_record(argv):
    meta, cmd, metrics = None, None, None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--meta", "--cmd"):
            if i + 1 >= len(argv):
                die(f"record: {a} needs a value")
            if a == "--meta":
                try:
                    meta = json.loads(argv[i + 1])
                except ValueError as e:
                    die(f"record: --meta is not JSON: {e}")
            else:
                cmd = argv[i + 1].strip()
            i += 2
        elif metrics is None:
            metrics = a
            i += 1
        else:
            die(f"record: unexpected argument '{a}'")
    if meta is None or metrics is None:
        die("record: usage: record --meta JSON [--cmd CMD] METRICS.jsonl")
    rec = dict(meta)
    if cmd:
        rec["cmd"] = cmd
    problems = []
    if rec.get("rc", 0) != 0:
        problems.append(f"exit status {rec['rc']}")
    lines = read_jsonl(metrics) if os.path.exists(metrics) else []
    if not os.path.exists(metrics):
        problems.append(f"{metrics} missing")
    # test-set evaluations; with data.val_size every eval line also carries "val_acc" (the same
    # model on the validation split), read as a validation line of its own
    evals = [r for r in lines if r.get("event") == "eval"]
    vals = [dict(r, acc=r["val_acc"]) for r in evals if r.get("val_acc") is not None]
    summary = next((r for r in reversed(lines) if r.get("event") == "summary"), None)
    if summary is None:
        problems.append("no summary line")
    final, final_loss, last_step = {}, {}, {}
    by_step = {}
    for r in evals:
        m, s = r.get("model"), r.get("step", 0)
        if m is None:
            continue
        by_step.setdefault(s, {})[m] = r
        if s >= last_step.get(m, -1):
            last_step[m] = s
            final[m] = r.get("acc")
            final_loss[m] = r.get("loss")
    peers = sorted((m for m in final if is_peer(m)), key=lambda m: int(m[4:]))
    if not peers:
        problems.append("no peer eval lines")
    P = rec.get("peers")
    if P and peers and len(peers) != P:
        problems.append(f"{len(peers)} peers evaluated, {P} expected")
    rec["final"] = final
    rec["final_loss"] = final_loss
    rec["mean_peer"] = sum(final[m] for m in peers) / len(peers) if peers else None
    rec["ensemble"] = final.get("ensemble")
    emas = [m + ".ema" for m in peers if m + ".ema" in final]
    if emas:
        rec["ema"] = sum(final[m] for m in emas) / len(emas)
        rec["ema_ensemble"] = final.get("ensemble.ema")
    if vals:
        fv, last = {}, {}
        for r in vals:
            m, st = r.get("model"), r.get("step", 0)
            if m is not None and st >= last.get(m, -1):
                last[m], fv[m] = st, r.get("acc")
        rec["final_val"] = fv
        vp = [fv[m] for m in peers if m in fv]
        rec["val_mean_peer"] = sum(vp) / len(vp) if vp else None
    if rec.get("method") == "switokd" and peers:
        t = parse_spec(rec.get("variant") or "switokd")[1].get("teacher", 0)
        rec["teacher_peer"] = t
        st_ = [final[m] for m in peers if m != f"peer{t}"]
        rec["students"] = sum(st_) / len(st_) if st_ else None
    ef = [r["expert_fraction"] for r in lines if "expert_fraction" in r]
    if ef:
        rec["expert_fraction"] = ef
    kw = [r["weights"] for r in lines if r.get("event") == "kdcl_weights" and "weights" in r]
    if kw:
        rec["kdcl_weights"] = kw[-1]  # kdcl general: the weights fitted at the last evaluation
    tm = next((m for m in TEACHERS if m in final), None)
    rec["teacher_model"] = tm
    rec["teacher"] = final.get(tm) if tm else None
    curve = []
    for s in sorted(by_step):
        row = by_step[s]
        pk = [row[m]["acc"] for m in row if is_peer(m)]
        any_row = next(iter(row.values()))
        c = {"epoch": any_row.get("epoch"), "step": s,
             "mean_peer": sum(pk) / len(pk) if pk else None}
        if "ensemble" in row:
            c["ensemble"] = row["ensemble"]["acc"]
        if tm and tm in row:
            c["teacher"] = row[tm]["acc"]
        curve.append(c)
    rec["curve"] = curve
    if summary:
        for k in ("steps", "train_seconds", "steps_per_second", "samples_per_second",
                  "compute_seconds", "exchange_seconds", "allreduce_seconds", "peak_rss_mb"):
            if k in summary:
                rec[k] = summary[k]
    rec["status"] = "failed" if problems else "ok"
    if problems:
        rec["problems"] = problems
    rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(json.dumps(rec))
    sys.exit(3 if problems else 0)


def is_peer(model):
    """peer0, peer1, ... (not peer0.ema)"""
    return model.startswith("peer") and model[4:].isdigit()


def cmd_done(argv):
    if len(argv) != 3 or argv[0] != "--run-id":
        die("done: usage: done --run-id ID FILE")
    rid, path = argv[1], argv[2]
    if not os.path.exists(path):
        sys.exit(1)
    for r in read_jsonl(path):
        if r.get("run_id") == rid and r.get("status") == "ok":
            sys.exit(0)
    sys.exit(1)


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def cmd_brief(_argv):
    r = json.loads(sys.stdin.read())
    t = f" {r['teacher_model']} {pct(r['teacher'])}" if r.get("teacher_model") else ""
    e = f" ensemble {pct(r['ensemble'])}" if r.get("ensemble") is not None else ""
    if r.get("mean_ema") is not None:
        e += f" mean EMA {pct(r['mean_ema'])}"
    sps = r.get("steps_per_second")
    e += f" ema {pct(r['ema'])}" if r.get("ema") is not None else ""
    print(f"  {r.get('run_id')}: mean peer {pct(r.get('mean_peer'))}{e}{t}; "
          f"{r.get('steps')} steps, {sps if sps is not None else '-'} steps/s, "
          f"wall {r.get('wall_seconds')} s")


# ------------------------------------------------------------------ tables
def stats(xs):
    """(mean, sample std or None, n) of a list of fractions, in percent."""
    xs = [100 * x for x in xs if x is not None]
    if not xs:
        return None
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def fmt(st, sign=False):
    if st is None:
        return "-"
    m, s, n = st
    head = f"{m:+.2f}" if sign else f"{m:.2f}"
    return f"{head} +- {s:.2f}" if s is not None else f"{head} (n=1)"


def by_seed(recs, key):
    out = {}
    for r in recs:
        v = key(r)
        if v is not None:
            out[r["seed"]] = v
    return out


def gain(recs, base, key, base_key=None):
    """Paired (by seed) gain of recs over base when they share seeds, else difference of means;
    base_key (default key) reads the base records."""
    a, b = by_seed(recs, key), by_seed(base, base_key or key)
    common = sorted(set(a) & set(b))
    if common:
        return stats([a[s] - b[s] for s in common]), "paired"
    sa, sb = stats(list(a.values())), stats(list(b.values()))
    if sa is None or sb is None:
        return None, ""
    return (sa[0] - sb[0], None, min(sa[2], sb[2])), "means"


def config_key(r):
    return (r.get("study"), bool(r.get("quick")), r.get("epochs"), r.get("subset"),
            float(r.get("label_noise") or 0), r.get("peers"), float(r.get("rampup_epochs") or 0))


def config_title(study, quick, epochs, subset, noise, peers, rampup=0.0):
    data = "full data" if not subset else f"first {subset} examples"
    if noise:
        data += f", {100 * noise:g}% symmetric label noise"
    t = f"### {study}: {peers} peer{'s' if peers != 1 else ''}, {data}, {epochs} epoch{'s' if epochs != 1 else ''}"
    if rampup:
        t += f", KD ramp-up {rampup:g} epoch{'s' if rampup != 1 else ''}"
    if quick:
        t += ("\n\n**QUICK pipeline test (1 epoch, 2000 examples): NOT accuracy figures, do not "
              "quote.**")
    return t


def variant(r):
    return r.get("variant") or r["method"]


def variant_key(v):
    """Table order: the method order, then plain before its options, then the label."""
    m = v.split("+")[0]
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), v != m, v)


def methods_table(recs, lines):
    """Method rows (one per variant: method and options): kdpeers mean peer / gain / ensemble /
    teacher / students / EMA, and the PyTorch reference's; gains are against plain `independent`
    of the same source, paired by seed. Columns nobody fills are left out."""
    kd = [r for r in recs if r.get("source") == "kdpeers"]
    pt = [r for r in recs if r.get("source") == "pytorch"]
    archs = sorted({r.get("arch") for r in recs})
    variants = sorted({variant(r) for r in recs}, key=variant_key)
    lines.append(f"Model: {', '.join(archs)}. Accuracies in %, mean +- sample std over seeds; "
                 "gain = mean peer minus plain `independent`'s (paired by seed); EMA = mean of the "
                 "peers' EMA copies (`peerN.ema`), EMA gain = EMA minus plain `independent`'s mean "
                 "peer; students = switokd's peers other than the teacher; expert = switokd's "
                 "expert-mode fraction of the steps. A variant with a validation split (+val=N) "
                 "trains on fewer examples: its gains are against `independent+val=N` when that "
                 "is recorded.")
    lines.append("")
    def base_of(rs, v):
        """The `independent` runs a variant's gains are taken against: with a validation split
        (+val=N) `independent+val=N` when recorded (same training examples and noisy labels),
        else plain `independent`."""
        val = parse_spec(v)[1].get("val") if v.split("+")[0] in METHOD_ORDER else None
        if val and v != f"independent+val={val}":
            b = [r for r in rs if variant(r) == f"independent+val={val}"]
            if b:
                return b
        return [r for r in rs if variant(r) == "independent"]

    def teacher_cell(rs):
        tms = sorted({r["teacher_model"] for r in rs if r.get("teacher_model")})
        tst = stats([r.get("teacher") for r in rs])
        return f"{fmt(tst)} ({', '.join(tms)})" if tst else "-"

    def cells(rs, base, v, torch_side):
        """(name, cell) pairs of one source's figures for variant v."""
        if not rs:
            return []
        pre = "PyTorch " if torch_side else ""
        g = gain(rs, base, lambda r: r["mean_peer"])[0] if base and base[0] not in rs else None
        ge = gain([r for r in rs if r.get("ema") is not None], base,
                  lambda r: r.get("ema"), lambda r: r["mean_peer"])[0] if base else None
        out = [(pre + "mean peer", fmt(stats([r["mean_peer"] for r in rs]))),
               (pre + "gain", fmt(g, sign=True)),
               (pre + "ensemble", fmt(stats([r.get("ensemble") for r in rs]))),
               (pre + "teacher", teacher_cell(rs)),
               (pre + "students", fmt(stats([r.get("students") for r in rs]))),
               (pre + "EMA", fmt(stats([r.get("ema") for r in rs]))),
               (pre + "EMA gain", fmt(ge, sign=True) if ge else "-"),
               (pre + "expert", fmt(expert_stat(rs)))]
        return out

    head = ["method", "seeds"]
    for side in ("", "PyTorch "):
        head += [side + c for c in ("mean peer", "gain", "ensemble", "teacher", "students", "EMA",
                                    "EMA gain", "expert")]
    head += ["steps/s"]
    rows = []
    for v in variants:
        rs = [r for r in kd if variant(r) == v]
        ps = [r for r in pt if variant(r) == v]
        row = {"method": f"`{v}`",
               "seeds": f"{len(rs) or '-'} / {len(ps) or '-'}" if kd and pt else str(len(rs or ps))}
        row.update(cells(rs, base_of(kd, v), v, False))
        row.update(cells(ps, base_of(pt, v), v, True))
        sps = [r.get("steps_per_second") for r in rs if r.get("steps_per_second")]
        row["steps/s"] = f"{statistics.mean(sps):.1f}" if sps else "-"
        rows.append(row)
    keep = [h for h in head if h in ("method", "seeds") or any(r.get(h, "-") != "-" for r in rows)]
    if kd and pt:
        lines.append("seeds: kdpeers / PyTorch; steps/s: kdpeers.")
        lines.append("")
    lines.append("| " + " | ".join(keep) + " |")
    lines.append("|" + "---|" * len(keep))
    for r in rows:
        lines.append("| " + " | ".join(r.get(h, "-") for h in keep) + " |")
    lines.append("")


def single_table(recs, lines):
    lines.append("Single peer (`independent`), accuracy in %, mean +- sample std over seeds; "
                 "target from issue 2 (10 epochs).")
    lines.append("")
    lines.append("| model | seeds | test accuracy | per seed | target | steps/s |")
    lines.append("|---|---|---|---|---|---|")
    for arch in sorted({r["arch"] for r in recs}):
        rs = sorted((r for r in recs if r["arch"] == arch), key=lambda r: r["seed"])
        st = stats([r["mean_peer"] for r in rs])
        per = ", ".join(f"{100 * r['mean_peer']:.2f}" for r in rs)
        tgt = TARGETS.get(arch)
        tcol = "-"
        if tgt is not None and st is not None and rs[0].get("epochs") == 10 and \
                not rs[0].get("quick") and not rs[0].get("subset"):
            tcol = f">= {tgt} ({'met' if st[0] >= tgt else 'NOT met'} by the mean)"
        sps = [r.get("steps_per_second") for r in rs if r.get("steps_per_second")]
        lines.append(f"| `{arch}` | {len(rs)} | {fmt(st)} | {per} | {tcol} | "
                     f"{statistics.mean(sps):.1f} |" if sps else
                     f"| `{arch}` | {len(rs)} | {fmt(st)} | {per} | {tcol} | - |")
    lines.append("")


def expert_stat(rs):
    """switokd's expert-mode fraction of the steps: per run the mean over its epochs, then mean +-
    std over runs (percent); None when no run recorded one."""
    return stats([statistics.mean(r["expert_fraction"]) for r in rs if r.get("expert_fraction")])


def hetero_table(recs, all_recs, lines):
    """Per-model rows of the heterogeneous run, against independent baselines of the same arch,
    epochs, data and source (paired by seed): the hetero study's own `independent` cohort (its
    peers do not interact) and the other studies' independent runs of that arch."""
    r0 = recs[0]
    cfg = (bool(r0.get("quick")), r0.get("epochs"), r0.get("subset"),
           float(r0.get("label_noise") or 0))

    def same(r, src):
        return (r.get("status") == "ok" and r.get("source") == src and
                r.get("method") == "independent" and variant(r) == "independent" and
                (bool(r.get("quick")), r.get("epochs"), r.get("subset"),
                 float(r.get("label_noise") or 0)) == cfg)

    def peers_of(r, want_cnn):
        return [v for k, v in r["final"].items() if is_peer(k) and ((k == "peer0") == want_cnn)]

    def baseline(arch, src):
        """One pseudo-record per seed: the mean accuracy of the `arch` peers of the matching
        independent runs of that seed (hetero cohorts, single- and multi-peer runs alike)."""
        per = {}
        for r in all_recs:
            if not same(r, src):
                continue
            if r.get("study") == "hetero":
                per.setdefault(r["seed"], []).extend(peers_of(r, arch == "cnn"))
            elif r.get("arch") == arch and r.get("mean_peer") is not None:
                per.setdefault(r["seed"], []).append(r["mean_peer"])
        return [{"seed": k, "mean_peer": statistics.mean(v)} for k, v in sorted(per.items()) if v]

    lines.append("Peer 0 is `cnn`, the others `mlp(512,256)`. Baselines (alone): `independent` "
                 "runs of the same arch, epochs, data and source, this study's cohort included "
                 "(its peers do not interact), paired by seed. switokd's teacher is peer 0 (the "
                 "cnn); expert = its expert-mode fraction of the steps (mean over epochs).")
    lines.append("")
    lines.append("| method | source | seeds | cnn peer | cnn alone | gain | mlp peers (mean) | "
                 "mlp alone | gain | ensemble | expert | steps/s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for src, m in sorted({(r.get("source"), variant(r)) for r in recs},
                         key=lambda k: (variant_key(k[1]), k[0] != "kdpeers")):
        rs = [r for r in recs if variant(r) == m and r.get("source") == src]
        base_cnn, base_mlp = baseline("cnn", src), baseline("mlp(512,256)", src)
        cnn = lambda r: r["final"].get("peer0")  # noqa: E731
        mlp = lambda r: statistics.mean(peers_of(r, False))  # noqa: E731
        row = [f"`{m}`", src, str(len(rs))]
        for f, base in ((cnn, base_cnn), (mlp, base_mlp)):
            row.append(fmt(stats([f(r) for r in rs])))
            row.append(fmt(stats([r["mean_peer"] for r in base])))
            row.append(fmt(gain([dict(r, v=f(r)) for r in rs], base, lambda r: r["v"],
                                lambda r: r["mean_peer"])[0], sign=True)
                       if base and m != "independent" else "-")
        row.append(fmt(stats([r.get("ensemble") for r in rs])))
        row.append(fmt(expert_stat(rs)))
        sps = [r.get("steps_per_second") for r in rs if r.get("steps_per_second")]
        row.append(f"{statistics.mean(sps):.1f}" if sps else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")


def summary_table(groups, lines):
    """Compact method x regime table of the mean peer accuracy (full runs only)."""
    regimes = [(k, v) for k, v in groups.items()
               if k[0] in ("methods-full", "methods-noisy", "cnn") and not k[1]]
    if len(regimes) < 2:
        return
    order = sorted({variant(r) for _, rs in regimes for r in rs}, key=variant_key)
    lines.append("### Summary: mean peer accuracy (%), method x regime (kdpeers; PyTorch in "
                 "brackets)")
    lines.append("")
    names = [f"{k[0]} ({k[2]} ep)" for k, _ in regimes]
    lines.append("| method | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for m in order:
        cells, any_ = [], False
        for _, rs in regimes:
            kd = [r["mean_peer"] for r in rs if variant(r) == m and r["source"] == "kdpeers"]
            pt = [r["mean_peer"] for r in rs if variant(r) == m and r["source"] == "pytorch"]
            c = fmt(stats(kd)) if kd else "-"
            if pt:
                c += f" [{fmt(stats(pt))}]"
            any_ = any_ or bool(kd or pt)
            cells.append(c)
        if any_:
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    lines.append("")


def cmd_tables(argv):
    include_failed = "--include-failed" in argv
    files = [a for a in argv if a != "--include-failed"]
    if not files:
        die("usage: acc_report.py [--include-failed] FILE.jsonl... (see --help)")
    all_recs, failed = [], []
    for f in files:
        if not os.path.exists(f):
            die(f"{f}: no such file")
        for r in read_jsonl(f):
            (all_recs if r.get("status") == "ok" else failed).append(r)
    # the last record of a run_id wins (a rerun replaces an earlier one)
    latest = {}
    for r in all_recs:
        latest[r.get("run_id")] = r
    all_recs = list(latest.values())
    groups = {}
    for r in all_recs:
        groups.setdefault(config_key(r), []).append(r)
    study_order = ["single", "methods-full", "methods-noisy", "cnn", "hetero"]
    keys = sorted(groups, key=lambda k: (k[1], study_order.index(k[0]) if k[0] in study_order
                                         else 99, k[2] or 0, k[3] or 0))
    lines = ["# kdpeers accuracy study (Fashion-MNIST)", "",
             f"From: {', '.join(files)}. Recipe: batch 128, SGD nesterov 0.9, weight decay 5e-4, "
             "lr 0.05 cosine per step to 0, T 3, KD weight 1, no ramp-up unless the table says so. Ensemble = mean of the "
             "peers' probabilities; teacher = the method's own (gate / fused / leader).", ""]
    summary_table(groups, lines)
    for k in keys:
        rs = groups[k]
        lines.append(config_title(*k))
        lines.append("")
        if k[0] == "single":
            single_table(rs, lines)
        elif k[0] == "hetero":
            hetero_table(rs, all_recs, lines)
        else:
            methods_table(rs, lines)
    if failed:
        lines.append(f"{len(failed)} failed run record(s) not in the tables:" +
                     ("" if include_failed else " (--include-failed lists them)"))
        if include_failed:
            for r in failed:
                lines.append(f"- `{r.get('run_id')}`: {'; '.join(r.get('problems', []))}")
        lines.append("")
    print("\n".join(lines).rstrip() + "\n")


def main():
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    sub = {"record": cmd_record, "done": cmd_done, "brief": cmd_brief, "spec": cmd_spec}.get(argv[0])
    if sub:
        sub(argv[1:])
    else:
        cmd_tables(argv)


if __name__ == "__main__":
    main()
