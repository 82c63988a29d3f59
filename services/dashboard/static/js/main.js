// The app shell: hash routes (#/chat …) so the server only serves "/" and "/assets/…",
// pages loaded on demand, the session kept fresh, and an expired session sent to log-in.
import { get, onExpired, post, whoami } from "./api.js";
import { $, clear, h } from "./dom.js";

const PAGES = {
  login: { title: "Log in", load: () => import("./pages/auth.js"), fn: "login", public: true },
  signup: { title: "Sign up", load: () => import("./pages/auth.js"), fn: "signup", public: true },
  agent: { title: "Agent", load: () => import("./pages/agent.js"), fn: "render" },
  chat: { title: "Chat", load: () => import("./pages/chat.js"), fn: "render" },
  pairing: { title: "People", load: () => import("./pages/pairing.js"), fn: "render" },
  files: { title: "Soul & memory", load: () => import("./pages/files.js"), fn: "render" },
  keys: { title: "API keys", load: () => import("./pages/keys.js"), fn: "render" },
  account: { title: "Account", load: () => import("./pages/account.js"), fn: "render" },
  admin: { title: "Admin", load: () => import("./pages/admin.js"), fn: "render", operator: true },
};
const NAV = ["agent", "chat", "pairing", "files", "keys", "account", "admin"];
const NEXT_KEY = "zaki.next";
const REFRESH_MS = 4 * 60 * 1000; // the proxy cookie lives 15 min and is renewed by /api/me

export const app = { me: null, meta: null, cleanup: null, refresh: null };

export function go(route) {
  if (location.hash === "#/" + route) render();
  else location.hash = "#/" + route;
}

function parse() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [name, query = ""] = raw.split("?");
  return { name: name || "", params: new URLSearchParams(query) };
}

function nav(current) {
  const links = NAV.filter((n) => !PAGES[n].operator || app.me?.user.role === "operator").map((n) =>
    h("a", { href: `#/${n}`, "aria-current": n === current ? "page" : null, dataset: { nav: n } }, PAGES[n].title),
  );
  return h(
    "header.top",
    {},
    h("a.brand", { href: "#/agent" }, "Zaki"),
    app.me ? h("nav", { "aria-label": "Main" }, links) : null,
    app.me
      ? h(
          "div.who",
          {},
          h("span.user", { title: "Logged in as" }, app.me.user.username),
          h("button.link", { type: "button", id: "logout", onclick: logout }, "Log out"),
        )
      : null,
  );
}

async function logout() {
  try {
    await post("/api/auth/logout");
  } finally {
    setSession(null);
    forget();
    go("login");
  }
}

/** What this browser kept for the person (drafts, conversation titles): gone at log-out. */
export function forget() {
  sessionStorage.clear();
  for (const k of Object.keys(localStorage)) if (k.startsWith("zaki.")) localStorage.removeItem(k);
}

export function setSession(me) {
  app.me = me;
  clearInterval(app.refresh);
  if (me) app.refresh = setInterval(() => get("/api/me").catch(() => {}), REFRESH_MS);
}

/** After log-in: back to where the person was when the session expired. */
export function afterLogin(me) {
  setSession(me);
  const next = sessionStorage.getItem(NEXT_KEY);
  sessionStorage.removeItem(NEXT_KEY);
  go(next && !next.startsWith("login") && !next.startsWith("signup") ? next : "agent");
}

onExpired(() => {
  const { name } = parse();
  if (PAGES[name]?.public) return; // already there: late answers of the old page change nothing
  if (app.me) sessionStorage.setItem(NEXT_KEY, location.hash.replace(/^#\//, ""));
  setSession(null);
  go("login?expired=1");
});

async function render() {
  const { name, params } = parse();
  if (app.cleanup) {
    try {
      app.cleanup();
    } catch {
      /* a page's cleanup must never block navigation */
    }
    app.cleanup = null;
  }
  const page = PAGES[name];
  if (!page) return go(app.me ? "agent" : "login");
  if (!page.public && !app.me) {
    sessionStorage.setItem(NEXT_KEY, location.hash.replace(/^#\//, ""));
    return go("login");
  }
  if (page.public && app.me) return go("agent");
  if (page.operator && app.me.user.role !== "operator") return go("agent");
  document.title = `${page.title} · Zaki`;
  const root = $("#app");
  const view = h("main", { id: "view", tabIndex: -1 });
  clear(root).append(nav(name), view);
  view.dataset.page = name;
  try {
    const mod = await page.load();
    app.cleanup = (await mod[page.fn](view, { app, params, go })) || null;
  } catch (err) {
    view.append(h("p.notice.error", { role: "alert" }, `This page could not be shown: ${err.message}`));
  }
  view.dataset.ready = "1";
  // The first interactive page: time to interactive, read by the browser tests.
  if (!performance.getEntriesByName("zaki:interactive").length) performance.mark("zaki:interactive");
}

async function start() {
  const [me, meta] = await Promise.all([whoami(), get("/api/meta").catch(() => ({}))]);
  app.meta = meta;
  setSession(me);
  window.addEventListener("hashchange", render);
  await render();
}

start();
