"""Analyses: read a run directory and the models, add columns or tables.

The analyze stage (``unineurons analyze``) is :func:`unineurons.analyses.analyze.analyze_run`
(a correlate run) and :func:`~unineurons.analyses.analyze.analyze_models` (models on their own);
its parts: ``families`` (token-feature families), ``analyze_tables`` (top contexts, properties),
``weights`` / ``vocab`` / ``roles`` (weight statistics and functional roles).
"""
