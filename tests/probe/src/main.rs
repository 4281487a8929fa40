//! `capnet-probe`: a hostile program that runs *inside* a capnet sandbox and attacks its
//! walls, one JSON line per attack (the attacks and the line format are in the
//! `capnet_probe` library, which the hostile driver plugin shares).
//!
//! Modes: `attacks [--state-dir P] [--supervisor-pid N] [--host-port P]`,
//! `driver-host [--port P]`, `fork-bomb`, `mem-hog`, `cpu-hog SECONDS THREADS`, `hold`.

use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use capnet_probe::*;

fn driver_host(args: &[String]) {
    let port = args
        .windows(2)
        .find(|w| w[0] == "--port")
        .and_then(|w| w[1].parse::<u16>().ok());
    if let Some(port) = port {
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        match TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)) {
            Ok(_) => emit("control:connect_host_loopback", "succeeded", "", None),
            Err(e) => {
                let n = e.raw_os_error();
                emit("control:connect_host_loopback", "refused", e, n)
            }
        }
    }
    report_io(
        "control:read_resolv_conf",
        std::fs::read("/etc/resolv.conf"),
    );
    report_io("read_etc_shadow", std::fs::read("/etc/shadow"));
    report_io(
        "control:write_tmp_before_lockdown",
        std::fs::write("/tmp/before", b"x"),
    );
    match capnet_supervisor::sandbox::seccomp::lock_down_driver_host() {
        Ok(()) => emit("control:lock_down", "succeeded", "", None),
        Err(e) => emit("control:lock_down", "refused", e, None),
    }
    after_lockdown("/tmp/before");
    // The base profile still holds.
    syscall_attacks();
    privilege_checks();
    emit("done", "info", "", None);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let rest = args.get(2..).unwrap_or(&[]);
    match mode {
        "attacks" => attacks(rest),
        "driver-host" => driver_host(rest),
        "fork-bomb" => fork_bomb(),
        "mem-hog" => mem_hog(),
        "cpu-hog" => cpu_hog(rest),
        "hold" => loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        },
        _ => {
            eprintln!(
                "usage: capnet-probe attacks|driver-host|fork-bomb|mem-hog|cpu-hog|hold [args]"
            );
            std::process::exit(2);
        }
    }
}
