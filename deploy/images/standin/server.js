// Stand-in OpenClaw gateway for tests and benchmarks that need many instances.
// Node stdlib only. It answers the probes, /v1/models, /v1/chat/completions
// (JSON and SSE), /tools/invoke and the WebSocket RPC handshake the way
// openclaw@2026.9.6 does, and enforces the same auth modes read from the
// native openclaw.json (token or trusted-proxy), so proxy and provisioner tests
// exercise the real contract at a fraction of the memory (~40 MB vs ~1 GB).
//
// Fault knobs (env): STANDIN_EXIT_CODE (exit at once), STANDIN_ALLOC_MB
// (allocate then idle: OOM tests), STANDIN_LEAK_MB_PER_S (grow steadily from start: memory
// trend tests), STANDIN_START_DELAY_MS, STANDIN_READYZ_DELAY_MS,
// STANDIN_HANG_AFTER_MS (stop answering), STANDIN_PORTS=a-b (serve many ports),
// STANDIN_HTTP_500 (every request but the probes answers 500: ready, yet broken for its users).
"use strict";
const http = require("node:http");
const crypto = require("node:crypto");
const fs = require("node:fs");
const os = require("node:os");

const env = process.env;
// Faults can also come from <state dir>/standin-faults.json, which tests write on the host
// (it survives restarts): {"exit_code":3} {"alloc_mb":3000} {"readyz_delay_ms":1500} {"hang":true}
// {"leak_mb_per_s":2} (off-heap buffers, touched, never freed: the cgroup sees them, V8's heap cap does not)
const FAULTS_PATH = (env.OPENCLAW_STATE_DIR || "/home/node/.openclaw") + "/standin-faults.json";
function readFaults() {
  try {
    return JSON.parse(fs.readFileSync(FAULTS_PATH, "utf8"));
  } catch {
    return {};
  }
}
let faults = {};
const hog = [];
const bootedAt = Date.now();
function applyFaults() {
  faults = readFaults();
  const exitCode = env.STANDIN_EXIT_CODE ?? faults.exit_code;
  if (exitCode !== undefined) process.exit(Number(exitCode));
  let mb = Number(env.STANDIN_ALLOC_MB || faults.alloc_mb || 0);
  const leak = Number(env.STANDIN_LEAK_MB_PER_S || faults.leak_mb_per_s || 0);
  if (leak > 0) mb += Math.floor((leak * (Date.now() - bootedAt)) / 1000);
  while (hog.length < mb) hog.push(Buffer.alloc(1 << 20, 1));
}
applyFaults();
setInterval(applyFaults, 300).unref();

function loadAuth() {
  const path = env.OPENCLAW_CONFIG_PATH || "/home/node/.openclaw/openclaw.json";
  let auth = {};
  try {
    auth = JSON.parse(fs.readFileSync(path, "utf8")).gateway?.auth ?? {};
  } catch {
    auth = {};
  }
  if (env.OPENCLAW_GATEWAY_TOKEN && !auth.mode) auth = { mode: "token", token: env.OPENCLAW_GATEWAY_TOKEN };
  if (auth.mode === "token" && !auth.token) auth.token = env.OPENCLAW_GATEWAY_TOKEN;
  return auth;
}
let AUTH = loadAuth();
// Watched like OpenClaw's config: a claimed pool slot's identity changes by a hot reload.
let configStamp = 0;
setInterval(() => {
  try {
    const m = fs.statSync(env.OPENCLAW_CONFIG_PATH || "/home/node/.openclaw/openclaw.json").mtimeMs;
    if (m !== configStamp) {
      if (configStamp) console.log("[reload] config hot reload applied");
      [configStamp, AUTH] = [m, loadAuth()];
    }
  } catch {}
}, 200).unref();
const started = Date.now();
let hanging = false;
if (env.STANDIN_HANG_AFTER_MS) setTimeout(() => (hanging = true), Number(env.STANDIN_HANG_AFTER_MS));

