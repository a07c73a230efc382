"""Wire formats: decoding at sources, encoding at sinks. Nothing else in a graph sees bytes."""
