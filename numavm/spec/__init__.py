"""What the user asked: sizes and lists, host memory policies, the topology, its TOML form."""
