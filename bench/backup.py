"""Backup and restore of a realistic agent folder, next to a plain ``tar czf`` of the same
folder, in one run.

    python bench/backup.py [--messages 1000] [--runs 3]

The folder is what a gateway that has held N messages keeps: its state database (messages with
their JSON payloads, in WAL mode), the agent's database, session transcripts (JSONL), and the
workspace (SOUL.md, MEMORY.md, notes). Reports, median of the runs: backup time (confined read,
SQLite online backup, gzip, AES-256-GCM, write, read-back), stored size, verify time (decrypt,
checksum, unpack, integrity_check), restore-to-folder time (the same plus the atomic swap), and
for the baseline: ``tar czf`` time and size (no consistency for SQLite, no encryption). Needs root
(the reader chroots).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.backup import core
from services.backup.archive import chown_tree, exchange
from services.backup.targets import LocalTarget
from shared.crypto import KeyRing
from shared.settings import ZakiSettings

WORDS = [
    "the",
    "agent",
    "user",
    "remembers",
    "tea",
    "morning",
    "schedule",
    "meeting",
    "project",
    "deadline",
    "travel",
    "berlin",
    "weather",
    "reply",
    "note",
    "idea",
    "code",
    "review",
    "summary",
    "question",
    "answer",
    "plan",
    "budget",
    "family",
    "call",
]


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_folder(root: Path, messages: int) -> Path:
    rng = random.Random(17)
    state = root / ".openclaw" / "state"
    agent = root / ".openclaw" / "agents" / "main" / "agent"
    sessions = root / ".openclaw" / "agents" / "main" / "sessions"
    ws = root / "workspace"
    for d in (state, agent, sessions, ws / "notes"):
        d.mkdir(parents=True)
    db = sqlite3.connect(state / "openclaw.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, session TEXT, role TEXT, ts INTEGER, payload TEXT)"
    )
    db.execute("CREATE INDEX by_session ON messages (session, ts)")
    rows = []
    for i in range(messages):
        role = "user" if i % 2 == 0 else "assistant"
        body = text(rng, 20 if role == "user" else 120)
        payload = {
            "role": role,
            "content": [{"type": "text", "text": body}],
            "usage": {"in": 900, "out": 240},
        }
        rows.append((f"agent:main:telegram:{i // 200}", role, 1_764_000_000 + i * 30, json.dumps(payload)))
    db.executemany("INSERT INTO messages (session, role, ts, payload) VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    adb = sqlite3.connect(agent / "openclaw-agent.sqlite")
    adb.execute("CREATE TABLE memory (id INTEGER PRIMARY KEY, text TEXT, embedding BLOB)")
    adb.executemany(
        "INSERT INTO memory (text, embedding) VALUES (?, ?)",
        [(text(rng, 30), rng.randbytes(1536 * 4)) for _ in range(messages // 10)],
    )
    adb.commit()
    adb.close()
    for s in range(max(1, messages // 200)):
        with open(sessions / f"session-{s}.jsonl", "w") as f:
            for r in rows[s * 200 : (s + 1) * 200]:
                f.write(r[3] + "\n")
    (ws / "SOUL.md").write_text("# Soul\n" + text(rng, 300))
    (ws / "MEMORY.md").write_text("# Memory\n" + "\n".join(f"- {text(rng, 15)}" for _ in range(200)))
    for n in range(20):
        (ws / "notes" / f"note-{n}.md").write_text(text(rng, 400))
    chown_tree(root)
    return root


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the backup reader chroots into the folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        s = ZakiSettings(data_root=base / "data", backup_dir=base / "backups")
        ring = KeyRing.from_spec(KeyRing.new_key_spec("k1"))
        target = LocalTarget(s.backup_dir)
        user = "bench"
        folder = make_folder(s.data_root / "users" / user, args.messages)
        t_backup, t_verify, t_restore, t_tar = [], [], [], []
        m = None
        tar_size = 0
        for i in range(args.runs):
            t0 = time.perf_counter()
            m = core.create(s, ring, target, user, None, "manual")
            t_backup.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            core.unpack_backup(ring, target, m, base / f"verify{i}")
            t_verify.append(time.perf_counter() - t0)
            shutil.rmtree(base / f"verify{i}")
            t0 = time.perf_counter()
            staging = s.data_root / "users" / f".restore{i}"
            core.unpack_backup(ring, target, m, staging)
            chown_tree(staging)
            exchange(staging, folder)
            shutil.rmtree(staging)
            t_restore.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = base / f"plain{i}.tar.gz"
            subprocess.run(["tar", "czf", str(out), "-C", str(folder), "."], check=True)
            t_tar.append(time.perf_counter() - t0)
            tar_size = out.stat().st_size
        assert m is not None
        med = statistics.median
        print(f"folder: {args.messages} messages, {size_of(folder) / 1e6:.2f} MB on disk, {m.files} files")
        print(f"{'':28}{'time (median of ' + str(args.runs) + ')':>24}{'size':>14}")
        print(f"{'zaki backup create':28}{med(t_backup) * 1000:>21.0f} ms{m.stored_bytes / 1e6:>11.2f} MB")
        print(f"{'zaki backup verify':28}{med(t_verify) * 1000:>21.0f} ms{'':>14}")
        print(f"{'restore (unpack + swap)':28}{med(t_restore) * 1000:>21.0f} ms{'':>14}")
        print(f"{'baseline: tar czf':28}{med(t_tar) * 1000:>21.0f} ms{tar_size / 1e6:>11.2f} MB")
        print(
            f"raw tar {m.tar_bytes / 1e6:.2f} MB -> gzip {m.plaintext_bytes / 1e6:.2f} MB "
            f"-> sealed {m.stored_bytes / 1e6:.2f} MB (+{m.stored_bytes - m.plaintext_bytes} B of headers and tags)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
