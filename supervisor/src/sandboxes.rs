//! The daemon's sandboxes: the one [`Spawner`] every grain and driver host is built by,
//! the unprivileged host ids they run as, and the blocking work around them (spawn,
//! teardown) kept off the RPC thread.
//!
//! * **One spawner per daemon.** [`Sandboxes::new`] creates it at start-up (the sealed
//!   helper image, capnet's cgroup parent, the spawner thread). Spawning blocks for a
//!   few milliseconds (fork, exec, setup, until the app has exec'd), so
//!   [`Sandboxes::spawn`] hands the request to the spawner thread through
//!   `spawn_blocking` and awaits the answer; the RPC thread never forks.
//! * **Host ids.** Every sandbox maps its uid/gid 1000 to its own unprivileged host
//!   id from `daemon.sandbox_uid_base .. + sandbox_uid_count`. A grain *keeps* its id
//!   across restarts (recorded in `<state_dir>/grains/<id>/uid`), so the files in its
//!   persistent `/var` stay its own; no two grains ever share an id. Driver hosts take
//!   a free id for as long as their sandbox lives. An id in use by a live sandbox is
//!   never handed out again ([`LiveId`] releases it when dropped, after teardown).
//! * **Teardown** (kill, reap, remove cgroups) blocks too and runs on a blocking thread
//!   ([`teardown`]).
//!
//! Threat answered: a grain sharing a host identity with another grain or a driver (it
//! could then signal or read what the other owns if any wall failed), and a blocked RPC
//! thread (a slow spawn must not stall every administrator and grain).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use crate::config::Config;
use crate::sandbox::{SandboxExit, SandboxSpec, Sandboxed, SpawnError, Spawner, SpawnerError};

/// Name of the file in a grain's state directory that records its host id.
pub const UID_FILE: &str = "uid";

/// A host id could not be assigned.
#[derive(Debug, thiserror::Error)]
pub enum HostIdError {
    /// Every id of the range is taken.
    #[error(
        "no free host id left in daemon.sandbox_uid_base {base} + sandbox_uid_count {count}; \
         enlarge the range"
    )]
    Exhausted {
        /// First id.
        base: u32,
        /// Size of the range.
        count: u32,
    },
    /// The grain's id file could not be read or written.
    #[error("cannot record the host id of grain {grain} in {path}: {source}")]
    Record {
        /// The grain.
        grain: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The grain's id is in use by a live sandbox (the grain runs already).
    #[error("host id {uid} of grain {grain} is in use by a running sandbox")]
    InUse {
        /// The grain.
        grain: String,
        /// The id.
        uid: u32,
    },
}

/// The range of host ids and who holds which.
#[derive(Debug)]
struct HostIds {
    base: u32,
    count: u32,
    /// Ids recorded for grains (kept across restarts).
    owner: BTreeMap<u32, String>,
    /// Ids of live sandboxes.
    live: BTreeSet<u32>,
}

impl HostIds {
    fn in_range(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }

    fn free(&self) -> Result<u32, HostIdError> {
        (self.base..self.base.saturating_add(self.count))
            .find(|u| !self.owner.contains_key(u) && !self.live.contains(u))
            .ok_or(HostIdError::Exhausted {
                base: self.base,
                count: self.count,
            })
    }
}

/// A host id held by a live sandbox; released (for driver hosts: made available again)
/// when dropped.
#[derive(Debug)]
pub struct LiveId {
    uid: u32,
    ids: Rc<RefCell<HostIds>>,
}

impl LiveId {
    /// The host uid (and gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for LiveId {
    fn drop(&mut self) {
        self.ids.borrow_mut().live.remove(&self.uid);
    }
}

/// The daemon's sandbox machinery; cheap to clone (all clones share one spawner).
#[derive(Clone)]
pub struct Sandboxes {
    spawner: Arc<Spawner>,
    ids: Rc<RefCell<HostIds>>,
}

impl Sandboxes {
    /// Starts the spawner (helper image, cgroup parent, spawner thread) and reads the
    /// host ids recorded for grains under `<state_dir>/grains`.
    pub fn new(config: &Config) -> Result<Self, SpawnerError> {
        let spawner = Spawner::new(&config.sandbox_helper(), &config.daemon.cgroup_parent)?;
        let mut ids = HostIds {
            base: config.daemon.sandbox_uid_base,
            count: config.daemon.sandbox_uid_count,
            owner: BTreeMap::new(),
            live: BTreeSet::new(),
        };
        let grains = config.daemon.state_dir.join("grains");
        if let Ok(entries) = std::fs::read_dir(&grains) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(uid) = read_uid(&e.path().join(UID_FILE))
                    && ids.in_range(uid)
                {
                    ids.owner.insert(uid, name);
                }
            }
        }
        tracing::info!(
            cgroups = ?spawner.cgroup_version(),
            recorded_grain_ids = ids.owner.len(),
            "sandboxes ready"
        );
        Ok(Sandboxes {
            spawner: Arc::new(spawner),
            ids: Rc::new(RefCell::new(ids)),
        })
    }

    /// The host id of grain `id` (whose state directory is `dir`): the one recorded
    /// there if it is still in range, else a new one, recorded for next time.
    pub fn grain_id(&self, id: &str, dir: &Path) -> Result<LiveId, HostIdError> {
        grain_id(&self.ids, id, dir)
    }

    /// A host id for a driver host, free while its sandbox lives.
    pub fn transient_id(&self) -> Result<LiveId, HostIdError> {
        let mut ids = self.ids.borrow_mut();
        let uid = ids.free()?;
        ids.live.insert(uid);
        Ok(LiveId {
            uid,
            ids: self.ids.clone(),
        })
    }

    /// Removes capnet's cgroup parent directories if no sandbox is left in them (at
    /// shutdown; best effort).
    pub fn remove_parent_if_empty(&self) {
        self.spawner.remove_cgroup_parent_if_empty();
    }

    /// Builds and starts a sandbox on the spawner thread; returns once its program runs.
    pub async fn spawn(&self, spec: SandboxSpec) -> Result<Arc<Sandboxed>, SpawnError> {
        let spawner = self.spawner.clone();
        match tokio::task::spawn_blocking(move || spawner.spawn(spec)).await {
            Ok(r) => r.map(Arc::new),
            Err(_) => Err(SpawnError::SpawnerGone),
        }
    }
}

