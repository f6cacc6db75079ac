// The new-job form, built from the API's own OpenAPI schema (JobCreate and TrainArgs), so every argument the
// server accepts is here with its default, bounds and description. Validation is the server's: a 422's
// errors are shown next to the fields they name.

import {CREATE} from "./access.js";
import {ApiError, api, fieldErrors} from "./api.js";
import {fill, h, toast} from "./dom.js";

const SECTIONS = [
  {title: "Job", fields: ["name", "project", "model", "dataset", "task", "pool"]},
  {title: "Training", fields: ["train.epochs", "train.imgsz", "train.batch", "train.device", "train.workers",
    "train.seed", "train.optimizer", "train.lr0", "train.patience"]},
  {title: "Advanced", collapsed: true, fields: null},  // every other argument the schema has
];
const SKIP = new Set(["start"]);
const PLACEHOLDERS = {"train.device": "runner's choice", dataset: "/path/to/data.yaml or s3://bucket/prefix"};
const MODELS = ["yolov8n.yaml", "yolo11n.yaml", "yolov8s.yaml", "yolov8n-cls.yaml", "yolov8n-seg.yaml",
  "yolov8n-pose.yaml", "yolov8n.pt", "yolo11n.pt"];
const LABELS = {imgsz: "image size", lr0: "initial LR", lrf: "final LR factor", nbs: "nominal batch",
  timeout_s: "timeout (s)", max_attempts: "max attempts", retry_on: "retry on", retry_backoff_s: "retry backoff (s)",
  dataset_snapshot: "dataset snapshot (pin)", hsv_h: "HSV hue", hsv_s: "HSV saturation",
  hsv_v: "HSV value", cos_lr: "cosine LR schedule", single_cls: "single class", save_period: "save period",
  close_mosaic: "close mosaic", warmup_epochs: "warm-up epochs", weight_decay: "weight decay", pool: "runner pool",
  fliplr: "flip left-right", flipud: "flip up-down", amp: "AMP (mixed precision)", val: "validate",
  rect: "rectangular batches", mixup: "MixUp"};

/** Flatten the schema into field descriptors keyed by path ("model", "train.epochs"). */
export function describeFields(openapi) {
  const schemas = openapi.components.schemas;
  const deref = (p) => (p.$ref ? {...schemas[p.$ref.split("/").pop()], ...p, $ref: undefined} : p);
  const fields = new Map();
  const walk = (schema, prefix) => {
    const required = new Set(schema.required || []);
    for (const [name, raw] of Object.entries(schema.properties)) {
      if (!prefix && SKIP.has(name)) continue;
      let p = deref(raw);
      const path = prefix ? `${prefix}.${name}` : name;
      if (p.properties) { walk(p, path); continue; }
      let nullable = false;
      if (p.anyOf) {
        nullable = p.anyOf.some((a) => a.type === "null");
        p = {...deref(p.anyOf.find((a) => a.type !== "null")), ...p, anyOf: undefined};
      }
      const items = p.type === "array" && p.items ? deref(p.items) : null;  // a list of choices: several of an enum
      fields.set(path, {path, name, label: LABELS[name] || name.replace(/_/g, " "), description: p.description,
        type: items?.enum ? "choices" : p.enum ? "enum" : p.type, options: items?.enum || p.enum, default: p.default,
        required: required.has(name),
        nullable, min: p.minimum ?? p.exclusiveMinimum, max: p.maximum ?? p.exclusiveMaximum, pattern: p.pattern});
    }
  };
  walk(deref(schemas.JobCreate), "");
  return fields;
}

function getPath(obj, path) {
  return path.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);
}

function setPath(obj, path, value) {
  const keys = path.split(".");
  const last = keys.pop();
  let o = obj;
  for (const k of keys) o = o[k] ??= {};
  o[last] = value;
}

function control(f, value) {
  const id = `f-${f.path.replace(/\W/g, "-")}`;
  const common = {id, name: f.path, "aria-describedby": `${id}-err`};
  if (f.type === "boolean") return h("input", {...common, type: "checkbox", checked: Boolean(value)});
  if (f.type === "enum") {
    return h("select", common, f.options.map((o, i) =>
      h("option", {value: String(i), selected: o === value}, o === false ? "off" : String(o))));
  }
  if (f.type === "choices") {
    const chosen = new Set(value || []);
    return h("select", {...common, multiple: true, size: String(Math.min(f.options.length, 4))},
      f.options.map((o, i) => h("option", {value: String(i), selected: chosen.has(o)}, String(o).replace(/_/g, " "))));
  }
  if (f.type === "integer" || f.type === "number") {
    return h("input", {...common, type: "number", step: f.type === "integer" ? "1" : "any", min: f.min, max: f.max,
      value: value ?? "", placeholder: f.nullable ? "auto" : ""});
  }
  const attrs = {...common, type: "text", value: value ?? "", autocomplete: "off", spellcheck: "false",
    placeholder: PLACEHOLDERS[f.path] || ""};
  if (f.path === "model") attrs.list = "model-suggestions";
  return h("input", attrs);
}

/** Read one control: undefined means "leave it to the server's default". */
function read(f, el) {
  if (f.type === "boolean") return el.checked;
  if (f.type === "enum") return f.options[Number(el.value)];
  if (f.type === "choices") return [...el.selectedOptions].map((o) => f.options[Number(o.value)]);
  if (el.validity?.badInput) return null;  // not a number: let the server say so next to the field
  const raw = el.value.trim();
  if (raw === "") return f.nullable || !f.required ? undefined : "";
  if (f.type === "integer" || f.type === "number") return Number(raw);
  return raw;
}

