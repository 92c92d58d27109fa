"""drivers package of the edge agent."""
