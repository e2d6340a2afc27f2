"""What ``scripts/prepare_data.py --input DIR`` reads of a folder: its text files, not the
bytecode, libraries or hidden files a source tree also holds."""

from trainer.prepare import iter_documents


def test_a_folder_gives_its_text_files_only(tmp_path):
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "b.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0binary")
    (tmp_path / "lib.so").write_bytes(b"\x7fELF\x02\x01\x01\0\0\0")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "c.txt").write_text("cached")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("d")
    assert list(iter_documents([str(tmp_path)])) == ["print('a')\n", "d"]


def test_a_file_named_on_the_command_line_is_read_whatever_it_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert list(iter_documents([str(path)])) == ["hello"]
