"""The whole stack on a GPU: python bench/gpu/stack/run.py --help (see __init__.py)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
# As bench/gpu/run.py: import the package from the root, not this folder's modules by name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu.stack.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
