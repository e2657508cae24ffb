"""The edgefleet command line front for both sides."""
