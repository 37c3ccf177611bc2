"""``python -m fusedres check --model resnet50``: see fusedres/check.py.

Without a CUDA GPU the check runs the Triton kernels in Triton's interpreter, and Triton
reads TRITON_INTERPRET when it is imported: so it is set here, before anything imports
triton (importing fusedres does not; fusedres.kernels does, on first use). If triton was
imported already, the process runs itself again with the variable set.

``python -m fusedres degradation`` and ``python -m fusedres lesion`` (fusedres/experiments.py)
train networks: they leave TRITON_INTERPRET alone, so on a CPU the fused blocks run the
plain-PyTorch reference backend (the interpreter would take hours).
"""
import os
import sys


def _want_interpreter(argv) -> bool:
    if "TRITON_INTERPRET" in os.environ:
        return False  # the user's choice stands
    if "--device" in argv:
        i = argv.index("--device")
        if i + 1 < len(argv) and argv[i + 1].startswith("cuda"):
            return False
    import torch
    return not torch.cuda.is_available()


_EXPERIMENTS = ("degradation", "lesion")


def _main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] in _EXPERIMENTS:
        from fusedres.experiments import main as experiments_main
        return experiments_main(argv)
    if not argv or argv[0] != "check":
        print("usage: python -m fusedres {check|degradation|lesion} [options]  "
              "(--help after a command lists its options)", file=sys.stderr)
        return 2
    if _want_interpreter(argv):
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            os.execv(sys.executable, [sys.executable, "-m", "fusedres", *argv])
    from fusedres.check import main
    return main(argv)


if __name__ == "__main__":
    sys.exit(_main())
