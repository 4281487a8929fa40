//! The SQLite side of the state: schema, queries, integrity.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::StateError;
use super::migrations::MIGRATIONS;
use crate::audit::AuditRecord;

/// A grant as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRow {
    /// Grant id.
    pub id: String,
    /// The grain it belongs to.
    pub grain: String,
    /// The driver serving it.
    pub driver: String,
    /// JSON of the grant kind.
    pub kind: String,
    /// The grain's label.
    pub label: String,
    /// JSON of the extra rules.
    pub rules: String,
    /// JSON of the limits.
    pub limits: String,
    /// Who granted it: `admin` or `rule:<name>`.
    pub source: String,
    /// Creation time (ms since the epoch).
    pub created_ms: u64,
    /// Last use (ms since the epoch, 0 if never).
    pub last_used_ms: u64,
    /// Bytes from the network.
    pub bytes_in: u64,
    /// Bytes to the network.
    pub bytes_out: u64,
    /// Revocation time, if revoked.
    pub revoked_ms: Option<u64>,
    /// Why it was revoked.
    pub revoke_reason: Option<String>,
}

/// A saved token as stored (by hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRow {
    /// The grant it restores.
    pub grant_id: String,
    /// The grain that saved it (the only one that may restore it).
    pub grain: String,
    /// JSON: which object of the grant it restores.
    pub object: String,
    /// When it was saved.
    pub created_ms: u64,
    /// When it was dropped, if it was.
    pub dropped_ms: Option<u64>,
}

/// What a token lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenState {
    /// No such token (never saved, or its grain was deleted).
    Unknown,
    /// The token and its grant.
    Found(Box<(TokenRow, GrantRow)>),
}

/// Which audit records to return.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only this grain's.
    pub grain: Option<String>,
    /// Only this grant's.
    pub grant: Option<String>,
    /// Only this kind.
    pub kind: Option<String>,
    /// Only at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// At most this many, newest last.
    pub limit: usize,
}

/// The open database. Lives on the state thread.
pub struct StateDb {
    conn: Connection,
    path: PathBuf,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Turns a SQLite error into a [`StateError`] naming the database file.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StateError + Copy + '_ {
    move |source| StateError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl StateDb {
    /// Opens or creates the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let err = sqlite_err(path);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(err)?;
        // The busy timeout comes first: switching to WAL, or recovering a WAL a killed
        // predecessor left, takes locks that another reader (an administrator's `sqlite3`,
        // a backup) may hold for a moment.
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        let mut db = Self {
            conn,
            path: path.to_path_buf(),
        };
        db.migrate()?;
        Ok(db)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + Copy + '_ {
        sqlite_err(&self.path)
    }

