// API keys for programs that call the agent (/v1/…, WebSocket): created with scopes,
// shown once, listed, revoked.
import { del, get, post } from "../api.js";
import { clear, h, notice, when } from "../dom.js";

const SCOPES = { chat: "chat (/v1/chat/completions, …)", tools: "tools (/tools/invoke)", ws: "ws (WebSocket RPC)", ui: "ui (Control UI)" };

export async function render(view) {
  const msg = notice();
  const shown = h("div.secret", { id: "new-key", hidden: true });
  const rows = h("tbody", { id: "keys-rows" });
  const boxes = Object.entries(SCOPES).map(([s, label]) =>
    h("label.check", {}, h("input", { type: "checkbox", name: "scope", value: s, checked: s === "chat" }), label),
  );
  const days = h("input", { type: "number", id: "key-days", min: 1, max: 3650, placeholder: "never", "aria-label": "Expires after days" });
  const create = h("button.primary", { type: "submit", id: "key-create" }, "Create key");
  const form = h("form.card", { id: "key-form" }, h("h1", {}, "API keys"), h("p.muted", {}, "For your own programs: send it as ", h("code", {}, "Authorization: Bearer zk_…"), " to ", h("code", {}, "/v1/chat/completions"), "."), msg, shown, h("fieldset", {}, h("legend", {}, "Scopes"), boxes), h("div.row", {}, h("label", { htmlFor: "key-days" }, "Expires after (days)"), days, create));

  async function load() {
    const { keys } = await get("/api/keys");
    clear(rows);
    if (!keys.length) rows.append(h("tr", {}, h("td.muted", { colSpan: 5 }, "No keys yet.")));
    for (const k of keys) {
      const revoke = h("button.danger", { type: "button", disabled: k.state !== "active", dataset: { revoke: k.id } }, "Revoke");
      revoke.addEventListener("click", async () => {
        if (!confirm(`Revoke key ${k.id}? Programs using it stop working at once.`)) return;
        try {
          await del(`/api/keys/${encodeURIComponent(k.id)}`);
          msg.show(`Key ${k.id} revoked.`, "info");
          await load();
        } catch (err) {
          msg.show(err.message);
        }
      });
      rows.append(h("tr", { dataset: { key: k.id, state: k.state } }, h("td", {}, h("code", {}, k.id)), h("td", {}, k.scopes.join(" ")), h("td", {}, h("span.badge", { dataset: { state: k.state } }, k.state)), h("td.muted", {}, when(k.created_at), k.expires_at ? ` → ${when(k.expires_at)}` : ""), h("td", {}, revoke)));
    }
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    msg.hide();
    const scopes = boxes.map((b) => b.firstChild).filter((c) => c.checked).map((c) => c.value);
    const body = { scopes };
    if (days.value) body.expires_days = Number(days.value);
    create.disabled = true;
    try {
      const res = await post("/api/keys", body);
      const code = h("code", { id: "new-key-value" }, res.key);
      const copy = h("button", { type: "button" }, "Copy");
      copy.addEventListener("click", () => navigator.clipboard?.writeText(res.key).then(() => (copy.textContent = "Copied")));
      clear(shown).append(h("p", {}, h("b", {}, "Your new key — copy it now, it is shown only this once:")), h("div.row", {}, code, copy));
      shown.hidden = false;
      await load();
    } catch (err) {
      msg.show(err.message);
    } finally {
      create.disabled = false;
    }
  });

  view.append(form, h("section.card", {}, h("h2", {}, "Your keys"), h("div.scroll", {}, h("table.keys", {}, h("thead", {}, h("tr", {}, ["Id", "Scopes", "State", "Created → expires", ""].map((t) => h("th", {}, t)))), rows))));
  await load();
}
