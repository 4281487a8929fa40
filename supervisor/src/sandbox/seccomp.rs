//! seccomp-bpf system-call filters, built with libseccomp.
//!
//! Mechanism: a classic-BPF program attached with `seccomp(SECCOMP_SET_MODE_FILTER)` sees
//! every system call (number, architecture, six raw arguments) before the kernel runs it
//! and decides: allow, fail with an errno, or kill the process. Filters are inherited
//! across fork and exec and can only be stacked, never removed.
//!
//! Threat answered: the kernel's attack surface. Namespaces and dropped capabilities
//! already make most of the calls below fail, but many kernel exploits start from calls
//! that an unprivileged process may make (user namespaces, io_uring, userfaultfd, bpf,
//! keyctl, TIOCSTI, exotic socket families). The filter removes them outright.
//!
//! The profile is a deny-list with a default of *allow* (so any language runtime works),
//! plus:
//! - only the native x86_64 ABI is in the filter; libseccomp sends every call made
//!   through another ABI (i386 via `int 0x80`, x32 via `__X32_SYSCALL_BIT`) to the
//!   bad-arch action, which is `KILL_PROCESS`. A deny-list keyed on x86_64 numbers would
//!   otherwise be bypassed by the same call under a different number.
//! - see `docs/sandbox.md` for the full rule list and the reason for each rule.
//!
//! The driver-host profile stacks a second filter ([`lock_down_driver_host`]) once the
//! plugin is loaded: no exec, no open for writing, no file creation or renaming.

use libseccomp::{ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext};
use libseccomp::{ScmpSyscall, error::SeccompError};

/// Why building or loading a seccomp filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompFilterError {
    /// libseccomp does not know a syscall name (should not happen on x86_64).
    #[error("unknown system call {name}: {source}")]
    UnknownSyscall {
        /// The syscall name.
        name: &'static str,
        /// libseccomp's error.
        source: SeccompError,
    },
    /// libseccomp refused a rule.
    #[error("cannot add seccomp rule for {name}: {source}")]
    AddRule {
        /// The syscall name.
        name: &'static str,
        /// libseccomp's error.
        source: SeccompError,
    },
    /// Creating the filter context or setting an attribute failed.
    #[error("cannot set up seccomp filter context: {0}")]
    Context(SeccompError),
    /// Setting `no_new_privs` failed.
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(nix::Error),
    /// The kernel refused the filter.
    #[error("cannot load seccomp filter: {0}")]
    Load(SeccompError),
}

/// Which filter to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The base profile: every sandboxed process (grain apps, driver hosts, the init).
    Base,
    /// The additional filter a driver host stacks after it loaded its plugin.
    DriverHostLocked,
}

/// `SOCK_PACKET` (obsolete packet socket type; the libc constant is deprecated).
const SOCK_PACKET: u64 = 10;

const EPERM: ScmpAction = ScmpAction::Errno(libc::EPERM);

/// `CLONE_NEW*` flags that `clone()` may not carry. (`CLONE_NEWTIME` shares its bit with
/// the exit-signal byte of `clone()` and exists only for `clone3`/`unshare`, both denied.)
pub const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// System calls refused with `EPERM` unconditionally in every sandbox.
pub const DENIED_SYSCALLS: &[&str] = &[
    // Debugging / reading other processes' memory.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    // Kernel keyring: not namespaced, long CVE history.
    "keyctl",
    "add_key",
    "request_key",
    // eBPF, perf, userfaultfd, io_uring: large, exploit-prone kernel surfaces.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Mount table changes (old and new mount API).
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "mount_setattr",
    // New namespaces or joining others.
    "unshare",
    "setns",
    // File handles bypass path-based confinement (the "shocker" escape).
    "open_by_handle_at",
    "name_to_handle_at",
    // Kernel code loading, reboot, global clocks and system state.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "vhangup",
    "iopl",
    "ioperm",
    "modify_ldt",
    "uselib",
    "nfsservctl",
    "_sysctl",
    "sysfs",
    // NUMA policy calls: can move other processes' pages; no use in a sandbox.
    "mbind",
    "migrate_pages",
    "move_pages",
    "set_mempolicy",
    // fanotify watches whole mounts; not needed and historically buggy.
    "fanotify_init",
];

