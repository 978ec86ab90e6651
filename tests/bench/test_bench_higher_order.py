"""bench higher_order: a Hessian-vector product and a jvp through fixed_point, against unrolled autograd."""

import json

from implicitdiff.bench import higher_order as B


def test_quick_run_values_equal_the_unrolled_reference_and_json_is_written(tmp_path):
    out = tmp_path / "ho.json"
    results = B.run(quick=True, n=48, repeats=1, out=str(out), verbose=False)
    rows = {r["task"]: r for r in results["rows"]}
    assert set(rows) == {"first-order fwd+bwd", "Hessian-vector product", "torch.func.jvp"}
    for r in rows.values():  # float64, a contraction of rate 0.5: both sides to ~1e-12
        assert r["rel_err"] < 1e-9, r
    assert rows["first-order fwd+bwd"]["ratio"] == 1.0
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "higher_order" and saved["settings"]["n"] == 48
    assert set(saved["summary"]) == {"targets_met", "misses"}
