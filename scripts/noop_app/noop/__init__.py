"""No-op Flower app: measures the per-message cost of a deployment without any work."""
