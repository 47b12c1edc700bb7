"""GPU measurements (see README.md here): scripts run from the checkout root as modules,
``python -m benchmarks.bench_decode ...``; every one times through ``benchmarks.timing``.

The scripts the tests load by file path (``tests/conftest.load_benchmark``: this folder on
``sys.path``, the checkout root not) import their siblings by plain name when the package is
not importable.
"""
