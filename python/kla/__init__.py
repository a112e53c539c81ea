"""kla: Python entry point of the Kaczmarz Linear Attention library, for validators.

Pure Python with numpy:
    kla.load(path) -> (tensors, metadata)        read a safetensors interchange file (as
                                                 strict as libkla's reader)
    kla.save(path, tensors, metadata=None)       write one
    kla.golden_cases(dir=None)                   names of the golden cases (MANIFEST.json)
    kla.load_case(name)                          a Case: inputs, expected, options, tolerances
    kla.generate_inputs(entry)                   a case's inputs from its MANIFEST entry
    kla.compare(outputs, case, tol=None, tensors=None)
                                                 the report of `kla verify`, printed and returned
With libkla 0.4, through ctypes:
    kla.forward(q, k, v, g=..., eta=...)         our reference on any arrays (everything
    kla.backward(q, k, v, ..., dout=...)         after v by keyword); **case.inputs works;
                                                 the family: gate=, precond=, g_atk=, ...
    kla.describe(backend), kla.last_algo()       what a context runs, what the last call ran
With PyTorch too (import kla.torch; kla itself never imports torch):
    kla.torch.chunk_gated_delta_rule, fused_recurrent_gated_delta_rule, chunk_kla,
    chunk_kda, chunk_kaczmarz_kda, chunk_precond_gated_delta_rule, chunk_precond_kda,
    chunk_precond_kla                            flash-linear-attention's signatures, autograd

Where things are found (an error names the variable and lists where it looked):
    libkla       $KLA_LIB; the checkout's build/; `pkg-config --variable=libdir kla`;
                 <prefix>/lib[/<multiarch>]; ctypes.util.find_library("kla")
    golden set   $KLA_GOLDEN; the checkout's golden/; `pkg-config --variable=goldendir
                 kla`; <prefix>/share/kla/golden; ./golden
Install (offline): pip install --no-build-isolation --no-deps ./python
See python/README.md and docs/validating.md.
"""

from .golden import Case, generate_inputs, golden_cases, golden_dir, load_case
from .ops import KlaError, backward, close_contexts, describe, forward, last_algo, library
from .safetensors import load, save
from .verify import Report, compare

__version__ = "0.4.0"

__all__ = ["load", "save", "golden_cases", "golden_dir", "load_case", "Case", "generate_inputs",
           "compare",
           "Report", "forward", "backward", "library", "describe", "last_algo",
           "close_contexts", "KlaError"]
