"""The command line (asrfx.cli): commands, file formats, safe loading, errors; in-process and as a subprocess.

Most tests call ``asrfx.cli.main([...])`` in-process (fast); the subprocess tests run
``python -m asrfx`` with PYTHONPATH set to this repository, so the child imports the asrfx
under test. The small model is torchvision's mobilenet_v3_small at 64x64: 9 SE sites, one
folding into a BatchNorm, eight into consumers (after Hardswish).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import io
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

import asrfx
from asrfx import checkpoint
from asrfx.cli import EXIT_FAILURE, EXIT_USAGE, main

from helpers import randomize

REPO = Path(__file__).resolve().parents[2]
SPEC = "torchvision:mobilenet_v3_small"
SHAPE = "1,3,64,64"
X = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def run_cli(*args, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m asrfx ...`` in a child that imports this repository's asrfx."""
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else []) + [os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    return subprocess.run([sys.executable, "-m", "asrfx", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("asrfx: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def mobilenet() -> nn.Module:
    return asrfx.cli.specs.build_model(SPEC)


def plain_backbone(model: nn.Module) -> nn.Module:
    """The model with each attention block replaced by identity: what fuse must give back."""
    return asrfx.backbone(model.eval(), torch.randn(1, 3, 64, 64))


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trained_asr(path: Path) -> nn.Module:
    """Stand in for training: random psi and BatchNorm statistics, written back as asrfx.asr/1."""
    loaded = checkpoint.load(path)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("psi"):
                p.copy_(torch.randn(p.shape, generator=gen))
        for m in loaded.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    checkpoint.save_asr(path, loaded.model, loaded.recipe)
    return loaded.model


def assert_same_function(got: torch.Tensor, want: torch.Tensor) -> None:
    """fuse's float32 tolerance: 1e-5 of the output's scale."""
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    """``asrfx convert --model mobilenet_v3_small`` once for the module: (asr.pt, what it printed)."""
    path = tmp_path_factory.mktemp("converted") / "asr.pt"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["convert", "--model", SPEC, "--input-shape", SHAPE, "-o", str(path)]) == 0
    return path, printed.getvalue()


def copy_of(converted, tmp_path: Path) -> Path:
    path = tmp_path / "asr.pt"
    shutil.copyfile(converted[0], path)
    return path


def deployed_parameters(printed: str) -> int:
    """The count in fuse's 'deployed model: N parameters ...; plain backbone N (equal)' line."""
    line = next(line for line in printed.splitlines() if line.startswith("deployed model:"))
    assert line.endswith("(equal)"), line
    assert "the plain backbone: equal parameters, no gate op left" in printed
    return int(line.split()[2].replace(",", ""))


UNTRACEABLE = textwrap.dedent('''
    import torch
    from torch import nn

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace it
                return self.conv(x)
            return -self.conv(x)
''')


@pytest.fixture()
def untraceable_file(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A whole pickled module (torch.save(model)) whose forward torch.fx cannot trace; and its code folder."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "asrfx_cli_untraceable.py").write_text(UNTRACEABLE)
    monkeypatch.syspath_prepend(str(code))
    module = importlib.import_module("asrfx_cli_untraceable")
    path = tmp_path / "whole.pt"
    torch.save(module.Untraceable(), path)
    return path, code


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


# -- help, entry points -----------------------------------------------------------------------


def test_help_names_every_command_and_the_safety_rule(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("inspect", "convert", "fuse", "stripe"):
        assert command in out
    assert "weights_only=True" in out and "--trust-pickle" in out
    code, out, _ = run(capsys, "fuse", "--help")
    assert code == 0 and ".pt2" in out and "asrfx.fused/1" in out
    code, out, _ = run(capsys, "inspect", "--help")
    assert "EXECUTES CODE FROM THE FILE" in " ".join(out.split())


def test_no_command_prints_usage_and_fails(capsys):
    code, _, err = run(capsys)
    assert code == EXIT_USAGE and "usage: asrfx" in err


def test_console_script_is_declared_and_resolves_to_cli_main():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared["asrfx"] == "asrfx.cli:main"
    try:  # an install made before the entry point existed has none: pyproject is then the reference
        points = importlib.metadata.entry_points(group="console_scripts", name="asrfx")
    except importlib.metadata.PackageNotFoundError:
        points = ()
    for point in points:
        assert point.value == "asrfx.cli:main"
    module, _, attr = declared["asrfx"].partition(":")
    assert getattr(importlib.import_module(module), attr) is main


# -- inspect --------------------------------------------------------------------------------


def test_inspect_prints_the_site_table(capsys):
    code, out, _ = run(capsys, "inspect", "--model", SPEC, "--input-shape", SHAPE)
    assert code == 0
    assert str(asrfx.find_attention(mobilenet().eval(), torch.randn(1, 3, 64, 64))) in out
    assert "9 channel-attention site(s)" in out and "2,542,856 parameters" in out


def test_inspect_json_and_a_spec_in_the_file_position(capsys):
    code, out, _ = run(capsys, "inspect", SPEC, "--input-shape", "1x3x64x64", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "model" and data["input_shape"] == [1, 3, 64, 64]
    assert len(data["sites"]) == 9
    first = data["sites"][0]
    assert first["module"] == "features.1.block.1" and first["kind"] == "se" and first["absorbable"]
    assert first["gate_shape"] == [1, 16, 1, 1]
    assert data["rejections"] == [] and data["layout_losses"] == []  # nothing refused, no layout lost


def test_default_input_shapes_come_from_the_model():
    assert asrfx.cli.specs.default_input_shape("asrfx:resnet56") == (1, 3, 32, 32)
    assert asrfx.cli.specs.default_input_shape("torchvision:inception_v3") == (1, 3, 299, 299)
    assert asrfx.cli.specs.default_input_shape("torchvision:resnet18") == (1, 3, 224, 224)
    assert asrfx.cli.specs.default_input_shape("timm:test_efficientnet") == (1, 3, 160, 160)


# -- convert and fuse -----------------------------------------------------------------------


def test_convert_writes_plain_data_that_rebuilds_the_asr_form(capsys, converted):
    out_file, out = converted
    assert "asrfx.convert: 9 site(s) converted" in out and f"wrote {out_file}" in out
    assert "2,542,856 parameters -> 2,545,152 in ASR form (2,296 in psi)" in out
    data = torch.load(out_file, weights_only=True)  # plain data: loads without trusting the file
    assert data["format"] == checkpoint.FORMAT_ASR and data["model"] == SPEC
    assert data["input_shape"] == [1, 3, 64, 64] and data["method"] == "convert"
    assert data["options"] == {"keep": False, "psi_init": 0.1}
    assert "features.4.block.2.psi" in data["state_dict"]
    loaded = checkpoint.load(out_file)
    assert loaded.kind == "asr" and isinstance(loaded.model, torch.fx.GraphModule)
    assert len(asrfx.report_of(loaded.model).sites) == 9
    reference = asrfx.convert(mobilenet(), torch.randn(1, 3, 64, 64))
    assert loaded.model.state_dict().keys() == reference.state_dict().keys()
    code, out, _ = run(capsys, "inspect", out_file)
    assert code == 0 and "asrfx.asr/1" in out and "9 site(s) converted" in out


def test_fuse_to_an_asrfx_checkpoint_matches_in_memory_fuse(capsys, converted, tmp_path):
    asr_file = copy_of(converted, tmp_path)
    asr = trained_asr(asr_file).eval()
    fused = asrfx.fuse(asr)
    with torch.no_grad():
        want = fused(X)
        assert_same_function(want, asr(X))
    code, out, _ = run(capsys, "fuse", asr_file, "-o", tmp_path / "deployed.pt")
    assert code == 0 and "asrfx.fuse: 9 gate(s) folded, 0 kept" in out
    assert deployed_parameters(out) == count(plain_backbone(mobilenet())) == count(fused)
    data = torch.load(tmp_path / "deployed.pt", weights_only=True)
    assert data["format"] == checkpoint.FORMAT_FUSED and set(data) >= {"asr_state_dict", "state_dict"}
    deployed = checkpoint.load(tmp_path / "deployed.pt")
    assert deployed.kind == "fused" and count(deployed.model) == count(fused)
    with torch.no_grad():
        assert torch.equal(deployed.model(X), want)  # the same weights through the same fuse
    code, out, _ = run(capsys, "inspect", tmp_path / "deployed.pt")
    assert code == 0 and "asrfx.fused/1" in out and "9 gate(s) folded" in out


def test_convert_a_trained_state_dict_with_its_architecture(capsys, tmp_path):
    model = randomize(mobilenet(), seed=7)
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "trained.pt")  # a training checkpoint
    code, _, _ = run(capsys, "convert", tmp_path / "trained.pt", "--model", SPEC, "--input-shape", SHAPE,
                     "-o", tmp_path / "asr.pt")
    assert code == 0
    asr = checkpoint.load(tmp_path / "asr.pt").model
    state = asr.state_dict()
    for name, value in model.state_dict().items():  # backbone weights carried over unchanged
        if name in state:
            assert torch.equal(state[name], value), name

    torch.save(model.state_dict(), tmp_path / "plain.pt")
    code, out, _ = run(capsys, "inspect", tmp_path / "plain.pt", "--model", SPEC, "--input-shape", SHAPE)
    assert code == 0 and "9 channel-attention site(s)" in out
    code, _, err = run(capsys, "inspect", tmp_path / "plain.pt", "--model", SPEC, "--num-classes", "10")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "shape mismatch", "classifier.3.weight", "num_classes")


def test_keep_mode_and_psi_init(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", SPEC, "--input-shape", SHAPE, "--keep", "--psi-init", "0.5",
                       "-o", tmp_path / "keep.pt")
    assert code == 0 and "[se, keep]" in out
    loaded = checkpoint.load(tmp_path / "keep.pt")
    assert loaded.recipe.options == {"keep": True, "psi_init": 0.5}
    psi = [p for n, p in loaded.model.named_parameters() if n.endswith(".psi")]
    assert len(psi) == 9 and all(torch.all(p == 0.5) for p in psi)
    code, out, _ = run(capsys, "fuse", tmp_path / "keep.pt", "-o", tmp_path / "keep-deployed.pt")
    assert code == 0 and deployed_parameters(out) == count(mobilenet())  # ASR(k) + k deploys k


def test_insert_into_a_plain_cifar_resnet_fuses_back_to_it(capsys, tmp_path):
    code, out, _ = run(capsys, "convert", "--model", "asrfx:resnet56", "--num-classes", "10", "--insert", "eca",
                       "-o", tmp_path / "asr.pt")
    assert code == 0 and "27 site(s) converted" in out and "insert eca x1" in out
    code, out, _ = run(capsys, "fuse", tmp_path / "asr.pt", "-o", tmp_path / "deployed.pt")
    assert code == 0 and deployed_parameters(out) == count(asrfx.models.resnet56(num_classes=10))


# -- errors ---------------------------------------------------------------------------------


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    torch.save({"format": "asrfx.asr/9", "model": SPEC}, tmp_path / "future.pt")
    torch.save({"format": checkpoint.FORMAT_ASR, "model": SPEC, "input_shape": [1, 3, 64, 64]},
               tmp_path / "broken.pt")
    torch.save(nn.Conv2d(3, 4, 3), tmp_path / "module.pt")
    return {"text": tmp_path / "text.pt", "sd": tmp_path / "sd.pt", "future": tmp_path / "future.pt",
            "broken": tmp_path / "broken.pt", "module": tmp_path / "module.pt",
            "missing": tmp_path / "missing.pt", "dir": tmp_path, "out": tmp_path / "out.pt"}


ERRORS = [  # (arguments, exit status, fragments of the one-line message)
    (["inspect"], EXIT_USAGE, ["give a checkpoint FILE or --model"]),
    (["inspect", "--model", "keras:resnet50"], EXIT_USAGE, ["source one of torchvision, timm, asrfx"]),
    (["inspect", "--model", "resnet50"], EXIT_USAGE, ["did you mean torchvision:resnet50"]),
    (["inspect", "--model", "asrfx:resnet56", "--input-shape", "1,3,a"], EXIT_USAGE, ["--input-shape"]),
    (["inspect", "--model", "asrfx:resnet56", "--input-shape", "1,0,32"], EXIT_USAGE, ["positive sizes"]),
    (["convert", "--model", SPEC], EXIT_USAGE, ["-o/--output"]),
    (["convert", "--model", SPEC, "--keep", "--insert", "se", "-o", "x.pt"], EXIT_USAGE, ["not allowed with"]),
    (["convert", "--model", SPEC, "--psi-init", "nan", "-o", "x.pt"], EXIT_USAGE, ["finite number"]),
    (["inspect", "--model", "torchvision:nope"], EXIT_FAILURE, ["torchvision has no model named 'nope'"]),
    (["inspect", "--model", "torchvision:mobilenet_v3_smal"], EXIT_FAILURE,
     ["close names: torchvision:mobilenet_v3_small"]),
    (["inspect", "--model", "timm:seresnet1"], EXIT_FAILURE, ["timm:seresnet18"]),
    (["inspect", "{missing}"], EXIT_FAILURE, ["no such file"]),
    (["inspect", "{dir}"], EXIT_FAILURE, ["is a directory"]),
    (["inspect", "{text}"], EXIT_FAILURE, ["not a PyTorch checkpoint"]),
    (["inspect", "{sd}"], EXIT_FAILURE, ["is a state_dict (1 tensors)", "--model"]),
    (["inspect", "{sd}", "--model", "asrfx:resnet56"], EXIT_FAILURE, ["missing key(s)", "unexpected key(s)"]),
    (["inspect", "{future}"], EXIT_FAILURE, ["'asrfx.asr/9'", "upgrade asrfx"]),
    (["inspect", "{broken}"], EXIT_FAILURE, ["without state_dict"]),
    (["inspect", "{module}"], EXIT_FAILURE, ["torch.nn.modules.conv.Conv2d", "--trust-pickle",
                                             "torch.save(model.state_dict(), path)"]),
    (["convert", "--model", "asrfx:resnet56", "-o", "{out}"], EXIT_FAILURE,
     ["no channel-attention site", "--insert se"]),
    (["fuse", "{sd}", "-o", "{out}"], EXIT_FAILURE, ["plain state_dict", "asrfx convert"]),
    (["fuse", "{module}", "--trust-pickle", "-o", "{out}"], EXIT_FAILURE, ["no recipe", ".pt2"]),
    (["fuse", "{future}", "-o", "{dir}"], EXIT_FAILURE, ["it is a folder"]),
]


@pytest.mark.parametrize("args, status, fragments", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_errors_are_one_line_with_a_status(capsys, tmp_path, args, status, fragments):
    files = _files(tmp_path)
    code, out, err = run(capsys, *[a.format(**files) for a in args])
    assert code == status
    assert_one_line_error(err, *fragments)
    assert not files["out"].exists()


def test_output_folder_must_exist_and_asr_form_is_not_converted_twice(capsys, converted, tmp_path):
    code, _, err = run(capsys, "fuse", converted[0], "-o", tmp_path / "no" / "deployed.pt")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "folder", "does not exist")
    code, _, err = run(capsys, "convert", converted[0], "-o", tmp_path / "again.pt")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "already in ASR form", "asrfx fuse")
    assert not (tmp_path / "again.pt").exists()


def test_untraceable_model_gives_the_tracing_error(capsys, untraceable_file):
    path, _ = untraceable_file
    code, _, err = run(capsys, "inspect", path, "--trust-pickle", "--input-shape", "1,3,8,8")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "torch.fx cannot trace the forward of Untraceable", "What to do")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such file"):
        main(["inspect", str(tmp_path / "missing.pt"), "--debug"])


def test_pickled_code_runs_only_with_trust_pickle(capsys, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "evil.pt")
    code, _, err = run(capsys, "inspect", tmp_path / "evil.pt", "--model", SPEC)
    assert code == EXIT_FAILURE and not marker.exists()
    assert_one_line_error(err, "pickled Python objects", "--trust-pickle")
    # the payload is real: trusting the file runs it (then the file holds no weights)
    code, _, err = run(capsys, "inspect", tmp_path / "evil.pt", "--model", SPEC, "--trust-pickle")
    assert marker.exists() and code == EXIT_FAILURE


def test_export_programs_load_only_when_trusted(capsys, tmp_path):
    program = torch.export.export(nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),))
    torch.export.save(program, str(tmp_path / "p.pt2"))
    code, _, err = run(capsys, "inspect", tmp_path / "p.pt2")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "torch.export program", "--trust-pickle")
    code, out, _ = run(capsys, "inspect", tmp_path / "p.pt2", "--trust-pickle")
    assert code == 0 and "torch.export program (deployed)" in out and "112 parameters" in out


