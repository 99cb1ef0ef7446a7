"""evforge's MEM against the public code (tum-vision/mem c60c930) through golden fixtures, without the reference.

``tests/fixtures/mem/reference.{npz,json}`` were written by ``tools/reference_fixtures/mem.py`` running the
reference's own functions on seeded inputs (see its docstring to rerun). Images must match exactly, network
outputs to 1e-5. The reference recipes are read from ``configs/*/mem_*_reference.yaml``, so these tests also
check that those configs reproduce the public code.
"""

import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

import evforge
from evforge.data.collate import collate_events
from evforge.data.representations import remove_hot_pixels
from evforge.finetune.backbones import create_model, load_init, resolve_spec
from evforge.finetune.beit import block_dropout, per_layer_rel_pos_bias, reset_fc_norm
from evforge.finetune.layer_decay import layer_decay_groups
from evforge.formats.events import make_events
from evforge.pretrain.mem import BEiTMaskGenerator, DiscreteVAE, DVAEConfig, MEMConfig, MEMModel, RandomMaskGenerator
from evforge.pretrain.mem.inputs import Draws, MEMInputConfig, mem_inputs
from evforge.pretrain.mem.randaugment import (
    ALL_OPS,
    RandAugmentConfig,
    apply_op,
    color_jitter,
    draw_ops,
    rand_augment,
    signed_magnitudes,
)
from evforge.trainer.config import load_config
from evforge.trainer.schedules import make_schedule

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mem"
CONFIGS = Path(evforge.__file__).resolve().parent / "configs"
DATASET = {"ncaltech101": "ncaltech101", "atis_real": "ncaltech101", "ncars": "ncars", "ncars_real": "ncars",
           "nimagenet": "nimagenet"}


@lru_cache(maxsize=1)
def fixture():
    with np.load(FIXTURES / "reference.npz", allow_pickle=False) as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    return arrays, json.loads((FIXTURES / "reference.json").read_text())


def t(key):
    return fixture()[0][key]


def meta(key):
    return fixture()[1][key]


def test_fixtures_name_the_reference_commit():
    prov = meta("provenance")
    assert prov["repository"] == "tum-vision/mem" and prov["commit"] == "c60c930"
    size = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert size < 3e6  # a few MB at most


# ------------------------------------------------------------------------------------------- event images
def _config(geo: str, recipe: str) -> tuple[MEMInputConfig, tuple[int, int]]:
    """The input config of configs/pretrain/mem_<dataset>[_reference].yaml at the fixture's size and window."""
    setup = meta(f"images/{geo}/setup")
    name = f"mem_{DATASET[geo]}_reference.yaml" if recipe == "reference" else f"mem_{DATASET[geo]}.yaml"
    task = load_config(CONFIGS / "pretrain" / name)["task"]
    k = meta("images/max_events")
    rep = dict(task["representation"])
    rep["color_jitter"] = dict(rep.get("color_jitter", {}))
    if rep.get("train_resize"):
        rep["train_resize"] = [round(v * setup["size"][0] / 224) for v in rep["train_resize"]]
    task = {**task, "input_size": setup["size"], "augment": {**task["augment"], "max_events": k},
            "val_window": {**task["val_window"], "max_events": k}, "representation": rep}
    return MEMInputConfig.from_task(task), tuple(setup["sensor_size"])


def _batch(geo: str) -> dict:
    n = meta(f"images/{geo}/setup")["num_samples"]
    items = []
    for j in range(n):
        e = t(f"images/{geo}/events{j}").numpy()
        items.append({"events": make_events(e[:, 0], e[:, 1], e[:, 2].astype(np.int64), e[:, 3]), "label": 0,
                      "key": str(j)})
    return collate_events(items)


def _draws(geo: str, mode: str, cfg: MEMInputConfig, sensor) -> Draws:
    draws = meta(f"images/{geo}/{mode}/draws")
    d = Draws(starts=torch.tensor([x["start"] for x in draws]))
    if mode in ("train", "pretrain"):
        d.time_flip = torch.tensor([x["time_flip"] for x in draws])
        d.flip_x = torch.tensor([x["flip_x"] for x in draws])
        d.shifts = torch.tensor([x["shift"] for x in draws])
        d.ops = torch.tensor([x["ops"] for x in draws])
        if cfg.crop_source(sensor, True) is not None:
            d.crop = torch.tensor([x["crop"] for x in draws])
    if "jitter" in draws[0]:
        d.jitter = torch.tensor([x["jitter"] for x in draws], dtype=torch.float64)
    return d


