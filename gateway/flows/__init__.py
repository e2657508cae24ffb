"""Flow pushes: releases (content-addressed bundles), the module cache, deployments in waves.

`models` holds the tables, `releases` and `module_cache` what operators upload, `targets` and
`deployments` how a release reaches devices, `scheduler` the one job that advances waves, and
`replies` the hook that moves each device's state as its agent reports.
"""
