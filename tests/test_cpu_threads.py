from trainer.cpu_threads import prefer_passive_omp_waits


def test_copied_snapshots_make_openmp_wait_passively():
    for extra in (["--ckpt-snapshot", "copy"], ["--ckpt-snapshot=copy"], ["--bf16"]):
        env = {}
        assert prefer_passive_omp_waits(["pretrain_gpt.py", "--async-save", *extra], env), extra
        assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_zero_copy_snapshots_keep_openmps_default():
    """No copy thread competes with the OpenMP team: passive waits only slow training there
    (+13.6% against +6.0% with the default, results/bench_checkpoint_cpu.md, 2026-12-01)."""
    for argv in (["--async-save"], ["--async-save", "--ckpt-snapshot", "zero-copy"], ["--async-save", "--ckpt-snapshot", "auto"]):
        env = {}
        assert not prefer_passive_omp_waits(["pretrain_gpt.py", *argv], env), argv
        assert env == {}


def test_a_users_policy_and_runs_without_the_engine_are_left_alone():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not prefer_passive_omp_waits(["pretrain_gpt.py", "--async-save", "--ckpt-snapshot", "copy"], env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert not prefer_passive_omp_waits(["pretrain_gpt.py", "--save", "x", "--bf16"], env)
    assert env == {}