// Returns [status, type] on refusal, or null when the caller may pass.
function authorize(req, probe) {
  if (AUTH.mode === "trusted-proxy") {
    const tp = AUTH.trustedProxy ?? {};
    if (!req.headers["x-forwarded-for"]) return probe === "healthz" ? null : [403, "proxy_attribution_required"];
    if (probe) return null;
    const user = req.headers[(tp.userHeader || "x-forwarded-user").toLowerCase()];
    for (const h of tp.requiredHeaders ?? []) if (!req.headers[h.toLowerCase()]) return [401, "unauthorized"];
    if (!user || (tp.allowUsers && !tp.allowUsers.includes(user))) return [401, "unauthorized"];
    return null;
  }
  if (probe) return null;
  if (AUTH.mode === "token" && req.headers.authorization !== `Bearer ${AUTH.token}`) return [401, "unauthorized"];
  return null;
}

function json(res, status, body) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "content-type": "application/json; charset=utf-8", "content-length": data.length });
  res.end(data);
}

function readBody(req) {
  return new Promise((resolve) => {
    const parts = [];
    req.on("data", (c) => parts.push(c));
    req.on("end", () => {
      try {
        resolve(JSON.parse(Buffer.concat(parts).toString("utf8") || "{}"));
      } catch {
        resolve(null);
      }
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function lastUserText(body) {
  const msgs = Array.isArray(body?.messages) ? body.messages : [];
  for (let i = msgs.length - 1; i >= 0; i--) {
    if (msgs[i].role === "user") return typeof msgs[i].content === "string" ? msgs[i].content : JSON.stringify(msgs[i].content);
  }
  return "";
}

async function chat(req, res) {
  const body = await readBody(req);
  if (!body) return json(res, 400, { error: { message: "invalid JSON", type: "invalid_request_error" } });
  const text = "echo: " + lastUserText(body);
  const id = "chatcmpl_" + crypto.randomUUID();
  const created = Math.floor(Date.now() / 1000);
  if (!body.stream) {
    return json(res, 200, {
      id, object: "chat.completion", created, model: body.model || "openclaw", system_fingerprint: os.hostname(),
      choices: [{ index: 0, message: { role: "assistant", content: text }, finish_reason: "stop" }],
      usage: { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 },
    });
  }
  // Streams one chunk per `standin_chunks` part, `standin_delay_ms` apart.
  const n = Math.max(1, Number(body.standin_chunks || 2));
  const delay = Number(body.standin_delay_ms || 0);
  res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
  const chunk = (delta, finish) =>
    "data: " + JSON.stringify({ id, object: "chat.completion.chunk", created, model: "openclaw",
      choices: [{ index: 0, delta, finish_reason: finish }] }) + "\n\n";
  res.write(chunk({ role: "assistant" }, null));
  const size = Math.ceil(text.length / n);
  for (let i = 0; i < n; i++) {
    if (delay) await sleep(delay);
    res.write(chunk({ content: text.slice(i * size, (i + 1) * size) }, null));
  }
  res.end(chunk({}, "stop") + "data: [DONE]\n\n");
}

async function handle(req, res) {
  if (hanging || faults.hang) return; // never answers: the monitor must time out
  const url = new URL(req.url, "http://x");
  const p = url.pathname;
  if (p === "/healthz" || p === "/readyz" || p === "/startupz") {
    const refused = authorize(req, p.slice(1));
    if (refused) return json(res, refused[0], { error: { message: refused[1], type: refused[1] } });
    const delay = Number(env.STANDIN_READYZ_DELAY_MS || faults.readyz_delay_ms || 0);
    if (p === "/readyz" && delay) await sleep(delay);
    if (p === "/healthz") return json(res, 200, { ok: true, status: "live" });
    if (p === "/startupz") return json(res, 200, { ok: true, status: "started", version: "standin" });
    return json(res, 200, { ready: true, failing: [], uptimeMs: Date.now() - started });
  }
  if (env.STANDIN_HTTP_500 || faults.http_500) return json(res, 500, { error: { message: "stand-in fault", type: "api_error" } });
  const refused = authorize(req, null);
  if (refused) return json(res, refused[0], { error: { message: "Unauthorized", type: refused[1] } });
  if (p === "/v1/models" && req.method === "GET") {
    return json(res, 200, { object: "list", data: ["openclaw", "openclaw/default", "openclaw/main"].map((id) => ({ id, object: "model", owned_by: "openclaw" })) });
  }
  if (p === "/v1/chat/completions" && req.method === "POST") return chat(req, res);
  if (p === "/tools/invoke" && req.method === "POST") {
    const body = await readBody(req);
    if (!body || !body.tool) return json(res, 400, { ok: false, error: { type: "invalid_request", message: "tool required" } });
    if (body.tool !== "sessions_list") return json(res, 404, { ok: false, error: { type: "not_found", message: `Tool not available: ${body.tool}` } });
    return json(res, 200, { ok: true, result: { details: { count: 0, sessions: [] } } });
  }
  if (p === "/__standin/headers") return json(res, 200, { headers: req.headers, url: req.url });
  if (p === "/" && req.method === "GET") {
    res.writeHead(200, { "content-type": "text/html", "x-frame-options": "DENY" });
    return res.end("<!doctype html><title>OpenClaw Control (stand-in)</title>");
  }
  json(res, 404, { error: { message: "Not Found", type: "not_found" } });
}

// --- WebSocket (RFC 6455, text frames, no extensions) ---
function wsSend(sock, obj) {
  const data = Buffer.from(JSON.stringify(obj));
  let head;
  if (data.length < 126) head = Buffer.from([0x81, data.length]);
  else if (data.length < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x81; head[1] = 126; head.writeUInt16BE(data.length, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x81; head[1] = 127; head.writeBigUInt64BE(BigInt(data.length), 2);
  }
  sock.write(Buffer.concat([head, data]));
}

function upgrade(req, sock) {
  if (hanging || faults.hang) return;
  const refused = authorize(req, null);
  const key = req.headers["sec-websocket-key"];
  if (!key) return sock.destroy();
  const accept = crypto.createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64");
  sock.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + `Sec-WebSocket-Accept: ${accept}\r\n\r\n`);
  sock.setNoDelay(true);
  const nonce = crypto.randomUUID();
  wsSend(sock, { type: "event", event: "connect.challenge", payload: { nonce, ts: Date.now() } });
  let connected = false;
  let buf = Buffer.alloc(0);
  sock.on("data", (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (buf.length < 2) return;
      const op = buf[0] & 0x0f;
      let len = buf[1] & 0x7f, off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
      const masked = buf[1] & 0x80;
      const total = off + (masked ? 4 : 0) + len;
      if (buf.length < total) return;
      let payload = buf.subarray(off + (masked ? 4 : 0), total);
      if (masked) {
        const mask = buf.subarray(off, off + 4);
        payload = Buffer.from(payload.map((b, i) => b ^ mask[i & 3]));
      }
      buf = buf.subarray(total);
      if (op === 0x8) { sock.end(Buffer.from([0x88, 0])); return; }
      if (op === 0x9) { sock.write(Buffer.concat([Buffer.from([0x8a, payload.length]), payload])); continue; }
      if (op !== 0x1) continue;
      let frame;
      try { frame = JSON.parse(payload.toString("utf8")); } catch { continue; }
      if (!connected) {
        if (frame.method !== "connect") {
          wsSend(sock, { type: "res", id: frame.id, ok: false, error: { code: "INVALID_REQUEST", message: "connect first" } });
          continue;
        }
        if (refused) {
          wsSend(sock, { type: "res", id: frame.id, ok: false, error: { code: "UNAUTHORIZED", message: refused[1] } });
          sock.end();
          return;
        }
        connected = true;
        const tp = AUTH.mode === "trusted-proxy";
        wsSend(sock, { type: "res", id: frame.id, ok: true, payload: { type: "hello-ok", protocol: 4,
          server: { version: "standin", connId: nonce },
          auth: { method: tp ? "trusted-proxy" : "token", role: "operator", scopes: tp ? ["operator.read", "operator.write"] : [] } } });
        continue;
      }
      const result = frame.method === "health" ? { ok: true } : { method: frame.method, params: frame.params ?? {} };
      wsSend(sock, { type: "res", id: frame.id, ok: true, payload: result });
    }
  });
  sock.on("error", () => sock.destroy());
}

function serve(port) {
  const server = http.createServer((req, res) => {
    handle(req, res).catch(() => json(res, 500, { error: { message: "stand-in error", type: "api_error" } }));
  });
  server.keepAliveTimeout = 65000;
  server.on("upgrade", upgrade);
  server.listen(port, env.STANDIN_HOST || "0.0.0.0");
}

setTimeout(() => {
  if (env.STANDIN_PORTS) {
    const [a, b] = env.STANDIN_PORTS.split("-").map(Number);
    for (let p = a; p <= b; p++) serve(p);
  } else {
    serve(Number(env.PORT || 18789));
  }
}, Number(env.STANDIN_START_DELAY_MS || 0));
process.on("SIGTERM", () => process.exit(0));