fn grain_id(ids_rc: &Rc<RefCell<HostIds>>, id: &str, dir: &Path) -> Result<LiveId, HostIdError> {
    let path = dir.join(UID_FILE);
    let mut ids = ids_rc.borrow_mut();
    let recorded = read_uid(&path)
        .filter(|u| ids.in_range(*u) && ids.owner.get(u).is_none_or(|owner| owner == id));
    let uid = match recorded {
        Some(u) => u,
        None => {
            let u = ids.free()?;
            std::fs::write(&path, format!("{u}\n")).map_err(|source| HostIdError::Record {
                grain: id.to_string(),
                path: path.clone(),
                source,
            })?;
            u
        }
    };
    if !ids.live.insert(uid) {
        return Err(HostIdError::InUse {
            grain: id.to_string(),
            uid,
        });
    }
    ids.owner.insert(uid, id.to_string());
    Ok(LiveId {
        uid,
        ids: ids_rc.clone(),
    })
}

fn read_uid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kills whatever is left of a sandbox, reaps it and removes its cgroups, on a blocking
/// thread. Returns its exit as observed. Callers pass the last reference; if another
/// one is still alive, the sandbox is torn down when that one is dropped instead.
pub async fn teardown(sb: Arc<Sandboxed>) -> Option<SandboxExit> {
    let id = sb.id.clone();
    let done = tokio::task::spawn_blocking(move || match Arc::try_unwrap(sb) {
        Ok(sb) => match sb.teardown() {
            Ok(exit) => Some(exit),
            Err(e) => {
                tracing::warn!(error = %e, "sandbox teardown failed");
                None
            }
        },
        Err(still_shared) => {
            still_shared.kill_helper();
            None
        }
    })
    .await;
    match done {
        Ok(exit) => exit,
        Err(e) => {
            tracing::warn!(sandbox = %id, error = %e, "sandbox teardown task failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(base: u32, count: u32) -> Rc<RefCell<HostIds>> {
        Rc::new(RefCell::new(HostIds {
            base,
            count,
            owner: BTreeMap::new(),
            live: BTreeSet::new(),
        }))
    }

    /// A live id is never handed out twice, recorded grain ids are never given to a
    /// driver host, and dropping a [`LiveId`] makes a transient id free again.
    #[test]
    fn ids_are_unique_while_live() {
        let ids = ids(100_000, 3);
        ids.borrow_mut().owner.insert(100_000, "g".into());
        let take = |ids: &Rc<RefCell<HostIds>>| {
            let u = ids.borrow().free();
            u.map(|u| {
                ids.borrow_mut().live.insert(u);
                LiveId {
                    uid: u,
                    ids: ids.clone(),
                }
            })
        };
        let a = take(&ids).expect("first");
        let b = take(&ids).expect("second");
        assert_eq!((a.uid(), b.uid()), (100_001, 100_002));
        assert!(matches!(take(&ids), Err(HostIdError::Exhausted { .. })));
        drop(a);
        assert_eq!(take(&ids).expect("freed").uid(), 100_001);
    }

    /// A grain gets a new id recorded in its directory, gets the same id again after a
    /// restart, cannot hold it twice at once, and another grain never gets it.
    #[test]
    fn grain_ids_are_recorded_and_kept() {
        let ids = ids(100_000, 10);
        let tmp = tempfile::tempdir().expect("tempdir");
        let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir_all(&a_dir).expect("mkdir");
        std::fs::create_dir_all(&b_dir).expect("mkdir");
        let a = grain_id(&ids, "a", &a_dir).expect("a");
        assert_eq!(read_uid(&a_dir.join(UID_FILE)), Some(a.uid()));
        assert!(matches!(
            grain_id(&ids, "a", &a_dir),
            Err(HostIdError::InUse { .. })
        ));
        let first = a.uid();
        drop(a);
        let b = grain_id(&ids, "b", &b_dir).expect("b");
        assert_ne!(b.uid(), first, "a's id stays a's after it stopped");
        assert_eq!(grain_id(&ids, "a", &a_dir).expect("a again").uid(), first);
        // A forged record naming another grain's id is not honoured.
        std::fs::write(b_dir.join(UID_FILE), format!("{first}\n")).expect("write");
        drop(b);
        assert_ne!(grain_id(&ids, "b", &b_dir).expect("b again").uid(), first);
    }
}
