import sys
from pathlib import Path

# tests import their small helpers (ckpt_utils) by plain name
sys.path.insert(0, str(Path(__file__).parent))
