"""Speed and memory benchmarks. Run `python -m benchmarks --help`; results go to benchmarks/results/."""
