"""`llamalab convert`: format detection and a chain through every format back to the original weights."""

from __future__ import annotations

import pytest
from convert_helpers import assert_same_tensors

from llamalab.cli import main
from llamalab.convert.detect import detect_format


def test_chain_through_every_format(tmp_path, stories, capsys):
    folder, native = stories
    steps = [(folder / "stories260K.bin", "a", "native"), ("a", "b-hf", "hf"), ("b-hf", "c-meta", "meta"),
             ("c-meta", "d.gguf", "gguf"), ("d.gguf", "e.bin", "llama2c"), ("e.bin", "f", "native")]
    expected = ["llama2c", "native", "hf", "meta", "gguf", "llama2c"]
    for (src, dst, to), fmt in zip(steps, expected):
        src = src if isinstance(src, type(folder)) else tmp_path / src
        assert detect_format(src) == fmt
        extra = ["--max-seq-len", "512"] if fmt == "meta" else []
        assert main(["convert", str(src), str(tmp_path / dst), "--to", to, *extra]) == 0
    out = capsys.readouterr().out
    assert "reading" in out and "wrote native:" in out
    assert_same_tensors(native, tmp_path / "f")
    assert (tmp_path / "e.bin").read_bytes() == (folder / "stories260K.bin").read_bytes()


def test_dtype_and_errors(tmp_path, native_dir, capsys):
    assert main(["convert", str(native_dir), str(tmp_path / "h"), "--to", "native", "--dtype", "bf16"]) == 0
    from llamalab.checkpoint import load_model

    assert str(load_model(tmp_path / "h")[0].output.weight.dtype) == "torch.bfloat16"
    assert main(["convert", str(native_dir), str(tmp_path / "x.bin"), "--to", "llama2c", "--dtype", "f16"]) == 2
    assert "float32 only" in capsys.readouterr().err
    (tmp_path / "junk").write_text("hello")
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "y"), "--to", "hf"]) == 2
    assert "junk: neither GGUF" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(native_dir), str(tmp_path / "z"), "--to", "onnx"])
