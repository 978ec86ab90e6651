"""The call counter (``implicitdiff.bench.calls``): it counts, and the counts of one ``nn.DEQ`` call and one
``root`` call stay at most where issue 13's refactor brought them (a structure guard, like the architecture
test: a new layer of indirection on these paths shows up here)."""

import json

import pytest

from implicitdiff.bench.calls import CASES, count, run

# (forward functions, forward files, backward functions, backward files), at most: the figures after the
# one-loop refactor (docs/benchmarks.md, "Function counts") plus a little slack for small changes
LIMITS = {"deq": (49, 17, 23, 9), "root": (45, 16, 22, 8)}


@pytest.mark.parametrize("case", list(LIMITS))
def test_counts_stay_at_most_where_they_are(case):
    fwd, bwd = count(case)
    got = (fwd.functions, fwd.files, bwd.functions, bwd.files)
    assert all(g <= lim for g, lim in zip(got, LIMITS[case])), (got, LIMITS[case], fwd.names, bwd.names)
    # the counter sees the path it is meant to: the public function, the autograd Function, the loop
    assert "implicit/root.py::forward" in fwd.names and "solvers/_loop.py::iterate" in fwd.names
    assert "implicit/root.py::backward" in bwd.names
    assert not any(n.startswith("bench/") for n in fwd.names + bwd.names)


def test_run_writes_every_case(tmp_path):
    out = tmp_path / "calls.json"
    results = run(out=str(out), verbose=False)
    assert set(CASES) <= set(results) and json.loads(out.read_text())["deq"]["forward"]["functions"] > 0
