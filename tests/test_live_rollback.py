"""Rolling back inside the running job (``scripts/rollback.sh STEP --live``): the same processes
go back to STEP from the fastest level holding it and replay the original run bit for bit, the
abandoned versions are moved aside on every level, and a restart never resumes the old branch.

The request is placed before the launch and taken at a fixed iteration
(``GPT_CKPT_HOLD=live-request:N``, ``checkpointing.base.faults``), so the outcome does not depend on
the machine's speed. Dropout is on: a replay equal bit for bit needs the RNG states back too.
"""

import json
import os

import pytest

from checkpointing.recovery.rollback import rollbacks
from checkpointing.recovery.rollback_request import ANSWER_NAME, RollbackRequest, write_request
from tests.launch import run_pretrain
from trainer.metrics_file import read_metrics_file

pytestmark = pytest.mark.slow

MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
         "--seq-length", "32", "--max-position-embeddings", "32", "--vocab-size", "1024", "--mock-data",
         "--lr", "3e-3", "--log-interval", "1", "--seed", "7"]
ASYNC = ["--async-save", "--save-interval", "1", "--ckpt-host-versions", "4", "--ckpt-persistent-interval", "5"]


def losses_by_pass(metrics) -> list[dict[int, float]]:
    """The logged losses, split where the iteration goes back (a rollback): one dict per pass."""
    passes: list[dict[int, float]] = [{}]
    last = 0
    for record in metrics.iterations:
        if record["iteration"] <= last:
            passes.append({})
        passes[-1][record["iteration"]] = record["lm_loss"]
        last = record["iteration"]
    return passes


def job(tmp_path, layout: list[str], extra: list[str] = ()) -> tuple[list[str], dict]:
    save, shm = tmp_path / "ckpt", tmp_path / "shm"
    args = MODEL + layout + ASYNC + ["--save", str(save), "--load", str(save), "--ckpt-host-dir", str(shm),
                                     "--metrics-file", str(tmp_path / "metrics.jsonl"), *extra]
    return args, {"save": save, "shm": shm, "metrics": tmp_path / "metrics.jsonl"}


def _committed_after(root, record_time: float) -> list[str]:
    """``iter_*`` directories of ``root`` committed before the rollback's record (of the old branch)."""
    old = []
    for name in sorted(os.listdir(root)):
        if name.startswith("iter_") and os.path.isfile(os.path.join(root, name, ".metadata")):
            if os.stat(os.path.join(root, name, ".metadata")).st_mtime < record_time and int(name[5:]) > 0:
                old.append(name)
    return old


def test_live_rollback_in_a_tp2_pp2_dp2_job_replays_bit_for_bit(tmp_path):
    """8 processes; at iteration 20 the job goes back to 18 (in L0), in the same processes."""
    local = tmp_path / "local"
    args, where = job(tmp_path, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                 "--micro-batch-size", "1", "--global-batch-size", "8", "--use-distributed-optimizer",
                                 "--train-iters", "24"],
                      ["--ckpt-local-dir", str(local), "--ckpt-local-interval", "2", "--tensorboard-dir",
                       str(tmp_path / "tb")])
    os.makedirs(where["save"])
    write_request(str(where["save"]), RollbackRequest.new(18, branch="second-try"))
    proc = run_pretrain(args, nproc=8, env={"GPT_CKPT_HOLD": "live-request:20"}, timeout=400)
    assert "rolled back from iteration 20 to 18" in proc.stdout, proc.stdout[-3000:]
    metrics = read_metrics_file(str(where["metrics"]))
    # No process was started or stopped: one start-up, the rollback in the same trainer process.
    startups = [json.loads(line) for line in open(where["metrics"]) if '"kind": "startup"' in line]
    assert len(startups) == 1
    (rollback,) = metrics.rollbacks
    assert rollback["pid"] == startups[0]["pid"]
    assert (rollback["step"], rollback["from_iteration"], rollback["source"]) == (18, 20, "L0")
    first, replay = losses_by_pass(metrics)
    assert sorted(replay) == list(range(19, 25))
    for it in (19, 20):
        assert replay[it] == first[it], (it, replay[it], first[it])  # same data, same RNG: the same bits
    # The abandoned versions are moved aside on every level; what is left after 18 is the new branch's.
    (record,) = rollbacks(str(where["save"]))
    assert record["branch"] == "second-try"
    for root in (where["save"], local):
        moved = sorted(os.listdir(root / "branches" / "second-try"))
        assert "iter_0000020" in moved, (root, moved)
        assert _committed_after(root, record["time"]) == [n for n in _committed_after(root, record["time"])
                                                          if int(n[5:]) <= 18], root
    answer = json.loads((where["save"] / ANSWER_NAME).read_text())
    assert answer["done"] and answer["source"] == "L0"
    # TensorBoard: the new branch logs to a run of its own.
    assert (tmp_path / "tb" / "branch-1").is_dir()


