"""``python -m fusedres degradation`` / ``lesion`` (fusedres/experiments.py, their command
lines in fusedres/cli/experiments.py) on a tiny budget.

The commands run in this process (a subprocess would pay torch's import each time); the
fixture puts back the global torch state they set (thread count, deterministic mode).
Under TRITON_INTERPRET=1 the residual blocks run the Triton kernels in the interpreter,
which is why the budgets are a single step on a few dozen images.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fusedres import FusedBasicBlock, FusedPreActBlock, experiments, use_backend
from fusedres.cli import main as cli_main
from fusedres.experiments import CifarNet, PlainBlock, lesioned, make_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 16 training images in one batch of 16: one step per network trains and saves all the same
TINY = ["--depths", "8", "--epochs", "1", "--train-size", "16", "--test-size", "16",
        "--batch", "16", "--quiet"]


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(autouse=True)
def torch_state():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    assert os.path.getsize(path) < 300_000


def test_dataset_is_deterministic_and_balanced():
    x1, y1 = make_dataset(40, 16, seed=3)
    x2, y2 = make_dataset(40, 16, seed=3)
    x3, _ = make_dataset(40, 16, seed=4)
    assert x1.shape == (40, 3, 16, 16) and y1.shape == (40,)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(y1.bincount(minlength=10), torch.full((10,), 4))
    assert torch.isfinite(x1).all()
    with pytest.raises(ValueError, match="size"):
        make_dataset(10, 4)


@pytest.mark.parametrize("preact", [False, True])
def test_networks_and_lesion(preact):
    # the reference backend: lesioning is backend-independent, and the interpreter is slow
    with use_backend("reference"):
        check_networks_and_lesion(preact)


def check_networks_and_lesion(preact):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    res, plain = CifarNet(14, "residual", preact), CifarNet(14, "plain", preact)
    fused = FusedPreActBlock if preact else FusedBasicBlock
    assert len(res.blocks) == 6 and all(isinstance(b, fused) for b in res.blocks)
    assert all(isinstance(b, PlainBlock) for b in plain.blocks)
    # the plain net is the residual net minus the shortcuts: same main-path parameters
    res_keys = {k for k in res.state_dict() if ".downsample." not in k}
    assert res_keys == set(plain.state_dict())
    for model in (res, plain):
        model.eval()
        before = model(x)
        assert before.shape == (4, 10)
        removable = [i for i in range(6) if model.block_removable(i)]
        assert removable == [0, 1, 3, 5]  # blocks 2 and 4 open a stage with stride 2
        for i in removable:
            with lesioned(model, i) as m:
                assert isinstance(m.blocks[i], torch.nn.Identity)
                out = m(x)
                assert out.shape == (4, 10) and torch.isfinite(out).all()
                assert not torch.allclose(out, before)
        with pytest.raises(ValueError, match="cannot be removed"):
            with lesioned(model, 2):
                pass
        # every block back in place: the lesions left a working, unchanged model
        assert torch.equal(model(x), before)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarNet(10, "plain")


def test_degradation_then_lesion(tmp_path, capsys):
    out = str(tmp_path)
    assert cli_main(["degradation", *TINY, "--out", out]) == 0
    text = capsys.readouterr().out
    for row in ("| 8 | plain |", "| 8 | residual |"):
        assert row in text
    assert "reference backend" in text or "Triton kernels" in text
    saved = torch.load(tmp_path / "results.pt", weights_only=True)
    assert set(saved["states"]) == {"plain-8", "residual-8"}
    assert len(saved["histories"]["plain-8"]["train_err"]) == 1
    if has_matplotlib():
        assert_png(tmp_path / "degradation.png")
    else:
        assert "pip install 'fusedres[plot]'" in text

    # lesion reads the saved networks: their unlesioned test error is the one training saw
    assert cli_main(["lesion", "--out", out, "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "networks from" in text
    assert "| removed block | stage | plain-8 | residual-8 |" in text
    assert "| 1 | 2 | shape changes | shape changes |" in text
    base = f"{100 * saved['histories']['plain-8']['test_err'][-1]:.1f}%"
    assert text.split("| none | – |")[1].splitlines()[0].split("|")[0].strip() == base
    if has_matplotlib():
        assert_png(tmp_path / "lesion.png")


def test_same_seed_same_result(tmp_path, capsys):
    tables = []
    for run in ("a", "b"):
        # the reference backend: the point is the seeding, and the interpreter is slow
        with use_backend("reference"):
            assert cli_main(["degradation", *TINY, "--out", str(tmp_path / run)]) == 0
        tables.append(capsys.readouterr().out.split("| depth |")[1].split("total")[0])
    # the seconds column differs between runs; everything else must not
    strip = lambda t: [row.rsplit("|", 2)[0] for row in t.splitlines()]  # noqa: E731
    assert strip(tables[0]) == strip(tables[1])


def test_lesion_trains_when_nothing_saved_and_plots_are_optional(tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(experiments, "_pyplot", lambda: None)  # as without matplotlib
    argv = ["lesion", "--out", str(tmp_path), "--preact", *TINY]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "training depths [8]" in text
    assert "| 0 | 1 |" in text and "| 2 | 3 | shape changes | shape changes |" in text
    assert "pip install 'fusedres[plot]'" in text
    assert not (tmp_path / "lesion.png").exists()
    assert (tmp_path / "results.pt").exists()


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["degradation", "--depths", "9"])
    assert e.value.code == 2 and "6n+2" in capsys.readouterr().err
    assert cli_main(["degradation", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["nonsense"])
    assert e.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_command_line_dispatch(monkeypatch, capsys):
    # through python -m fusedres: a new command answers --help (one subprocess: each pays
    # torch's import); the usage line, in process
    r = subprocess.run([sys.executable, "-m", "fusedres", "degradation", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--depths" in r.stdout
    from fusedres.__main__ import _main
    monkeypatch.setattr(sys, "argv", ["fusedres"])
    with pytest.raises(SystemExit) as e:
        _main()
    assert e.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err
