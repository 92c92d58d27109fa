"""report package of the edge agent."""
