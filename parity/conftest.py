import sys
from pathlib import Path

# parity tests share the tests' torch-free helpers (random adapters, tiny models)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import isolated_rates  # noqa: E402,F401  (an autouse fixture)
