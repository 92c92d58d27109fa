-- The fleet server's SQLite schema as it was when migrations were introduced (version 1).
-- Every statement is idempotent: a store created before versioned migrations already has it all.
-- The rollouts view is created after the migrations by the code that first splits an older store's
-- rollouts table (fleet_server/store/sqlite/schema.py).

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, labels TEXT, profile TEXT, first_seen REAL, last_seen REAL, online INTEGER, online_ts REAL, release INTEGER, revision TEXT, sync_state TEXT, paused INTEGER, pause_reason TEXT, drift TEXT, last_error TEXT, status_ts REAL, last_event TEXT, last_event_ts REAL, registered INTEGER);
CREATE INDEX IF NOT EXISTS devices_by_state ON devices (sync_state);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, device TEXT NOT NULL, ts REAL NOT NULL, received_at REAL NOT NULL, type TEXT NOT NULL, [commit] TEXT, release INTEGER, reason TEXT, step TEXT, detail TEXT, committed_at REAL);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device, id);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, ts);
CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events (device, ts, type);
CREATE INDEX IF NOT EXISTS events_by_received ON events (received_at);
CREATE TABLE IF NOT EXISTS health (id INTEGER PRIMARY KEY, device TEXT NOT NULL, ts REAL NOT NULL, received_at REAL NOT NULL, metrics TEXT, checks TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS health_once ON health (device, ts);
CREATE INDEX IF NOT EXISTS health_by_received ON health (received_at);
CREATE TABLE IF NOT EXISTS releases (version INTEGER PRIMARY KEY, [commit] TEXT NOT NULL, signers TEXT NOT NULL, seen_at REAL NOT NULL, committed_at REAL);
CREATE INDEX IF NOT EXISTS releases_by_commit ON releases ([commit]);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollout_assignments (device TEXT PRIMARY KEY, rollout_id TEXT NOT NULL, release INTEGER NOT NULL, [commit] TEXT NOT NULL, assigned_at REAL NOT NULL, published_at REAL);
CREATE TABLE IF NOT EXISTS rollout_gates (id INTEGER PRIMARY KEY, rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, at REAL NOT NULL, passed INTEGER NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS rollout_gates_by_rollout ON rollout_gates (rollout_id, id);
CREATE TABLE IF NOT EXISTS rollout_samples (rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, ts REAL NOT NULL, done INTEGER NOT NULL, failed INTEGER NOT NULL, pending INTEGER NOT NULL, offline INTEGER NOT NULL, deferred INTEGER NOT NULL, skipped INTEGER NOT NULL, PRIMARY KEY (rollout_id, wave, ts));
CREATE INDEX IF NOT EXISTS audit_by_target ON audit (target, id);
CREATE TABLE IF NOT EXISTS rollout_records (id TEXT PRIMARY KEY, release INTEGER NOT NULL, [commit] TEXT NOT NULL, previous INTEGER, plan TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL, wave INTEGER NOT NULL, actor TEXT, reason TEXT, created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rollout_records_by_created ON rollout_records (created);
CREATE TABLE IF NOT EXISTS rollout_devices (rollout_id TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (rollout_id, device)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollout_devices_by_state ON rollout_devices (rollout_id, state, device);
CREATE INDEX IF NOT EXISTS rollout_devices_by_wave ON rollout_devices (rollout_id, wave, device);
CREATE TABLE IF NOT EXISTS device_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL UNIQUE);
CREATE TRIGGER IF NOT EXISTS devices_changed_on_insert AFTER INSERT ON devices BEGIN INSERT OR REPLACE INTO device_changes (device) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS devices_changed_on_update AFTER UPDATE OF online, release, paused, labels, profile ON devices WHEN OLD.online IS NOT NEW.online OR OLD.release IS NOT NEW.release OR OLD.paused IS NOT NEW.paused OR OLD.labels IS NOT NEW.labels OR OLD.profile IS NOT NEW.profile BEGIN INSERT OR REPLACE INTO device_changes (device) VALUES (NEW.id); END;
CREATE INDEX IF NOT EXISTS devices_by_summary ON devices (sync_state, online, release);
