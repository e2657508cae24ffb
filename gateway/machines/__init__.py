"""The registry as people use it: machines by name, their owners, labels, filters and health."""
