"""Backups of a data folder, on real files, real SQLite, a real tmpfs and a real S3-compatible
server (moto, started here on loopback): what a hostile tenant plants is never followed, a
database written during the backup is never torn, tampering is caught with a typed reason, a
killed or starved writer leaves nothing called good."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.backup import core
from services.backup.errors import BackupCorrupt, CorruptReason
from services.backup.ops import Backups
from services.backup.targets import LocalTarget
from shared.crypto import KeyRing
from shared.settings import ZakiSettings
from tests.conftest import missing_tool, new_user

REPO = Path(__file__).resolve().parent.parent
SECRET = "host-secret-" + os.urandom(8).hex()


def make_folder(root: Path, user: str, messages: int = 200) -> Path:
    """A gateway-like data folder: SQLite state in WAL mode, workspace files, owned by uid 1000."""
    folder = root / "users" / user
    (folder / ".openclaw" / "state").mkdir(parents=True)
    (folder / ".openclaw" / "agents" / "main" / "agent").mkdir(parents=True)
    (folder / "workspace").mkdir()
    (folder / "workspace" / "SOUL.md").write_text("I am a careful agent.\n")
    (folder / "workspace" / "MEMORY.md").write_text("The user likes tea.\n")
    (folder / ".openclaw" / "openclaw.json").write_text('{"secret": "gateway password"}')
    db = sqlite3.connect(folder / ".openclaw" / "state" / "openclaw.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, session TEXT, body TEXT)")
    db.executemany(
        "INSERT INTO messages (session, body) VALUES (?, ?)",
        [("main", f"message {i} " + "lorem ipsum " * 20) for i in range(messages)],
    )
    db.commit()
    db.close()
    db = sqlite3.connect(folder / ".openclaw" / "state" / "openclaw.sqlite")
    db.execute("CREATE TABLE state_leases (scope TEXT, owner TEXT, payload_json TEXT, expires_at INTEGER)")
    db.execute(
        "INSERT INTO state_leases VALUES ('gateway', 'pid 7 on a container gone', '{}', 9999999999999)"
    )
    db.commit()
    db.close()
    sqlite3.connect(folder / ".openclaw" / "agents" / "main" / "agent" / "openclaw-agent.sqlite").execute(
        "CREATE TABLE t (x)"
    ).connection.close()
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), 1000, 1000)
    os.chown(folder, 1000, 1000)
    return folder


@pytest.fixture
def env(tmp_path: Path, keyring_spec: str) -> tuple[ZakiSettings, KeyRing, LocalTarget]:
    s = ZakiSettings(data_root=tmp_path / "data", backup_dir=tmp_path / "backups", secret_keys=keyring_spec)
    return s, KeyRing.from_spec(keyring_spec), LocalTarget(s.backup_dir)


def count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        con.close()


def test_backup_verify_and_unpack_round_trip(env, tmp_path):
    s, ring, target = env
    user = new_user()
    make_folder(s.data_root, user)
    m = core.create(s, ring, target, user, "i1", "manual")
    assert [x.backup_id for x in core.list_backups(target, user)] == [m.backup_id]
    assert m.key_id == ring.primary_kid and m.sqlite == [
        ".openclaw/agents/main/agent/openclaw-agent.sqlite",
        ".openclaw/state/openclaw.sqlite",
    ]
    # Stored encrypted, owner-only; the gateway config (its secrets) is never in a backup.
    stored = (s.backup_dir / user / f"{m.backup_id}.zbk").read_bytes()
    assert b"lorem ipsum" not in stored and b"tea" not in stored
    for p in (s.backup_dir / user).iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
    out = tmp_path / "out"
    stats = core.unpack_backup(ring, target, m, out)
    assert stats["sqlite_checked"] == m.sqlite
    assert (out / "workspace" / "MEMORY.md").read_text() == "The user likes tea.\n"
    assert count(out / ".openclaw" / "state" / "openclaw.sqlite") == 200
    # A lease held by the process that was running is not the agent's data (a restored gateway
    # would wait for it to expire): the copy leaves it out.
    con = sqlite3.connect(out / ".openclaw" / "state" / "openclaw.sqlite")
    assert con.execute("SELECT count(*) FROM state_leases").fetchone()[0] == 0
    con.close()
    assert not (out / ".openclaw" / "openclaw.json").exists()


def test_a_tenants_symlinks_fifos_and_swapped_databases_are_never_followed(env, tmp_path):
    s, ring, target = env
    user, other = new_user(), new_user()
    folder = make_folder(s.data_root, user)
    make_folder(s.data_root, other)
    host_file = tmp_path / "shadow"
    host_file.write_text(SECRET)
    host_file.chmod(0o600)
    ws = folder / "workspace"
    os.symlink(host_file, ws / "notes.md")  # a host file
    os.symlink("/", ws / "rootfs")  # the host's root
    os.symlink("../../../../..", ws / "up")
    # Another tenant's database, where the gateway's own would be: SQLite would follow it.
    agent_db = folder / ".openclaw" / "agents" / "main" / "agent" / "openclaw-agent.sqlite"
    agent_db.unlink()
    os.symlink(s.data_root / "users" / other / ".openclaw" / "state" / "openclaw.sqlite", agent_db)
    os.mkfifo(ws / "pipe")  # opening it would block the backup forever
    t0 = time.monotonic()
    m = core.create(s, ring, target, user, None, "manual")
    assert time.monotonic() - t0 < 20
    assert set(m.skipped["symlink"]) == {
        "workspace/notes.md",
        "workspace/rootfs",
        "workspace/up",
        ".openclaw/agents/main/agent/openclaw-agent.sqlite",
    }
    assert m.skipped["special"] == ["workspace/pipe"]
    assert m.skipped_counts["symlink"] == 4

    out = tmp_path / "out"
    core.unpack_backup(ring, target, m, out)
    seen = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert SECRET.encode() not in seen
    assert m.sqlite == [".openclaw/state/openclaw.sqlite"]
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_thousands_of_planted_links_do_not_swell_the_manifest_or_stall_the_reader(env):
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user)
    many = folder / "workspace" / "links"
    many.mkdir()
    for i in range(3000):  # enough to overflow a pipe if every name went to the summary
        os.symlink("/etc/passwd", many / f"l{i:05d}-{'x' * 150}")
    m = core.create(s, ring, target, user, None, "manual")
    assert m.skipped_counts["symlink"] == 3000 and len(m.skipped["symlink"]) == 50
    assert len(m.to_json()) < 64 * 1024


def test_the_reader_is_confined_even_for_a_path_swapped_after_its_checks(env):
    """The race lstat cannot close: a tenant swaps a database for a symlink between the walk's
    check and SQLite's open (SQLite follows links itself). Inside the reader's chroot, as the
    gateway's uid, the link's target is looked up in the tenant's own folder: another tenant's
    database, or a root-only host file, cannot be read."""
    s, _, _ = env
    user, other = new_user(), new_user()
    folder = make_folder(s.data_root, user)
    make_folder(s.data_root, other)
    victim = s.data_root / "users" / other / ".openclaw" / "state" / "openclaw.sqlite"
    os.symlink(victim, folder / "workspace" / "swapped.sqlite")
    probe = (
        "import os, sys; from services.backup.reader import confine, _sqlite_image, _only_inside\n"
        "folder, mode = sys.argv[1], sys.argv[2]\n"
        "checked = os.stat(folder + '/.openclaw/state/openclaw.sqlite')  # what the walk checked\n"
        "guard = (lambda: _only_inside(checked, folder + '/', set())) if mode == 'guarded' else None\n"
        "if mode == 'confined': confine(folder)\n"
        "path = '/workspace/swapped.sqlite' if mode == 'confined' else folder + '/workspace/swapped.sqlite'\n"
        "print(len(_sqlite_image(path, guard)))"
    )

    def read_as(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-c", probe, str(folder), mode], cwd=REPO, capture_output=True, text=True
        )

    unconfined = read_as("plain")
    assert unconfined.returncode == 0 and int(unconfined.stdout) > 10_000  # SQLite follows the link
    confined = read_as("confined")
    assert confined.returncode != 0 and "unable to open database" in confined.stderr
    # Without root (no chroot), the open files are checked while SQLite holds them: the copy is refused.
    guarded = read_as("guarded")
    assert guarded.returncode != 0 and "Swapped: SQLite opened a file outside the folder" in guarded.stderr
    # And as uid 1000 in the chroot, a planted copy of a root-only file is all it could reach.
    host = Path("/etc/shadow")
    if host.exists():
        r = subprocess.run(
            [sys.executable, "-S", "-c", "import sys; from services.backup.reader import confine; "
             "confine(sys.argv[1]); open('/etc/shadow')", str(folder)],
            cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode != 0 and "FileNotFoundError" in r.stderr


def test_without_root_the_reader_still_skips_links_and_says_it_was_not_confined(env):
    s, _, _ = env
    user = new_user()
    reachable = Path(tempfile.mkdtemp(prefix="zaki-bk-"))  # pytest's tmp_path is root-only
    reachable.chmod(0o755)
    s = s.model_copy(update={"data_root": reachable})
    folder = make_folder(s.data_root, user)
    (s.data_root / "users").chmod(0o755)
    os.symlink("/etc/hostname", folder / "workspace" / "host.md")
    python = "/usr/bin/python3"  # the venv's interpreter lives under root's home: not for uid 1000
    if not os.path.exists(python):
        missing_tool("a system python3 for uid 1000")
    r = subprocess.run(
        [python, "-S", "-m", "services.backup.reader", str(folder)],
        cwd=REPO, capture_output=True, user=1000, group=1000, extra_groups=[],
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-500:]
    summary = json.loads(r.stderr.decode().splitlines()[-1])
    assert summary["confined"] is False and summary["skipped"]["symlink"] == ["workspace/host.md"]
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r|") as tar:
        names = {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar}
    assert names["workspace/MEMORY.md"] == b"The user likes tea.\n" and "workspace/host.md" not in names
    assert core.create(s, *env[1:], user, None, "manual").confined is True  # as root: confined
    shutil.rmtree(reachable)


def test_a_tenants_broken_database_never_blocks_a_backup(env, tmp_path):
    """A tenant could plant a file SQLite cannot read; failing the backup would let it block its
    own upgrade and delete (both need a backup first). It is kept as bytes and reported."""
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user)
    junk = b"SQLite format 3\x00" + os.urandom(5000)
    (folder / "workspace" / "broken.sqlite").write_bytes(junk)
    m = core.create(s, ring, target, user, None, "manual")
    assert m.skipped["sqlite_raw"] == ["workspace/broken.sqlite"]
    stats = core.unpack_backup(ring, target, m, tmp_path / "out")  # verify passes the others
    assert "workspace/broken.sqlite" not in stats["sqlite_checked"] and stats["sqlite_checked"]
    assert (tmp_path / "out" / "workspace" / "broken.sqlite").read_bytes() == junk


def test_backup_while_the_database_is_written_is_never_torn(env, tmp_path):
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user, messages=2000)
    db_path = folder / ".openclaw" / "state" / "openclaw.sqlite"
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        con = sqlite3.connect(db_path, timeout=30)
        while not stop.is_set():
            # Each transaction adds 50 rows and deletes 10: a torn copy breaks the count rule.
            with con:
                con.executemany("INSERT INTO messages (session, body) VALUES ('w', ?)", [("x" * 500,)] * 50)
                con.execute("DELETE FROM messages WHERE id IN (SELECT id FROM messages LIMIT 10)")
            written[0] += 1
        con.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        ms = [core.create(s, ring, target, user, None, "manual") for _ in range(3)]
    finally:
        stop.set()
        t.join()
    assert written[0] > 5  # the writer really ran during the backups
    for i, m in enumerate(ms):
        out = tmp_path / f"out{i}"
        stats = core.unpack_backup(ring, target, m, out)  # integrity_check ok on each
        assert ".openclaw/state/openclaw.sqlite" in stats["sqlite_checked"]
        n = count(out / ".openclaw" / "state" / "openclaw.sqlite")
        assert (n - 2000) % 40 == 0, n  # whole transactions only


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", CorruptReason.AUTH_FAILED),
        ("truncate", CorruptReason.TRUNCATED),
        ("other_user", CorruptReason.AUTH_FAILED),
        ("manifest_sha", CorruptReason.CHECKSUM_MISMATCH),
        ("unknown_key", CorruptReason.UNKNOWN_KEY),
    ],
)
async def test_verify_detects_a_tampered_backup_with_a_typed_reason(env, damage, reason):
    s, ring, target = env
    user = new_user()
    make_folder(s.data_root, user)
    backups = Backups(s, ring, target)
    m = await backups.create(user, None, "manual")
    assert (await backups.verify(user, m.backup_id))["sqlite_checked"]
    data = s.backup_dir / user / f"{m.backup_id}.zbk"
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(raw)
    elif damage == "truncate":
        data.write_bytes(raw[: len(raw) - 1000])
    elif damage == "other_user":  # a backup copied under another user's name
        victim = new_user()
        make_folder(s.data_root, victim)
        mv = core.create(s, ring, target, victim, None, "manual")
        (s.backup_dir / victim / f"{mv.backup_id}.zbk").write_bytes(raw)
        user, m = victim, mv
    elif damage == "manifest_sha":
        m.plaintext_sha256 = "0" * 64
        target.put(core.manifest_key(user, m.backup_id), m.to_json())
    elif damage == "unknown_key":
        other = Backups(s, KeyRing.from_spec(KeyRing.new_key_spec("k9")), target)
        with pytest.raises(BackupCorrupt) as e:
            await other.verify(user, m.backup_id)
        assert e.value.reason == reason
        return
    with pytest.raises(BackupCorrupt) as e:
        await backups.verify(user, m.backup_id)
    assert e.value.reason == reason and e.value.code == reason.value


def test_kill_9_mid_backup_leaves_no_good_backup(env, keyring_spec):
    s, _, target = env
    user = new_user()
    folder = make_folder(s.data_root, user)
    with open(folder / "workspace" / "big.bin", "wb") as f:  # incompressible: slow enough to catch
        for _ in range(160):
            f.write(os.urandom(1 << 20))
    envs = {
        **os.environ,
        "ZAKI_DATA_ROOT": str(s.data_root),
        "ZAKI_BACKUP_DIR": str(s.backup_dir),
        "ZAKI_SECRET_KEYS": keyring_spec,
        "ZAKI_NATS_URL": "nats://127.0.0.1:1",
    }
    p = subprocess.Popen(
        [sys.executable, "-m", "zaki.cli", "backup", "create", user],
        cwd=REPO,
        env=envs,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while time.monotonic() < deadline and not partial:
        partial = [x for x in (s.backup_dir / user).glob(".tmp-*") if x.stat().st_size > 1 << 20]
        time.sleep(0.05)
    assert partial, "the backup never started writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert core.list_backups(target, user) == []  # nothing called good
    # The next sweep removes what the dead writer left (its reader child is gone too).
    time.sleep(0.5)
    assert core.sweep_orphans(target, older_than_s=0) >= 1
    assert list((s.backup_dir / user).iterdir()) == []


def test_retention_by_count_and_age_and_delete_grace(env):
    s, _, _ = env
    s = s.model_copy(update={"backup_keep_count": 3, "backup_keep_days": 10, "delete_grace_days": 30})
    now = datetime(2026, 11, 27, tzinfo=UTC)

    def m(days_ago: float, reason: str = "scheduled", expires: datetime | None = None) -> core.Manifest:
        t = now - timedelta(days=days_ago)
        return core.Manifest(
            backup_id=core.new_backup_id(t), user_id="u", instance_id=None, created_at=t.isoformat(),
            reason=reason, key_id="k1", target="local", expires_at=expires.isoformat() if expires else None,
        )  # fmt: skip

    ms = [m(20), m(5), m(4), m(3), m(2), m(1)]
    gone = core.expired(ms, s, True, now)
    assert [x.created_at for x in gone] == [x.created_at for x in ms[:3]]  # beyond the newest 3
    old = [m(40), m(30), m(20)]
    assert core.expired(old, s, True, now) == old[:2]  # the newest always stays, even if old
    kept = [m(40, "pre_delete", now + timedelta(days=1)), m(35)]
    assert core.expired(kept, s, True, now) == []  # a pre-delete backup lives until it expires
    deleted_user = [m(31), m(29)]
    assert core.expired(deleted_user, s, False, now) == []  # within the grace
    assert len(core.expired([m(32), m(31)], s, False, now)) == 2  # grace over: all go


def test_a_tenants_file_name_cannot_rewrite_the_integrity_checks_uri(tmp_path):
    """Security review H1: a database named 'a%2F..%2F..%2Fx?mode=rwc#' made SQLite open (and
    create) a file outside the folder being checked."""
    import sqlite3 as _sqlite3

    from services.backup.archive import check_sqlite

    root = tmp_path / "unpacked"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = root / "a" / "a%2F..%2F..%2F..%2Foutside%2Fcreated.db?mode=rwc#"
    con = _sqlite3.connect(hostile)
    con.execute("create table t(x)")
    con.commit()
    con.close()
    assert check_sqlite(root) == [str(hostile.relative_to(root))]
    assert list(outside.iterdir()) == []  # nothing opened or created outside


def test_hard_links_and_sparse_files_cannot_swell_a_backup_past_the_quota(env, tmp_path):
    """The disk quota counts allocated blocks and an inode once; a tar copies every name in full.
    ~1 MB on disk (50 names of one 1 MB file and a 1 GiB sparse file) made a >1 GB archive."""
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user)
    links = folder / "workspace" / "links"
    links.mkdir()
    blob = os.urandom(1 << 20)
    (links / "a00").write_bytes(blob)
    for i in range(1, 50):
        os.link(links / "a00", links / f"a{i:02d}")
    with open(folder / "workspace" / "hole.bin", "wb") as f:
        f.truncate(1 << 30)
    m = core.create(s, ring, target, user, None, "manual")
    print(f"\n50 hard links of 1 MiB + a 1 GiB sparse file: tar {m.tar_bytes} B, stored {m.stored_bytes} B")
    assert m.tar_bytes < 3 << 20
    assert m.skipped_counts["hardlink"] == 49 and m.skipped_counts["sparse"] == 1
    assert m.skipped["sparse"] == ["workspace/hole.bin"] and "workspace/links/a01" in m.skipped["hardlink"]
    out = tmp_path / "out"
    core.unpack_backup(ring, target, m, out)
    assert (out / "workspace" / "links" / "a00").read_bytes() == blob  # the first name is kept
    assert not (out / "workspace" / "hole.bin").exists()


async def test_a_backup_stops_at_the_tenants_disk_limit_and_verify_is_bounded(env, tmp_path):
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user, messages=10)
    for name in ("a.bin", "b.bin", "c.bin"):
        (folder / "workspace" / name).write_bytes(os.urandom(300_000))
    limited = s.model_copy(update={"tenant_disk_bytes": 800_000})
    m = core.create(limited, ring, target, user, None, "manual")  # not a failure: the rest is listed
    assert m.skipped["over_limit"] and m.skipped_counts["over_limit"] >= 1
    assert m.tar_bytes < 800_000 + 64 * 1024  # tar headers of the entries on top of the files
    r = await Backups(limited, ring, target).verify(user, m.backup_id)
    assert r["bytes"] <= 800_000
    # A backup taken under a larger limit (or crafted) unpacks no further than the limit at verify.
    big = core.create(s, ring, target, user, None, "manual")
    assert "over_limit" not in big.skipped
    with pytest.raises(BackupCorrupt) as e:
        await Backups(limited, ring, target).verify(user, big.backup_id)
    assert e.value.reason == CorruptReason.UNPACK_FAILED and "larger than allowed" in str(e.value)


def test_every_database_kept_raw_is_spared_the_integrity_check(env, tmp_path):
    """The list of raw databases was cut to 50 names of 200 characters: the 51st, or a long path,
    was integrity-checked at verify and restore, and every restore failed."""
    s, ring, target = env
    user = new_user()
    folder = make_folder(s.data_root, user, messages=10)
    deep = folder / "workspace" / ("d" * 150) / ("e" * 150)
    deep.mkdir(parents=True)
    junk = b"SQLite format 3\x00" + b"\xff" * 4000
    for i in range(60):
        (deep / f"broken{i:02d}.sqlite").write_bytes(junk)
    m = core.create(s, ring, target, user, None, "manual")
    assert m.skipped_counts["sqlite_raw"] == 60 and len(m.sqlite_raw) == 60
    assert all(len(p) > 300 for p in m.sqlite_raw)
    stats = core.unpack_backup(ring, target, m, tmp_path / "out")
    assert ".openclaw/state/openclaw.sqlite" in stats["sqlite_checked"]
    assert not any("broken" in p for p in stats["sqlite_checked"])


def test_a_tenants_trigger_on_state_leases_cannot_spin_the_reader(env, tmp_path):
    """The copy deletes the state_leases rows; a tenant's BEFORE DELETE trigger with an endless
    loop spun the reader at 100 % CPU until the backup timed out (and blocked its delete). The
    copy's triggers on that table are dropped first (the tenant's file is never written)."""
    s, ring, target = env
    s = s.model_copy(update={"backup_timeout_s": 60.0})
    user = new_user()
    folder = make_folder(s.data_root, user, messages=10)
    db_path = folder / ".openclaw" / "state" / "openclaw.sqlite"
    con = sqlite3.connect(db_path)
    con.execute(
        'CREATE TRIGGER "spin ""forever""" BEFORE DELETE ON state_leases BEGIN SELECT count(*) FROM '
        "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c); END"
    )
    con.commit()
    con.close()
    m = core.create(s, ring, target, user, None, "manual")  # without the fix: BackupError timeout
    assert ".openclaw/state/openclaw.sqlite" in m.sqlite and not m.sqlite_raw
    out = tmp_path / "out"
    core.unpack_backup(ring, target, m, out)
    con = sqlite3.connect(out / ".openclaw" / "state" / "openclaw.sqlite")
    assert con.execute("SELECT count(*) FROM state_leases").fetchone()[0] == 0
    con.close()
    con = sqlite3.connect(db_path)  # the tenant's own file keeps its trigger and lease
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM state_leases").fetchone()[0] == 1
    con.close()