/// Extra calls refused once a driver host locked itself down.
const DRIVER_HOST_DENIED: &[&str] = &[
    "execve",
    "execveat",
    "creat",
    "mknod",
    "mknodat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "truncate",
    "chmod",
    "fchmod",
    "fchmodat",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "memfd_create",
];

fn syscall(name: &'static str) -> Result<ScmpSyscall, SeccompFilterError> {
    ScmpSyscall::from_name(name)
        .map_err(|source| SeccompFilterError::UnknownSyscall { name, source })
}

fn rule(
    ctx: &mut ScmpFilterContext,
    action: ScmpAction,
    name: &'static str,
    cmps: &[ScmpArgCompare],
) -> Result<(), SeccompFilterError> {
    let sc = syscall(name)?;
    ctx.add_rule_conditional(action, sc, cmps)
        .map_err(|source| SeccompFilterError::AddRule { name, source })?;
    Ok(())
}

fn masked_eq(arg: u32, mask: u64, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(mask), value)
}

fn eq(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::Equal, value)
}

fn new_context() -> Result<ScmpFilterContext, SeccompFilterError> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(SeccompFilterError::Context)?;
    // Only the native arch: make it explicit, so x32 and i386 hit the bad-arch action.
    if !ctx
        .is_arch_present(ScmpArch::X8664)
        .map_err(SeccompFilterError::Context)?
    {
        ctx.add_arch(ScmpArch::X8664)
            .map_err(SeccompFilterError::Context)?;
    }
    ctx.set_act_badarch(ScmpAction::KillProcess)
        .map_err(SeccompFilterError::Context)?;
    // We set no_new_privs ourselves (and check it); libseccomp must not hide a failure.
    ctx.set_ctl_nnp(true).map_err(SeccompFilterError::Context)?;
    Ok(ctx)
}

fn add_base_rules(ctx: &mut ScmpFilterContext) -> Result<(), SeccompFilterError> {
    for &name in DENIED_SYSCALLS {
        rule(ctx, EPERM, name, &[])?;
    }
    // clone() with any namespace flag (one rule per flag: libseccomp compares an
    // argument once per rule, and "any of these bits" is a disjunction).
    for &flag in &CLONE_NAMESPACE_FLAGS {
        rule(ctx, EPERM, "clone", &[masked_eq(0, flag, flag)])?;
    }
    // clone3 passes its flags in memory, which seccomp cannot inspect: ENOSYS makes
    // glibc (>= 2.34) fall back to clone(), which is filtered above.
    rule(ctx, ScmpAction::Errno(libc::ENOSYS), "clone3", &[])?;
    // TIOCSTI / TIOCLINUX: the kernel compares the request as a 32-bit int, so compare only
    // the low 32 bits — a request with high bits set is the same ioctl to the kernel.
    for req in [libc::TIOCSTI, libc::TIOCLINUX] {
        rule(ctx, EPERM, "ioctl", &[masked_eq(1, 0xffff_ffff, req)])?;
    }
    // socket(): only AF_UNIX (1), AF_INET (2), AF_INET6 (10). EAFNOSUPPORT lets libc
    // code that probes for netlink (e.g. getaddrinfo's AI_ADDRCONFIG) fall back cleanly.
    let eaf = ScmpAction::Errno(libc::EAFNOSUPPORT);
    for family in [0u64, 3, 4, 5, 6, 7, 8, 9] {
        rule(ctx, eaf, "socket", &[eq(0, family)])?;
    }
    rule(
        ctx,
        eaf,
        "socket",
        &[ScmpArgCompare::new(0, ScmpCompareOp::Greater, 10)],
    )?;
    // Raw and packet sockets in the allowed families (the type's low 4 bits).
    for family in [libc::AF_INET as u64, libc::AF_INET6 as u64] {
        for ty in [libc::SOCK_RAW as u64, SOCK_PACKET] {
            rule(
                ctx,
                EPERM,
                "socket",
                &[eq(0, family), masked_eq(1, 0xf, ty)],
            )?;
        }
    }
    // personality(): allow only PER_LINUX (0) and the query 0xffffffff. A 32-bit value is
    // neither all-zeros nor all-ones exactly when some bit i is 1 and bit i+1 (cyclic) is
    // 0, which a single masked comparison per i expresses: 32 rules, no gaps.
    for i in 0..32u32 {
        let bit = 1u64 << i;
        let next = 1u64 << ((i + 1) % 32);
        rule(ctx, EPERM, "personality", &[masked_eq(0, bit | next, bit)])?;
    }
    Ok(())
}

