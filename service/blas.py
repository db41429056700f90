"""numpy's BLAS on one thread in the served process.

The input gate's distances are one matrix product per model run (service.inference,
(16, 2048) x (2048, 64) for a full batch). OpenBLAS runs a product that size on a thread
per core and leaves those threads spinning after it, on the cores onnxruntime and the
decoders need: 3.5 ms more server CPU per image under load, about 12 % (bench/README.md,
`python -m bench.soak_cpu`). The service's own matrices are small: one thread is all
they need. threadpoolctl sets the limit on whichever BLAS numpy loaded.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def use_one_thread() -> None:
    """Limit every BLAS library loaded in this process to one thread."""
    threadpool_limits(limits=1, user_api="blas")
