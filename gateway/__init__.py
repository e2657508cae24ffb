"""edgefleet gateway: the manufacturer side."""
