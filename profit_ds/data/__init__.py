"""Tasks, instruction formatting and federated partitions."""
