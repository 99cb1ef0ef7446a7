"""evforge.finetune (see the open issues for what lands here next)."""
