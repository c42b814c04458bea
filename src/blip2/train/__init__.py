"""The training system: run config, optimiser and schedule, training state, the loop and the YAML recipes."""