IMAGE_CASES = [(g, m) for g in ("ncaltech101", "ncars", "nimagenet", "ncars_real", "atis_real")
               for m in ("train", "val")] + [("ncaltech101", "pretrain"), ("ncaltech101", "pretrain_val")]


@pytest.mark.parametrize("geo, mode", IMAGE_CASES)
def test_event_images_equal_the_reference_pipeline(geo, mode):
    """build_transformNPY (and DataAugmentationForPT's ColorJitter) vs mem_inputs with the reference config:
    per-sample canvas / N-ImageNet's scaled canvas and crop, uint8 wrap, ON-only N-Cars, hot pixels and
    normalisation after the resize, RandAugment on uint8; bit for bit."""
    if f"images/{geo}/{mode}" not in fixture()[0]:
        pytest.skip(f"the fixture has no {geo} sample (its real recording was absent when it was written)")
    cfg, sensor = _config(geo, "reference")
    if mode.startswith("pretrain"):
        assert cfg.color_jitter.enabled and cfg.color_jitter.at_val  # MEM jitters the validation images too
    else:
        cfg.color_jitter.brightness = cfg.color_jitter.saturation = 0.0
    train = mode in ("train", "pretrain")
    got = mem_inputs(_batch(geo), cfg, sensor, train=train, draws=_draws(geo, mode, cfg, sensor))
    want = t(f"images/{geo}/{mode}")
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want), float((got - want).abs().max())
    assert want.amax() > 0 and (want[:, 0::2].amax(dim=(1, 2, 3)) <= 1).all()


@pytest.mark.parametrize("geo", ["ncaltech101", "ncars", "nimagenet"])
def test_evforge_recipe_differs_where_its_options_say(geo):
    """The evforge recipe's own options (sensor canvas, exact counts, both polarities) change the images."""
    cfg, sensor = _config(geo, "evforge")
    ref_cfg, _ = _config(geo, "reference")
    assert (cfg.canvas, cfg.uint8_wrap, cfg.off_events) == ("sensor", False, "count")
    assert ref_cfg.canvas in ("extent", "scaled") and ref_cfg.uint8_wrap
    got = mem_inputs(_batch(geo), cfg, sensor, train=False, draws=_draws(geo, "val", cfg, sensor))
    assert not torch.equal(got, t(f"images/{geo}/val"))
    if geo == "ncars":  # the reference's N-Cars images have no OFF channel before a time flip; evforge's have one
        assert t("images/ncars/val")[:, 2].amax() == 0 and got[:, 2].amax() > 0


def test_hot_pixel_filter_equals_the_reference():
    got = remove_hot_pixels(t("hotpix/input"), 10.0)
    want = t("hotpix/output")
    assert torch.equal(got, want)
    assert (want == 0).sum() > (t("hotpix/input") == 0).sum()  # the planted hot pixels went (both channels)


# ------------------------------------------------------------------------------------------- RandAugment
@pytest.mark.parametrize("case", range(43))
def test_rand_augment_ops_equal_torchvisions_op_by_op(case):
    """Each op of EventRandAugment at fixed magnitude indices (3 and 20 of 31 bins) and both signs: evforge's
    batched op vs the reference's ``_apply_op``, exactly (uint8)."""
    cases = meta("randaug/cases")
    assert len(cases) == 43
    name, idx, sign, mag = cases[case]
    img = t("randaug/input")
    H, W = img.shape[-2:]
    n = img.shape[0]
    mags = signed_magnitudes(name, torch.full((n,), idx), torch.full((n,), sign), 31, H, W)
    assert mags.tolist() == [mag] * n  # the same magnitude table (mem/transforms.py:411-429)
    got = apply_op(img, name, mags)
    assert torch.equal(got, t(f"randaug/op/{name}/{idx}/{sign}")), name
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Equalize", "AutoContrast"):
        assert not torch.equal(got, img)  # the case exercises the op


