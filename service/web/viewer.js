// A small deep-zoom viewer: DeepZoom tiles drawn on a canvas, fetched (with the API key) for the
// viewport only; pan by dragging or with the arrow keys, zoom to the cursor with the wheel.

import { api } from "./api.js";

const MAX_TILES = 400; // decoded tiles kept
const MAX_PARALLEL = 6; // tile requests in flight
const ZOOM_STEP = 1.5;

/** Parses a DeepZoom descriptor (.dzi XML). */
export function parseDzi(text) {
  const doc = new DOMParser().parseFromString(text, "application/xml");
  const image = doc.documentElement;
  const size = image.getElementsByTagName("Size")[0];
  return {
    width: Number(size.getAttribute("Width")),
    height: Number(size.getAttribute("Height")),
    tileSize: Number(image.getAttribute("TileSize")),
    overlap: Number(image.getAttribute("Overlap")),
    format: image.getAttribute("Format"),
  };
}

export class DeepZoomViewer {
  /**
   * @param {HTMLElement} element  focusable container of the canvases
   * @param {HTMLCanvasElement} canvas  where tiles are drawn
   * @param {object} dzi  parsed descriptor
   * @param {string} tilesUrl  base of the tiles: `${tilesUrl}/${level}/${col}_${row}.${format}`
   */
  constructor(element, canvas, dzi, tilesUrl) {
    this.element = element;
    this.canvas = canvas;
    this.dzi = dzi;
    this.tilesUrl = tilesUrl;
    this.maxLevel = Math.ceil(Math.log2(Math.max(dzi.width, dzi.height)));
    this.tiles = new Map(); // key -> {bitmap, used} | {pending: true}
    this.queue = [];
    this.inFlight = 0;
    this.listeners = [];
    this.scale = 1; // screen px per level-0 px
    this.x = 0; // level-0 px at the canvas' left edge
    this.y = 0;
    this.tilesDrawn = 0;
    this.frame = null;
    this.resize();
    this.fit();
    new ResizeObserver(() => { this.resize(); this.redraw(); }).observe(element);
    this.bindEvents();
  }

  onChange(listener) { this.listeners.push(listener); }

  resize() {
    const ratio = window.devicePixelRatio || 1;
    const { width, height } = this.element.getBoundingClientRect();
    this.width = Math.max(1, width);
    this.height = Math.max(1, height);
    for (const canvas of this.element.querySelectorAll("canvas")) {
      canvas.width = Math.round(this.width * ratio);
      canvas.height = Math.round(this.height * ratio);
      canvas.style.width = `${this.width}px`;
      canvas.style.height = `${this.height}px`;
    }
  }

  /** Shows the whole slide, centred. */
  fit() {
    this.scale = Math.min(this.width / this.dzi.width, this.height / this.dzi.height);
    this.x = (this.dzi.width - this.width / this.scale) / 2;
    this.y = (this.dzi.height - this.height / this.scale) / 2;
    this.redraw();
  }

  /** Multiplies the scale by `factor`, keeping the slide point under (sx, sy) in place. */
  zoom(factor, sx = this.width / 2, sy = this.height / 2) {
    const min = Math.min(this.width / this.dzi.width, this.height / this.dzi.height) / 4;
    const next = Math.min(Math.max(this.scale * factor, min), 8);
    const [px, py] = this.toSlide(sx, sy);
    this.scale = next;
    this.x = px - sx / next;
    this.y = py - sy / next;
    this.redraw();
  }

  /** Moves the view by (dx, dy) screen px. */
  pan(dx, dy) {
    this.x -= dx / this.scale;
    this.y -= dy / this.scale;
    this.redraw();
  }

  /** Level-0 slide coordinates of a screen point. */
  toSlide(sx, sy) { return [this.x + sx / this.scale, this.y + sy / this.scale]; }

  /** The visible part of the slide, level-0 px: [x0, y0, x1, y1]. */
  viewBox() {
    return [this.x, this.y, this.x + this.width / this.scale, this.y + this.height / this.scale];
  }

