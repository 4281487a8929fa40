//! Shared helpers for the privileged sandbox tests.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::io::{Read, Seek};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use capnet_supervisor::sandbox::{Limits, Program, Role, SandboxSpec, Spawner};

/// The helper binary of this package.
pub fn helper_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_capnet-sandbox"))
}

/// A spawner with its own cgroup parent, so tests running in parallel never touch each
/// other's sandboxes.
pub fn spawner(name: &str) -> Spawner {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox tests need root (they create namespaces and cgroups)"
    );
    Spawner::new(
        &helper_path(),
        &format!("capnet/test-{name}-{}", std::process::id()),
    )
    .expect("create spawner")
}

/// `target/<profile>/<name>`: a binary of another workspace package.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p capnet-probe`",
        p.display()
    );
    p
}

/// A directory holding a copy of the probe, to be mounted at /app.
pub fn probe_app_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        workspace_bin("capnet-probe"),
        dir.path().join("capnet-probe"),
    )
    .expect("copy probe");
    // The app tree must be readable by the unprivileged sandbox user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

static NEXT_UID: AtomicU32 = AtomicU32::new(0);

/// A fresh unprivileged host uid for each sandbox of this test process.
pub fn host_id() -> u32 {
    200_000 + (std::process::id() % 1000) * 1000 + NEXT_UID.fetch_add(1, Ordering::Relaxed) % 1000
}

/// A log file the test can read back after the sandbox ended.
pub struct Log(pub std::fs::File);

impl Log {
    pub fn new() -> (Log, OwnedFd) {
        let f = tempfile::tempfile().expect("tempfile");
        let fd = OwnedFd::from(f.try_clone().expect("dup"));
        (Log(f), fd)
    }
    pub fn read(&mut self) -> String {
        let mut s = String::new();
        self.0.rewind().unwrap();
        self.0.read_to_string(&mut s).unwrap();
        s
    }
}

/// A grain spec running `program args` with the host's /usr, /lib, /lib64, /bin bound
/// read-only, fd 3 one end of a socketpair (the other end is returned).
pub fn grain_spec(id: &str, program: &str, args: &[&str]) -> (SandboxSpec, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let uid = host_id();
    let spec = SandboxSpec {
        id: id.to_string(),
        role: Role::Grain,
        program: Program::Path(program.into()),
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        app_dir: None,
        var_dir: None,
        ro_binds: SandboxSpec::system_binds(),
        tmp_size_bytes: 16 << 20,
        limits: Limits {
            memory_bytes: 128 << 20,
            pids: 64,
            cpu_millis: 1000,
            nofile: 256,
            fsize_bytes: 64 << 20,
        },
        host_uid: uid,
        host_gid: uid,
        rpc_fd: OwnedFd::from(theirs),
        extra_fds: Vec::new(),
        log_fd: None,
        ambient_caps: Vec::new(),
    };
    (spec, ours)
}

pub use capnet_probe::expect::{
    assert_grain_walls, assert_lockdown_walls, assert_only_fds_0_to_3, assert_privileges_dropped,
    assert_syscall_walls, parse_probe,
};

/// A grain running the probe from /app with `args`; returns spec, rpc end, log, app dir.
pub fn probe_grain(id: &str, args: &[&str]) -> (SandboxSpec, UnixStream, Log, tempfile::TempDir) {
    let app = probe_app_dir();
    let (mut spec, rpc) = grain_spec(id, "/app/capnet-probe", args);
    spec.app_dir = Some(app.path().to_path_buf());
    let (log, fd) = Log::new();
    spec.log_fd = Some(fd);
    (spec, rpc, log, app)
}