def test_rand_augment_picks_the_references_ops_from_the_same_generator():
    img = t("randaug/input")
    cfg = RandAugmentConfig(num_ops=2, magnitude=20)
    assert cfg.names == ALL_OPS
    ops = draw_ops(img.shape[0], cfg, torch.Generator().manual_seed(meta("randaug/full_seed")))
    assert torch.equal(rand_augment(img, ops, cfg), t("randaug/full"))


def test_color_jitter_equals_torchvisions():
    got = color_jitter(t("jitter/input"), t("jitter/draws"))
    assert torch.equal(got, t("jitter/output"))


# ----------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["beit14", "tiny8"])
def test_block_masks_equal_the_references(name):
    (h, w), count, min_patches = meta("masks/setups")[name]
    gen = BEiTMaskGenerator((h, w), count, min_num_patches=min_patches)
    rng = random.Random(meta("masks/seeds")[name])
    got = torch.from_numpy(np.stack([gen.sample(count, rng) for _ in range(200)]))
    want = t(f"masks/{name}")
    assert torch.equal(got, want)
    counts = want.flatten(1).sum(1).float()
    assert counts.max() <= count and counts.mean() > 0.95 * count  # BEiT's statistics, as the reference's


def test_random_masks_equal_the_references_with_the_legacy_option():
    gen = RandomMaskGenerator(14, 98, legacy_skip_last=True)
    rng = random.Random(meta("masks/seeds")["random14"])
    got = torch.from_numpy(np.stack([gen.sample(rng) for _ in range(100)])).view(100, 14, 14)
    want = t("masks/random14")
    assert torch.equal(got, want) and not want[:, -1, -1].any()


# ------------------------------------------------------------------------------------------------ dVAE
def _dvae() -> DiscreteVAE:
    s = meta("dvae/setup")
    cfg = DVAEConfig(image_size=s["input_H"], num_layers=s["num_layers"], hidden_dim=s["hidden_dim"],
                     num_resnet_blocks=s["num_resnet_blocks"], num_tokens=s["num_tokens"], code_dim=s["codebook_dim"],
                     kl_weight=s["kl_div_loss_weight"], kl_reduction="sum")
    vae = DiscreteVAE(cfg)
    weights = {k[len("dvae/weights/"):]: v for k, v in fixture()[0].items() if k.startswith("dvae/weights/")}
    vae.load_state_dict(weights, strict=True)  # the reference's names, unchanged
    return vae


def test_dvae_forward_and_loss_equal_the_references():
    vae = _dvae()
    img = t("dvae/input")
    s = meta("dvae/setup")
    with torch.no_grad():
        vae.eval()
        assert torch.allclose(vae.logits(img), t("dvae/logits"), atol=1e-5)
        codes = vae.get_codebook_indices(img)
        assert torch.equal(codes, t("dvae/codes"))
        assert torch.allclose(vae.decode(codes), t("dvae/decoded"), atol=1e-5)
        vae.train()
        g = torch.Generator().manual_seed(s["noise_seed"])  # the reference drew its Gumbel noise after this seed
        loss, parts, recon = vae(img, tau=s["temp"], generator=g, return_recon=True)
    assert torch.allclose(recon, t("dvae/recon"), atol=1e-5)
    assert float(loss) == pytest.approx(meta("dvae/loss"), rel=1e-5, abs=1e-6)
    # evforge's default averages the KL over the batch; the reference sums it (its F.kl_div input has length 1)
    mean = DiscreteVAE(DVAEConfig(**{**vae.cfg.to_dict(), "kl_reduction": "batchmean"}))
    mean.load_state_dict(vae.state_dict())
    mean.train()
    with torch.no_grad():
        _, parts_mean = mean(img, tau=s["temp"], generator=torch.Generator().manual_seed(s["noise_seed"]))
    assert float(parts["kl"]) == pytest.approx(img.shape[0] * float(parts_mean["kl"]), rel=1e-5)


