"""``gatedfwa --help`` (and each command's --help) answers without importing torch,
transformers or the other heavy packages: they are imported by the command that runs."""

import subprocess
import sys
from pathlib import Path

import gatedfwa

PACKAGE = Path(gatedfwa.__file__).resolve().parent
HEAVY = ("torch", "transformers", "triton", "numpy", "matplotlib", "tqdm", "safetensors")

_REPORT_HEAVY = f"""
import sys
from gatedfwa.cli.main import main
for argv in (["--help"], ["train", "--help"], ["generate", "--help"], ["plot", "--help"]):
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code == 0, (argv, exit_.code)
print("HEAVY", sorted(name for name in {HEAVY!r} if name in sys.modules), file=sys.stderr)
"""


def _heavy_imports(prelude: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", prelude + _REPORT_HEAVY], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("HEAVY "))
    return eval(line[len("HEAVY "):])  # a list literal printed above


def test_gatedfwa_help_imports_nothing_heavy():
    assert _heavy_imports("") == []
