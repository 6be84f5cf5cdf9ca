"""vitpatch benchmarks: speed and peak memory of every op against its anchors.

``python -m bench [--quick] [--ops ...] [--device cpu|cuda] [--dtype ...] [--out DIR]`` runs
the cases of each op module (:mod:`bench.window_attention`, :mod:`bench.winft_attention`,
:mod:`bench.cluster_attention`, :mod:`bench.models`) through :mod:`bench.harness`, appends
one JSON row per measurement to ``DIR/<device-slug>.jsonl`` and prints ratio tables taken
within the run. ``python -m bench.plot DIR`` draws PNG plots from those rows.

Importing this package does no work.
"""
