"""Reporting over MQTT: shared message schemas (``messages``), the broker link (``mqtt``, the only
paho user) and the outbox sender (``outbox``). Import the submodules; ``messages`` stays importable
without paho so the fleet server can share it.
"""

__all__: list[str] = []
