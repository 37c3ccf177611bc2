"""``python -m fusedres COMMAND``: see fusedres/cli/ (``--help`` lists the commands).

Without a CUDA GPU, ``check`` and ``bench`` run the Triton kernels in Triton's interpreter,
and Triton reads TRITON_INTERPRET when it is imported: so it is set here, before anything
imports triton (importing fusedres does not; fusedres.kernels does, on first use). If
triton was imported already, the process runs itself again with the variable set.

``degradation`` and ``lesion`` train networks: they leave TRITON_INTERPRET alone, so on a
CPU the fused blocks run the plain-PyTorch reference backend (the interpreter would take
hours).
"""
import os
import sys

_KERNEL_COMMANDS = ("check", "bench")


def _asks_for_cuda(argv) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1].startswith("cuda")
        if arg.startswith("--device="):
            return arg.split("=", 1)[1].startswith("cuda")
    return False


def _want_interpreter(argv) -> bool:
    if not argv or argv[0] not in _KERNEL_COMMANDS or "TRITON_INTERPRET" in os.environ:
        return False  # not a kernel command, or the user's choice stands
    if _asks_for_cuda(argv) or any(a in ("-h", "--help") for a in argv):
        return False
    import torch
    return not torch.cuda.is_available()


def _main() -> int:
    argv = sys.argv[1:]
    if _want_interpreter(argv):
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            os.execv(sys.executable, [sys.executable, "-m", "fusedres", *argv])
    from fusedres.cli import main
    return main(argv)


if __name__ == "__main__":
    sys.exit(_main())
