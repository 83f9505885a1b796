"""Benchmarks for ocidx: a generator of realistic layout trees and a runner (``python -m benchmarks``).

Figures are printed beside a baseline measured in the same run, as a ratio;
``benchmarks/RESULTS.md`` records the latest run with the machine and command.
"""
