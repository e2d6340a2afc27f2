"""What a new user reads in the first hour, as Megatron-LM users read it: the console line's
means over the log interval, validation perplexity, a line per committed checkpoint, a trace
that a resume does not overwrite."""

import json
import math
import re

import pytest

from tests.launch import TINY, read_scalars, run_pretrain

pytestmark = pytest.mark.slow

ARGS = TINY + ["--vocab-size", "1024", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
               "--lr", "1e-3", "--log-interval", "5"]


def test_the_console_line_is_the_mean_over_the_log_interval_with_validation_perplexity(tmp_path):
    proc = run_pretrain(ARGS + ["--train-iters", "10", "--tensorboard-dir", str(tmp_path / "tb"),
                                "--eval-interval", "10", "--eval-iters", "1"])
    per_iteration = read_scalars(tmp_path / "tb", "lm loss")  # float32 in the event file
    for line in proc.stdout.splitlines():
        match = re.search(r"iteration +(\d+)/.*\| lm loss: (\S+) .*number of skipped iterations: +(\d+)", line)
        if match:
            it, logged = int(match.group(1)), float(match.group(2))
            mean = sum(per_iteration[i] for i in range(it - 4, it + 1)) / 5
            assert math.isclose(logged, mean, rel_tol=1e-6), (it, logged, mean)
            assert per_iteration[it] != pytest.approx(logged, rel=1e-9)  # not the iteration's own
            assert match.group(3) == "0"
    assert len(re.findall(r"\| lm loss: ", proc.stdout)) == 2
    match = re.search(r"validation loss at iteration 10 \| lm loss value: (\S+) \| lm loss PPL: (\S+)", proc.stdout)
    assert match and math.isclose(float(match.group(2)), math.exp(float(match.group(1))), rel_tol=1e-5), proc.stdout


def test_each_committed_checkpoint_gets_a_line_and_a_resume_keeps_the_earlier_trace(tmp_path):
    save, trace = tmp_path / "ckpt", tmp_path / "trace"
    common = ARGS + ["--save", str(save), "--load", str(save), "--async-save", "--save-interval", "1",
                     "--ckpt-persistent-interval", "3", "--trace-dir", str(trace), "--lr-decay-iters", "8"]
    first = run_pretrain(common + ["--train-iters", "6"])
    saved = re.findall(r"saved checkpoint at iteration +(\d+) to L2", first.stdout)
    assert "6" in saved and set(saved) <= {"3", "6"}, first.stdout[-2000:]
    run_pretrain(common + ["--train-iters", "8"])
    assert (trace / "rank0.json").exists() and (trace / "rank0-run1.json").exists()


def test_an_error_raised_on_purpose_is_said_once_by_rank_0_without_a_traceback(tmp_path):
    """...and torchrun hears it: the ranks leave the line in its error file (one path for both
    here; the first writes it), which its failure table shows as the root cause."""
    (tmp_path / "ckpt").mkdir()
    error_file = tmp_path / "error.json"
    proc = run_pretrain(ARGS + ["--tensor-model-parallel-size", "2", "--train-iters", "2", "--load",
                                str(tmp_path / "ckpt"), "--ckpt-step", "7"], nproc=2, check=False,
                        env={"TORCHELASTIC_ERROR_FILE": str(error_file)})
    assert proc.returncode != 0
    assert proc.stderr.count("--ckpt-step 7: no committed checkpoint") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "nearest held: none at all" in proc.stderr, proc.stderr
    told = json.loads(error_file.read_text())["message"]["message"]
    assert told.startswith("pretrain_gpt.py: error: ") and "--ckpt-step 7: no committed checkpoint" in told



def test_a_blend_of_two_prefixes_resumes_bit_for_bit(tmp_path):
    from tokenization.tokenizer import ByteTokenizer
    from trainer.prepare import build_indexed_dataset

    for name, text in (("a", "the cat sat on the mat. " * 300), ("b", "a dog ran in the fog. " * 300)):
        build_indexed_dataset(iter([text]), ByteTokenizer(), str(tmp_path / name))
    common = TINY + ["--data-path", "0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b"), "--micro-batch-size", "2",
                     "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--train-iters", "6"]
    run_pretrain(common + ["--tensorboard-dir", str(tmp_path / "tb1"), "--save", str(tmp_path / "ckpt"),
                           "--save-interval", "3", "--exit-interval", "3"])
    run_pretrain(common + ["--tensorboard-dir", str(tmp_path / "tb2"), "--load", str(tmp_path / "ckpt")])
    run_pretrain(common + ["--tensorboard-dir", str(tmp_path / "tb3")])
    resumed, whole = read_scalars(tmp_path / "tb2", "lm loss"), read_scalars(tmp_path / "tb3", "lm loss")
    assert sorted(resumed) == [4, 5, 6]
    for it in resumed:
        assert resumed[it] == whole[it], it


def test_a_resume_with_another_lr_schedule_is_refused_unless_told_which_wins(tmp_path):
    from trainer.lr_schedule import LRScheduleConfig, learning_rate

    save = tmp_path / "ckpt"
    schedule = ["--lr-decay-style", "cosine", "--min-lr", "3e-4", "--lr-decay-iters", "8"]
    run_pretrain(ARGS + schedule + ["--train-iters", "4", "--save", str(save), "--save-interval", "4"])
    resume = ARGS + ["--train-iters", "6", "--load", str(save), "--log-interval", "1"]
    refused = run_pretrain(resume, check=False)  # the schedule flags left out: linear to 0 over 6
    assert refused.returncode != 0, refused.stdout[-2000:]
    assert "--lr-decay-style: cosine saved, linear now" in refused.stderr and "--min-lr: 0.0003 saved, 0.0 now" in \
        refused.stderr, refused.stderr
    taken = run_pretrain(resume + ["--use-checkpoint-opt_param-scheduler", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert "the LR schedule is the checkpoint's" in taken.stdout
    from trainer.metrics_file import read_metrics_file

    saved = LRScheduleConfig(lr=1e-3, min_lr=3e-4, decay_iters=8, decay_style="cosine")
    for record in read_metrics_file(str(tmp_path / "m.jsonl")).iterations:
        assert record["learning_rate"] == learning_rate(saved, record["iteration"])
    overridden = run_pretrain(resume + ["--override-opt_param-scheduler"])
    assert "the LR schedule is this run's" in overridden.stdout


def test_old_data_read_with_too_small_a_vocabulary_stops_with_the_prefix_named(tmp_path):
    """Prepared before records (no PREFIX.tokenizer.json): it trains with a warning, and the ids
    past a too-small vocabulary stop the job with one line naming the prefix, not an IndexError."""
    from tests.launch import script

    prefix = tmp_path / "old"
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    script("prepare_data.py", "--input", str(tmp_path / "text.txt"), "--output-prefix", str(prefix))
    (tmp_path / "old.tokenizer.json").unlink()
    args = TINY + ["--data-path", str(prefix), "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "2"]
    proc = run_pretrain(args, check=False)
    assert proc.returncode != 0
    assert f"WARNING: --data-path {prefix} has no record of the tokenizer" in proc.stdout, proc.stdout[-2000:]
    assert f"error on rank 0: --data-path {prefix}: token id" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr
