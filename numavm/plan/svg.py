"""`numavm plan --svg`: the topology as a picture.

Three panels: the domains as boxes sized by memory with their vCPUs, the
guest-physical map as a bar (with the 3-4 GiB hole), and the distance
matrix as a heat map.  Plain SVG text, no dependencies.
"""

from __future__ import annotations

from html import escape

from numavm.plan.layout import HIGH_RAM_BASE, LOW_RAM_LIMIT, Layout
from numavm.spec.units import format_list, format_size

WIDTH = 960
PAD = 20
# Colour per domain, cycling; readable on white and distinct for neighbours.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
           "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "start",
          weight: str = "normal", fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{escape(s)}</text>')


def plan_svg(layout: Layout) -> str:
    topo = layout.topology
    parts: list[str] = []
    y: float = PAD + 16
    title = (f"{topo.cpus} vCPUs, {format_size(topo.memory)}, "
             + (f"{len(topo.domains)} NUMA domains" if topo.numa else "classic machine (no NUMA)"))
    parts.append(_text(PAD, y, title, 16, weight="bold"))
    y += 20
    y = _domain_boxes(layout, parts, y)
    y = _address_bar(layout, parts, y + 10)
    if topo.numa:
        y = _heat_map(layout, parts, y + 10)
    if topo.has_hmat:
        y = _hmat_panel(layout, parts, y + 24)
    height = y + PAD
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


def _domain_boxes(layout: Layout, parts: list[str], y: float) -> float:
    """Boxes whose width follows memory (a floor keeps CPU-only ones visible)."""
    total_w = WIDTH - 2 * PAD
    doms = layout.domains
    min_w = 70.0 if len(doms) <= 12 else 44.0
    mem = sum(d.segment_size for d in doms) or 1
    x = float(PAD)
    row_h = 0.0
    box_h = 86.0 if len(doms) <= 12 else 40.0
    for d in doms:
        w = max(min_w, (total_w - min_w * len(doms)) * d.segment_size / mem + min_w
                if len(doms) <= 12 else min_w)
        if x + w > PAD + total_w + 0.5:
            x, y = float(PAD), y + row_h + 8
        row_h = box_h
        c = _colour(d.id)
        kind = "memory-only" if not d.domain.cpus else ("CPU-only" if not d.segment_size else "")
        tip = (f"domain {d.id}: {format_size(d.segment_size)}, vCPUs {format_list(d.domain.cpus) or 'none'}, "
               f"policy {d.domain.policy}")
        parts.append(f'<g class="domain" id="domain-{d.id}"><title>{escape(tip)}</title>')
        dash = "" if d.segment_size else ' stroke-dasharray="5,3"'  # CPU-only: no memory
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w - 4:.1f}" height="{box_h:.0f}" rx="6" '
                     f'fill="{c}" fill-opacity="0.18" stroke="{c}" stroke-width="2"{dash}/>')
        parts.append(_text(x + 6, y + 15, f"{d.id}", 12, weight="bold"))
        if len(doms) <= 12:
            parts.append(_text(x + 24, y + 15, format_size(d.segment_size) if d.segment_size else "0", 12))
            parts.append(_text(x + 6, y + 31, kind or str(d.domain.policy), 10, fill="#555"))
            _cpu_chips(d.domain.cpus, parts, x + 6, y + 40, w - 16, c)
        parts.append("</g>")
        x += w
    return y + row_h + 10