# ------------------------------------------------------------------------------------------------ BEiT
def _mem_config() -> MEMConfig:
    s = meta("beit_pt/setup")
    return MEMConfig(variant="beit_base_patch16_224", img_size=s["img_size"][0], patch_size=s["patch_size"][0],
                     vit_kwargs={"embed_dim": s["embed_dim"], "depth": s["depth"], "num_heads": s["num_heads"],
                                 "mlp_ratio": float(s["mlp_ratio"])},
                     drop_path_rate=0.0, init_values=s["init_values"], num_tokens=s["vocab_size"], init="beit")


def _pt_weights() -> dict:
    """The reference pretraining model's weights under evforge's names (vit.*, mask_token, head.*)."""
    out = {}
    for k, v in fixture()[0].items():
        if not k.startswith("beit_pt/weights/"):
            continue
        name = k[len("beit_pt/weights/"):]
        if "relative_position_index" in name:
            continue  # a buffer timm rebuilds
        if name.startswith("lm_head."):
            out["head." + name[len("lm_head."):]] = v
        elif name == "mask_token":
            out[name] = v
        else:
            out["vit." + name] = v
    return out


def test_beit_pretraining_forward_equals_the_references():
    model = MEMModel(_mem_config())
    model.load_state_dict(_pt_weights(), strict=True)
    model.eval()
    img, mask = t("beit_pt/input"), t("beit_pt/mask")
    with torch.no_grad():
        tokens = model.encode(img, mask)
        got_all = model.head(tokens)
        got_masked = model.head(tokens[mask])
        loss, logs = model(img, mask, torch.zeros_like(mask, dtype=torch.int64))
    assert torch.allclose(got_all, t("beit_pt/all_logits"), atol=1e-5)
    assert torch.allclose(got_masked, t("beit_pt/masked_logits"), atol=1e-5)
    assert logs["n_masked"] == mask.sum() / 2


def test_beit_init_is_mems():
    torch.manual_seed(0)
    model = MEMModel(MEMConfig(variant="beit_base_patch16_224", img_size=32, patch_size=8, num_tokens=16,
                               vit_kwargs={"embed_dim": 64, "depth": 3, "num_heads": 2}, init="beit"))
    vit = model.vit
    assert vit.pos_embed is None and vit.rel_pos_bias is not None  # shared relative position bias only
    for w in (vit.blocks[0].attn.qkv.weight, vit.patch_embed.proj.weight, model.head.weight, model.mask_token):
        assert w.abs().max() <= 0.02 + 1e-7  # truncated at +-1 std (timm's init cuts at +-2)
    q = vit.blocks[0].mlp.fc1.weight.detach()
    assert 0.5 * 0.02 < float(q.std()) < 0.6 * 0.02  # a normal cut at +-1 std has std 0.54 sigma
    for i, blk in enumerate(vit.blocks):  # rescaled by 1 / sqrt(2 (i + 1))
        bound = 0.02 / (2.0 * (i + 1)) ** 0.5
        assert blk.mlp.fc2.weight.abs().max() <= bound + 1e-7
        assert blk.attn.proj.weight.abs().max() > 0.9 * bound


def _finetune_from_reference_pretraining():
    """evforge's finetuning network from the reference's pretrained weights: the exported backbone's tensors
    loaded as --init does, then MEM's finetuning options (shared bias per block, fresh fc_norm, dropout)."""
    cfg = _mem_config()
    tensors = {k[len("vit."):]: v for k, v in _pt_weights().items() if k.startswith("vit.")}
    meta_ = {"arch": cfg.variant, "in_chans": 3, "timm_kwargs": cfg.timm_kwargs(), "norm_eps": 1e-6}
    spec = resolve_spec({"global_pool": "avg", "drop_path_rate": 0.1}, in_chans=3, num_classes=5,
                        input_size=cfg.img_size, init_meta=meta_)
    net = create_model(spec)
    load_init(net, tensors)
    net, spec = per_layer_rel_pos_bias(net, spec)
    assert reset_fc_norm(net)
    block_dropout(net, 0.1)
    return net, spec


