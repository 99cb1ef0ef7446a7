"""ECDDP finetuning against the public code, through the golden fixtures of
``tools/reference_fixtures/ecddp_finetune.py`` (commit fedd0a8; the reference itself is not needed here):

* a checkpoint in the authors' layout imports (student / teacher), and the finetuning Swin built from it
  computes the public ``SWINPad``'s 4 stage outputs; evforge's defaults differ where they should;
* the 20-channel input of DSEC label windows equals the public loader's (counts exactly, 448x640 resize to
  float rounding) under the reference recipe, and differs under evforge's defaults;
* bad checkpoints give one-line errors naming the file;
* the imported checkpoint finetunes ``dsec_tiny`` for a few steps;
* ``dsec_swin_t_reference.yaml`` differs from ``dsec_swin_t.yaml`` exactly in its named options.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import evforge
from evforge.data.representations import stacked_histograms
from evforge.dataset_builder.build import build_dataset
from evforge.errors import InputError
from evforge.export import export_backbone, import_checkpoint, load_backbone, read_backbone
from evforge.finetune.rectify import Rectifier, find_rectify_map, rectify_events
from evforge.finetune.segmentation import (
    LabelWindowDataset,
    SegmentationModel,
    SegmentationTask,
    build_backbone,
    random_affine,
    task_options,
    warp_pair,
)
from evforge.trainer.config import load_config
from evforge.trainer.trainer import Trainer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ecddp"
CONFIGS = Path(evforge.__file__).resolve().parent / "configs" / "finetune"
SEQUENCE = "zurich_city_13_a"
TOL = 1e-5


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """The authors'-layout checkpoint the fixture script wrote (stored xz-compressed)."""
    path = tmp_path_factory.mktemp("released") / "ecddp_released.pt"
    path.write_bytes(lzma.decompress((FIXTURES / "released_ecddp_tiny.pt.xz").read_bytes()))
    return path


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("imported")
    return {w: import_checkpoint("ecddp", released, out / f"{w}.safetensors", which=w) for w in ("student", "teacher")}


