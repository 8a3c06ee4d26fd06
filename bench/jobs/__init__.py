"""Job files of the benchmark (bench/bench.py). Each is also a plain module, for multiprocessing."""
