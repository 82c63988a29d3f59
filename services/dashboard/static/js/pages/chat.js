// Web chat with the agent: POST /api/chat/completions on the dashboard's own origin (session
// cookie; the dashboard relays it through the gateway proxy), streamed SSE rendered as safe markdown, history from the gateway, abort.
// The draft lives in sessionStorage until the agent accepts it, so an expired session
// (log-in, then back here) loses nothing.
import { get, post } from "../api.js";
import { clear, h, notice, when } from "../dom.js";
import { render as markdown } from "../md.js";
import { readSSE } from "../sse.js";

const DRAFT = "zaki.chat.draft";
const CURRENT = "zaki.chat.current";
const WEB_PREFIX = "web:";

const newId = () => crypto.randomUUID().replace(/-/g, "").slice(0, 16);
const sessionKeyOf = (conv) => `agent:main:openai-user:${WEB_PREFIX}${conv}`;
function convOf(key) {
  const i = key.indexOf(`openai-user:${WEB_PREFIX}`);
  return i < 0 ? null : key.slice(i + `openai-user:${WEB_PREFIX}`.length);
}

export async function render(view, { app }) {
  let conv = sessionStorage.getItem(CURRENT) || newId();
  let controller = null;
  const msg = notice();
  const log = h("div.chat-log", { id: "chat-log", "aria-live": "polite" });
  const list = h("ul.convs", { id: "conversations" });
  const input = h("textarea", { id: "chat-input", rows: 2, placeholder: "Message your agent…", title: "Enter sends, Shift+Enter starts a new line", "aria-label": "Message" });
  const send = h("button.primary", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", hidden: true }, "Stop");
  const fresh = h("button", { type: "button", id: "chat-new" }, "New conversation");
  const form = h("form.composer", { id: "chat-form" }, input, h("div.row", {}, send, stop));

  input.value = sessionStorage.getItem(DRAFT) || "";
  input.addEventListener("input", () => sessionStorage.setItem(DRAFT, input.value));
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });

  function bubble(role, text, at) {
    const body = h("div.body");
    const b = h(`div.msg.${role}`, { dataset: { role } }, body, at ? h("small.muted", {}, when(at)) : null);
    b.setText = (t) => {
      b.text = t;
      clear(body).append(markdown(t));
    };
    b.setText(text);
    log.append(b);
    log.scrollTop = log.scrollHeight;
    return b;
  }

  async function loadHistory() {
    clear(log);
    try {
      const { messages } = await get(`/api/agent/chat/history?session=${encodeURIComponent(sessionKeyOf(conv))}&limit=50`);
      messages.forEach((m) => bubble(m.role === "user" ? "user" : "assistant", m.text, m.at));
    } catch (err) {
      if (err.code === "agent_not_running") msg.show(`Your agent is ${err.body?.error?.state || "not running"}: start it on the Agent page.`, "info");
    }
    if (!log.children.length) log.append(h("p.empty.muted", {}, "Say hello — answers stream in as the agent writes them."));
  }

  // Conversations started in this browser (titles = first words), merged with the gateway's list.
  const localKey = `zaki.convs.${app.me.user.id}`;
  const local = () => JSON.parse(localStorage.getItem(localKey) || "[]");
  function remember(id, text) {
    const all = local();
    const title = all.find((c) => c.id === id)?.title || text.replace(/\s+/g, " ").slice(0, 60);
    const rest = all.filter((c) => c.id !== id);
    localStorage.setItem(localKey, JSON.stringify([{ id, title, at: new Date().toISOString() }, ...rest].slice(0, 50)));
  }

  async function loadSessions() {
    const convs = new Map(local().map((c) => [c.id, c]));
    try {
      const { sessions } = await get("/api/agent/chat/sessions");
      for (const s of sessions) {
        const id = convOf(s.key);
        if (id) convs.set(id, { id, title: s.title || convs.get(id)?.title, at: s.updated_at || convs.get(id)?.at });
      }
    } catch {
      /* the gateway's list is a convenience: this browser's own list still shows */
    }
    clear(list);
    for (const c of [...convs.values()].sort((a, b) => String(b.at).localeCompare(String(a.at)))) {
      const a = h("a", { href: "#/chat", dataset: { conv: c.id }, "aria-current": c.id === conv ? "true" : "false" }, c.title || `Conversation ${when(c.at)}`);
      a.addEventListener("click", (ev) => {
        ev.preventDefault();
        switchTo(c.id);
      });
      list.append(h("li", {}, a));
    }
  }

  function switchTo(id) {
    if (controller) controller.abort();
    conv = id;
    sessionStorage.setItem(CURRENT, conv);
    msg.hide();
    loadHistory();
    list.querySelectorAll("a").forEach((a) => a.setAttribute("aria-current", a.dataset.conv === conv ? "true" : "false"));
  }

  fresh.addEventListener("click", () => {
    switchTo(newId());
    input.focus();
  });

  async function complete(text, signal) {
    const body = JSON.stringify({ model: "openclaw", stream: true, user: WEB_PREFIX + conv, messages: [{ role: "user", content: text }] });
    const call = () => fetch("/api/chat/completions", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json", Accept: "text/event-stream" }, body, signal });
    let res = await call();
    if (res.status === 401) {
      await get("/api/me"); // renews the proxy cookie, or sends an expired session to log-in
      res = await call();
    }
    return res;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    msg.hide();
    log.querySelector(".empty")?.remove();
    sessionStorage.setItem(CURRENT, conv);
    remember(conv, text);
    bubble("user", text);
    const answer = bubble("assistant", "");
    answer.classList.add("streaming");
    controller = new AbortController();
    send.hidden = true;
    stop.hidden = false;
    const t0 = performance.now();
    let got = "";
    try {
      const res = await complete(text, controller.signal);
      if (!res.ok) {
        const err = await res.json().catch(() => ({}));
        const state = err.state || err.error?.state;
        throw new Error(state ? `Your agent is ${state}. Start it on the Agent page.` : err.error?.message || `The agent did not answer (${res.status}).`);
      }
      input.value = "";
      sessionStorage.removeItem(DRAFT);
      let pending = false;
      for await (const data of readSSE(res.body)) {
        if (data === "[DONE]") break;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "the agent stopped with an error");
        const piece = obj.choices?.[0]?.delta?.content;
        if (!piece) continue;
        if (!got) answer.dataset.firstTokenMs = String(Math.round(performance.now() - t0));
        got += piece;
        if (!pending) {
          pending = true; // re-render at most once a frame
          requestAnimationFrame(() => {
            pending = false;
            answer.setText(got);
            log.scrollTop = log.scrollHeight;
          });
        }
      }
      answer.setText(got);
      answer.dataset.done = "1";
    } catch (err) {
      if (err.name === "AbortError") {
        answer.setText(got);
        answer.append(h("small.muted.stopped", {}, "stopped"));
        post("/api/agent/chat/abort", { session: sessionKeyOf(conv) }).catch(() => {});
      } else {
        if (!got) answer.remove();
        msg.show(err.message);
      }
    } finally {
      answer.classList.remove("streaming");
      answer.dataset.totalMs = String(Math.round(performance.now() - t0));
      controller = null;
      send.hidden = false;
      stop.hidden = true;
      input.focus();
      loadSessions();
    }
  });
  stop.addEventListener("click", () => controller?.abort());

  view.append(
    h(
      "div.chat",
      {},
      h("aside.card.side", {}, fresh, h("h2", {}, "Conversations"), list),
      h("section.card.main", {}, h("h1.sr-only", {}, "Chat"), msg, log, form),
    ),
  );
  await Promise.all([loadHistory(), loadSessions()]);
  input.focus();
  return () => controller?.abort();
}
