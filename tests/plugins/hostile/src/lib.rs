//! A hostile driver plugin for the driver-host sandbox tests. When the supervisor calls
//! `Driver.start` — after the host has loaded the plugin and locked itself down — it
//! runs the relevant part of the hostile corpus (`capnet_probe`) from inside the driver
//! host and prints one JSON line per attack to stdout, which the supervisor writes to
//! `<state_dir>/drivers/NAME.log`. Then it serves plain TCP like the default driver.
//!
//! Options: `state_dir` (the supervisor's state directory, which must be invisible),
//! `supervisor_pid` (a host process that must not be signalable), `plugin_path` (the
//! plugin's own file on the host, which must not be re-openable), `host_port` (a
//! listener on the host's loopback, which a driver host may reach: it lives in the host
//! network namespace).

use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

use capnet_driver_api::{Driver, DriverError, DriverHost, Manifest, Privileges, Provided};
use capnet_probe as probe;

/// Options.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The supervisor's state directory.
    #[serde(default)]
    state_dir: Option<String>,
    /// A host pid to try to signal.
    #[serde(default)]
    supervisor_pid: Option<i32>,
    /// This plugin's file on the host.
    #[serde(default)]
    plugin_path: Option<String>,
    /// A port listening on the host's 127.0.0.1.
    #[serde(default)]
    host_port: Option<u16>,
}

/// The hostile driver.
pub struct Hostile;

fn attack(o: &Options) {
    probe::emit("info:stage", "info", "driver host, after plugin load", None);
    probe::privilege_checks();
    probe::syscall_attacks();
    // Host files: invisible (ENOENT), whatever the path.
    probe::report_io("read_etc_shadow", std::fs::read("/etc/shadow"));
    probe::report_io("list_root_home", std::fs::read_dir("/root"));
    probe::report_io("read_sys", std::fs::read_dir("/sys/fs/cgroup"));
    if let Some(d) = &o.state_dir {
        probe::report_io("list_supervisor_state_dir", std::fs::read_dir(d));
    }
    if let Some(p) = &o.plugin_path {
        probe::report_io("open_plugin_path", std::fs::File::open(p));
    }
    // The sealed memfd the plugin was loaded from is closed before the plugin runs: no
    // open fd of the host refers to it (or to any file it could write).
    let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    probe::emit(
        "reach_plugin_memfd",
        if fds.iter().any(|t| t.contains("capnet-plugin")) {
            "succeeded"
        } else {
            "refused"
        },
        format!("open fds: {fds:?}"),
        None,
    );
    probe::report_io(
        "control:read_resolv_conf",
        std::fs::read("/etc/resolv.conf"),
    );
    probe::process_attacks(o.supervisor_pid);
    if let Some(port) = o.host_port {
        let addr = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        probe::report_io(
            "control:connect_host_loopback",
            TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2)),
        );
    }
    // Writes anywhere, exec, memfds: refused by the lock-down (EPERM), before the
    // read-only mounts are even consulted.
    probe::report_io("write_root", std::fs::write("/pwned", b"x"));
    probe::report_io("write_tmp", std::fs::write("/tmp/pwned", b"x"));
    probe::after_lockdown("/etc/hosts");
    probe::emit("done", "info", "", None);
}

impl Driver for Hostile {
    type Options = Options;

    fn manifest() -> Manifest {
        Manifest {
            name: "hostile".into(),
            version: "0.1.0".into(),
            description: "test plugin that attacks its driver host".into(),
            author: "capnet tests".into(),
            provides: vec![Provided {
                interface_id: capnet_driver_api::capnet_schemas::ids::IP_NETWORK,
                name: "IpNetwork".into(),
                protocols: vec!["tcp".into()],
            }],
            privileges: Privileges {
                outbound_tcp: true,
                ..Default::default()
            },
        }
    }

    fn start(options: Options, _host: &DriverHost) -> Result<Self, DriverError> {
        attack(&options);
        Ok(Hostile)
    }
}

capnet_driver_api::export_driver!(Hostile);
