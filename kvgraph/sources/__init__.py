"""Source node types: where events enter a graph. One module per type; each registers itself."""
