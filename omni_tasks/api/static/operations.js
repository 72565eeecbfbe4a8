// Operations: the cluster as `GET v1/status` reports it, refreshed while the tab shows.

import * as api from "./api.js";
import { $, bytes, h, percent, table } from "./dom.js";

const REFRESH_MS = 3000;

function ago(at) {
  const s = Date.now() / 1000 - at;
  return s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

/** The levels that hold messages ("L0 2, L5 1"; 0 is the highest). */
function levels(counts) {
  const held = Object.entries(counts).filter(([, n]) => n > 0);
  return held.length ? held.map(([level, n]) => `L${level} ${n}`).join(", ") : "–";
}

function memoryCell(memory) {
  if (!memory) return "not reported";
  const used = memory.used_bytes ?? 0;
  const budget = memory.budget_bytes ?? 0;
  const device = memory.device ? ` (${memory.device})` : "";
  return h(
    "span",
    { class: "memory" },
    budget ? h("meter", { min: 0, max: budget, value: used, high: budget * 0.9 }) : null,
    ` ${bytes(used)} / ${bytes(budget)}${device}`,
  );
}

export class Operations {
  constructor(onAuthError, onLinks) {
    this.onAuthError = onAuthError;
    this.onLinks = onLinks;
    this.timer = null;
    this.busy = false;
    document.addEventListener("visibilitychange", () => {
      if (this.timer !== null && !document.hidden) this.refresh();
    });
  }

  show() {
    this.hide();
    this.refresh();
    this.timer = setInterval(() => document.hidden || this.refresh(), REFRESH_MS);
  }

  hide() {
    clearInterval(this.timer);
    this.timer = null;
  }

  clear() {
    this.hide();
    for (const id of ["health", "pools", "caches", "workers", "models", "stranded", "rejected"]) {
      $(`#ops-${id}`).replaceChildren();
    }
    $("#ops-time").textContent = "";
  }

  async refresh() {
    if (this.busy) return;
    this.busy = true;
    try {
      const status = await api.call("v1/status");
      if (this.timer !== null) this.render(status);
    } catch (error) {
      if (error instanceof api.AuthError) return this.onAuthError(error.message);
      $("#ops-time").textContent = `refresh failed: ${error.message}`;
    } finally {
      this.busy = false;
    }
  }

  render(s) {
    $("#ops-time").textContent = new Date(s.time * 1000).toLocaleTimeString();
    this.onLinks(s.links ?? {});
    $("#ops-health").replaceChildren(...health(s));
    $("#ops-pools").replaceChildren(pools(s.pools));
    $("#ops-caches").replaceChildren(caches(s));
    $("#ops-workers").replaceChildren(workers(s.workers));
    const models = Object.entries(s.models).map(([name, m]) => [
      name,
      m.workers.join(", ") || "none",
      m.waiting,
    ]);
    $("#ops-models").replaceChildren(table(["model", "workers", "waiting"], models));
    const stranded = Object.entries(s.stranded);
    $("#ops-stranded").replaceChildren(table(["list", "messages"], stranded, "None."));
    const rejected = s.rejected.recent.map((r) => [
      ago(r.at),
      r.reason,
      r.task_name ?? "–",
      r.task_id ?? "–",
      r.queue ?? "–",
    ]);
    $("#ops-rejected").replaceChildren(
      h("p", {}, `${s.rejected.count} rejected in all.`),
      table(["when", "reason", "task", "task id", "queue"], rejected, "None recently."),
    );
  }
}

function health(s) {
  const state = s.healthy ? "healthy" : "unhealthy";
  const title = h(
    "h2",
    {},
    "Health ",
    h("span", { class: `badge ${s.healthy ? "status-succeeded" : "status-failed"}` }, state),
  );
  if (!s.issues.length) return [title, h("p", { class: "muted" }, "No issues.")];
  const items = s.issues.map((issue, i) =>
    h("li", {}, issue, h("div", { class: "muted" }, s.recommendations[i] ?? null)),
  );
  return [title, h("ul", { class: "issues" }, items)];
}

function pools(found) {
  const head = ["pool", "queue", "waiting", "high", "normal", "low", "by level", "workers"];
  const counts = ["processed", "failed", "expired", "cancelled", "rejected"];
  const rows = Object.entries(found).map(([name, p]) => [
    name,
    p.queue,
    p.waiting,
    p.classes.high,
    p.classes.normal,
    p.classes.low,
    levels(p.levels),
    p.workers,
    ...counts.map((c) => p[c]),
  ]);
  return table([...head, ...counts], rows);
}

function caches(s) {
  const lora = `${s.lora.hits} hits, ${s.lora.misses} misses`;
  return table(
    ["cache", "hit rate", "detail"],
    [
      ["DiT cache", percent(s.dit_cache.hit_rate), `${bytes(s.dit_cache.bytes)} held`],
      ["LoRA adapters", percent(s.lora.hit_rate), lora],
    ],
  );
}

function workers(found) {
  const head = ["worker", "queues", "models", "celery pool", "slots", "running", "batch"];
  const rows = found.map((w) => [
    w.hostname,
    w.queues.join(", "),
    Object.entries(w.models)
      .map(([stage, model]) => `${stage}: ${model}`)
      .join(", ") || "–",
    w.pool_type,
    w.concurrency,
    w.held,
    w.memory?.batch ?? "–",
    memoryCell(w.memory),
    bytes(w.dit_cache_bytes),
    `${w.beat_age_s.toFixed(1)} s`,
  ]);
  return table([...head, "device memory", "DiT cache", "beat"], rows, "No live worker.");
}
