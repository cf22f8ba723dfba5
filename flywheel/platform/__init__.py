"""Platform: the processes and what they are set up with.

Owns the topology (every long-running service, written once for both modes), supervisord's
configuration (the only writer) and calls, the reaper (no orphans), provisioning (buckets, IAM,
accounts, logins), the rendered configs, the front door's routes and port blocks, the deployment
records and replica groups, and bringing the stack up and down. Imports `clients` and `core`.
"""
