// The nuclei over the slide: outlines from the box query when zoomed in, the count-grid density
// when zoomed out; per-class visibility; hit testing for clicks.

import { apiJson } from "./api.js";

const OUTLINE_AREA = 4096 * 4096; // level-0 px² of view below which outlines are drawn
const QUERY_LIMIT = 5000;
const MARGIN = 0.25; // fetch this much beyond the view on each side, so small pans need nothing
const DEBOUNCE_MS = 120;

function rgb(colour, alpha = 1) {
  return `rgba(${colour[0]}, ${colour[1]}, ${colour[2]}, ${alpha})`;
}

function contains(outer, inner) {
  return outer[0] <= inner[0] && outer[1] <= inner[1] && outer[2] >= inner[2] && outer[3] >= inner[3];
}

/** The outer ring of a Polygon or of a MultiPolygon's first polygon. */
function outerRing(geometry) {
  if (geometry.type === "MultiPolygon") return geometry.coordinates[0][0];
  return geometry.coordinates[0];
}

function ringBox(ring) {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const [x, y] of ring) {
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
  }
  return [x0, y0, x1, y1];
}

function insideRing(ring, x, y) {
  let inside = false;
  for (let i = 0, j = ring.length - 1; i < ring.length; j = i, i += 1) {
    const [xi, yi] = ring[i];
    const [xj, yj] = ring[j];
    if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

export class NucleusOverlay {
  /**
   * @param {DeepZoomViewer} viewer
   * @param {HTMLCanvasElement} canvas
   * @param {string} jobUrl  `/v1/jobs/{id}`
   * @param {object} density  GET {jobUrl}/nuclei/density (its `classes` give names and colours)
   */
  constructor(viewer, canvas, jobUrl, density) {
    this.viewer = viewer;
    this.canvas = canvas;
    this.jobUrl = jobUrl;
    this.density = density;
    this.classes = density.classes;
    this.enabled = new Set(this.classes.map((c) => c.type));
    this.classOf = new Map(this.classes.map((c) => [c.name, c.type]));
    this.visible = true;
    this.features = [];
    this.loadedBox = null;
    this.truncated = false;
    this.pending = null;
    this.timer = null;
    this.selected = null;
    this.listeners = [];
    this.maxDensity = this.densityMax();
    viewer.onChange(() => this.update());
  }

  onStatus(listener) { this.listeners.push(listener); }

  status(text) { for (const listener of this.listeners) listener(text); }

  setClass(type, shown) {
    if (shown) this.enabled.add(type); else this.enabled.delete(type);
    this.maxDensity = this.densityMax();
    this.draw();
  }

  setVisible(shown) {
    this.visible = shown;
    this.draw();
  }

  densityMax() {
    const { counts } = this.density;
    let max = 0;
    for (let k = 0; k < (counts[0] || []).length; k += 1) {
      let total = 0;
      for (const c of this.classes) if (this.enabled.has(c.type)) total += counts[c.type][k];
      max = Math.max(max, total);
    }
    return max;
  }

  mode() {
    const [x0, y0, x1, y1] = this.viewer.viewBox();
    return (x1 - x0) * (y1 - y0) <= OUTLINE_AREA ? "outlines" : "density";
  }

  update() {
    if (this.mode() === "outlines") {
      const view = this.viewer.viewBox();
      if (!this.loadedBox || !contains(this.loadedBox, view) || this.truncated) this.schedule(view);
    }
    this.draw();
  }

  schedule(view) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.fetch(view), DEBOUNCE_MS);
  }

  async fetch(view) {
    const { width, height } = this.viewer.dzi;
    const mx = (view[2] - view[0]) * MARGIN;
    const my = (view[3] - view[1]) * MARGIN;
    const box = [Math.max(0, view[0] - mx), Math.max(0, view[1] - my),
                 Math.min(width, view[2] + mx), Math.min(height, view[3] + my)];
    if (box[2] <= box[0] || box[3] <= box[1]) return;
    const key = box.map((v) => v.toFixed(1)).join(",");
    if (this.pending === key) return;
    this.pending = key;
    try {
      const body = await apiJson(`${this.jobUrl}/nuclei?bbox=${key}&limit=${QUERY_LIMIT}`);
      if (this.pending !== key) return; // a newer view asked for another box meanwhile
      this.features = body.features.map((f) => {
        const ring = outerRing(f.geometry);
        const cls = f.properties && f.properties.classification;
        return { feature: f, ring, box: ringBox(ring),
                 type: cls ? (this.classOf.get(cls.name) ?? 0) : 0 };
      });
      this.loadedBox = box;
      this.truncated = body.truncated;
      this.status(body.truncated
        ? `Showing the first ${body.features.length} nuclei here: zoom in to see them all.`
        : `${body.features.length} nuclei in view.`);
      this.draw();
    } catch (error) {
      this.status(`Nuclei unavailable: ${error.message}`);
    } finally {
      if (this.pending === key) this.pending = null;
    }
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const ratio = window.devicePixelRatio || 1;
    const v = this.viewer;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    const mode = this.mode();
    this.canvas.dataset.mode = mode;
    let drawn = 0;
    if (this.visible) {
      ctx.setTransform(ratio * v.scale, 0, 0, ratio * v.scale, -v.x * ratio * v.scale,
                       -v.y * ratio * v.scale);
      drawn = mode === "outlines" ? this.drawOutlines(ctx, v) : this.drawDensity(ctx);
    }
    this.canvas.dataset.drawn = String(drawn);
  }

  drawOutlines(ctx, v) {
    const byClass = new Map();
    const [x0, y0, x1, y1] = v.viewBox();
    let drawn = 0;
    for (const item of this.features) {
      if (!this.enabled.has(item.type)) continue;
      const box = item.box;
      if (box[2] < x0 || box[0] > x1 || box[3] < y0 || box[1] > y1) continue;
      if (!byClass.has(item.type)) byClass.set(item.type, new Path2D());
      const path = byClass.get(item.type);
      const ring = item.ring;
      path.moveTo(ring[0][0], ring[0][1]);
      for (let i = 1; i < ring.length; i += 1) path.lineTo(ring[i][0], ring[i][1]);
      path.closePath();
      drawn += 1;
    }
    ctx.lineWidth = 1.5 / v.scale;
    for (const [type, path] of byClass) {
      const colour = this.classes[type].colour;
      ctx.fillStyle = rgb(colour, 0.18);
      ctx.strokeStyle = rgb(colour, 0.95);
      ctx.fill(path);
      ctx.stroke(path);
    }
    if (this.selected && this.enabled.has(this.selected.type)) {
      const path = new Path2D();
      const ring = this.selected.ring;
      path.moveTo(ring[0][0], ring[0][1]);
      for (let i = 1; i < ring.length; i += 1) path.lineTo(ring[i][0], ring[i][1]);
      path.closePath();
      ctx.lineWidth = 3 / v.scale;
      ctx.strokeStyle = "#ffe600";
      ctx.stroke(path);
    }
    return drawn;
  }

  drawDensity(ctx) {
    const { counts, rows, cols, cell_px: cell } = this.density;
    if (!this.maxDensity) return 0;
    let drawn = 0;
    for (let r = 0; r < rows; r += 1) {
      for (let c = 0; c < cols; c += 1) {
        const k = r * cols + c;
        let total = 0;
        const mix = [0, 0, 0];
        for (const cls of this.classes) {
          if (!this.enabled.has(cls.type)) continue;
          const n = counts[cls.type][k];
          total += n;
          for (let i = 0; i < 3; i += 1) mix[i] += n * cls.colour[i];
        }
        if (!total) continue;
        ctx.fillStyle = rgb(mix.map((m) => Math.round(m / total)), 0.15 + 0.6 * (total / this.maxDensity));
        ctx.fillRect(c * cell, r * cell, cell, cell);
        drawn += total;
      }
    }
    return drawn;
  }

  /** The drawn nucleus under level-0 point (x, y), or null. */
  pick(x, y) {
    if (this.mode() !== "outlines") return null;
    for (const item of this.features) {
      const box = item.box;
      if (x < box[0] || x > box[2] || y < box[1] || y > box[3]) continue;
      if (this.enabled.has(item.type) && insideRing(item.ring, x, y)) {
        this.selected = item;
        this.draw();
        return item.feature;
      }
    }
    this.selected = null;
    this.draw();
    return null;
  }
}
