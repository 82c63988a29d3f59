// People who wrote to the bot and wait for the owner's approval (Telegram pairing), and
// the Telegram user ids that are answered without asking.
import { get, patch, post } from "../api.js";
import { clear, h, notice, when } from "../dom.js";

const POLL_MS = 5000;

export async function render(view) {
  const msg = notice();
  const list = h("ul.cards", { id: "pairing-list" });
  const empty = h("p.muted", { id: "pairing-empty" }, "Nobody is waiting. When someone writes to your bot, their request shows up here.");

  let listFailed = false; // a failed listing clears itself on the next good one; an action's message stays
  let shown = null; // the ids on screen: an unchanged list is not rebuilt under the person's pointer
  let busy = 0; // approvals or dismissals in flight: polling waits for them
  async function load() {
    if (busy) return;
    try {
      const { requests } = await get("/api/agent/pairing");
      if (busy) return;
      const ids = requests.map((r) => r.request_id || r.code).join(",");
      if (ids !== shown) {
        shown = ids;
        clear(list);
        for (const r of requests) list.append(item(r));
      }
      empty.hidden = requests.length > 0;
      if (listFailed) msg.hide();
      listFailed = false;
    } catch (err) {
      clear(list);
      shown = null;
      empty.hidden = true;
      listFailed = true;
      msg.show(err.code === "agent_not_running" ? "Your agent is not running: start it to see who is asking." : err.message);
    }
  }

  function item(r) {
    const m = r.metadata || {};
    const id = r.request_id || r.code;
    const code = r.code || m.code; // the code the stranger was sent, when the gateway gives it
    const name = m.name || [m.firstName || m.first_name, m.lastName || m.last_name].filter(Boolean).join(" ");
    const handle = m.username || r.username;
    const who = [name || r.name, handle ? `@${handle}` : null].filter(Boolean).join(" ") || "Someone";
    const approve = h("button.primary", { type: "button", dataset: { action: "approve" } }, "Approve");
    const dismiss = h("button", { type: "button", dataset: { action: "dismiss" } }, "Dismiss");
    const li = h(
      "li.card.pairing",
      { dataset: { request: id } },
      h("div", {}, h("b.who", {}, who), h("div.muted", {}, `${r.channel || "telegram"} id ${r.sender_id || "?"}`, code ? [" · code ", h("code", {}, code)] : null, ` · ${when(r.created_at)}`)),
      h("div.row", {}, approve, dismiss),
    );
    const act = async (action) => {
      approve.disabled = dismiss.disabled = true;
      busy++;
      try {
        await post(`/api/agent/pairing/${action}`, r.request_id ? { request_id: r.request_id } : { code: r.code });
        msg.show(action === "approve" ? `${who} can now talk to your agent.` : `Request from ${who} dismissed.`, "info");
        li.remove();
        shown = [...list.children].map((c) => c.dataset.request).join(",");
        empty.hidden = list.children.length > 0;
      } catch (err) {
        msg.show(err.message);
        approve.disabled = dismiss.disabled = false;
      } finally {
        busy--;
      }
    };
    approve.addEventListener("click", () => act("approve"));
    dismiss.addEventListener("click", () => act("dismiss"));
    return li;
  }

  view.append(
    h(
      "section.card",
      {},
      h("h1", {}, "People asking to talk to your bot"),
      h("p.muted", {}, "A stranger who writes to your bot gets a code. Approve them here and the agent answers their next message."),
      msg,
      empty,
      list,
    ),
    await allowed(),
  );
  await load();
  const timer = setInterval(load, POLL_MS);
  return () => clearInterval(timer);
}

/** The Telegram user ids answered directly (set when the agent is created; editable when the API allows). */
async function allowed() {
  const msg = notice();
  const { agent } = await get("/api/agent").catch(() => ({ agent: null }));
  const ids = agent?.telegram_allow_from;
  const input = h("input", { id: "allow-from", inputMode: "numeric", value: (ids || []).join(", "), placeholder: "123456789, 987654321", "aria-label": "Allowed Telegram user ids" });
  const save = h("button", { type: "submit" }, "Save");
  const form = h("form.row", {}, input, save);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const list = input.value.split(/[\s,]+/).filter(Boolean);
    try {
      await patch("/api/agent", { telegram_allow_from: list });
      msg.show("Saved: the agent restarts with the new list.", "info");
    } catch (err) {
      msg.show(err.message);
    }
  });
  return h(
    "section.card",
    {},
    h("h2", {}, "Always allowed"),
    h("p.muted", {}, "Telegram user ids the bot answers without asking (a person can get theirs from @userinfobot)."),
    msg,
    ids === undefined ? h("p.muted", {}, "Set when you create your agent.") : form,
  );
}
