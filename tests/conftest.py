import sys
from pathlib import Path

# tests import their small helpers (ckpt_utils) by plain name
sys.path.insert(0, str(Path(__file__).parent))

from helpers import isolated_rates  # noqa: E402,F401  (an autouse fixture)
