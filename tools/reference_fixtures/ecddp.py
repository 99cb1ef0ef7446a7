"""Golden fixtures of ECDDP's pretraining from the public code: run its modules, write what they return.

Reference: Yan98/Event-Camera-Data-Dense-Pre-training at commit fedd0a8 (2024-10-15), run with torch 2.14.1 and
timm 1.0.31 (evforge's pins), kornia 0.7.1 (the version its README pins) and omegaconf; ``torch_scatter`` is
replaced by an equal ``scatter_mean`` (``_reference.py``). The repository has no licence: nothing of it is copied
here or into the fixtures, which hold only seeded inputs, weights drawn here, and the outputs of its code.

Rerun (about a minute on 2 CPU cores)::

    git clone https://github.com/Yan98/Event-Camera-Data-Dense-Pre-training ecddp && git -C ecddp checkout fedd0a8
    pip install --target /tmp/refdeps kornia==0.7.1 omegaconf     # beside evforge's environment
    python tools/reference_fixtures/ecddp.py --ref ecddp --extra-path /tmp/refdeps

It writes ``tests/fixtures/ecddp/pretrain.safetensors`` (tensors) and ``pretrain.json`` (scalars, the
architecture and the provenance); ``tests/pretrain/test_ecddp_pretrain_reference.py`` checks evforge against them.

What is recorded, all on a narrow Swin (embed 8, depths 2-2-2-2, heads 1-2-2-4, window 7, 6 bins, fused 64)
with small heads (MLP 64-32-32-16, 64 prototypes) so the file stays small, at the public crop sizes:

* ``backbone/*``: the teacher ``SWIN``'s fused tokens of a 224 view, of its 192 and 96 corners, and of the 192
  corner with an iBOT mask;
* ``heads/*``: the image head (AttPool + MLP + prototypes) on the 224 tokens, the context head's AttPool with a
  one-hot context mask and its MLP + prototypes, the iBOT head per token;
* ``sinkhorn/*``: ``DINOLoss.sinkhorn_knopp_teacher`` at two temperatures and ``iBOTPatchLoss``'s;
* ``kmeans/*``: ``batch_cosine_KMeans`` on the view tokens and on tokens built to leave clusters empty, with the
  seed tokens its ``torch.rand`` drew;
* ``crops/*``: ``Transform`` (kornia) on the view: the boxes and flips it drew, the crops and the context grid;
* ``forward/*``: ``PretrainModel.forward_imp`` on those crops with masks from its ``collate_data``: every loss
  call's value, the total and the loss dict;
* ``voxel/*``: ``TartanairPretrainDataset.crop`` (crop + ``eventsToVoxel``) of synthetic events, the crop
  corner it drew, for a crop with events and one with fewer than 10;
* ``masks/*``: the histogram of masked-patch counts of its ``collate_data`` masks over many batches.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "tests" / "fixtures" / "ecddp"
COMMIT = "fedd0a8"

ARCH = dict(in_chans=2, embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7)
HEADS = dict(head_n_prototypes=64, head_bottleneck_dim=16, head_nlayers=3, head_hidden_dim=32)
CROPS = dict(global_crops_scale=[0.32, 1.0], local_crops_number=8, local_crops_scale=[0.05, 0.32],
             global_crops_size=192, local_crops_size=96, input_size=224)
NUM_CLUSTERS = 8


def f16(x: torch.Tensor) -> torch.Tensor:
    """Inputs stored exactly: values representable in float16, kept as float32."""
    return x.half().float()


def public_config() -> dict:
    return dict(dino=dict(loss_weight=1.0, **HEADS),
                ibot=dict(loss_weight=1.0, mask_sample_probability=0.5, mask_ratio_min_max=[0.1, 0.5],
                          separate_head=True, **HEADS),
                crops=CROPS, train=dict(centering="sinkhorn_knopp"))


def perturb(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.05) -> None:
    """Move every parameter off its initial value (zero biases, unit norms, g = 1 would hide mix-ups), onto
    float16-representable values (so the weights are stored exactly at half the size)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(f16(p + torch.randn(p.shape, generator=gen) * scale))


def crop_stats(images: torch.Tensor, gen: torch.Generator) -> dict:
    """Per crop and channel: sum, sum of squares (float64) and the values at 64 fixed pixels: enough to catch a
    wrong box, flip, interpolation or crop order without storing the crops."""
    n, c, h, w = images.shape
    pix = torch.randint(0, h * w, (64,), generator=gen)
    x = images.double()
    return {"sum": x.sum((2, 3)), "sumsq": (x * x).sum((2, 3)), "pixels": pix,
            "values": images.reshape(n, c, -1)[:, :, pix]}


