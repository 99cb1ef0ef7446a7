"""``evforge demo``, ``pretrain``, ``finetune``, ``eval``, ``export-backbone``, ``import-checkpoint``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole chain on built-in procedural data (CPU, < 2 minutes)")
    p.add_argument("--out", default="evforge_demo", help="output folder (default: ./evforge_demo)")
    p.add_argument("--device", default="auto")
    p.add_argument("--method", default="ecddp", choices=["ecddp", "mem"],
                   help="pretraining stage: ECDDP on the streams, or MEM (tokenizer + masked modelling) on "
                        "the classification set")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, device=args.device, method=args.method, progress=not args.quiet)
    return 0


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining (ECDDP, MEM) on the shared trainer",
                       description="Train with a YAML config (task.name picks the method). Multi-GPU: "
                                   "--set trainer.devices=N, or launch under torchrun / srun.")
    add_train_args(p, "configs/pretrain/ecddp_tiny.yaml")
    p.set_defaults(func=_cmd_pretrain)


def add_train_args(p, example: str) -> None:
    """The arguments ``pretrain`` and ``finetune`` share: the config, overrides, run folder and resume."""
    p.add_argument("config_pos", nargs="?", metavar="CONFIG", help="YAML config (or use --config)")
    p.add_argument("--config", default=None, help=f"YAML config, e.g. {example}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.batch_size=32 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", default="auto", help="auto (resume from OUT if it has a checkpoint), none, or a .ckpt")


def resolve_config(path: str) -> str:
    """A config path as given, or else the packaged copy (``configs/pretrain/x.yaml`` works anywhere)."""
    if Path(path).exists():
        return path
    packaged = Path(__file__).resolve().parent / path
    if not packaged.exists() and Path(path).parts[:1] == ("configs",):
        packaged = Path(__file__).resolve().parent / "configs" / Path(*Path(path).parts[1:])
    return str(packaged) if packaged.exists() else path


def _train(args, command: str, get_task, init: str | None = None) -> int:
    """The body of ``pretrain`` and ``finetune``: config (+ overrides) -> task -> Trainer.fit."""
    from ..trainer.config import load_config
    from ..trainer.trainer import Trainer

    config = args.config or args.config_pos
    if not config:
        raise ValueError(f"{command}: give a config (CONFIG or --config)")
    config = resolve_config(config)
    cfg = load_config(config, args.overrides)
    if init:
        if not Path(init).is_file():
            raise InputError(init, "no such backbone file")
        cfg.setdefault("task", {})["init"] = str(init)  # set directly: a path is not YAML to parse
    task = get_task(cfg.get("task", {}).get("name", ""))
    out = args.out or str(Path("runs") / Path(config).stem)
    with Trainer(cfg, task, out_dir=out, resume=None if args.resume == "none" else args.resume,
                 command="evforge " + " ".join(args.argv)) as trainer:
        summary = trainer.fit()
    if summary.get("checkpoint"):
        print(f"{summary['stopped']} at step {summary['step']}: checkpoint {summary['checkpoint']}")
    return 0


def _cmd_pretrain(args) -> int:
    from ..pretrain import get_task

    return _train(args, "pretrain", get_task)


def add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="finetune a pretrained backbone: classification or DSEC segmentation",
                       description="Train with a YAML config (task.name: classification or segmentation), "
                                   "initialised from an exported backbone (--init).")
    add_train_args(p, "configs/finetune/ncaltech101_vit_s.yaml")
    p.add_argument("--init", default=None, help="backbone .safetensors from 'evforge export-backbone'")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from ..finetune import get_task

    return _train(args, "finetune", get_task, init=args.init)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finetuning checkpoint (or a run's best one): JSON, Markdown, PNGs")
    p.add_argument("ckpt", help="a .ckpt, or a run folder (its best validation checkpoint is used)")
    p.add_argument("--split", default=None, help="split to report (default: test if the dataset has one, else val)")
    p.add_argument("--out", default=None, help="report folder (default: next to the checkpoint)")
    p.add_argument("--metric", default=None, help="metric that picks the best checkpoint of a run folder")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from ..finetune.evaluate import evaluate

    res = evaluate(args.ckpt, split=args.split, out_dir=args.out, metric=args.metric, device=args.device)
    print(Path(res["files"]["markdown"]).read_text())
    print(f"reports: {Path(res['files']['json']).parent}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export-backbone", help="pretrained backbone -> timm-compatible .safetensors",
                       description="Write the backbone of an evforge pretraining checkpoint (timm keys, ECDDP's "
                                   "per-stage output norms, the Swin window options as metadata).")
    p.add_argument("ckpt", help="a pretraining checkpoint (runs/<name>/checkpoints/last.ckpt)")
    _add_backbone_output(p, "teacher", "ECDDP network (default teacher; the public finetuning code loads the student)")
    p.set_defaults(func=_cmd_export)


def _add_backbone_output(p, which: str, which_help: str) -> None:
    """The arguments ``export-backbone`` and ``import-checkpoint`` share: the output file, the network, the neck."""
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--which", default=which, choices=[which, "student" if which == "teacher" else "teacher"],
                   help=which_help)
    p.add_argument("--with-neck", action="store_true", help="also store ECDDP's fusion neck (ecddp_neck.*)")


def _cmd_export(args) -> int:
    from ..export import export_backbone

    print(export_backbone(args.ckpt, args.out, which=args.which, with_neck=args.with_neck))
    return 0


def add_import(sub) -> None:
    p = sub.add_parser("import-checkpoint", help="a method's released checkpoint -> an evforge backbone file",
                       description="Turn a checkpoint in a method's public layout (ecddp: the authors' "
                                   "{'model': {'student.backbone.*', 'teacher.backbone.*', heads...}, 'optimizer', "
                                   "'current_epoch'}) into the backbone file 'finetune --init' reads; the "
                                   "architecture is inferred from the weights.")
    p.add_argument("method", choices=["ecddp"], help="the layout of the checkpoint")
    p.add_argument("ckpt", help="the released checkpoint (.pt), loaded with weights_only=True")
    _add_backbone_output(p, "student", "network to import (default student, what the public finetuning code loads)")
    p.set_defaults(func=_cmd_import)


def _cmd_import(args) -> int:
    from ..export import import_checkpoint

    print(import_checkpoint(args.method, args.ckpt, args.out, which=args.which, with_neck=args.with_neck))
    return 0
