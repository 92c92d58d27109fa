"""Release trust: canonical JSON, keys, manifests, the verifier, sealed secrets, SSHSIG."""
