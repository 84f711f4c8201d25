import os
import sys

from hypothesis import settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile("sparsec", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("sparsec")
