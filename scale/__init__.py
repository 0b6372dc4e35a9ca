"""Running at scale: Ulysses sequence parallelism and process groups, FSDP2, the memory planner."""
