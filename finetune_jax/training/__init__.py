"""Training: state, steps, losses, optimizer and rules, the builder, the loop and its helpers
(checkpoints, faults, logs, manifest)."""
