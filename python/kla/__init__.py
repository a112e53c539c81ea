"""kla: Python entry point of the Kaczmarz Linear Attention library, for validators.

Pure Python with numpy:
    kla.load(path) -> (tensors, metadata)        read a safetensors interchange file
    kla.save(path, tensors, metadata=None)       write one
    kla.golden_cases(dir=None)                   names of the golden cases (MANIFEST.json)
    kla.load_case(name)                          a Case: inputs, expected, options, tolerances
    kla.generate_inputs(entry)                   a case's inputs from its MANIFEST entry
    kla.compare(outputs, case, tol=None, tensors=None)
                                                 the report of `kla verify`, printed and returned
With libkla built (found via $KLA_LIB or the repository's build/), through ctypes:
    kla.forward(q, k, v, ...), kla.backward(...) our reference on any arrays
See docs/validating.md.
"""

from .golden import Case, generate_inputs, golden_cases, golden_dir, load_case
from .ops import KlaError, backward, forward, library
from .safetensors import load, save
from .verify import Report, compare

__version__ = "0.1.0"

__all__ = ["load", "save", "golden_cases", "golden_dir", "load_case", "Case", "generate_inputs",
           "compare",
           "Report", "forward", "backward", "library", "KlaError"]
