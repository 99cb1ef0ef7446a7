"""evforge.dataset_builder (see the open issues for what lands here next)."""
