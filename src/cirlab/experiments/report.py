"""Human-readable outputs: a PNG grid of retrievals and the markdown report of a demo run."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from cirlab.data.images import open_image
from cirlab.experiments.machine import one_line as machine_line

CELL = 96
TEXT_W = 200


def retrieval_grid(split, ranking, path, title: str = "", rows: int = 6, top: int = 5) -> Path:
    """Reference, modification text, the top-`top` retrievals (the target framed green), then the target."""
    queries = [q for q in split.queries if q.targets][:rows]
    width = CELL * (2 + top) + TEXT_W + 10 * (top + 4)
    height = (CELL + 10) * len(queries) + 30
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((5, 5), f"{title}: reference | text | top-{top} (green = target) | target", fill=(0, 0, 0),
              font=font)
    for r, q in enumerate(queries):
        y = 30 + r * (CELL + 10)
        canvas.paste(open_image(split.gallery[q.reference]).convert("RGB").resize((CELL, CELL)), (0, y))
        lines = textwrap.wrap(q.text, 32)[:6]
        draw.multiline_text((CELL + 10, y + 4), "\n".join(lines), fill=(0, 0, 0), font=font)
        for c, name in enumerate(ranking.ranked[split.queries.index(q)][:top]):
            x = CELL + TEXT_W + 10 + c * (CELL + 10)
            hit = name in q.targets
            draw.rectangle([x - 4, y - 4, x + CELL + 3, y + CELL + 3], fill=(30, 180, 60) if hit else (200, 200, 200))
            canvas.paste(open_image(split.gallery[name]).convert("RGB").resize((CELL - 4, CELL - 4)), (x + 2, y + 2))
        x = CELL + TEXT_W + 10 + top * (CELL + 10) + 20
        canvas.paste(open_image(split.gallery[q.targets[0]]).convert("RGB").resize((CELL, CELL)), (x, y))
    path = Path(path)
    canvas.save(path)
    return path


def write_report(path, table: str, results: dict, timings: dict, wall: float, workers: int = 1) -> Path:
    lines = [
        f"# cirlab demo ({results.get('profile', 'default')} profile, seed {results['seed']})",
        "",
        f"Synthetic world, split {results['split']}; metrics in percent (CIRR protocol: the reference is removed",
        "from its own ranking; Rsubset ranks the img_set members other than the reference).",
        "",
        table,
        "",
        *_interval_lines(results.get("versus_closest_baseline", {}), results.get("variants", {})),
        "| step (pretraining, or a method's training and evaluation) | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
        *[f"{name} config: `{json.dumps(cfg)}` (the rest as the method's defaults)."
          for name, cfg in results.get("method_config", {}).items()],
        *[f"{name} stage 1 (oracle pseudo-targets, then intent alignment): `{json.dumps(spec)}`; "
          f"checkpoints/{name}-stage1/." for name, spec in results.get("stage1", {}).items()],
        "",
        f"Wall time: {wall:.0f} s ({workers} lane process{'es' if workers > 1 else ''} side by side, so the steps "
        "above overlap). Retrievals: retrievals.png. Checkpoints: checkpoints/<method>/.",
        *([f"Machine: {machine_line(results['machine'])}; another CPU rounds the matrix products in another order "
           "and trains to other figures."] if results.get("machine") else []),
        *_cpu_lines(results.get("seconds", {}).get("cpu")),
        *_speed_lines(results.get("seconds", {}).get("core_gflops")),
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path


def _cpu_lines(cpu: dict | None) -> list:
    """The CPU seconds of the run: in all, as a share of wall time x cores, before the lanes and per lane."""
    if not cpu:
        return []
    lanes = "; ".join(f"{name} {v:.0f}" for name, v in cpu["lanes"].items())
    return [f"CPU: {cpu['total']:.0f} core-seconds, {cpu['busy_pct']:.0f}% of wall time x {cpu['cores']} cores "
            f"({cpu['before_lanes']:.0f} before the lanes; {lanes})."]


def _speed_lines(speed: dict | None) -> list:
    """The host's one-core matrix-product rate before and after the run (a shared host's speed drifts)."""
    if not speed:
        return []
    return [f"One core's fp32 matrix products: {speed['before']:.0f} GFLOP/s before the run, {speed['after']:.0f} "
            "after (compare wall times only between runs at like speeds)."]


def _interval_lines(intervals: dict, names: dict) -> list:
    """Each seed method against its closest baseline: the difference with its 95% paired interval over queries."""
    if not intervals:
        return []
    lines = ["Each seed method against its closest baseline (one seed: a paired bootstrap over the test queries, "
             "10,000 resamples; an interval that contains 0 is a tie):", "",
             "| method | baseline | metric | method | baseline | difference | 95% interval |",
             "|---|---|---|---:|---:|---:|---|"]
    for name, r in intervals.items():
        lines.append(f"| {names.get(name, name)} | {names.get(r['baseline'], r['baseline'])} | {r['metric']} | "
                     f"{r['method']:.2f} | {r['baseline_value']:.2f} | {r['diff']:+.2f} | "
                     f"[{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] |")
    return lines + ["", "Per-query results: per_query/<method>.jsonl (`cirlab compare A B`).", ""]


def format_table(rows: dict, columns: list) -> str:
    """A markdown table: one row per method, one column per metric (two decimals; "-" where missing)."""
    head = "| method | " + " | ".join(columns) + " |"
    sep = "|---|" + "---:|" * len(columns)
    lines = [head, sep]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.2f}" if c in metrics else "-" for c in columns) + " |")
    return "\n".join(lines)