def test_the_copy_step_budget_keeps_a_database_raw_instead_of_spinning():
    """The budget behind the trigger rule: any statement on the copy stops after its steps."""
    from services.backup.reader import limit_steps

    con = sqlite3.connect(":memory:")
    limit_steps(con, 100)
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        con.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    con.close()


class _Prov:
    """What the provisioner hands the hook: its settings, key ring and publish."""

    def __init__(self, s: ZakiSettings, ring: KeyRing) -> None:
        self.s, self.keys, self.events = s, ring, []

    async def publish(self, subject: str, ev) -> None:
        self.events.append((subject, ev))


async def test_a_tenant_caused_backup_failure_does_not_block_its_delete(env):
    """ZAKI_BACKUP_BEFORE_CHANGE=required: a backup that fails for a reason the tenant controls
    (here the reader's timeout) no longer refuses the delete: backup.failed is published and the
    folder is kept aside (hard links, root-only, without the gateway's config); an upgrade is
    still refused."""
    from services.backup.hooks import before_change
    from services.backup.keep import kept_root, sweep_kept
    from services.provisioner.base import ProvisionError

    s, ring, _ = env
    s = s.model_copy(update={"backup_timeout_s": 0.001, "backup_before_change": "required"})
    user = new_user()
    folder = make_folder(s.data_root, user, messages=10)
    prov = _Prov(s, ring)
    doc = {"_id": user, "instance_id": "i1"}
    with pytest.raises(ProvisionError) as e:
        await before_change(prov, doc, "pre_upgrade")
    assert "timeout" in str(e.value)
    kept_root(s).write_text("not a folder")  # nothing can be kept aside: refused as before
    with pytest.raises(ProvisionError):
        await before_change(prov, doc, "pre_delete")
    kept_root(s).unlink()
    await before_change(prov, doc, "pre_delete")  # without the fix: ProvisionError backup_failed
    failed = [(ev.reason, ev.error) for subject, ev in prov.events if subject.endswith("backup.failed")]
    assert failed == [("pre_upgrade", "timeout"), *[("pre_delete", "timeout")] * 2]
    [kept] = [p for p in kept_root(s).iterdir() if p.name.startswith(user + "-")]
    assert (kept / "workspace" / "MEMORY.md").read_text() == "The user likes tea.\n"
    assert not (kept / ".openclaw" / "openclaw.json").exists()
    assert kept_root(s).stat().st_mode & 0o777 == 0o700
    shutil.rmtree(folder)  # the purge: what was kept survives it
    assert (kept / ".openclaw" / "state" / "openclaw.sqlite").stat().st_size > 0
    assert sweep_kept(s) == 0 and kept.exists()  # within the grace
    assert sweep_kept(s, now=time.time() + s.delete_grace_days * 86400 + 60) == 1 and not kept.exists()
