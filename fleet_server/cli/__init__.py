"""fleetctl sub-commands, one module each."""
