//! Control groups: per-sandbox memory, pids and CPU limits, usage accounting, and
//! teardown, for cgroup v1 (including hybrid hosts) and cgroup v2, chosen by detection.
//!
//! Mechanism: a cgroup is a directory in a cgroup filesystem; writing a pid into its
//! `cgroup.procs` moves the process (and its future children) into it, and the
//! controller files (`memory.limit_in_bytes` / `memory.max`, `pids.max`,
//! `cpu.cfs_quota_us` / `cpu.max`) limit the group as a whole.
//!
//! Threat answered: resource exhaustion. Without limits a grain can fork-bomb the host,
//! eat all memory (and have the OOM killer pick the supervisor), or monopolise the CPUs.
//! With them, the damage stays inside the grain's own budget, and the counters
//! (`oom_kill`, pids `max` events) tell the administrator why a grain died.
//!
//! Layout: capnet never touches cgroups it did not create. For each controller it takes
//! the supervisor's *own* current cgroup (from `/proc/self/cgroup`), creates a parent
//! directory (`capnet` by default) beneath it and one directory per sandbox beneath
//! that, e.g. `/sys/fs/cgroup/memory/<own path>/capnet/grain-<id>`. The parent may be
//! nested (`capnet/test-7`), so that several supervisors on one host (tests, a staging
//! instance) share one `capnet` directory; each level is created if missing, and at
//! shutdown removed again if empty.
//!
//! The files are written directly rather than through `cgroups-rs`: on a hybrid host the
//! work is "mkdir, write four files, read six", the crate's hierarchy detection does not
//! know about nesting under our own cgroup, and direct writes make v1 and v2 one small
//! table of file names.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading `/proc/self/cgroup` or `/proc/self/mountinfo` failed.
    #[error("cannot read {path}: {source}")]
    ReadProc {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A controller capnet needs is not mounted / not available.
    #[error("cgroup controller {controller} is not available ({detail})")]
    MissingController {
        /// memory, pids, cpu or cpuacct.
        controller: &'static str,
        /// What was looked for.
        detail: String,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The error.
        source: io::Error,
    },
    /// Reading or parsing a control file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Removing a cgroup directory failed (or processes did not leave it in time).
    #[error("cannot remove cgroup {path}: {source}")]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The sandbox name is not a single safe path component.
    #[error(
        "invalid cgroup name {0:?}: expected [A-Za-z0-9._-]{{1,128}} (a parent may have up \
         to 4 such components separated by '/')"
    )]
    InvalidName(String),
}

/// cgroup version in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (also hybrid hosts).
    V1,
    /// The unified hierarchy with memory, pids and cpu controllers available.
    V2,
}

/// Limits applied to one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Memory limit in bytes (swap limited to the same total where the kernel supports it).
    pub memory_bytes: u64,
    /// Maximum number of tasks (processes and threads).
    pub pids: u64,
    /// CPU quota in thousandths of a CPU (1000 = one full core); 0 = unlimited.
    pub cpu_millis: u64,
}

/// A snapshot of a sandbox's resource usage and limit events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupStats {
    /// Current memory usage in bytes.
    pub memory_bytes: u64,
    /// Memory limit in bytes (`u64::MAX` when unlimited).
    pub memory_limit: u64,
    /// Current number of tasks.
    pub pids: u64,
    /// Task limit (`u64::MAX` when unlimited).
    pub pids_limit: u64,
    /// Total CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Number of processes killed by the OOM killer inside this cgroup.
    pub oom_kills: u64,
    /// Number of times a fork/clone failed because of the pids limit.
    pub pids_max_hits: u64,
}

/// Where the parent (`capnet`) directories live, one per hierarchy.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    version: CgroupVersion,
    /// How many path components the parent name has (`capnet/test-7`: 2).
    levels: usize,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

/// One sandbox's cgroup(s). On v1 several directories (one per hierarchy), on v2 one.
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    version: CgroupVersion,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
    cpuacct: PathBuf,
}

fn read_proc(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::ReadProc {
        path: path.into(),
        source,
    })
}

/// A cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// Root of the mount within the hierarchy (field 4).
    pub root: String,
    /// Mount point.
    pub mount_point: PathBuf,
    /// `cgroup` or `cgroup2`.
    pub fstype: String,
    /// Super options (controllers for v1).
    pub super_options: Vec<String>,
}

