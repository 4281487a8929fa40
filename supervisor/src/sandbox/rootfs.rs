//! The sandbox's filesystem: a fresh root on a tmpfs, built inside the new mount
//! namespace and entered with `pivot_root`.
//!
//! Mechanism (run by the init, which holds every capability of its new user namespace):
//! 1. make every inherited mount private, so nothing we do propagates to the host;
//! 2. open every bind source with `O_PATH` while the host tree is still visible (later
//!    binds use `/proc/self/fd/N` as source, so mounting the new root cannot hide a
//!    source that lies under it); this happens in [`open_sources`], before the init
//!    switches to uid 1000, so sources under directories the sandbox user cannot search
//!    (the 0700 state directory holding each grain's `/var`) can still be bound;
//! 3. mount a small tmpfs (the new root) over `/tmp` of our private mount table, create
//!    mount points in it and bind/mount everything (see the table in `docs/sandbox.md`):
//!    `/app` ro, `/var` rw+noexec, `/tmp` tmpfs noexec with a size cap, `/dev` a ro tmpfs
//!    with `null zero full random urandom` bound from the host plus a private `/dev/shm`,
//!    `/proc` of the new pid namespace, the spec's extra ro binds and, for driver hosts,
//!    the resolver files and CA certificates (extra binds that land under `/tmp` are
//!    mounted after the sandbox's own `/tmp`, so it does not hide them; binds under `/dev`
//!    or `/proc` are refused);
//! 4. `pivot_root(".", ".")` and detach the old root (`umount2(MNT_DETACH)`), then remount
//!    the new root read-only.
//!
//! Every mount is `nosuid,nodev`, except the five device binds, which must allow device
//! access (the sandbox cannot create devices: mknod needs a capability it lacks, and
//! every other mount is nodev). Bind remounts keep the source mount's locked atime and
//! other flags (read with `statvfs`), which the kernel requires inside a user namespace.
//!
//! Threat answered: host filesystem exposure. Nothing of the host is visible except
//! what the spec names, read-only unless it is the grain's own `/var`.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use nix::sys::statvfs::{FsFlags, statvfs};

use super::Role;
use super::wire::WireSpec;