  bindEvents() {
    const el = this.element;
    let drag = null;
    el.addEventListener("pointerdown", (event) => {
      drag = { x: event.clientX, y: event.clientY, moved: false };
      el.setPointerCapture(event.pointerId);
    });
    el.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
      drag.x = event.clientX;
      drag.y = event.clientY;
      this.pan(dx, dy);
    });
    el.addEventListener("pointerup", (event) => {
      if (drag && !drag.moved) {
        const rect = el.getBoundingClientRect();
        el.dispatchEvent(new CustomEvent("slideclick", {
          detail: this.toSlide(event.clientX - rect.left, event.clientY - rect.top) }));
      }
      drag = null;
    });
    el.addEventListener("wheel", (event) => {
      event.preventDefault();
      const rect = el.getBoundingClientRect();
      this.zoom(Math.pow(ZOOM_STEP, -event.deltaY / 100), event.clientX - rect.left,
                event.clientY - rect.top);
    }, { passive: false });
    el.addEventListener("keydown", (event) => {
      const step = 80;
      const actions = {
        ArrowLeft: () => this.pan(step, 0), ArrowRight: () => this.pan(-step, 0),
        ArrowUp: () => this.pan(0, step), ArrowDown: () => this.pan(0, -step),
        "+": () => this.zoom(ZOOM_STEP), "=": () => this.zoom(ZOOM_STEP),
        "-": () => this.zoom(1 / ZOOM_STEP), "0": () => this.fit(),
      };
      if (actions[event.key]) {
        event.preventDefault();
        actions[event.key]();
      }
    });
  }

  redraw() {
    if (this.frame === null) {
      this.frame = requestAnimationFrame(() => {
        this.frame = null;
        this.draw();
        for (const listener of this.listeners) listener(this);
      });
    }
  }

  /** The DeepZoom level whose pixels are closest to (not coarser than) the screen's. */
  level() {
    const ratio = window.devicePixelRatio || 1;
    const wanted = this.maxLevel + Math.ceil(Math.log2(this.scale * ratio) - 1e-6);
    return Math.min(this.maxLevel, Math.max(0, wanted));
  }

  levelGeometry(level) {
    const downsample = 2 ** (this.maxLevel - level);
    const { tileSize } = this.dzi;
    // Level sizes halve rounding up, as DeepZoom defines them.
    let width = this.dzi.width;
    let height = this.dzi.height;
    for (let i = this.maxLevel; i > level; i -= 1) {
      width = Math.max(1, Math.ceil(width / 2));
      height = Math.max(1, Math.ceil(height / 2));
    }
    return { downsample, width, height, cols: Math.ceil(width / tileSize),
             rows: Math.ceil(height / tileSize) };
  }

  visibleTiles(level) {
    const g = this.levelGeometry(level);
    const [x0, y0, x1, y1] = this.viewBox();
    const size = this.dzi.tileSize * g.downsample;
    const c0 = Math.max(0, Math.floor(x0 / size));
    const r0 = Math.max(0, Math.floor(y0 / size));
    const c1 = Math.min(g.cols - 1, Math.floor(x1 / size));
    const r1 = Math.min(g.rows - 1, Math.floor(y1 / size));
    const out = [];
    for (let r = r0; r <= r1; r += 1) for (let c = c0; c <= c1; c += 1) out.push([c, r]);
    return { geometry: g, tiles: out };
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const ratio = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#f4f4f4";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(ratio * this.scale, 0, 0, ratio * this.scale, -this.x * ratio * this.scale,
                     -this.y * ratio * this.scale);
    ctx.imageSmoothingQuality = "high";
    const top = this.level();
    const wanted = this.visibleTiles(top);
    // Coarser tiles already loaded fill the gaps while this level's arrive.
    let drawn = 0;
    for (let level = Math.max(0, top - 5); level <= top; level += 1) {
      const { geometry, tiles } = level === top ? wanted : this.visibleTiles(level);
      for (const [c, r] of tiles) {
        const tile = this.tiles.get(`${level}/${c}_${r}`);
        if (tile && tile.bitmap) {
          this.drawTile(ctx, tile, geometry, c, r);
          tile.used = performance.now();
          if (level === top) drawn += 1;
        }
      }
    }
    this.tilesDrawn = drawn;
    this.canvas.dataset.tilesDrawn = String(drawn);
    this.canvas.dataset.tilesWanted = String(wanted.tiles.length);
    this.request(top, wanted.tiles);
  }

  drawTile(ctx, tile, geometry, c, r) {
    const { tileSize, overlap } = this.dzi;
    const left = (c * tileSize - (c > 0 ? overlap : 0)) * geometry.downsample;
    const top = (r * tileSize - (r > 0 ? overlap : 0)) * geometry.downsample;
    ctx.drawImage(tile.bitmap, left, top, tile.bitmap.width * geometry.downsample,
                  tile.bitmap.height * geometry.downsample);
  }

  request(level, tiles) {
    // Only the current viewport's tiles are queued; stale requests are dropped.
    this.queue = tiles.map(([c, r]) => `${level}/${c}_${r}`).filter((key) => !this.tiles.has(key));
    this.pump();
  }

  pump() {
    while (this.inFlight < MAX_PARALLEL && this.queue.length) {
      const key = this.queue.shift();
      if (this.tiles.has(key)) continue;
      this.tiles.set(key, { pending: true });
      this.inFlight += 1;
      this.load(key).finally(() => {
        this.inFlight -= 1;
        this.pump();
      });
    }
  }

  async load(key) {
    try {
      const response = await api(`${this.tilesUrl}/${key}.${this.dzi.format}`);
      const bitmap = await createImageBitmap(await response.blob());
      this.tiles.set(key, { bitmap, used: performance.now() });
      this.evict();
      this.redraw();
    } catch (error) {
      this.tiles.delete(key);
      this.element.dispatchEvent(new CustomEvent("tileerror", { detail: error }));
    }
  }

  evict() {
    if (this.tiles.size <= MAX_TILES) return;
    const loaded = [...this.tiles.entries()].filter(([, t]) => t.bitmap);
    loaded.sort((a, b) => a[1].used - b[1].used);
    for (const [key, tile] of loaded.slice(0, this.tiles.size - MAX_TILES)) {
      tile.bitmap.close();
      this.tiles.delete(key);
    }
  }
}
