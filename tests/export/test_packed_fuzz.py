"""Fuzzing the packed loader: any header edit (re-written with valid checksums), byte flip or
truncation either loads to the original model or raises a CheckpointError naming the file; a hostile
header is refused without allocating what it asks for."""
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtorch.errors import CheckpointError
from slimtorch.export import file_report, load_packed
from slimtorch.export.packed_mutate import (OPS, flip_byte, hostile_header, mutate, paths, peak_memory_mb,
                                            replacements, run_case, tiny_net, tiny_packed, truncate, write_mutant)


def fuzz(n):
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


net = tiny_net


class Case:
    """One small LSQ+ model packed once (packed_mutate.tiny_packed) and its header paths."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="slim-fuzz-"))
        self.__dict__.update(tiny_packed(self.dir))
        self.paths = [p for p in paths(self.meta) if p != ("crc32",)]

    def check(self, path):
        outcome, msg = run_case(path, net, self.inputs, self.want, self.report)
        assert outcome in ("named_error", "accepted_ok"), (outcome, msg)
        return outcome


CASE = Case()


def test_original_loads_unchanged():
    assert CASE.check(CASE.path) == "accepted_ok"


@fuzz(250)
@given(st.data())
def test_header_mutations(data):
    path = data.draw(st.sampled_from(CASE.paths), "path")
    op = data.draw(st.sampled_from(OPS), "op")
    v = CASE.meta
    for k in path:
        v = v[k]
    value = data.draw(st.sampled_from(replacements(v)), "value") if op == "replace" else None
    out = write_mutant(CASE.path, CASE.dir / "mut.slim", lambda meta: mutate(meta, path, op, value))
    CASE.check(out)


@fuzz(60)
@given(st.integers(0, 1 << 20), st.booleans())
def test_byte_flips_are_refused(pos, data_only):
    out = flip_byte(CASE.path, CASE.dir / "flip.slim", pos, data_only)
    with pytest.raises(CheckpointError, match="corrupt|truncated|not a slimtorch|not valid"):
        load_packed(out, net)
    with pytest.raises(CheckpointError):
        file_report(out)


@fuzz(30)
@given(st.integers(0, 1 << 20))
def test_truncations_are_refused(keep):
    out = truncate(CASE.path, CASE.dir / "cut.slim", keep)
    with pytest.raises(CheckpointError):
        load_packed(out, net)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["layers"].__setitem__(0, 5), r"layers\[0\]"),
    (lambda m: m.update(layers=5), r"layers"),
    (lambda m: m.update(quantizers=5), r"quantizers"),
    (lambda m: m["layers"][1].update(aq=False), r"layers\[1\]\.aq"),
    (lambda m: m["quantizers"][0]["spec"].update(narrow="yes"), r"quantizers\[0\]\.spec\.narrow"),
    (lambda m: m["layers"][1].update(shape=[10, -144]), r"layers\[1\]\.shape\[1\]"),
    (lambda m: m["theory"].pop("bytes"), r"theory\.bytes: Field required"),
    (lambda m: m.pop("theory"), r"theory"),
    (lambda m: m["layers"][0].update(wq=7), r"layers\[0\]\.wq: .*quantizer 7, the header lists \d+"),
    (lambda m: m["layers"][0].update(aq=0), r"layers\[0\]\.aq: quantizer 0 is a weight quantizer"),
    (lambda m: m["costs"][0].__setitem__(2, None), r"costs\[0\]\[2\]"),
])
def test_edited_header_names_file_and_field(edit, field, tmp_path):
    def apply(meta):
        edit(meta)
        return meta
    out = write_mutant(CASE.path, tmp_path / "e.slim", apply)
    for fn in (lambda: load_packed(out, net), lambda: file_report(out)):
        with pytest.raises(CheckpointError, match=rf"{out}: {field}"):
            fn()


def test_hostile_header_allocates_little(tmp_path):
    out = hostile_header(CASE.path, tmp_path / "h.slim", 250_000_000)
    with pytest.raises(CheckpointError, match=r"quantizers\[0\]\.spec\.scale_shape: (asks for 250000000|\[250000000\] fits neither)"):
        load_packed(out, net)
    mem = peak_memory_mb(lambda: load_packed(out, net))
    assert mem["tracemalloc_mb"] < 4, mem
    assert mem["rss_peak_rise_mb"] is None or mem["rss_peak_rise_mb"] < 64, mem


def test_cli_report_refuses_edited_header(tmp_path, capsys):
    from slimtorch.cli import main
    out = write_mutant(CASE.path, tmp_path / "e.slim", lambda m: {k: v for k, v in m.items() if k != "theory"})
    assert main(["report", str(out), "--no-png"]) == 2
    assert "theory: Field required" in capsys.readouterr().err


def test_reliability_benchmark_runs():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "reliability_packed", Path(__file__).parents[2] / "benchmarks" / "reliability_packed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(n=20, seed=1)
    assert sum(r["counts"].values()) == 20 and r["counts"]["raw_exception"] == 0, r
    assert r["peak_mb_hostile_header"] < 4
