// "Get an agent" (paste a bot token) and, once there is one, "run it": live state from the
// API's event stream with elapsed time, health, start/stop/restart, model, usage against budget.
import { get, patch, post } from "../api.js";
import { clear, field, h, notice, number, seconds, when } from "../dom.js";

const BUSY = new Set(["requested", "provisioning", "starting", "stopping", "deleting"]);
const STEPS = ["requested", "provisioning", "starting", "running"];
// Which command the API accepts from which state (services/dashboard/agents.py COMMAND_FROM);
// the API refuses the rest with 409 illegal_state, this only greys the buttons out.
const COMMAND_FROM = {
  start: ["stopped", "failed", "crashlooping", "suspended"],
  stop: ["starting", "running", "failed", "crashlooping", "suspended"],
  restart: ["starting", "running", "failed", "crashlooping"],
};

export async function render(view, { app }) {
  const { agent } = await get("/api/agent");
  if (!agent) return getAgent(view, app);
  return status(view, app, agent);
}

function getAgent(view, app) {
  const meta = app.meta || {};
  const msg = notice();
  const token = field(
    "Telegram bot token",
    { name: "bot_token", autocomplete: "off", spellcheck: false, required: true, placeholder: "123456789:AA…" },
    "From @BotFather: /newbot, then copy the token it gives you. It goes to your agent only and is never shown again.",
  );
  const models = meta.models || [];
  const model = h(
    "select",
    { name: "model", id: "f-model" },
    models.map((m) => h("option", { value: m, selected: m === meta.default_model }, m)),
  );
  const allow = field(
    "Telegram user ids allowed to talk to the bot (optional)",
    { name: "telegram_allow_from", inputMode: "numeric", placeholder: "123456789, 987654321" },
    "Others can still ask: their requests appear under People for you to approve.",
  );
  const button = h("button.primary", { type: "submit" }, "Start my agent");
  const form = h(
    "form.card",
    { novalidate: true, id: "get-agent" },
    h("h1", {}, "Get your agent"),
    h("p.muted", {}, "Your agent is a private OpenClaw gateway that answers on Telegram and here on the web."),
    msg,
    token,
    models.length ? h("div.field", {}, h("label", { htmlFor: "f-model" }, "Model"), model) : null,
    allow,
    button,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    msg.hide();
    const body = { bot_token: token.input.value.trim() };
    if (models.length) body.model = model.value;
    const ids = allow.input.value.split(/[\s,]+/).filter(Boolean);
    if (ids.length) body.telegram_allow_from = ids;
    button.disabled = true;
    const submitted = performance.now();
    try {
      await post("/api/agent", body);
      view.dataset.submittedAt = String(submitted);
      const { agent } = await get("/api/agent");
      clear(view);
      app.cleanup = status(view, app, agent || { state: "requested", history: [] });
    } catch (err) {
      msg.show(err.message);
      button.disabled = false;
    }
  });
  view.append(form);
  token.input.focus();
}

