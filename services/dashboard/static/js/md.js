// A tiny markdown subset rendered straight to DOM nodes: the text is never parsed as HTML
// (no innerHTML anywhere), so "<script>", "<img onerror>" and the like stay visible text.
// Supported: paragraphs, line breaks, # headings (shown as h4-h6), - / 1. lists, > quotes,
// ``` fenced code ```, `code`, **bold**, *italic*, [text](https://…) links (http, https, mailto only).

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

function el(tag, ...children) {
  const e = document.createElement(tag);
  for (const c of children) e.append(c);
  return e;
}

/** The href if it is an absolute http(s)/mailto URL, else null (javascript:, data:, relative…). */
export function safeHref(raw) {
  try {
    const url = new URL(raw);
    return SAFE_SCHEMES.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

const INLINE = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|\*([^*\n]+)\*|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

/** Inline spans of one line of text, as nodes. */
export function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    if (m[1] !== undefined) out.push(el("code", m[1]));
    else if (m[2] !== undefined) out.push(el("strong", ...inline(m[2])));
    else if (m[3] !== undefined) out.push(el("em", ...inline(m[3])));
    else {
      const href = safeHref(m[5]);
      if (href) {
        const a = el("a", m[4]);
        a.href = href;
        a.rel = "noopener noreferrer nofollow";
        a.target = "_blank";
        out.push(a);
      } else out.push(document.createTextNode(m[0]));
    }
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

function lines(parent, textLines) {
  textLines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    parent.append(...inline(line));
  });
  return parent;
}

/** Renders markdown text into a DocumentFragment. */
export function render(text) {
  const frag = document.createDocumentFragment();
  const src = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < src.length) {
    const line = src[i];
    if (/^```/.test(line)) {
      const body = [];
      i++;
      while (i < src.length && !/^```/.test(src[i])) body.push(src[i++]);
      i++; // the closing fence (or the end of an unfinished stream)
      frag.append(el("pre", el("code", body.join("\n"))));
      continue;
    }
    const heading = /^(#{1,3})\s+(.*)$/.exec(line);
    if (heading) {
      frag.append(el(`h${heading[1].length + 3}`, ...inline(heading[2])));
      i++;
      continue;
    }
    const list = /^\s*([-*]|\d+[.)])\s+/;
    if (list.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const ul = document.createElement(ordered ? "ol" : "ul");
      while (i < src.length && list.test(src[i])) ul.append(el("li", ...inline(src[i++].replace(list, ""))));
      frag.append(ul);
      continue;
    }
    if (/^>\s?/.test(line)) {
      const body = [];
      while (i < src.length && /^>\s?/.test(src[i])) body.push(src[i++].replace(/^>\s?/, ""));
      frag.append(lines(el("blockquote"), body));
      continue;
    }
    if (!line.trim()) {
      i++;
      continue;
    }
    const para = [];
    while (i < src.length && src[i].trim() && !/^(```|#{1,3}\s|>|\s*([-*]|\d+[.)])\s)/.test(src[i])) para.push(src[i++]);
    if (!para.length) para.push(src[i++]);
    frag.append(lines(el("p"), para));
  }
  return frag;
}