@pytest.fixture(scope="module")
def swinpad() -> dict:
    with np.load(FIXTURES / "finetune_swinpad.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def dsec() -> dict:
    with np.load(FIXTURES / "finetune_dsec.npz") as f:
        return {k: f[k] for k in f.files}


def _rectify_map(d: dict) -> np.ndarray:
    yy, xx = np.mgrid[0:480, 0:640]
    m = np.stack([xx, yy], -1).astype(np.float32)
    m[d["map_pixels"][:, 1], d["map_pixels"][:, 0]] = d["map_values"]
    return m


def write_sequence(seq_dir: Path, d: dict) -> None:
    """The fixture's synthetic sequence in the public loader's layout (also a layout evforge's converter reads)."""
    (seq_dir / "11classes").mkdir(parents=True)
    for i in range(len(d["label_t"])):
        Image.fromarray(d["label"], mode="L").save(seq_dir / "11classes" / f"{i:06d}.png")
    (seq_dir / f"{seq_dir.name}_semantic_timestamps.txt").write_text("".join(f"{int(v)}\n" for v in d["label_t"]))
    ev = seq_dir / "events" / "left"
    ev.mkdir(parents=True)
    t = d["t"].astype(np.int64)
    with h5py.File(ev / "events.h5", "w") as f:
        for k in ("p", "x", "y", "t"):
            f.create_dataset(f"events/{k}", data=d[k])
        f.create_dataset("ms_to_idx", data=np.searchsorted(t, np.arange(int(t[-1]) // 1000 + 2) * 1000))
        f.create_dataset("t_offset", data=d["t_offset"])
    with h5py.File(ev / "rectify_map.h5", "w") as f:
        f.create_dataset("rectify_map", data=_rectify_map(d))


@pytest.fixture(scope="module")
def dsec_data(dsec, tmp_path_factory) -> dict:
    """The sequence as the test split (and, renamed, as a training sequence), converted raw and rectified."""
    root = tmp_path_factory.mktemp("dsec_ref")
    write_sequence(root / "src" / "test" / SEQUENCE, dsec)
    write_sequence(root / "src" / "train" / "zurich_city_00_a", dsec)
    window = int(json.loads(str(dsec["meta"]))["dsec"]["nr_events_window"]) * 10
    raw = build_dataset("dsec", root / "src", root / "raw", events_per_label=window, progress=False)
    rect = build_dataset("dsec", root / "src", root / "rect", events_per_label=window, rectify=True, progress=False)
    assert raw.num_errors == rect.num_errors == 0
    return {"src": root / "src", "raw": raw.out, "rect": rect.out, "chunk": window // 10}


def _dense(d: dict, prefix: str) -> np.ndarray:
    out = np.zeros(int(np.prod(d[f"{prefix}_shape"])), np.float32)
    out[d[f"{prefix}_index"]] = d[f"{prefix}_value"]
    return out.reshape(d[f"{prefix}_shape"])


# ----------------------------------------------------------------------------------------- checkpoint import
def test_import_infers_the_architecture_and_keeps_the_public_weights(released, imported):
    state = torch.load(released, weights_only=True)["model"]
    for which, path in imported.items():
        tensors, meta = read_backbone(path)
        assert meta["which"] == which and meta["source_format"] == "ecddp-public" and meta["current_epoch"] == 300
        assert meta["in_chans"] == 6 and meta["norm_eps"] == 1e-6
        assert meta["timm_kwargs"] == {"patch_size": 4, "embed_dim": 8, "depths": [2, 2, 2, 2],
                                       "num_heads": [1, 2, 2, 4], "window_size": 7, "mlp_ratio": 4.0,
                                       "img_size": 224, "always_partition": True}
        assert meta["swin_blocks"] == {"pad_first": True, "mask_padded_keys": False}
        p = f"{which}.backbone."
        for i in range(4):  # the stage output norms the public SWINPad loads as norm0..norm3
            assert torch.equal(tensors[f"stage_norms.{i}.weight"], state[f"{p}norm{i}.weight"])
        assert torch.equal(tensors["norm.bias"], state[f"{p}norm3.bias"])
        # timm puts stage i's patch merging at the start of stage i + 1
        assert torch.equal(tensors["layers.2.downsample.reduction.weight"],
                           state[f"{p}layers.1.downsample.reduction.weight"])
        assert torch.equal(tensors["layers.3.blocks.1.attn.qkv.weight"], state[f"{p}layers.3.blocks.1.attn.qkv.weight"])
        assert not any(k.startswith(("ecddp_neck.", "head")) or "relative_position_index" in k for k in tensors)
        net = load_backbone(path, strict_img_size=False)  # timm's keys load strictly
        assert net(torch.rand(1, 6, 64, 96)).shape[-1] == 64
    s, t = (read_backbone(imported[w])[0] for w in ("student", "teacher"))
    assert not torch.equal(s["layers.0.blocks.0.attn.qkv.weight"], t["layers.0.blocks.0.attn.qkv.weight"])
    with_neck = import_checkpoint("ecddp", released, released.parent / "neck.safetensors", with_neck=True)
    neck = read_backbone(with_neck)[0]
    assert torch.equal(neck["ecddp_neck.fuse.3.weight"], state["student.backbone.fpns.3.0.weight"])


def _reference_backbone(path, swinpad: dict, **options):
    """The finetuning Swin of the reference recipe from a backbone file, with the fresh patch embedding the public
    SWINPad drew (so that the two networks hold the same weights)."""
    net, spec = build_backbone("unused", 20, init=path, **options)
    assert net.patch_embed.proj.in_channels == 20
    net.patch_embed.load_state_dict({k[len("patch_embed."):]: torch.from_numpy(v) for k, v in swinpad.items()
                                     if k.startswith("patch_embed.")})
    return net.eval(), spec


def _max_diffs(net, x, swinpad, which) -> list[float]:
    with torch.no_grad():
        feats = net(x)
    return [float((f - torch.from_numpy(swinpad[f"{which}_stage{i}"])).abs().max()) for i, f in enumerate(feats)]


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_finetuning_swin_computes_the_public_swinpad(imported, swinpad, which):
    x = torch.from_numpy(swinpad["input"]).float()[: 2 if which == "student" else 1]
    net, spec = _reference_backbone(imported[which], swinpad, init_patch_embed="fresh")
    assert spec.timm_kwargs["always_partition"] is True and spec.swin_blocks["mask_padded_keys"] is False
    diffs = _max_diffs(net, x, swinpad, which)
    assert max(diffs) <= TOL, diffs
    # evforge's own window semantics (timm's shrunk windows, padded keys masked) change every stage
    net_e, _ = _reference_backbone(imported[which], swinpad, init_patch_embed="fresh", always_partition=False,
                                   mask_padded_keys=True)
    assert min(_max_diffs(net_e, x, swinpad, which)) > 1e-2
    # the other network of the checkpoint is another network
    other = "teacher" if which == "student" else "student"
    net_o, _ = _reference_backbone(imported[other], swinpad, init_patch_embed="fresh")
    assert min(_max_diffs(net_o, x, swinpad, which)) > 1e-2


def test_default_patch_embedding_is_adapted_not_fresh(imported, released):
    state = torch.load(released, weights_only=True)["model"]
    w6 = state["student.backbone.patch_embed.proj.weight"]
    adapted, _ = build_backbone("unused", 20, init=imported["student"])  # evforge's default: adapt
    w = adapted.patch_embed.proj.weight.detach()
    assert torch.allclose(w[:, :6], w6 * 6 / 20) and torch.allclose(w[:, 6:12], w6 * 6 / 20)
    assert torch.equal(adapted.patch_embed.norm.weight.detach(), state["student.backbone.patch_embed.norm.weight"])
    torch.manual_seed(0)
    fresh, _ = build_backbone("unused", 20, init=imported["student"], init_patch_embed="fresh")
    assert not torch.allclose(fresh.patch_embed.proj.weight.detach()[:, :6], w6 * 6 / 20)
    assert torch.equal(fresh.patch_embed.norm.weight.detach(), torch.ones(8))  # the norm is fresh too
    # everything else is the checkpoint's, stage norms included
    assert torch.equal(fresh.layers[1].blocks[0].mlp.fc2.weight.detach(),
                       state["student.backbone.layers.1.blocks.0.mlp.fc2.weight"])
    for i in range(4):
        assert torch.equal(fresh.stage_norms[i].bias.detach(), state[f"student.backbone.norm{i}.bias"])


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_bad_checkpoints_are_one_line_errors_naming_the_file(released, tmp_path):
    ckpt = torch.load(released, weights_only=True)
    state = ckpt["model"]
    student_only = {k: v for k, v in state.items() if not k.startswith("teacher.")}
    bad_shape = dict(state)
    bad_shape["teacher.backbone.layers.1.blocks.0.attn.qkv.weight"] = torch.zeros(48, 15)
    unknown = {**state, "teacher.backbone.extra.weight": torch.zeros(1)}
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases = {
        "missing.pt": (None, "no such checkpoint"),
        "garbage.pt": (None, "not a readable checkpoint"),
        "list.pt": ([1, 2, 3], "holds a list"),
        "nomodel.pt": ({"optimizer": {}, "current_epoch": 3}, "no 'model' state dict"),
        "student_only.pt": ({"model": student_only}, "no 'teacher.backbone.*' weights (backbones found: student)"),
        "bad_shape.pt": ({"model": bad_shape}, "weights do not fit the Swin inferred from them"),
        "unknown.pt": ({"model": unknown}, "not the public ECDDP Swin layout"),
    }
    for name, (obj, message) in cases.items():
        path = tmp_path / name if obj is None else _save(tmp_path / name, obj)
        with pytest.raises(InputError) as err:
            import_checkpoint("ecddp", path, tmp_path / "out.safetensors", which="teacher")
        text = str(err.value)
        assert text.startswith(str(path)) and message in text and "\n" not in text, text
    assert not (tmp_path / "out.safetensors").exists()
    # the wrong command for each kind of file says which one to use
    with pytest.raises(InputError, match="use 'evforge import-checkpoint ecddp'"):
        export_backbone(released, tmp_path / "x.safetensors")


def test_export_carries_stage_norms_and_window_options(tmp_path):
    """An evforge ECDDP training checkpoint: the stage norms 0-3 are exported without --with-neck, and the
    backbone's window options (here the reference preset's) reach the file and the finetuning network."""
    from evforge.pretrain.ecddp.model import ECDDPModel

    model_cfg = {"preset": "tiny", "always_partition": True, "mask_padded_keys": False}  # the public blocks
    model = ECDDPModel(model_cfg)
    cfg = {"task": {"name": "ecddp", "model": model_cfg}}
    ckpt = _save(tmp_path / "last.ckpt", {"model": model.state_dict(), "config": cfg, "progress": {"step": 7}})
    for which in ("teacher", "student"):
        out = export_backbone(ckpt, tmp_path / f"{which}.safetensors", which=which)
        tensors, meta = read_backbone(out)
        assert meta["which"] == which and meta["step"] == 7
        for i in range(4):
            assert torch.equal(tensors[f"stage_norms.{i}.weight"],
                               model.state_dict()[f"{which}.backbone.stage_norms.{i}.weight"])
        assert meta["swin_blocks"] == {"pad_first": True, "mask_padded_keys": False}
        assert meta["timm_kwargs"]["always_partition"] is True and meta["timm_kwargs"]["img_size"] == 64
        seg = SegmentationModel(in_chans=20, num_classes=11, init=out, channels=8, aux_channels=4)
        blk = seg.backbone.layers[3].blocks[0]
        assert blk.mask_padded_keys is False and tuple(blk.window_size) == (4, 4)  # not shrunk to the 2x2 map
        assert torch.equal(seg.backbone.stage_norms[1].weight.detach(), tensors["stage_norms.1.weight"])



# ------------------------------------------------------------------------------------------------- DSEC input
def _task(path, *overrides) -> tuple[SegmentationTask, dict]:
    cfg = load_config(CONFIGS / "dsec_swin_t.yaml", [f"data.path={path}", "data.val_sequences=[]", *overrides])
    task = SegmentationTask()
    task.cfg = cfg
    return task, cfg


def _inputs(data: dict, path, *overrides):
    task, cfg = _task(path, f"task.events_per_chunk={data['chunk']}", *overrides)
    ds = task.build_dataset(cfg, "test")
    assert [k.split("/")[1] for k in ds.keys] == ["000006", "000008"]  # every 2nd label from the 7th
    return task.inputs(task.collate([ds[0], ds[1]]))


REFERENCE_INPUT = ("task.rectify.rounding=trunc", "task.rectify.wrap_negative_rows=true")


def test_dsec_input_equals_the_public_loader(dsec, dsec_data):
    ref = (f"task.rectify.maps={dsec_data['src']}", *REFERENCE_INPUT)
    x, target = _inputs(dsec_data, dsec_data["raw"], *ref)
    assert x.shape == (2, 20, 440, 640)
    for i in range(2):  # counts: exact
        assert torch.equal(x[i], torch.from_numpy(_dense(dsec, f"counts{i}")))
    x, target = _inputs(dsec_data, dsec_data["raw"], *ref, "task.data_resize=[448, 640]")
    assert x.shape == (2, 20, 448, 640)
    for i in range(2):  # 440 -> 448 bilinear, align_corners: float rounding at most; labels nearest, exact
        assert float((x[i] - torch.from_numpy(_dense(dsec, f"resized{i}"))).abs().max()) <= TOL
        assert torch.equal(target[i], torch.from_numpy(dsec[f"label_resized{i}"]).long())


def test_dsec_input_evforge_defaults_differ(dsec, dsec_data):
    reference = [torch.from_numpy(_dense(dsec, f"counts{i}")) for i in range(2)]
    maps = f"task.rectify.maps={dsec_data['src']}"

    def differs(x):
        return [int((x[i] != reference[i]).sum()) for i in range(2)]

    x, target = _inputs(dsec_data, dsec_data["rect"])  # evforge: converter --rectify (rint, drop, then chunks)
    assert x.shape == (2, 20, 440, 640) and target.shape == (2, 440, 640)  # no resize: the model pads
    assert min(differs(x)) > 100
    x, _ = _inputs(dsec_data, dsec_data["raw"], maps, "task.rectify.rounding=rint",
                   "task.rectify.wrap_negative_rows=true")  # rounding alone
    assert min(differs(x)) > 100
    x, _ = _inputs(dsec_data, dsec_data["raw"], maps, "task.rectify.rounding=trunc")  # no row wrap-around alone
    wrapped = [reference[i][:, 400:440].sum() - x[i][:, 400:440].sum() for i in range(2)]
    assert min(differs(x)) > 0 and min(wrapped) > 0 and all(torch.equal(x[i][:, :400], reference[i][:, :400])
                                                             for i in range(2))


def test_rectify_rounding_wrap_and_errors(dsec_data, tmp_path):
    m = np.zeros((480, 640, 2), np.float32)
    m[0, :4] = [[-0.7, 3.2], [1.5, -0.2], [2.5, -1.0], [np.nan, 5.0]]
    ev = np.zeros(4, dtype=[("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])
    ev["x"] = [0, 1, 2, 3]
    trunc, rint = rectify_events(ev, m, "trunc"), rectify_events(ev, m, "rint")
    assert trunc["x"][:3].tolist() == [0, 1, 2] and trunc["y"][:3].tolist() == [3, 0, -1]
    assert rint["x"][:3].tolist() == [-1, 2, 2] and rint["y"][:3].tolist() == [3, 0, -1]
    assert trunc["x"][3] < -10_000  # a non-finite map entry: far off the sensor
    # y = -1 wraps to the last row only with the public histogram's quirk; y < -H never counts
    batch = {"x": torch.tensor([5, 5, 5]), "y": torch.tensor([-1, 2, -9]), "t": torch.arange(3),
             "p": torch.tensor([1, 1, 1], dtype=torch.int8), "batch_index": torch.zeros(3, dtype=torch.long),
             "offsets": torch.tensor([0, 3])}
    plain = stacked_histograms(batch, chunks=1, events_per_chunk=3, height=8, width=8)
    wrapped = stacked_histograms(batch, chunks=1, events_per_chunk=3, height=8, width=8, wrap_negative_rows=True)
    assert float(plain.sum()) == 1 and float(wrapped[0, 0, 7, 5]) == 1 and float(wrapped.sum()) == 2
    with pytest.raises(InputError, match="no rectify_map.h5 for sequence 'zurich_city_99_a'"):
        find_rectify_map(dsec_data["src"], "zurich_city_99_a")
    with pytest.raises(ValueError, match="rectified by the converter"):
        LabelWindowDataset(dsec_data["rect"], "test", rectifier=Rectifier(dsec_data["src"]))


# -------------------------------------------------------------------------------------------- augmentation
def test_padded_canvas_reflect_border_and_shift_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 10 * 16, dtype=torch.float32).view(1, 2, 10, 16)
    t = torch.arange(160).view(1, 10, 16) % 7
    # the whole 14 x 20 canvas as the crop: the input in the middle, mirrored (or zero / ignored) around it
    theta = random_affine(1, (10, 16), (14, 20), generator=g, pad_to=(14, 20))
    xo, to = warp_pair(x, t, theta, (14, 20))
    assert torch.equal(xo[..., 2:12, 2:18], x) and torch.equal(to[..., 2:12, 2:18], t)
    assert float(xo[..., :2, :].abs().sum()) == 0 and bool((to[:, :2] == 255).all())
    xr, tr = warp_pair(x, t, theta, (14, 20), border="reflect")
    assert torch.equal(xr[..., 2:12, 2:18], x) and torch.equal(xr[..., 1, 2:18], x[..., 0, :])
    assert torch.equal(tr[:, 0, 2:18], t[:, 1]) and not bool((tr == 255).any())
    # shift / zoom come with the rotation's probability and stay within their limits
    base = random_affine(64, (10, 16), (10, 16), generator=torch.Generator().manual_seed(1))
    jit = random_affine(64, (10, 16), (10, 16), generator=torch.Generator().manual_seed(1), rotate_prob=1.0,
                        shift=0.05, scale_jitter=0.05)
    assert torch.allclose(base[:, :, :2], torch.eye(2).expand(64, 2, 2))
    zoom = 1 / jit[:, 0, 0]
    assert bool(((zoom > 0.95 - 1e-6) & (zoom < 1.05 + 1e-6)).all()) and float(zoom.std()) > 0.01
    assert float(jit[:, :, 2].abs().max()) <= 0.1 * 1.06 and float(jit[:, :, 2].abs().max()) > 0.05


# ------------------------------------------------------------------------------------------------ the recipe
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_reference_config_differs_from_evforge_defaults_only_in_named_options():
    evf, ref = (_flat(load_config(CONFIGS / name)) for name in ("dsec_swin_t.yaml", "dsec_swin_t_reference.yaml"))
    assert set(evf) == set(ref)  # every option the reference sets exists, with evforge's default, in dsec_swin_t
    changed = {k: ref[k] for k in ref if ref[k] != evf[k]}
    assert changed == {
        "task.data_resize": [448, 640], "task.rectify.maps": "data/DSEC", "task.rectify.rounding": "trunc",
        "task.rectify.wrap_negative_rows": True, "task.init_patch_embed": "fresh", "task.augment.pad_to": [500, 700],
        "task.augment.border": "reflect", "task.augment.shift": 0.05, "task.augment.scale_jitter": 0.05,
        "task.model.always_partition": True, "task.model.mask_padded_keys": False, "data.path": "data/dsec_raw",
        "data.val_split": "test", "data.val_sequences": [], "optim.decay_all": True}
    cfg = load_config(CONFIGS / "dsec_swin_t_reference.yaml")
    task_options(cfg)  # valid task options
    assert cfg["schedules"]["lr"]["warmup_cosine"] == {"start": 0.0, "peak": 0.008, "end": 0.0, "warmup_epochs": 10,
                                                       "batch_ref": 256}
    model = SegmentationModel(in_chans=20, num_classes=11, tiny=True, channels=8, aux_channels=4)
    task = SegmentationTask()
    groups = task.param_groups(model, cfg)  # the public AdamW: every parameter decays
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    default = task.param_groups(model, load_config(CONFIGS / "dsec_swin_t.yaml"))
    assert any(g["weight_decay"] == 0.0 and "backbone.stage_norms.0.weight" in g["param_names"] for g in default)


def test_released_checkpoint_finetunes_dsec_tiny(imported, dsec_data, tmp_path):
    """The import, then a few dsec_tiny steps from it with the reference recipe's backbone options: the Swin is
    the checkpoint's (not dsec_tiny's), the loss is finite and falls, and the backbone moves."""
    cfg = load_config(CONFIGS / "dsec_tiny.yaml", [
        f"data.path={dsec_data['raw']}", f"task.init={imported['student']}", "task.init_patch_embed=fresh",
        f"task.rectify.maps={dsec_data['src']}", *REFERENCE_INPUT, "task.model.always_partition=true",
        "task.model.mask_padded_keys=false", "optim.decay_all=true", "data.batch_size=3", "trainer.max_steps=6",
        "trainer.val_every_n_steps=null", "checkpoint.keep_every_n_steps=null", "task.augment.scale=[1.0, 1.0]",
        "task.augment.ratio=[1.0, 1.0]", "task.augment.hflip=0.0", "task.augment.rotate_prob=0.0",
        "log.progress=false", "log.tensorboard=false"])
    tensors, _ = read_backbone(imported["student"])
    with Trainer(cfg, SegmentationTask(), out_dir=tmp_path / "run", resume=None) as trainer:
        bb = trainer.raw_model.backbone
        qkv = bb.layers[0].blocks[0].attn.qkv.weight
        assert qkv.shape == (24, 8) and torch.equal(qkv.detach(), tensors["layers.0.blocks.0.attn.qkv.weight"])
        assert torch.equal(bb.stage_norms[2].weight.detach(), tensors["stage_norms.2.weight"])
        before = qkv.detach().clone()
        summary = trainer.fit()
        after = bb.layers[0].blocks[0].attn.qkv.weight.detach()
    assert summary["step"] == 6 and not torch.equal(before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = np.array([r["loss"] for r in rows if r["split"] == "train"])
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert losses[-2:].mean() < losses[:2].mean(), losses.round(3)
