# Put this folder on PYTHONPATH to run the tiny workflow as on a CPU without AVX512-BF16:
# bitsandbytes then takes its reference 4-bit CPU path (see tests/golden.py).
import bitsandbytes.backends.cpu.ops as _ops
import bitsandbytes.nn.modules as _modules

_modules.has_avx512bf16 = _ops.has_avx512bf16 = lambda: False
