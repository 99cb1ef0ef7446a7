"""A short MEM stage for ``evforge demo --method mem``: tokenizer, then masked event modelling, then export.

Runs ``configs/pretrain/mem_dvae_tiny.yaml`` and ``mem_tiny.yaml`` (toy sizes, CPU-friendly) on a samples
dataset (the demo's synthetic classification shards) for a few steps each and exports the ViT as the same
timm-compatible backbone file ECDDP's run gives, for finetuning.
"""

from __future__ import annotations

import logging
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"  # packaged
TINY_DVAE_CONFIG = CONFIGS / "mem_dvae_tiny.yaml"
TINY_MEM_CONFIG = CONFIGS / "mem_tiny.yaml"
DEMO_DVAE_STEPS = 30
DEMO_MEM_STEPS = 30

logger = logging.getLogger(__name__)


def pretrain_mem(dataset, run_dir, *, dvae_steps: int = DEMO_DVAE_STEPS, mem_steps: int = DEMO_MEM_STEPS,
                 device: str = "auto", progress: bool = True) -> Path:
    """Train the tiny tokenizer on ``dataset`` (``run_dir/dvae``), MEM with it (``run_dir/mem``), export the
    backbone to ``run_dir/backbone.safetensors`` and return that path; each stage's line is logged at INFO."""
    from ...export import export_backbone
    from ...trainer.config import load_config
    from ...trainer.trainer import Trainer
    from .. import get_task

    run_dir = Path(run_dir)
    common = [f"data.path={dataset}", "checkpoint.every_n_steps=null",
              f"trainer.accelerator={'cpu' if device == 'cpu' else 'auto'}",
              f"log.progress={'true' if progress else 'false'}"]
    cfg = load_config(TINY_DVAE_CONFIG, [*common, f"trainer.max_steps={dvae_steps}"])
    with Trainer(cfg, get_task("mem_dvae"), out_dir=run_dir / "dvae", resume=None) as trainer:
        tok = trainer.fit()
    val = tok["val"]
    logger.info(f"MEM tokenizer, {tok['step']} steps (recon MSE {tok['train'].get('recon_mse', float('nan')):.4f}; "
                f"val {val.get('recon_mse', float('nan')):.4f}, codebook usage "
                f"{val.get('codebook_usage', float('nan')):.1%}): {run_dir / 'dvae'}")
    cfg = load_config(TINY_MEM_CONFIG, [*common, f"trainer.max_steps={mem_steps}",
                                        f"task.tokenizer={tok['checkpoint']}"])
    with Trainer(cfg, get_task("mem"), out_dir=run_dir / "mem", resume=None) as trainer:
        summary = trainer.fit()
    backbone = export_backbone(summary["checkpoint"], run_dir / "backbone.safetensors")
    logger.info(f"MEM pretraining, {summary['step']} steps (loss {summary['train']['loss']:.2f}, masked-token "
                f"accuracy {summary['train'].get('mlm_acc', float('nan')):.1%}): {run_dir / 'mem'}; "
                f"backbone: {backbone}")
    return backbone
