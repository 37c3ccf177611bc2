"""``python -m fusedres`` (fusedres/cli/) and the API under it (fusedres/api.py).

Most commands run in this process through fusedres.cli.main (a subprocess pays torch's
import each time); two subprocesses check ``python -m fusedres`` itself. Models are tiny:
tests/mypkg/models.py is a user's own factory (``--model mypkg.models:make_net``), with
tests/ on sys.path as pytest puts it there. The bf16 checks run resnet18 at the CPU
default input, the smallest torchvision model deep enough for a 1% variance error to show.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import fusedres
from fusedres import api
from fusedres.cli import main
from mypkg.models import make_net

ROOT = Path(__file__).resolve().parent.parent
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TESTS_ON_PATH = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}


def run_cli(capsys, *argv) -> tuple:
    """(exit status, stdout, stderr) of ``python -m fusedres *argv``, in this process."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, --version, bad options
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_input(n=2, size=16, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, 3, size, size)


# --------------------------------------------------------------------------------------
# Conventions: --help, --version, unknown commands, bad options
# --------------------------------------------------------------------------------------


def test_help_lists_each_command_on_one_line():
    # the real entry point: `python -m fusedres --help` and `-h` exit 0 on stdout
    for flag in ("--help", "-h"):
        r = subprocess.run([sys.executable, "-m", "fusedres", flag], capture_output=True,
                           text=True, timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "80"})
        assert r.returncode == 0 and r.stderr == "", r.stderr
        for command in ("check", "bench", "degradation", "lesion"):
            line = next(l for l in r.stdout.splitlines() if l.strip().startswith(command))
            assert len(line.split()) > 3, f"{command} has no one-line description: {line!r}"


