"""The HTML of bcc.report: inlined PNG images, metric tables, the mistake gallery and the page's CSS.

`bcc/report.py` gathers what the report shows (metrics, evaluation, mistakes, Grad-CAM panels) and
assembles the page from these pieces; see its docstring for what the page holds.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bcc.report import Mistake

GALLERY_SIDE = 320  # px: gallery images are shrunk to this (long side) to keep the page small


def png(image) -> bytes:
    if max(image.size) > GALLERY_SIDE:
        image = image.copy()
        image.thumbnail((GALLERY_SIDE, GALLERY_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def img_tag(data: bytes, alt: str, cls: str = "") -> str:
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{uri}" alt="{html.escape(alt)}"{f" class={cls!r}" if cls else ""}>'


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return html.escape(str(value))


# shown first, in this order, in the metric tables (others follow alphabetically)
LEADING = ("count", "loss", "acc", "bacc", "f1", "auroc", "ece", "ece_raw")


def _ordered(keys) -> list[str]:
    keys = set(keys)
    return [k for k in LEADING if k in keys] + sorted(keys - set(LEADING))


def metric_table(columns: Mapping[str, Mapping[str, Any]], skip: Sequence[str] = ()) -> str:
    """Metrics (rows) by column; only scalar values."""
    names = _ordered({k for c in columns.values() for k, v in c.items()
                      if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><th>{html.escape(n)}</th>" + "".join(f"<td>{fmt(c.get(n))}</td>" for c in columns.values())
                   + "</tr>" for n in names)
    return f'<table><thead><tr><th>metric</th>{head}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222;
background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
.meta{color:#555} .warn{background:#fff4e5;border-left:4px solid #f0a020;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.92em} th,td{border:1px solid #ddd;padding:3px 8px}
td{text-align:right;font-variant-numeric:tabular-nums} thead th{background:#f3f3f3}
.figs{display:flex;flex-wrap:wrap;gap:12px} .figs img{max-width:100%;border:1px solid #eee}
.curve{width:380px} .mistake{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:12px 0}
.panels{display:flex;flex-wrap:wrap;gap:10px} .panel{width:170px;font-size:.85em}
.panel img{width:160px;height:auto;image-rendering:pixelated;border:1px solid #ccc}
.zero{width:150px;height:110px;border:1px dashed #c44;color:#a22;padding:4px;font-size:.85em}
"""


def _probs_text(m: Mistake) -> str:
    parts = []
    for head, probs in m.head_probs.items():
        labels = ", ".join(f"{html.escape(lab)} {p:.3f}" for lab, p in sorted(probs.items(), key=lambda kv: -kv[1]))
        parts.append(f"<b>{html.escape(head)}</b>: {labels}")
    return "<br>".join(parts)


def decision_text(point: Mapping[str, Any] | None) -> str:
    """How the report's decisions are made: the operating point stored with the checkpoint, or argmax."""
    if point is None:
        return "Decisions: argmax of every head (no operating point stored with the checkpoint)."
    return (f"Decisions: head {html.escape(str(point['head']))} says {html.escape(str(point.get('positive_label')))} "
            f"when its probability is &ge; {point['threshold']:.4f} (operating point "
            f"{html.escape(str(point.get('rule')))}, stored with the checkpoint); argmax for the other heads. "
            "Each mistake also shows the argmax decision.")


def gallery(mistakes: Sequence[Mistake], panels, hide_paths: bool, point: Mapping[str, Any] | None = None) -> str:
    blocks = []
    for m, row in zip(mistakes, panels, strict=True):
        name = f"mistake {m.rank}" if hide_paths else f"#{m.rank} {html.escape(m.source)}"
        cells = []
        for p in row:
            inner = (img_tag(p["png"], p["title"]) if p["png"] is not None
                     else f'<div class="zero">{html.escape(p["note"])}</div>')
            note = f"<br><small>{html.escape(p['note'])}</small>" if p["png"] is not None and p["note"] else ""
            cells.append(f'<div class="panel">{inner}<br>{html.escape(p["title"])}{note}</div>')
        where = ""
        if point is not None:  # both decisions: the one made (at the point) and the argmax one
            where = (f' at the operating point (p &ge; {point["threshold"]:.4f}); '
                     f'argmax: <b class="argmax">{html.escape(m.argmax_class)}</b>')
        blocks.append(
            f'<div class="mistake"><b>{name}</b> — true <b>{html.escape(m.true_class)}</b> '
            f"(p {m.p_true:.3f}), decided <b>{html.escape(m.pred_class)}</b> (p {m.p_pred:.3f}){where}"
            f'<p>{_probs_text(m)}</p><div class="panels">{"".join(cells)}</div></div>'
        )
    return "".join(blocks)