function status(view, app, agent) {
  const msg = notice();
  const badge = h("span.badge", { id: "agent-state" });
  const health = h("span.badge.health", { id: "agent-health" });
  const elapsed = h("span.elapsed", { id: "elapsed" });
  const steps = h("ol.steps", { id: "steps" }, STEPS.map((s) => h("li", { dataset: { step: s } }, s)));
  const timeline = h("ul.timeline", { id: "timeline" });
  const botLink = h("p.botlink", { id: "bot-link-row", hidden: true });
  const error = h("p.notice.error", { id: "agent-error", role: "alert", hidden: true });
  const buttons = {
    start: h("button", { type: "button", id: "agent-start" }, "Start"),
    stop: h("button", { type: "button", id: "agent-stop" }, "Stop"),
    restart: h("button", { type: "button", id: "agent-restart" }, "Restart"),
  };
  const usage = h("div.usage", { id: "usage" });
  let cur = agent;
  let tick = null;
  let base = null; // [elapsed_s at t0, t0]

  function paint() {
    badge.textContent = cur.state;
    badge.dataset.state = cur.state;
    health.textContent = cur.health || "unknown";
    health.dataset.health = cur.health || "unknown";
    health.hidden = cur.state !== "running"; // a stopped agent has no health to speak of
    const idx = STEPS.indexOf(cur.state);
    steps.querySelectorAll("li").forEach((li, i) => {
      const last = idx === STEPS.length - 1; // running: every step is done
      li.classList.toggle("done", idx >= 0 && (i < idx || last));
      li.classList.toggle("current", i === idx && !last);
    });
    for (const [name, b] of Object.entries(buttons)) b.disabled = !COMMAND_FROM[name].includes(cur.state);
    if (cur.state === "running" && cur.bot_username) {
      const link = h("a", { id: "bot-link", href: cur.bot_link || `https://t.me/${cur.bot_username}`, target: "_blank", rel: "noopener noreferrer" }, `t.me/${cur.bot_username}`);
      clear(botLink).append("Your bot is live: ", link, " — open it in Telegram and say hello.");
      botLink.hidden = false;
    } else botLink.hidden = true;
    error.hidden = !cur.error;
    if (cur.error) error.textContent = `${cur.error.reason}: ${cur.error.message || ""}`;
  }

  function clock(elapsedS) {
    base = [Number(elapsedS) || 0, performance.now()];
    clearInterval(tick);
    const show = () => (elapsed.textContent = seconds(base[0] + (performance.now() - base[1]) / 1000));
    show();
    if (BUSY.has(cur.state)) tick = setInterval(show, 100);
    else elapsed.textContent = seconds(base[0]);
  }

  const seen = new Set();
  function addStep(ev) {
    // The stream replays the history and may repeat a step live ("ready" after "running"): one row each.
    const key = `${ev.state}|${Number(ev.elapsed_s ?? -1).toFixed(1)}`;
    if (seen.has(key)) return;
    seen.add(key);
    const at = ev.at ? new Date(ev.at).toLocaleTimeString() : new Date().toLocaleTimeString();
    timeline.append(h("li", { dataset: { state: ev.state } }, h("span.muted", {}, at), " ", h("b", {}, ev.state), ev.elapsed_s ? h("span.muted", {}, ` +${seconds(ev.elapsed_s)}`) : null));
    while (timeline.children.length > 8) timeline.firstChild.remove();
  }

  const events = new EventSource("/api/agent/events");
  events.addEventListener("open", () => {
    seen.clear();
    clear(timeline);
  });
  const onState = (e) => {
    const ev = JSON.parse(e.data);
    cur = { ...cur, state: ev.state, error: ev.reason ? { reason: ev.reason, message: ev.message } : cur.state === ev.state ? cur.error : null };
    if (ev.bot_username) Object.assign(cur, { bot_username: ev.bot_username, bot_link: ev.bot_link });
    addStep(ev);
    paint();
    if (ev.elapsed_s !== undefined) clock(ev.elapsed_s);
    else if (!BUSY.has(ev.state)) clearInterval(tick);
    if (ev.state === "running") loadUsage();
  };
  events.addEventListener("state", onState);
  events.addEventListener("ready", onState);
  events.addEventListener("failed", onState);
  events.addEventListener("health", (e) => {
    cur = { ...cur, health: JSON.parse(e.data).health };
    paint();
  });
  // The stream cannot say "401": ask the API, which sends an expired session to log-in.
  events.addEventListener("error", () => get("/api/me").catch(() => {}));

  async function act(name) {
    msg.hide();
    Object.values(buttons).forEach((b) => (b.disabled = true));
    try {
      await post(`/api/agent/${name}`);
      msg.show(`${name[0].toUpperCase() + name.slice(1)} requested.`, "info");
    } catch (err) {
      msg.show(err.message);
      paint();
    }
  }
  for (const [name, b] of Object.entries(buttons)) b.addEventListener("click", () => act(name));

  async function loadUsage() {
    try {
      const u = await get("/api/agent/usage");
      const b = u.budget || {};
      clear(usage).append(
        meterRow("Tokens today", u.today?.tokens || 0, b.tokens_per_day, "usage-day"),
        meterRow("Tokens this month", u.month?.tokens || 0, b.tokens_per_month, "usage-month"),
        h("p.muted", {}, `Requests today: ${number(u.today?.requests || 0)} · limit ${number(b.requests_per_minute)} per minute`),
      );
    } catch (err) {
      clear(usage).append(h("p.muted", {}, `Usage is not available: ${err.message}`));
    }
  }

  const meta = app.meta || {};
  const modelSel = h("select", { id: "agent-model", "aria-label": "Model" }, (meta.models || []).map((m) => h("option", { value: m, selected: m === agent.model }, m)));
  const modelMsg = notice();
  modelSel.addEventListener("change", async () => {
    try {
      await patch("/api/agent", { model: modelSel.value });
      modelMsg.show(`Model set to ${modelSel.value}; the agent restarts.`, "info");
    } catch (err) {
      modelMsg.show(err.message);
    }
  });

  view.append(
    h(
      "section.card",
      {},
      h("div.row.spread", {}, h("h1", {}, "Your agent"), h("div.badges", {}, badge, health)),
      steps,
      h("p.muted", {}, "Elapsed: ", elapsed),
      botLink,
      error,
      msg,
      h("div.row.actions", {}, buttons.start, buttons.stop, buttons.restart,
        h("a.button", { href: (app.me?.links?.control_ui) || "/ui/", target: "_blank", rel: "noopener", id: "control-ui" }, "Control UI ↗"),
        h("a.button", { href: "#/chat" }, "Chat")),
    ),
    h("section.card", {}, h("h2", {}, "Progress"), timeline),
    h("section.card", {}, h("h2", {}, "Usage"), usage),
    meta.models?.length ? h("section.card", {}, h("h2", {}, "Model"), modelSel, modelMsg) : null,
  );
  paint();
  const last = (agent.history || []).at(-1);
  if (last) clock(last.elapsed_s);
  loadUsage();
  return () => {
    events.close();
    clearInterval(tick);
  };
}

function meterRow(label, value, limit, id) {
  if (!limit) return h("div.meter", {}, h("span", {}, label), h("span", { id }, number(value)), h("span.muted", {}, "no limit"));
  const bar = h("meter", { id, min: 0, max: limit, value, low: limit * 0.8, high: limit * 0.95 });
  return h("div.meter", {}, h("span", {}, label), bar, h("span.muted", {}, `${number(value)} / ${number(limit)}`));
}
