"""Supporting tools: input checks, training monitor and plots, speed benchmarks."""
