"""The GPU benchmark's entry point (bench/gpu/__init__.py says what it measures and how):

python bench/gpu/run.py --help
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Run as a script, Python puts bench/gpu/ first on sys.path, where config.py, docs.py, report.py
# would shadow any top-level module of those names: the package is imported from the root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
