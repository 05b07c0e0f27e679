"""Outputs never delete what the user had: ``llamalab.fs``'s rules, and the commands that write folders."""

from __future__ import annotations

import os
import subprocess

import pytest

from llamalab.cli import main as cli
from llamalab.errors import DiskFullError
from llamalab.fs import OutputFolderError, atomic_write_dir, remove_stale_temps


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(files: dict[str, str]):
    def write(tmp):
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def test_a_folder_of_our_kind_is_replaced_whole_and_follows_the_umask(tmp_path):
    out = tmp_path / "out"
    atomic_write_dir(out, _write({"a.json": "1", "b.bin": "x"}), owned=("*.json", "*.bin"), what="thing")
    atomic_write_dir(out, _write({"a.json": "2"}), owned=("*.json", "*.bin"), what="thing")
    assert sorted(p.name for p in out.iterdir()) == ["a.json"] and (out / "a.json").read_text() == "2"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_foreign_files_stop_the_write_and_force_writes_beside_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "a.json").write_text("old")
    with pytest.raises(OutputFolderError, match=r"out: not empty and not a llamalab thing \(it holds notes.txt\)"):
        atomic_write_dir(out, _write({"a.json": "new"}), owned=("*.json",), what="thing")
    assert (out / "a.json").read_text() == "old" and (out / "notes.txt").read_text() == "mine"
    atomic_write_dir(out, _write({"a.json": "new"}), owned=("*.json",), what="thing", force=True)
    assert (out / "a.json").read_text() == "new" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writers_temp_folders_go_and_a_live_ones_stay(tmp_path):
    final = tmp_path / "final"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [tmp_path / f".final.tmp-{dead.pid}-abc", tmp_path / ".final.tmp-legacy", tmp_path / f".final.old-{dead.pid}"]
    alive = tmp_path / f".final.tmp-{os.getppid()}-xyz"
    for folder in [*left, alive]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
    assert sorted(remove_stale_temps(final)) == sorted(left)
    assert [p.name for p in tmp_path.iterdir()] == [alive.name]


def test_a_full_disk_names_the_folder_and_leaves_the_old_output(tmpfs):
    tiny_disk = tmpfs("256k")
    out = tiny_disk / "out"
    atomic_write_dir(out, _write({"a.json": "old"}), owned=("*.json",), what="thing")
    big = {"a.json": "x" * 400_000}
    with pytest.raises(DiskFullError, match=r"tmpfs0: disk full while writing \(about 390.6 KiB needed, .* free\)"):
        atomic_write_dir(out, _write(big), owned=("*.json",), what="thing", size_hint=400_000)
    assert (out / "a.json").read_text() == "old"
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["out"]


def test_tokenizer_train_never_writes_into_a_foreign_folder(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of a small corpus with words and 123 digits" for i in range(300)))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "draft.md").write_text("mine")
    status = cli(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--output", str(mine)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("llamalab tokenizer train: error:") and "\n" not in err
    assert "not a llamalab tokenizer folder" in err and "draft.md" in err
    assert [p.name for p in mine.iterdir()] == ["draft.md"]
    assert cli(["tokenizer", "train", "--input", str(text), "--vocab-size", "300", "--output", str(mine),
                "--force"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["draft.md", "tokenizer.model"]
    assert (mine / "draft.md").read_text() == "mine"


@pytest.fixture
def native(tmp_path):
    from llamalab.checkpoint import save_pretrained
    from llamalab.model import ModelArgs, build_model

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)
    return save_pretrained(tmp_path / "native", build_model(args, seed=0))


def test_convert_into_a_foreign_folder_needs_force_and_keeps_its_files(native, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert cli(["convert", str(native), str(mine), "--to", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llamalab convert: error:") and "not a llamalab Hugging Face model folder" in err
    assert "notes.txt" in err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert cli(["convert", str(native), str(mine), "--to", "hf", "--force"]) == 0
    assert {"notes.txt", "config.json", "model.safetensors"} <= {p.name for p in mine.iterdir()}
    assert (mine / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_convert_replaces_only_a_file_of_its_own_format(native, tmp_path, capsys):
    from llamalab.convert.detect import detect_format

    target = tmp_path / "model.bin"
    target.write_text("my notes, not a model")
    assert cli(["convert", str(native), str(target), "--to", "llama2c"]) == 2
    assert "exists and is not a llama2c file" in capsys.readouterr().err
    assert target.read_text() == "my notes, not a model"
    assert cli(["convert", str(native), str(target), "--to", "llama2c", "--force"]) == 0
    assert detect_format(target) == "llama2c"
    assert cli(["convert", str(native), str(target), "--to", "llama2c"]) == 0  # its own format: replaced
