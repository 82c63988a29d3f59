// The account: change password, and delete everything (typed confirmation, keep or erase memory).
import { del, post } from "../api.js";
import { field, h, notice } from "../dom.js";
import { forget, setSession } from "../main.js";

export function render(view, { app, go }) {
  const me = app.me.user;
  view.append(passwordCard(), deleteCard(me, go));
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