fn add_driver_host_rules(ctx: &mut ScmpFilterContext) -> Result<(), SeccompFilterError> {
    for &name in DRIVER_HOST_DENIED {
        rule(ctx, EPERM, name, &[])?;
    }
    // open/openat: anything but O_RDONLY, and O_CREAT / O_TRUNC / O_APPEND even with it.
    let accmode = libc::O_ACCMODE as u64;
    for (name, arg) in [("open", 1u32), ("openat", 2u32)] {
        for mode in [libc::O_WRONLY as u64, libc::O_RDWR as u64, accmode] {
            rule(ctx, EPERM, name, &[masked_eq(arg, accmode, mode)])?;
        }
        for flag in [libc::O_CREAT, libc::O_TRUNC, libc::O_APPEND] {
            let flag = flag as u64;
            rule(ctx, EPERM, name, &[masked_eq(arg, flag, flag)])?;
        }
    }
    // openat2 passes flags in memory; ENOSYS makes callers fall back to openat.
    rule(ctx, ScmpAction::Errno(libc::ENOSYS), "openat2", &[])?;
    Ok(())
}

/// Builds (but does not load) the filter for `profile`.
pub fn build(profile: Profile) -> Result<ScmpFilterContext, SeccompFilterError> {
    let mut ctx = new_context()?;
    match profile {
        Profile::Base => add_base_rules(&mut ctx)?,
        Profile::DriverHostLocked => add_driver_host_rules(&mut ctx)?,
    }
    Ok(ctx)
}

/// Loads the base profile into the calling process (all threads: TSYNC).
/// The caller must have set `no_new_privs` (or hold `CAP_SYS_ADMIN`).
pub fn load_base() -> Result<(), SeccompFilterError> {
    load(Profile::Base)
}

fn load(profile: Profile) -> Result<(), SeccompFilterError> {
    let mut ctx = build(profile)?;
    ctx.set_ctl_tsync(true)
        .map_err(SeccompFilterError::Context)?;
    ctx.load().map_err(SeccompFilterError::Load)
}

/// Called by the driver host *after* it loaded its plugin: stacks a filter that forbids
/// `execve`/`execveat`, opening files for writing (or creating/truncating them),
/// `openat2` (ENOSYS), device nodes, links, renames, unlinks, directory changes,
/// permission/ownership changes and `memfd_create`, for every thread of the process.
/// It cannot be undone.
pub fn lock_down_driver_host() -> Result<(), SeccompFilterError> {
    nix::sys::prctl::set_no_new_privs().map_err(SeccompFilterError::NoNewPrivs)?;
    load(Profile::DriverHostLocked)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both profiles compile with the system libseccomp (every syscall name is known and
    /// every rule is accepted), so a typo cannot disable the filter at run time.
    #[test]
    fn profiles_build() {
        build(Profile::Base).unwrap();
        build(Profile::DriverHostLocked).unwrap();
    }

    /// The personality rule family refuses exactly the values other than 0 and !0.
    #[test]
    fn personality_cover_is_exact() {
        let refused = |x: u32| {
            (0..32u32).any(|i| {
                let bit = 1u32 << i;
                let next = 1u32 << ((i + 1) % 32);
                x & (bit | next) == bit
            })
        };
        assert!(!refused(0));
        assert!(!refused(u32::MAX));
        for x in [
            1u32,
            8,
            0x0040000,
            0x0400000,
            0xffff_fffe,
            0x8000_0000,
            0x7fff_ffff,
        ] {
            assert!(refused(x), "{x:#x} must be refused");
        }
    }
}