def test_beit_finetuning_network_equals_the_references():
    net, spec = _finetune_from_reference_pretraining()
    assert spec.timm_kwargs["use_rel_pos_bias"] and not spec.timm_kwargs["use_shared_rel_pos_bias"]
    ref = {k[len("beit_ft/weights/"):]: v for k, v in fixture()[0].items() if k.startswith("beit_ft/weights/")}
    ours = net.state_dict()
    for k, v in ref.items():  # every loaded tensor equal, the shared table in every block, fc_norm fresh
        if "relative_position_index" in k or k.startswith("head."):
            continue
        assert torch.equal(ours[k], v), k
    assert torch.equal(ours["blocks.1.attn.relative_position_bias_table"],
                       t("beit_pt/weights/rel_pos_bias.relative_position_bias_table"))
    assert set(k for k in ours if "relative_position_index" not in k) == set(
        k for k in ref if "relative_position_index" not in k)
    net.head.load_state_dict({"weight": ref["head.weight"], "bias": ref["head.bias"]})  # heads are drawn at random
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(t("beit_pt/input")), t("beit_ft/logits"), atol=1e-5)
    drops = [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    assert sorted(set(drops)) == [0.0, 0.1]  # MEM's placement: 0.1 after pos / attn proj / MLP, none elsewhere
    assert isinstance(net.blocks[0].mlp.drop1, torch.nn.Identity)


def test_layer_decay_groups_equal_the_references():
    net, _ = _finetune_from_reference_pretraining()
    groups = layer_decay_groups(net, weight_decay=0.05, layer_decay=0.9, skip_names=("pos_embed", "cls_token"))
    got = sorted([sorted(g["param_names"]), pytest.approx(g["lr_scale"]), g["weight_decay"]] for g in groups)
    assert got == meta("groups")
    default = layer_decay_groups(net, weight_decay=0.05, layer_decay=0.9)  # evforge: position tables not decayed
    table = [g for g in default if "blocks.0.attn.relative_position_bias_table" in g["param_names"]]
    assert table[0]["weight_decay"] == 0.0


# ------------------------------------------------------------------------------------------- schedules
def test_cosine_schedules_equal_the_references_with_linspace_warmup():
    base, final, epochs, niter, warm = meta("schedules/setup")["pretrain"]
    s = make_schedule({"warmup_cosine": {"start": 0.0, "peak": base, "end": final, "warmup_steps": warm,
                                         "warmup_linspace": True}}, total_steps=epochs * niter)
    want = t("schedules/pretrain").numpy()
    np.testing.assert_allclose([s(i) for i in range(epochs * niter)], want, rtol=1e-12, atol=1e-18)
    base, final, epochs, niter, warm_ep = meta("schedules/setup")["finetune"]
    s = make_schedule({"warmup_cosine": {"start": 0.0, "peak": base, "end": final, "warmup_epochs": warm_ep,
                                         "warmup_linspace": True}}, steps_per_epoch=niter, total_steps=epochs * niter)
    np.testing.assert_allclose([s(i) for i in range(epochs * niter)], t("schedules/finetune").numpy(), rtol=1e-12)
    plain = make_schedule({"warmup_cosine": {"start": 0.0, "peak": base, "end": final, "warmup_epochs": warm_ep}},
                          steps_per_epoch=niter, total_steps=epochs * niter)
    assert plain(warm_ep * niter - 1) < base  # evforge's default reaches the peak one step later


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("geo, mode", [("ncaltech101", "pretrain"), ("nimagenet", "train"), ("ncars", "val")])
def test_the_pipeline_on_cuda_gives_the_reference_images(geo, mode):
    """The same draws on the GPU: the resize and the RandAugment grids run there; float rounding may move a value
    across a uint8 step, so a few pixels may differ by a quantisation step, nothing more."""
    cfg, sensor = _config(geo, "reference")
    if not mode.startswith("pretrain"):
        cfg.color_jitter.brightness = cfg.color_jitter.saturation = 0.0
    batch = {k: (v.cuda() if torch.is_tensor(v) and k != "offsets" else v) for k, v in _batch(geo).items()}
    got = mem_inputs(batch, cfg, sensor, train=mode in ("train", "pretrain"), draws=_draws(geo, mode, cfg, sensor))
    want = t(f"images/{geo}/{mode}")
    assert got.is_cuda
    diff = (got.cpu() - want).abs()
    assert float(diff.max()) <= 2 / 255 + 1e-6 and float((diff > 1e-5).float().mean()) < 0.01
