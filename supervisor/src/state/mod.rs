//! The state database: grants, saved-capability tokens and the audit trail, in an embedded
//! SQLite database (WAL, `synchronous=FULL`) under the state directory.
//!
//! Everything a grain's capabilities need to outlive the grain process, the driver host and
//! capnetd itself lives here. A token is never stored: only its SHA-256. A write that has
//! returned is on disk (WAL with full sync), so `kill -9` of capnetd loses nothing that was
//! acknowledged.
//!
//! The database is used from one dedicated thread ([`State`]); the RPC thread sends it
//! closures and awaits their results, so SQLite never blocks the event loop.

mod db;
mod migrations;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub use db::{AuditFilter, GrantRow, StateDb, TokenRow, TokenState};
use tokio::sync::oneshot;

/// A state database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite reported an error.
    #[error("state database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A stored value does not decode (the database was edited or corrupted).
    #[error("state database {path}: stored {what} is malformed: {reason}")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// Why it does not decode.
        reason: String,
    },
    /// The database was written by a newer capnet.
    #[error(
        "state database {path} has schema version {found}, newer than this capnetd's {supported}; \
         run the newer capnetd or restore a backup"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// Ours.
        supported: i64,
    },
    /// The state thread is gone (capnetd is shutting down).
    #[error("the state database thread has stopped")]
    Stopped,
}

type Job = Box<dyn FnOnce(&mut StateDb) + Send>;

/// A handle to the state thread. Cheap to clone.
#[derive(Clone)]
pub struct State {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

impl State {
    /// Opens (creating and migrating if needed) the database at `path` on a new thread.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("capnet-state".into())
            .spawn(move || {
                let mut db = match StateDb::open(&p) {
                    Ok(db) => {
                        let _ = ready_tx.send(Ok(()));
                        db
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut db);
                }
            })
            .map_err(|e| StateError::Corrupt {
                path: path.to_path_buf(),
                what: "thread",
                reason: e.to_string(),
            })?;
        ready_rx.recv().map_err(|_| StateError::Stopped)??;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the state thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut StateDb) -> Result<T, StateError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Box::new(move |db| {
                let _ = tx.send(f(db));
            }))
            .map_err(|_| StateError::Stopped)?;
        rx.await.map_err(|_| StateError::Stopped)?
    }

    /// Runs `f` on the state thread without waiting for it (for audit records).
    pub fn post<F>(&self, f: F)
    where
        F: FnOnce(&mut StateDb) + Send + 'static,
    {
        let _ = self.tx.send(Box::new(f));
    }
}
