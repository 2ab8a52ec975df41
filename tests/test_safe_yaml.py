"""Hostile config files: each failure is a ConfigError naming the file and what is wrong."""
import pytest

from slimtorch.errors import ConfigError
from slimtorch.safe_yaml import MAX_DEPTH, load_file, loads


@pytest.mark.parametrize("text,match", [
    ("a: 1\na: 2\n", r"duplicate key 'a' \(first given on line 1\)"),
    ("a: {b: 1, b: 2}", "duplicate key 'b'"),
    ("[" * 5000, "nested too deeply"),
    ("a: " + "[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2), f"deeper than {MAX_DEPTH}"),
    ("a: !!python/object/apply:os.system [ls]", "could not determine a constructor"),
    ("? [a, b]\n: 1", "mapping key must be a scalar"),
    ("a: [unclosed", "not valid YAML"),
])
def test_bad_documents(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        loads(text, "r.yaml")
    assert "r.yaml" in str(info.value)


def test_alias_bomb_refused_without_expanding():
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    with pytest.raises(ConfigError, match="expands to more than"):
        loads("\n".join(lines), "bomb.yaml")


def test_merge_keys_may_be_overridden_and_aliases_work():
    doc = loads("base: &b {lr: 0.1, epochs: 2}\ntrain: {<<: *b, lr: 0.2}\n")
    assert doc["train"] == {"lr": 0.2, "epochs": 2}


def test_files_non_utf8_and_size(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"seed: 0\nname: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 17\)"):
        load_file(p)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="too large"):
        load_file(big)
    with pytest.raises(ConfigError, match="not found"):
        load_file(tmp_path / "missing.yaml")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffseed: 3\n".encode())
    assert load_file(bom) == {"seed": 3}
