"""numavm's benchmark harness: numavm against QEMU, side by side.

Run ``python -m bench [--quick] [--only NAME,...] [--out BENCHMARKS.md]``.
See BENCHMARKS.md for what each row measures; `bench.runner` for the method
(warm-up, then numavm and its peers alternated run for run).
"""
