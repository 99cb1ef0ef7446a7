"""Golden fixtures of ECDDP's finetuning side from the public code: a checkpoint in the authors' layout, what
its ``SWINPad`` computes from it, and the DSEC input of label windows as its loader computes it.

Reference: Yan98/Event-Camera-Data-Dense-Pre-training at commit fedd0a8 (2024-10-15), run with torch 2.14.1 and
timm 1.0.31 (evforge's pins), kornia 0.7.1 and omegaconf (imported by model/pretrain_model.py), opencv,
albumentations, joblib, numba, h5py and hdf5plugin (data/DESC_dataset.py, data/seg_utils.py). ``torch_scatter``
is replaced by an equal ``scatter_mean`` (``_reference.py``). One shim: albumentations 2.x cannot build the
public 1.4 training pipeline (``RandomResizedCrop(height=, width=)`` is gone), which ``Sequence.__init__`` builds
although only training mode uses it, so the loaded module's ``A`` is a stand-in that builds nothing; the
evaluation mode run here never augments. The repository has no licence: nothing of it is copied here or into
the fixtures, which hold only seeded inputs, weights drawn here and the outputs of its code.

Rerun (about 20 s on 2 CPU cores)::

    git clone https://github.com/Yan98/Event-Camera-Data-Dense-Pre-training ecddp && git -C ecddp checkout fedd0a8
    pip install --target /tmp/refdeps kornia==0.7.1 omegaconf opencv-python-headless albumentations
    python tools/reference_fixtures/ecddp_finetune.py --ref ecddp --extra-path /tmp/refdeps

It writes into ``tests/fixtures/ecddp/`` (``tests/finetune/test_ecddp_finetune_reference.py`` checks evforge against
them without the reference):

* ``released_ecddp_tiny.pt.xz``: an xz-compressed ``torch.save`` of the public ``PretrainModel`` (a narrow Swin:
  embed 8, depths 2-2-2-2, heads 1-2-2-4, window 7, 6 input bins; small heads) in the authors' checkpoint layout,
  ``{"model": state_dict, "optimizer": stub, "current_epoch": 300}`` (trainer/base_trainer.py ``save``). Student
  and teacher weights are moved off their initial values independently (unit norms and zero biases would hide
  mix-ups), onto a 1/128 grid (backbones) and a 1/8 grid (heads) so the file compresses;
* ``finetune_swinpad.npz``: model/swin_model.py ``SWINPad`` as config/seg/swin_small.yml builds it (20 input
  channels, ``keep_patch_keys: false``, ``pretrained_checkpoint`` = that file; student, and teacher with
  ``load_teacher``) on a seeded 2 x 20 x 96 x 160 count input (feature maps 24x40 .. 3x5: window padding at
  every stage): the input (uint8), the fresh patch embedding it drew (``patch_embed.*``) and the 4 stage
  outputs of the student (and of the teacher for the first sample);
* ``finetune_dsec.npz``: a synthetic DSEC-Semantic sequence (raw events with ``ms_to_idx`` and ``t_offset``,
  a rectify map: identity except at the pixels events use, where it moves them by fractions of a pixel and, for
  some, off the sensor: x < 0, x >= 640, y >= 440, -40 <= y < 0 and y < -40; 9 label timestamps, one 640x440
  label image) and what ``DatasetProvider(mode="val")`` returns for it with the public config's
  representation (histogram, ``nr_events_data`` 10, ``nr_events_window`` 400 instead of 50 000 to keep it
  small): the 20-channel inputs of the two label windows it uses (labels 6 and 8; the first holds fewer than
  10 x 400 events) with ``resize: false`` (counts, 440x640) and ``resize: true`` (448x640), stored sparse, and
  the resized label.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "fixtures" / "ecddp"
COMMIT = "fedd0a8"

# pretraining network of the released checkpoint (6 voxel bins) and the finetuning SWINPad (20 channels)
ARCH = dict(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7)
HEADS = dict(head_n_prototypes=64, head_bottleneck_dim=16, head_nlayers=3, head_hidden_dim=32)
CROPS = dict(global_crops_scale=[0.32, 1.0], local_crops_number=2, local_crops_scale=[0.05, 0.32],
             global_crops_size=64, local_crops_size=32, input_size=32)
SWINPAD_INPUT = (2, 20, 96, 160)

# DSEC: config/seg/swin_small.yml's datasets section, with a 400-event chunk
DSEC_CFG = dict(nr_events_data=10, fixed_duration=False, delta_t_per_data=None, event_representation="histogram",
                nr_events_window=400, nr_bins_per_data=2, separate_pol=False, normalize_event=False,
                num_workers=0, batch_size=1, persistent_workers=False, pin_memory=False)
SEQUENCE = "zurich_city_13_a"  # a name the public DatasetProvider's test list knows
T_OFFSET = 1_600_000_000_000  # us; DSEC's offsets are absolute times
DURATION_MS = 60
LABEL_T = [2_300, 5_300, 8_300, 11_300, 14_300, 17_300, 26_431, 38_123, 57_777]  # us after t_offset


def quantise(x: torch.Tensor, step: float) -> torch.Tensor:
    return torch.round(x / step) * step


def perturb(module: torch.nn.Module, gen: torch.Generator, step: float, scale: float) -> None:
    """Every parameter moved off its initial value by N(0, scale), then onto multiples of ``step``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(quantise(p + torch.randn(p.shape, generator=gen) * scale, step))


