"""convert's coverage of timm's ResNet family, against the committed census.

Every model of the family (fusedres.coverage.PATTERNS) is built on the meta device,
converted, and compared with tests/data/coverage.json: which blocks fused, and why the
others did not. Any difference fails:
- fewer blocks fused than the table says is a regression;
- more blocks fused, or other reasons, fails too, with the command that updates the
  table (``python -m fusedres.coverage --write``): the table is what README's coverage
  table and the census numbers come from, so it must say what convert does now, and the
  change that made more models fuse is the one that should update it.
Models the table names that the installed timm lacks are skipped by name, and so are
models the installed timm has that the table does not name (a newer timm than the one
the table was made with: regenerate it).
"""
from __future__ import annotations

import json

import pytest
import torch
from torch.overrides import TorchFunctionMode

timm = pytest.importorskip("timm")

from fusedres import coverage  # noqa: E402

COMMITTED = json.loads(coverage.TABLE.read_text())
TABLE = COMMITTED["models"]
INSTALLED = set(coverage.family())
UPDATE = "update the table: python -m fusedres.coverage --write"


@pytest.mark.parametrize("name", sorted(INSTALLED | set(TABLE)))
def test_model_coverage(name):
    if name not in INSTALLED:
        pytest.skip(f"{name} is not in the installed timm {timm.__version__}")
    if name not in TABLE:
        pytest.skip(f"{name} is not in {coverage.TABLE.name} (made with timm "
                    f"{COMMITTED['timm']}, installed {timm.__version__}): {UPDATE}")
    want = TABLE[name]
    got = coverage.model_coverage(coverage.meta_model(name))
    if got == want:
        return
    what = (f"{name}: convert fused {got['fused']} of {got['blocks']} blocks "
            f"({got['status']}), the table says {want['fused']} of {want['blocks']} "
            f"({want['status']}); reasons now {got['reasons']}, in the table {want['reasons']}")
    if got["fused"] < want["fused"] or got["blocks"] != want["blocks"]:
        pytest.fail(f"regression: {what}")
    pytest.fail(f"coverage changed: {what}; if that is intended, {UPDATE}")


def test_table_summary_matches_its_models():
    assert COMMITTED["summary"] == coverage.summary(TABLE)


def test_readme_carries_the_table():
    readme = (coverage.TABLE.parents[2] / "README.md").read_text()
    assert coverage.readme_table(TABLE) in readme, (
        "README.md's coverage table differs from tests/data/coverage.json: paste "
        "`python -m fusedres.coverage --readme` into its 'Converting an existing model' section")


class _CountInits(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("normal_", "kaiming_normal_", "fill_", "zero_"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_meta_model_skips_initialisation_and_keeps_the_structure():
    with _CountInits() as seen:
        model = coverage.meta_model("resnet18")
    assert seen.calls == 0, f"{seen.calls} initialisation calls reached PyTorch"
    with _CountInits() as seen, torch.device("meta"):
        timm.create_model("resnet18", pretrained=False)
    assert seen.calls > 0  # the counter does see them when nothing skips them
    plain = timm.create_model("resnet18", pretrained=False)
    assert [(n, p.shape, p.dtype) for n, p in model.state_dict().items()] == \
           [(n, p.shape, p.dtype) for n, p in plain.state_dict().items()]
    assert all(p.is_meta for p in model.state_dict().values())
