"""Make the modules in Code/ importable the way the entry scripts import them."""

import sys
from pathlib import Path

CODE_DIR = Path(__file__).resolve().parent.parent / "Code"
sys.path.insert(0, str(CODE_DIR))
