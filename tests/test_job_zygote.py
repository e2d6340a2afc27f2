"""The tests' warm launcher (tests/job_zygote.py) keeps what the tests rely on of torchrun and of
``python script``: rank variables, argv and ``__main__``, exit statuses, one failed rank stopping
the others, and a timeout taking every process of the launch."""

import json
import subprocess

import pytest

from tests.helpers import job_env, process_gone
from tests.zygote_launch import ROOT, run_forked, zygote_for

pytestmark = pytest.mark.slow

PROBE = ROOT / "tests" / "workers" / "zygote_probe.py"


@pytest.fixture(scope="module")
def zygote():
    zygote = zygote_for(job_env())
    if zygote is None:
        pytest.skip("GPT_TEST_LAUNCHER=torchrun: jobs start fresh interpreters")
    return zygote


def test_ranks_see_torchrun_variables_and_run_as_main(zygote, tmp_path):
    proc = run_forked(zygote, PROBE, ["env", "x"], 3, job_env(PROBE="p"), 60, torchrun=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    seen = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["env"]["RANK"])
    assert [r["env"]["RANK"] for r in seen] == ["0", "1", "2"]
    assert {r["env"]["WORLD_SIZE"] for r in seen} == {"3"} and {r["env"]["LOCAL_WORLD_SIZE"] for r in seen} == {"3"}
    assert len({r["env"]["MASTER_PORT"] for r in seen}) == 1 and seen[0]["env"]["MASTER_ADDR"] == "127.0.0.1"
    for r in seen:
        assert r["argv"] == [str(PROBE), "env", "x"] and r["main"] == "__main__"
        assert r["path0"] == str(PROBE.parent) and r["cwd"] == str(tmp_path) and r["env"]["PROBE"] == "p"


def test_each_node_of_a_two_node_job_gets_its_global_ranks_and_one_master(zygote):
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import free_port

    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        launches = [pool.submit(run_forked, zygote, PROBE, ["env"], 2, job_env(), 60, True, nnodes=2, node_rank=node,
                                master_port=port) for node in (0, 1)]
        procs = [launch.result() for launch in launches]
    seen = {}
    for node, proc in enumerate(procs):
        assert proc.returncode == 0, proc.stderr
        for line in proc.stdout.splitlines():
            env = json.loads(line)["env"]
            seen[int(env["RANK"])] = (node, env["LOCAL_RANK"], env["GROUP_RANK"], env["WORLD_SIZE"],
                                      env["LOCAL_WORLD_SIZE"], env["MASTER_PORT"])
    assert seen == {0: (0, "0", "0", "4", "2", str(port)), 1: (0, "1", "0", "4", "2", str(port)),
                    2: (1, "0", "1", "4", "2", str(port)), 3: (1, "1", "1", "4", "2", str(port))}


def test_a_zygote_started_from_a_thread_outlives_it_and_ends_with_its_stdin():
    """Jobs side by side start the zygote from a worker thread: it must serve launches after that
    thread ends (a parent-death signal fires when the parent *thread* ends), and still go when
    pytest does (EOF on its stdin)."""
    import threading

    from tests.zygote_launch import _Zygote

    started = []
    thread = threading.Thread(target=lambda: started.append(_Zygote()))
    thread.start()
    thread.join()
    zygote = started[0]
    try:
        proc = run_forked(zygote, PROBE, ["env"], 1, job_env(), 60, torchrun=False)
        assert proc.returncode == 0 and json.loads(proc.stdout)["main"] == "__main__", proc.stderr
        zygote.process.stdin.close()
        assert zygote.process.wait(timeout=60) == 0
    finally:
        zygote.stop()


def test_one_process_without_torchrun_is_python_script(zygote):
    env = job_env()
    proc = run_forked(zygote, PROBE, ["env"], 1, env, 60, torchrun=False)
    assert json.loads(proc.stdout)["env"]["RANK"] is None
    assert run_forked(zygote, PROBE, ["fail", "0", "3"], 1, env, 60, torchrun=False).returncode == 3
    raised = run_forked(zygote, PROBE, ["raise"], 1, env, 60, torchrun=False)
    assert raised.returncode == 1 and "ValueError: the probe raised" in raised.stderr


def test_a_failed_rank_stops_the_others(zygote):
    proc = run_forked(zygote, PROBE, ["fail", "1", "5"], 3, job_env(), 60, torchrun=True)
    assert proc.returncode == 1 and "rank 1 fails" in proc.stderr


def test_a_timeout_kills_every_process_of_the_launch(zygote):
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        run_forked(zygote, PROBE, ["sleep"], 2, job_env(), 5, torchrun=True)
    pids = [int(line) for line in timed_out.value.stdout.split()]
    assert len(pids) == 2 and all(process_gone(pid) for pid in pids)


def test_start_up_variables_set_otherwise_start_fresh_interpreters(zygote):
    assert zygote_for(job_env(OMP_NUM_THREADS="2")) is None
    assert zygote_for(job_env(PYTHONPATH="/elsewhere")) is None
    assert zygote_for(job_env(GPT_FAULT="x")) is zygote
