"""Bad packed files give a CheckpointError that names the problem; never a silently wrong model."""
import json
import pickle
import struct

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.errors import CheckpointError
from slimtorch.export import load_packed, save_packed
from slimtorch.export.container import ZPREFIX, decode_text, encode_text, read_container, write_container


def net(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 36, 10))


@pytest.fixture
def packed(tmp_path):
    m = net()
    st.quantize_(m, st.LSQ(w_bits=3, a_bits=4))
    st.calibrate(m, [torch.randn(8, 1, 8, 8)])
    path = tmp_path / "m.slim"
    save_packed(m, path)
    return path


def rewrite(path, edit):
    """Re-write a valid file after ``edit(meta, tensors)`` (checksums recomputed: only the edit is wrong)."""
    meta, tensors, _ = read_container(path)
    meta.pop("crc32")
    edit(meta, tensors)
    write_container(path, tensors, meta)


def load(path):
    return load_packed(path, net)


def test_valid_file_loads(packed):
    load(packed)


def test_truncated(packed):
    data = packed.read_bytes()
    packed.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load(packed)
    packed.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(packed)
    packed.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty or truncated"):
        load(packed)


def raw_header(path):
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path, head, data):
    hb = json.dumps(head, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_flipped_data_byte_names_the_tensor(packed):
    good = packed.read_bytes()
    head, data = raw_header(packed)
    start = len(good) - len(data)                      # where the data section begins
    for tensor, pattern in (("3.w_codes", r"3\.w_codes"), ("params", r"params")):
        data = bytearray(good)
        data[start + head[tensor]["data_offsets"][0] + 1] ^= 0x01
        packed.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=r"data is corrupt.*damaged tensor\(s\): " + pattern):
            load(packed)


def test_flipped_header_byte(packed):
    good = packed.read_bytes()
    head, data = raw_header(packed)
    text = head["__metadata__"]["slimtorch.packed"]
    assert text.startswith(ZPREFIX)                   # compressed format text (version 2)
    i = len(text) // 2                                 # one base64 digit changed: still base64
    head["__metadata__"]["slimtorch.packed"] = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1:]
    write_raw(packed, head, data)
    with pytest.raises(CheckpointError, match="header is corrupt"):
        load(packed)
    # a well-formed edit (bits 3 -> 5, validly re-compressed) is caught by the header SHA-256 alone
    meta = decode_text(text)
    meta["layers"][0]["bits"] = 5
    head["__metadata__"]["slimtorch.packed"] = encode_text(meta)
    write_raw(packed, head, data)
    with pytest.raises(CheckpointError, match="header is corrupt: SHA-256"):
        load(packed)
    packed.write_bytes(good)                           # an edit of the tensor index
    head, data = raw_header(packed)
    head["3.w_codes"]["dtype"] = "I8"                  # same size, so only the digest can tell
    write_raw(packed, head, data)
    with pytest.raises(CheckpointError, match="header is corrupt: SHA-256"):
        load(packed)


def test_wrong_version_and_format(packed):
    good = packed.read_bytes()
    rewrite(packed, lambda meta, t: meta.update(version=99))
    with pytest.raises(CheckpointError, match="version 99.*upgrade"):
        load(packed)
    packed.write_bytes(good)
    rewrite(packed, lambda meta, t: meta.update(format="other"))
    with pytest.raises(CheckpointError, match="format 'other'"):
        load(packed)


def test_header_names_missing_tensor(packed):
    rewrite(packed, lambda meta, t: t.pop("3.w_codes"))
    with pytest.raises(CheckpointError, match=r"'3\.w_codes'.*does not contain"):
        load(packed)


def test_shape_mismatch_in_file_and_model(packed):
    good = packed.read_bytes()
    rewrite(packed, lambda meta, t: t.update({"3.w_codes": t["3.w_codes"][:-1]}))
    with pytest.raises(CheckpointError, match="need"):
        load(packed)
    packed.write_bytes(good)
    rewrite(packed, lambda meta, t: t.update({"3.w_codes": torch.cat([t["3.w_codes"], t["3.w_codes"][:1]])}))
    with pytest.raises(CheckpointError, match=r"3\.w_codes holds .* need"):
        load(packed)
    packed.write_bytes(good)
    rewrite(packed, lambda meta, t: t.update({"params": t["params"][:-1]}))  # one value short
    with pytest.raises(CheckpointError, match=r"tensor params holds (\d+) values, its header entries need (?!\1)\d+"):
        load(packed)


def test_model_does_not_match_file(packed):
    with pytest.raises(CheckpointError, match=r"layer '0' weight shape \[4, 1, 3, 3\] in the file, \[5, 1, 3, 3\]"):
        load_packed(packed, lambda: net(width=5))
    with pytest.raises(CheckpointError, match="no such module"):
        load_packed(packed, lambda: nn.Sequential(nn.Conv2d(1, 4, 3)))


def test_not_a_packed_file(tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(pickle.dumps({"a": 1}))              # a pickle is never unpickled
    with pytest.raises(CheckpointError, match="not a (slimtorch packed model|safetensors)"):
        load(p)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="no 'slimtorch.packed' metadata"):
        load(p)
    head = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    p.write_bytes(struct.pack("<Q", len(head)) + head[:-1] + b"!" + bytes(8))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.slim")


def test_compressed_header_size_is_capped(packed, monkeypatch):
    from slimtorch.export import container
    monkeypatch.setattr(container, "MAX_TEXT", 100)     # a decompression bomb is refused, not expanded
    with pytest.raises(CheckpointError, match=r"header is corrupt: .*not valid \(compressed\) JSON"):
        load(packed)