def test_live_rollback_to_a_version_only_on_l2_replays_bit_for_bit(tmp_path):
    """4 processes (TP2 x DP2, replicated optimizer: the flag crosses DP on the gradients' all-reduce);
    at iteration 20 back to 10, which only L2 holds (L0 keeps the last 4)."""
    args, where = job(tmp_path, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                                 "--global-batch-size", "8", "--train-iters", "22"])
    os.makedirs(where["save"])
    write_request(str(where["save"]), RollbackRequest.new(10))
    proc = run_pretrain(args, nproc=4, env={"GPT_CKPT_HOLD": "live-request:20"}, timeout=300)
    metrics = read_metrics_file(str(where["metrics"]))
    (rollback,) = metrics.rollbacks
    assert rollback["source"] == "L2", proc.stdout[-3000:]
    first, replay = losses_by_pass(metrics)
    for it in range(11, 21):
        assert replay[it] == first[it], it
    assert max(replay) == 22
    assert not [n for n in os.listdir(where["save"]) if n.startswith("iter_") and 10 < int(n[5:]) <= 20
                and os.stat(where["save"] / n / ".metadata").st_mtime < rollbacks(str(where["save"]))[0]["time"]]


def test_a_rank_killed_during_a_live_rollback_restarts_on_the_new_branch(tmp_path):
    """Killed after the rollback's record, before anything moved: the restart resumes at STEP (from
    L0), never from the abandoned 13 and 14 still beside it, and replays the first pass bit for bit."""
    args, where = job(tmp_path, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                                 "--global-batch-size", "4", "--train-iters", "16"])
    os.makedirs(where["save"])
    write_request(str(where["save"]), RollbackRequest.new(12))
    killed = run_pretrain(args, nproc=2, check=False,
                          env={"GPT_CKPT_HOLD": "live-request:14", "GPT_CKPT_FAULT": "rollback:kill:12:1"})
    assert killed.returncode != 0
    assert rollbacks(str(where["save"])), "the record is written before the kill point"
    proc = run_pretrain(args, nproc=2)
    assert "loaded iteration 12 from L0" in proc.stdout, proc.stdout[-3000:]
    first, resumed = losses_by_pass(read_metrics_file(str(where["metrics"])))
    assert min(resumed) == 13 and max(resumed) == 16
    for it in (13, 14):
        assert resumed[it] == first[it], it


@pytest.mark.parametrize("case", ["not-held", "malformed", "another-user", "another-job"])
def test_a_refused_live_request_leaves_training_going_on(tmp_path, case):
    """A step no level holds is refused naming the nearest held ones; a malformed request is refused
    with a message; another user's request file is not read; a request asked of another job (one
    that ended before it took it) is refused, not carried out by the next job on --save. In
    every case training goes on."""
    args, where = job(tmp_path, ["--micro-batch-size", "2", "--train-iters", "8"])
    save = where["save"]
    os.makedirs(save)
    request = save / "rollback-request.json"
    if case == "not-held":
        write_request(str(save), RollbackRequest.new(1))  # L0 holds 3..6, L2 5: 1 is nowhere
    elif case == "another-job":  # 5 is held: only whom it was asked of refuses it
        write_request(str(save), RollbackRequest.new(5, job="node-b:4242:2026-12-08 04:00:00 UTC"))
    else:
        request.write_text('{"step": "six", "id": "abc"}' if case == "malformed" else '{"step": 5, "id": "abc"}')
        os.chmod(request, 0o600)
        if case == "another-user":
            if os.getuid() != 0:
                pytest.skip("making a file another user's takes root")
            os.chown(request, 12345, 12345)
    proc = run_pretrain(args, env={"GPT_CKPT_HOLD": "live-request:6"})
    assert "live rollback request refused" in proc.stdout, proc.stdout[-2000:]
    metrics = read_metrics_file(str(where["metrics"]))
    assert not metrics.rollbacks and [r["iteration"] for r in metrics.iterations] == list(range(1, 9))
    assert not request.exists()
    answer = save / ANSWER_NAME
    if case == "not-held":
        message = json.loads(answer.read_text())["message"]
        assert not json.loads(answer.read_text())["done"] and "no level holds iteration 1" in message, message
        assert "nearest held: [" in message and "none at all" not in message, message
    elif case == "malformed":
        assert "the step must be an iteration" in json.loads(answer.read_text())["message"]
    elif case == "another-job":
        message = json.loads(answer.read_text())["message"]
        assert "asked of another job" in message and "node-b:4242" in message, message
    else:
        assert not answer.exists()  # not ours: not read, so not answered
        assert "owned by uid 12345" in proc.stdout
        assert any(n.startswith("rollback-request.json.refused-") for n in os.listdir(save))


SPIKE = ["--rollback-on-spike", "--rollback-distance", "3", "--skip-batches-on-rollback"]


