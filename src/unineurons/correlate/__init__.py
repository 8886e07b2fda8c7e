"""The correlate stage: cross-seed neuron correlations, the rotation baseline, universal neurons.

Calling this package, ``unineurons.correlate(models=[...], tokens=DIR, out=RUN)``, runs the
stage: see :func:`unineurons.api.correlate`. Parts: ``config`` (:class:`CorrelateConfig`),
``engine`` (:func:`run_correlate`), ``plan`` / ``estimate`` (memory and time), ``summarize``.
"""

from .._stage import make_callable

make_callable(__name__)
