"""benchmarks/reproduce.py: the smoke profile trains, fuses and records every arm; reruns skip or resume.

The accuracies themselves are not asserted (one epoch on a few hundred images): only that every
arm learned something, that every ASR run fuses to the architecture it promises with the same
test predictions, and that the bookkeeping (results, logs, checkpoints, reruns, report) holds.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asrfx.data import fashion_mnist_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "reproduce.py"

needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="needs apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def repro():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reproduce", None)


@pytest.fixture(scope="module")
def smoke(repro, tmp_path_factory):
    """One smoke-profile run into a fresh folder (shared by the tests below)."""
    out = tmp_path_factory.mktemp("smoke")
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    try:
        results = repro.main(["--profile", "smoke", "--out", str(out)])
    finally:
        torch.set_rng_state(rng)
    assert torch.get_num_threads() == threads  # the runs' thread setting does not leak
    return out, results


@needs_data
def test_every_arm_of_the_profile_trained_and_recorded(repro, smoke):
    out, results = smoke
    profile = repro.PROFILES["smoke"]
    planned = {(model, arm) for model, arms in profile.plan for arm in arms}
    assert {(r["model"], r["arm"]) for r in results} == planned
    assert set(repro.ARMS) <= {arm for _, arm in planned}  # the smoke profile covers every arm
    for r in results:
        folder = out / r["model"] / r["arm"] / "seed0"
        assert json.loads((folder / "result.json").read_text())["test_acc"] == r["test_acc"]
        assert (folder / "checkpoint.pt").is_file()
        epochs = [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, profile.epochs + 1))
        assert len(r["history"]) == profile.epochs
        assert r["loss_end"] < r["loss_start"], (r["model"], r["arm"], r["loss_start"], r["loss_end"])
        assert 0.0 <= r["test_acc"] <= 1.0 and r["test_images"] == profile.test_limit


@needs_data
def test_every_asr_run_fuses_exactly_to_its_target_architecture(repro, smoke):
    _, results = smoke
    asr = [r for r in results if repro.ARMS[r["arm"]].deploys_as is not None]
    assert {r["arm"] for r in asr} == {a for a, arm in repro.ARMS.items() if arm.deploys_as}
    for r in asr:
        d = r["deploy"]
        assert d["folded"] > 0 and d["kept"] == 0, (r["arm"], d)
        assert d["differing_count"] == 0 and d["differing_images"] == [], (r["arm"], d)
        assert d["max_logit_error"] <= 1e-4 * max(1.0, d["max_logit"]), (r["arm"], d)
        assert d["fused_test_acc"] == d["asr_test_acc"] == r["test_acc"]
        assert d["params_fused"] == d["params_reference"] < r["params"], (r["arm"], d)
        assert d["latency_fused_s"] > 0 and d["latency_reference_s"] > 0
    targets = {r["arm"]: r["deploy"]["deploys_as"] for r in asr}
    assert targets["asr-se+se"] == "se" and targets["asr-se"] == "backbone"
    plain = {r["arm"]: r["params"] for r in results if r["model"] == "resnet8"}
    assert {r["deploy"]["params_fused"] for r in asr if r["model"] == "resnet8" and r["arm"] != "asr-se+se"} \
        == {plain["backbone"]}
    frozen = next(r for r in asr if r["arm"] == "asr-se-frozen")
    learned = next(r for r in asr if r["arm"] == "asr-se" and r["model"] == "resnet8")
    assert frozen["trainable_params"] < learned["trainable_params"] == learned["params"]


@needs_data
def test_stripe_and_costs_are_measured(repro, smoke):
    out, results = smoke
    se = next(r for r in results if r["arm"] == "se")
    sites = se["stripe"]["sites"]
    assert len(sites) == 3  # one SE per residual stage of ResNet-8
    for site in sites:
        assert 0 <= site["score"] < float("inf") and site["pooled_score"] > 0
        assert site["channel_min"] <= site["gate_mean"] <= site["channel_max"]
    assert 0 <= se["stripe"]["test_acc_without_attention"] <= 1
    assert set(se["history"][-1]["gate_change"]) == {s["site"] for s in sites}
    costs = json.loads((out / "costs-resnet8.json").read_text())
    arms = [a for m, arms in repro.PROFILES["smoke"].plan if m == "resnet8" for a in arms]
    assert set(costs["train_step_s"]) == set(costs["inference_s"]) == set(arms)
    assert costs["deployed_params"]["asr-se"] == costs["deployed_params"]["backbone"]


@needs_data
def test_rerun_skips_finished_runs_and_resumes_from_checkpoints(repro, smoke, capsys):
    out, _ = smoke
    first = {p: p.read_text() for p in out.glob("*/*/seed0/result.json")}
    redo = out / "resnet8" / "asr-se" / "seed0"
    (redo / "result.json").unlink()  # as if it crashed after its last checkpoint
    results = repro.main(["--profile", "smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert sum(bool(r.get("skipped")) for r in results) == len(first) - 1
    assert "[resnet8/asr-se/seed0] resumed after epoch 1" in printed
    assert "epoch 1/1" not in printed  # nothing trained again
    assert len((redo / "log.jsonl").read_text().splitlines()) == 1
    redone = json.loads((redo / "result.json").read_text())
    assert redone["test_acc"] == json.loads(first[redo / "result.json"])["test_acc"]  # same weights
    assert all(p.read_text() == text for p, text in first.items() if p != redo / "result.json")


@needs_data
def test_report_builds_tables_and_plots(repro, smoke, tmp_path):
    out, _ = smoke
    page = tmp_path / "results.md"
    page.write_text("intro\n<!-- reproduce:fashion-mnist:smoke:begin -->\nold\n"
                    "<!-- reproduce:fashion-mnist:smoke:end -->\noutro\n")
    repro.main(["--profile", "smoke", "--out", str(out), "--report", str(tmp_path)])
    text = page.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    for arm in repro.ARMS.values():
        assert f"| {arm.label} |" in text
    for name in ("curves", "final"):
        png = tmp_path / "images" / f"repro-fashion-mnist-smoke-{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "results" / "repro-fashion-mnist-smoke.json").read_text())
    assert summary["runs"] == len(list(out.glob("*/*/seed0/result.json")))


def _fake_cifar(root: Path, train: int, test: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (train // 5, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, train // 5))}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (test, 3072), dtype=np.uint8),
                     b"labels": list(rng.integers(0, 10, test))}, fh)


def test_cifar_folder_is_read_locally_and_trains(repro, tmp_path):
    """torchvision's python-pickle layout, 3-channel inputs, through one ASR arm."""
    _fake_cifar(tmp_path, train=500, test=128)
    data = repro.load_data("cifar10", str(tmp_path))
    assert data.train_x.shape == (500, 3, 32, 32) and data.test_x.shape == (128, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.classes == 10
    assert repro.load_data("cifar10", str(tmp_path / "cifar-10-batches-py")).train_x.shape[0] == 500
    results = repro.main(["--profile", "smoke", "--data", "cifar10", "--data-root", str(tmp_path),
                          "--models", "resnet8", "--arms", "asr-se", "--out", str(tmp_path / "runs"), "--no-costs"])
    assert len(results) == 1 and results[0]["deploy"]["differing_count"] == 0


def test_bad_input_is_one_clear_line(repro, tmp_path):
    with pytest.raises(repro.UsageError, match="unknown arm.*asr-xyz.*choose from backbone"):
        repro.main(["--profile", "smoke", "--arms", "asr-xyz"])
    with pytest.raises(repro.UsageError, match="unknown --profile"):
        repro.main(["--profile", "huge"])
    with pytest.raises(repro.UsageError, match="needs --data-root"):
        repro.main(["--profile", "smoke", "--data", "cifar100", "--out", str(tmp_path)])
    with pytest.raises(repro.UsageError, match="cifar10 not found.*lacks data_batch_1"):
        repro.main(["--profile", "smoke", "--data", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(repro.UsageError, match="not in profile 'smoke'"):
        repro.main(["--profile", "smoke", "--models", "resnet164"])
    run = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--arms", "asr-xyz"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "reproduce.py: error: unknown arm(s) asr-xyz; choose from " + ", ".join(repro.ARMS)]


def test_cifar_files_holding_code_are_refused(repro, tmp_path):
    _fake_cifar(tmp_path, train=10, test=5)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": subprocess.Popen, b"labels": []}, fh)  # a class reference: code on load
    with pytest.raises(repro.UsageError, match="subprocess.Popen in a CIFAR file"):
        repro._load_cifar("cifar10", str(tmp_path))
