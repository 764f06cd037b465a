"""Class-incremental benchmarks and their loaders."""
