"""Reports of merges, sweeps and benchmarks: tables, the paired noise test and plots."""
