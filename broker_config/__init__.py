"""Mosquitto configuration for development, tests and production (TLS, per-device credentials,
topic ACL), the tools that manage broker accounts, and a private broker for tests and simulation.

Files: `dev.conf`, `test.conf.template`, `production.conf`, `fedmask.acl`, `cluster/` (EMQX
example), `README.md`. Modules: `credentials` (accounts), `embedded` (EmbeddedBroker), `configs`
(packaged files and edits), `passwords` (mosquitto password-file format), `runner` and `cli`
(`fedmask broker ...`).
"""
