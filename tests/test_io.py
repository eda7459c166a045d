"""Atomic writes and safe checkpoint loading (asd3d.io)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from asd3d.io import (
    CONFIG_KEY,
    CheckpointError,
    atomic_path,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
)


def _only_files(directory):
    return sorted(p.name for p in directory.iterdir())


def test_atomic_write_text_and_bytes_roundtrip(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    assert atomic_write_text(target, '{"a": 1}') == target
    assert target.read_text() == '{"a": 1}'
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _only_files(target.parent) == ["metrics.json"]  # no temp file left behind


def test_failed_writer_leaves_no_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".bin"
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("boom")
    assert _only_files(tmp_path) == []


def test_failed_writer_keeps_previous_version(tmp_path):
    target = tmp_path / "model.ckpt"
    atomic_torch_save({"x": torch.ones(2)}, target)
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"garbage")
        raise KeyboardInterrupt
    assert _only_files(tmp_path) == ["model.ckpt"]
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "never.txt"):
        pass
    assert _only_files(tmp_path) == []


def test_load_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "last.ckpt"
    state = {CONFIG_KEY: {"generator": {"width": 8}}, "state_dict": {"w": torch.arange(3.0)}}
    atomic_torch_save(state, path)
    loaded = load_checkpoint(path)
    assert loaded[CONFIG_KEY] == {"generator": {"width": 8}}
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


def _assert_one_line(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "not found" in _assert_one_line(err, path)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "is a directory" in _assert_one_line(err, tmp_path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "is not a PyTorch checkpoint (" in _assert_one_line(err, path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _PlainObject:
    pass


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {CONFIG_KEY: {}, "state_dict": _RunsCodeWhenUnpickled(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    _assert_one_line(err, path)
    assert not marker.exists(), "unpickling executed code"


def test_plain_object_is_refused(tmp_path):
    # Not malicious, but still an arbitrary class: weights_only loading must not import it.
    path = tmp_path / "obj.ckpt"
    torch.save({CONFIG_KEY: {}, "thing": _PlainObject()}, path)
    with pytest.raises(CheckpointError, match="refuses"):
        load_checkpoint(path)


def test_valid_checkpoint_without_config(tmp_path):
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = _assert_one_line(err, path)
    assert "has no asd3d config: was it written by asd3d's train.py?" in message


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)
