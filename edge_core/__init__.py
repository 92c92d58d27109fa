"""edge-fleet core: the formats and checks the device agent and the fleet server share.

Release manifests and their verifier, sealed secrets, SSHSIG, bundles, resources, profiles and
their policy, the fleet file, durations, YAML loading, MQTT message schemas, the Git source with
its transport and limits, the config-section reader and the exception tree's base. It imports
neither ``edge_agent`` nor ``fleet_server``.
"""

__all__: list[str] = []
