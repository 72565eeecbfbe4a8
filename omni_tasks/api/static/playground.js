// The playground: a job form, the followed job's panel (status, progress, previews,
// the result) and a gallery of this browser's recent jobs.

import * as api from "./api.js";
import { $, h, seconds } from "./dom.js";

/** The pool whose models a job type may name (multimodal: two pools, the defaults). */
const POOL_OF = {
  diffusion: "diffusion",
  image: "diffusion",
  video: "diffusion",
  audio: "diffusion",
  speech: "speech",
  text: "ar",
  chat: "ar",
};
const PROMPT_LABEL = { speech: "Text to speak", chat: "Message" };
const FINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
// Per page base, so two APIs behind one origin keep their own lists.
const JOBS_KEY = `omni.jobs:${new URL(".", location.href).pathname}`;
const KEEP = 24;
const THUMBS = 12;
const LOG_LINES = 300;

function remembered() {
  try {
    return JSON.parse(localStorage.getItem(JOBS_KEY)) ?? [];
  } catch {
    return [];
  }
}

function remember(jobs) {
  localStorage.setItem(JOBS_KEY, JSON.stringify(jobs.slice(0, KEEP)));
}

function jobPath(id) {
  return `v1/jobs/${encodeURIComponent(id)}`;
}

/** "ink, watercolor:0.5" -> ["ink", {name: "watercolor", scale: 0.5}] */
function parseLora(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => {
      const [name, scale] = part.split(":").map((s) => s.trim());
      return scale === undefined ? name : { name, scale: Number(scale) };
    });
}

function progressText(p) {
  const stage = p.stage ? `${p.stage}: ` : "";
  if (p.steps !== undefined) return `${stage}step ${p.step}/${p.steps}`;
  if (p.max_tokens !== undefined) return `${stage}${p.tokens}/${p.max_tokens} tokens`;
  return stage + JSON.stringify(p);
}

function cacheText(cache) {
  if (!cache || typeof cache !== "object") return null;
  const parts = Object.entries(cache).map(
    ([name, value]) => `${name} ${typeof value === "object" ? JSON.stringify(value) : value}`,
  );
  return parts.length ? parts.join(", ") : null;
}

function timingsText(timings, names = null) {
  if (!timings) return null;
  const parts = Object.entries(timings)
    .filter(([name, value]) => name.endsWith("_s") && typeof value === "number")
    .filter(([name]) => !names || names.includes(name))
    .map(([name, value]) => `${name.slice(0, -2)} ${seconds(value)}`);
  return parts.length ? parts.join(", ") : null;
}

function loraText(lora) {
  if (!Array.isArray(lora) || !lora.length) return null;
  return lora
    .map((a) => {
      const served = a.hit === true ? " (hit)" : a.hit === false ? " (loaded)" : "";
      return `${a.name} ×${a.scale}${served}`;
    })
    .join(", ");
}