/// Why building the sandbox's mount tree failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount syscall failed.
    #[error("cannot mount {what} at {target}: {source}")]
    Mount {
        /// What was mounted (a source path or fs type).
        what: String,
        /// Where.
        target: PathBuf,
        /// The errno.
        source: nix::Error,
    },
    /// Opening a bind source failed.
    #[error("cannot open bind source {path}: {source}")]
    OpenSource {
        /// The host path.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
    /// Creating a mount point, file or symlink in the new root failed.
    #[error("cannot create {path} in the new root: {source}")]
    Create {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A path in the spec is not absolute or contains `..`.
    #[error("invalid sandbox path {0}: must be absolute without '..'")]
    InvalidPath(PathBuf),
    /// pivot_root / umount of the old root / chdir failed.
    #[error("cannot switch to the new root ({step}): {source}")]
    Pivot {
        /// Which step.
        step: &'static str,
        /// The errno.
        source: nix::Error,
    },
}

/// Where the new root is assembled (in the sandbox's private mount table only).
const NEW_ROOT: &str = "/tmp";

/// Host device nodes bound into `/dev`.
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// Files and directories a driver host sees read-only (those that exist on the host).
const DRIVER_HOST_FILES: [&str; 4] = [
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BindKind {
    ReadOnly,
    /// Writable, noexec (`/var`).
    Writable,
    /// Read-write, noexec, but device access allowed (the `/dev` nodes).
    Device,
}

#[derive(Debug)]
struct Bind {
    src: PathBuf,
    fd: OwnedFd,
    is_dir: bool,
    dst: PathBuf,
    kind: BindKind,
}

/// Checks that `p` is absolute and free of `..`.
pub fn check_sandbox_path(p: &Path) -> Result<(), MountError> {
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(MountError::InvalidPath(p.to_path_buf()));
    }
    Ok(())
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn mnt(
    what: impl Into<String>,
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    mount(source, target, fstype, flags, data).map_err(|source| MountError::Mount {
        what: what.into(),
        target: target.to_path_buf(),
        source,
    })
}

fn create_dir_all(p: &Path) -> Result<(), MountError> {
    fs::create_dir_all(p).map_err(|source| MountError::Create {
        path: p.to_path_buf(),
        source,
    })
}

fn create_file(p: &Path) -> Result<(), MountError> {
    if let Some(parent) = p.parent() {
        create_dir_all(parent)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(p)
        .map(drop)
        .map_err(|source| MountError::Create {
            path: p.to_path_buf(),
            source,
        })
}

fn open_source(src: &Path, dst: PathBuf, kind: BindKind) -> Result<Bind, MountError> {
    let fd = open(src, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(|source| {
        MountError::OpenSource {
            path: src.to_path_buf(),
            source,
        }
    })?;
    let is_dir = nix::sys::stat::fstat(&fd)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
        .map_err(|source| MountError::OpenSource {
            path: src.to_path_buf(),
            source,
        })?;
    Ok(Bind {
        src: src.to_path_buf(),
        fd,
        is_dir,
        dst,
        kind,
    })
}

/// Flags of the mount at `p` that a bind remount must keep (locked in a user namespace).
fn locked_flags(p: &Path) -> MsFlags {
    let mut out = MsFlags::empty();
    if let Ok(st) = statvfs(p) {
        let f = st.flags();
        for (fs_flag, ms_flag) in [
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        ] {
            if f.contains(fs_flag) {
                out |= ms_flag;
            }
        }
    }
    out
}

fn do_bind(root: &Path, b: &Bind) -> Result<(), MountError> {
    let target = inside(root, &b.dst);
    if b.is_dir {
        create_dir_all(&target)?;
    } else {
        create_file(&target)?;
    }
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", b.fd.as_raw_fd()));
    let what = b.src.display().to_string();
    // Not MS_REC: a recursive bind would carry writable submounts along.
    mnt(
        &what,
        Some(&proc_path),
        &target,
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    flags |= match b.kind {
        BindKind::ReadOnly => MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        BindKind::Writable => MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        BindKind::Device => MsFlags::MS_NOEXEC,
    };
    let mut keep = locked_flags(&target);
    if b.kind == BindKind::Device {
        // Never inherit nodev for the device binds (devtmpfs is not nodev anyway).
        keep.remove(MsFlags::MS_NODEV);
    }
    if b.kind != BindKind::ReadOnly {
        keep.remove(MsFlags::MS_RDONLY);
    }
    mnt(&what, None, &target, None, flags | keep, None)
}

/// The bind sources of a sandbox, opened with `O_PATH` (see [`open_sources`]).
#[derive(Debug)]
pub struct Sources {
    binds: Vec<Bind>,
    devices: Vec<Bind>,
}

/// Opens every bind source of `spec` with `O_PATH`. Runs in the init right after the
/// clone, *before* it switches to uid 1000: its file-system identity is still the
/// helper's (host root, unmapped in the new user namespace), so a source is reachable
/// even when the sandbox user could not search the path leading to it — the grain's
/// `/var` lives under the supervisor's 0700 state directory. Only paths the supervisor
/// put in the spec are opened; what the sandbox user can do with the *contents* is
/// still decided by their own permissions.
pub fn open_sources(spec: &WireSpec) -> Result<Sources, MountError> {
    let mut binds = Vec::new();
    if let Some(app) = &spec.app_dir {
        binds.push(open_source(app, "/app".into(), BindKind::ReadOnly)?);
    }
    if let Some(var) = &spec.var_dir {
        binds.push(open_source(var, "/var".into(), BindKind::Writable)?);
    }
    for (src, dst) in &spec.ro_binds {
        check_sandbox_path(dst)?;
        // The sandbox's own /dev and /proc are mounted over anything bound there.
        if dst.starts_with("/dev") || dst.starts_with("/proc") {
            return Err(MountError::InvalidPath(dst.clone()));
        }
        binds.push(open_source(src, dst.clone(), BindKind::ReadOnly)?);
    }
    if spec.role == Role::DriverHost {
        for f in DRIVER_HOST_FILES {
            let p = Path::new(f);
            let covered = binds.iter().any(|b| p.starts_with(&b.dst));
            if p.exists() && !covered {
                binds.push(open_source(p, p.to_path_buf(), BindKind::ReadOnly)?);
            }
        }
    }
    // Parents before children.
    binds.sort_by_key(|b| b.dst.components().count());
    let devices = DEVICES
        .iter()
        .map(|d| {
            let host = Path::new("/dev").join(d);
            open_source(&host, host.clone(), BindKind::Device)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sources { binds, devices })
}

/// Builds the sandbox's root filesystem from the opened `sources` and switches to it.
/// Runs in the init, inside the new user, pid and mount namespaces, before the app is
/// forked.
pub fn build(spec: &WireSpec, sources: Sources) -> Result<(), MountError> {
    let root = Path::new(NEW_ROOT);
    // 1. Nothing we mount may propagate back to the host.
    mnt(
        "private /",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;

    // 2. The bind sources were opened while the host tree was visible
    //    ([`open_sources`]).
    let Sources { binds, devices } = sources;

    // 3. The new root.
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mnt(
        "tmpfs (new root)",
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        base,
        Some("mode=0755,size=4m,nr_inodes=4096"),
    )?;
    // Binds under /tmp go on top of the sandbox's own /tmp (below), or it would hide them.
    let (under_tmp, binds): (Vec<Bind>, Vec<Bind>) =
        binds.into_iter().partition(|b| b.dst.starts_with("/tmp"));
    for b in &binds {
        do_bind(root, b)?;
    }

    // /dev: a small tmpfs with the device binds, symlinks and a private /dev/shm.
    let dev = root.join("dev");
    create_dir_all(&dev)?;
    mnt(
        "tmpfs (/dev)",
        Some(Path::new("tmpfs")),
        &dev,
        Some("tmpfs"),
        base | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
    )?;
    for d in &devices {
        do_bind(root, d)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let link = dev.join(name);
        symlink(target, &link).map_err(|source| MountError::Create { path: link, source })?;
    }
    let shm = dev.join("shm");
    create_dir_all(&shm)?;
    let sized = |mode: &str| format!("mode={mode},size={}", spec.tmp_size_bytes.max(4096));
    mnt(
        "tmpfs (/dev/shm)",
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        base | MsFlags::MS_NOEXEC,
        Some(&sized("1777")),
    )?;
    mnt(
        "read-only /dev",
        None,
        &dev,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | base | MsFlags::MS_NOEXEC,
        None,
    )?;

    // /tmp with a size cap.
    let tmp = root.join("tmp");
    create_dir_all(&tmp)?;
    mnt(
        "tmpfs (/tmp)",
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        base | MsFlags::MS_NOEXEC,
        Some(&sized("1777")),
    )?;
    for b in &under_tmp {
        do_bind(root, b)?;
    }

    // /proc of our own pid namespace (we are its PID 1). Must happen while the host's
    // /proc is still visible: the kernel only lets a user namespace mount proc if a fully
    // visible proc is already mounted in its mount namespace.
    let proc_dir = root.join("proc");
    create_dir_all(&proc_dir)?;
    mnt(
        "proc",
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        base | MsFlags::MS_NOEXEC,
        None,
    )?;
    for d in ["etc", "home"] {
        create_dir_all(&root.join(d))?;
    }

    // 4. Switch.
    let pivot = |step, r: nix::Result<()>| r.map_err(|source| MountError::Pivot { step, source });
    pivot("chdir new root", nix::unistd::chdir(root))?;
    pivot("pivot_root", nix::unistd::pivot_root(".", "."))?;
    pivot("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
    pivot("chdir /", nix::unistd::chdir("/"))?;
    mnt(
        "read-only /",
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | base,
        None,
    )?;
    drop(binds);
    drop(under_tmp);
    drop(devices);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths inside the sandbox must be absolute and cannot climb out of the new root.
    #[test]
    fn sandbox_paths() {
        assert!(check_sandbox_path(Path::new("/usr")).is_ok());
        assert!(check_sandbox_path(Path::new("usr")).is_err());
        assert!(check_sandbox_path(Path::new("/a/../../etc")).is_err());
        assert_eq!(
            inside(Path::new("/tmp"), Path::new("/usr/lib")),
            PathBuf::from("/tmp/usr/lib")
        );
    }
}
