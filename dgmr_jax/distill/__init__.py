"""Feature distillation of a pruned student from its teacher (docs/method.md, Recovery by distillation)."""
