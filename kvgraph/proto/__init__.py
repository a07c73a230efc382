"""Protocol helpers shared by the nodes that speak them (option declarations, address syntax)."""
