//! Capabilities: the root privileges a process holds, split into ~40 bits and five sets
//! (bounding, permitted, effective, inheritable, ambient).
//!
//! Mechanism: the app stage clears every set except the capabilities an administrator
//! granted explicitly (driver hosts only), which are raised as *ambient* capabilities so
//! they survive `execve` of an ordinary (non-setuid, no file caps) binary; the bounding
//! set is emptied so nothing can ever be regained, and `no_new_privs` (set separately)
//! stops setuid/file-capability binaries from granting anything.
//!
//! Threat answered: the sandbox's processes are created with every capability *in their
//! user namespace*; left in place, those would let a grain mount, change its network
//! configuration or create namespaces. After this step `/proc/self/status` shows
//! `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` all zero for a grain.

use caps::{CapSet, Capability, CapsHashSet};

/// Why dropping capabilities failed.
#[derive(Debug, thiserror::Error)]
pub enum DropCapsError {
    /// Changing a capability set failed.
    #[error("cannot change the {set:?} capability set: {source}")]
    Set {
        /// The set.
        set: CapSet,
        /// The error.
        source: caps::errors::CapsError,
    },
    /// A set still holds capabilities that were not granted.
    #[error("capability set {set:?} still holds {left:?} after dropping")]
    Verify {
        /// The set.
        set: CapSet,
        /// What is left.
        left: Vec<Capability>,
    },
}

/// Parses capability names such as `CAP_NET_BIND_SERVICE`.
pub fn parse_names(names: &[String]) -> Result<Vec<Capability>, String> {
    names
        .iter()
        .map(|n| n.parse::<Capability>().map_err(|_| n.clone()))
        .collect()
}

/// Drops every capability from every set of the calling thread except `keep`, which
/// end up permitted, effective, inheritable and ambient.
pub fn drop_all_except(keep: &[Capability]) -> Result<(), DropCapsError> {
    let keep_set: CapsHashSet = keep.iter().copied().collect();
    let err = |set| move |source| DropCapsError::Set { set, source };
    for cap in caps::all() {
        if !keep_set.contains(&cap) {
            match caps::drop(None, CapSet::Bounding, cap) {
                Ok(()) => {}
                // Capabilities newer than the running kernel do not exist there.
                Err(_) if !caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) => {}
                Err(e) => return Err(err(CapSet::Bounding)(e)),
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err(CapSet::Ambient))?;
    caps::set(None, CapSet::Inheritable, &keep_set).map_err(err(CapSet::Inheritable))?;
    caps::set(None, CapSet::Effective, &keep_set).map_err(err(CapSet::Effective))?;
    caps::set(None, CapSet::Permitted, &keep_set).map_err(err(CapSet::Permitted))?;
    for &cap in keep {
        caps::raise(None, CapSet::Ambient, cap).map_err(err(CapSet::Ambient))?;
    }
    for set in [
        CapSet::Bounding,
        CapSet::Permitted,
        CapSet::Effective,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        let have = caps::read(None, set).map_err(err(set))?;
        let left: Vec<Capability> = have.difference(&keep_set).copied().collect();
        if !left.is_empty() {
            return Err(DropCapsError::Verify { set, left });
        }
    }
    Ok(())
}

/// Makes the effective set equal to the permitted set (after a uid change with
/// `PR_SET_KEEPCAPS`, which keeps only the permitted set).
pub fn raise_effective() -> Result<(), DropCapsError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(|source| DropCapsError::Set {
        set: CapSet::Permitted,
        source,
    })?;
    caps::set(None, CapSet::Effective, &permitted).map_err(|source| DropCapsError::Set {
        set: CapSet::Effective,
        source,
    })
}
