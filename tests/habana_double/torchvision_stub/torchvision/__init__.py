"""TEST STUB of ``torchvision`` -- import-only, NOT the real package.

Why it exists: ``optimum.habana.transformers.modeling_utils`` (hence
``adapt_transformers_to_gaudi``) imports every Gaudi model port, and the GLM-4V
port (``optimum/habana/transformers/models/glm4v/tokenization_chatglm.py:32``)
does ``from torchvision import transforms`` at module level, although
optimum-habana 1.21.2 does not declare torchvision as a dependency.  There is
no torchvision wheel on PyPI that works with a CPU-only torch 2.13 build (the
Linux wheels link against libtorch_cuda), so on this CPU machine the import
fails.

Tests put ``tests/habana_double/torchvision_stub`` on the path ONLY when the
real torchvision cannot be imported.  Every attribute of ``transforms`` raises,
so nothing can silently use it; only the GLM-4V tokenizer would.
"""

IS_TEST_DOUBLE = True
__version__ = "0.0.0+teststub"
