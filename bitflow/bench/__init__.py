"""bitflow's benchmarks (``make bench``, ``python -m bitflow.bench``): one module per table, see ``__main__``.

Importing this package sets glibc's malloc thresholds as every ``bitflow`` process does first
(:func:`bitflow.console.tune_allocator`, before torch allocates), so that each table measures what a default run
costs; the table headers say so (``malloc: tuned``). ``BITFLOW_MALLOC_TUNING=0`` or a ``GLIBC_TUNABLES`` of one's
own turn it off, as for ``bitflow`` (the allocator table starts its variants that way).
"""

from bitflow.console import tune_allocator

ALLOCATOR = tune_allocator()
