"""Build script. Package metadata lives in pyproject.toml.

csrc/ holds the CUDA C++ extension's sources once they land (packed-batch metadata and the projector
scatter/gather, with C++ CPU twins); until then this builds the pure-Python packages only.
"""

from setuptools import setup

setup()
