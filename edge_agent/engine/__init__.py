"""engine package of the edge agent."""
