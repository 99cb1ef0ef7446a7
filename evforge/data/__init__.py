"""The training side's reading of datasets: :mod:`.dataset` (``EventDataset`` over a built dataset's shards,
samplers, ``make_loader``), :mod:`.collate` (``EventBatch``: samples packed into one flat batch),
:mod:`.representations` (packed batches -> tensors: voxel grids, histograms, MEM images) and :mod:`.augment`
(event augmentations). It reads what :mod:`evforge.formats` defines and never writes datasets (that is
:mod:`evforge.dataset_builder`).
"""
