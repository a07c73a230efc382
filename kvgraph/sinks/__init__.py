"""Sink node types: where events leave a graph, and confirm delivery. One module per type."""
