"""What a dataset made with a data recipe (``evforge convert tartanair --recipe ecddp``) holds, per environment.

:func:`recipe_summary` reads the manifest's recipe and, from the shard indexes and per-sample attrs only (no
event columns), per environment: trajectories, their intervals, samples kept and intervals dropped (interval 0,
the last interval, under-size), interval start times and lengths, events and event rate per sample, and the
trajectories' shot-noise rates. :func:`format_recipe_summary` prints it as one short table, whatever the
number of samples. Trajectories without any kept interval do not appear (nothing of them is in the shards).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evforge.formats.manifest import Manifest
from evforge.formats.shards import ShardReader

from ..errors import InputError

__all__ = ["recipe_summary", "format_recipe_summary"]


def _quantiles(values) -> dict | None:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return None
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return dict(zip(("min", "p5", "median", "p95", "max"), (float(x) for x in q)))


def recipe_summary(manifest: Manifest, root: Path) -> dict | None:
    """The recipe section of ``evforge inspect`` for a dataset, or None when it was not made with a recipe."""
    params = manifest.provenance.get("converter_params") or {}
    recipe = params.get("recipe")
    if not isinstance(recipe, dict) or manifest.kind != "streams":
        return None
    groups: dict[tuple[str, str], dict] = {}
    problems = []
    for split in manifest.splits:
        for entry in manifest.shards_of(split):
            path = root / entry["path"]
            try:
                reader = ShardReader(path)
            except (InputError, OSError) as err:
                problems.append(str(err) if isinstance(err, InputError) else f"{path}: {err}")
                continue
            with reader:
                counts = reader.index["count"].astype(np.int64)
                for i in range(reader.num_samples):
                    a = reader.sample_attrs(i)
                    ft = reader.frame_times(i)
                    g = groups.setdefault((a.get("env", "?"), split), {
                        "trajectories": {}, "counts": [], "lengths_us": [], "starts_us": [], "shot": {}})
                    traj = a.get("trajectory", reader.keys[i].rsplit("/", 1)[0])
                    g["trajectories"].setdefault(traj, [int(a.get("intervals", 0)), 0])[1] += 1
                    g["shot"][traj] = a.get("shot_noise_rate_hz")
                    g["counts"].append(int(counts[i]))
                    g["lengths_us"].append(int(ft[-1] - ft[0]) if len(ft) >= 2 else 0)
                    # interval i starts i interval lengths after the trajectory's first frame (the time base)
                    g["starts_us"].append(int(a.get("interval", 0)) * int(round(recipe["interval_s"] * 1e6)))
    order = sorted(groups, key=lambda es: (es[1], es[0]))  # by split, then environment
    rows = [_row(env, split, groups[(env, split)], recipe) for env, split in order]
    total = _total(rows, groups, recipe)
    return {"recipe": recipe, "simulate_config": params.get("simulate_config"), "rows": rows, "all": total,
            "problems": problems}


def _dropped(trajectories: dict, recipe: dict) -> dict:
    """Intervals dropped in these trajectories, by reason (the rule is known, so first/last are counted and
    the rest are the under-size ones)."""
    n_traj = len(trajectories)
    intervals = sum(n for n, _ in trajectories.values())
    kept = sum(k for _, k in trajectories.values())
    first = n_traj if recipe.get("drop_first_interval") else 0
    last = n_traj if recipe.get("drop_last_interval") else 0
    return {"first": first, "last": last, "small": intervals - kept - first - last}


def _row(env: str, split: str, g: dict, recipe: dict) -> dict:
    counts = np.asarray(g["counts"], dtype=np.int64)
    lengths = np.asarray(g["lengths_us"], dtype=np.int64)
    ok = lengths > 0
    shot = [v for v in g["shot"].values() if v is not None]
    return {
        "env": env, "split": split, "trajectories": len(g["trajectories"]),
        "intervals": sum(n for n, _ in g["trajectories"].values()), "samples": int(len(counts)),
        "dropped": _dropped(g["trajectories"], recipe),
        "interval_s": _quantiles(lengths * 1e-6), "start_s": _quantiles(np.asarray(g["starts_us"]) * 1e-6),
        "events_per_sample": _quantiles(counts), "event_rate_hz": _quantiles(counts[ok] / (lengths[ok] * 1e-6)),
        "shot_noise_rate_hz": [min(shot), max(shot)] if shot else None,
    }


def _total(rows: list[dict], groups: dict, recipe: dict) -> dict:
    everything = {"trajectories": {}, "counts": [], "lengths_us": [], "starts_us": [], "shot": {}}
    for g in groups.values():
        everything["trajectories"].update(g["trajectories"])
        everything["shot"].update(g["shot"])
        for k in ("counts", "lengths_us", "starts_us"):
            everything[k] += g[k]
    return _row("all", "", everything, recipe)


# ------------------------------------------------------------------------------------------------ report
def _f(x, digits=3) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.{digits}g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.{digits}g}k"
    return f"{x:.{digits}g}"


def _spread(q: dict | None, fmt=_f) -> str:
    """``p5 / median / p95 [min-max]``."""
    if not q:
        return "-"
    return f"{fmt(q['p5'])} / {fmt(q['median'])} / {fmt(q['p95'])} [{fmt(q['min'])}-{fmt(q['max'])}]"


def _range(q: dict | None, fmt) -> str:
    if not q:
        return "-"
    return fmt(q["min"]) if q["min"] == q["max"] else f"{fmt(q['min'])}-{fmt(q['max'])}"


def format_recipe_summary(d: dict, table) -> list[str]:
    """Lines of the recipe section (``table(header, rows)`` lays out the table as the rest of the report)."""
    r = d["recipe"]
    sim = d.get("simulate_config") or {}  # what the conversion simulated with (flags may replace the recipe's)
    preset, resolution = sim.get("preset", r["preset"]), sim.get("resolution", r["resolution"])
    up = sim.get("upsample") or r.get("upsample") or {}
    differs = lambda used, own: "" if used == own else f" (recipe: {own})"
    rule = (f"{r['min_interval_events']:,} events" if r.get("min_interval_events") is not None
            else f"{r['min_interval_bytes']:,} B in the reference layout" if r.get("min_interval_bytes") else "none")
    drops = ", ".join(x for x, on in (("interval 0", r.get("drop_first_interval")),
                                      ("the last interval", r.get("drop_last_interval"))) if on) or "none"
    lines = [
        f"recipe    {r['name']}: {r.get('summary', '')}",
        f"          time base {r['interval_s']:g} s per source-frame interval; preset {preset}"
        f"{differs(preset, r['preset'])}, resolution {resolution}{differs(resolution, r['resolution'])}; upsampling "
        f"{up.get('mode')} (>= {up.get('min_steps')} steps per interval, multiples of {up.get('step_multiple')}, "
        f"<= {up.get('max_px_step')} px per step, at most {up.get('max_steps')})"
        f"{'' if sim else '; streams simulated beforehand (their files hold the settings)'}",
        f"          one sample per interval; dropped: {drops}, own or previous interval under {rule}"
        f"{'; times rounded to float32 us' if r.get('float32_time') else ''}; held out: "
        f"{', '.join(r.get('test_envs') or []) or '-'}",
        "",
    ]
    header = ["env", "split", "traj", "intervals", "samples", "dropped first/last/small", "interval s",
              "starts s", "events/sample p5 / median / p95 [min-max]", "event rate /s p5 / median / p95",
              "shot noise Hz"]
    rows = []
    for row in [*d["rows"], d["all"]]:
        dr = row["dropped"]
        shot = row["shot_noise_rate_hz"]
        rate = row["event_rate_hz"]
        rows.append([row["env"], row["split"], str(row["trajectories"]), str(row["intervals"]), str(row["samples"]),
                     f"{dr['first']}/{dr['last']}/{dr['small']}", _range(row["interval_s"], lambda x: f"{x:.6f}"),
                     _range(row["start_s"], lambda x: f"{x:g}"), _spread(row["events_per_sample"]),
                     "-" if not rate else f"{_f(rate['p5'])} / {_f(rate['median'])} / {_f(rate['p95'])}",
                     "-" if not shot else f"{shot[0]:.3f}-{shot[1]:.3f}"])
    lines += table(header, rows)
    if d.get("problems"):
        lines += ["", "problems (left out of the recipe table):", *d["problems"]]
    return lines
