"""What a trainer leaves torchrun when it stops on an error raised on purpose: its one line, as the
root cause of torchrun's failure table (read here by torch's own ``ProcessFailure``)."""

import json
import os

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from trainer.process_life import tell_launcher

LINE = "pretrain_gpt.py: error: the following arguments are required: --lr"


def test_torchruns_failure_table_names_the_line_as_the_root_cause(tmp_path):
    path = tmp_path / "error.json"
    assert tell_launcher(LINE, {"TORCHELASTIC_ERROR_FILE": str(path)})
    assert os.stat(path).st_mode & 0o777 == 0o600
    failure = ProcessFailure(local_rank=0, pid=1234, exitcode=2, error_file=str(path))
    table = ChildFailedError("scripts/pretrain_gpt.py", {0: failure}).format_msg()
    assert f"traceback : {LINE}" in table and "To enable traceback" not in table, table


def test_nothing_is_written_outside_torchrun_over_another_file_or_through_a_link(tmp_path):
    assert not tell_launcher(LINE, {})
    taken = tmp_path / "taken.json"
    taken.write_text('{"message": "the first writer"}')
    assert not tell_launcher(LINE, {"TORCHELASTIC_ERROR_FILE": str(taken)})
    assert json.loads(taken.read_text()) == {"message": "the first writer"}
    target = tmp_path / "elsewhere"
    (tmp_path / "link.json").symlink_to(target)
    assert not tell_launcher(LINE, {"TORCHELASTIC_ERROR_FILE": str(tmp_path / "link.json")})
    assert not target.exists()
