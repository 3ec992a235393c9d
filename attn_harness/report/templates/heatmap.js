/* Head-grid heatmaps drawn from the page's own data: value under the pointer, click a head to enlarge. */
(function () {
  const maps = {};
  const luts = JSON.parse(document.getElementById("colormaps").textContent);
  for (const name in luts) {
    const hex = luts[name], colors = [];
    for (let i = 0; i < hex.length; i += 6) colors.push("#" + hex.slice(i, i + 6));
    maps[name] = colors;
  }
  const MASKED = "#d0d0d0";
  const grids = {};
  document.querySelectorAll("script.grid-data").forEach(el => {
    const d = JSON.parse(el.textContent);
    d.values = {a: d.a, b: d.b, diff: d.a.map((v, i) => (v === null || d.b[i] === null ? null : d.b[i] - v))};
    grids[d.layer] = d;
  });

  function ticks(n) {
    const step = [1, 2, 5, 10, 20, 50, 100, 200, 500].find(s => n / s <= 8) || 1000;
    const out = [];
    for (let t = 0; t < n; t += step) out.push(t);
    return out;
  }
  function format(v) { return v === null ? "masked" : (Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(3) : v.toFixed(4)); }
  function colorOf(d, view, v) {
    if (v === null) return MASKED;
    const [lo, hi] = d.scale[view];
    const t = hi > lo ? Math.min(1, Math.max(0, (v - lo) / (hi - lo))) : 0.5;
    return maps[d.cmap[view]][Math.round(t * 255)];
  }

  /* Draws heads (positions into d.heads) of one view on a canvas; remembers the geometry for hit tests. */
  function draw(canvas, d, view, heads, cols, cell, title) {
    const nq = d.query.length, nk = d.key.length;
    const g = {d, view, heads, cols, cell, left: 30, top: 18, gap: 12, bottom: 22, bar: 64};
    g.pw = nk * cell; g.ph = nq * cell;
    g.panelW = g.left + g.pw + g.gap; g.panelH = g.top + g.ph + g.bottom;
    const rows = Math.ceil(heads.length / cols);
    const width = cols * g.panelW + g.bar, height = Math.max(rows * g.panelH, 140);
    const ratio = window.devicePixelRatio || 1;
    canvas.width = width * ratio; canvas.height = height * ratio;
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(ratio, ratio);
    ctx.fillStyle = "white"; ctx.fillRect(0, 0, width, height);
    ctx.font = "10px DejaVu Sans, Arial, sans-serif";
    const values = d.values[view];
    heads.forEach((h, index) => {
      const x0 = (index % cols) * g.panelW + g.left, y0 = Math.floor(index / cols) * g.panelH + g.top;
      for (let q = 0; q < nq; q++) {
        for (let k = 0; k < nk; k++) {
          ctx.fillStyle = colorOf(d, view, values[(h * nq + q) * nk + k]);
          ctx.fillRect(x0 + k * cell, y0 + (nq - 1 - q) * cell, cell, cell);  /* origin lower */
        }
      }
      ctx.strokeStyle = "#888"; ctx.strokeRect(x0 - 0.5, y0 - 0.5, g.pw + 1, g.ph + 1);
      ctx.fillStyle = "black"; ctx.textAlign = "center"; ctx.textBaseline = "bottom";
      ctx.font = "bold 11px DejaVu Sans, Arial, sans-serif";
      ctx.fillText(title || "Head " + d.heads[h], x0 + g.pw / 2, y0 - 3);
      ctx.font = "9px DejaVu Sans, Arial, sans-serif"; ctx.textBaseline = "top";
      ticks(nk).forEach(k => ctx.fillText(String(d.key[k]), x0 + (k + 0.5) * cell, y0 + g.ph + 3));
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      ticks(nq).forEach(q => ctx.fillText(String(d.query[q]), x0 - 3, y0 + (nq - 0.5 - q) * cell));
    });
    /* colour bar with its limits */
    const bx = cols * g.panelW + 8, by = g.top, bh = Math.min(height - g.top - g.bottom, 220), colors = maps[d.cmap[view]];
    for (let i = 0; i < bh; i++) { ctx.fillStyle = colors[Math.round((1 - i / bh) * 255)]; ctx.fillRect(bx, by + i, 12, 1); }
    ctx.fillStyle = "black"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
    ctx.fillText(format(d.scale[view][1]), bx + 15, by + 4);
    ctx.fillText(format(d.scale[view][0]), bx + 15, by + bh - 4);
    canvas.geometry = g;
  }

  /* The (head position, query index, key index) under a point of the canvas, or null. */
  function hit(canvas, event) {
    const g = canvas.geometry, box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left, y = event.clientY - box.top;
    const col = Math.floor(x / g.panelW), row = Math.floor(y / g.panelH);
    const index = row * g.cols + col;
    if (col >= g.cols || index >= g.heads.length) return null;
    const px = x - col * g.panelW - g.left, py = y - row * g.panelH - g.top;
    if (px < 0 || py < 0 || px >= g.pw || py >= g.ph) return null;
    const nq = g.d.query.length;
    return {head: g.heads[index], q: nq - 1 - Math.floor(py / g.cell), k: Math.floor(px / g.cell)};
  }

  const tooltip = document.getElementById("tooltip");
  function describe(d, at) {
    const i = (at.head * d.query.length + at.q) * d.key.length + at.k;
    return `layer ${d.layer}, head ${d.heads[at.head]}, query frame ${d.query[at.q]}, key frame ${d.key[at.k]}: ` +
      `${d.labels[0]} ${format(d.values.a[i])}, ${d.labels[1]} ${format(d.values.b[i])}, ` +
      `${d.labels[1]} \u2212 ${d.labels[0]} ${format(d.values.diff[i])}`;
  }
  function attach(canvas) {
    canvas.addEventListener("mousemove", event => {
      const at = hit(canvas, event);
      tooltip.hidden = !at;
      if (!at) return;
      tooltip.textContent = describe(canvas.geometry.d, at);
      tooltip.style.left = (event.pageX + 14) + "px"; tooltip.style.top = (event.pageY + 14) + "px";
    });
    canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  }

  const zoom = document.getElementById("zoom");
  function enlarge(d, head) {
    const cell = Math.max(8, Math.min(28, Math.floor((window.innerWidth - 360) / (3 * d.key.length))));
    const panel = document.createElement("div");
    panel.className = "zoom-panel";
    panel.addEventListener("click", event => event.stopPropagation());
    const title = document.createElement("p");
    title.textContent = `Layer ${d.layer}, head ${d.heads[head]}: query frame up, key frame across (latent). ` +
      "Point at a cell for its values; click outside or press Escape to close.";
    panel.appendChild(title);
    const names = {a: d.labels[0], b: d.labels[1], diff: `${d.labels[1]} \u2212 ${d.labels[0]}`};
    ["a", "b", "diff"].forEach(view => {
      const canvas = document.createElement("canvas");
      canvas.className = "zoomed-heatmap"; canvas.dataset.view = view;
      panel.appendChild(canvas);
      draw(canvas, d, view, [head], 1, cell, names[view]);
      attach(canvas);
    });
    zoom.replaceChildren(panel);
    zoom.classList.add("open");
  }

  document.querySelectorAll("canvas.heatmap").forEach(canvas => {
    const d = grids[canvas.dataset.layer];
    const cell = Math.max(4, Math.min(16, Math.floor(220 / d.key.length)));
    draw(canvas, d, canvas.dataset.view, d.heads.map((_, i) => i), d.cols, cell);
    attach(canvas);
    canvas.addEventListener("click", event => {
      const at = hit(canvas, event);
      if (at) { tooltip.hidden = true; enlarge(d, at.head); }
    });
  });
})();