/// Parses the cgroup and cgroup2 mounts of a mountinfo file.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        if r[0] != "cgroup" && r[0] != "cgroup2" {
            continue;
        }
        out.push(CgroupMount {
            root: unescape_mountinfo(l[3]),
            mount_point: PathBuf::from(unescape_mountinfo(l[4])),
            fstype: r[0].to_string(),
            super_options: r[2].split(',').map(str::to_string).collect(),
        });
    }
    out
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Parses `/proc/self/cgroup` into (controllers, path) pairs; v2 has an empty list.
pub fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            let ctrls = if ctrls.is_empty() {
                Vec::new()
            } else {
                ctrls.split(',').map(str::to_string).collect()
            };
            Some((ctrls, path.to_string()))
        })
        .collect()
}

fn join_rel(base: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

/// Where the calling process's own cgroup of `controller` is, on v1.
fn v1_own_dir(
    mounts: &[CgroupMount],
    own: &[(Vec<String>, String)],
    controller: &'static str,
) -> Result<PathBuf, CgroupError> {
    let mount = mounts
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == controller))
        .ok_or_else(|| CgroupError::MissingController {
            controller,
            detail: "no cgroup v1 mount with this controller in /proc/self/mountinfo".into(),
        })?;
    let path = own
        .iter()
        .find(|(c, _)| c.iter().any(|c| c == controller))
        .map(|(_, p)| p.as_str())
        .ok_or_else(|| CgroupError::MissingController {
            controller,
            detail: "controller not listed in /proc/self/cgroup".into(),
        })?;
    // The mount may show only a subtree of the hierarchy (its root field).
    let rel = path.strip_prefix(mount.root.as_str()).unwrap_or(path);
    Ok(join_rel(&mount.mount_point, rel))
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_err(path: &Path, what: &str) -> CgroupError {
    CgroupError::Read {
        path: path.to_path_buf(),
        source: io::Error::new(ErrorKind::InvalidData, format!("cannot parse {what}")),
    }
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    let t = text.trim();
    if t == "max" {
        return Ok(u64::MAX);
    }
    t.parse().map_err(|_| parse_err(path, t))
}

/// Reads `key value` lines (memory.events, pids.events, cpu.stat, memory.oom_control).
fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| parse_err(path, key))
}

/// The components of a cgroup parent name (`capnet`, `capnet/staging`): 1 to 4 names of
/// `[A-Za-z0-9._-]`, none `.` or `..`.
pub fn parent_components(parent_name: &str) -> Result<Vec<&str>, CgroupError> {
    let parts: Vec<&str> = parent_name.split('/').collect();
    if parts.len() > 4 || parts.iter().any(|p| validate_name(p).is_err()) {
        return Err(CgroupError::InvalidName(parent_name.to_string()));
    }
    Ok(parts)
}

