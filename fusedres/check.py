"""The check's old home: ``python -m fusedres check`` is fusedres/cli/check.py now, and
the check itself fusedres.check_model (fusedres/api.py). Kept so that existing imports
(``fusedres.check.main``, ``rel_err``, ``Run``) go on working."""
from __future__ import annotations

from .api import (FLOOR, TOL64, CheckResult, CheckRow, Run, check_model, compare64,
                  compare_dtype, norm_err, rel_err)

__all__ = ["FLOOR", "TOL64", "CheckResult", "CheckRow", "Run", "check_model", "compare64",
           "compare_dtype", "main", "norm_err", "rel_err"]


def main(argv=None) -> int:
    """``main(["check", ...])``: as ``python -m fusedres check ...``."""
    from .cli import main as cli_main
    return cli_main(argv)