# -- stripe ---------------------------------------------------------------------------------


def test_stripe_on_random_data_with_a_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "stripe", "--model", SPEC, "--input-shape", SHAPE, "--data", "random",
                         "--batches", "1", "--batch-size", "3", "--no-progress", "--plot", tmp_path / "s.png")
    assert code == 0, err
    assert out.startswith("MobileNetV3: attention gates over 3 samples (1 batches)")
    assert "features.11.block.2" in out
    assert (tmp_path / "s.png").stat().st_size > 0 and f"wrote {tmp_path / 's.png'}" in out


def test_stripe_of_an_asr_checkpoint_and_refusals(capsys, converted, tmp_path):
    code, out, err = run(capsys, "stripe", converted[0], "--batches", "1", "--batch-size", "2", "--no-progress")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "[asr]" in line]
    assert len(rows) == 9 and all(line.split()[-2] == "0" for line in rows)  # psi-driven gates: constant
    code, _, err = run(capsys, "stripe", "--model", "asrfx:resnet56", "--batches", "1", "--no-progress")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "no channel-attention site found in CifarResNet")
    code, _, err = run(capsys, "stripe", "--model", SPEC, "--plot", tmp_path / "no" / "s.png")
    assert code == EXIT_FAILURE
    assert_one_line_error(err, "does not exist")