/** A file as a data: URL (how a job's JSON carries an input image). */
function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export class Playground {
  constructor(onAuthError) {
    this.onAuthError = onAuthError;
    this.models = [];
    this.current = null; // the id of the job in the panel
    this.stream = null; // its events' AbortController
    this.urls = []; // the panel's object URLs, revoked when it shows another job
    this.thumbs = new Map(); // job id -> Promise of an object URL
    this.galleryRound = 0;
    $("#f-type").addEventListener("change", () => this.fields());
    $("#job-form").addEventListener("submit", (event) => this.submit(event));
    $("#cancel").addEventListener("click", () => this.cancel());
    $("#gallery-refresh").addEventListener("click", () => this.gallery());
    $("#gallery-clear").addEventListener("click", () => {
      remember([]);
      this.gallery();
    });
  }

  async start(models) {
    this.models = models;
    let voices = { data: [], default: null };
    try {
      voices = await api.call("v1/audio/voices");
    } catch (error) {
      if (error instanceof api.AuthError) throw error;
    }
    $("#f-voice").replaceChildren(
      ...voices.data.map((v) =>
        h("option", { value: v.id, selected: v.id === voices.default }, v.id),
      ),
    );
    this.fields();
    await this.gallery();
  }

  /** Everything from the cluster off the page (a 401). */
  clear() {
    this.stream?.abort();
    this.current = null;
    this.models = [];
    $("#f-model").replaceChildren();
    $("#f-voice").replaceChildren();
    this.reset(null);
    $("#gallery").replaceChildren();
    for (const url of this.thumbs.values()) url.then((u) => u && URL.revokeObjectURL(u));
    this.thumbs.clear();
  }

  /** Show the fields of the chosen type, and its pool's models. */
  fields() {
    const type = $("#f-type").value;
    for (const el of document.querySelectorAll("#job-form [data-for]")) {
      el.hidden = !el.dataset.for.split(" ").includes(type);
    }
    $("#prompt-label").textContent = PROMPT_LABEL[type] ?? "Prompt";
    const select = $("#f-model");
    const previous = select.value;
    const served = this.models.filter((m) => m.pool === POOL_OF[type]);
    select.replaceChildren(
      h("option", { value: "" }, "pool default"),
      ...served.map((m) => h("option", { value: m.id }, m.id)),
    );
    if (served.some((m) => m.id === previous)) select.value = previous;
  }

  /** The job's JSON from the visible fields. */
  body() {
    const form = $("#job-form");
    const type = form.elements.type.value;
    const body = { type, priority: form.elements.priority.value };
    for (const label of form.querySelectorAll("[data-for]")) {
      const input = label.querySelector("input, select");
      if (label.hidden || !input || input.type === "file" || input.value.trim() === "") continue;
      if (input.name === "lora") {
        const adapters = parseLora(input.value);
        if (adapters.length) body.lora = adapters;
      } else {
        body[input.name] = input.type === "number" ? Number(input.value) : input.value;
      }
    }
    if (body.partial_images === 0) delete body.partial_images;
    const prompt = form.elements.prompt.value;
    if (type === "speech") body.input = prompt;
    else if (type === "chat") body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    return body;
  }

  async submit(event) {
    event.preventDefault(); // never a form navigation (the CSP's form-action is 'none')
    const button = $("#submit");
    $("#form-error").textContent = "";
    button.disabled = true;
    try {
      const body = this.body();
      const file = $("#f-image").closest("label").hidden ? null : $("#f-image").files[0];
      if (file) body.image = await dataUrl(file); // an edit's, or a video's first frame
      const job = await api.call("v1/jobs", { method: "POST", body });
      remember([{ id: job.id, type: job.type }, ...remembered().filter((j) => j.id !== job.id)]);
      this.gallery();
      this.follow(job);
    } catch (error) {
      this.failed(error, "#form-error");
    } finally {
      button.disabled = false;
    }
  }

  failed(error, where) {
    if (error instanceof api.AuthError) this.onAuthError(error.message);
    else $(where).textContent = error.message;
  }

  /** Show `job` in the panel and follow its events to the end. */
  async follow(job) {
    this.stream?.abort();
    const stream = new AbortController();
    this.stream = stream;
    this.current = job.id;
    this.ended = false;
    this.reset(job);
    try {
      for await (const { name, data } of api.events(`${jobPath(job.id)}/events`, stream.signal)) {
        if (stream.signal.aborted) return;
        this.onEvent(name, data);
      }
    } catch (error) {
      if (stream.signal.aborted) return;
      if (error instanceof api.AuthError) return this.onAuthError(error.message);
      this.log(`events: ${error.message}`);
      if (error instanceof api.ApiError && error.status === 404) return; // expired
    }
    // A stream cut before the result (a proxy's idle timeout): poll to the end.
    while (!this.ended && !stream.signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      try {
        const view = await api.call(jobPath(job.id), { signal: stream.signal });
        if (stream.signal.aborted) return;
        if (FINAL.has(view.status)) this.finish(view);
        else this.setStatus(view.status);
      } catch (error) {
        if (stream.signal.aborted) return;
        if (error instanceof api.AuthError) return this.onAuthError(error.message);
        this.log(`poll: ${error.message}`);
        if (error instanceof api.ApiError && error.status === 404) return;
      }
    }
  }

  onEvent(name, data) {
    if (name === "status") {
      this.setStatus(data.status);
      this.log(`status ${data.status}`);
    } else if (name === "progress") {
      this.setProgress(data.progress);
      this.log(`progress ${progressText(data.progress)}`);
    } else if (name === "partial_image") {
      const src = `data:image/${data.output_format ?? "png"};base64,${data.b64_json}`;
      const title = `preview ${data.index + 1} at step ${data.step}/${data.steps}`;
      $("#previews").append(h("img", { src, alt: title, title, class: "preview" }));
      this.log(title);
    } else if (name === "delta") {
      const text = $("#job-text");
      text.hidden = false;
      text.textContent += data.text;
    } else if (name === "result") {
      this.finish(data);
    }
  }

  reset(job) {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
    $("#job-title").textContent = job ? `${job.type} ${job.id.slice(0, 8)}` : "No job yet";
    $("#job-title").title = job ? job.id : "";
    this.setStatus(job ? job.status : null);
    $("#job-progress").value = 0;
    $("#job-progress-text").textContent = "";
    $("#previews").replaceChildren();
    $("#output").replaceChildren();
    $("#job-text").textContent = "";
    $("#job-text").hidden = true;
    $("#job-error").hidden = true;
    $("#job-report").replaceChildren();
    $("#job-log").replaceChildren();
    if (job) this.log(`submitted ${job.id}`);
  }

  setStatus(status) {
    const el = $("#job-status");
    el.textContent = status ?? "";
    el.className = status ? `badge status-${status}` : "badge";
    $("#cancel").disabled = !status || FINAL.has(status);
  }

  setProgress(progress) {
    const steps = progress.steps ?? progress.max_tokens;
    const done = progress.step ?? progress.tokens;
    if (steps) $("#job-progress").value = done / steps;
    $("#job-progress-text").textContent = progressText(progress);
  }

  log(text) {
    const list = $("#job-log");
    list.append(h("li", { "data-text": text }, `${new Date().toLocaleTimeString()} ${text}`));
    while (list.children.length > LOG_LINES) list.firstChild.remove();
  }

  finish(view) {
    if (view.id !== this.current || this.ended) return;
    this.ended = true;
    this.setStatus(view.status);
    this.log(`result ${view.status}`);
    if (view.status === "succeeded") $("#job-progress").value = 1;
    if (view.error) {
      $("#job-error").textContent = view.error.message;
      $("#job-error").hidden = false;
    }
    const result = view.result ?? {};
    const text = result.image_prompt ?? result.text;
    if (typeof text === "string" && !$("#job-text").textContent) {
      $("#job-text").textContent = text;
      $("#job-text").hidden = false;
    }
    this.report(view);
    if (view.video_url) this.media("video", view.video_url, view.id);
    else if (view.image_url) this.media("img", view.image_url, view.id);
    if (view.audio_url) this.media("audio", view.audio_url, view.id);
    this.gallery();
  }

  report(view) {
    const r = view.result ?? {};
    const size = r.width ? `${r.width}×${r.height}` : null;
    const steps = r.steps ? `${r.steps_run ?? r.steps} of ${r.steps}` : null;
    const usage = r.usage ? `${r.usage.prompt_tokens} in, ${r.usage.completion_tokens} out` : null;
    const rows = [
      ["model", r.model],
      ["seed", r.seed],
      ["size", size],
      ["steps run", steps],
      ["duration", r.duration_s !== undefined ? seconds(r.duration_s) : null],
      ["tokens", usage],
      ["cache", cacheText(r.cache)],
      ["LoRA", loraText(r.lora)],
      ["timings", timingsText(r.timings)],
      ["batch", r.max_batch],
      ["preemptions", r.preemptions],
    ];
    $("#job-report").replaceChildren(
      ...rows
        .filter(([, value]) => value !== null && value !== undefined)
        .flatMap(([name, value]) => [h("dt", {}, name), h("dd", { "data-field": name }, value)]),
    );
  }

  async media(tag, url, id) {
    try {
      const src = await api.objectUrl(url);
      if (this.current !== id) return URL.revokeObjectURL(src);
      this.urls.push(src);
      const attrs = { src, class: "result", "data-source": url };
      const el =
        tag === "img"
          ? h("img", { ...attrs, alt: "the result" })
          : h(tag, { ...attrs, controls: true, loop: tag === "video" });
      $("#output").append(el);
    } catch (error) {
      this.failed(error, "#job-error");
      $("#job-error").hidden = false;
    }
  }

  async cancel() {
    const id = this.current;
    if (!id) return;
    $("#cancel").disabled = true;
    try {
      const view = await api.call(jobPath(id), { method: "DELETE" });
      this.log(`cancel asked: ${view.status}`);
    } catch (error) {
      if (error instanceof api.ApiError && error.status === 409) this.log("already ended");
      else {
        $("#cancel").disabled = false;
        this.failed(error, "#job-error");
        $("#job-error").hidden = false;
      }
    }
  }

  /** Re-read this browser's recent jobs and show them. */
  async gallery() {
    const round = ++this.galleryRound;
    const jobs = remembered();
    const views = await Promise.all(jobs.map((j) => api.call(jobPath(j.id)).catch((e) => e)));
    if (round !== this.galleryRound) return; // a newer refresh is under way
    if (views.some((v) => v instanceof api.AuthError)) return this.onAuthError("");
    // Records past result_expires are gone: forget them.
    const gone = (view) => view instanceof api.ApiError && view.status === 404;
    const kept = jobs.filter((_, i) => !gone(views[i]));
    if (kept.length !== jobs.length) remember(kept);
    const tiles = views
      .filter((v) => !(v instanceof Error))
      .map((view, i) => this.tile(view, i < THUMBS));
    const none = h("p", { class: "muted" }, "No jobs yet.");
    $("#gallery").replaceChildren(...(tiles.length ? tiles : [none]));
  }

  tile(view, withThumb) {
    const r = view.result ?? {};
    const thumb = h("div", { class: "thumb" });
    const source = view.thumbnail_url ?? (view.video_url ? null : view.image_url);
    if (withThumb && source) {
      if (!this.thumbs.has(view.id)) {
        this.thumbs.set(view.id, api.objectUrl(source).catch(() => null));
      }
      this.thumbs.get(view.id).then((src) => src && thumb.append(h("img", { src, alt: "" })));
    } else {
      thumb.append(h("span", { class: "muted" }, view.type));
    }
    const tile = h(
      "article",
      { class: "tile", "data-job": view.id, title: view.id, tabindex: 0 },
      thumb,
      h("div", { class: "tile-head" }, h("strong", {}, view.type), badge(view.status)),
      h("div", { class: "muted" }, new Date(view.created_at * 1000).toLocaleString()),
      h("div", { class: "cache" }, cacheText(r.cache) ? `cache: ${cacheText(r.cache)}` : null),
      h("div", { class: "timings" }, timingsText(r.timings, ["queued_s", "run_s"])),
      view.error ? h("div", { class: "error" }, view.error.code ?? view.error.message) : null,
    );
    tile.addEventListener("click", () => this.follow(view));
    tile.addEventListener("keydown", (event) => event.key === "Enter" && this.follow(view));
    return tile;
  }
}
