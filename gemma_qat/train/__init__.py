"""QAT distillation training: run config, sharded state, the jitted step and the loop."""
