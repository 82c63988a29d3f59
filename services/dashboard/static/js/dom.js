// DOM helpers. Every piece of text reaches the page through textContent or a text node:
// nothing here parses HTML, so user input (names, chat, SOUL.md) can never become markup.

/** h("button.primary", {onclick, type: "submit"}, "Save") → element. */
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.includes("-") || k === "role" || k === "class" || !(k in el)) el.setAttribute(k, v === true ? "" : String(v));
    else el[k] = v;
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function $(sel, root = document) {
  return root.querySelector(sel);
}

/** A message box that a form shows its error (or success) in. */
export function notice(kind = "error") {
  const el = h(`p.notice.${kind}`, { role: kind === "error" ? "alert" : "status", hidden: true });
  el.show = (text, k = kind) => {
    el.className = `notice ${k}`;
    el.textContent = text;
    el.hidden = !text;
  };
  el.hide = () => el.show("");
  return el;
}

/** A labelled input; returns the wrapper, with .input on it. */
export function field(label, attrs = {}, hint = null) {
  const id = attrs.id || `f-${attrs.name}`;
  const input = attrs.tag === "textarea" ? h("textarea", { ...attrs, tag: undefined, id }) : h("input", { ...attrs, id });
  const wrap = h("div.field", {}, h("label", { htmlFor: id }, label), input, hint ? h("small.hint", {}, hint) : null);
  wrap.input = input;
  return wrap;
}

export function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
}

export function seconds(s) {
  if (s === null || s === undefined) return "";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export function number(n) {
  return n === null || n === undefined ? "unlimited" : Number(n).toLocaleString("en-US");
}
