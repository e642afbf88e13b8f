import sys
from pathlib import Path

# Test helper modules (sam_models.py, ...) live beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
