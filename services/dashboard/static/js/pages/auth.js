// Sign-up and log-in. Errors come from the API with a field name: the message is put
// next to that field, and nothing else on the page changes.
import { post } from "../api.js";
import { field, h, notice } from "../dom.js";
import { afterLogin } from "../main.js";

function form(title, intro, fields, submitLabel, onSubmit, footer) {
  const msg = notice();
  const button = h("button.primary", { type: "submit" }, submitLabel);
  const f = h("form.card.narrow", { novalidate: true }, h("h1", {}, title), intro, msg, ...fields, button, footer);
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    msg.hide();
    fields.forEach((w) => w.classList.remove("invalid"));
    button.disabled = true;
    try {
      await onSubmit();
    } catch (err) {
      msg.show(err.message);
      const bad = fields.find((w) => w.input.name === err.field);
      if (bad) {
        bad.classList.add("invalid");
        bad.input.focus();
      }
    } finally {
      button.disabled = false;
    }
  });
  return f;
}

export function login(view, { params }) {
  const who = field("Username or e-mail", { name: "login", autocomplete: "username", required: true });
  const pw = field("Password", { name: "password", type: "password", autocomplete: "current-password", required: true });
  const intro = params.get("expired")
    ? h("p.notice.info", { role: "status" }, "Your session has ended. Log in again to continue where you were.")
    : params.get("deleted")
      ? h("p.notice.info", { role: "status" }, "Your account was deleted. Goodbye!")
      : h("p.muted", {}, "Your own AI agent, on Telegram and on the web.");
  const f = form(
    "Log in",
    intro,
    [who, pw],
    "Log in",
    async () => {
      const res = await post("/api/auth/login", { login: who.input.value.trim(), password: pw.input.value });
      afterLogin({ user: res.user, session: res.session, links: res.links });
    },
    h("p.muted", {}, "No account yet? ", h("a", { href: "#/signup" }, "Sign up")),
  );
  view.append(f);
  who.input.focus();
}

export function signup(view, { app }) {
  const min = app.meta?.password_min_length || 10;
  const name = field("Username", { name: "username", autocomplete: "username", required: true }, "3–32 letters, digits, - or _");
  const email = field("E-mail (optional)", { name: "email", type: "email", autocomplete: "email" });
  const pw = field(
    "Password",
    { name: "password", type: "password", autocomplete: "new-password", required: true, minLength: min },
    `At least ${min} characters; not your username, not a common password.`,
  );
  if (app.meta && app.meta.signup_open === false) {
    view.append(h("div.card.narrow", {}, h("h1", {}, "Sign up"), h("p.notice.info", {}, "Sign-up is closed on this server. Ask its operator for an account.")));
    return;
  }
  const f = form(
    "Create your account",
    h("p.muted", {}, "Then paste a Telegram bot token and your agent starts in seconds."),
    [name, email, pw],
    "Sign up",
    async () => {
      const body = { username: name.input.value.trim(), password: pw.input.value };
      if (email.input.value.trim()) body.email = email.input.value.trim();
      const res = await post("/api/auth/signup", body);
      afterLogin({ user: res.user, session: res.session, links: res.links });
    },
    h("p.muted", {}, "Already have an account? ", h("a", { href: "#/login" }, "Log in")),
  );
  view.append(f);
  name.input.focus();
}