/** The project field offers only the projects where this user may create jobs. */
function projectChoices(fields, projects) {
  const f = fields.get("project");
  if (f) fields.set("project", {...f, type: "enum", options: projects});
}

/** What a user who may create jobs nowhere sees instead of a form that would be refused. */
function cannotCreate(access) {
  const projects = access.projects();
  return h("div", {class: "card cannot"}, h("h2", {}, "You cannot create jobs"),
    h("p", {}, projects.length
      ? `Your role is ${projects.map((p) => `${access.role(p)} in ${p}`).join(", ")}: creating jobs needs `
        + `${access.need(CREATE)} or admin.`
      : "You are not a member of any project yet."),
    h("p", {class: "muted"}, "A project admin or the instance owner can change your role."),
    h("a", {href: "#/jobs"}, "Back to jobs"));
}

export function formView(root, {params, navigate, openapi, access, showProject}) {
  const fields = describeFields(openapi);
  const form = h("form", {class: "job-form", novalidate: true});
  const formError = h("div", {class: "form-error", role: "alert", hidden: true});
  const start = h("input", {type: "checkbox", id: "f-start", name: "start", checked: true});
  const submit = h("button", {class: "btn btn-primary", type: "submit"}, "Create and start");
  start.addEventListener("change", () => { submit.textContent = start.checked ? "Create and start" : "Create"; });
  const controls = new Map();

  function build(initial) {
    const placed = new Set(SECTIONS.flatMap((s) => s.fields || []));
    const sections = SECTIONS.map((s) => {
      const paths = s.fields || [...fields.keys()].filter((p) => !placed.has(p));
      const grid = h("div", {class: "grid"}, paths.filter((p) => fields.has(p)).map((p) => {
        const f = fields.get(p);
        const value = getPath(initial, p) ?? f.default;
        const el = control(f, value);
        controls.set(p, el);
        const label = h("label", {for: el.id}, f.label, f.required ? h("span", {class: "req"}, " *") : null);
        return h("div", {class: `field field-${f.type}`, dataset: {field: p}},
          f.type === "boolean" ? h("div", {class: "check"}, el, label) : [label, el],
          h("div", {class: "hint"}, f.description || ""),
          h("div", {class: "field-error", id: `${el.id}-err`, "aria-live": "polite"}));
      }));
      return s.collapsed ? h("details", {class: "section"}, h("summary", {}, s.title), grid)
        : h("fieldset", {class: "section"}, h("legend", {}, s.title), grid);
    });
    const models = h("datalist", {id: "model-suggestions"}, MODELS.map((m) => h("option", {value: m})));
    fill(form, formError, sections, models,
      h("div", {class: "form-actions"}, h("label", {class: "check"}, start, " Start right away"), submit));
    const project = controls.get("project");
    if (project) {
      const show = () => showProject(read(fields.get("project"), project));
      project.addEventListener("change", show);
      show();
    }
  }

  function body() {
    const out = {start: start.checked};
    for (const [path, el] of controls) {
      const f = fields.get(path);
      const v = read(f, el);
      if (v === undefined || (v === f.default && !f.required)) continue;
      setPath(out, path, v);
    }
    return out;
  }

  function showErrors(errors) {
    for (const el of form.querySelectorAll(".field")) {
      const msg = errors[el.dataset.field];
      el.classList.toggle("invalid", Boolean(msg));
      el.querySelector(".field-error").textContent = msg || "";
      controls.get(el.dataset.field)?.setAttribute("aria-invalid", msg ? "true" : "false");
    }
    // Errors that name no field of the form (or only a parent of one) go on top.
    const loose = Object.entries(errors).filter(([k]) => !fields.has(k)).map(([k, m]) => (k ? `${k}: ${m}` : m));
    formError.hidden = loose.length === 0;
    fill(formError, loose.map((m) => h("div", {}, m)));
    const first = form.querySelector(".field.invalid");
    if (first) {
      first.closest("details")?.setAttribute("open", "");
      controls.get(first.dataset.field).focus();
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const job = await api.create(body());
      showErrors({});
      // What was done, not a status: the job page shows the status, which may have moved on already.
      toast(`Job ${job.name || job.id} ${job.status === "created" ? "created" : "created and started"}`);
      navigate(`#/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 422) showErrors(normalise(fieldErrors(err.detail)));
      else showErrors({"": err.message});
    } finally {
      submit.disabled = false;
    }
  });

  // A loc can go deeper than the field (a union member, a list index): attach it to the longest known prefix.
  function normalise(errors) {
    const out = {};
    for (const [loc, msg] of Object.entries(errors)) {
      let key = loc;
      while (key && !fields.has(key)) key = key.includes(".") ? key.slice(0, key.lastIndexOf(".")) : "";
      const target = key || loc;
      out[target] = out[target] ? `${out[target]}; ${msg}` : msg;
    }
    return out;
  }

  const page = h("div", {class: "form-page"}, h("header", {class: "page-head"}, h("h1", {}, "New job")),
    h("div", {class: "card"}, form));
  let closed = false;
  fill(root, h("p", {class: "muted"}, "Loading…"));
  (async () => {
    // Roles change: ask again rather than trust what was true at sign-in.
    const from = params.get("from");
    const [projects, job] = await Promise.all([api.projects().catch(() => null),
      from ? api.job(from).catch((err) => { toast(err.message, "error"); return null; }) : null]);
    if (closed) return;
    if (projects) access.update(projects);
    const writable = access.allowing(CREATE);
    if (!writable.length) {
      fill(root, cannotCreate(access));
      return;
    }
    projectChoices(fields, writable);
    fill(root, page);
    build(job ? {...job.spec, name: job.spec.name ? `${job.spec.name} (copy)` : ""} : {});
  })();
  return () => { closed = true; };
}
