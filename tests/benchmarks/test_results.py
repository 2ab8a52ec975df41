"""benchmarks/results.py: the Command line of a RESULTS section names paths relative to the repo."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_results", ROOT / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def test_script_path_and_arguments_made_relative(tmp_path):
    root = tmp_path / "checkout"
    (root / "benchmarks").mkdir(parents=True)
    argv = [str(root / "benchmarks" / "lsq_qat.py"), "--out", str(root / "runs" / "x"), "--seeds", "3",
            "/elsewhere/data"]
    assert results.command_line(argv, root=root) == \
        "python benchmarks/lsq_qat.py --out runs/x --seeds 3 /elsewhere/data"


def test_module_invocation():
    assert results.command_line(["/abs/benchmarks/uhlich_toy.py", "--part", "a"], module="benchmarks.uhlich_toy") \
        == "python -m benchmarks.uhlich_toy --part a"


def test_results_file_has_no_absolute_checkout_paths():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("_Command:_")]
    assert commands and not any("`python /" in c for c in commands)
    assert results.ROOT == ROOT
