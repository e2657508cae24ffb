"""Flow pushes, device side: the `deploy` command and what applies it to the local Node-RED.

`handler` answers `deploy` (download the release, report progress), `deployer` installs modules,
deploys, verifies and rolls back, `store` keeps its state on disk (results, last-known-good, the
pending-write journal), `modules` fetches module tarballs from the gateway's cache.
"""
