// Operator pages: every account and instance with state, health and usage, actions on
// them, providers (never a key) and the audit trail of every admin action.
import { del, get, post } from "../api.js";
import { clear, h, notice, number, when } from "../dom.js";

const TABS = { accounts: "Accounts", instances: "Instances", providers: "Providers", audit: "Audit" };

export async function render(view, { params }) {
  const tab = params.get("t") in TABS ? params.get("t") : "accounts";
  const msg = notice();
  const body = h("div.scroll", { id: "admin-body" });
  view.append(
    h("nav.tabs", { "aria-label": "Admin" }, Object.entries(TABS).map(([t, label]) => h("a", { href: `#/admin?t=${t}`, "aria-current": t === tab ? "page" : null }, label))),
    h("section.card", {}, h("h1", {}, TABS[tab]), msg, body),
  );
  const reload = async () => {
    try {
      clear(body).append(await LOADERS[tab](act));
    } catch (err) {
      msg.show(err.message);
    }
  };
  async function act(label, fn) {
    msg.hide();
    try {
      const res = await fn();
      msg.show(res?.temporary_password ? `${label}. Temporary password (shown once): ${res.temporary_password}` : `${label}: done.`, "info");
      await reload();
    } catch (err) {
      msg.show(`${label}: ${err.message}`);
    }
  }
  await reload();
}

function table(headers, rows) {
  // Each cell carries its column's name: on a phone the rows become cards that show it.
  for (const tr of rows) [...tr.children].forEach((td, i) => (td.dataset.label = headers[i] || ""));
  return h("table.admin", {}, h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))), h("tbody", {}, rows.length ? rows : h("tr", {}, h("td.muted", { colSpan: headers.length }, "Nothing yet."))));
}

const badge = (v, kind = "state") => h("span.badge", { dataset: { [kind]: v || "unknown" } }, v || "—");
const btn = (label, onclick, cls = "") => h(`button${cls}`, { type: "button", onclick }, label);
const enc = encodeURIComponent;

const LOADERS = {
  async accounts(act) {
    const { accounts } = await get("/api/admin/accounts");
    return table(
      ["Account", "Role", "Agent", "Health", "Tokens today / month", ""],
      accounts.map(({ user, agent, usage }) =>
        h("tr", { dataset: { user: user.id } },
          h("td", {}, h("b", {}, user.username), h("div.muted", {}, user.email || user.id)),
          h("td", {}, user.role, user.disabled ? h("span.badge", { dataset: { state: "failed" } }, " disabled") : ""),
          h("td", {}, agent ? [badge(agent.state), " ", agent.bot_username ? `@${agent.bot_username}` : ""] : "—"),
          h("td", {}, agent ? badge(agent.health, "health") : "—"),
          h("td", {}, `${number(usage?.today_tokens || 0)} / ${number(usage?.month_tokens || 0)}`),
          h("td.actions", {},
            user.disabled
              ? btn("Enable", () => act(`Enable ${user.username}`, () => post(`/api/admin/accounts/${enc(user.id)}/enable`)))
              : btn("Disable", () => confirm(`Disable ${user.username}? Their sessions end now.`) && act(`Disable ${user.username}`, () => post(`/api/admin/accounts/${enc(user.id)}/disable`)), ".danger"),
            btn("Reset password", () => confirm(`Reset ${user.username}'s password?`) && act(`Reset ${user.username}`, () => post(`/api/admin/accounts/${enc(user.id)}/reset-password`))),
          ),
        ),
      ),
    );
  },
  async instances(act) {
    const { instances } = await get("/api/admin/instances");
    return table(
      ["User", "State", "Health", "Bot", "Model", "Updated", ""],
      instances.map((i) => {
        const on = (verb) => () => act(`${verb} ${i.user_id}`, () => post(`/api/admin/instances/${enc(i.user_id)}/${verb}`));
        return h("tr", { dataset: { user: i.user_id } },
          h("td", {}, h("b", {}, i.account || "(no account)"), h("div.muted", {}, i.user_id)),
          h("td", {}, badge(i.state)), h("td", {}, badge(i.health, "health")),
          h("td", {}, i.bot_username ? `@${i.bot_username}` : "—"), h("td", {}, i.model || "—"), h("td.muted", {}, when(i.updated_at)),
          h("td.actions", {}, btn("Start", on("start")), btn("Stop", on("stop")), btn("Restart", on("restart")),
            btn("Delete", () => confirm(`Delete ${i.user_id}'s instance? Its memory is kept.`) && act(`Delete ${i.user_id}`, () => del(`/api/admin/instances/${enc(i.user_id)}?purge=false`)), ".danger")),
        );
      }),
    );
  },
  async providers() {
    const { providers } = await get("/api/admin/providers");
    return table(["Name", "Base URL", "API", "Models", "State"], providers.map((p) => h("tr", {}, h("td", {}, h("b", {}, p.name)), h("td", {}, h("code", {}, p.base_url)), h("td", {}, p.api), h("td", {}, (p.models || []).join(", ")), h("td", {}, badge(p.state)))));
  },
  async audit() {
    const { records } = await get("/api/admin/audit?limit=100");
    return table(["When", "Who", "Action", "Target", "Detail"], records.map((r) => h("tr", {}, h("td.muted", {}, when(r.at)), h("td", {}, r.actor_name || r.actor), h("td", {}, h("code", {}, r.action)), h("td", {}, r.target || "—"), h("td.muted", {}, r.detail && Object.keys(r.detail).length ? JSON.stringify(r.detail) : ""))));
  },
};
