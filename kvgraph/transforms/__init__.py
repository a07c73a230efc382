"""Transform node types: map a batch of events to batches on their ports. One module per type."""