def _cpu_chips(cpus: tuple[int, ...], parts: list[str], x: float, y: float, w: float, c: str) -> None:
    chip = 18.0
    per_row = max(1, int(w // (chip + 3)))
    shown = cpus[: per_row * 2]
    for k, cpu in enumerate(shown):
        cx = x + (k % per_row) * (chip + 3)
        cy = y + (k // per_row) * (chip + 3)
        parts.append(f'<rect x="{cx:.1f}" y="{cy:.1f}" width="{chip}" height="{chip}" rx="3" fill="{c}"/>')
        parts.append(_text(cx + chip / 2, cy + 13, str(cpu), 9, "middle", fill="white"))
    if len(cpus) > len(shown):
        parts.append(_text(x + w, y + 2 * (chip + 3) + 10, f"+{len(cpus) - len(shown)} more", 9, "end"))


def _address_bar(layout: Layout, parts: list[str], y: float) -> float:
    parts.append(_text(PAD, y, "guest-physical memory", 13, weight="bold"))
    y += 8
    top = max(layout.ram_top, LOW_RAM_LIMIT if layout.ram_top > LOW_RAM_LIMIT else layout.ram_top)
    w = WIDTH - 2 * PAD
    scale = w / top
    bar_h = 26
    for d in layout.domains:
        for r in d.ranges:
            parts.append(f'<rect x="{PAD + r.start * scale:.2f}" y="{y:.1f}" width="{max(r.size * scale, 0.5):.2f}" '
                         f'height="{bar_h}" fill="{_colour(d.id)}"><title>domain {d.id}: '
                         f'{r.start:#x}-{r.end - 1:#x}</title></rect>')
    if layout.ram_top > LOW_RAM_LIMIT:
        hx = PAD + LOW_RAM_LIMIT * scale
        hw = (HIGH_RAM_BASE - LOW_RAM_LIMIT) * scale
        parts.append(f'<rect class="hole" x="{hx:.2f}" y="{y:.1f}" width="{hw:.2f}" height="{bar_h}" '
                     f'fill="#ddd" stroke="#999"/>')
        parts.append(_text(hx + hw / 2, y + 17, "3-4G hole: IOAPIC, LAPIC", 9, "middle", fill="#444"))
    y += bar_h + 14
    marks = sorted({0, layout.ram_top} | ({LOW_RAM_LIMIT, HIGH_RAM_BASE} if layout.ram_top > LOW_RAM_LIMIT else set()))
    for m in marks:
        anchor = "start" if m == 0 else ("end" if m == layout.ram_top else "middle")
        parts.append(_text(PAD + m * scale, y, format_size(m) if m else "0", 10, anchor, fill="#555"))
    return y + 14


def _heat_map(layout: Layout, parts: list[str], y: float) -> float:
    dist = layout.topology.distances
    n = len(dist)
    parts.append(_text(PAD, y, "distances (SLIT)", 13, weight="bold"))
    y += 10
    cell = max(2.0, min(28.0, (WIDTH - 2 * PAD - 30) / n, 600 / n))
    x0 = PAD + 24
    labels = n <= 32
    parts.append('<g class="distances">')
    for i, row in enumerate(dist):
        if labels:
            parts.append(_text(PAD + 16, y + 16 + i * cell + cell / 2 + 4, str(i), 10, "end"))
            parts.append(_text(x0 + i * cell + cell / 2, y + 12, str(i), 10, "middle"))
        for j, d in enumerate(row):
            # 10 -> pale, 255 -> dark: distance as lightness.
            t = (d - 10) / 245
            light = int(92 - 70 * min(1.0, t * 3))
            parts.append(f'<rect x="{x0 + j * cell:.1f}" y="{y + 16 + i * cell:.1f}" width="{cell:.1f}" '
                         f'height="{cell:.1f}" fill="hsl(10,70%,{light}%)" stroke="white" stroke-width="0.5">'
                         f'<title>{i} -&gt; {j}: {d}</title></rect>')
            if labels and cell >= 16:
                parts.append(_text(x0 + j * cell + cell / 2, y + 16 + i * cell + cell / 2 + 4, str(d), 9,
                                   "middle", fill="white" if light < 55 else "#222"))
    parts.append("</g>")
    return y + 16 + n * cell


def _hmat_panel(layout: Layout, parts: list[str], y: float) -> float:
    """One line per memory domain: the figures Linux will report, its initiators, its tier and caches."""
    from numavm.plan.render import hmat_document

    doc = hmat_document(layout.topology)
    parts.append(_text(PAD, y, "HMAT: what Linux makes of it (read/write; tier on Linux 6.10+)", 13, weight="bold"))
    parts.append('<g class="hmat">')
    linux = doc["linux"]
    for t, acc in linux["access"].items():
        y += 18
        a = acc["0"]
        caches = [c for c in doc["caches"] if str(c["domain"]) == t]
        line = (f"domain {t}: {a['read_latency']}/{a['write_latency']} ns, "
                f"{a['read_bandwidth']}/{a['write_bandwidth']} MB/s from {format_list(a['initiators']) or 'none'}; "
                f"tier {linux['memory_tiers'][t]}"
                + "".join(f"; L{c['level']} cache {format_size(c['size'])}" for c in caches))
        parts.append(f'<rect x="{PAD}" y="{y - 10:.1f}" width="12" height="12" fill="{_colour(int(t))}"/>')
        parts.append(_text(PAD + 18, y, line, 11))
    parts.append("</g>")
    return y + 6
