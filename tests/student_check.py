#!/usr/bin/python3
"""student_check.py: checks for tests/test_student.sh (Debian's /usr/bin/python3; onnx only for
`onnx`).

  student_check.py onnx MODEL.onnx:CLASSES...
      onnx.checker.check_model with full_check (strict shape inference), then strict type and
      shape inference must give the output "logits" the shape [N, CLASSES]; the opset, IR version,
      metadata_props (arch, kdpeers_version) and the single input "pixels" [N, C, H, W] are checked.
  student_check.py compare A.jsonl B.jsonl TOL
      two JSON-lines prediction files (kdpeers-predict --json, ort_run.js predict, kdpm2torch.py):
      the same number of lines, the same labels, every probability within TOL. Prints the max diff.
"""
import json
import sys


def check_onnx(path, classes):
    import onnx
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    inf = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    out = inf.graph.output
    assert len(out) == 1 and out[0].name == "logits", [o.name for o in out]
    dims = [d.dim_param or d.dim_value for d in out[0].type.tensor_type.shape.dim]
    assert dims == ["N", classes], f"logits shape {dims}, expected ['N', {classes}]"
    ins = [i for i in inf.graph.input if i.name not in {t.name for t in inf.graph.initializer}]
    assert len(ins) == 1 and ins[0].name == "pixels", [i.name for i in ins]
    idims = [d.dim_param or d.dim_value for d in ins[0].type.tensor_type.shape.dim]
    assert len(idims) == 4 and idims[0] == "N", idims
    assert m.ir_version == 7 and [(o.domain, o.version) for o in m.opset_import] == [("", 13)]
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta.get("arch") and meta.get("kdpeers_version"), meta
    print(f"{path}: check_model(full_check) ok, logits {dims}, pixels {idims}, "
          f"{len(m.graph.node)} nodes, arch {meta['arch']}")


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(a_path, b_path, tol):
    a, b = load(a_path), load(b_path)
    if len(a) != len(b):
        sys.exit(f"{a_path}: {len(a)} predictions, {b_path}: {len(b)}")
    worst, labels = 0.0, 0
    for i, (x, y) in enumerate(zip(a, b)):
        labels += x["label"] != y["label"]
        worst = max(worst, max(abs(p - q) for p, q in zip(x["probs"], y["probs"])))
        if len(x["probs"]) != len(y["probs"]):
            sys.exit(f"line {i}: {len(x['probs'])} vs {len(y['probs'])} probabilities")
    print(f"{len(a)} images: {labels} labels differ, max |p diff| {worst:.3g} (tolerance {tol})")
    if labels or worst > tol:
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "onnx":
        failed = 0
        for arg in sys.argv[2:]:
            path, classes = arg.rsplit(":", 1)
            try:
                check_onnx(path, int(classes))
            except Exception as e:  # report every file, fail at the end
                print(f"{path}: FAILED: {type(e).__name__}: {e}")
                failed += 1
        sys.exit(1 if failed else 0)
    elif len(sys.argv) == 5 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(__doc__)