def test_version_unknown_command_and_bad_options(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"fusedres {fusedres.__version__}"
    code, out, err = run_cli(capsys, "frobnicate")
    assert code == 2 and out == "" and "invalid choice: 'frobnicate'" in err
    code, _, err = run_cli(capsys)
    assert code == 2 and "COMMAND" in err
    for argv, named in ((["check", "--size", "-3"], "--size"),
                        (["check", "--batch", "0"], "--batch"),
                        (["bench", "-b", "0"], "--batch-size"),
                        (["check", "--nonsense"], "--nonsense"),
                        (["check", "--input-size", "3,224"], "--input-size"),
                        (["degradation", "--depths", "9"], "--depths")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and named in err and "Traceback" not in err, (argv, err)


def test_check_help_states_the_default_model(capsys):
    code, out, _ = run_cli(capsys, "check", "--help")
    assert code == 0 and "(default: resnet50)" in " ".join(out.split())


# --------------------------------------------------------------------------------------
# User errors: one line on stderr, exit 2, before any work
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_for_device_cuda(capsys):
    for command in ("check", "bench", "degradation"):
        code, _, err = run_cli(capsys, command, "--device", "cuda")
        assert code == 2 and "no CUDA GPU" in err, err


def test_unknown_models(capsys, tmp_path):
    for spec, says in (("resnet1B", "not a torchvision model (close: resnet18"),
                       ("timm:resnet5O", "timm has no model 'resnet5O'"),
                       ("mypkg.nomodule:make_net", "cannot import mypkg.nomodule"),
                       ("mypkg.models:nothing", "has no function 'nothing'")):
        for command in ("check", "bench"):
            code, out, err = run_cli(capsys, command, "--model", spec)
            assert code == 2 and says in err and out == "", (spec, err)
    code, _, err = run_cli(capsys, "check", "--model", "mypkg.models:make_net",
                           "--model-kwargs", "width")
    assert code == 2 and "k=v" in err
    code, _, err = run_cli(capsys, "degradation", "--image-size", "4", "--out", str(tmp_path))
    assert code == 2 and "--image-size must be at least 8" in err


def test_impossible_sizes(capsys):
    # one value per channel in resnet18's last stage: training batch norm cannot run
    code, _, err = run_cli(capsys, "check", "--model", "resnet18", "--batch", "1", "--size", "32")
    assert code == 2 and "1 value per channel" in err and "layer4" in err, err
    code, _, err = run_cli(capsys, "bench", "--model", "resnet18", "-b", "1", "--img-size", "32")
    assert code == 2 and "1 value per channel" in err, err
    # an input the model cannot take at all
    code, _, err = run_cli(capsys, "check", "--model", "resnet18", "--input-size", "1,32,32")
    assert code == 2 and "does not run on an input of shape (2, 1, 32, 32)" in err, err


def test_bad_backend_name(capsys, monkeypatch):
    monkeypatch.setenv("FUSEDRES_BACKEND", "trition")
    for argv in (["check", "--model", "mypkg.models:make_net"],
                 ["bench", "--model", "mypkg.models:make_net"],
                 ["degradation", "--epochs", "1"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "FUSEDRES_BACKEND must be one of" in err and "'trition'" in err
    with pytest.raises(api.UsageError, match="FUSEDRES_BACKEND"):
        fusedres.check_model(make_net(), tiny_input())


def test_unwritable_folders_fail_before_any_work(capsys, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    trained = []
    monkeypatch.setattr("fusedres.cli.experiments.run_degradation",
                        lambda *a, **k: trained.append(1))
    for command in ("degradation", "lesion"):
        code, _, err = run_cli(capsys, command, "--out", str(blocker / "runs"))
        assert code == 2 and "--out" in err and "cannot write" in err, err
    assert trained == []
    code, _, err = run_cli(capsys, "bench", "--model", "mypkg.models:make_net",
                           "--results-file", str(blocker / "r.json"))
    assert code == 2 and "--results-file" in err, err


def test_a_checkpoint_that_does_not_fit(capsys, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(make_net(width=4).state_dict(), path)
    code, _, err = run_cli(capsys, "check", "--model", "mypkg.models:make_net",
                           "--checkpoint", str(path))
    assert code == 2 and "does not fit the model" in err, err
    code, _, err = run_cli(capsys, "check", "--model", "mypkg.models:make_net",
                           "--checkpoint", str(tmp_path / "missing.pt"))
    assert code == 2 and "no such file" in err


# --------------------------------------------------------------------------------------
# Export and tracing name fusedres.revert
# --------------------------------------------------------------------------------------


def test_script_fx_and_onnx_say_revert_first():
    model = fusedres.convert(make_net(width=4)).eval()
    x = tiny_input(1, 8)
    with pytest.raises(RuntimeError, match=r"TorchScript.*fusedres\.revert\(model\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"torch\.fx.*fusedres\.revert\(model\)"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(RuntimeError, match=r"torch\.onnx\.export.*fusedres\.revert\(model\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (x,), io.BytesIO(), dynamo=False)
    fusedres.revert(model)
    assert torch.fx.symbolic_trace(model)(x).shape == (1, 10)  # and after revert they work


# --------------------------------------------------------------------------------------
# convert's summary: a log record, never a warning
# --------------------------------------------------------------------------------------


def test_convert_logs_a_summary(caplog):
    with caplog.at_level(logging.INFO, logger="fusedres"), warnings.catch_warnings():
        warnings.simplefilter("error")  # everything fuses: no warning at all
        model = fusedres.convert(make_net(width=4, blocks=2))
    [record] = [r for r in caplog.records if r.name == "fusedres"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == "fusedres: 4 of 4 residual blocks of Net fused (BasicBlock x4)"
    s = fusedres.summary(model)
    assert (s.num_fused, s.num_blocks, s.fused, s.unfused) == (4, 4, {"BasicBlock": 4}, ())


def test_summary_names_unfused_blocks_and_their_reasons(caplog):
    model = make_net(width=4)
    model.stages[0].relu = torch.nn.GELU()
    with caplog.at_level(logging.INFO, logger="fusedres"), pytest.warns(UserWarning,
                                                                        match="left 1 block"):
        fusedres.convert(model)
    s = fusedres.summary(model)
    assert s.num_fused == 1 and s.unfused == (("stages.0", "BasicBlock", "relu is GELU, not ReLU"),)
    assert str(s) in [r.getMessage() for r in caplog.records]
    assert fusedres.why_not_fused(model.stages[0]) == "relu is GELU, not ReLU"
    assert fusedres.fused_blocks(model) == ["stages.1"]


# --------------------------------------------------------------------------------------
# The API's result objects
# --------------------------------------------------------------------------------------


def test_check_model_result():
    model = make_net(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fusedres.check_model(model, tiny_input(), name="make_net")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fusedres.fused_blocks(model)  # the model passed in is left as it is
    assert result.status == "PASS" and result.passed and result.tol64 == api.TOL64
    assert result.summary.num_fused == 2 and result.input_shape == (2, 3, 16, 16)
    assert [r.what for r in result.rows64][:2] == ["train output", "param grads (worst)"]
    assert all(isinstance(r, api.CheckRow) and r.status == "ok" for r in result.rows64)
    assert all(r.fused <= r.limit for r in result.rows64 + result.rows if r.status == "ok")
    text = str(result)
    assert text.startswith("fusedres check: make_net, batch 2, 3x16x16, float32")
    assert "blocks fused: 2 of 2" in text and text.endswith("PASS")
    assert f"{result.rows[0].fused:.2e}" in text


def test_float64_limit_with_few_values_per_channel():
    # 2x2 images, batch 2: the second stage's batch norms see 2 values per channel
    result = fusedres.check_model(make_net(width=4), tiny_input(2, 2))
    assert result.tol64 == api.TOL64_FEW and all(r.limit == api.TOL64_FEW
                                                 for r in result.rows64[:4])
    assert "normalises only 2 values per channel" in str(result) and result.passed, str(result)
    with pytest.raises(api.UsageError, match="1 value per channel"):
        fusedres.check_model(make_net(width=4), tiny_input(1, 2))


def test_check_model_nothing_fused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    result = fusedres.check_model(model, tiny_input())
    assert result.status == "NOTHING FUSED" and result.passed and result.rows == []
    assert "nothing to check" in str(result)


def test_benchmark_without_a_gpu_checks_that_it_runs():
    if torch.cuda.is_available():
        pytest.skip("on a GPU benchmark times for real")
    result = fusedres.benchmark(make_net(width=4), tiny_input(), bench="both", name="net")
    assert not result.measured and result.rows == []
    text = str(result)
    assert "GPU throughput needs a CUDA GPU" in text
    assert "one train step" in text and "one eval forward" in text
    assert result.to_json()["benchmarks"] == []


def test_bench_json_is_what_report_reads(tmp_path):
    """The JSON layout only: rows put in by hand (no GPU here), read by bench/report.py."""
    result = api.BenchResult("resnet50", (256, 3, 224, 224), "amp", True, "cuda",
                             fusedres.summary(make_net()), True,
                             env={"device": "cuda", "card": "a GPU", "torch": "x"},
                             warmup=10, iters=40)
    for provider, ms in (("eager", 4.0), ("fused", 2.0), ("torch.compile", 3.0),
                         ("fused+compile", 1.5)):
        result.rows.append(api.BenchRow(provider, "train_step", ms, 256 / ms * 1e3, 1000.0,
                                        4.0 / ms))
    assert "fused+compile / torch.compile 2.00x" in str(result)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result.to_json()))
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    table = report.render([str(path)])
    row = next(l for l in table.splitlines() if l.startswith("| model | resnet50 | train_step"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # fused/eager 4/2, fused/compile 3/2, no recompute, no csrc_ref, fused_compile/compile 3/1.5
    assert cells[-5:] == ["2.00x", "1.50x", "–", "–", "2.00x"], cells
    assert "fused_compile img/s" in table and "folded" not in table


# --------------------------------------------------------------------------------------
# The commands, end to end
# --------------------------------------------------------------------------------------


def test_check_and_bench_a_users_factory(capsys):
    code, out, err = run_cli(capsys, "check", "--model", "mypkg.models:make_net",
                             "--model-kwargs", "width=4,blocks=2", "--size", "16")
    assert code == 0, out + err
    assert "fusedres check: mypkg.models:make_net, batch 2, 3x16x16" in out
    assert "blocks fused: 4 of 4" in out and out.strip().endswith("PASS")
    assert "float64 PyTorch" in err  # progress, on stderr
    code, out, err = run_cli(capsys, "bench", "--model", "mypkg.models:make_net",
                             "--input-size", "3,16,16")
    assert code == 0, err
    if not torch.cuda.is_available():
        assert "GPU throughput needs a CUDA GPU" in out and "blocks fused: 2 of 2" in out


def test_check_timm_model_with_kwargs_and_nothing_fused(capsys):
    pytest.importorskip("timm")
    code, out, err = run_cli(capsys, "check", "--model", "timm:res2net50d", "--size", "32",
                             "--no-bench")
    assert code == 0, err
    assert "no residual block of a kind fusedres fuses" in out and "Bottle2neck x16" in out
    assert "nothing to check" in out
    code, _, err = run_cli(capsys, "check", "--model", "timm:resnet18d", "--model-kwargs",
                           "no_such_arg=1")
    assert code == 2 and "--model-kwargs" in err


def test_module_factory_from_the_command_line():
    # `python -m fusedres` itself, with the user's package on PYTHONPATH
    r = subprocess.run([sys.executable, "-m", "fusedres", "check", "--model",
                        "mypkg.models:make_net", "--model-kwargs", "width=4", "--size", "8",
                        "--no-bench"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=TESTS_ON_PATH)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "blocks fused: 2 of 2" in r.stdout and "PASS" in r.stdout


def test_checkpoint_is_loaded_before_converting(capsys, tmp_path, monkeypatch):
    net = make_net(width=4)
    with torch.no_grad():
        net.head.bias.fill_(7.0)
    path = tmp_path / "net.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    seen = []
    real = fusedres.check_model
    monkeypatch.setattr(fusedres, "check_model",
                        lambda m, x, **kw: seen.append(m.head.bias.clone()) or real(m, x, **kw))
    code, out, _ = run_cli(capsys, "check", "--model", "mypkg.models:make_net", "--model-kwargs",
                           "width=4", "--checkpoint", str(path), "--size", "16")
    assert code == 0 and torch.equal(seen[0], torch.full((10,), 7.0)), out


# --------------------------------------------------------------------------------------
# bf16 on a CPU: the interpreter's truncation allowed for, a wrong kernel still caught
# --------------------------------------------------------------------------------------


def variance_off_by_one_percent(model):
    """fusedres.convert, then a deliberate bug in the Triton kernels' results: each fused
    batch norm of a block normalises as if its variance (plus eps) were 1% larger, in low
    precision only (so the float64 rows, which would catch it, stay clean) and on the triton
    backend only (the reference backend, which the truncating computation runs, is right)."""
    fusedres.convert(model)

    def before(block, args):
        x = args[0]
        block._saved_weights = []
        if torch.is_autocast_enabled(x.device.type) and fusedres.backend_for(x.device) == "triton":
            with torch.no_grad():
                for m in block.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        block._saved_weights.append((m, m.weight.clone()))
                        m.weight.mul_(1.01 ** -0.5)

    def after(block, args, out):
        with torch.no_grad():
            for m, w in block._saved_weights:
                m.weight.copy_(w)
        block._saved_weights = []

    for name in fusedres.fused_blocks(model):
        block = model.get_submodule(name)
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)
    return model


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's rounding: needs TRITON_INTERPRET=1")
def test_bf16_check_on_the_cpu_end_to_end():
    from fusedres.cli.models import load_model
    model, _ = load_model("resnet18", seed=2)  # seed 2 failed before the allowance
    result = fusedres.check_model(model, tiny_input(2, 64, 3), dtype="bfloat16", seed=2,
                                  float64=False)
    assert result.status == "PASS", str(result)
    assert all(r.truncating is not None for r in result.rows)
    assert "rounds fp32 -> bf16 by truncation" in str(result) and "truncating" in str(result)


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's rounding: needs TRITON_INTERPRET=1")
# three seeds (three models and inputs; seed 2, the one that failed before the allowance,
# among them) and the end-to-end test above: each seed costs three interpreted resnet18 runs
@pytest.mark.parametrize("seed", range(3))
def test_bf16_check_passes_and_a_wrong_kernel_fails(seed):
    """check_model's bf16 rows for seeds 0-2, the runs that do not involve the kernels
    shared between the right fused model and the wrong one (the interpreter is slow)."""
    from fusedres.cli.models import load_model
    model, _ = load_model("resnet18", seed=seed)
    x = tiny_input(2, 64, seed + 1)  # the command line's CPU default input
    ref = api.Run(copy.deepcopy(model).double(), x.double(), None, seed)
    pytorch = api.Run(copy.deepcopy(model), x, torch.bfloat16, seed)
    truncating = api.truncating_run(fusedres.convert(copy.deepcopy(model)), x, seed)
    floor = api.FLOOR[torch.bfloat16]
    right = api.Run(fusedres.convert(copy.deepcopy(model)), x, torch.bfloat16, seed)
    rows = api.compare_dtype(right, pytorch, ref, floor, truncating)
    assert all(r.status == "ok" for r in rows), rows
    wrong = api.Run(variance_off_by_one_percent(copy.deepcopy(model)), x, torch.bfloat16, seed)
    rows = api.compare_dtype(wrong, pytorch, ref, floor, truncating)
    assert "FAIL" in [r.status for r in rows], rows


# --------------------------------------------------------------------------------------
# Layout: the command line is its own subpackage, and the wheel ships it
# --------------------------------------------------------------------------------------


def test_wheel_ships_the_cli_subpackage(tmp_path):
    try:  # build with this environment's setuptools when it has one (no download)
        import setuptools  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:  # a fresh venv (CI): pip fetches setuptools into an isolated build
        isolation = []
    # from a copy: setuptools writes build/ and fusedres.egg-info/ beside the sources
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".ci_venv", ".venv", "fusedres_runs"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                        *isolation, "-w", str(tmp_path), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    [wheel] = tmp_path.glob("fusedres-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("__init__", "check", "bench", "models", "common", "experiments"):
        assert f"fusedres/cli/{module}.py" in names
    assert "fusedres/api.py" in names and "fusedres/__main__.py" in names
