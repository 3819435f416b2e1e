"""The bottom layer: paths (local and gs://), mesh and sharding rules, errors, the storage deadline, host memory,
recipe files."""
