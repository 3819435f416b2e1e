"""Feature distillation of a pruned student from its teacher (SPEC.md 1.2)."""