def sparse(prefix: str, x: torch.Tensor, out: dict) -> None:
    """A mostly-zero tensor as its shape, flat nonzero indices and values (float32: exact)."""
    flat = x.reshape(-1)
    idx = flat.nonzero().reshape(-1)
    out[f"{prefix}_shape"] = np.array(x.shape, dtype=np.int64)
    out[f"{prefix}_index"] = idx.numpy().astype(np.int64)
    out[f"{prefix}_value"] = flat[idx].numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------- released checkpoint
def released_checkpoint(pm) -> bytes:
    """The authors' checkpoint layout (trainer/base_trainer.py ``save``) of a narrow ``PretrainModel``."""
    cfg = dict(dino=dict(loss_weight=1.0, **HEADS),
               ibot=dict(loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=[0.1, 0.5],
                         separate_head=True, **HEADS),
               crops=CROPS, train=dict(centering="sinkhorn_knopp"))
    torch.manual_seed(0)
    model = pm.PretrainModel(cfg=cfg, num_clusters=4, img_size=192, patch_size=4, in_chans=6,
                             out_indices=[0, 1, 2, 3], mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0,
                             drop_path_rate=0, ape=False, patch_norm=True, use_checkpoint=False, **ARCH)
    g = torch.Generator().manual_seed(1)
    for net in (model.student, model.teacher):  # independent moves: the teacher differs, as after EMA steps
        perturb(net["backbone"], g, step=1 / 128, scale=0.1)
        for name, head in net.items():
            if name != "backbone":
                perturb(head, g, step=1 / 8, scale=0.05)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.4,
                                                "amsgrad": False, "params": list(range(n_params))}]}
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer, "current_epoch": 300}, buf)
    return buf.getvalue()


def swinpad_outputs(sm, ckpt_path: Path) -> dict:
    """SWINPad (config/seg/swin_small.yml, narrow) loaded from the checkpoint, student and teacher."""
    x = torch.randint(1, 6, SWINPAD_INPUT, generator=torch.Generator().manual_seed(2))
    x = x * (torch.rand(SWINPAD_INPUT, generator=torch.Generator().manual_seed(3)) < 0.1)  # sparse event counts
    out = {"input": x.numpy().astype(np.uint8), "arch": json.dumps(ARCH)}
    for which in ("student", "teacher"):
        torch.manual_seed(4)  # the fresh patch embedding is the same draw for both
        net = sm.SWINPad(pretrain_img_size=192, patch_size=4, in_chans=20, mlp_ratio=4, qkv_bias=True, qk_scale=None,
                         drop_rate=0, drop_path_rate=0, ape=False, patch_norm=True, use_checkpoint=False,
                         pretrained_checkpoint=str(ckpt_path), keep_patch_keys=False,
                         load_teacher=which == "teacher", **ARCH).eval()
        with torch.no_grad():
            feats = net(x.float())
        for i, f in enumerate(feats):  # the teacher's first sample is enough to tell it from the student
            out[f"{which}_stage{i}"] = (f if which == "student" else f[:1]).numpy()
        if which == "student":
            for k, v in net.patch_embed.state_dict().items():
                out[f"patch_embed.{k}"] = v.numpy()
    return out


