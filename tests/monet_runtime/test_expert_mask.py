"""ExpertMask: set algebra (property-based), JSON / binary / table forms, validation."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monet_runtime import ExpertMask, MaskError, load_model

E = 24
pairs = st.lists(st.tuples(st.integers(0, 3), st.integers(0, E - 1), st.integers(0, E - 1)),
                 max_size=60)


def build(triples) -> ExpertMask:
    layers: dict[int, list] = {}
    for layer, i, j in triples:
        layers.setdefault(layer, []).append([i, j])
    return ExpertMask(layers)


@settings(max_examples=60, deadline=None)
@given(pairs, pairs)
def test_set_algebra_matches_python_sets(a, b):
    ma, mb = build(a), build(b)
    sa, sb = set(a), set(b)
    assert set(ma) == sa and len(ma) == len(sa) == ma.size
    assert set(ma | mb) == sa | sb
    assert set(ma & mb) == sa & sb
    assert set(ma - mb) == sa - sb
    assert (ma | mb) == (mb | ma) and hash(ma | mb) == hash(mb | ma)
    for triple in list(sa)[:5]:
        assert triple in ma


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_json_binary_and_table_round_trips(a):
    mask = build(a)
    assert ExpertMask.from_json(mask.to_json()) == mask
    assert ExpertMask.from_json(json.loads(mask.to_json())) == mask
    assert ExpertMask.from_bytes(mask.to_bytes(E)) == mask
    assert ExpertMask.from_bytes(mask.to_bytes(E)).num_experts == E
    table = mask.to_table(num_layers=4, num_experts=E)
    assert table.dtype == torch.int32 and table.shape == (4, (E * E + 31) // 32)
    bits = np.unpackbits(table.numpy().view(np.uint8), axis=1, bitorder="little")[:, :E * E]
    assert {(l, n // E, n % E) for l, n in zip(*np.nonzero(bits))} == set(a)


def test_fixture_mask_json(tiny_fixture):
    mask = ExpertMask.from_json(tiny_fixture / "mask.json")
    raw = json.loads((tiny_fixture / "mask.json").read_text())
    assert len(mask) == sum(len(entry["experts"]) for entry in raw["layers"])
    assert mask.layers == [0, 1, 2, 3]
    assert (0, 0, 9) in mask and (0, 0, 8) not in mask
    # about 15% of each layer's 256 composite experts
    assert all(0.1 < len(mask.experts(l)) / 256 < 0.2 for l in mask.layers)


@pytest.mark.parametrize("data,message", [
    ({"layer": []}, "must be"),
    ({"layers": [{"layer": 0}]}, r"layers\[0\] must have 'layer' and 'experts'"),
    ({"layers": [{"layer": "0", "experts": []}]}, r"layers\[0\]\.layer must be an integer"),
    ({"layers": [{"layer": 0, "experts": [[1, 2, 3]]}]}, r"layers\[0\]\.experts must be"),
    ({"layers": [{"layer": 0, "experts": [[1, -2]]}]}, r"\[0, 2\^31\)"),
    ({"layers": [{"layer": 0, "experts": [[1.5, 2]]}]}, r"layers\[0\]\.experts must be"),
    ({"layers": [{"layer": 0, "experts": []}, {"layer": 0, "experts": []}]}, "listed twice"),
])
def test_bad_json(data, message):
    with pytest.raises(MaskError, match=message):
        ExpertMask.from_json(data)


def test_validation_against_model(tiny_fixture):
    model = load_model(tiny_fixture / "model")
    with pytest.raises(MaskError, match="names layer 4, model has 4 layers"):
        model(torch.tensor([[1, 2]]), mask=ExpertMask({4: [[0, 0]]}))
    with pytest.raises(MaskError, match="expert index 16 out of range for E=16"):
        model(torch.tensor([[1, 2]]), mask=ExpertMask({0: [[16, 0]]}))
    with pytest.raises(MaskError, match="mask is for E=512"):
        ExpertMask({0: [[1, 1]]}, num_experts=512).validate(num_layers=4, num_experts=16)
    with pytest.raises(MaskError, match="out of range for E=8"):
        ExpertMask({0: [[9, 1]]}, num_experts=8)


def test_binary_form_is_compact_and_checked():
    E = 512
    rng = np.random.default_rng(0)
    mask = ExpertMask({l: np.argwhere(rng.random((E, E)) < 0.2) for l in range(2)})
    data = mask.to_bytes(E)
    assert len(data) < 2 * E * E / 8 * 1.05  # about a bit per composite expert
    assert ExpertMask.from_bytes(data) == mask
    with pytest.raises(MaskError, match="needs num_experts"):
        ExpertMask({0: [[1, 1]]}).to_bytes()
    for broken in (data[:5], b"NOTAMASK" + data[8:], data + b"x", data[:-10]):
        with pytest.raises(MaskError):
            ExpertMask.from_bytes(broken)


def _binary(E: int, layers: list[tuple[int, bytes]]) -> bytes:
    import struct
    import zlib

    data = struct.pack("<8sHII", b"MONETMSK", 1, E, len(layers))
    for layer, bits in layers:
        payload = zlib.compress(bits, 9)
        data += struct.pack("<II", layer, len(payload)) + payload
    return data


@pytest.mark.parametrize("layers,E,shape,message", [
    ([(0, bytes(64 << 20))], 16, {}, "larger than the 32 bytes"),  # a 64 MiB zlib bomb
    ([(0, bytes(32)), (0, bytes(32))], 16, {}, "layer 0 twice"),
    ([(3, bytes(32))], 16, {"num_layers": 3}, "names layer 3"),
    ([(0, bytes(32))] * 4, 16, {"num_layers": 3}, "4 layers, model has 3"),
    ([(0, bytes(31))], 16, {}, "31 bytes is not the 32"),
    ([(0, bytes(32))], 16, {"num_experts": 8}, "E=16, model has E=8"),
    ([(0, bytes(1 << 21))], 1 << 13, {}, "outside"),  # E above MAX_EXPERTS, shape unknown
])
def test_binary_form_is_bounded_by_the_model_shape(layers, E, shape, message):
    """from_bytes never inflates past E*E/8 bytes a layer, whatever the payload claims."""
    with pytest.raises(MaskError, match=message):
        ExpertMask.from_bytes(_binary(E, layers), **shape)


def test_binary_form_with_the_shape_reads_back():
    mask = ExpertMask({0: [[1, 2]], 2: [[15, 15]]}, num_experts=16)
    assert ExpertMask.from_bytes(mask.to_bytes(), num_layers=3, num_experts=16) == mask
