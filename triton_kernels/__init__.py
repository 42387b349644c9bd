"""Triton kernels of lmfuse, installed as ``lmfuse.triton_kernels``.

Each module holds the ``@triton.jit`` kernels of one op (``_<op>_fwd_kernel``,
``_<op>_bwd_kernel``), their host launchers and the configs they ship with (``CONFIGS``).
Importing a module here runs the ``@triton.jit`` decorators, so ``TRITON_INTERPRET=1`` must be
set before the first import when kernels are to run on the CPU. The ops in ``lmfuse.ops``
import these modules lazily, on the first call that uses the Triton backend.
"""