impl CgroupRoot {
    /// Detects the cgroup version and the supervisor's own cgroups, and creates
    /// `parent_name` (one or more `/`-separated levels) beneath each of them.
    pub fn detect(parent_name: &str) -> Result<Self, CgroupError> {
        let levels = parent_components(parent_name)?.len();
        let mounts = parse_mountinfo(&read_proc("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&read_proc("/proc/self/cgroup")?);
        let unified_root = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2" && m.mount_point == Path::new("/sys/fs/cgroup"));
        let root = if let Some(m) = unified_root {
            let own_path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.as_str())
                .unwrap_or("/");
            let rel = own_path.strip_prefix(m.root.as_str()).unwrap_or(own_path);
            let own_dir = join_rel(&m.mount_point, rel);
            let controllers = read(&own_dir.join("cgroup.controllers"))?;
            for c in ["memory", "pids", "cpu"] {
                if !controllers.split_whitespace().any(|x| x == c) {
                    return Err(CgroupError::MissingController {
                        controller: match c {
                            "memory" => "memory",
                            "pids" => "pids",
                            _ => "cpu",
                        },
                        detail: format!("not in {}", own_dir.join("cgroup.controllers").display()),
                    });
                }
            }
            let parent = own_dir.join(parent_name);
            Self::v2_at(&own_dir, &parent, levels)?
        } else {
            let dir = |c| -> Result<PathBuf, CgroupError> {
                Ok(v1_own_dir(&mounts, &own, c)?.join(parent_name))
            };
            CgroupRoot {
                version: CgroupVersion::V1,
                levels,
                memory: dir("memory")?,
                pids: dir("pids")?,
                cpu: dir("cpu")?,
                cpuacct: dir("cpuacct")?,
            }
        };
        for d in root.dirs() {
            root.create_levels(&d)?;
        }
        tracing::debug!(version = ?root.version, memory = %root.memory.display(), "cgroup root ready");
        Ok(root)
    }

    fn v2_at(own_dir: &Path, parent: &Path, levels: usize) -> Result<Self, CgroupError> {
        // Controllers must be enabled in our own cgroup's subtree_control for the capnet
        // parent to get them. (This fails with EBUSY if our own cgroup has processes and
        // is not the root: run capnetd in a delegated cgroup, as systemd does with
        // Delegate=yes.)
        let sc = own_dir.join("cgroup.subtree_control");
        let current = read(&sc)?;
        let missing: Vec<&str> = ["memory", "pids", "cpu"]
            .into_iter()
            .filter(|c| !current.split_whitespace().any(|x| x == *c))
            .collect();
        if !missing.is_empty() {
            let value = missing
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            write(&sc, &value)?;
        }
        Ok(CgroupRoot {
            version: CgroupVersion::V2,
            levels,
            memory: parent.to_path_buf(),
            pids: parent.to_path_buf(),
            cpu: parent.to_path_buf(),
            cpuacct: parent.to_path_buf(),
        })
    }

    /// The cgroup version in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The distinct parent directories (one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        dedup(&[&self.memory, &self.pids, &self.cpu, &self.cpuacct])
    }