    fn migrate(&mut self) -> Result<(), StateError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StateError::TooNew {
                path: self.path.clone(),
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let err = sqlite_err(&self.path);
            let tx = self.conn.transaction().map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
            tx.commit().map_err(err)?;
            tracing::info!(db = %self.path.display(), version = i + 1, "state database migrated");
        }
        Ok(())
    }

    /// The schema version.
    pub fn version(&self) -> Result<i64, StateError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err())
    }

    /// `PRAGMA integrity_check`: "ok" or the problems found.
    pub fn integrity_check(&self) -> Result<String, StateError> {
        self.conn
            .pragma_query_value(None, "integrity_check", |r| r.get(0))
            .map_err(self.err())
    }

    /// Stores a new grant (and its audit record) in one transaction.
    pub fn insert_grant(&mut self, g: &GrantRow, audit: &AuditRecord) -> Result<(), StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO grants (id, grain, driver, kind, label, rules, limits, source, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                g.id,
                g.grain,
                g.driver,
                g.kind,
                g.label,
                g.rules,
                g.limits,
                g.source,
                to_i64(g.created_ms)
            ],
        )
        .map_err(err)?;
        insert_audit_in(&tx, audit).map_err(err)?;
        tx.commit().map_err(err)
    }

    fn row_to_grant(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRow> {
        Ok(GrantRow {
            id: r.get(0)?,
            grain: r.get(1)?,
            driver: r.get(2)?,
            kind: r.get(3)?,
            label: r.get(4)?,
            rules: r.get(5)?,
            limits: r.get(6)?,
            source: r.get(7)?,
            created_ms: to_u64(r.get(8)?),
            last_used_ms: to_u64(r.get(9)?),
            bytes_in: to_u64(r.get(10)?),
            bytes_out: to_u64(r.get(11)?),
            revoked_ms: r.get::<_, Option<i64>>(12)?.map(to_u64),
            revoke_reason: r.get(13)?,
        })
    }

    const GRANT_COLUMNS: &'static str = "id, grain, driver, kind, label, rules, limits, source, \
        created_ms, last_used_ms, bytes_in, bytes_out, revoked_ms, revoke_reason";

    /// Every grant, including revoked ones, oldest first.
    pub fn grants(&self) -> Result<Vec<GrantRow>, StateError> {
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT {} FROM grants ORDER BY created_ms, id",
                Self::GRANT_COLUMNS
            ))
            .map_err(self.err())?;
        let rows = st
            .query_map([], Self::row_to_grant)
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(rows)
    }

    /// One grant.
    pub fn grant(&self, id: &str) -> Result<Option<GrantRow>, StateError> {
        self.conn
            .query_row(
                &format!("SELECT {} FROM grants WHERE id = ?1", Self::GRANT_COLUMNS),
                params![id],
                Self::row_to_grant,
            )
            .optional()
            .map_err(self.err())
    }

    /// Marks a grant revoked (its tokens stop restoring), with its audit record.
    pub fn revoke_grant(
        &mut self,
        id: &str,
        at_ms: u64,
        reason: &str,
        audit: &AuditRecord,
    ) -> Result<bool, StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        let n = tx
            .execute(
                "UPDATE grants SET revoked_ms = ?2, revoke_reason = ?3
                 WHERE id = ?1 AND revoked_ms IS NULL",
                params![id, to_i64(at_ms), reason],
            )
            .map_err(err)?;
        insert_audit_in(&tx, audit).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(n > 0)
    }

    /// Records usage counters of grants: (id, last used, bytes in, bytes out).
    pub fn update_usage(&mut self, usage: &[(String, u64, u64, u64)]) -> Result<(), StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare(
                    "UPDATE grants SET last_used_ms = ?2, bytes_in = ?3, bytes_out = ?4 WHERE id = ?1",
                )
                .map_err(err)?;
            for (id, last, bin, bout) in usage {
                st.execute(params![id, to_i64(*last), to_i64(*bin), to_i64(*bout)])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Deletes a grain's grants and tokens; returns how many grants and tokens went.
    pub fn delete_grain(
        &mut self,
        grain: &str,
        audit: &AuditRecord,
    ) -> Result<(usize, usize), StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        let tokens = tx
            .execute("DELETE FROM tokens WHERE grain = ?1", params![grain])
            .map_err(err)?;
        let grants = tx
            .execute("DELETE FROM grants WHERE grain = ?1", params![grain])
            .map_err(err)?;
        insert_audit_in(&tx, audit).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok((grants, tokens))
    }

    /// Stores a saved token's hash with its audit record.
    pub fn insert_token(
        &mut self,
        hash: &[u8],
        row: &TokenRow,
        audit: &AuditRecord,
    ) -> Result<(), StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute(
            "INSERT INTO tokens (hash, grant_id, grain, object, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, row.grant_id, row.grain, row.object, to_i64(row.created_ms)],
        )
        .map_err(err)?;
        insert_audit_in(&tx, audit).map_err(err)?;
        tx.commit().map_err(err)
    }

    /// Looks a token up by hash.
    pub fn token(&self, hash: &[u8]) -> Result<TokenState, StateError> {
        let row = self
            .conn
            .query_row(
                "SELECT grant_id, grain, object, created_ms, dropped_ms FROM tokens WHERE hash = ?1",
                params![hash],
                |r| {
                    Ok(TokenRow {
                        grant_id: r.get(0)?,
                        grain: r.get(1)?,
                        object: r.get(2)?,
                        created_ms: to_u64(r.get(3)?),
                        dropped_ms: r.get::<_, Option<i64>>(4)?.map(to_u64),
                    })
                },
            )
            .optional()
            .map_err(self.err())?;
        let Some(row) = row else {
            return Ok(TokenState::Unknown);
        };
        match self.grant(&row.grant_id)? {
            Some(g) => Ok(TokenState::Found(Box::new((row, g)))),
            None => Ok(TokenState::Unknown),
        }
    }

    /// Marks a token dropped (kept as a tombstone so a later restore can say why it fails).
    pub fn drop_token(
        &mut self,
        hash: &[u8],
        at_ms: u64,
        audit: &AuditRecord,
    ) -> Result<bool, StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        let n = tx
            .execute(
                "UPDATE tokens SET dropped_ms = ?2 WHERE hash = ?1 AND dropped_ms IS NULL",
                params![hash, to_i64(at_ms)],
            )
            .map_err(err)?;
        insert_audit_in(&tx, audit).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(n > 0)
    }

    /// Number of live (not dropped) tokens of a grant.
    pub fn live_tokens(&self, grant_id: &str) -> Result<u64, StateError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM tokens WHERE grant_id = ?1 AND dropped_ms IS NULL",
                params![grant_id],
                |r| r.get::<_, i64>(0),
            )
            .map(to_u64)
            .map_err(self.err())
    }

    /// Appends audit records in one transaction.
    pub fn insert_audit(&mut self, records: &[AuditRecord]) -> Result<(), StateError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        for r in records {
            insert_audit_in(&tx, r).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// Audit records matching `f`, oldest first (the newest `f.limit`).
    pub fn audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StateError> {
        let mut sql = String::from(
            "SELECT time_ms, kind, grain, grant_id, driver, destination, rule, bytes_in, bytes_out,
                    duration_ms, detail FROM audit WHERE 1=1",
        );
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(g) = &f.grain {
            sql.push_str(" AND grain = ?");
            args.push(g.clone().into());
        }
        if let Some(g) = &f.grant {
            sql.push_str(" AND grant_id = ?");
            args.push(g.clone().into());
        }
        if let Some(k) = &f.kind {
            sql.push_str(" AND kind = ?");
            args.push(k.clone().into());
        }
        if let Some(t) = f.since_ms {
            sql.push_str(" AND time_ms >= ?");
            args.push(to_i64(t).into());
        }
        sql.push_str(" ORDER BY seq DESC LIMIT ?");
        args.push((f.limit.max(1) as i64).into());
        let mut st = self.conn.prepare(&sql).map_err(self.err())?;
        let mut rows = st
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok(AuditRecord {
                    time_ms: to_u64(r.get(0)?),
                    kind: r.get(1)?,
                    grain: r.get(2)?,
                    grant: r.get(3)?,
                    driver: r.get(4)?,
                    destination: r.get(5)?,
                    rule: r.get(6)?,
                    bytes_in: to_u64(r.get(7)?),
                    bytes_out: to_u64(r.get(8)?),
                    duration_ms: to_u64(r.get(9)?),
                    detail: r.get(10)?,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        rows.reverse();
        Ok(rows)
    }

    /// Deletes audit records older than `before_ms` and beyond the newest `max_rows`.
    pub fn prune_audit(&mut self, before_ms: u64, max_rows: u64) -> Result<usize, StateError> {
        let mut n = self
            .conn
            .execute(
                "DELETE FROM audit WHERE time_ms < ?1",
                params![to_i64(before_ms)],
            )
            .map_err(self.err())?;
        n += self
            .conn
            .execute(
                "DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?1",
                params![to_i64(max_rows)],
            )
            .map_err(self.err())?;
        Ok(n)
    }
}

fn insert_audit_in(tx: &rusqlite::Transaction<'_>, r: &AuditRecord) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (time_ms, kind, grain, grant_id, driver, destination, rule, bytes_in,
                            bytes_out, duration_ms, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            to_i64(r.time_ms),
            r.kind,
            r.grain,
            r.grant,
            r.driver,
            r.destination,
            r.rule,
            to_i64(r.bytes_in),
            to_i64(r.bytes_out),
            to_i64(r.duration_ms),
            r.detail
        ],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str, grain: &str) -> GrantRow {
        GrantRow {
            id: id.into(),
            grain: grain.into(),
            driver: "tcp".into(),
            kind: "{}".into(),
            label: "l".into(),
            rules: "[]".into(),
            limits: "{}".into(),
            source: "admin".into(),
            created_ms: 1,
            last_used_ms: 0,
            bytes_in: 0,
            bytes_out: 0,
            revoked_ms: None,
            revoke_reason: None,
        }
    }

    /// Opening waits for a lock another process holds for a moment (an administrator's
    /// `sqlite3`, a backup) instead of failing at once with "database is locked".
    #[test]
    fn open_waits_for_a_briefly_held_lock() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("state.db");
        drop(StateDb::open(&p).expect("create"));
        let other = Connection::open(&p).expect("other connection");
        other
            .pragma_update(None, "locking_mode", "EXCLUSIVE")
            .expect("exclusive locking");
        other
            .execute_batch("BEGIN EXCLUSIVE; CREATE TABLE held(x); COMMIT;")
            .expect("take the lock");
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _ = held_tx.send(());
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(other);
        });
        held_rx.recv().expect("holder started");
        let t = std::time::Instant::now();
        let db = StateDb::open(&p).expect("open waits for the lock");
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(db.version().expect("v"), MIGRATIONS.len() as i64);
        holder.join().expect("holder");
    }

    /// A fresh database migrates to the current version and reopening it is a no-op.
    #[test]
    fn migrations_apply_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("state.db");
        let db = StateDb::open(&p).expect("open");
        assert_eq!(db.version().expect("v"), MIGRATIONS.len() as i64);
        drop(db);
        let db = StateDb::open(&p).expect("reopen");
        assert_eq!(db.integrity_check().expect("check"), "ok");
    }

    /// A database from a newer capnet is refused rather than misread.
    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("state.db");
        let db = StateDb::open(&p).expect("open");
        db.conn
            .pragma_update(None, "user_version", 99)
            .expect("bump");
        drop(db);
        let err = StateDb::open(&p).err().expect("too new");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    /// Tokens are stored by hash, restore to their grant, drop to a tombstone, and go away
    /// with their grain.
    #[test]
    fn token_lifecycle() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut db = StateDb::open(&dir.path().join("s.db")).expect("open");
        let a = AuditRecord::new("grant");
        db.insert_grant(&grant("g1", "alpha"), &a).expect("grant");
        let row = TokenRow {
            grant_id: "g1".into(),
            grain: "alpha".into(),
            object: "{}".into(),
            created_ms: 5,
            dropped_ms: None,
        };
        db.insert_token(b"hash-1", &row, &a).expect("token");
        assert!(
            matches!(db.token(b"hash-1").expect("t"), TokenState::Found(f) if f.0 == row && f.1.id == "g1")
        );
        assert_eq!(db.token(b"nope").expect("t"), TokenState::Unknown);
        assert!(db.drop_token(b"hash-1", 9, &a).expect("drop"));
        assert!(!db.drop_token(b"hash-1", 10, &a).expect("again"));
        match db.token(b"hash-1").expect("t") {
            TokenState::Found(f) => assert_eq!(f.0.dropped_ms, Some(9)),
            other => panic!("{other:?}"),
        }
        assert_eq!(db.delete_grain("alpha", &a).expect("delete"), (1, 1));
        assert_eq!(db.token(b"hash-1").expect("t"), TokenState::Unknown);
    }

    /// Audit queries filter and the store is bounded by retention.
    #[test]
    fn audit_filter_and_retention() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut db = StateDb::open(&dir.path().join("s.db")).expect("open");
        let mut recs = Vec::new();
        for i in 0..10u64 {
            let mut r = AuditRecord::new(if i % 2 == 0 { "grant" } else { "deny" });
            r.time_ms = 1000 + i;
            r.grain = format!("g{}", i % 3);
            recs.push(r);
        }
        db.insert_audit(&recs).expect("insert");
        let all = db
            .audit(&AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .expect("q");
        assert_eq!(all.len(), 10);
        assert!(all.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
        let g0 = db
            .audit(&AuditFilter {
                grain: Some("g0".into()),
                limit: 100,
                ..Default::default()
            })
            .expect("q");
        assert_eq!(g0.len(), 4);
        let recent = db
            .audit(&AuditFilter {
                since_ms: Some(1007),
                limit: 100,
                ..Default::default()
            })
            .expect("q");
        assert_eq!(recent.len(), 3);
        assert_eq!(db.prune_audit(1003, 1_000_000).expect("prune"), 3);
        assert_eq!(db.prune_audit(0, 4).expect("prune"), 3);
        assert_eq!(
            db.audit(&AuditFilter {
                limit: 100,
                ..Default::default()
            })
            .expect("q")
            .len(),
            4
        );
    }
}