def test_a_loss_spike_rolls_back_once_and_skips_what_it_states(tmp_path):
    """GPT_CKPT_INJECT_SPIKE=20: the job goes back to the newest version at or before 17, skips the
    batches up to 20, and ends bit for bit where a run told to skip those iterations ends."""
    args, where = job(tmp_path, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
                                 "--global-batch-size", "4", "--train-iters", "26"], SPIKE)
    proc = run_pretrain(args, nproc=2, env={"GPT_CKPT_INJECT_SPIKE": "20"})
    assert "loss spike at iteration 20" in proc.stdout, proc.stdout[-3000:]
    metrics = read_metrics_file(str(where["metrics"]))
    (rollback,) = metrics.rollbacks
    step, skipped = rollback["step"], rollback["skipped"]
    assert step <= 17 and skipped == list(range(step + 1, 21)), rollback
    first = {r["iteration"]: r["lm_loss"] for r in metrics.iterations if r["time"] < rollback["time"]}
    after = {r["iteration"]: r["lm_loss"] for r in metrics.iterations if r["time"] > rollback["time"]}
    assert sorted(after) == list(range(21, 27))  # the skipped iterations are not trained
    assert f"iteration {step + 1}: batch skipped" in proc.stdout
    reference = tmp_path / "reference.jsonl"
    run_pretrain(MODEL + ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2", "--global-batch-size", "4",
                          "--train-iters", "26", "--metrics-file", str(reference),
                          "--iterations-to-skip", *map(str, skipped)], nproc=2)
    (expected,) = losses_by_pass(read_metrics_file(str(reference)))
    assert sorted(expected) == [i for i in range(1, 27) if i not in skipped]
    for it in list(range(1, step + 1)) + list(range(21, 27)):
        assert (first if it <= step else after)[it] == expected[it], it


def test_more_spikes_than_max_rollbacks_stop_the_job_with_one_clear_error(tmp_path):
    args, where = job(tmp_path, ["--micro-batch-size", "2", "--train-iters", "24"], SPIKE + ["--max-rollbacks", "1"])
    # Held: at 12, version 9 is in L0 and 10 on L2 whatever the machine's speed (a busy machine
    # had left no version at or before 9, and the first spike went without a rollback)
    proc = run_pretrain(args, check=False, env={"GPT_CKPT_INJECT_SPIKE": "12,16", "GPT_CKPT_HOLD": "request"})
    assert proc.returncode != 0, proc.stdout[-4000:]
    assert "--max-rollbacks 1 reached" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(read_metrics_file(str(where["metrics"])).rollbacks) == 1
    # Nothing is lost: what was committed stays, and host memory keeps its versions for a restart.
    assert (where["save"] / "latest_checkpointed_iteration.txt").read_text().strip() == "15"
    assert "L0 pool" not in proc.stdout or "freed" not in proc.stdout
    assert any(os.scandir(where["shm"]))


def test_a_live_rollback_can_lower_the_lr_and_skip_batches_and_a_resume_keeps_skipping(tmp_path):
    """The new branch's LR schedule and skipped iterations come with the request; checkpoints
    record the skips, so a relaunch past them skips them too."""
    from trainer.lr_schedule import LRScheduleConfig, learning_rate

    args, where = job(tmp_path, ["--micro-batch-size", "2", "--train-iters", "9"], ["--tensorboard-dir",
                                                                                 str(tmp_path / "tb")])
    os.makedirs(where["save"])
    write_request(str(where["save"]), RollbackRequest.new(5, iterations_to_skip=(7, 11), settings=(("--lr", 1e-3),)))
    proc = run_pretrain(args, env={"GPT_CKPT_HOLD": "live-request:7"})
    assert "iteration 7: batch skipped" in proc.stdout, proc.stdout[-2000:]
    metrics = read_metrics_file(str(where["metrics"]))
    (rollback,) = metrics.rollbacks
    after = {r["iteration"]: r["learning_rate"] for r in metrics.iterations if r["time"] > rollback["time"]}
    assert sorted(after) == [6, 8, 9]
    lowered = LRScheduleConfig(lr=1e-3, decay_iters=9)
    for it, lr in after.items():
        assert lr == learning_rate(lowered, it), (it, lr)
    # From the final version, 9; the branch's schedule (--lr 1e-3) is the checkpoint's, not the command line's.
    relaunched = run_pretrain([a if a != "9" else "12" for a in args] + ["--use-checkpoint-opt_param-scheduler"])
    assert "loaded iteration 9" in relaunched.stdout and "iteration 11: batch skipped" in relaunched.stdout, \
        relaunched.stdout[-2000:]


def test_a_restart_right_after_a_live_rollback_keeps_the_new_branchs_skips(tmp_path):
    """Killed at the iteration boundary right after the rollback, before the new branch wrote a
    version: the step is described again in L0 with the branch's skips, and the restart skips them."""
    args, where = job(tmp_path, ["--micro-batch-size", "2", "--train-iters", "9"])
    os.makedirs(where["save"])
    write_request(str(where["save"]), RollbackRequest.new(5, iterations_to_skip=(6, 7)))
    killed = run_pretrain(args, check=False, env={"GPT_CKPT_HOLD": "live-request:7,request",
                                                  "GPT_CKPT_FAULT": "step:kill:8"})  # the branch's first step
    assert killed.returncode != 0 and rollbacks(str(where["save"]))
    proc = run_pretrain(args)
    assert "loaded iteration 5 from L0" in proc.stdout and "iteration 7: batch skipped" in proc.stdout, \
        proc.stdout[-2000:]
