// SOUL.md (who the agent is) and MEMORY.md (what it remembers), edited as plain text with
// the API's size limit shown as you type and an etag so two editors never overwrite each other.
import { get, put } from "../api.js";
import { h, notice, when } from "../dom.js";

const LIMIT = 64 * 1024; // bytes of UTF-8, the API's limit (413 file_too_large above it)
const FILES = {
  "SOUL.md": "Who your agent is: its character, tone and rules. It reads this at the start of every conversation.",
  "MEMORY.md": "What your agent remembers about you and your world. It adds to it by itself; you can correct it here.",
};

export async function render(view, { params }) {
  const name = params.get("f") in FILES ? params.get("f") : "SOUL.md";
  const tabs = h(
    "nav.tabs",
    { "aria-label": "Files" },
    Object.keys(FILES).map((f) => h("a", { href: `#/files?f=${f}`, "aria-current": f === name ? "page" : null }, f)),
  );
  const msg = notice();
  const area = h("textarea.editor", { id: "file-content", spellcheck: false, "aria-label": name, rows: 18 });
  const size = h("span.muted", { id: "file-size" });
  const save = h("button.primary", { type: "submit", id: "file-save" }, "Save");
  const updated = h("span.muted");
  const enc = new TextEncoder();
  let etag = null;

  const count = () => {
    const n = enc.encode(area.value).length;
    size.textContent = `${n.toLocaleString("en-US")} / ${LIMIT.toLocaleString("en-US")} bytes`;
    size.classList.toggle("over", n > LIMIT);
    save.disabled = n > LIMIT;
    return n;
  };
  area.addEventListener("input", count);

  const form = h("form.card", { id: "file-form" }, h("h1", {}, name), h("p.muted", {}, FILES[name]), msg, area, h("div.row.spread", {}, h("div", {}, size, " · ", updated), save));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (count() > LIMIT) return msg.show(`${name} is over the ${LIMIT / 1024} KiB limit.`);
    save.disabled = true;
    try {
      const res = await put(`/api/agent/files/${name}`, { content: area.value, etag });
      etag = res.etag;
      updated.textContent = `saved ${when(res.updated_at)}`;
      msg.show(`${name} saved. Your agent uses it from its next message.`, "info");
    } catch (err) {
      msg.show(err.code === "edit_conflict" ? `${name} was changed elsewhere since you opened it. Copy your text, reload, and apply it again.` : err.message);
    } finally {
      count();
    }
  });
  view.append(tabs, form);
  try {
    const f = await get(`/api/agent/files/${name}`);
    area.value = f.content;
    etag = f.etag;
    updated.textContent = f.updated_at ? `last saved ${when(f.updated_at)}` : "not written yet";
  } catch (err) {
    msg.show(err.code === "not_found" ? "Get an agent first: its files live with it." : err.message);
    area.disabled = save.disabled = true;
  }
  count();
  view.dataset.loaded = "1";
}
