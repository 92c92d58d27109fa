/* edge-fleet dashboard: small SVG charts drawn from data, no library.
 * Charts.line(svg, {series:[{cls, points:[[t, v], ...]}], yMax, xMin, xMax})
 * Charts.stacked(svg, {times:[t...], layers:[{cls, values:[n...]}]})
 * Times are POSIX seconds; colours come from CSS classes (dashboard.css). */
"use strict";
const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const H = 170, L = 38, R = 12, T = 10, B = 24;
  const width = (svg) => Math.max(200, Math.round(svg.getBoundingClientRect().width) || 600);

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function clock(t, span) {
    const d = new Date(t * 1000);
    return d.toISOString().slice(11, span < 3600 ? 19 : 16);
  }

  function frame(svg, xMin, xMax, yMax) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = width(svg);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const span = Math.max(xMax - xMin, 1e-9);
    const x = (t) => L + ((t - xMin) / span) * (W - L - R);
    const y = (v) => H - B - (Math.max(0, Math.min(v, yMax)) / yMax) * (H - T - B);
    for (const frac of [0, 0.5, 1]) {
      const v = yMax * frac;
      el("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}, svg);
      const label = el("text", {x: L - 4, y: y(v) + 4, class: "axis", "text-anchor": "end"}, svg);
      label.textContent = Number.isInteger(v) ? String(v) : v.toFixed(1);
    }
    const left = el("text", {x: L, y: H - 6, class: "axis"}, svg);
    left.textContent = clock(xMin, span);
    const right = el("text", {x: W - R, y: H - 6, class: "axis", "text-anchor": "end"}, svg);
    right.textContent = clock(xMax, span);
    return {x, y};
  }

  function empty(svg, text) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const W = width(svg);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const note = el("text", {x: W / 2, y: H / 2, class: "axis", "text-anchor": "middle"}, svg);
    note.textContent = text;
    svg.dataset.points = "0";
  }

  function line(svg, opts) {
    const all = opts.series.flatMap((s) => s.points);
    if (all.length === 0) { empty(svg, opts.emptyText || "no samples yet"); return; }
    const xMin = opts.xMin ?? Math.min(...all.map((p) => p[0]));
    const xMax = opts.xMax ?? Math.max(...all.map((p) => p[0]));
    const yMax = opts.yMax ?? Math.max(1, ...all.map((p) => p[1]));
    const {x, y} = frame(svg, xMin, xMax, yMax);
    for (const s of opts.series) {
      if (s.points.length === 0) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      el("path", {d, class: `line ${s.cls}`}, svg);
      const last = s.points[s.points.length - 1];
      el("circle", {cx: x(last[0]), cy: y(last[1]), r: 3, class: `dot ${s.cls}`}, svg);
    }
    svg.dataset.points = String(all.length);
  }

  function stacked(svg, opts) {
    const times = opts.times;
    if (times.length === 0) { empty(svg, opts.emptyText || "not started"); return; }
    const xMin = times[0], xMax = times.length > 1 ? times[times.length - 1] : times[0] + 1;
    const totals = times.map((_, i) => opts.layers.reduce((sum, layer) => sum + (layer.values[i] || 0), 0));
    const yMax = Math.max(1, ...totals);
    const {x, y} = frame(svg, xMin, xMax, yMax);
    // counts hold until the next sample: draw steps, not slopes
    const xs = times.length > 1 ? times : [xMin, xMax];
    const stepPath = (values) => {
      const vs = times.length > 1 ? values : [values[0], values[0]];
      const pts = [];
      vs.forEach((v, i) => {
        if (i > 0) pts.push([xs[i], vs[i - 1]]);
        pts.push([xs[i], v]);
      });
      return pts;
    };
    const base = times.map(() => 0);
    for (const layer of opts.layers) {
      const top = base.map((b, i) => b + (layer.values[i] || 0));
      const upper = stepPath(top), lower = stepPath(base).reverse();
      const d = [...upper, ...lower].map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
      el("path", {d: d + "Z", class: `area ${layer.cls}`}, svg);
      top.forEach((v, i) => { base[i] = v; });
    }
    svg.dataset.points = String(times.length);
  }

  return {line, stacked};
})();