def test_fashion_mnist_batches_take_the_models_input_shape():
    from asrfx.cli.commands import _data
    from asrfx.data import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    batches = _data("fashion-mnist", (1, 3, 40, 48), batches=2, batch_size=5)
    assert [tuple(b.shape) for b in batches] == [(5, 3, 40, 48)] * 2
    assert torch.equal(batches[0][:, 0], batches[0][:, 2])  # grey replicated to every channel


# -- as a subprocess ------------------------------------------------------------------------


def test_subprocess_help_and_which_asrfx(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "usage: asrfx" in result.stdout and not result.stderr
    result = run_cli("--version", cwd=tmp_path)  # 'asrfx 0.1.0 from <folder>': the asrfx under test
    assert result.returncode == 0
    assert result.stdout.strip() == f"asrfx {asrfx.__version__} from {REPO / 'asrfx'}"


def test_subprocess_inspect(tmp_path):
    result = run_cli("inspect", "--model", SPEC, "--input-shape", SHAPE, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MobileNetV3: 9 channel-attention site(s)")


def test_subprocess_convert_train_fuse_round_trip(tmp_path):
    """convert (CLI) -> train (Python) -> fuse (CLI) -> load the deployed program: same outputs, backbone size."""
    result = run_cli("convert", "--model", SPEC, "--input-shape", SHAPE, "-o", "asr.pt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "9 site(s) converted" in result.stdout
    asr = trained_asr(tmp_path / "asr.pt").eval()
    result = run_cli("fuse", "asr.pt", "-o", "deployed.pt2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "9 gate(s) folded, 0 kept" in result.stdout and "any batch size" in result.stdout
    program = torch.export.load(str(tmp_path / "deployed.pt2"))
    fused = asrfx.fuse(asr)
    with torch.no_grad():
        got = program.module()(X)
        torch.testing.assert_close(got, fused(X), rtol=1e-5, atol=1e-6)
        assert_same_function(got, asr(X))
        assert program.module()(X[:1]).shape == (1, 1000)  # the batch size is dynamic
    backbone = count(plain_backbone(mobilenet()))
    assert sum(p.numel() for p in program.parameters()) == count(fused) == backbone
    assert deployed_parameters(result.stdout) == backbone


def test_subprocess_errors_are_one_line_without_traceback(tmp_path, untraceable_file):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "evil.pt")
    whole, code_dir = untraceable_file
    cases = [
        (["inspect", "missing.pt"], EXIT_FAILURE, "no such file: missing.pt"),
        (["inspect", "--model", "torchvision:nope"], EXIT_FAILURE, "torchvision has no model named 'nope'"),
        (["inspect", "evil.pt", "--model", SPEC], EXIT_FAILURE, "--trust-pickle"),
        (["inspect", whole, "--trust-pickle", "--input-shape", "1,3,8,8"], EXIT_FAILURE, "cannot trace"),
    ]
    for args, status, fragment in cases:
        result = run_cli(*args, cwd=tmp_path, extra_path=code_dir)
        assert result.returncode == status, (args, result.stderr)
        assert_one_line_error(result.stderr, fragment)
        assert not result.stdout
    assert not marker.exists()