# ------------------------------------------------------------------------------------------------------ DSEC
def synthetic_sequence(seed: int = 5) -> dict:
    """Raw events (some pixels used many times), the rectify map entries of the used pixels, labels."""
    rng = np.random.default_rng(seed)
    n = 6000
    # every millisecond holds events (the public EventSlicer reads the label's millisecond and needs one there)
    t = np.sort(np.concatenate([np.arange(DURATION_MS) * 1000 + rng.integers(0, 1000, DURATION_MS),
                                rng.integers(0, DURATION_MS * 1000, n - DURATION_MS)])).astype(np.uint32)
    px = np.stack([rng.integers(0, 640, 1500), rng.integers(0, 480, 1500)], 1)
    edge = np.concatenate([np.stack([rng.integers(0, 3, 40), rng.integers(0, 480, 40)], 1),        # left edge
                           np.stack([rng.integers(637, 640, 40), rng.integers(0, 480, 40)], 1),    # right edge
                           np.stack([rng.integers(0, 640, 80), rng.integers(0, 12, 80)], 1)])      # top rows
    pixels = np.unique(np.concatenate([px, edge]), axis=0)
    pick = rng.integers(0, len(pixels), n)
    x, y = pixels[pick, 0].astype(np.uint16), pixels[pick, 1].astype(np.uint16)
    p = rng.integers(0, 2, n).astype(np.uint8)
    used = np.unique(np.stack([x, y], 1), axis=0)
    dxy = rng.uniform(-1.5, 1.5, (len(used), 2))
    ux, uy = used[:, 0], used[:, 1]
    dxy[ux < 3, 0] = -rng.uniform(0.0, 3.0, int((ux < 3).sum()))       # some to x in (-3, 0): trunc keeps > -1
    dxy[ux >= 637, 0] = rng.uniform(0.0, 4.0, int((ux >= 637).sum()))  # some beyond x = 639
    top = uy < 12
    dxy[top, 1] = -rng.uniform(5.0, 70.0, int(top.sum()))              # y in (-70, 7): rows -40..-1 and < -40
    values = (used + dxy).astype(np.float32)
    label = ((np.arange(640)[None, :] // 64 + 3 * (np.arange(440)[:, None] // 88)) % 11).astype(np.uint8)
    label[:6] = 255
    return {"x": x, "y": y, "t": t, "p": p, "t_offset": np.int64(T_OFFSET),
            "label_t": np.array(LABEL_T, dtype=np.int64) + T_OFFSET, "map_pixels": used.astype(np.uint16),
            "map_values": values, "label": label}


def write_sequence(root: Path, seq: dict) -> None:
    """The public loader's layout: <root>/{train,test}/<sequence>/{11classes/*.png, <sequence>_semantic_timestamps.txt,
    events/left/events.h5, events/left/rectify_map.h5}."""
    import h5py
    from PIL import Image

    (root / "train").mkdir(parents=True, exist_ok=True)
    s = root / "test" / SEQUENCE
    (s / "11classes").mkdir(parents=True)
    for i in range(len(seq["label_t"])):
        Image.fromarray(seq["label"], mode="L").save(s / "11classes" / f"{i:06d}.png")
    (s / f"{SEQUENCE}_semantic_timestamps.txt").write_text("".join(f"{int(v)}\n" for v in seq["label_t"]))
    ev = s / "events" / "left"
    ev.mkdir(parents=True)
    t = seq["t"].astype(np.int64)
    with h5py.File(ev / "events.h5", "w") as f:
        for k in ("p", "x", "y", "t"):
            f.create_dataset(f"events/{k}", data=seq[k])
        f.create_dataset("ms_to_idx", data=np.searchsorted(t, np.arange(DURATION_MS + 1) * 1000).astype(np.uint64))
        f.create_dataset("t_offset", data=seq["t_offset"])
    with h5py.File(ev / "rectify_map.h5", "w") as f:
        f.create_dataset("rectify_map", data=rectify_map(seq["map_pixels"], seq["map_values"]))


def rectify_map(pixels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(480, 640, 2) float32: identity, except ``values`` at the raw ``pixels`` (x, y)."""
    yy, xx = np.mgrid[0:480, 0:640]
    m = np.stack([xx, yy], -1).astype(np.float32)
    m[pixels[:, 1], pixels[:, 0]] = values
    return m


def dsec_inputs(dd, root: Path) -> dict:
    out = {}
    for resize in (False, True):
        ds = dd.DatasetProvider(dataset_path=str(root), mode="val", resize=resize, **DSEC_CFG).get_dataset()
        assert len(ds) == 2, len(ds)  # labels 6 and 8 of 9 (the first 6 dropped, then every second)
        tag = "resized" if resize else "counts"
        for i in range(len(ds)):
            item = ds[i]
            sparse(f"{tag}{i}", item["event_voxel"], out)
            if resize:
                out[f"label_resized{i}"] = item["label"].numpy().astype(np.uint8)
    return out


class _NoAlbumentations(types.SimpleNamespace):
    """Stand-in for the loaded module's ``albumentations``: builds nothing (only training mode would use it)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, help="checkout of Yan98/Event-Camera-Data-Dense-Pre-training")
    ap.add_argument("--extra-path", action="append", default=[],
                    help="folder with the reference-only packages (kornia 0.7.1, omegaconf, opencv, albumentations)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sys.path.extend(args.extra_path)  # appended: evforge's torch and numpy stay first
    sys.path.insert(0, str(HERE))
    import warnings

    warnings.filterwarnings("ignore")
    from _reference import load_reference

    mods = load_reference(args.ref, ["model.pretrain_model", "model.swin_model", "data.DESC_dataset"])
    dd = mods["data.DESC_dataset"]
    dd.A = _NoAlbumentations()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"reference": "Yan98/Event-Camera-Data-Dense-Pre-training", "commit": COMMIT,
                       "torch": torch.__version__, "arch": ARCH, "heads": HEADS, "dsec": DSEC_CFG,
                       "sequence": SEQUENCE})

    raw = released_checkpoint(mods["model.pretrain_model"])
    (out / "released_ecddp_tiny.pt.xz").write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "released.pt"
        ckpt.write_bytes(raw)
        swin = swinpad_outputs(mods["model.swin_model"], ckpt)
        np.savez_compressed(out / "finetune_swinpad.npz", meta=meta, **swin)

        seq = synthetic_sequence()
        write_sequence(Path(tmp) / "dsec", seq)
        np.savez_compressed(out / "finetune_dsec.npz", meta=meta, **seq, **dsec_inputs(dd, Path(tmp) / "dsec"))
    for name in ("released_ecddp_tiny.pt.xz", "finetune_swinpad.npz", "finetune_dsec.npz"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
