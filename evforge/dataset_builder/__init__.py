"""Datasets from events: converters of real and simulated data into HDF5 shards with a manifest (build, resume,
verify), and the training-side reader (EventDataset, make_loader)."""
