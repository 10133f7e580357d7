"""Test-suite setup shared by every test module."""
import os

# Triton kernels run on the CPU through the interpreter (docs/definitions.md, "Kernels"); this must
# be set before triton (or geomlab.kernels) is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
