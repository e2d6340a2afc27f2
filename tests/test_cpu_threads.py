from trainer.cpu_threads import prefer_passive_omp_waits


def test_async_save_makes_openmp_wait_passively():
    env = {}
    assert prefer_passive_omp_waits(["pretrain_gpt.py", "--async-save"], env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_a_users_policy_and_runs_without_the_engine_are_left_alone():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not prefer_passive_omp_waits(["pretrain_gpt.py", "--async-save"], env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert not prefer_passive_omp_waits(["pretrain_gpt.py", "--save", "x"], env)
    assert env == {}
