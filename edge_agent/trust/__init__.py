"""trust package of the edge agent."""
