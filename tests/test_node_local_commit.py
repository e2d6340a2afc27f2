"""A node-local level's commit (issue 28, item 4): each node's coordinator gathers its own ranks'
records over its node's group and writes a ``.metadata`` of its node's files and chunks, filled
from checksums after the first version like the shared level's; the commit stays all or nothing
over the job. Four gloo ranks as two nodes (``tests/workers/node_local_commit_worker.py``); and
the scale simulator's node-local figures (``benchmarks.scale.run_node_local``)."""

from pathlib import Path

import pytest

from tests.launch import run_pretrain

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "node_local_commit_worker.py"


def test_each_node_commits_its_own_ranks_and_a_failure_commits_nowhere(tmp_path):
    proc = run_pretrain([str(tmp_path)], nproc=4, script=WORKER, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.glob("ok-*")) == [f"ok-{r}" for r in range(4)]
    for node in (0, 1):  # versions 1 and 2 committed on each node, 3 on neither
        committed = sorted(p.parent.name for p in (tmp_path / f"node{node}" / "l1").glob("iter_*/.metadata"))
        assert committed == ["iter_0000001", "iter_0000002"], committed


def test_the_simulators_rows_of_the_smallest_case():
    """``scripts/bench_scale.py``'s figures for 1.3B@64: the pairwise reference build ran (a child
    that fails raises, it is not reported as past the cap), and a node of 8 ranks on the
    node-local level gathers and describes fewer records than the whole job."""
    from benchmarks.scale import CASES, run_case, run_node_local

    row = run_case(CASES[0], cap_s=120, versions=1)
    assert row["before_build_s"] is not None and row["after_fill_s"] < row["plan_build_s"]
    node = run_node_local(CASES[0], 8, versions=1)
    assert node["records"] < row["records"] and node["gather_bytes"] < row["after_gather_bytes"]
    assert node["metadata_bytes"] < row["metadata_bytes"]
