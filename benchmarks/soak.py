"""Command line of the soak driver, `pbs_vllm.evals.soak` (its docstring lists the options):

python benchmarks/soak.py --start --requests 100 --rounds 2 --sequential 100 --json soak.json
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pbs_vllm.evals.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
