import os
import sys

# the library is a flat set of top-level modules (nanoGPT style): make them importable from tests/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
