"""Speed and memory measurements that write JSON: run from the repository root as
`python -m benchmarks.<name> --help`. Each calls the shipped tinytrain code."""
