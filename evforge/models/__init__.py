"""Network building blocks shared by pretraining and finetuning (no task logic here)."""