def sparse(name: str, x: torch.Tensor, out: dict) -> None:
    """A mostly-zero tensor as its shape, flat nonzero indices and values (exact, and small)."""
    flat = x.reshape(-1)
    idx = flat.nonzero().reshape(-1)
    out[f"{name}/shape"] = torch.tensor(list(x.shape), dtype=torch.int64)
    out[f"{name}/index"] = idx.to(torch.int64)
    out[f"{name}/value"] = flat[idx].to(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, help="checkout of Yan98/Event-Camera-Data-Dense-Pre-training")
    ap.add_argument("--extra-path", action="append", default=[], help="folder with kornia 0.7.1 / omegaconf")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    sys.path.extend(args.extra_path)  # appended: evforge's torch and numpy stay first
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    from _reference import load_reference

    from evforge.pretrain.ecddp.public_layout import public_to_evforge

    mods = load_reference(args.ref, ["model.pretrain_model"])
    pm = mods["model.pretrain_model"]
    import kornia

    t: dict[str, torch.Tensor] = {}
    meta: dict = {"reference": "Yan98/Event-Camera-Data-Dense-Pre-training", "commit": COMMIT,
                  "torch": torch.__version__, "kornia": kornia.__version__, "arch": ARCH, "heads": HEADS,
                  "crops": CROPS, "num_clusters": NUM_CLUSTERS}

    # ---------------------------------------------------------------- the model, weights moved off their init
    torch.manual_seed(0)
    model = pm.PretrainModel(cfg=public_config(), num_clusters=NUM_CLUSTERS, img_size=192, patch_size=4,
                             out_indices=[0, 1, 2, 3], mlp_ratio=4, qkv_bias=True, drop_rate=0, drop_path_rate=0,
                             ape=False, patch_norm=True, **ARCH)
    g = torch.Generator().manual_seed(1)
    perturb(model.student, g)
    perturb(model.teacher, g)  # the teacher differs from the student, as after EMA steps
    model.train()  # the public train(): student in train mode (no dropout anywhere), teacher in eval
    weights = public_to_evforge(model.state_dict())
    t.update({f"weights/{k}": v.detach().half() for k, v in weights.items()})  # exact: f16-representable

    b = 2
    view = f16(torch.randn(b, ARCH["in_chans"], 224, 224, generator=torch.Generator().manual_seed(2)))
    t["input/view"] = view.half()  # exact
    teacher, K = model.teacher, NUM_CLUSTERS
    key = "x_norm_patchtokens"

    with torch.no_grad():
        # ---------------------------------------------------------------- backbone at the three crop sizes
        for s in (224, 192, 96):
            t[f"backbone/{s}"] = teacher.backbone(view[:, :, :s, :s], is_training=True)[key]
        mask = torch.rand(b, 144, generator=torch.Generator().manual_seed(3)) < 0.35
        t["backbone/mask192"] = mask
        t["backbone/192_masked"] = teacher.backbone(view[:, :, :192, :192], masks=mask, is_training=True)[key]

        # ---------------------------------------------------------------- heads
        tokens = t["backbone/224"]
        t["heads/image"] = teacher.dino_head(tokens, pool=True)
        assign = torch.randint(0, K, (b, tokens.shape[1]), generator=torch.Generator().manual_seed(4))
        t["heads/assign"] = assign
        onehot = torch.zeros(b, K, tokens.shape[1]).scatter_(1, assign.unsqueeze(1), 1).bool()
        pooled = teacher.cluster_head.att(tokens, K, mask=onehot)
        t["heads/context_att"] = pooled
        t["heads/context"] = teacher.cluster_head(pooled.flatten(0, 1))
        t["heads/patch"] = teacher.ibot_head(tokens[0])

        # ---------------------------------------------------------------- Sinkhorn-Knopp
        logits = f16(torch.randn(12, 64, generator=torch.Generator().manual_seed(5)) * 0.3)
        t["sinkhorn/logits"] = logits
        for temp in (0.04, 0.07):
            t[f"sinkhorn/dino_{temp}"] = model.dino_loss.sinkhorn_knopp_teacher(logits, teacher_temp=temp)
        t["sinkhorn/ibot_0.07"] = model.ibot_patch_loss.sinkhorn_knopp_teacher(
            logits, teacher_temp=0.07, n_masked_patches_tensor=torch.tensor([logits.shape[0]]))

        # ---------------------------------------------------------------- k-means
        def kmeans_case(name, x, seed):
            torch.manual_seed(seed)  # batch_cosine_KMeans draws torch.rand(N, L) first
            noise = torch.rand(x.shape[0], x.shape[1])
            torch.manual_seed(seed)
            a, c = pm.batch_cosine_KMeans(x, num_clusters=K)
            t[f"kmeans/{name}/tokens"] = x
            t[f"kmeans/{name}/seeds"] = torch.argsort(noise, dim=1)[:, :K]
            t[f"kmeans/{name}/assign"] = a
            t[f"kmeans/{name}/centroids"] = c

        kmeans_case("view", tokens, 6)
        dirs = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
        pick = torch.randint(0, 3, (b, 30), generator=torch.Generator().manual_seed(8))
        few = f16(dirs[pick])  # exact duplicates: seeds on the same direction tie, the later ones stay empty
        kmeans_case("empty", few, 10)

        # ---------------------------------------------------------------- crops (kornia) and masks
        torch.manual_seed(11)
        random.seed(11)
        images = model.aug(view)
        aug = model.aug
        for name, ops in (("global", aug.teacher1), ("local", aug.student)):
            crop, flip = ops
            src = crop._params["src"]  # (N, 4, 2) corners (x, y): top-left, top-right, bottom-right, bottom-left
            t[f"crops/{name}/boxes"] = torch.stack((src[:, 0, 0], src[:, 0, 1], src[:, 2, 0], src[:, 2, 1]), 1)
            t[f"crops/{name}/flips"] = flip._params["batch_prob"].bool()
        sg = torch.Generator().manual_seed(17)
        for name, key_ in (("global", "collated_global_crops"), ("local", "collated_local_crops")):
            for stat, value in crop_stats(images[key_], sg).items():
                t[f"crops/{name}/{stat}"] = value
        t["crops/global/grid"] = images["t_grid"]
        t["crops/masks"] = images["collated_masks"]

        # ---------------------------------------------------------------- full forward, every loss call recorded
        calls = []
        dino_forward = model.dino_loss.forward

        def recording(*a, **kw):
            out = dino_forward(*a, **kw)
            calls.append(out)
            return out

        model.dino_loss.forward = recording
        meta["forward"] = {}
        for temp in (0.04, 0.07):
            calls.clear()
            torch.manual_seed(12)
            noise = torch.rand(b, 196)
            torch.manual_seed(12)
            total, loss_dict = model.forward_imp(images, teacher_temp=temp)
            local_call, context_call, global_call = [float(c) for c in calls]
            meta["forward"][str(temp)] = {
                "total": float(total), "local_call": local_call, "context_call": context_call,
                "global_call": global_call, **{k: float(v) for k, v in loss_dict.items()}}
        t["forward/kmeans_seeds"] = torch.argsort(noise, dim=1)[:, :K]
        model.dino_loss.forward = dino_forward

        # ---------------------------------------------------------------- voxel grid of a pretraining crop
        etd = load_reference(args.ref, ["data.ETartanAir_dataset"]) if _has_cv2() else None
        if etd is None:
            raise SystemExit("the voxel fixtures need opencv (cv2) for data/ETartanAir_dataset.py: "
                             "pip install --target DIR opencv-python-headless and pass --extra-path DIR")
        dataset_cls = etd["data.ETartanAir_dataset"].TartanairPretrainDataset
        rng = np.random.default_rng(13)
        n = 6000
        events = np.zeros((n, 4), dtype=np.float32)
        events[:, 0] = rng.integers(0, 640, n)
        events[:, 1] = rng.integers(0, 480, n)
        events[:, 2] = np.sort(rng.integers(0, 1_000_000, n))  # microseconds < 2**24: exact in float32
        events[:, 3] = rng.integers(0, 2, n)  # v2e's p in {0, 1}
        t["voxel/events"] = torch.from_numpy(events)
        crop_size = 96
        for case, seed in (("dense", 14), ("sparse", 15)):
            ds = object.__new__(dataset_cls)
            ds.event_bins, ds.event_polarity, ds.train = 6, False, True
            ds.aug_params = {"crop_size": [crop_size, crop_size]}
            ev = events.copy()
            if case == "sparse":  # keep 7 events in the crop that this seed draws
                np.random.seed(seed)
                y0, x0 = np.random.randint(0, 480 - crop_size), np.random.randint(0, 640 - crop_size)
                inside = (ev[:, 0] >= x0) & (ev[:, 0] < x0 + crop_size) & (ev[:, 1] >= y0) & (ev[:, 1] < y0 + crop_size)
                drop = np.flatnonzero(inside)[7:]
                ev = np.delete(ev, drop, axis=0)
                t["voxel/sparse_events"] = torch.from_numpy(ev)
            np.random.seed(seed)
            y0, x0 = np.random.randint(0, 480 - crop_size), np.random.randint(0, 640 - crop_size)
            np.random.seed(seed)
            vox = ds.crop(ev)
            t[f"voxel/{case}/corner"] = torch.tensor([x0, y0])
            sparse(f"voxel/{case}/grid", vox.float(), t)
        meta["voxel"] = {"crop_size": crop_size, "bins": 6}

        # ---------------------------------------------------------------- mask statistics of collate_data
        random.seed(16)
        counts = []
        dummy = {"global_crops": torch.zeros(64, 1, 1, 1), "local_crops": torch.zeros(1), "img": torch.zeros(1),
                 "s_grid": torch.zeros(1), "t_grid": torch.zeros(1)}
        for _ in range(300):
            m = pm.collate_data(dummy)["collated_masks"]
            counts.append(m.sum(-1))
        counts = torch.cat(counts)
        t["masks/histogram"] = torch.bincount(counts, minlength=145).to(torch.int64)
        meta["masks"] = {"crops_per_batch": 64, "batches": 300, "grid": 12}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "pretrain.safetensors"))
    (out / "pretrain.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (out / "pretrain.safetensors").stat().st_size
    print(f"wrote {out / 'pretrain.safetensors'} ({size / 1e6:.2f} MB, {len(t)} tensors) and pretrain.json")


def _has_cv2() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
