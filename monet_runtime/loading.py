"""Load a MONET checkpoint: a Hugging Face directory with config.json and safetensors weights.

The model is built on the meta device, its packed tables (model.PACKED: the q, k, v weights
stacked, the experts' v weights and biases in the sparse path's layout) are allocated, and each
tensor is read once, with plain file reads straight into memory the model owns (a packed
table's view, converted to the requested dtype as need be) and assigned: peak memory is the
model's size plus one tensor. (A memory-mapped tensor would count twice: its file pages stay
resident beside the packed copy.)
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from monet_runtime.config import ConfigError, MonetConfig
from monet_runtime.model import MonetForCausalLM, empty_packed_tables
from monet_runtime.tokenizer import load_tokenizer

__all__ = ["CheckpointError", "checkpoint_identity", "load_model", "model_identity",
           "save_checkpoint"]

# Router statistics stay float32 whatever the model dtype: the router runs in float32.
_FLOAT32_SUFFIXES = (".running_mean", ".running_var")
_OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint directory whose files do not describe the configured model."""


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.exists():
                raise CheckpointError(f"{index} names a missing shard {shard.name}")
        return files
    if single.exists():
        return {name: single for name in _shapes(single)}
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def model_identity(config: MonetConfig, shapes: dict[str, tuple[int, ...]]) -> str:
    """A model's identity: hash of its config's computational fields and tensor names/shapes."""
    digest = hashlib.sha256(config.shape_digest().encode())
    for name in sorted(shapes):
        digest.update(f"{name}:{list(shapes[name])}".encode())
    return f"monet-{digest.hexdigest()[:16]}"


def checkpoint_identity(path: str | Path) -> str:
    """The identity load_model gives a checkpoint, from its config and tensor shapes only
    (for an engine that loads the weights itself, as vLLM does)."""
    files = _weight_files(Path(path))
    shapes = {}
    for file in set(files.values()):
        shapes.update(_shapes(file))
    return model_identity(MonetConfig.from_file(path), shapes)


def _expected_tensors(model: MonetForCausalLM) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16,
           "F16": torch.float16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


def _header(file: Path, f) -> tuple[int, dict[str, _Entry]]:
    """(offset of the data, {name: entry}) of an open safetensors file. Every entry is checked
    here, before anything is read: a known dtype, dimensions >= 0, and an extent of exactly the
    bytes its shape needs inside the file."""
    size = file.stat().st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{file} is not a safetensors file (truncated)")
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, 100 << 20):
        raise CheckpointError(f"{file} is not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: safetensors header is corrupt: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not an object")
    header.pop("__metadata__", None)
    start, entries = 8 + n, {}
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: tensor {name} has a bad header entry ({e!r})"
                                  ) from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes \
                or start + end > size:
            raise CheckpointError(f"{file}: tensor {name} has {end - begin} bytes at {begin}, "
                                  f"its shape {list(shape)} and dtype need {nbytes} inside the "
                                  "file")
        entries[name] = _Entry(dtype, shape, begin, end)
    return start, entries


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with open(file, "rb") as f:
        _, entries = _header(file, f)
    return {name: entry.shape for name, entry in entries.items()}


def _read_into(f, start: int, entry: _Entry, dest: torch.Tensor, scratch: list) -> None:
    """One tensor read into `dest`, memory the model owns (no memory map): straight into it
    when it is a contiguous CPU tensor of the stored dtype; else into a scratch buffer reused
    across tensors, then copied (converted, into a packed table's view, or to the device; a
    fresh buffer per tensor would stay in the process's heap after it is freed: 1.3x the
    model's size loading bf16 as float32)."""
    nbytes = entry.end - entry.begin
    direct = (dest.dtype == entry.dtype and dest.device.type == "cpu" and dest.is_contiguous())
    if direct:
        raw = dest
    else:
        if scratch[0].numel() < nbytes:
            scratch[0] = torch.empty(nbytes, dtype=torch.uint8)
        raw = scratch[0][:nbytes].view(entry.dtype).view(entry.shape)
    f.seek(start + entry.begin)
    if nbytes and f.readinto(memoryview(raw.view(-1).view(torch.uint8).numpy())) != nbytes:
        raise CheckpointError(f"{f.name}: a tensor is truncated")
    if not direct:
        dest.copy_(raw)


def _read_all(files: dict[str, Path], dests: dict[str, torch.Tensor]) -> None:
    """Every tensor of `dests` read into it, in file order within each file, each read once;
    a stored shape other than the destination's is a CheckpointError."""
    by_file: dict[Path, list[str]] = {}
    for name in dests:
        by_file.setdefault(files[name], []).append(name)
    scratch = [torch.empty(0, dtype=torch.uint8)]
    for file, wanted in by_file.items():
        with open(file, "rb", buffering=0) as f:
            start, entries = _header(file, f)
            missing = [n for n in wanted if n not in entries]
            if missing:
                raise CheckpointError(f"{file} lacks tensors its index names: {missing[:10]}")
            for name in sorted(wanted, key=lambda n: entries[n].begin):
                entry, dest = entries[name], dests[name]
                if tuple(entry.shape) != tuple(dest.shape):
                    raise CheckpointError(f"tensor {name} has shape {tuple(entry.shape)}, the "
                                          f"config implies {tuple(dest.shape)}")
                _read_into(f, start, entry, dest, scratch)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    tokenizer: bool = True,
) -> MonetForCausalLM:
    """Load a checkpoint directory. Errors name the missing, unexpected or mis-shaped tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    config = MonetConfig.from_file(path)
    with torch.device("meta"):
        model = MonetForCausalLM(config)
    expected = _expected_tensors(model)
    files = _weight_files(path)
    missing = [n for n in expected if n not in files and not n.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors: {', '.join(missing[:10])}"
                              + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensors: "
                              f"{', '.join(unexpected[:10])}")

    def dtype_of(name: str) -> torch.dtype:
        if not expected[name].dtype.is_floating_point:
            return expected[name].dtype
        return torch.float32 if name.endswith(_FLOAT32_SUFFIXES) else dtype

    # The packed tables first, so that their weights are read into them: never held twice.
    state = empty_packed_tables(model, dtype_of, device)
    for name, want in expected.items():
        if name not in state:
            make = torch.empty if name in files else torch.zeros  # optional counters: 0
            state[name] = make(want.shape, dtype=dtype_of(name), device=device)
    _read_all(files, {name: state[name] for name in expected if name in files})
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    model.identity = model_identity(config, {n: tuple(state[n].shape) for n in files})
    if tokenizer:
        model.tokenizer = load_tokenizer(path, vocab_size=config.vocab_size,
                                         bos_id=config.bos_token_id,
                                         eos_ids=config.eos_token_ids)
    return model


def save_checkpoint(model: MonetForCausalLM, path: str | Path) -> Path:
    """Write config.json and model.safetensors (Hugging Face layout)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


__all__ += ["ConfigError"]
