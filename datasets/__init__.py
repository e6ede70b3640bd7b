"""Data for federated runs: loaders for the real formats, partitioners, and per-device files.

Modules (import what you need; this package imports nothing heavy by itself):

- `workloads`: ``load_workload(name, ...)`` and the ``WORKLOADS`` registry (the usual entry point)
- `federated`: ``DeviceData``, ``FederatedDataset``, ``save_device`` / ``load_device`` (.npz per device)
- `partition`: ``natural``, ``shards``, ``dirichlet``, ``iid``, ``matching_test_indices``
- `synthetic`: a centralized split turned into a federation by a synthetic partition
- loaders, one per format: `hmp`, `idx`, `shakespeare`, `leaf`, `cifar10`, `uci_har`
- `errors`: ``DatasetError``, raised for any missing or malformed data file
- `cli`: ``fedmask data partition`` / ``fedmask data info``

The rules for splitting each device's data into train and test are in docs/datasets.md.
"""
