//! Versioned schema migrations, applied in order inside one transaction each. The version
//! is SQLite's `user_version`.

/// Each entry migrates from version `index` to `index + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 0 → 1: grants, tokens, audit.
    r#"
    CREATE TABLE grants (
        id            TEXT PRIMARY KEY,
        grain         TEXT NOT NULL,
        driver        TEXT NOT NULL,
        kind          TEXT NOT NULL,   -- JSON of the grant kind
        label         TEXT NOT NULL,
        rules         TEXT NOT NULL,   -- JSON list of rules
        limits        TEXT NOT NULL,   -- JSON of the limits
        source        TEXT NOT NULL,   -- 'admin' or 'rule:<name>'
        created_ms    INTEGER NOT NULL,
        last_used_ms  INTEGER NOT NULL DEFAULT 0,
        bytes_in      INTEGER NOT NULL DEFAULT 0,
        bytes_out     INTEGER NOT NULL DEFAULT 0,
        revoked_ms    INTEGER,
        revoke_reason TEXT
    );
    CREATE INDEX grants_grain ON grants(grain);
    CREATE INDEX grants_driver ON grants(driver);

    CREATE TABLE tokens (
        hash        BLOB PRIMARY KEY,  -- SHA-256 of the token; the token itself is never stored
        grant_id    TEXT NOT NULL REFERENCES grants(id) ON DELETE CASCADE,
        grain       TEXT NOT NULL,
        object      TEXT NOT NULL,     -- JSON: what the token restores
        created_ms  INTEGER NOT NULL,
        dropped_ms  INTEGER
    );
    CREATE INDEX tokens_grant ON tokens(grant_id);
    CREATE INDEX tokens_grain ON tokens(grain);

    CREATE TABLE audit (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        time_ms      INTEGER NOT NULL,
        kind         TEXT NOT NULL,
        grain        TEXT NOT NULL,
        grant_id     TEXT NOT NULL,
        driver       TEXT NOT NULL,
        destination  TEXT NOT NULL,
        rule         TEXT NOT NULL,
        bytes_in     INTEGER NOT NULL,
        bytes_out    INTEGER NOT NULL,
        duration_ms  INTEGER NOT NULL,
        detail       TEXT NOT NULL
    );
    CREATE INDEX audit_time ON audit(time_ms);
    CREATE INDEX audit_grain ON audit(grain, time_ms);
    "#,
];
