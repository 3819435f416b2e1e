"""The bottom layer: paths (local and gs://), mesh and sharding rules, errors, host memory, recipe files."""
