"""`protfold bench`: the memory-mode comparison (peak memory, saved activations, step time, exactness).

Entry point `protfold.bench.runner.main(argv)`; method in docs/benchmarks.md.
"""
