"""The engine of the device agent: plan a desired state, apply it in a transaction, check health, drift.

Modules: :mod:`~edge_agent.engine.plan` (order and plan every resource through its driver),
:mod:`~edge_agent.engine.transaction` (journal, backup, apply, health checks, commit or undo,
crash recovery), :mod:`~edge_agent.engine.health` (bounded health checks) and
:mod:`~edge_agent.engine.drift` (compare the device with the installed release).
"""

__all__: list[str] = []
