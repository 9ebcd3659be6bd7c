"""Make the repository root importable, so tests import the plugin as `library.*`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
