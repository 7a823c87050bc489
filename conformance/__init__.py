"""The gipo-core conformance suite: drivers, registry, mpmath oracle and checks (see README.md here)."""
