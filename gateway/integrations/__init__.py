"""GuardGate inside other tools."""
