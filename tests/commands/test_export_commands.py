"""slimtorch report / export / bench on a packed MNIST CNN."""
import pytest
import torch

import slimtorch as st
from slimtorch.cli import main
from slimtorch.export import save_packed
from slimtorch.export.modelspec import zoo_spec
from slimtorch.models import build_model


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    torch.manual_seed(0)
    m = build_model("mnist_cnn")
    st.quantize_(m, st.LSQ(w_bits=4, a_bits=4), plan={"fc1": 2, "conv1": 8})
    st.calibrate(m, [torch.rand(8, 1, 28, 28)])
    path = tmp_path_factory.mktemp("cli") / "cnn.slim"
    save_packed(m, path, build=zoo_spec("mnist_cnn"))
    return path


def test_report_table_and_png(slim, capsys):
    assert main(["report", str(slim)]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "theory" in out and "(header + index)" in out and ": ok)" in out
    png = slim.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(slim), "--format", "json", "--no-png"]) == 0
    assert '"within_limit": true' in capsys.readouterr().out


def test_report_corrupt_file(slim, tmp_path, capsys):
    bad = tmp_path / "bad.slim"
    bad.write_bytes(slim.read_bytes()[:-3])
    assert main(["report", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_export_and_bench(slim, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "cnn.onnx"
    assert main(["export", str(slim), "--onnx", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert onnx_path.exists() and "max abs diff" in out and "argmax agreement" in out
    fast = tmp_path / "fast.onnx"
    assert main(["export", str(slim), "--onnx", str(fast), "--kernels", "ort", "--fuse-skip-layernorm"]) == 0
    assert "argmax agreement" in capsys.readouterr().out
    import onnx
    assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(str(fast)).graph.node}
    for f in (str(slim), str(onnx_path)):
        assert main(["bench", f, "--batch", "1", "4", "--runs", "3", "--warmup", "1"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1].split() == ["batch", "p50", "ms", "p90", "ms", "p99", "ms", "runs"]
        assert [ln.split()[0] for ln in lines[2:]] == ["1", "4"]
        assert main(["bench", f, "--batch", "2", "--runs", "3", "--warmup", "1", "--profile"]) == 0
        out = capsys.readouterr().out
        assert "batch 2: time per operator type" in out and "share" in out
