"""edgefleet edge agent: runs on each machine beside Node-RED."""

__version__ = "0.1.0"
