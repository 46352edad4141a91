"""Pure numpy detection: BN discovery, channel classes, refinement, tensor scans, census."""
