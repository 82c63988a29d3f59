// The account: change password, download / bring back the agent's data, and delete everything
// (typed confirmation, keep or erase memory).
import { ApiError, del, post } from "../api.js";
import { field, h, notice } from "../dom.js";
import { forget, setSession } from "../main.js";

export function render(view, { app, go }) {
  const me = app.me.user;
  view.append(passwordCard(), dataCard(), deleteCard(me, go));
}

function passwordCard() {
  const msg = notice();
  const cur = field("Current password", { name: "current_password", type: "password", autocomplete: "current-password" });
  const next = field("New password", { name: "new_password", type: "password", autocomplete: "new-password" });
  const form = h("form.card", { id: "password-form" }, h("h2", {}, "Change password"), msg, cur, next, h("button", { type: "submit" }, "Change password"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await post("/api/me/password", { current_password: cur.input.value, new_password: next.input.value });
      cur.input.value = next.input.value = "";
      msg.show("Password changed. Your other sessions were logged out.", "info");
    } catch (err) {
      msg.show(err.message);
    }
  });
  return form;
}

// Export: a plain download (the session cookie goes with it). Import: the file itself as the body
// (application/gzip), which api() does not send; its errors read like api()'s.
function dataCard() {
  const msg = notice();
  const file = h("input", { type: "file", id: "import-file", accept: ".tar.gz,.tgz,application/gzip" });
  const button = h("button", { type: "submit", id: "import-button", disabled: true }, "Import");
  file.addEventListener("change", () => (button.disabled = !file.files.length));
  const form = h(
    "form.card",
    { id: "data-form" },
    h("h2", {}, "Your agent's data"),
    h("p", {}, h("a", { href: "/api/agent/export", download: "", id: "export-link" }, "Download my agent's data"), " (memory, workspace, sessions; .tar.gz)."),
    h("p", {}, "Import a file you downloaded: it replaces your agent's memory, workspace and sessions. A running agent restarts."),
    msg,
    h("label", { htmlFor: "import-file" }, "Export file"),
    file,
    button,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!file.files.length || !window.confirm("Replace your agent's data with this file?")) return;
    button.disabled = true;
    try {
      const res = await fetch("/api/agent/import", {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json", "Content-Type": "application/gzip" },
        body: file.files[0],
      });
      const data = await res.json().catch(() => null);
      if (!res.ok) throw new ApiError(res.status, data);
      msg.show(`Imported ${data.files} files${data.restarted ? "; your agent restarted" : ""}.`, "info");
      file.value = "";
    } catch (err) {
      msg.show(err instanceof ApiError ? `${err.message} (${err.code})` : "The server cannot be reached. Try again.");
    } finally {
      button.disabled = !file.files.length;
    }
  });
  return form;
}

function deleteCard(me, go) {
  const msg = notice();
  const confirmName = field(`Type your username (${me.username}) to confirm`, { name: "confirm", autocomplete: "off", spellcheck: false });
  const pw = field("Password", { name: "password", type: "password", autocomplete: "current-password" });
  const keep = h("input", { type: "radio", name: "memory", value: "keep", id: "memory-keep", checked: true });
  const erase = h("input", { type: "radio", name: "memory", value: "erase", id: "memory-erase" });
  const button = h("button.danger", { type: "submit", id: "delete-account", disabled: true }, "Delete my account");
  confirmName.input.addEventListener("input", () => (button.disabled = confirmName.input.value.trim().toLowerCase() !== me.username.toLowerCase()));
  const form = h(
    "form.card.danger-zone",
    { id: "delete-form" },
    h("h2", {}, "Delete account"),
    h("p", {}, "This stops and removes your agent, revokes every API key and logs you out everywhere. It cannot be undone."),
    msg,
    h("fieldset", {}, h("legend", {}, "Your agent's memory (SOUL.md, MEMORY.md, its workspace)"),
      h("label.check", { htmlFor: "memory-keep" }, keep, "Keep it on the server (an operator can restore it)"),
      h("label.check", { htmlFor: "memory-erase" }, erase, "Erase it for good")),
    confirmName,
    pw,
    button,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    try {
      await del("/api/me", { password: pw.input.value, confirm: confirmName.input.value.trim(), purge: erase.checked });
      setSession(null);
      forget();
      go("login?deleted=1");
    } catch (err) {
      msg.show(err.message);
      button.disabled = false;
    }
  });
  return form;
}