    /// Creates the levels of parent directory `dir`, outermost first; on v2 each passes
    /// the controllers down. Another supervisor sharing an outer level may remove it, empty,
    /// at its shutdown between our creating it and creating the next level inside: then
    /// the creation starts over.
    fn create_levels(&self, dir: &Path) -> Result<(), CgroupError> {
        let mut attempts = 0;
        'again: loop {
            for level in self.levels_of(dir).into_iter().rev() {
                let made = mkdir(level).and_then(|()| match self.version {
                    CgroupVersion::V2 => {
                        write(&level.join("cgroup.subtree_control"), "+memory +pids +cpu")
                    }
                    CgroupVersion::V1 => Ok(()),
                });
                match made {
                    Err(CgroupError::Create { source, .. } | CgroupError::Write { source, .. })
                        if source.kind() == ErrorKind::NotFound && attempts < 10 =>
                    {
                        attempts += 1;
                        continue 'again;
                    }
                    r => r?,
                }
            }
            return Ok(());
        }
    }

    /// The directories capnet created for parent directory `dir`: `dir` itself and, for a
    /// nested parent name, its ancestors up to (not including) the supervisor's own
    /// cgroup; innermost first.
    fn levels_of<'a>(&self, dir: &'a Path) -> Vec<&'a Path> {
        dir.ancestors().take(self.levels).collect()
    }

    /// Creates the cgroup of sandbox `name` and applies `limits`.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<SandboxCgroup, CgroupError> {
        validate_name(name)?;
        let cg = SandboxCgroup {
            version: self.version,
            memory: self.memory.join(name),
            pids: self.pids.join(name),
            cpu: self.cpu.join(name),
            cpuacct: self.cpuacct.join(name),
        };
        for d in cg.dirs() {
            let mut created = fs::create_dir(&d);
            if matches!(&created, Err(e) if e.kind() == ErrorKind::AlreadyExists) {
                // A leftover of a supervisor that was killed (its sandboxes died with it,
                // but nobody removed their cgroups). rmdir succeeds only on a cgroup
                // without tasks or children, so a live sandbox is never disturbed.
                if fs::remove_dir(&d).is_ok() {
                    tracing::info!(path = %d.display(), "removed a stale sandbox cgroup");
                    created = fs::create_dir(&d);
                }
            }
            if let Err(source) = created {
                // Undo what we created so far.
                let _ = cg.remove_dirs();
                return Err(CgroupError::Create { path: d, source });
            }
        }
        if let Err(e) = cg.apply(limits) {
            let _ = cg.remove_dirs();
            return Err(e);
        }
        Ok(cg)
    }

    /// Removes the empty sandbox cgroups a previous supervisor with the same parent left
    /// behind (after a `kill -9`, its sandboxes die but their directories stay). A cgroup
    /// that still has tasks is left alone (rmdir fails with EBUSY): it may belong to a
    /// live supervisor. Returns how many were removed.
    pub fn sweep_stale(&self) -> usize {
        let mut removed = 0;
        for parent in self.dirs() {
            let Ok(entries) = fs::read_dir(&parent) else {
                continue;
            };
            for e in entries.flatten() {
                let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
                let name = e.file_name();
                let name = name.to_string_lossy();
                let ours = name.starts_with("grain-") || name.starts_with("driver-");
                if is_dir && ours && fs::remove_dir(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed stale sandbox cgroups");
        }
        removed
    }

    /// Removes the parent directories if they are empty, and for a nested parent name
    /// each enclosing level that is left empty (best effort: a level another supervisor
    /// still uses stays).
    pub fn remove_if_empty(&self) {
        for d in self.dirs() {
            for level in self.levels_of(&d) {
                if fs::remove_dir(level).is_err() {
                    break;
                }
            }
        }
    }
}

fn dedup(paths: &[&PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for p in paths {
        if !out.iter().any(|x| x == *p) {
            out.push((*p).clone());
        }
    }
    out
}

impl SandboxCgroup {
    /// The distinct directories of this sandbox (one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        dedup(&[&self.memory, &self.pids, &self.cpu, &self.cpuacct])
    }

    /// The `cgroup.procs` files a process writes its pid into to join the sandbox.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The memory cgroup directory (the only one on v2).
    pub fn memory_dir(&self) -> &Path {
        &self.memory
    }

    fn apply(&self, l: &CgroupLimits) -> Result<(), CgroupError> {
        let mem = l.memory_bytes.to_string();
        match self.version {
            CgroupVersion::V1 => {
                write(&self.memory.join("memory.limit_in_bytes"), &mem)?;
                let memsw = self.memory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &mem)?;
                }
                write(&self.pids.join("pids.max"), &l.pids.to_string())?;
                if l.cpu_millis > 0 {
                    write(&self.cpu.join("cpu.cfs_period_us"), "100000")?;
                    write(
                        &self.cpu.join("cpu.cfs_quota_us"),
                        &l.cpu_millis.saturating_mul(100).to_string(),
                    )?;
                }
            }
            CgroupVersion::V2 => {
                write(&self.memory.join("memory.max"), &mem)?;
                let swap = self.memory.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&self.pids.join("pids.max"), &l.pids.to_string())?;
                if l.cpu_millis > 0 {
                    write(
                        &self.cpu.join("cpu.max"),
                        &format!("{} 100000", l.cpu_millis.saturating_mul(100)),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Reads usage, limits and limit events.
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        Ok(match self.version {
            CgroupVersion::V1 => CgroupStats {
                memory_bytes: read_u64(&self.memory.join("memory.usage_in_bytes"))?,
                memory_limit: read_u64(&self.memory.join("memory.limit_in_bytes"))?,
                pids: read_u64(&self.pids.join("pids.current"))?,
                pids_limit: read_u64(&self.pids.join("pids.max"))?,
                cpu_usage_ns: read_u64(&self.cpuacct.join("cpuacct.usage"))?,
                oom_kills: read_keyed(&self.memory.join("memory.oom_control"), "oom_kill")?,
                pids_max_hits: read_keyed(&self.pids.join("pids.events"), "max")?,
            },
            CgroupVersion::V2 => CgroupStats {
                memory_bytes: read_u64(&self.memory.join("memory.current"))?,
                memory_limit: read_u64(&self.memory.join("memory.max"))?,
                pids: read_u64(&self.pids.join("pids.current"))?,
                pids_limit: read_u64(&self.pids.join("pids.max"))?,
                cpu_usage_ns: read_keyed(&self.cpu.join("cpu.stat"), "usage_usec")?
                    .saturating_mul(1000),
                oom_kills: read_keyed(&self.memory.join("memory.events"), "oom_kill")?,
                pids_max_hits: read_keyed(&self.pids.join("pids.events"), "max")?,
            },
        })
    }

    /// The pids currently in any of this sandbox's cgroups.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut out = Vec::new();
        for f in self.procs_files() {
            match fs::read_to_string(&f) {
                Ok(text) => out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Read { path: f, source }),
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// SIGKILLs every process in the sandbox until the cgroups are empty (`cgroup.kill`
    /// on v2 when available, else repeated scans of `cgroup.procs`, which also catches
    /// processes forked during a scan). Gives up after `timeout`.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        if self.version == CgroupVersion::V2 {
            let kill = self.memory.join("cgroup.kill");
            if kill.exists() {
                write(&kill, "1")?;
            }
        }
        let mut backoff = Duration::from_micros(50);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Remove {
                    path: self.memory.clone(),
                    source: io::Error::new(ErrorKind::TimedOut, "processes did not leave"),
                });
            }
            // Killed tasks leave the cgroup asynchronously (after exit); v1 has no event
            // for "empty", so poll with a short, growing back-off.
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
    }

    fn remove_dirs(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for d in self.dirs() {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    first_err.get_or_insert(CgroupError::Remove { path: d, source });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills everything inside and removes the directories. Idempotent.
    pub fn destroy(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        self.kill_all(timeout)?;
        // rmdir can briefly fail with EBUSY while exiting tasks are still being detached.
        let mut backoff = Duration::from_micros(50);
        loop {
            match self.remove_dirs() {
                Ok(()) => return Ok(()),
                Err(CgroupError::Remove { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    /// On a hybrid host the per-controller v1 directories are found beneath the
    /// supervisor's own cgroup of each controller (never beside or above it).
    #[test]
    fn hybrid_v1_own_dirs() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        let own = parse_proc_cgroup(HYBRID_CGROUP);
        assert_eq!(
            v1_own_dir(&mounts, &own, "memory").unwrap(),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(
            v1_own_dir(&mounts, &own, "pids").unwrap(),
            PathBuf::from("/sys/fs/cgroup/pids")
        );
        assert_eq!(
            v1_own_dir(&mounts, &own, "cpuacct").unwrap(),
            PathBuf::from("/sys/fs/cgroup/cpuacct")
        );
    }

    /// A co-mounted `cpu,cpuacct` hierarchy yields the same directory for both.
    #[test]
    fn comounted_cpu_cpuacct() {
        let mounts = parse_mountinfo(
            "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        );
        let own = parse_proc_cgroup("3:cpu,cpuacct:/a/b\n");
        let cpu = v1_own_dir(&mounts, &own, "cpu").unwrap();
        assert_eq!(cpu, v1_own_dir(&mounts, &own, "cpuacct").unwrap());
        assert_eq!(cpu, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/a/b"));
    }

    /// Sandbox names cannot escape the parent directory.
    #[test]
    fn names_are_single_components() {
        for bad in ["", "..", "a/b", "../x", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        validate_name("grain-abc_1.2").unwrap();
    }

    /// Stats are read from the v1 and v2 file sets (fake trees with the kernel's formats).
    #[test]
    fn stats_from_fake_trees() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (f, v) in [
            ("memory.usage_in_bytes", "4096\n"),
            ("memory.limit_in_bytes", "1048576\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            ("cpuacct.usage", "123\n"),
            (
                "memory.oom_control",
                "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            ),
            ("pids.events", "max 5\n"),
        ] {
            fs::write(d.join(f), v).unwrap();
        }
        let cg = SandboxCgroup {
            version: CgroupVersion::V1,
            memory: d.into(),
            pids: d.into(),
            cpu: d.into(),
            cpuacct: d.into(),
        };
        let s = cg.stats().unwrap();
        assert_eq!(s.memory_bytes, 4096);
        assert_eq!(s.pids_limit, u64::MAX);
        assert_eq!(s.oom_kills, 2);
        assert_eq!(s.pids_max_hits, 5);
        assert_eq!(s.cpu_usage_ns, 123);

        for (f, v) in [
            ("memory.current", "10\n"),
            ("memory.max", "20\n"),
            ("cpu.stat", "usage_usec 7\nuser_usec 5\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
        ] {
            fs::write(d.join(f), v).unwrap();
        }
        let cg = SandboxCgroup {
            version: CgroupVersion::V2,
            ..cg
        };
        let s = cg.stats().unwrap();
        assert_eq!((s.memory_bytes, s.memory_limit), (10, 20));
        assert_eq!(s.cpu_usage_ns, 7000);
        assert_eq!(s.oom_kills, 1);
    }
}
