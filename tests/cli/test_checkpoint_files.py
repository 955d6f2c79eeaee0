"""Checkpoint files under damage: every malformed file (corrupt zip, truncated, tampered recipe with
negative or absurd sizes, wrong shapes and types) gets a one-line error in the library and the CLI;
files are written atomically; and a training run killed with SIGKILL (between steps, and while a
checkpoint is being written) resumes from the last asrfx checkpoint to the same weights."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asrfx import checkpoint
from asrfx.cli import EXIT_FAILURE, main

from helpers import examples

ROOT = Path(__file__).resolve().parents[2]
SPEC = "asrfx:resnet56"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[Path, dict]:
    """An asrfx.asr/1 checkpoint (ResNet-56 + ASR(SE), 10 classes, 16x16) and its contents."""
    path = tmp_path_factory.mktemp("ckpt") / "asr.pt"
    assert main(["convert", "--model", SPEC, "--num-classes", "10", "--insert", "se", "--input-shape", "1,3,16,16",
                 "-o", str(path)]) == 0
    return path, torch.load(path, weights_only=True)


def _refused(path: Path, capsys, *fragments: str) -> str:
    """The library raises CheckpointError in one line; the CLI prints one line and exits 1."""
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(path)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    capsys.readouterr()
    assert main(["inspect", str(path)]) == EXIT_FAILURE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asrfx: error: ") and "--debug" not in lines[0], lines
    assert all(f in lines[0] for f in fragments), lines
    return message


def _tampered(tmp_path: Path, contents: dict, **changes) -> Path:
    data = {**contents, **changes}
    path = tmp_path / "tampered.pt"
    torch.save(data, path)
    return path


def test_a_zip_with_a_corrupt_central_directory(valid, tmp_path, capsys):
    """The damage the issue reports (a raw BadZipFile before): the central directory's first entry
    no longer starts with its signature; and the whole central directory overwritten."""
    data = bytearray(valid[0].read_bytes())
    first = data.find(b"PK\x01\x02")
    data[first:first + 4] = b"XXXX"
    (tmp_path / "sig.pt").write_bytes(bytes(data))
    _refused(tmp_path / "sig.pt", capsys, "sig.pt is a damaged zip archive")
    data = bytearray(valid[0].read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[first:end] = b"\xff" * (end - first)
    (tmp_path / "cd.pt").write_bytes(bytes(data))
    _refused(tmp_path / "cd.pt", capsys, "cd.pt")


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.floats(0.0, 0.999))
def test_any_truncation_is_refused(valid, tmp_path, capsys, fraction):
    """A file cut anywhere (a copy interrupted, a full disk) never loads half its weights."""
    data = valid[0].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    _refused(path, capsys, "cut.pt")


def test_garbage_and_empty_files(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    _refused(tmp_path / "empty.pt", capsys, "not a PyTorch checkpoint")
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    _refused(tmp_path / "noise.pt", capsys, "not a PyTorch checkpoint")


TAMPERED = [  # (changes to the checkpoint, fragments of the message)
    ({"input_shape": [-1, 3, 16, 16]}, ["input_shape [-1, 3, 16, 16]", "positive integers"]),
    ({"input_shape": [1, 3, 100000, 100000]}, ["30,000,000,000 elements", "more than"]),
    ({"input_shape": [1, 3.5, 16, 16]}, ["input_shape must be a list of integers"]),
    ({"input_shape": "1,3,16,16"}, ["input_shape must be a list of integers"]),
    ({"input_shape": []}, ["expected 1 to 8 sizes"]),
    ({"model_kwargs": {"num_classes": -5}}, ["num_classes -5"]),
    ({"model_kwargs": {"num_classes": 10**9}}, ["num_classes 1000000000"]),
    ({"model_kwargs": {"num_classes": 10, "checkpoint_path": "/etc/passwd"}}, ["['checkpoint_path']"]),
    ({"options": {"attention": "se", "repeats": 10**6, "psi_init": 0.1}}, ["repeats 1000000"]),
    ({"options": {"attention": "se", "repeats": 1, "psi_init": float("nan")}}, ["psi_init nan"]),
    ({"options": {"attention": "os.system", "repeats": 1}}, ["attention 'os.system'"]),
    ({"options": {"attention": "se", "exec": 1}}, ["option(s) ['exec'] unknown"]),
    ({"method": "exec"}, ["unknown method 'exec'"]),
    ({"model": 42}, ["model spec 42 is not a string"]),
    ({"state_dict": [1, 2, 3]}, ["without state_dict"]),
    ({"extra": [1, 2]}, ["training state ('extra') is a list"]),
]


@pytest.mark.parametrize("changes, fragments", TAMPERED, ids=[str(c)[:40] for c, _ in TAMPERED])
def test_a_tampered_recipe_is_refused_before_anything_is_built(valid, tmp_path, capsys, changes, fragments):
    _refused(_tampered(tmp_path, valid[1], **changes), capsys, *fragments)


def test_wrong_weights_are_summarised(valid, tmp_path, capsys):
    sd = dict(valid[1]["state_dict"])
    sd["fc.weight"] = torch.zeros(3, 3)
    sd["fc.bias"] = sd["fc.bias"].long()
    _refused(_tampered(tmp_path, valid[1], state_dict=sd), capsys, "shape mismatch", "fc.weight: file (3, 3)",
             "dtype mismatch", "fc.bias: file torch.int64")
    sd = dict(valid[1]["state_dict"])
    sd["fc.bias"] = 3
    _refused(_tampered(tmp_path, valid[1], state_dict=sd), capsys, "not named tensors", "'fc.bias': int")


def test_saving_is_atomic(valid, tmp_path, monkeypatch):
    """A save that fails half way leaves the previous file complete and no temporary file; a new
    file gets the usual permissions (umask), not a temporary file's 0600."""
    loaded = checkpoint.load(valid[0])
    path = tmp_path / "asr.pt"
    checkpoint.save_asr(path, loaded.model, loaded.recipe, extra={"step": 1})
    assert checkpoint.load(path).extra == {"step": 1}
    real = torch.save

    def broken(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:1000])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_asr(path, loaded.model, loaded.recipe, extra={"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path).extra == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["asr.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_recipe_that_could_not_be_rebuilt_is_not_saved(valid, tmp_path):
    loaded = checkpoint.load(valid[0])
    bad = checkpoint.Recipe(SPEC, (1, 3, -16, 16), "insert", {"attention": "se"}, {"num_classes": 10})
    with pytest.raises(checkpoint.CheckpointError, match="positive integers"):
        checkpoint.save_asr(tmp_path / "x.pt", loaded.model, bad)
    assert not (tmp_path / "x.pt").exists()


def test_command_line_bounds(capsys, tmp_path):
    for args, fragment in ((["--repeats", "1000"], "up to 16"), (["--num-classes", "0"], "positive integer"),
                           (["--input-shape", "1,3,90000,90000"], "elements, more than")):
        assert main(["convert", "--model", SPEC, "--insert", "se", *args, "-o", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


# -- a training run killed with SIGKILL -------------------------------------------------------------


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.stderr", "a") as err:  # a file: a full pipe would block the run
        return subprocess.Popen([sys.executable, str(ROOT / "tests" / "training" / "pipeline_workers.py"), "train", str(out),
                                 *args], env=env, stdout=subprocess.PIPE, stderr=err, text=True)


def _stderr(proc: subprocess.Popen) -> str:
    return Path(proc.args[3] + ".stderr").read_text()[-3000:]


def _kill_after(proc: subprocess.Popen, line: str) -> list[str]:
    """Read the run's progress until ``line``, then SIGKILL it at once."""
    seen = []
    for text in proc.stdout:
        seen.append(text.strip())
        if text.strip() == line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (seen, _stderr(proc))
    return seen


def _finish(proc: subprocess.Popen) -> list[str]:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, _stderr(proc)
    return out.split()


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    """Uninterrupted: 5 SGD steps (momentum), an asrfx checkpoint after each. Interrupted: killed after
    step 3, while its checkpoint was half written (a slow disk): the file under its name still holds
    step 2, complete, and the half-written temporary file is refused; resumed from it to the end.
    Both runs end with the same weights, bit for bit."""
    steps = "--steps=5"
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    reference = _start(whole, steps)  # runs alongside the interrupted one
    seen = _kill_after(_start(broken, steps, "--stall-at=3"), "stalled")
    assert seen == ["saved 1", "saved 2", "stalled"]
    assert checkpoint.read_file(broken / "asr.pt")["extra"]["step"] == 2  # the last finished save (the resumed
    # run below rebuilds the model from it, which checks that it is complete)
    (partial,) = broken.glob(".asr.pt.*.tmp")
    assert 0 < partial.stat().st_size < (broken / "asr.pt").stat().st_size
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(partial)  # never half-read
    assert _finish(_start(broken, steps))[:2] == ["resumed", "2"]
    assert _finish(reference)[-1] == "done"
    want, got = (torch.load(d / "final.pt", weights_only=True) for d in (whole, broken))
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert checkpoint.read_file(broken / "asr.pt")["extra"]["step"] == 5
